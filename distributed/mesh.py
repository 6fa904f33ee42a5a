"""The device mesh: a Layout's named dimensions as groups of ranks over any communicator (docs/distributed.md).

Every rule of the layout (rank coordinates, the groups and their members, the rows and positions a rank holds, the
flat buckets and their spans, the Muon owners) is the parallel plan's (distributed/plan.py); the mesh makes one
communicator per group of the plan's vocabulary (`Split` by the plan's colors) and executes collectives on them.
The training step names the group of each reduction ("world", "dp", "cp", "fsdp", "dp_replicate"); a group of one
rank costs nothing: no collective is called.

The communicator is any object with mpi4py's buffer-based methods (mpi4py.MPI.COMM_WORLD, taken only by the
launcher, or trinity.simulate's virtual communicator). Every collective goes through `Mesh.collective`, which counts
its bytes per kind and group (`traffic`). With `checksums`, every block a rank receives is checked against its
sender's crc32 (distributed/checksums.py), and sums and maxima take the rank-ordered Alltoall + Allgather path at
every group size (the same bits). Under mpiexec a watchdog (distributed/watchdog.py) puts a deadline on every wait
in a collective, so a hung rank ends the job. Buffers that are a device table's arrays are staged through the host
there (staging.py: copied to the host, moved by MPI, copied back; counted as staged copies).
"""

from __future__ import annotations

import contextlib

import json
from collections import defaultdict

import numpy as np

from trinity.accel.device import is_host_array
from trinity.reference.operators.array_module import array_namespace

from .checksums import Checked, crc_bytes
from .layout import Layout
from .plan import GROUPS, ParallelPlan, check_group
from .schedule import sent_bytes as ring_bytes
from .staging import StagedRequest, device_copy, stage

__all__ = ["Mesh", "GROUPS", "allgather_json", "group_members", "movable"]


class Mesh:
    """The named groups of `layout` over `comm` (whose size must be layout.world_size); `config` (the model) makes
    the mesh's plan complete (its buckets and spans). Collective calls: every rank creates its Mesh at the same point
    (Split is collective)."""

    def __init__(self, comm, layout: Layout, checksums: bool = False, config=None):
        if comm.Get_size() != layout.world_size:
            raise ValueError(f"layout {layout} needs {layout.world_size} ranks, the communicator has "
                             f"{comm.Get_size()}")
        self.layout, self.comm, self.checksums = layout, comm, checksums
        self.plan = plan = ParallelPlan(config, layout)
        self.rank = comm.Get_rank()
        coords = plan.coords(self.rank)
        self.chunk, self.shard, self.replica = coords.chunk, coords.shard, coords.replica
        self.fsdp_index, self.ep_rank = coords.fsdp, coords.ep_rank
        self.sizes = plan.sizes
        colors = plan.colors(self.rank)
        self.groups = {"world": comm}
        for name in GROUPS[1:]:
            self.groups[name] = comm.Split(int(colors[name]), self.rank)
            self.groups[name].Set_name(name)  # MPI's name of a communicator: in error messages (trinity.simulate)
        # the world ranks of each group, in group-rank order (Split keeps world order): for traces
        self.members = {name: plan.members(name, self.rank) for name in GROUPS}
        self.group_size = {name: g.Get_size() for name, g in self.groups.items()}
        self.group_rank = {name: g.Get_rank() for name, g in self.groups.items()}
        if self.group_size != plan.group_size or self.group_rank != {g: plan.group_rank(g, self.rank)
                                                                     for g in GROUPS}:
            raise RuntimeError(f"rank {self.rank}: the communicator's groups differ from layout {layout}'s plan")
        self.dp_rank = self.group_rank["dp"]
        self.traffic: dict = defaultdict(int)  # (kind, group) → bytes this rank sent this step
        # Trace (trinity.simulate): with `record`, every collective is appended to `events` with the step, phase
        # and layer it belongs to (set by the trainer, the step and the seams through begin_step / set_phase).
        self.record, self.events = False, []
        self.faults = None  # trinity.simulate.virtual.faults.FaultPlan: injected failures (before each collective)
        self.watchdog = None  # distributed.watchdog.Watchdog: a deadline on every wait in a collective (mpiexec)
        self.step, self.phase, self.layer = 0, "start", None
        self._positions: dict = {}  # (seq_len, module) → this rank's positions in a device table's module

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def whole_state(self, config, params, optimizer_state) -> tuple[dict, dict]:
        """(params, optimizer state) as whole arrays keyed as in one process, on every rank (collective: all-gathered
        key by key; every rank then holds the whole model, for tests and small models only)."""
        from .sharded_optim import gather_optimizer_state
        return params.full(), gather_optimizer_state(config, params, optimizer_state)

    # ---- what a rank holds of the global batch ------------------------------------------------------------------
    def local_sequences(self, num_sequences: int) -> slice:
        """This data-parallel rank's contiguous slice of the global batch's sequences (the plan's rows)."""
        return self.plan.rows(self.rank, num_sequences)

    def local_positions(self, seq_len: int, xp=np):
        """The positions of each sequence this cp rank holds (the plan's chunks); for a device table's module `xp`
        a copy there, made once per sequence length (staged) and kept."""
        positions = self.plan.positions(self.rank, seq_len)
        if xp is np:
            return positions
        if (seq_len, xp) not in self._positions:
            self._positions[(seq_len, xp)] = device_copy(positions, xp)
        return self._positions[(seq_len, xp)]

    # ---- reductions the step names by group ---------------------------------------------------------------------
    def sum(self, value, group: str):
        """Σ of a number or array over the ranks of `group` (one of GROUPS)."""
        return self._reduce(value, check_group(group), None)

    def max(self, value, group: str):
        return self._reduce(value, check_group(group), "max")

    def _reduce(self, value, group: str, op):
        if self.group_size[group] == 1:
            return value
        if hasattr(value, "shape") and not is_host_array(value):  # a device array: staged by `collective`
            xp = array_namespace(value)
            send = xp.reshape(value, (-1,))
            recv = xp.empty_like(send)
            self.collective("Allreduce", group, send, recv, op=op)
            return xp.reshape(recv, value.shape)
        scalar = np.ndim(value) == 0
        send = np.ascontiguousarray(np.asarray(value, dtype=np.float64 if scalar else None)).reshape(-1)
        recv = np.empty_like(send)
        self.collective("Allreduce", group, send, recv, op=op)
        return recv.reshape(np.shape(value)).item() if scalar else recv.reshape(np.shape(value))

    def optimizer_step(self, config, params, grads, state, muon_lr, adamw_lr, kernels=None, observe=None):
        """The optimizer on this rank's shards (sharded_optim.py: AdamW per shard, distributed Muon)."""
        from .sharded_optim import sharded_optimizer_step
        return sharded_optimizer_step(self, config, params, grads, state, muon_lr, adamw_lr, kernels, observe)

    # ---- where in the step the collectives happen (traces) ----------------------------------------------------
    def begin_step(self, step: int) -> None:
        """A training step begins: traces are tagged with it, and the counted traffic starts afresh (what the
        trainer reports for a step is what its forward, backward, reductions and optimizer sent; checkpoints and the
        stop agreement after its metrics line are traced, not counted)."""
        self.step, self.phase, self.layer = step, "forward", None
        self.traffic = defaultdict(int)

    def set_phase(self, phase: str, layer=None) -> None:
        """phase: forward, backward, reductions, optimizer, checkpoint; layer: the model bucket (embed, a layer
        number, head) whose parameters or activations a collective moves, or None. Inside `evaluation()` the
        phase is recorded as "eval/<phase>"."""
        self.phase, self.layer = self._phase_prefix + phase, layer

    _phase_prefix = ""

    @contextlib.contextmanager
    def evaluation(self):
        """An evaluation runs inside (training/evaluation.py): its collectives are traced as "eval/<phase>", counted
        like a step's (the trainer takes them for the eval line), and the step's tag is restored after."""
        saved = self.phase, self.layer
        self._phase_prefix = "eval/"
        try:
            yield self
        finally:
            self._phase_prefix = ""
            self.phase, self.layer = saved

    # ---- every collective, counted ------------------------------------------------------------------------------
    def collective(self, kind: str, group: str, *args, op=None, sent_bytes: int | None = None):
        """Call `kind` (an mpi4py Comm method name) on `group`'s communicator and count the bytes that leave this
        rank, as the ring algorithms move them for a send buffer of s bytes over n ranks: Allreduce 2(n−1)/n·s,
        Reduce_scatter_block, Ireduce_scatter_block and Alltoall (n−1)/n·s, Allgather and Iallgather (n−1)·s;
        Alltoallv passes `sent_bytes` (the rows it sends to other ranks). op "max" maps to the communicator's MAX
        (sum is the default). With checksums, the crc32s sent are counted too. Returns what the method returns (a request for
        the non-blocking ones). Device buffers are staged through the host (staging.py)."""
        args, landing = stage(args)
        result = self._counted(kind, group, args, op, sent_bytes)
        if landing is None:
            return result
        if result is None:
            landing()
            return None
        return StagedRequest(result, landing)

    def _counted(self, kind: str, group: str, args, op, sent_bytes):
        """`collective` on host buffers: faults, byte counts, traces, the watchdog, then the call."""
        n = self.group_size[group]
        if self.faults is not None:
            self.faults.before(self, kind, group)
        if sent_bytes is None:
            sent_bytes = ring_bytes(kind, n, int(args[0].nbytes))
        if self.checksums:
            sent_bytes += crc_bytes(kind, n, self.group_rank[group], args)
        self.traffic[(kind, group)] += sent_bytes
        if self.record:
            self.events.append({"step": self.step, "phase": self.phase, "layer": self.layer, "kind": kind,
                                "group": group, "ranks": self.members[group], "bytes": sent_bytes})
        if self.watchdog is None:
            return self._call(kind, group, args, op)
        where = self._describe_wait(kind, group)
        with self.watchdog.watch(where):
            result = self._call(kind, group, args, op)
        return result if result is None else _WatchedRequest(result, self.watchdog, where)

    def _call(self, kind: str, group: str, args, op):
        """The collective itself: checked (checksums), a maximum, a rank-ordered sum, or the library's call."""
        comm, n = self.groups[group], self.group_size[group]
        if self.checksums:
            return self._checked(kind, group, args, op)
        if op == "max":
            return getattr(comm, kind)(*args, op=_max_op(comm))
        # sums over more than two ranks in rank order; a bfloat16 sum moved as bits and added here (MPI cannot)
        ordered = kind in ("Reduce_scatter_block", "Ireduce_scatter_block", "Allreduce") and (
            n > 2 or _foreign(args[0]))
        if kind == "Reduce_scatter_block" and ordered:
            return _ordered_reduce_scatter_chunked(comm, *args)
        if kind == "Ireduce_scatter_block" and ordered:
            return _OrderedReduceScatter(comm, *args)
        if kind == "Allreduce" and ordered:
            return _ordered_reduce(comm, kind, *args)
        return getattr(comm, kind)(*args)

    def _describe_wait(self, kind: str, group: str) -> str:
        """Where this rank waits, for the watchdog's line: the collective, the group and its world ranks, the step."""
        members = self.members[group]
        ranks = ",".join(map(str, members)) if len(members) <= 8 else f"{members[0]}…{members[-1]}"
        return f"{kind} on group {group} (ranks {ranks}) at step {self.step} ({self.phase})"

    def _checked(self, kind: str, group: str, args, op):
        """`kind` with a crc32 per block, checked on receipt (distributed/checksums.py); sums and maxima, at every
        group size, from the checked Alltoall and Allgather in rank order. A bad block raises ChecksumError naming
        the two ranks, the collective, the group and the step and phase of the call (an Iallgather is checked at
        its Wait, perhaps in a later phase)."""
        step, phase, members = self.step, self.phase, self.members[group]

        def describe(sender: int, inner: str) -> str:
            via = "" if inner == kind else f" (its {inner})"
            return (f"corrupted message from rank {members[sender]} to rank {self.rank} in {kind}{via} on the "
                    f"{group} group at step {step} ({phase}): its crc32 does not match")

        moves = Checked(self.groups[group], describe)
        if kind == "Ireduce_scatter_block":  # checked at once: the request returned is complete
            _ordered_reduce(moves, "Reduce_scatter_block", *args)
            return _Done()
        if kind in ("Allreduce", "Reduce_scatter_block"):
            return _ordered_reduce(moves, kind, *args, combine=np.maximum if op == "max" else np.add)
        return getattr(moves, kind)(*args)

    def take_traffic(self) -> dict:
        """The bytes counted since the last call, {(kind, group): bytes}, and start counting afresh."""
        out, self.traffic = dict(self.traffic), defaultdict(int)
        return out


class _WatchedRequest:
    """A non-blocking collective's request whose Wait runs under the watchdog (the wait is where a rank hangs)."""

    def __init__(self, request, watchdog, what: str):
        self._request, self._watchdog, self._what = request, watchdog, what

    def Wait(self, *args, **kwargs):
        with self._watchdog.watch(self._what + ", waiting for its completion"):
            return self._request.Wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._request, name)


def movable(a: np.ndarray) -> np.ndarray:
    """A buffer MPI can move: a bfloat16 array (ml_dtypes, for which MPI has no datatype) as its uint16 bits."""
    return a.view(np.uint16) if _foreign(a) else a


def _foreign(a) -> bool:
    """Whether an array's dtype is one MPI has no datatype for (ml_dtypes' bfloat16)."""
    dtype = getattr(a, "dtype", None)
    return dtype is not None and (getattr(dtype, "name", None) == "bfloat16" or getattr(dtype, "kind", None) == "V")


class _Done:
    """The request of a non-blocking call that completed at once."""

    def Wait(self, status=None) -> None:
        return None

    def Test(self, status=None) -> bool:
        return True


class _OrderedReduceScatter:
    """A non-blocking reduce-scatter (Ireduce_scatter_block) with the terms added in rank order, as _ordered_reduce:
    an Ialltoall of the n blocks posted now, and at Wait() each rank adds the n blocks it received in order. The
    received blocks are a buffer of the send buffer's size until then."""

    def __init__(self, comm, send, recv):
        self._n = comm.Get_size()
        self._send = np.ascontiguousarray(send).reshape(-1)  # alive until Wait, as MPI requires
        self._blocks = np.empty_like(self._send)
        self._recv = np.asarray(recv).reshape(-1)
        self._request = comm.Ialltoall(movable(self._send), movable(self._blocks))

    def Wait(self, status=None) -> None:
        if self._request is None:
            return
        self._request.Wait()
        _combine_rows(self._blocks.reshape(self._n, -1), self._recv, np.add)
        self._request = self._send = self._blocks = None


def _ordered_reduce(comm, kind: str, send, recv, combine=np.add) -> None:
    """Allreduce / Reduce_scatter_block (sum, or `combine` np.maximum) over more than two ranks with the terms added
    in rank order, x₀ + x₁ + x₂ + …, whatever the MPI library: the same bits under mpiexec as on virtual ranks, and
    on every run. `comm` needs only Get_size, Alltoall and Allgather (a communicator, or checksums.Checked).

        reduce-scatter   Alltoall of the n blocks of `send`, then each rank adds the n blocks it received, in order
        all-reduce       that reduce-scatter (on `send` padded to n equal blocks), then an Allgather of the sums

    The bytes are those of the ring algorithms the accounting assumes ((n−1)/n·s for the reduce-scatter, twice that
    for the all-reduce). Without checksums, two ranks use the library's own call: a + b = b + a, so it is exact
    already, and a maximum is exact at any size."""
    n = comm.Get_size()
    flat = np.ascontiguousarray(send).reshape(-1)
    if kind == "Reduce_scatter_block":
        blocks = np.empty_like(flat)
        comm.Alltoall(movable(flat), movable(blocks))
        _combine_rows(blocks.reshape(n, -1), np.asarray(recv).reshape(-1), combine)
        return None
    m = -(-flat.size // n)
    padded = np.zeros(n * m, dtype=flat.dtype)
    padded[:flat.size] = flat
    blocks = np.empty_like(padded)
    comm.Alltoall(movable(padded), movable(blocks))
    mine = np.empty(m, dtype=flat.dtype)
    _combine_rows(blocks.reshape(n, m), mine, combine)
    whole = np.empty(n * m, dtype=flat.dtype)
    comm.Allgather(movable(mine), movable(whole))
    np.asarray(recv).reshape(-1)[:] = whole[:flat.size]
    return None


REDUCE_CHUNK_BYTES = 16 << 20  # what a chunked reduce-scatter moves per Alltoall, at most (plus one row)


def _ordered_reduce_scatter_chunked(comm, send, recv) -> None:
    """_ordered_reduce's reduce-scatter, the same sums in the same order, in column chunks: with the send buffer as
    [n, m] (rank r's block is row r), each chunk of columns [a, b) is one Alltoall of n·(b−a) elements and its
    received rows are added in rank order into recv[a:b]. Only a chunk's buffers exist beside the send buffer
    (REDUCE_CHUNK_BYTES), not a second buffer of its size: a bucket's flat gradient can be most of a rank's memory."""
    n = comm.Get_size()
    rows = np.ascontiguousarray(send).reshape(n, -1)
    out = np.asarray(recv).reshape(-1)
    m = rows.shape[1]
    width = max(1, REDUCE_CHUNK_BYTES // max(n * rows.itemsize, 1))
    for a in range(0, m, width):
        b = min(m, a + width)
        piece = np.ascontiguousarray(rows[:, a:b])
        got = np.empty_like(piece)
        comm.Alltoall(movable(piece.reshape(-1)), movable(got.reshape(-1)))
        _combine_rows(got, out[a:b], np.add)


def _combine_rows(rows: np.ndarray, out: np.ndarray, combine) -> None:
    """out = rows[0] ⊕ rows[1] ⊕ … in that order (not np.sum, which adds pairwise)."""
    acc = rows[0].copy()
    for row in rows[1:]:
        combine(acc, row, out=acc)
    out[:] = acc


def allgather_json(comm, value, call=None) -> list:
    """Every rank's `value` (anything JSON can write), in rank order: two buffer Allgathers of the encoded bytes
    (their lengths, then the bytes padded to the longest), never pickle. `call(kind, send, recv)` runs a collective
    (default: the communicator's own method; a Mesh passes its counted `collective`)."""
    call = call or (lambda kind, send, recv: getattr(comm, kind)(send, recv))
    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), dtype=np.uint8)
    n = comm.Get_size()
    sizes = np.empty(n, dtype=np.int64)
    call("Allgather", np.array([data.size], dtype=np.int64), sizes)
    out = np.zeros((n, max(int(sizes.max()), 1)), dtype=np.uint8)
    padded = np.zeros(out.shape[1], dtype=np.uint8)
    padded[:data.size] = data
    call("Allgather", padded, out)
    return [json.loads(out[r, :sizes[r]].tobytes()) for r in range(n)]


def _max_op(comm):
    """The MAX reduction constant of the communicator's library (mpi4py's MPI.MAX, or the virtual one's)."""
    module = type(comm).__module__
    if module.startswith("mpi4py"):
        from mpi4py import MPI
        return MPI.MAX
    import importlib
    return getattr(importlib.import_module(module), "MAX")


def group_members(layout: Layout, name: str, rank: int = 0) -> list[int]:
    """The world ranks of `rank`'s group `name`, in rank order (the plan's; the cost model reads link tiers
    from it)."""
    return ParallelPlan(None, layout).members(name, rank)
