"""The parallel plan: everything a layout decides, computed once from (model config, layout), with no communicator.

The mesh executes collectives, the seams move activations and parameters, the sharded optimizer and the checkpoint
code lay out state, the cost model prices a step: all of them read their rules here, so each rule is written once.

Ranks are numbered row-major over (dp_replicate, dp_shard, cp), cp fastest:

    rank = (replica · dp_shard + shard) · cp + chunk,        fsdp index f = shard · cp + chunk  ∈ [0, dp_shard·cp)

Parameters are sharded over the fsdp group (the dp_shard·cp ranks of one replica, as torchtitan shards over
dp_shard·cp). Expert parallel borrows its ranks from that group: ep rank = f mod ep, the ep group being the ep
consecutive fsdp indices f // ep; the experts of ep rank e are [e·E/ep, (e+1)·E/ep), sharded further over the ranks
with the same f mod ep (the efsdp group, dp_shard·cp/ep ranks). The groups, one vocabulary for the step, the mesh,
traces and the cost model:

    world         every rank (each holds different tokens)  dp_replicate   same (shard, chunk): the same shards
    dp_shard      same (replica, chunk)                     cp             same (replica, shard): the same sequences
    fsdp          same replica (dp_shard·cp ranks)          dp             same chunk: different sequences
    ep            same replica, same f // ep                efsdp          same replica, same f mod ep

Data: the global batch of S sequences is the loader's, the same for every layout; data-parallel rank q (its rank in
dp) trains rows [q·S/dp, (q+1)·S/dp), and cp rank r of each sequence of T tokens the positions of chunks r and
2·cp−1−r of 2·cp equal chunks (an early chunk pairs with a late one, so causal work balances). A global layer gives
cp rank r the keys and values of chunks_read(r, cp, cp_exchange): every chunk, or ("read") only chunks 0 … 2·cp−1−r,
those its causal queries read.

Parameters: every key but expert_bias lives in a flat bucket (fsdp.py): the keys of one model bucket ("embed", each
layer, "head") that share an optimizer group, routed experts apart (cut to the ep rank's experts), laid end to end
and padded to a multiple of the group's size n; group rank i holds [i·P/n, (i+1)·P/n). A rank's **span** of a key is
where its shard meets the key, as a flat range [lo, hi) of the key's whole (single-process) array in C order:
fresh init, Hugging Face reads, checkpoint reads and exports all work span by span. expert_bias is replicated.

Muon: every matrix of a Muon bucket (each routed expert's too) has one owner in the bucket's group, which
orthogonalises it; the pieces other ranks hold travel to it and back (`owners_of`, by the layout's option
muon_owners): "balanced" evens the Newton–Schulz work over the group, moving most of each bucket; "local" gives each
matrix to the rank holding the largest part of it, so only the parts outside that rank's shard move, and the work
follows the shards. `ParallelPlan.muon_balance` states the result: max / mean of the owned elements and of the work
over a replica's ranks, and the fraction of the Muon elements that travel (docs/distributed.md gives bench-medium's).
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from trinity.reference.model.params import EXPERT_KEYS, is_expert_bias, param_buckets, param_shapes
from trinity.reference.operators.array_module import array_namespace
from trinity.reference.training.groups import GROUPS, check_group
from trinity.reference.training.optim import param_group

from .layout import Layout

__all__ = ["GROUPS", "Coords", "FlatBucket", "Span", "ParallelPlan", "bucket_parts", "part_group", "chunk_positions",
           "chunks_read", "chunks_sent", "chunk_exchange", "owners_of", "OWNER_RULES", "ns_work", "shapes_key",
           "is_routed_expert", "SHARD_PREFIX", "expert_range"]

SHARD_PREFIX = "shard:"


def is_routed_expert(key: str) -> bool:
    """The stacked routed-expert tensors `model.layers.{l}.mlp.experts.{gate_proj,up_proj,down_proj}` [E, …]."""
    return ".mlp.experts." in key and key.rsplit(".", 1)[-1] in EXPERT_KEYS


class Coords(NamedTuple):
    """Where a rank sits in the layout (module docstring)."""
    rank: int
    replica: int
    shard: int
    chunk: int
    fsdp: int  # shard·cp + chunk
    ep_rank: int  # fsdp mod ep


class Span(NamedTuple):
    """Part of a key a rank holds: flat [lo, hi) of the key's whole array, at [shard_lo, shard_hi) of the flat
    bucket shard `bucket` (its shard name)."""
    key: str
    bucket: str
    shard_lo: int
    shard_hi: int
    lo: int
    hi: int


@dataclass
class FlatBucket:
    """One flat bucket: `keys` of local `shapes` (routed experts cut to E/ep) at `offsets` in a vector of `padded`
    elements, sharded over the mesh group `group` of n ranks, of which this rank is `index`; `experts` is the ep
    rank's expert range (routed-expert buckets) or None."""
    name: str
    model_bucket: object
    optimizer: str  # "muon" | "adamw": the optimizer group of every key
    group: str  # "fsdp" | "efsdp"
    keys: list
    shapes: list
    offsets: list
    size: int
    n: int
    index: int
    experts: slice | None = None

    @property
    def padded(self) -> int:
        return -(-self.size // self.n) * self.n

    @property
    def shard_size(self) -> int:
        return self.padded // self.n

    @property
    def shard_name(self) -> str:
        return SHARD_PREFIX + self.name

    def span(self, rank: int | None = None) -> tuple[int, int]:
        """The flat range [lo, hi) held by group rank `rank` (default this rank)."""
        r = self.index if rank is None else rank
        return r * self.shard_size, (r + 1) * self.shard_size

    def segments(self, rank: int | None = None):
        """(key, slice of the shard, slice of the key's local flat array) for every key overlapping `rank`'s shard."""
        lo, hi = self.span(rank)
        for key, shape, start in zip(self.keys, self.shapes, self.offsets):
            end = start + math.prod(shape)
            a, b = max(lo, start), min(hi, end)
            if a < b:
                yield key, slice(a - lo, b - lo), slice(a - start, b - start)

    def whole_offset(self, key: str) -> int:
        """Where the key's local array starts in its whole array's flat order (routed experts: the first expert
        this ep rank holds; every other key is whole)."""
        if self.experts is None or not is_routed_expert(key):
            return 0
        shape = self.shapes[self.keys.index(key)]
        return self.experts.start * math.prod(shape[1:])

    def spans(self) -> list[Span]:
        """This rank's spans of the bucket's keys (whole-array coordinates)."""
        out = []
        for key, shard, local in self.segments():
            at = self.whole_offset(key)
            out.append(Span(key, self.shard_name, shard.start, shard.stop, at + local.start, at + local.stop))
        return out

    def views(self, flat) -> dict:
        """{key: view of `flat` (the whole padded vector, of any array module) in its local shape}."""
        xp = array_namespace(flat)
        return {key: xp.reshape(flat[start:start + math.prod(shape)], tuple(shape))
                for key, shape, start in zip(self.keys, self.shapes, self.offsets)}

    def flatten(self, arrays: dict, dtype):
        """The whole padded vector of `arrays` (keyed like `keys`, local shapes; in their array module)."""
        xp = array_namespace(arrays[self.keys[0]])
        flat = xp.zeros((self.padded,), dtype=dtype)
        for key, shape, start in zip(self.keys, self.shapes, self.offsets):
            flat[start:start + math.prod(shape)] = xp.reshape(xp.asarray(arrays[key]), (-1,))
        return flat


@functools.lru_cache(maxsize=64)
def bucket_parts(config, ep: int) -> dict:
    """{model bucket: {(part, optimizer): [(key, local shape)]}} in the model's order (embed, layers, head): the keys
    of each flat bucket, routed experts ("experts" part, cut to E/ep) apart from each optimizer group's ("muon" |
    "adamw" part); expert_bias in none. Shapes only (cached: do not modify)."""
    shapes = param_shapes(config)
    out = {}
    for model_bucket, keys in param_buckets(config).items():
        parts: dict = {}
        for key in keys:
            if is_expert_bias(key):
                continue
            shape = tuple(shapes[key])
            routed = is_routed_expert(key)
            if routed:
                shape = (shape[0] // ep,) + shape[1:]
            optimizer = param_group(config, key, shape)
            parts.setdefault(("experts" if routed else optimizer, optimizer), []).append((key, shape))
        out[model_bucket] = parts
    return out


def part_group(part: str) -> str:
    """The group a bucket part is sharded over: routed experts over efsdp, the rest over fsdp."""
    return "efsdp" if part == "experts" else "fsdp"


def expert_range(ep_rank: int, ep: int, num_experts: int) -> slice:
    """The routed experts of ep rank e: [e·E/ep, (e+1)·E/ep)."""
    per = num_experts // ep
    return slice(ep_rank * per, (ep_rank + 1) * per)


def chunk_positions(chunk: int, cp: int, seq_len: int) -> np.ndarray:
    """The positions of each sequence cp rank `chunk` holds: chunks `chunk` and 2·cp−1−chunk of 2·cp equal chunks."""
    if cp == 1:
        return np.arange(seq_len)
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len {seq_len} does not split into 2·cp = {2 * cp} chunks")
    c, r = seq_len // (2 * cp), chunk
    return np.concatenate([np.arange(r * c, (r + 1) * c), np.arange((2 * cp - 1 - r) * c, (2 * cp - r) * c)])


def chunks_read(chunk: int, cp: int, exchange: str = "all") -> range:
    """The chunks of each sequence (of 2·cp) whose keys and values cp rank `chunk` gets for a global layer, increasing:
    every chunk under cp_exchange "all"; under "read" chunks 0 … 2·cp−1−chunk, those its causal queries read (its
    last chunk is 2·cp−1−chunk and no query reads a later key; rank 0 reads them all, rank cp−1 only cp + 1)."""
    if exchange not in ("all", "read"):
        raise ValueError(f"cp_exchange {exchange!r}: must be all or read")
    return range(2 * cp) if exchange == "all" else range(2 * cp - chunk)


def chunks_sent(sender: int, receiver: int, cp: int, exchange: str = "all") -> tuple[int, ...]:
    """Which of cp rank `sender`'s two chunks (0: chunk `sender`, 1: chunk 2·cp−1−sender) cp rank `receiver` gets for
    a global layer (chunks_read): both under "all"; under "read" the first always, the second when receiver ≤
    sender."""
    read = chunks_read(receiver, cp, exchange)
    return tuple(i for i, j in enumerate((sender, 2 * cp - 1 - sender)) if j in read)


@functools.lru_cache(maxsize=256)
def chunk_exchange(cp: int, exchange: str = "all") -> np.ndarray:
    """sent[s, j]: how many of cp rank s's chunks rank j ≠ s gets for a global layer (chunks_sent); the diagonal is
    0. Row s sums to what s sends in the forward, column s to what it sends back in the backward (the gradients of
    the chunks it got). Cached: do not modify."""
    return np.array([[0 if s == j else len(chunks_sent(s, j, cp, exchange)) for j in range(cp)] for s in range(cp)],
                    dtype=np.int64)


OWNER_RULES = ("balanced", "local")  # options.py's muon_owners


def _matrices(shapes: tuple) -> list:
    """(flat start, flat end, 2-D shape) of every matrix of tensors of `shapes` laid end to end from 0, in flat order;
    a stacked tensor [E, out, in] is E matrices."""
    matrices, at = [], 0
    for shape in shapes:
        rows, cols = shape[-2], shape[-1]
        for _ in range(math.prod(shape[:-2])):
            matrices.append((at, at + rows * cols, (rows, cols)))
            at += rows * cols
    return matrices


def ns_work(shape) -> int:
    """A matrix's Newton–Schulz work in the owner rules' units: out·in·min(out, in)."""
    rows, cols = shape
    return rows * cols * min(rows, cols)


@functools.lru_cache(maxsize=4096)
def owners_of(shapes: tuple, group_size: int, rule: str = "balanced") -> tuple:
    """((flat start, flat end, owner rank, 2-D shape), …) of every matrix of a Muon bucket whose tensors of `shapes`
    (a tuple of tuples) lie end to end from 0, in flat order, sharded over `group_size` ranks as a flat bucket is
    (group rank i holds [i·s, (i+1)·s), s = ⌈size/n⌉); a stacked tensor [E, out, in] is E matrices. Deterministic on
    every rank. Owners (`rule`, options.py's muon_owners):

      balanced  the largest matrices first (ns_work, ties by position), each to the rank with the least Newton–Schulz
                work so far (ties: the lowest rank)
      local     each matrix to the rank whose shard holds the largest part of it; a matrix that several ranks hold
                equal largest parts of goes, after every matrix with one such rank is placed, the largest first (ties
                by position), to the one of them with the least work so far (ties: the lowest rank)
    """
    if rule not in OWNER_RULES:
        raise ValueError(f"muon_owners = {rule!r}: must be one of {', '.join(OWNER_RULES)}")
    matrices = _matrices(shapes)
    largest_first = sorted(range(len(matrices)), key=lambda i: (-ns_work(matrices[i][2]), i))
    owner, load = [None] * len(matrices), [0] * group_size
    if rule == "balanced":
        ranks = [(0, q) for q in range(group_size)]  # a heap of (work so far, rank)
        for i in largest_first:
            work, owner[i] = heapq.heappop(ranks)
            heapq.heappush(ranks, (work + ns_work(matrices[i][2]), owner[i]))
    else:
        shard = max(1, -(-(matrices[-1][1] if matrices else 0) // group_size))
        holders = []
        for i, (lo, hi, shape) in enumerate(matrices):
            first, last = min(lo // shard, group_size - 1), min(max(lo, hi - 1) // shard, group_size - 1)
            part = {r: min(hi, (r + 1) * shard) - max(lo, r * shard) for r in range(first, last + 1)}
            most = max(part.values())
            holders.append([r for r, n in part.items() if n == most])
            if len(holders[i]) == 1:
                owner[i] = holders[i][0]
                load[owner[i]] += ns_work(shape)
        for i in largest_first:
            if owner[i] is None:
                owner[i] = min(holders[i], key=lambda q: (load[q], q))
                load[owner[i]] += ns_work(matrices[i][2])
    return tuple((lo, hi, r, shape) for (lo, hi, shape), r in zip(matrices, owner))


def shapes_key(shapes) -> tuple:
    """Shapes as a tuple of tuples of ints (owners_of's cache key)."""
    return tuple(tuple(int(x) for x in shape) for shape in shapes)


@functools.lru_cache(maxsize=256)
def _muon_loads(config, layout) -> dict:
    """ParallelPlan.muon_loads (cached: do not modify)."""
    plan = ParallelPlan(config, layout)
    fsdp, ep, rule = plan.group_size["fsdp"], layout.ep, layout.options.muon_owners
    f = np.arange(fsdp)
    elements, work = np.zeros(fsdp, dtype=np.int64), np.zeros(fsdp, dtype=np.int64)
    moved = exchanged = busiest = even = 0
    for b in plan.buckets(0):  # every rank's buckets have these shapes; only its index in each group differs
        if b.optimizer != "muon":
            continue
        owned, done = np.zeros(b.n, dtype=np.int64), np.zeros(b.n, dtype=np.int64)
        groups = layout.world_size // b.n
        for lo, hi, owner, shape in owners_of(shapes_key(b.shapes), b.n, rule):
            owned[owner] += hi - lo
            done[owner] += ns_work(shape)
            if b.n > 1:
                a, z = b.span(owner)
                moved += groups * (hi - lo - max(0, min(hi, z) - max(lo, a)))
                exchanged += groups * (hi - lo)
        index = f if b.group == "fsdp" else f // ep
        elements += owned[index]
        work += done[index]
        busiest, even = busiest + int(done.max()), even + done.sum() / b.n
    return {"elements": elements, "work": work, "moved": moved, "exchanged": exchanged, "busiest": busiest,
            "even": even}


class ParallelPlan:
    """The rules of `layout` for the model `config` (module docstring). Pure: no communicator, the same answer on
    every rank and in the cost model."""

    def __init__(self, config, layout: Layout):
        self.config, self.layout = config, layout
        L = layout
        self.sizes = {"dp_replicate": L.dp_replicate, "dp_shard": L.dp_shard, "cp": L.cp, "ep": L.ep}
        self.group_size = {"world": L.world_size, "dp_replicate": L.dp_replicate, "dp_shard": L.dp_shard,
                           "cp": L.cp, "fsdp": L.dp_shard * L.cp, "dp": L.dp, "ep": L.ep,
                           "efsdp": L.dp_shard * L.cp // L.ep}

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    # ---- coordinates and groups ---------------------------------------------------------------------------------
    def coords(self, rank: int) -> Coords:
        L = self.layout
        if not 0 <= rank < L.world_size:
            raise ValueError(f"rank {rank} is not one of the {L.world_size} ranks of layout {L}")
        chunk, shard, replica = rank % L.cp, rank // L.cp % L.dp_shard, rank // (L.cp * L.dp_shard)
        f = shard * L.cp + chunk
        return Coords(rank, replica, shard, chunk, f, f % L.ep)

    def colors(self, rank):
        """{group: the Split color of `rank`} (rank may be an integer array: the arithmetic works elementwise)."""
        L = self.layout
        chunk, shard, replica = rank % L.cp, rank // L.cp % L.dp_shard, rank // (L.cp * L.dp_shard)
        f = shard * L.cp + chunk
        return {"world": 0 * rank, "dp_replicate": f, "dp_shard": replica * L.cp + chunk,
                "cp": replica * L.dp_shard + shard, "fsdp": replica, "dp": chunk,
                "ep": replica * L.dp_shard * L.cp + f // L.ep, "efsdp": replica * L.ep + f % L.ep}

    def members(self, group: str, rank: int) -> list[int]:
        """The world ranks of `rank`'s group `group`, in rank order (what Split makes of the colors)."""
        self.check_group(group)
        colors = self.colors(np.arange(self.world_size))[group]
        return np.flatnonzero(colors == colors[rank]).tolist()

    def group_rank(self, group: str, rank: int) -> int:
        """`rank`'s rank within its group `group`: its place among the group's members in world order (as Split
        numbers them), in closed form."""
        self.check_group(group)
        c, dp_shard = self.coords(rank), self.layout.dp_shard
        return {"world": rank, "dp_replicate": c.replica, "dp_shard": c.shard, "cp": c.chunk, "fsdp": c.fsdp,
                "dp": c.replica * dp_shard + c.shard, "ep": c.ep_rank, "efsdp": c.fsdp // self.layout.ep}[group]

    check_group = staticmethod(check_group)

    # ---- data ---------------------------------------------------------------------------------------------------
    def rows(self, rank: int, sequences: int) -> slice:
        """The rows of a global batch of `sequences` sequences that `rank` trains (its dp rank's contiguous share)."""
        dp = self.layout.dp
        if sequences % dp:
            raise ValueError(f"{sequences} sequences per step do not split over {dp} data-parallel ranks")
        n, q = sequences // dp, self.group_rank("dp", rank)
        return slice(q * n, (q + 1) * n)

    def positions(self, rank: int, seq_len: int) -> np.ndarray:
        """The positions of each sequence `rank` holds (its cp chunks, increasing)."""
        return chunk_positions(self.coords(rank).chunk, self.layout.cp, seq_len)

    # ---- parameters ---------------------------------------------------------------------------------------------
    def experts(self, rank: int) -> slice:
        """The routed experts `rank` holds (expert_range of its ep rank)."""
        return expert_range(self.coords(rank).ep_rank, self.layout.ep, self.config.num_experts)

    def buckets(self, rank: int) -> list[FlatBucket]:
        """The flat buckets on `rank`, in the model's order (embed, layers, head)."""
        out = []
        experts = self.experts(rank)
        for model_bucket, parts in bucket_parts(self.config, self.layout.ep).items():
            for (part, optimizer), members in parts.items():
                group = part_group(part)
                offsets = np.cumsum([0] + [math.prod(s) for _, s in members]).tolist()
                out.append(FlatBucket(f"{model_bucket}.{part}", model_bucket, optimizer, group,
                                      [k for k, _ in members], [s for _, s in members], offsets[:-1], offsets[-1],
                                      self.group_size[group], self.group_rank(group, rank),
                                      experts if part == "experts" else None))
        return out

    def spans(self, rank: int) -> dict[str, list[Span]]:
        """{key: [Span]} of every key `rank` holds a part of (expert_bias aside: replicated), whole coordinates."""
        out: dict = {}
        for b in self.buckets(rank):
            for s in b.spans():
                out.setdefault(s.key, []).append(s)
        return out

    def wanted(self, rank: int) -> dict[str, list[tuple[int, int]]]:
        """{key: [(lo, hi)]}: what `rank` must create or read of each key (its spans; every expert_bias whole)."""
        out = {k: [(s.lo, s.hi) for s in spans] for k, spans in self.spans(rank).items()}
        for key, shape in param_shapes(self.config).items():
            if is_expert_bias(key):
                out[key] = [(0, math.prod(shape))]
        return out

    def muon_owners(self, bucket: FlatBucket) -> list[tuple[int, int, int, tuple]]:
        """(flat start, flat end, owner, 2-D shape) of every matrix of a Muon bucket (owners_of its shapes, by the
        layout's muon_owners rule)."""
        return list(owners_of(shapes_key(bucket.shapes), bucket.n, self.layout.options.muon_owners))

    def muon_loads(self) -> dict:
        """What distributed Muon gives each rank of a replica to orthogonalise, summed over the step's Muon buckets,
        as arrays over its fsdp index f (a rank is f in its fsdp group, f // ep in its efsdp group): "elements" of
        the matrices it owns and their "work" (ns_work); as numbers over every group of the world of the buckets over
        more than one rank, "exchanged", their elements, and "moved", those outside their owner's shard (each travels
        to the owner and back); "busiest", the sum over the buckets of the work of the bucket's busiest owner, and "even", of its
        mean over the group."""
        return _muon_loads(self.config, self.layout)

    def muon_balance(self) -> dict:
        """The load balance of distributed Muon under the layout's owner rule: max / mean over a replica's ranks of
        the owned "elements" and of the Newton–Schulz "work" (muon_loads; 1.0 is even), and "moved", the fraction of
        the Muon buckets' elements that travel (of the buckets over more than one rank, every group of the world); "waits", the busiest owner's
        work summed over the buckets / the mean's (each bucket's second exchange waits for its busiest owner, so this
        is the step's Newton–Schulz time over an even split's)."""
        loads = _muon_loads(self.config, self.layout)
        out = {k: float(loads[k].max() / loads[k].mean()) if loads[k].any() else 1.0 for k in ("elements", "work")}
        out["waits"] = float(loads["busiest"] / loads["even"]) if loads["even"] else 1.0
        out["moved"] = float(loads["moved"] / loads["exchanged"]) if loads["exchanged"] else 0.0
        return out

    # ---- the step's collectives ---------------------------------------------------------------------------------
    def schedule(self, rank: int, sequences: int, seq_len: int, micro_batch_size: int, items, recompute=False,
                 doc_ids=True, counts=None, **options) -> list:
        """Rank `rank`'s collectives of one training step, in call order (schedule.step_schedule: its rules)."""
        from .schedule import step_schedule
        return step_schedule(self, rank, sequences, seq_len, micro_batch_size, items, recompute, doc_ids, counts,
                             **options)
