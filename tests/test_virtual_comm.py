"""The virtual communicator (simulate/virtual_comm.py): every collective against a NumPy computation of its result
for 1–5 ranks, Split groups, overlapped Iallgathers, bit-for-bit determinism, copies between ranks, and failures
and deadlocks that end in a clear error instead of a hang."""

from __future__ import annotations

import functools
import random
import sys
import threading
import time
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.simulate.virtual_comm import (IN_PLACE, MAX, MIN, SUM, UNDEFINED, CollectiveMismatch, DeadlockError,
                                           PeerFailed, RankFailed, VirtualCluster)

DTYPES = [np.float64, np.float32, np.int64]
OPS = {SUM: np.add, MAX: np.maximum, MIN: np.minimum}
ranks = st.integers(1, 5)
dtypes = st.sampled_from(DTYPES)
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
seeds = st.integers(0, 2**32 - 1)


def random_array(rng, shape, dtype):
    if np.dtype(dtype).kind == "f":
        # mixed magnitudes so that the summation order shows in the low bits
        return np.asarray(rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape), dtype)
    return np.asarray(rng.integers(-1000, 1000, shape), dtype)


def rank_order(op, arrays):
    """((x_0 op x_1) op x_2) ..., in the arrays' dtype: the documented reduction."""
    return functools.reduce(lambda a, b: OPS[op](a, b).astype(a.dtype), arrays)


def per_rank(n, seed, shape, dtype):
    rng = np.random.default_rng(seed)
    return [random_array(rng, shape, dtype) for _ in range(n)]


def assert_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes(), (a, b)


@settings(max_examples=40, deadline=None)
@given(ranks, shapes, dtypes, st.sampled_from([None, SUM, MAX, MIN]), st.booleans(), seeds)
def test_allreduce(n, shape, dtype, op, in_place, seed):
    xs = per_rank(n, seed, shape, dtype)

    def fn(comm):
        x = xs[comm.rank].copy()
        kwargs = {} if op is None else {"op": op}
        if in_place:
            comm.Allreduce(IN_PLACE, x, **kwargs)
            return x
        out = np.full_like(x, 7)
        comm.Allreduce(x, out, **kwargs)
        assert_bits(x, xs[comm.rank])  # sendbuf untouched
        return out

    expected = rank_order(op or SUM, xs)
    for got in VirtualCluster(n).run(fn):
        assert_bits(got, expected)


@settings(max_examples=40, deadline=None)
@given(ranks, st.integers(0, 6), dtypes, st.sampled_from([SUM, MAX, MIN]), seeds)
def test_reduce_scatter_block(n, m, dtype, op, seed):
    xs = per_rank(n, seed, (n * m,), dtype)

    def fn(comm):
        out = np.empty(m, dtype)
        comm.Reduce_scatter_block(xs[comm.rank], out, op=op)
        return out

    total = rank_order(op, xs)
    for r, got in enumerate(VirtualCluster(n).run(fn)):
        assert_bits(got, total[r * m:(r + 1) * m])


@settings(max_examples=40, deadline=None)
@given(ranks, shapes, dtypes, st.booleans(), seeds)
def test_allgather(n, shape, dtype, in_place, seed):
    xs = per_rank(n, seed, shape, dtype)

    def fn(comm):
        out = np.zeros((n,) + shape, dtype)
        if in_place:
            out[comm.rank] = xs[comm.rank]
            comm.Allgather(IN_PLACE, out)
        else:
            comm.Allgather(xs[comm.rank], out)
        return out

    for got in VirtualCluster(n).run(fn):
        assert_bits(got, np.stack(xs))


@settings(max_examples=30, deadline=None)
@given(ranks, st.integers(1, 4), st.integers(0, 5), dtypes, seeds)
def test_iallgather_overlapped_with_other_collectives(n, posts, m, dtype, seed):
    """Each rank posts several Iallgathers, runs blocking collectives in between, polls with Test, and waits in
    order; a rank that sleeps first makes the others reach Wait before their peers posted."""
    rng = np.random.default_rng(seed)
    xs = [[random_array(rng, (m,), dtype) for _ in range(n)] for _ in range(posts)]

    def fn(comm):
        if comm.rank == n - 1:
            time.sleep(0.002)
        outs, reqs = [], []
        for k in range(posts):
            outs.append(np.zeros(n * m, dtype))
            send = xs[k][comm.rank].copy()
            reqs.append(comm.Iallgather(send, outs[-1]))
            send[...] = 0  # the data was copied at posting
            total = np.zeros(1)
            comm.Allreduce(np.array([float(comm.rank)]), total)
            assert total[0] == n * (n - 1) / 2
        reqs[0].Test()
        for req in reqs:
            req.Wait()
            assert req.Test()
        return outs

    for got in VirtualCluster(n).run(fn):
        for k in range(posts):
            assert_bits(got[k], np.concatenate(xs[k]))


@settings(max_examples=40, deadline=None)
@given(ranks, st.integers(0, 4), dtypes, seeds)
def test_alltoall(n, b, dtype, seed):
    xs = per_rank(n, seed, (n * b,), dtype)

    def fn(comm):
        out = np.empty(n * b, dtype)
        comm.Alltoall(xs[comm.rank], out)
        return out

    for r, got in enumerate(VirtualCluster(n).run(fn)):
        assert_bits(got, np.concatenate([xs[j][r * b:(r + 1) * b] for j in range(n)]))


@settings(max_examples=40, deadline=None)
@given(ranks, dtypes, st.booleans(), seeds)
def test_alltoallv(n, dtype, explicit_displs, seed):
    """counts[i][j] elements from rank i to rank j; with explicit displacements the blocks sit in a shuffled order
    with gaps, which must stay untouched on the receiving side."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, (n, n))

    def layout(cnt):
        if not explicit_displs:
            return np.concatenate([[0], np.cumsum(cnt)[:-1]]), int(cnt.sum())
        order, displs, pos = rng.permutation(n), np.zeros(n, np.int64), 0
        for j in order:
            pos += int(rng.integers(0, 3))
            displs[j], pos = pos, pos + cnt[j]
        return displs, pos + 1

    sends = [layout(counts[i]) for i in range(n)]
    recvs = [layout(counts[:, r]) for r in range(n)]
    data = [random_array(rng, (size,), dtype) for _, size in sends]

    def fn(comm):
        r = comm.rank
        (sd, _), (rd, rsize) = sends[r], recvs[r]
        out = np.full(rsize, -1, dtype)
        if explicit_displs:
            comm.Alltoallv([data[r], (list(counts[r]), list(sd))], [out, (list(counts[:, r]), list(rd))])
        else:
            comm.Alltoallv([data[r], counts[r]], [out, counts[:, r]])
        return out

    for r, got in enumerate(VirtualCluster(n).run(fn)):
        expected = np.full(recvs[r][1], -1, dtype)
        for j in range(n):
            c, sd, rd = counts[j, r], sends[j][0][r], recvs[r][0][j]
            expected[rd:rd + c] = data[j][sd:sd + c]
        assert_bits(got, expected)


@settings(max_examples=40, deadline=None)
@given(ranks, st.data())
def test_split_groups_run_their_own_collectives(n, data):
    colors = data.draw(st.lists(st.sampled_from([0, 1, 2, UNDEFINED]), min_size=n, max_size=n))
    keys = data.draw(st.lists(st.integers(-2, 2), min_size=n, max_size=n))

    def members(r):
        return sorted((q for q in range(n) if colors[q] == colors[r]), key=lambda q: (keys[q], q))

    def fn(comm):
        sub = comm.Split(colors[comm.rank], keys[comm.rank])
        world_sum = np.zeros(1)
        comm.Allreduce(np.ones(1), world_sum)  # a world collective between the split and the group's
        if sub is None:
            return None
        gathered = np.zeros(sub.Get_size(), np.int64)
        sub.Allgather(np.array([comm.rank]), gathered)
        total = np.zeros(2)
        sub.Allreduce(np.array([comm.rank, 1.0]), total)
        halves = sub.Split(sub.rank % 2)  # a split of a split
        return (sub.Get_rank(), sub.Get_size(), gathered.tolist(), total.tolist(), world_sum[0],
                halves.allgather(comm.rank), sub.bcast(comm.rank, root=sub.size - 1))

    for r, got in enumerate(VirtualCluster(n).run(fn)):
        if colors[r] == UNDEFINED:
            assert got is None
            continue
        group = members(r)
        half = [q for i, q in enumerate(group) if i % 2 == group.index(r) % 2]
        assert got == (group.index(r), len(group), group, [float(sum(group)), float(len(group))], float(n),
                       half, group[-1])


def test_object_collectives_and_barrier():
    def fn(comm):
        comm.Barrier()
        got = comm.bcast({"from": comm.rank, "list": [comm.rank]}, root=2)
        got["list"].append("mine")  # a rank's copy only
        comm.Barrier()
        return (got, comm.allgather((comm.rank, "x")), comm.allreduce(comm.rank + 0.5), comm.allreduce(comm.rank, MAX),
                comm.allreduce(comm.rank, op=MIN))

    for got in VirtualCluster(4).run(fn):
        assert got == ({"from": 2, "list": [2, "mine"]}, [(r, "x") for r in range(4)], 8.0, 3, 0)


def test_results_are_copies():
    """A rank writing into its buffers after a collective returns changes nothing on the other ranks."""
    def fn(comm):
        send, out = np.full(3, float(comm.rank)), np.zeros(6)
        comm.Allgather(send, out)
        if comm.rank == 0:
            out[...], send[...] = -1, -1
        comm.Barrier()
        return out

    results = VirtualCluster(2).run(fn)
    assert results[1].tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reductions_are_deterministic_whatever_the_scheduling(dtype):
    """Random sleeps change which rank arrives last; the bits stay those of the rank-order sum."""
    n = 5
    xs = per_rank(n, 1, (257,), dtype)

    def fn(comm, seed):
        rng = random.Random(seed * 10 + comm.rank)
        outs = []
        for _ in range(3):
            time.sleep(rng.random() * 0.003)
            out = np.empty_like(xs[0])
            comm.Allreduce(xs[comm.rank], out)
            outs.append(out.tobytes())
        return outs

    runs = [VirtualCluster(n).run(fn, seed) for seed in range(3)]
    expected = rank_order(SUM, xs).tobytes()
    assert all(b == expected for run in runs for outs in run for b in outs)


def test_two_clusters_at_once():
    results = {}

    def outer(n):
        def fn(comm):
            total = np.zeros(1)
            for _ in range(20):
                comm.Allreduce(np.array([float(comm.rank)]), total)
            return total[0]
        results[n] = VirtualCluster(n).run(fn)

    threads = [threading.Thread(target=outer, args=(n,)) for n in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {3: [3.0] * 3, 4: [6.0] * 4}


def test_a_failing_rank_releases_the_others_and_is_named():
    released = []

    def fn(comm):
        if comm.rank == 2:
            raise ValueError("bad shard")
        if comm.rank == 3:
            time.sleep(0.05)  # enters its collective after the failure
        try:
            comm.Barrier()
        except PeerFailed:
            released.append(comm.rank)
            raise

    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"^rank 2 failed: ValueError: bad shard$") as info:
        VirtualCluster(4, timeout=30).run(fn)
    assert time.monotonic() - start < 5
    assert isinstance(info.value.__cause__, ValueError)
    assert sorted(released) == [0, 1, 3]


def test_abort_fails_the_run():
    def fn(comm):
        if comm.rank == 1:
            comm.Abort(3)
        comm.Allreduce(np.zeros(2), np.zeros(2))

    with pytest.raises(RankFailed, match=r"rank 1 failed: Aborted: Abort\(errorcode=3\)"):
        VirtualCluster(3).run(fn)


def test_different_collectives_at_the_same_call_are_named():
    def fn(comm):
        comm.Barrier()
        if comm.rank == 0:
            comm.Allreduce(np.zeros(1), np.zeros(1))
        else:
            time.sleep(0.02)
            comm.Barrier()

    # rank 0 usually comes first (the others sleep), but the message names the collectives whichever order it is
    with pytest.raises(RankFailed, match=r"CollectiveMismatch: rank \d called (Barrier|Allreduce\(SUM\)) as call #1 "
                                         r"on world, but rank\(s\) \[[\d, ]+\] called (Allreduce\(SUM\)|Barrier) "
                                         r"there") as info:
        VirtualCluster(3, timeout=30).run(fn)
    assert isinstance(info.value.__cause__, CollectiveMismatch)


def test_a_deadlock_times_out_naming_every_rank_and_collective():
    """Both ranks share a sub-communicator and call its Barrier and the world's in opposite orders."""
    def fn(comm):
        sub = comm.Split(0)
        first, second = (sub, comm) if comm.rank == 0 else (comm, sub)
        first.Barrier()
        second.Barrier()

    start = time.monotonic()
    with pytest.raises(RankFailed, match="DeadlockError: deadlock") as info:
        VirtualCluster(2, timeout=1.0).run(fn)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert isinstance(info.value.__cause__, DeadlockError)
    assert "rank 0: in Barrier (call #0 on world/split(0))" in message
    assert "rank 1: in Barrier (call #1 on world)" in message


def test_a_rank_that_returns_early_leaves_a_clear_timeout():
    def fn(comm):
        comm.Barrier()
        if comm.rank == 1:
            comm.Allgather(np.zeros(1), np.zeros(3))

    with pytest.raises(RankFailed, match=r"rank 1 waited 1 s in Allgather \(call #1 on world\) for rank\(s\) "
                                         r"\[0, 2\]\. Where every rank is: rank 0: returned; rank 1: in Allgather"):
        VirtualCluster(3, timeout=1.0).run(fn)


@pytest.mark.parametrize("call, error", [
    (lambda c: c.Allreduce(np.zeros(2 + c.rank), np.zeros(2 + c.rank)),
     r"Allreduce: the ranks' sendbufs have sizes \[2, 3\], need [23] each"),
    (lambda c: c.Allreduce(np.zeros(2), np.zeros(2, np.float32)), "Allreduce: buffers of different dtypes"),
    (lambda c: c.Allgather(np.zeros(2), np.zeros(5)), "Allgather: recvbuf has 5 elements, need size·sendbuf.size"),
    (lambda c: c.Reduce_scatter_block(np.zeros(5), np.zeros(2)), "need size·recvbuf.size"),
    (lambda c: c.Alltoallv([np.zeros(4), [2, 2]], [np.zeros(4), [1, 3]]),
     r"Alltoallv: rank \d sends \d elements to rank \d, which expects"),
    (lambda c: c.Allgather(np.zeros((4, 4))[:, 1], np.zeros(2)), "must be contiguous"),
    (lambda c: c.Allreduce(np.zeros(1), np.zeros(1), op="PROD"), "unsupported reduction op"),
])
def test_bad_buffers_are_clear_errors(call, error):
    with pytest.raises(RankFailed, match=error):
        VirtualCluster(2, timeout=10).run(call)


def test_mpi4py_constants_are_accepted(monkeypatch):
    """MPI.SUM/MAX/MIN/IN_PLACE are recognised when mpi4py.MPI is imported (a stand-in here: mpi4py isn't needed)."""
    fake = types.ModuleType("mpi4py.MPI")
    fake.SUM, fake.MAX, fake.MIN, fake.IN_PLACE = object(), object(), object(), object()
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake)

    def fn(comm):
        x, out = np.array([comm.rank, -comm.rank], np.int64), np.zeros(2, np.int64)
        comm.Allreduce(x, out, op=fake.MAX)
        comm.Allreduce(fake.IN_PLACE, x, op=fake.SUM)
        return out.tolist(), x.tolist(), comm.allreduce(comm.rank, op=fake.MIN)

    assert VirtualCluster(3).run(fn) == [([2, 0], [3, -3], 0)] * 3
