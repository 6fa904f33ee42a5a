"""A virtual MPI communicator: n ranks inside one process, one Python thread per rank.

`VirtualComm` has the method names and buffer conventions of mpi4py's `MPI.Comm` for the subset the distributed code
uses, so code written against mpi4py runs on it unchanged (docs/architecture.md, "Communicators are an interface"):

    results = VirtualCluster(4).run(train_step, batch)   # train_step(comm, batch) on 4 threads, results by rank

Semantics
---------
- Every collective must be called by every rank of the communicator, in the same order (MPI's rule). Each call takes
  the next sequence number of that communicator; a rank that calls a different collective at the same number gets
  `CollectiveMismatch` at once, and a wait longer than the cluster's timeout raises `DeadlockError` naming every
  rank and the collective it is blocked in (once no rank is still running, or after a second timeout).
- Each rank deposits a *copy* of its input; outputs are written from those copies, so a rank changing its buffers
  after a call returns never affects another rank.
- Reductions are deterministic: for ranks 0..n-1, out = ((x_0 ⊕ x_1) ⊕ x_2) ⊕ … ⊕ x_{n-1} in the buffers' dtype,
  whatever the thread scheduling, so a run gives the same bits every time.
- Buffers are NumPy arrays (or mpi4py-style `[array, datatype]` lists), used as flat arrays in memory order; counts
  and displacements are in elements. `IN_PLACE` is accepted by Allreduce and Allgather only.
- If a rank raises, every rank blocked in (or later entering) a collective gets `PeerFailed`, and `run` raises
  `RankFailed("rank r failed: Type: message")` chained to the original exception once every thread has ended.
- The lower-case object collectives hand every rank its own `copy.deepcopy` of the objects (mpi4py pickles them;
  the project never unpickles), so ranks never share a mutable object.

Faults (trinity.simulate.virtual.faults calls these; MPI has no such methods): `corrupt_next_send()` makes the next data
this rank sends on a communicator reach one other rank with a bit flipped, as a faulty link would (the sender's
buffers and what the other ranks get stay intact); `hang(reason)` makes this rank stop calling collectives until
another rank fails (the others' waits then time out as `DeadlockError`), as a hung process would.
"""

from __future__ import annotations

import copy
import functools
import operator
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .message_parts import block as _block, corruptible as _corruptible, flip_bits as _flip_bits, whole as _whole

__all__ = ["VirtualCluster", "VirtualComm", "SUM", "MAX", "MIN", "IN_PLACE", "UNDEFINED", "RankFailed",
           "PeerFailed", "CollectiveMismatch", "DeadlockError", "Aborted", "Abandoned"]


class RankFailed(RuntimeError):
    """Raised by `VirtualCluster.run` when a rank raised; `__cause__` is that rank's exception."""


class PeerFailed(RuntimeError):
    """Raised in a rank blocked in (or entering) a collective after another rank failed."""


class CollectiveMismatch(RuntimeError):
    """Two ranks called different collectives as the same call of a communicator."""


class DeadlockError(RuntimeError):
    """A rank waited longer than the cluster's timeout for the other ranks of a collective."""


class Abandoned(RuntimeError):
    """`VirtualCluster.run` gave up on ranks that were stuck when its `give_up()` asked it to stop (the message
    names them and where every rank is)."""


class Aborted(RuntimeError):
    """`Comm.Abort(errorcode)` was called (the message gives the code, `errorcode` too)."""

    def __init__(self, message: str, errorcode: int = 1):
        super().__init__(message)
        self.errorcode = errorcode


@dataclass(frozen=True)
class _Op:
    name: str
    array: Callable  # a NumPy ufunc
    scalar: Callable  # for the lower-case object collectives

    def __repr__(self):
        return self.name

    def reduce_into(self, out: np.ndarray, arrays: list) -> None:
        """out = ((a_0 ⊕ a_1) ⊕ a_2) ⊕ … ⊕ a_{n-1} in out's dtype: rank order, so the same bits every run."""
        out[...] = arrays[0]
        for a in arrays[1:]:
            self.array(out, a, out=out)


SUM = _Op("SUM", np.add, operator.add)
MAX = _Op("MAX", np.maximum, max)
MIN = _Op("MIN", np.minimum, min)
IN_PLACE = type("InPlace", (), {"__repr__": lambda self: "IN_PLACE"})()
UNDEFINED = -32766  # mpi4py's MPI.UNDEFINED: Split(UNDEFINED) returns None (MPI.COMM_NULL)


def _mpi():
    """mpi4py.MPI if the caller already imported it (never imported here: importing it initialises MPI)."""
    return sys.modules.get("mpi4py.MPI")


def _op(op) -> _Op:
    if isinstance(op, _Op):
        return op
    mpi = _mpi()
    if mpi is not None:
        for name, ours in (("SUM", SUM), ("MAX", MAX), ("MIN", MIN)):
            if op == getattr(mpi, name, None):
                return ours
    raise ValueError(f"unsupported reduction op {op!r} (use SUM, MAX or MIN)")


def _in_place(buf) -> bool:
    mpi = _mpi()
    return buf is IN_PLACE or (mpi is not None and buf is getattr(mpi, "IN_PLACE", object()))


def _flat(buf, what: str, writable: bool = False) -> np.ndarray:
    """The buffer's elements as a 1-D view in memory order (the layout MPI sends)."""
    arr = buf[0] if isinstance(buf, (list, tuple)) else buf
    arr = np.asarray(arr) if isinstance(arr, np.generic) else arr  # a NumPy scalar: a read-only 0-d buffer
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{what} must be a NumPy array, got {type(arr).__name__}")
    if arr.flags.c_contiguous:
        flat = arr.reshape(-1)
    elif arr.flags.f_contiguous:
        flat = arr.reshape(-1, order="F")
    else:
        raise ValueError(f"{what} must be contiguous (shape {arr.shape}, strides {arr.strides})")
    if writable and not flat.flags.writeable:
        raise ValueError(f"{what} is read-only")
    return flat


def _check(name: str, arrays: list, dtype, size: int | None = None) -> None:
    """Every rank sent recvbuf's dtype (and `size` elements each, when given): MPI would misread anything else."""
    dtypes = {str(a.dtype) for a in arrays} | {str(dtype)}
    if len(dtypes) != 1:
        raise TypeError(f"{name}: buffers of different dtypes {sorted(dtypes)}")
    if size is not None and any(a.size != size for a in arrays):
        raise ValueError(f"{name}: the ranks' sendbufs have sizes {[a.size for a in arrays]}, need {size} each")


def _vspec(spec, size: int, what: str):
    """mpi4py's vector buffer spec: [array, counts], [array, (counts, displs)] or [array, counts, displs], with an
    optional trailing datatype. Displacements default to the exclusive prefix sums of the counts."""
    if isinstance(spec, np.ndarray) or len(spec) < 2:
        raise TypeError(f"{what} must be [array, counts] or [array, (counts, displs)]")
    flat = _flat(spec[0], what)
    rest = [x for x in spec[1:] if not type(x).__module__.startswith("mpi4py")]  # drop a datatype
    if len(rest) == 1 and isinstance(rest[0], tuple) and len(rest[0]) == 2 and np.ndim(rest[0][0]) == 1:
        rest = list(rest[0])
    counts = np.asarray(rest[0], dtype=np.int64).reshape(-1)
    displs = None if len(rest) < 2 or rest[1] is None else np.asarray(rest[1], dtype=np.int64).reshape(-1)
    if displs is None:
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if counts.size != size or displs.size != size or (counts < 0).any() or (displs < 0).any():
        raise ValueError(f"{what}: need {size} non-negative counts and displacements, got {counts} and {displs}")
    if (counts + displs > flat.size).any():
        raise ValueError(f"{what}: counts {counts} at displacements {displs} run past its {flat.size} elements")
    return flat, counts, displs


def _ranges(ranks: list) -> str:
    """[0, 1, 2, 3, 6] → "0-3,6"."""
    runs: list = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(eq=False)
class _Slot:
    """One call of a collective: the copies every rank deposited, filled in rank by rank."""
    name: str
    contribs: list
    arrived: list
    finished: int = 0
    shared: Any = None  # computed once by the last rank to arrive (Split's new groups)
    altered: dict = field(default_factory=dict)  # (sender, receiver) -> what receiver gets instead (a fault)

    @property
    def complete(self) -> bool:
        return all(self.arrived)


@dataclass(eq=False)
class _Group:
    """What the ranks of one communicator share: its name, its world ranks, its calls in flight."""
    name: str
    world_ranks: list
    slots: dict = field(default_factory=dict)  # call number -> _Slot


class _State:
    """What the threads of one `run` share: one lock and condition, the first failure, where each rank is."""

    def __init__(self, n: int, timeout: float):
        self.cond = threading.Condition()
        self.timeout = timeout
        self.failure: tuple[int, BaseException] | None = None
        self.where = ["running"] * n
        self.changes = 0  # how many times a rank changed place: progress, for VirtualCluster's give_up

    def place(self, rank: int, where: str) -> None:
        """Record where `rank` is (the caller holds the lock) and wake the waiters: a deadlock report waits until
        no rank is running."""
        self.where[rank] = where
        self.changes += 1
        self.cond.notify_all()

    def report(self) -> str:
        return "; ".join(f"rank {r}: {w}" for r, w in enumerate(self.where))


class _Request:
    """What a non-blocking call (Iallgather, Ialltoall, Ireduce_scatter_block) returns: the data moves when `Wait()`
    (or a successful `Test()`) completes it."""

    def __init__(self, comm: "VirtualComm", slot: _Slot, seq: int, what: str, finish: Callable):
        self._comm, self._slot, self._seq, self._what, self._finish = comm, slot, seq, what, finish
        self._done = False

    def Wait(self, status=None) -> None:
        if not self._done:
            self._comm._complete(self._slot, self._seq, self._what, self._finish)
            self._done = True

    def Test(self, status=None) -> bool:
        if not self._done:
            with self._comm._state.cond:
                self._comm._check_failure(self._what)
                if not self._slot.complete:
                    return False
            self.Wait()
        return True


class VirtualComm:
    """One rank's view of a communicator (see the module docstring). Create them with `VirtualCluster.run`."""

    def __init__(self, state: _State, group: _Group, rank: int):
        self._state, self._group, self._rank = state, group, rank
        self._world_rank = group.world_ranks[rank]
        self._seq = 0  # the number of this rank's next call on this communicator
        self._corrupt = False  # a fault pending: the next data sent on this communicator arrives corrupted
        self._on_corrupted: Callable | None = None  # called when it went out

    # ---- identity -----------------------------------------------------------------------------------------------
    def Get_rank(self) -> int:
        return self._rank

    def Get_size(self) -> int:
        return len(self._group.world_ranks)

    rank = property(Get_rank)
    size = property(Get_size)

    def __repr__(self):
        return f"VirtualComm({self._group.name}, rank {self._rank} of {self.size})"

    def Free(self) -> None:
        pass

    def Set_name(self, name: str) -> None:
        """Name the communicator (as MPI's, for every rank of it): errors then say "on fsdp, ranks 0-3"."""
        with self._state.cond:
            self._group.name = name

    def Get_name(self) -> str:
        return self._group.name

    def Abort(self, errorcode: int = 1):
        raise Aborted(f"Abort(errorcode={errorcode}) called by rank {self._rank} of {self._group.name}", errorcode)

    # ---- the engine: deposit a copy, wait until every rank has, then each rank builds its own output ----------
    def _check_failure(self, what: str) -> None:
        if self._state.failure is not None:
            r, exc = self._state.failure
            raise PeerFailed(f"{what} abandoned: rank {r} failed ({type(exc).__name__})")

    def _post(self, name: str, contribution, combine: Callable | None = None, reads: Callable | None = None):
        """Deposit this rank's contribution to its next call; returns (slot, call number, description).
        `reads(contribution, r)`: the flat part of it that rank r reads (where a pending corruption goes)."""
        with self._state.cond:
            seq, self._seq = self._seq, self._seq + 1
            ranks = self._group.world_ranks
            what = f"{name} (call #{seq} on {self._group.name}" + (
                f", ranks {_ranges(ranks)})" if len(ranks) < len(self._state.where) else ")")
            self._check_failure(what)
            slot = self._group.slots.setdefault(seq, _Slot(name, [None] * self.size, [False] * self.size))
            if slot.name != name:
                others = [self._group.world_ranks[i] for i, a in enumerate(slot.arrived) if a]
                raise CollectiveMismatch(f"rank {self._world_rank} called {name} as call #{seq} on "
                                         f"{self._group.name}, but rank(s) {others} called {slot.name} there")
            slot.contribs[self._rank], slot.arrived[self._rank] = contribution, True
            if self._corrupt and reads is not None:
                self._corrupt_for_one(slot, contribution, reads)
            if slot.complete:
                if combine is not None:
                    slot.shared = combine(slot.contribs)
                self._state.cond.notify_all()
        return slot, seq, what

    def _complete(self, slot: _Slot, seq: int, what: str, finish: Callable):
        """Wait until every rank deposited, then return finish(contribs, shared). Past `timeout` seconds this is a
        deadlock, reported once no other rank is still running (each is blocked, hung, returned or failed, so the
        report shows where each is stuck rather than a rank that was about to block) or a second timeout passed."""
        state = self._state
        with state.cond:
            deadline = time.monotonic() + state.timeout
            state.place(self._world_rank, f"in {what}")
            try:
                while not slot.complete:
                    self._check_failure(what)
                    now = time.monotonic()
                    if now >= deadline:
                        settled = all(w != "running" for w in state.where)
                        if settled or now >= deadline + state.timeout:
                            missing = [self._group.world_ranks[i] for i, a in enumerate(slot.arrived) if not a]
                            raise DeadlockError(f"deadlock: rank {self._world_rank} waited {state.timeout:g} s in "
                                                f"{what} for rank(s) {missing}. Where every rank is: "
                                                f"{state.report()}")
                    state.cond.wait((deadline if now < deadline else deadline + state.timeout) - now)
            finally:
                state.place(self._world_rank, "running")
        contribs = slot.contribs  # complete, and never changing: no lock needed
        if slot.altered:
            contribs = [slot.altered.get((j, self._rank), c) for j, c in enumerate(contribs)]
        try:
            return finish(contribs, slot.shared)
        finally:
            with state.cond:
                slot.finished += 1
                if slot.finished == self.size:
                    del self._group.slots[seq]

    def _collective(self, name: str, contribution, finish: Callable, combine: Callable | None = None,
                    reads: Callable | None = None):
        slot, seq, what = self._post(name, contribution, combine, reads)
        return self._complete(slot, seq, what, finish)

    # ---- faults (trinity.simulate.virtual.faults) -------------------------------------------------------------------------
    def corrupt_next_send(self, on_sent: Callable | None = None) -> None:
        """The next data of floats (or bytes) this rank sends on this communicator reaches one other rank with a bit
        flipped in every element (a faulty link): the first rank after this one, in rank order, that reads any of
        it. Calls that carry none to another rank (Barrier, Split, integers, empty blocks) leave the fault pending;
        `on_sent()` is called once it went out (a fault still pending at the end never acted)."""
        self._corrupt, self._on_corrupted = True, on_sent

    def _corrupt_for_one(self, slot: _Slot, contribution, reads: Callable) -> None:
        for step in range(1, self.size):
            receiver = (self._rank + step) % self.size
            if _corruptible(reads(contribution, receiver)):
                bad = copy.deepcopy(contribution)
                _flip_bits(reads(bad, receiver))
                slot.altered[(self._rank, receiver)] = bad
                self._corrupt = False
                if self._on_corrupted is not None:
                    self._on_corrupted()
                return

    def hang(self, reason: str) -> None:
        """Stop calling collectives, as a hung process does, until another rank fails (then raise PeerFailed): the
        ranks waiting for this one time out with DeadlockError, which shows `reason` as where this rank is. If no
        rank fails within twice the timeout (every rank hung), raise DeadlockError here: the cluster always ends."""
        state = self._state
        with state.cond:
            state.place(self._world_rank, reason)
            deadline = time.monotonic() + 2 * state.timeout
            while state.failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlockError(f"deadlock: rank {self._world_rank} {reason}, and no rank failed in "
                                        f"{2 * state.timeout:g} s. Where every rank is: {state.report()}")
                state.cond.wait(left)
            self._check_failure(reason)

    # ---- buffer collectives (upper case) ------------------------------------------------------------------------
    def Barrier(self) -> None:
        self._collective("Barrier", None, lambda contribs, shared: None)

    barrier = Barrier

    def Allreduce(self, sendbuf, recvbuf, op=SUM) -> None:
        """recvbuf = x_0 ⊕ x_1 ⊕ … ⊕ x_{n-1}, elementwise, accumulated in rank order. sendbuf may be IN_PLACE."""
        op, out = _op(op), _flat(recvbuf, "Allreduce recvbuf", writable=True)
        send = out if _in_place(sendbuf) else _flat(sendbuf, "Allreduce sendbuf")

        def finish(contribs, shared):
            _check("Allreduce", contribs, out.dtype, out.size)
            op.reduce_into(out, contribs)

        self._collective(f"Allreduce({op})", send.copy(), finish, reads=_whole)

    def Reduce_scatter_block(self, sendbuf, recvbuf, op=SUM) -> None:
        """Rank r gets block r (recvbuf.size elements) of x_0 ⊕ … ⊕ x_{n-1}, summed in rank order."""
        op, send, finish = self._reduce_scatter("Reduce_scatter_block", sendbuf, recvbuf, op)
        self._collective(f"Reduce_scatter_block({op})", send.copy(), finish, reads=_block(self.size))

    def Ireduce_scatter_block(self, sendbuf, recvbuf, op=SUM) -> _Request:
        """Non-blocking Reduce_scatter_block: sendbuf is copied now, recvbuf is filled at `Wait()`."""
        op, send, finish = self._reduce_scatter("Ireduce_scatter_block", sendbuf, recvbuf, op)
        slot, seq, what = self._post(f"Ireduce_scatter_block({op})", send.copy(), reads=_block(self.size))
        return _Request(self, slot, seq, what, finish)

    def _reduce_scatter(self, name: str, sendbuf, recvbuf, op):
        op, out = _op(op), _flat(recvbuf, f"{name} recvbuf", writable=True)
        send, m, r = _flat(sendbuf, f"{name} sendbuf"), out.size, self._rank
        if send.size != self.size * m:
            raise ValueError(f"{name}: sendbuf has {send.size} elements, need size·recvbuf.size = {self.size}·{m}")

        def finish(contribs, shared):
            _check(name, contribs, out.dtype, send.size)
            op.reduce_into(out, [c[r * m:(r + 1) * m] for c in contribs])

        return op, send, finish

    def _gather_finish(self, name: str, send: np.ndarray, out: np.ndarray) -> Callable:
        m = send.size
        if out.size != self.size * m:
            raise ValueError(f"{name}: recvbuf has {out.size} elements, need size·sendbuf.size = {self.size}·{m}")

        def finish(contribs, shared):
            _check(name, contribs, out.dtype, m)
            for j, c in enumerate(contribs):
                out[j * m:(j + 1) * m] = c
        return finish

    def Allgather(self, sendbuf, recvbuf) -> None:
        """recvbuf = concat(x_0, …, x_{n-1}). With sendbuf IN_PLACE, block r of recvbuf is this rank's input."""
        out = _flat(recvbuf, "Allgather recvbuf", writable=True)
        if _in_place(sendbuf):
            m = out.size // self.size
            send = out[self._rank * m:(self._rank + 1) * m]
        else:
            send = _flat(sendbuf, "Allgather sendbuf")
        self._collective("Allgather", send.copy(), self._gather_finish("Allgather", send, out), reads=_whole)

    def Iallgather(self, sendbuf, recvbuf) -> _Request:
        """Non-blocking Allgather: sendbuf is copied now, recvbuf is filled at `Wait()`."""
        send, out = _flat(sendbuf, "Iallgather sendbuf"), _flat(recvbuf, "Iallgather recvbuf", writable=True)
        finish = self._gather_finish("Iallgather", send, out)
        slot, seq, what = self._post("Iallgather", send.copy(), reads=_whole)
        return _Request(self, slot, seq, what, finish)

    def Alltoall(self, sendbuf, recvbuf) -> None:
        """Equal blocks of b = sendbuf.size / n elements: block j of rank r's recvbuf is block r of rank j's sendbuf."""
        send, finish = self._alltoall("Alltoall", sendbuf, recvbuf)
        self._collective("Alltoall", send.copy(), finish, reads=_block(self.size))

    def Ialltoall(self, sendbuf, recvbuf) -> _Request:
        """Non-blocking Alltoall: sendbuf is copied now, recvbuf is filled at `Wait()`."""
        send, finish = self._alltoall("Ialltoall", sendbuf, recvbuf)
        slot, seq, what = self._post("Ialltoall", send.copy(), reads=_block(self.size))
        return _Request(self, slot, seq, what, finish)

    def _alltoall(self, name: str, sendbuf, recvbuf):
        send, out, r = _flat(sendbuf, f"{name} sendbuf"), _flat(recvbuf, f"{name} recvbuf", writable=True), self._rank
        if send.size % self.size or send.size != out.size:
            raise ValueError(f"{name}: sendbuf ({send.size}) and recvbuf ({out.size}) need the same size, "
                             f"a multiple of {self.size}")

        def finish(contribs, shared):
            _check(name, contribs, out.dtype, out.size)
            b = out.size // self.size
            for j, c in enumerate(contribs):
                out[j * b:(j + 1) * b] = c[r * b:(r + 1) * b]

        return send, finish

    def Alltoallv(self, sendspec, recvspec) -> None:
        """Rank j's send block r (sendcounts_j[r] elements at senddispls_j[r]) lands in rank r's recvbuf at
        recvdispls_r[j]; it must be recvcounts_r[j] elements long."""
        send, sc, sd = _vspec(sendspec, self.size, "Alltoallv send spec")
        out, rc, rd = _vspec(recvspec, self.size, "Alltoallv recv spec")
        if not out.flags.writeable:
            raise ValueError("Alltoallv recvbuf is read-only")
        r = self._rank

        def finish(contribs, shared):
            _check("Alltoallv", [blocks[r] for blocks in contribs], out.dtype)
            for j, blocks in enumerate(contribs):
                if blocks[r].size != rc[j]:
                    raise ValueError(f"Alltoallv: rank {j} sends {blocks[r].size} elements to rank {r}, which "
                                     f"expects {rc[j]}")
                out[rd[j]:rd[j] + rc[j]] = blocks[r]

        self._collective("Alltoallv", [send[d:d + c].copy() for c, d in zip(sc, sd)], finish,
                         reads=lambda blocks, receiver: blocks[receiver])

    def Split(self, color: int = 0, key: int = 0) -> "VirtualComm | None":
        """A communicator over the ranks with the same color, ranked by (key, old rank). Collective."""
        def combine(contribs):  # run once, by the last rank to arrive: the new groups all their members share
            groups = {}
            for old, (c, k) in enumerate(contribs):
                if c != UNDEFINED:
                    groups.setdefault(c, []).append((k, old))
            return {c: _Group(f"{self._group.name}/split({c})", [self._group.world_ranks[o] for _, o in sorted(m)])
                    for c, m in groups.items()}

        def finish(contribs, shared):
            if color == UNDEFINED:
                return None
            group = shared[color]
            return VirtualComm(self._state, group, group.world_ranks.index(self._world_rank))

        return self._collective("Split", (color, key), finish, combine)

    # ---- object collectives (lower case; each rank gets its own deep copies: mpi4py pickles, we never unpickle) --
    def bcast(self, obj=None, root: int = 0):
        data = copy.deepcopy(obj) if self._rank == root else None
        return self._collective(f"bcast(root={root})", data, lambda contribs, shared: copy.deepcopy(contribs[root]))

    def allgather(self, obj) -> list:
        return self._collective("allgather", copy.deepcopy(obj), lambda contribs, shared: copy.deepcopy(contribs))

    def allreduce(self, obj, op=SUM):
        op = _op(op)  # ((v_0 ⊕ v_1) ⊕ v_2) ⊕ …, in rank order
        return self._collective(f"allreduce({op})", copy.deepcopy(obj), lambda contribs, shared: functools.reduce(
            op.scalar, copy.deepcopy(contribs)))


class VirtualCluster:
    """n virtual ranks in this process. `run(fn, *args)` calls fn(comm, *args) on one thread per rank and returns
    the results in rank order; `timeout` bounds any single wait in a collective (seconds).

    `give_up()`, when given, is asked while the ranks run (a few times a second); once it returns a reason (a
    signal arrived, say) and no rank has moved for `grace` seconds with none of them running (each blocked in a
    collective, hung, returned or failed: they cannot reach the end by themselves), `run` raises Abandoned naming
    the stuck ranks instead of waiting out `timeout`. Ranks still making progress are left to finish."""

    def __init__(self, n: int, timeout: float = 120.0, give_up: Callable | None = None, grace: float = 5.0):
        if n < 1:
            raise ValueError(f"a cluster needs at least one rank, got {n}")
        self.n, self.timeout, self.give_up, self.grace = n, timeout, give_up, grace

    def run(self, fn: Callable, *args, **kwargs) -> list:
        state = _State(self.n, self.timeout)  # fresh per run: nothing shared between runs or clusters
        world = _Group("world", list(range(self.n)))
        results: list = [None] * self.n

        def body(rank: int) -> None:
            try:
                results[rank] = fn(VirtualComm(state, world, rank), *args, **kwargs)
                with state.cond:
                    state.place(rank, "returned")
            except BaseException as exc:  # noqa: BLE001 - reported by run()
                with state.cond:
                    state.place(rank, f"raised {type(exc).__name__}")
                    if state.failure is None and not isinstance(exc, PeerFailed):
                        state.failure = (rank, exc)
                    state.cond.notify_all()

        threads = [threading.Thread(target=body, args=(r,), name=f"vrank-{r}", daemon=True) for r in range(self.n)]
        for t in threads:
            t.start()
        self._join(threads, state)
        if state.failure is not None:
            rank, exc = state.failure
            raise RankFailed(f"rank {rank} failed: {type(exc).__name__}: {exc}") from exc
        return results

    def _join(self, threads: list, state: _State) -> None:
        """Wait for every rank's thread; with `give_up`, raise Abandoned once it gives a reason and the ranks are
        stuck (nothing moved for `grace` seconds, no rank running). The stuck threads are released (PeerFailed
        wherever they wait) and left behind: they are daemons."""
        if self.give_up is None:
            for t in threads:
                t.join()
            return
        last_change, since, asked = -1, time.monotonic(), None
        while any(t.is_alive() for t in threads):
            threads[next(i for i, t in enumerate(threads) if t.is_alive())].join(0.2)
            reason = self.give_up()
            if reason is not None and asked is None:  # the grace counts from the request
                asked = since = time.monotonic()
            with state.cond:
                if state.changes != last_change or any(w == "running" for w in state.where):
                    last_change, since = state.changes, time.monotonic()
                    continue
                if reason is None or time.monotonic() - since < self.grace:
                    continue
                stuck = [r for r, w in enumerate(state.where) if w != "returned" and not w.startswith("raised")]
                error = Abandoned(f"{reason}: rank(s) {_ranges(stuck)} could not reach the end of a step in "
                                  f"{self.grace:g} s. Where every rank is: {state.report()}")
                if state.failure is None:
                    state.failure = (stuck[0], error)
                state.cond.notify_all()
            raise error
