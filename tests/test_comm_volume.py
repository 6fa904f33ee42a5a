"""benchmarks/comm_volume.py: every rank's traced collectives of a step are the plan's schedule, so the traced volume
is the scheduled one (ratio 1.000) and the cost model prices the same bytes."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from trinity.distributed.layout import Layout
from trinity.distributed.plan import ParallelPlan

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "comm_volume.py"
_spec = importlib.util.spec_from_file_location("comm_volume", _PATH)
cv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cv)

S, T, MBS = 8, 32, 2  # 2 micro-batches per rank on 2 data-parallel ranks; cp chunks of 8 ≥ window − 1 = 7


@pytest.fixture(scope="module")
def job():
    config = cv.bench_config()
    return config, cv.init_params(config, seed=1, dtype=np.float64), cv.make_batch(config, S, T)


@pytest.mark.parametrize("layout,checksums", [("dp_shard=2,ep=2", False), ("dp_replicate=2,cp=2", False),
                                              ("dp_shard=2,ep=2", True)])
def test_the_trace_is_the_schedule(job, layout, checksums):
    config, params0, batch = job
    res = cv.run_layout(layout, config, params0, batch, MBS, checksums=checksums)
    assert res["micro_batches"] == 2 and res["difference"] is None and cv.exact(res)
    kinds = {(r["kind"], r["group"]) for r in res["rows"]}
    expected = {("Alltoallv", "ep"), ("Alltoall", "ep"), ("Iallgather", "fsdp")} if Layout.parse(layout).ep > 1 else \
        {("Allgather", "cp"), ("Alltoallv", "cp"), ("Reduce_scatter_block", "cp"), ("Allreduce", "dp_replicate")}
    assert expected <= kinds
    for r in res["rows"] + [res["total"]]:
        assert r["traced"] > 0 and r["traced"] == r["scheduled"] == r["priced"] and r["ratio"] == 1.0, (layout, r)


def test_routing_counts_enter_the_all_to_all(job):
    """The EP rows' volume follows the routing counts: other counts, another volume."""
    config, params0, batch = job
    layout = Layout.parse("dp_shard=2,ep=2")
    counts = cv.single_process_counts(ParallelPlan(config, layout), params0, batch, MBS)
    volume = cv.analytic(config, layout, S, T, MBS, 8, counts)
    traced = cv._totals(cv.trace(layout, config, params0, batch, MBS))
    assert volume[("Alltoallv", "ep")] == traced[("Alltoallv", "ep")]
    local = [[{l: np.where(np.arange(config.num_experts) < 4, c.sum(), 0) if r == 0 else c for l, c in mb.items()}
              for mb in rank] for r, rank in enumerate(counts)]  # rank 0 keeps all its rows
    assert cv.analytic(config, layout, S, T, MBS, 8, local)[("Alltoallv", "ep")] < volume[("Alltoallv", "ep")]


def test_single_rank_moves_nothing(job):
    config, params0, batch = job
    res = cv.run_layout("single", config, params0, batch, MBS)
    assert res["rows"] == [] and res["total"]["traced"] == 0 and res["total"]["scheduled"] == 0 and cv.exact(res)


def test_cli_json(capsys):
    rc = cv.main(["--layouts", "single;dp_shard=2", "--seqs", "4", "--seq-len", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["layout"] for r in out] == ["single", "dp_shard=2"] and out[0]["total"]["traced"] == 0
    assert out[1]["difference"] is None and out[1]["total"]["ratio"] == 1.0
