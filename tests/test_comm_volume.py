"""benchmarks/comm_volume.py: the analytic communication volume of a step equals what the mesh counts."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from trinity.distributed.layout import Layout

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "comm_volume.py"
_spec = importlib.util.spec_from_file_location("comm_volume", _PATH)
cv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cv)

S, T, MBS = 8, 32, 2  # 2 micro-batches per rank on 2 data-parallel ranks; cp chunks of 8 ≥ window − 1 = 7


@pytest.fixture(scope="module")
def job():
    config = cv.bench_config()
    return config, cv.init_params(config, seed=1, dtype=np.float32), cv.make_batch(config, S, T)


@pytest.mark.parametrize("layout", ["dp_shard=2,ep=2", "dp_replicate=2,cp=2"])
def test_analytic_matches_measured(job, layout):
    config, params0, batch = job
    res = cv.run_layout(layout, config, params0, batch, MBS)
    assert res["micro_batches"] == 2
    kinds = {(r["kind"], r["group"]) for r in res["rows"]}
    expected = {("Alltoallv", "ep"), ("Alltoall", "ep"), ("Iallgather", "fsdp")} if Layout.parse(layout).ep > 1 else \
        {("Allgather", "cp"), ("Alltoallv", "cp"), ("Reduce_scatter_block", "cp"), ("Allreduce", "dp_replicate")}
    assert expected <= kinds
    for r in res["rows"] + [res["total"]]:
        assert r["measured"] > 0 and cv.in_band(r["ratio"]), (layout, r)


def test_routing_counts_enter_the_all_to_all(job):
    """The EP rows' volume follows the routing counts: other counts, another analytic volume."""
    config, params0, batch = job
    layout = Layout.parse("dp_shard=2,ep=2")
    measured, counts = cv.measure(layout, config, params0, batch, MBS)
    analytic = cv.analytic(config, layout, S, T, MBS, 4, counts)
    assert analytic[("Alltoallv", "ep")] == measured[("Alltoallv", "ep")]
    local = [[{l: np.where(np.arange(config.num_experts) < 4, c.sum(), 0) if r == 0 else c for l, c in mb.items()}
              for mb in rank] for r, rank in enumerate(counts)]  # rank 0 keeps all its rows
    assert cv.analytic(config, layout, S, T, MBS, 4, local)[("Alltoallv", "ep")] < analytic[("Alltoallv", "ep")]


def test_single_rank_counts_nothing(job):
    config, params0, batch = job
    res = cv.run_layout("single", config, params0, batch, MBS)
    assert res["rows"] == [] and res["total"]["measured"] == 0 and res["total"]["analytic"] == 0


def test_cli_json(capsys):
    rc = cv.main(["--layouts", "single", "--seqs", "4", "--seq-len", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["layout"] for r in out] == ["single"] and out[0]["total"]["measured"] == 0
