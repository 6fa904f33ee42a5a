"""The virtual communicator (simulate/virtual/virtual_comm.py): every collective against a NumPy computation of its result
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

from trinity.simulate.virtual.virtual_comm import (IN_PLACE, MAX, MIN, SUM, UNDEFINED, CollectiveMismatch, DeadlockError,
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


@settings(max_examples=30, deadline=None)
@given(ranks, st.integers(1, 4), dtypes, seeds)
def test_posted_reduce_scatter_and_alltoall_equal_the_blocking_ones(n, m, dtype, seed):
    """Ireduce_scatter_block and Ialltoall (the FSDP seam's async_reduce and the mesh's rank-ordered posted
    reduce-scatter): the send buffer copied at posting, the result at Wait the blocking call's, bit for bit, with
    another collective in between."""
    xs = per_rank(n, seed, (n * m,), dtype)

    def fn(comm):
        send = xs[comm.rank].copy()
        posted, moved = np.empty(m, dtype), np.empty(n * m, dtype)
        reduced = comm.Ireduce_scatter_block(send, posted)
        swapped = comm.Ialltoall(send, moved)
        send[...] = 0  # copied at posting
        total = np.zeros(1)
        comm.Allreduce(np.array([1.0]), total)
        blocking, exchanged = np.empty(m, dtype), np.empty(n * m, dtype)
        comm.Reduce_scatter_block(xs[comm.rank], blocking)
        comm.Alltoall(xs[comm.rank], exchanged)
        swapped.Wait()
        reduced.Wait()
        return posted, blocking, moved, exchanged

    for posted, blocking, moved, exchanged in VirtualCluster(n).run(fn):
        assert_bits(posted, blocking)
        assert_bits(moved, exchanged)


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
    assert time.monotonic() - start < 25  # released by the failure, not by the 30 s timeout (a hang-only bound)
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
    assert time.monotonic() - start < 60  # ended by the deadlock check: a hang-only bound
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


def test_object_collectives_never_unpickle(monkeypatch):
    """Each rank gets its own deep copies (the project never unpickles): a rank changing what it got changes nothing
    elsewhere, and pickle is not used."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "dumps", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    mine = [{"n": r} for r in range(3)]

    def fn(comm):
        got = comm.allgather(mine[comm.rank])
        got[0]["n"] = 100 + comm.rank  # this rank's copy only
        comm.Barrier()
        return got, comm.allreduce([comm.rank]), comm.bcast(mine[comm.rank], root=1)

    for r, (got, joined, root) in enumerate(VirtualCluster(3).run(fn)):
        assert got == [{"n": 100 + r}, {"n": 1}, {"n": 2}] and joined == [0, 1, 2] and root == {"n": 1}
    assert mine == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_a_corrupted_send_reaches_one_receiver_with_a_bit_flipped_in_every_value():
    """Rank 1's next send after corrupt_next_send(): a Barrier carries nothing, so the fault waits; in the Alltoallv
    rank 1 sends nothing to rank 2, so rank 3, the next that reads data from it, gets its block with one bit flipped
    in each of its values; every other block, the sender's own buffers and the next collective arrive intact."""
    n = 4

    def counts(j, r):  # elements rank j sends to rank r
        return 0 if (j, r) == (1, 2) else 2

    def sent(j):
        return np.arange(2.0 * sum(counts(j, r) for r in range(n))) + 10 * j

    def fn(comm):
        r = comm.rank
        if r == 1:
            comm.corrupt_next_send()
        comm.Barrier()
        send, out = sent(r), np.zeros(sum(counts(j, r) for j in range(n)))
        comm.Alltoallv([send, [counts(r, j) for j in range(n)]], [out, [counts(j, r) for j in range(n)]])
        whole = np.zeros(2 * n)
        comm.Allgather(np.array([r, r + 0.5]), whole)
        return send, out, whole

    for r, (send, out, whole) in enumerate(VirtualCluster(n).run(fn)):
        assert np.array_equal(send, sent(r)) and np.array_equal(whole, np.repeat(np.arange(n), 2) + [0, 0.5] * n)
        want = np.concatenate([sent(j)[sum(counts(j, q) for q in range(r)):][:counts(j, r)] for j in range(n)])
        flipped = np.unpackbits(out.view(np.uint8) ^ want.view(np.uint8)).sum()
        assert flipped == (counts(1, 3) if r == 3 else 0), (r, out, want)


def test_a_hung_rank_ends_in_a_deadlock_naming_it_and_its_thread_ends():
    def fn(comm):
        comm.Barrier()
        if comm.rank == 1:
            comm.hang("hung for the test")
        comm.Allreduce(np.zeros(2), np.zeros(2))

    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"DeadlockError: deadlock: rank [02] waited 1 s in Allreduce\(SUM\) "
                                         r"\(call #1 on world\) for rank\(s\) \[1\]") as info:
        VirtualCluster(3, timeout=1.0).run(fn)
    assert time.monotonic() - start < 60  # ended by the deadlock check: a hang-only bound
    assert "rank 1: hung for the test" in str(info.value) and "rank 0: in Allreduce(SUM)" in str(info.value)
    assert not [t for t in threading.enumerate() if t.name.startswith("vrank-")]


def test_when_every_rank_hangs_the_run_still_ends():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"DeadlockError: deadlock: rank \d stuck, and no rank failed in 1 s"):
        VirtualCluster(2, timeout=0.5).run(lambda comm: comm.hang("stuck"))
    assert time.monotonic() - start < 60  # ended by the deadlock check: a hang-only bound


CHECKED = ["Allreduce", "max", "Reduce_scatter_block", "Allgather", "Iallgather", "Alltoall", "Alltoallv"]


def _mesh_call(mesh, kind):
    """One mesh collective of `kind` on the 4-rank fsdp group, with data that differs per rank; returns the result."""
    r = mesh.rank
    if kind == "Alltoallv":  # rank r sends (r + j) % 3 elements to rank j: rank 1 sends none to rank 2
        counts = [(r + j) % 3 for j in range(4)]
        displs = np.cumsum([0] + counts[:-1]).tolist()
        send, out = np.arange(float(sum(counts))) + 10 * r, np.empty(sum(counts))
        mesh.collective(kind, "fsdp", [send, (counts, displs)], [out, (counts, displs)], sent_bytes=0)
        return out
    x = np.arange(12.0) * (r + 1) + 0.1 * r
    out = np.empty({"Reduce_scatter_block": 3, "Allgather": 48, "Iallgather": 48}.get(kind, 12))
    request = mesh.collective("Allreduce" if kind == "max" else kind, "fsdp", x, out,
                              op="max" if kind == "max" else None)
    if request is not None:
        request.Wait()
    return out


@pytest.mark.parametrize("kind", CHECKED)
def test_checked_collectives_are_the_unchecked_bits_and_catch_a_flipped_bit(kind):
    """The mesh with checksums (distributed/checksums.py) over virtual ranks: the same results as without, bit for
    bit; a bit flipped in rank 1's message fails the receiver, naming both ranks, the collective and the group, and
    without checksums it changes the receiver's result unnoticed (a maximum may hide it: not checked there)."""
    from trinity.distributed.layout import Layout
    from trinity.distributed.mesh import Mesh

    def fn(comm, checksums, corrupt):
        mesh = Mesh(comm, Layout(dp_shard=4), checksums=checksums)
        if corrupt and mesh.rank == 1:
            mesh.groups["fsdp"].corrupt_next_send()
        return _mesh_call(mesh, kind)

    plain = VirtualCluster(4).run(fn, False, False)
    assert all(np.array_equal(a, b) for a, b in zip(plain, VirtualCluster(4).run(fn, True, False)))
    name = "Allreduce" if kind == "max" else kind
    with pytest.raises(RankFailed, match=rf"rank (\d) failed: ChecksumError: corrupted message from rank 1 to rank "
                                         rf"\1 in {name}.* on the fsdp group at step 0 \(start\)"):
        VirtualCluster(4).run(fn, True, True)
    if kind != "max":
        dirty = VirtualCluster(4).run(fn, False, True)
        assert sum(not np.array_equal(a, b) for a, b in zip(plain, dirty)) >= 1
