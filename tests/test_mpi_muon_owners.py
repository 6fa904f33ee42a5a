"""muon_owners=local under real `mpiexec`: the job trains the single process's model (losses of every step, params,
optimizer and balancing state after steps 1, 3 and 4, to 1e-10 relative), and `trinity simulate` of the same job is
that job bit for bit, its trace's bytes the job's (tests/test_mpi_train.py's check, whose virtual-rank traces equal
the plan's schedule exactly: tests/test_muon_owners.py). The numba job also checks every message (--checksums).
"""

import pytest

from mpi_jobs import requires_mpi
from test_mpi_train import data, single, test_layout_trains_the_single_process_model as trains_the_single_process

pytestmark = requires_mpi
FIXTURES = (data, single)  # tests/test_mpi_train.py's fixtures, which its check takes


@pytest.mark.parametrize("ranks,layout,backend", [(4, "dp_shard=4,muon_owners=local", "reference"),
                                                  (2, "dp_shard=2,ep=2,muon_owners=local", "numba")])
def test_local_owners_train_the_single_process_model_under_mpiexec(tmp_path, data, single, ranks, layout, backend):
    trains_the_single_process(tmp_path, data, single, ranks, layout, backend)
