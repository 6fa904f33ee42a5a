"""The schedule option muon_owners=local: distributed Muon's owner of each matrix is the rank holding the largest part
of it (ties: the least loaded), so that fewer elements travel, with the load balance stated by the plan.

- the owners follow the stated rule (plan.owners_of), written here plainly from the shards, element by element;
- the schedule's Muon exchanges are the elements outside their owner's shard, and the plan's stated balance and
  travelling fraction are what the plan's owners and the schedule give;
- every cluster layout with muon_owners=local trains the single process's model on virtual ranks (float64, 1e-10),
  and every rank's trace equals the schedule exactly (tests/test_plan_schedule.py's check);
- the cost model prices the same owners: its Newton–Schulz work, its memory and its traffic (the schedule's sum).
tests/test_mpi_muon_owners.py runs the option under real mpiexec.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trinity.distributed.layout import Layout
from trinity.distributed.plan import ParallelPlan, owners_of, shapes_key
from trinity.distributed.schedule import Itemsizes, muon_sends, step_schedule
from trinity.reference import Config

from test_layouts import _config, check_layout
from test_plan_schedule import CLUSTER, _check, data, single

FIXTURES = (data, single)  # tests/test_plan_schedule.py's fixtures, which its _check takes

LOCAL = ",muon_owners=local"
BENCH = ["dp_shard=4", "dp_replicate=2,dp_shard=2", "dp_shard=2,ep=2", "dp_shard=4,ep=4", "cp=2", "cp=4",
         "dp_replicate=2,cp=2", "dp_shard=2,cp=2,ep=4", "dp_replicate=2,dp_shard=2,cp=2,ep=2"]  # comm_volume.py's


def _work(shape) -> int:
    rows, cols = shape
    return rows * cols * min(rows, cols)


def _documented_local(shapes, n: int) -> list[int]:
    """The rule as stated, written plainly: shard = ⌈size/n⌉, element e held by rank e // shard; each matrix to the
    rank holding most of its elements; matrices with several such ranks after all others, the largest work first
    (ties by position), each to the one of those ranks with the least work so far (ties: the lowest rank)."""
    matrices = [tuple(s[-2:]) for s in shapes for _ in range(math.prod(s[:-2]))]
    size = sum(r * c for r, c in matrices)
    shard = -(-size // n)
    holder = np.arange(size) // shard
    owner, loads, tied, at = [None] * len(matrices), [0] * n, {}, 0
    for i, (rows, cols) in enumerate(matrices):
        counts = np.bincount(holder[at:at + rows * cols], minlength=n)
        at += rows * cols
        best = np.flatnonzero(counts == counts.max()).tolist()
        if len(best) == 1:
            owner[i] = best[0]
            loads[best[0]] += _work(matrices[i])
        else:
            tied[i] = best
    for i in sorted(tied, key=lambda i: (-_work(matrices[i]), i)):
        owner[i] = min(tied[i], key=lambda q: (loads[q], q))
        loads[owner[i]] += _work(matrices[i])
    return owner


shape_lists = st.lists(st.one_of(
    st.tuples(st.integers(1, 48), st.integers(1, 48)),
    st.tuples(st.integers(1, 6), st.integers(1, 32), st.integers(1, 32))), min_size=1, max_size=12)


@given(shape_lists, st.integers(1, 9))
def test_local_owners_follow_the_stated_rule(shapes, n):
    got = owners_of(tuple(tuple(s) for s in shapes), n, "local")
    balanced = owners_of(tuple(tuple(s) for s in shapes), n)
    assert [g[:2] + g[3:] for g in got] == [g[:2] + g[3:] for g in balanced]  # the same matrices, in flat order
    assert [g[2] for g in got] == _documented_local(shapes, n)
    size = got[-1][1]
    shard = -(-size // n)
    for lo, hi, owner, _ in got:  # the owner holds a largest part: no other rank holds more of the matrix
        held = [max(0, min(hi, (r + 1) * shard) - max(lo, r * shard)) for r in range(n)]
        assert held[owner] == max(held)


def test_an_unknown_rule_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^muon_owners = 'near': must be one of balanced, local$"):
        owners_of(((2, 2),), 2, "near")


def test_matrices_inside_one_shard_never_travel():
    """Eight 4×4 matrices over 4 ranks, two whole matrices per shard: balanced owners send most of them away and
    back, local owners none; each rank then owns its own two (the balance is even)."""
    shapes = ((8, 4, 4),)
    first, second = muon_sends(shapes, 4, False, "local")
    assert first.tolist() == second.tolist() == [0, 0, 0, 0]
    assert sum(muon_sends(shapes, 4)[0]) > 0
    assert [o for _, _, o, _ in owners_of(shapes, 4, "local")] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("rule", ["balanced", "local"])
def test_muon_sends_are_the_elements_outside_their_owners_shard(rule):
    """Alltoallv #1 sends each element of a matrix held by another rank than its owner once, #2 sends it back, under
    either rule: by element, from the owners and the shards [i·⌈z/n⌉, (i+1)·⌈z/n⌉)."""
    rng = np.random.default_rng(2)
    for _ in range(30):
        shapes = tuple((int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 9))) if rng.random() < 0.3
                       else (int(rng.integers(1, 12)), int(rng.integers(1, 12))) for _ in range(rng.integers(1, 6)))
        n = int(rng.integers(2, 7))
        owner = np.concatenate([np.full(hi - lo, o) for lo, hi, o, _ in owners_of(shapes, n, rule)])
        holder = np.arange(owner.size) // -(-owner.size // n)
        moved = owner != holder
        first, second, blocks1, blocks2 = muon_sends(shapes, n, True, rule)
        assert first.tolist() == np.bincount(holder[moved], minlength=n).tolist()
        assert second.tolist() == np.bincount(owner[moved], minlength=n).tolist()
        pairs = set(zip(holder[moved].tolist(), owner[moved].tolist()))
        assert blocks1.tolist() == [sum(h == i for h, _ in pairs) for i in range(n)]
        assert blocks2.tolist() == [sum(o == i for _, o in pairs) for i in range(n)]


def _muon_bytes_of_schedule(config, layout, q=4) -> tuple[int, int]:
    """(bytes every rank sends in the step's Muon exchanges, elements of the Muon buckets that exchange, over every
    group), from the schedule and the plan's buckets."""
    plan = ParallelPlan(config, layout)
    sent = sum(s.bytes for r in range(plan.world_size) for s in step_schedule(plan, r, 2 * layout.dp, 4 * layout.cp, 1, q)
               if s.phase == "optimizer" and s.kind == "Alltoallv")
    whole = sum(layout.world_size // b.n * b.size for b in plan.buckets(0) if b.optimizer == "muon" and b.n > 1)
    return sent, whole


@pytest.mark.parametrize("text", ["dp_shard=4", "dp_shard=2,ep=2", "dp_shard=3", "dp_replicate=2,dp_shard=2,cp=2,ep=2",
                                  "dp_shard=8,ep=8"])
@pytest.mark.parametrize("rule", ["balanced", "local"])
def test_the_stated_balance_is_the_plans_owners(text, rule):
    """ParallelPlan.muon_balance, recomputed from the owners the plan gives each rank (rank by rank, its buckets and
    its index in them): max / mean of the elements and the work each rank of a replica owns, the busiest owner per
    bucket; its travelling fraction is the schedule's Muon bytes (each element out and back, 4 bytes)."""
    config = Config.preset("tiny")
    layout = Layout.parse(f"{text},muon_owners={rule}")
    plan = ParallelPlan(config, layout)
    ranks = plan.members("fsdp", 0)
    elements, work = np.zeros(len(ranks)), np.zeros(len(ranks))
    busiest = even = 0.0
    for i, rank in enumerate(ranks):
        for b in plan.buckets(rank):
            if b.optimizer != "muon":
                continue
            owners = plan.muon_owners(b)
            elements[i] += sum(hi - lo for lo, hi, o, _ in owners if o == b.index)
            work[i] += sum(_work(shape) for _, _, o, shape in owners if o == b.index)
    for b in plan.buckets(0):
        if b.optimizer == "muon":
            per = np.bincount([o for _, _, o, _ in plan.muon_owners(b)],
                              weights=[_work(s) for _, _, _, s in plan.muon_owners(b)], minlength=b.n)
            busiest, even = busiest + per.max(), even + per.mean()
    stated = plan.muon_balance()
    assert stated["elements"] == pytest.approx(elements.max() / elements.mean(), rel=1e-12)
    assert stated["work"] == pytest.approx(work.max() / work.mean(), rel=1e-12)
    assert stated["waits"] == pytest.approx(busiest / even, rel=1e-12)
    sent, whole = _muon_bytes_of_schedule(config, layout)
    assert stated["moved"] == pytest.approx(sent / (2 * 4 * whole), rel=1e-12)


@pytest.mark.parametrize("text", BENCH)
def test_local_owners_move_a_fraction_of_bench_mediums_muon_bytes(text):
    """bench-medium at comm_volume.py's layouts: the schedule's Muon bytes under local owners are under a fifth of
    balanced's, and the stated balance stays within 1.25 (the busiest rank's work over the mean)."""
    config = Config.preset("bench-medium")
    balanced, _ = _muon_bytes_of_schedule(config, Layout.parse(text))
    local, _ = _muon_bytes_of_schedule(config, Layout.parse(text + LOCAL))
    assert 0 < local < balanced / 5
    stated = ParallelPlan(config, Layout.parse(text + LOCAL)).muon_balance()
    assert max(stated["elements"], stated["work"], stated["waits"]) <= 1.25, stated


# ---- the same model, the scheduled collectives --------------------------------------------------------------------
@pytest.mark.parametrize("text", CLUSTER)
def test_local_owners_train_the_single_process_model_on_virtual_ranks(text):
    layout = Layout.parse(text + LOCAL)
    config = _config(window=6, doc_mask=True, method="smebu", tied=False)
    plan = ParallelPlan(config, layout)
    balanced = ParallelPlan(config, Layout.parse(text))
    assert any(plan.muon_owners(b) != balanced.muon_owners(b) for b in plan.buckets(0)
               if b.optimizer == "muon" and b.n > 1)  # not vacuous
    check_layout(layout, config, S=4 * layout.dp, T=12 * layout.cp, mbs=2)


@pytest.mark.parametrize("text", CLUSTER)
def test_every_rank_calls_exactly_the_plans_schedule_with_local_owners(tmp_path, data, single, text):
    _check(tmp_path, data, single, text + LOCAL)


def test_local_owners_with_tied_embeddings_recompute_and_checksums(tmp_path, data, single):
    """Checksums add 4 bytes per block of the Muon exchanges: the blocks of the local owners."""
    _check(tmp_path, data, single, "dp_replicate=2,dp_shard=2,cp=2,ep=2" + LOCAL, recompute=True, tied=True,
           checksums=True)


# ---- the cost model prices the same owners -------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["dp_shard=4,ep=2", "dp_replicate=2,dp_shard=2,cp=2,ep=2"])
def test_the_cost_model_prices_the_local_owners(text):
    """The cost model's Newton–Schulz work on the busiest rank, its Muon memory transient and its traffic (the
    schedule summed over every rank) follow the layout's owner rule."""
    from test_plan_schedule import test_the_cost_model_sums_every_ranks_schedule_without_visiting_every_rank as sums
    from trinity.distributed.rank_memory import _muon_bytes, _ns_bytes, estimate_rank_bytes
    from trinity.simulate.planning.workload import optimizer_work
    config = Config.preset("bench-medium")
    sums(text + LOCAL, "bench-medium")
    layout = Layout.parse(text + LOCAL)
    plan = ParallelPlan(config, layout)
    steps = config.muon_ns_steps
    flops = np.zeros(plan.group_size["fsdp"])
    for i, rank in enumerate(plan.members("fsdp", 0)):
        for b in plan.buckets(rank):
            if b.optimizer == "muon":
                for _, _, o, (rows, cols) in plan.muon_owners(b):
                    small, large = min(rows, cols), max(rows, cols)
                    flops[i] += steps * (4.0 * small * small * large + 2.0 * small ** 3) if o == b.index else 0.0
    assert optimizer_work(config, layout)["newton_schulz"] == pytest.approx(flops.max(), rel=1e-12)
    assert optimizer_work(config, Layout.parse(text))["newton_schulz"] != optimizer_work(config, layout)["newton_schulz"]
    # distributed Muon's transient per rank (rank_memory's documented formula) counts the elements the rank owns
    s, nesterov = 4, bool(config.muon_nesterov)
    for b in plan.buckets(0):
        if b.optimizer != "muon" or b.n == 1:
            continue
        shapes = tuple(tuple(int(x) for x in sh) for sh in b.shapes)
        owners = plan.muon_owners(b)
        want = []
        for r in range(b.n):
            own = sum(hi - lo for lo, hi, o, _ in owners if o == r)
            big = max((_ns_bytes(rows, cols, s) for _, _, o, (rows, cols) in owners if o == r), default=0)
            u, sh = (b.shard_size if nesterov else 0), b.shard_size
            want.append(max((u + sh + 2 * own) * s + big, (u + 2 * sh + 4 * own) * s, (u + 3 * sh + 3 * own) * s))
        assert list(_muon_bytes(shapes, b.n, b.shard_size, s, nesterov, "local")) == want
    # ... and a rank's estimate reads the layout's rule (a small vocabulary, so that Muon's transient is the update's
    # largest, not the clip's product of the embedding shard; ep = 4, so that the layers' buckets are the largest)
    small, layout = config.replace(vocab_size=512), Layout.parse("dp_shard=4,ep=4" + LOCAL)
    update = {rule: [estimate_rank_bytes(small, Layout.parse(f"dp_shard=4,ep=4,muon_owners={rule}"), r, 256, 1)
                     ["update"] for r in range(layout.world_size)] for rule in ("balanced", "local")}
    plan = ParallelPlan(small, layout)
    assert update["local"] == [max(_muon_bytes(shapes_key(b.shapes), b.n, b.shard_size, 4, nesterov, "local")[b.index]
                                   for b in plan.buckets(r) if b.optimizer == "muon" and b.n > 1)
                               for r in range(layout.world_size)]
    assert update["local"] != update["balanced"]


def test_items_of_the_muon_exchange_are_the_reduce_itemsize():
    """The Muon exchanges move q_r bytes per element under either rule (the optimizer state's dtype)."""
    config, layout = Config.preset("tiny"), Layout.parse("dp_shard=4" + LOCAL)
    plan = ParallelPlan(config, layout)
    one = [s.bytes for s in step_schedule(plan, 1, 4, 16, 1, Itemsizes(2, 4, 2)) if s.phase == "optimizer"]
    two = [s.bytes for s in step_schedule(plan, 1, 4, 16, 1, Itemsizes(2, 8, 2)) if s.phase == "optimizer"]
    assert [2 * x for x in one[:-1]] == two[:-1] and any(one[:-1])


def test_the_benchmark_runs_and_traces_the_scheduled_muon_bytes():
    """benchmarks/muon_owners.py (docs/performance.md) on tiny: the traced Muon exchanges are the schedule's, and local
    owners move fewer bytes."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "muon_owners.py"), "--preset", "tiny",
                        "--layouts", "dp_shard=4;dp_shard=2,ep=2", "--seq-len", "128", "--trace", "--json"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    for row in json.loads(r.stdout):
        assert row["balanced"]["trace_is_schedule"] and row["local"]["trace_is_schedule"]
        assert 0 < row["local"]["muon_bytes"] < row["balanced"]["muon_bytes"]
