"""The schedule options (distributed/options.py) under real `mpiexec`: a job with them trains the single process's
model (every step's losses, the held-out losses, and after steps 1, 3 and 4 the params, optimizer and balancing state
to 1e-10 relative in float64), and `trinity simulate` of the same job is that job bit for bit (tests/test_mpi_train.py's
comparison, whose run file and single-process run this file shares).

The layouts cover both reduce-scatter paths a posted (async_reduce) reduce-scatter takes: over more than two ranks
the rank-ordered Ialltoall (mesh._OrderedReduceScatter), over two the MPI library's own Ireduce_scatter_block; the
kept, not-resharded and step-reduced buckets of both dense and expert (efsdp) kinds; checksums with the numba
backend. The dtype options round by design and are checked on virtual ranks (tests/test_layouts.py).
"""

import pytest

from trinity.distributed.layout import Layout

from mpi_jobs import requires_mpi, run_mpi
import test_mpi_train
from test_mpi_train import (_assert_same_losses, _assert_same_state, _assert_simulate_is_the_job, _checkpoint,
                            _metrics, _run_dir)

data, single = test_mpi_train.data, test_mpi_train.single  # its fixtures: the data and the single-process run

pytestmark = requires_mpi

EVERYTHING = "keep_gathered=all,reshard_after_forward=none,reduce_gradients=step,async_reduce=true"
LAYOUTS = [(4, f"dp_shard=4,ep=2,{EVERYTHING}", "reference"),
           (4, "dp_replicate=2,cp=2,ep=2,keep_gathered=experts,reshard_after_forward=dense,async_reduce=true",
            "reference"),
           (4, "dp_replicate=2,dp_shard=2,keep_gathered=all,keep_gathered_gib=0.00002,reshard_after_forward=experts,"
               "reduce_gradients=step", "numba")]


@pytest.mark.parametrize("ranks,layout,backend", LAYOUTS)
def test_a_job_with_schedule_options_trains_the_single_process_model(tmp_path, data, single, ranks, layout,
                                                                     backend):
    d = _run_dir(tmp_path, data)
    options = ["--mesh", layout, "--backend", backend] + (["--checksums"] if backend == "numba" else [])
    code, out, err, _ = run_mpi(ranks, ["-m", "trinity.cli", "train", "run.toml", *options], cwd=d, timeout=180)
    assert code == 0, err
    assert f"layout {Layout.parse(layout)} over {ranks} ranks" in out
    lines = _metrics(d)
    assert [row["step"] for row in lines] == [1, 2, 3, 4]
    _assert_same_losses(lines, _metrics(single))
    _assert_same_losses(_metrics(d, "eval"), _metrics(single, "eval"))
    for step in (1, 3, 4):
        _assert_same_state(_checkpoint(d, step), _checkpoint(single, step))
    _assert_simulate_is_the_job(d, data, ranks, options)
