"""The collective schedule of one training step: every collective a rank calls, in order, with its phase, model
bucket, kind, mesh group and the bytes that leave the rank. A function of the parallel plan (plan.py), the batch
shape and, for the expert-parallel rows, the routing counts; the step executes it (a trace of virtual ranks equals it
collective by collective, tests/test_plan_schedule.py) and the cost model prices it (simulate/planning/traffic_model.py sums it
over ranks).

Bytes leaving a rank for a send buffer of s bytes over n ranks (`sent_bytes`, the ring algorithms' traffic, what the
mesh counts): Allreduce ⌊2(n−1)s/n⌋, Reduce_scatter_block and Alltoall ⌊(n−1)s/n⌋, Allgather and Iallgather (n−1)s;
Alltoallv the blocks sent to the other ranks. With message checksums every block sent to another rank carries 4 more
bytes (an Allreduce moves an Alltoall and an Allgather: 2(n−1) blocks). A group of one rank calls nothing.

Notation: B sequences per micro-batch, T tokens per sequence, Tl = T/cp per rank, m = S/(dp·B) micro-batches of the
step's S sequences; E experts (E/ep per ep rank), K chosen per token, d hidden, h_kv·d_h key width; q_g, q_r, q_a the
bytes per element of gathered parameters, reduced gradients (and optimizer state), activations (`Itemsizes`); 8 bytes
per int64 count or document id and per float64 scalar; a flat bucket of a group of n ranks has shard = ⌈size/n⌉.

Tags. Each collective carries the mesh's (phase, layer) at its call: gathering model bucket b sets (forward, b) for the
first L+2 gathers of a micro-batch's order (L+3 with tied embeddings) and (backward, b) after; handing back b's
gradients sets (backward, b); then "reductions", "optimizer" and the trainer's "control". A prefetched gather carries
the tag of the gather that posted it.

One micro-batch. Gather order (`gather_order`): forward embed, layers 0…L−1, head (and embed again when tied to the
head), backward head (embed), layers L−1…0. After each gather the next bucket of the order is posted (Iallgather)
unless it is still held; a bucket neither held nor posted is gathered when asked. What is held, kept across
micro-batches and dropped is gathers.Holding's rule (the layout's schedule options; the seam runs the same object).
  Iallgather [fsdp|efsdp]       per flat bucket of the gathered model bucket not held: (n−1)·shard·q_g
  Reduce_scatter_block [same]   per flat bucket when the model bucket's gradients are handed back (head, layers L−1…0,
                                embed): ⌊(n−1)/n · n·shard·q_r⌋ (Ireduce_scatter_block under async_reduce; none
                                with reduce_gradients="step")
  per layer, forward (again in the backward under recompute), attention before the MoE:
  Allgather cp                  global layer (window None or ≥ T): k,v (cp−1)·2·B·Tl·h_kv·d_h·q_a; doc ids (cp−1)·B·Tl·8
  Alltoallv cp                  global layer under cp_exchange=read, instead: to each other cp rank j the rank's chunks
                                j reads (plan.chunk_exchange; k, v and doc ids of a chunk in one block), s_r·c·(2·B·
                                h_kv·d_h·q_a + B·8 with doc ids), c = Tl/2, s_r = cp−1+r chunks for cp rank r
  Alltoallv cp                  sliding layer, halo h = w−1 > 0: k,v ν·2·B·h·h_kv·d_h·q_a, doc ids ν·B·h·8, where ν is
                                the rank's neighbours in its cp group (1 at either end, 2 between)
  Alltoall ep                   the routing counts [ep, E/ep] int64: ⌊(ep−1)·E·8/ep⌋
  Alltoallv ep                  dispatch: the rank's rows for other ranks' experts; combine: the rows it received from
                                other ranks, sent back; × d·q_a
  per layer, backward: Alltoallv ep (the combine's backward moves the dispatch's rows, the dispatch's the combine's),
  then Reduce_scatter_block cp (global: dk,dv laid out by owner, ⌊(cp−1)/cp · cp·2·B·Tl·h_kv·d_h·q_a⌋; under
  cp_exchange=read an Alltoallv cp of the gradients of the chunks the rank got, (2·cp−2−r)·c·2·B·h_kv·d_h·q_a) or
  Alltoallv cp (sliding: the halos' gradients, ν·2·B·h·h_kv·d_h·q_a)
  Allreduce cp                  after the forward, per MoE layer: the balance loss's per-sequence counts B·E·q_a
                                (when balance_loss_coeff > 0)
Schedule options (options.py; one rule each, in gathers.py or here): keep_gathered: the kept flat buckets are
gathered in the step's first micro-batch only (without counts the block of the first micro-batch, then one block
repeated m−1 times); reshard_after_forward: a bucket of a kind it leaves gathered is gathered once per micro-batch
(its backward holds it); reduce_gradients="step": the reduce-scatters move to the step's end; gather_dtype and
reduce_dtype: q_g and q_r (of the gradient reductions; Muon's exchanges keep the caller's) are their itemsizes
("param": the caller's Itemsizes); async_reduce: the kind is Ireduce_scatter_block. Kept buckets are counted at the
caller's q_g (what the model computes with), against keep_gathered_gib.
Once per step:
  reductions    with reduce_gradients="step", per flat bucket of a group of n > 1, in plan order, tagged (reductions,
                its model bucket): Reduce_scatter_block [fsdp|efsdp] ⌊(n−1)/n · n·shard·q_r⌋; then
                Allreduce dp_replicate per flat bucket shard·q_r; Allreduce cp of the micro-batch losses m·8; Allreduce
                world per MoE layer E·8 (expert counts), 4·8 (loss parts); Allreduce fsdp 8 (gradient norm²); Allreduce
                world 8 (logits max), 8 (logits mean); Allreduce dp 8, 8 (BatchHet's max and sum, when m·dp ≥ 2)
  optimizer     per Muon flat bucket, n > 1, two Alltoallv [its group]: #1 the rank's elements of matrices owned by
                another rank, #2 the elements of its own matrices held by other ranks (plan.owners_of by the layout's
                muon_owners), × q_r; then Allreduce fsdp 16 (update norms²)
  metrics       the metrics line's peak memory of every rank: Allreduce world W·8 (each rank fills its slot)
  control       the trainer's stop agreement after the line: Allreduce world 8 (`control=False`: neither, for a step
                run without the trainer)
An evaluation (training/evaluation.py, `eval_program`) is a micro-batch's forward alone, per micro-batch of each
eval batch, its calls tagged "eval/<phase>" (the seams' end_forward drops what the forward held and restarts the
gather order: nothing is posted past the head, nothing kept across an evaluation's micro-batches), then one Allreduce world of its sums ((5 + E·MoE layers)·8: ce, z, balance, tokens, bytes and the
expert counts). The trainer evaluates after a step's metrics line, before its checkpoint and stop agreement.
A step that saves a checkpoint calls the checkpoint's collectives (phase "checkpoint") before the stop agreement; they
are not in this schedule (their sizes are those of JSON payloads).

Expert-parallel rows: from `counts[rank][mb][layer]`, each rank's routing counts [E] per micro-batch and MoE layer
(every rank of each ep group is needed: what a rank sends back depends on what the others sent it); without counts,
the planning assumption: every rank's B·Tl·K rows spread evenly over the experts, (ep−1)/ep of them leave it (bytes
may then be fractional).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .checksums import CRC_BYTES
from .gathers import Holding, flat_refs, gather_order
from .layout import gathers_whole_sequence, window_problem
from .options import wire_itemsize
from .plan import ParallelPlan, chunk_exchange, owners_of

__all__ = ["Itemsizes", "Scheduled", "PerRank", "Call", "StepProgram", "sent_bytes", "gather_order", "muon_sends",
           "step_program", "step_schedule", "eval_program", "eval_schedule", "routing_counts", "per_rank",
           "COUNT_BYTES", "SCALAR_BYTES", "DOC_ID_BYTES"]

COUNT_BYTES = 8  # int64 routing counts
SCALAR_BYTES = 8  # float64 scalars and loss parts
DOC_ID_BYTES = 8  # int64 document ids


@dataclass(frozen=True)
class Itemsizes:
    """Bytes per element moved: gathered parameters, reduced gradients (and optimizer state), activations (k, v,
    routed rows, the balance loss's counts)."""
    gather: int
    reduce: int
    act: int

    @classmethod
    def of(cls, q: int) -> "Itemsizes":
        return cls(q, q, q)


class Scheduled(NamedTuple):
    """One collective of a rank's step, as its trace records it."""
    phase: str  # forward, backward, reductions, optimizer, control
    layer: object  # the model bucket of the mesh's tag (embed, a layer number, head) or None
    kind: str  # the mpi4py method
    group: str  # the mesh group (plan.GROUPS)
    bytes: int | float  # leaving this rank (float only for the planning assumption's rows)


class PerRank(NamedTuple):
    """Bytes that differ between ranks: values[i] on the rank whose rank in `group` is i ("world": the world rank)."""
    group: str
    values: np.ndarray


class Call(NamedTuple):
    """One collective of the step for every rank: its bytes a number (the same on every rank) or PerRank."""
    phase: str
    layer: object
    kind: str
    group: str
    nbytes: object


@dataclass
class StepProgram:
    """The step's collectives for every rank of the plan: `blocks` [(calls, times)], each block's calls repeated
    `times` times, in order (the micro-batches, then the step's end)."""
    plan: ParallelPlan
    blocks: list
    micro_batches: int

    def for_rank(self, rank: int) -> list[Scheduled]:
        """Rank `rank`'s schedule, in call order."""
        self.plan.coords(rank)  # a rank outside the layout is refused here
        index = {}
        out = []
        for calls, times in self.blocks:
            block = []
            for c in calls:
                n = c.nbytes
                if isinstance(n, PerRank):
                    if n.group not in index:
                        index[n.group] = self.plan.group_rank(n.group, rank)
                    n = n.values[index[n.group]].item()
                block.append(Scheduled(c.phase, c.layer, c.kind, c.group, n))
            out.extend(block * times)
        return out


def sent_bytes(kind: str, n: int, s: int) -> int:
    """Bytes leaving one rank for a send buffer of s bytes over n ranks (module docstring; Alltoallv: not defined)."""
    if n == 1:
        return 0
    return {"Allreduce": 2 * (n - 1) * s // n, "Reduce_scatter_block": (n - 1) * s // n,
            "Ireduce_scatter_block": (n - 1) * s // n, "Alltoall": (n - 1) * s // n}.get(kind, (n - 1) * s)


def _model_requests(config, recompute: bool, backward: bool = True) -> list[tuple[str, object]]:
    """What the model asks of the seams in one micro-batch (model.py, objective.py), in order; without `backward`,
    an evaluation's forward, which ends with the seams' end_forward."""
    tied = config.tie_word_embeddings
    head = [("gather", "head")] + [("gather", "embed")] * tied + [("release", "head")] + [("release", "embed")] * tied
    out = [("gather", "embed"), ("release", "embed")]
    for layer in range(config.num_hidden_layers):
        out += [("gather", layer), ("forward", layer), ("release", layer)]
    if not backward:
        return out + head + [("loss", None), ("end_forward", None)]
    out += head + [("loss", None)] + head + [("hand_back", "head")]
    for layer in reversed(range(config.num_hidden_layers)):
        out += [("gather", layer)] + [("forward", layer)] * recompute + [("backward", layer), ("release", layer),
                                                                         ("hand_back", layer)]
    return out + [("hand_back", "embed")]


@functools.lru_cache(maxsize=256)
def _flat_buckets(config, layout) -> dict:
    """{model bucket: [(group, optimizer, n, shard elements, shapes)]}, the plan's flat buckets (the same on every
    rank: only which shard a rank holds differs). Cached: do not modify."""
    out: dict = {}
    for b in ParallelPlan(config, layout).buckets(0):
        shapes = tuple(tuple(int(x) for x in s) for s in b.shapes)
        out.setdefault(b.model_bucket, []).append((b.group, b.optimizer, b.n, b.shard_size, shapes))
    return out


@functools.lru_cache(maxsize=4096)
def muon_sends(shapes: tuple, n: int, blocks: bool = False, rule: str = "balanced") -> tuple:
    """Distributed Muon's two exchanges in a bucket of matrices of `shapes` (laid end to end from 0) over n ranks, the
    owners by `rule` (plan.owners_of, the layout's muon_owners): (elements group rank i sends in Alltoallv #1, in
    #2) as arrays [n]; with `blocks`, also how many non-empty blocks it sends to other ranks in each. #1: the
    elements of i's shard in matrices another rank owns; #2: the elements of i's own matrices outside its shard.
    Cached: do not modify."""
    matrices = owners_of(shapes, n, rule)
    size = matrices[-1][1]
    shard = -(-size // n)
    starts = np.arange(n, dtype=np.int64) * shard
    held = np.clip(np.minimum(size, starts + shard) - starts, 0, None)
    inside, owned = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    pairs = set()
    for lo, hi, owner, _ in matrices:
        owned[owner] += hi - lo
        inside[owner] += max(0, min(hi, (owner + 1) * shard) - max(lo, owner * shard))
        if blocks:
            pairs.update((s, owner) for s in range(lo // shard, (hi - 1) // shard + 1) if s != owner)
    out = (held - inside, owned - inside)
    if blocks:
        holders, owners = (np.array(x, dtype=np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
        out += (np.bincount(holders, minlength=n), np.bincount(owners, minlength=n))
    return out


class _Builder:
    """Appends the calls of a block under the current tag; a group of one rank calls nothing."""

    def __init__(self, plan: ParallelPlan, checksums: bool, prefix: str = ""):
        self.size, self.checksums, self.prefix = plan.group_size, checksums, prefix
        self.tag: tuple = (prefix + "forward", None)
        self.calls: list = []

    def set_tag(self, phase: str, layer) -> None:
        """The mesh's tag for the next calls (an evaluation's phases carry its "eval/" prefix)."""
        self.tag = (self.prefix + phase, layer)

    def add(self, kind: str, group: str, s: int = 0, sent=None) -> None:
        """A call of `kind` on `group` with a send buffer of s bytes, or (Alltoallv) `sent` bytes leaving the rank
        (a number or PerRank, checksums included)."""
        n = self.size[group]
        if n == 1:
            return
        if sent is None:
            sent = sent_bytes(kind, n, s) + (CRC_BYTES * (n - 1) * (2 if kind == "Allreduce" else 1)
                                             if self.checksums else 0)
        self.calls.append(Call(*self.tag, kind, group, sent))


def step_program(plan: ParallelPlan, sequences: int, seq_len: int, micro_batch_size: int, items, recompute=False,
                 doc_ids=True, counts=None, *, checksums=False, control=True) -> StepProgram:
    """Every rank's collectives of one training step (module docstring). items: Itemsizes or one itemsize for all;
    counts: counts[rank][mb][layer] = routing counts [E] (under ep > 1), or None (the planning assumption)."""
    c, L = plan.config, plan.layout
    items = items if isinstance(items, Itemsizes) else Itemsizes.of(int(items))
    m = _micro_batches(plan, sequences, seq_len, micro_batch_size)
    moe = [layer for layer in range(c.num_hidden_layers) if c.is_moe_layer(layer)]
    buckets = _flat_buckets(c, L)
    micro_batch = _MicroBatches(plan, seq_len, micro_batch_size, items, recompute, doc_ids, counts, m, checksums)
    if counts is None:
        first = micro_batch(0)  # the kept buckets are gathered in the first micro-batch only
        blocks = [(first, 1), (micro_batch(0), m - 1)] if m > 1 and micro_batch.holding.kept else [(first, m)]
    else:
        blocks = [(micro_batch(mb), 1) for mb in range(m)]
    end = _Builder(plan, checksums)
    options, q_reduced = L.options, micro_batch.q_reduced
    if options.reduce_gradients == "step":  # each flat bucket's gradient of the whole step, reduce-scattered once
        for f in flat_refs(c, L):
            end.set_tag("reductions", f.model_bucket)
            end.add(micro_batch.scatter, f.group, f.padded * q_reduced)
    end.tag = ("reductions", None)
    flat = [fb for parts in buckets.values() for fb in parts]
    for _, _, _, shard, _ in flat:
        end.add("Allreduce", "dp_replicate", shard * q_reduced)
    end.add("Allreduce", "cp", m * SCALAR_BYTES)
    for _ in moe:
        end.add("Allreduce", "world", c.num_experts * COUNT_BYTES)
    end.add("Allreduce", "world", 4 * SCALAR_BYTES)
    end.add("Allreduce", "fsdp", SCALAR_BYTES)
    end.add("Allreduce", "world", SCALAR_BYTES)
    end.add("Allreduce", "world", SCALAR_BYTES)
    if m * L.dp >= 2:
        end.add("Allreduce", "dp", SCALAR_BYTES)
        end.add("Allreduce", "dp", SCALAR_BYTES)
    end.tag = ("optimizer", None)
    for group, optimizer, n, shard, shapes in flat:
        if optimizer == "muon" and n > 1:
            for sent in _muon_bytes(shapes, n, items.reduce, checksums, L.options.muon_owners):
                end.add("Alltoallv", group, sent=PerRank(group, sent))
    end.add("Allreduce", "fsdp", 2 * SCALAR_BYTES)
    if control:
        end.tag = ("metrics", None)
        end.add("Allreduce", "world", L.world_size * SCALAR_BYTES)  # every rank's peak memory (peak_memory.py)
        end.tag = ("control", None)
        end.add("Allreduce", "world", SCALAR_BYTES)
    return StepProgram(plan, blocks + [(end.calls, 1)], m)


def eval_program(plan: ParallelPlan, sequences: int, seq_len: int, micro_batch_size: int, batches: int, items,
                 doc_ids=True, counts=None, *, checksums=False) -> StepProgram:
    """Every rank's collectives of one evaluation of `batches` batches of `sequences` sequences
    (training/evaluation.py): per micro-batch the forward's (each tagged "eval/forward"), then one Allreduce world of
    the sums (ce, z, balance, tokens, bytes and E counts per MoE layer, float64; "eval/reductions"). counts:
    counts[rank][mb][layer] over the micro-batches of every batch in order, or None (the planning assumption)."""
    c = plan.config
    items = items if isinstance(items, Itemsizes) else Itemsizes.of(int(items))
    m = _micro_batches(plan, sequences, seq_len, micro_batch_size)
    micro_batch = _MicroBatches(plan, seq_len, micro_batch_size, items, False, doc_ids, counts, batches * m,
                                checksums, backward=False)
    blocks = [(micro_batch(0), batches * m)] if counts is None else [(micro_batch(mb), 1) for mb in range(batches * m)]
    end = _Builder(plan, checksums, prefix=micro_batch.prefix)
    end.tag = (end.prefix + "reductions", None)
    moe = sum(1 for layer in range(c.num_hidden_layers) if c.is_moe_layer(layer))
    end.add("Allreduce", "world", (5 + moe * c.num_experts) * SCALAR_BYTES)
    return StepProgram(plan, blocks + [(end.calls, 1)], batches * m)


def eval_schedule(plan: ParallelPlan, rank: int, sequences: int, seq_len: int, micro_batch_size: int, batches: int,
                  items, doc_ids=True, counts=None, *, checksums=False) -> list[Scheduled]:
    """Rank `rank`'s collectives of one evaluation, in call order (eval_program's arguments)."""
    return eval_program(plan, sequences, seq_len, micro_batch_size, batches, items, doc_ids, counts,
                        checksums=checksums).for_rank(rank)


def _micro_batches(plan: ParallelPlan, sequences: int, seq_len: int, micro_batch_size: int) -> int:
    """m = S/(dp·B) micro-batches per rank; ValueError when the batch or the sequences do not split."""
    L, S, T, B = plan.layout, sequences, seq_len, micro_batch_size
    if S % L.dp or S // L.dp % B:
        raise ValueError(f"{S} sequences per step do not split into micro-batches of {B} on {L.dp} data-parallel "
                         f"ranks")
    if L.cp > 1 and T % (2 * L.cp):
        raise ValueError(f"seq_len {T} does not split into 2·cp = {2 * L.cp} chunks")
    return S // (L.dp * B)


class _MicroBatches:
    """`self(mb)`: the calls of micro-batch mb (module docstring, "One micro-batch"); with backward=False an
    evaluation's forward, tagged "eval/<phase>"."""

    def __init__(self, plan, seq_len, micro_batch_size, items, recompute, doc_ids, counts, m, checksums,
                 backward=True):
        c, L = plan.config, plan.layout
        self.plan, self.items, self.recompute, self.doc_ids = plan, items, recompute, doc_ids
        self.checksums, self.backward = checksums, backward
        self.prefix = "" if backward else "eval/"
        B, self.T = micro_batch_size, seq_len
        self.cp, self.ep, self.E = L.cp, L.ep, c.num_experts
        self.Tl = seq_len // L.cp
        self.moe = [layer for layer in range(c.num_hidden_layers) if c.is_moe_layer(layer)]
        self.buckets = _flat_buckets(c, L)
        self.kv_row = 2 * B * c.num_key_value_heads * c.head_dim * items.act  # k and v of a position of every row
        self.B = B
        self.cp_neighbours = np.array([(r > 0) + (r < L.cp - 1) for r in range(L.cp)], dtype=np.int64)
        self.rows = _expert_rows(plan, counts, m, self.moe, B * self.Tl * c.num_experts_per_tok) if L.ep > 1 else None
        self.row_bytes = c.hidden_size * items.act
        options = L.options
        self.options, self.refs = options, flat_refs(c, L)
        self.q_gathered = wire_itemsize(options.gather_dtype, items.gather)
        self.q_reduced = wire_itemsize(options.reduce_dtype, items.reduce)
        self.scatter = "Ireduce_scatter_block" if options.async_reduce else "Reduce_scatter_block"
        self.holding = Holding(c, self.refs, options, items.gather)  # the seam's state, carried across micro-batches

    def attention(self, b: "_Builder", layer: int, backward: bool) -> None:
        c, cp = self.plan.config, self.cp
        if cp == 1:
            return
        window, T, Tl, kv_row = c.window_of(layer), self.T, self.Tl, self.kv_row
        if gathers_whole_sequence(window, T):
            if self.plan.layout.options.cp_exchange == "read":  # the chunks each rank reads, and their gradients back
                sent = chunk_exchange(cp, "read").T if backward else chunk_exchange(cp, "read")
                chunk = Tl // 2 * (kv_row + (self.B * DOC_ID_BYTES if self.doc_ids and not backward else 0))
                crc = CRC_BYTES if self.checksums else 0
                b.add("Alltoallv", "cp", sent=PerRank("cp", sent.sum(axis=1) * chunk + (sent > 0).sum(axis=1) * crc))
            elif backward:
                b.add("Reduce_scatter_block", "cp", cp * Tl * kv_row)
            else:
                b.add("Allgather", "cp", Tl * kv_row)
                if self.doc_ids:
                    b.add("Allgather", "cp", self.B * Tl * DOC_ID_BYTES)
            return
        problem = window_problem(window, T, cp)
        if problem:
            raise ValueError(f"layer {layer}: {problem}")
        h = window - 1
        if h == 0:
            return
        halos = [h * kv_row] if backward else [h * kv_row] + ([h * self.B * DOC_ID_BYTES] if self.doc_ids else [])
        crc = CRC_BYTES if self.checksums else 0
        for per_neighbour in halos:
            b.add("Alltoallv", "cp", sent=PerRank("cp", self.cp_neighbours * (per_neighbour + crc)))

    def experts(self, b: "_Builder", layer: int, mb: int, backward: bool) -> None:
        if self.ep == 1 or layer not in self.moe:
            return
        dispatch, combine = self.rows(mb, layer)
        if backward:  # the combine's backward moves the dispatch's rows, the dispatch's backward the combine's
            b.add("Alltoallv", "ep", sent=_scaled(dispatch, self.row_bytes, self.checksums))
            b.add("Alltoallv", "ep", sent=_scaled(combine, self.row_bytes, self.checksums))
            return
        b.add("Alltoall", "ep", self.E * COUNT_BYTES)
        b.add("Alltoallv", "ep", sent=_scaled(dispatch, self.row_bytes, self.checksums))
        b.add("Alltoallv", "ep", sent=_scaled(combine, self.row_bytes, self.checksums))

    def __call__(self, mb: int) -> list:
        c, items, holding = self.plan.config, self.items, self.holding
        b = _Builder(self.plan, self.checksums, prefix=self.prefix)

        def post(flats) -> None:
            for f in flats:
                b.add("Iallgather", f.group, f.shard * self.q_gathered)

        for what, bucket in _model_requests(c, self.recompute, self.backward):
            if what == "gather":
                phase, now, _, prefetch = holding.gather(bucket)
                if phase is not None:
                    b.set_tag(phase, bucket)
                post(now)
                post(prefetch)
            elif what == "release":
                holding.release(bucket)
            elif what == "end_forward":
                holding.end_forward()
            elif what == "hand_back":
                b.set_tag("backward", bucket)
                holding.hand_back(bucket)
                if self.options.reduce_gradients == "micro_batch":
                    for f in holding.by_model.get(bucket, []):
                        b.add(self.scatter, f.group, f.padded * self.q_reduced)
            elif what == "forward":
                self.attention(b, bucket, backward=False)
                self.experts(b, bucket, mb, backward=False)
            elif what == "backward":
                self.experts(b, bucket, mb, backward=True)
                self.attention(b, bucket, backward=True)
            elif what == "loss" and c.balance_loss_coeff > 0:
                for _ in self.moe:
                    b.add("Allreduce", "cp", self.B * self.E * items.act)
        if not holding.settled():
            raise RuntimeError(f"a micro-batch leaves buckets {sorted(holding.held | holding.posted)} gathered at "
                               f"order position {holding.at}: the next one would not start afresh")
        return b.calls


def step_schedule(plan: ParallelPlan, rank: int, sequences: int, seq_len: int, micro_batch_size: int, items,
                  recompute=False, doc_ids=True, counts=None, *, checksums=False, control=True) -> list[Scheduled]:
    """Rank `rank`'s collectives of one training step, in the order it calls them (module docstring; arguments as
    step_program's)."""
    return step_program(plan, sequences, seq_len, micro_batch_size, items, recompute, doc_ids, counts,
                        checksums=checksums, control=control).for_rank(rank)


@functools.lru_cache(maxsize=4096)
def _muon_bytes(shapes: tuple, n: int, q: int, checksums: bool, rule: str = "balanced") -> tuple:
    """Bytes each group rank sends in distributed Muon's Alltoallv #1 and #2 (muon_sends × q, checksums included;
    owners by `rule`). Cached, so that the cost model sums equal buckets once: do not modify."""
    sends = muon_sends(shapes, n, checksums, rule)
    return tuple(sends[i] * q + (CRC_BYTES * sends[2 + i] if checksums else 0) for i in (0, 1))


def _scaled(rows_blocks, row_bytes: int, checksums: bool):
    """Bytes of routed rows: rows × row_bytes (+ 4 per non-empty block to another rank with checksums); PerRank over
    world ranks when the rows are an array."""
    rows, blocks = rows_blocks
    sent = rows * row_bytes + (CRC_BYTES * blocks if checksums else 0)
    return PerRank("world", sent) if isinstance(sent, np.ndarray) else sent


def _expert_rows(plan: ParallelPlan, counts, m: int, moe: list, rows_per_rank: int):
    """rows(mb, layer) → ((rows, blocks) of the dispatch, (rows, blocks) of the combine) that leave each rank: arrays
    over world ranks from counts, or the planning assumption's numbers (module docstring)."""
    ep, E, W = plan.layout.ep, plan.config.num_experts, plan.world_size
    if counts is None:
        even = rows_per_rank * (ep - 1) / ep
        return lambda mb, layer: ((even, ep - 1), (even, ep - 1))
    if len(counts) != W or any(len(per_rank) != m for per_rank in counts):
        raise ValueError(f"counts must hold {m} micro-batches for each of the {W} ranks, got "
                         f"{[len(x) for x in counts]} for {len(counts)} ranks")
    ep_rank = np.array([plan.group_rank("ep", r) for r in range(W)])
    members = np.array([plan.members("ep", r) for r in range(W)])  # [W, ep]: the world ranks of r's ep group
    away = np.arange(ep)[None, :] != ep_rank[:, None]

    def rows(mb: int, layer: int):
        C = np.array([np.asarray(counts[r][mb][layer], dtype=np.int64).reshape(-1) for r in range(W)])
        if C.shape != (W, E):
            raise ValueError(f"counts of micro-batch {mb}, layer {layer}: each rank's must have {E} entries")
        to = C.reshape(W, ep, E // ep).sum(axis=2)  # to[r, j]: rows rank r sends to ep rank j
        back = to[members, ep_rank[:, None]]  # back[r, s]: rows rank r received from its group's rank s
        mine = to[np.arange(W), ep_rank]
        return ((to.sum(axis=1) - mine, ((to > 0) & away).sum(axis=1)),
                (back.sum(axis=1) - mine, ((back > 0) & away).sum(axis=1)))

    return rows


def routing_counts(plan: ParallelPlan, chosen: dict, micro_batch_size: int) -> list:
    """counts[rank][mb][layer] = the routing counts [E] of each rank's micro-batches, from chosen[layer] = the experts
    [S, T, K] that every token of the global batch chose: the rank's rows (plan.rows), its positions
    (plan.positions), cut into micro-batches of `micro_batch_size` sequences."""
    if not chosen:
        return [[] for _ in range(plan.world_size)]
    S, T = next(iter(chosen.values())).shape[:2]
    E, B = plan.config.num_experts, micro_batch_size
    out = []
    for rank in range(plan.world_size):
        rows, positions = plan.rows(rank, S), plan.positions(rank, T)
        mine = {layer: np.asarray(x)[rows][:, positions] for layer, x in chosen.items()}
        out.append([{layer: np.bincount(x[mb * B:(mb + 1) * B].reshape(-1), minlength=E) for layer, x in mine.items()}
                    for mb in range((rows.stop - rows.start) // B)])
    return out


def per_rank(plan: ParallelPlan, nbytes, count: int):
    """The bytes of `nbytes` (a number or PerRank) on world ranks 0 … count−1, as an array (a number stays one).
    `count` must hold every member of the groups of those ranks (the world size, or dp_shard·cp for a group within
    a replica)."""
    if not isinstance(nbytes, PerRank):
        return nbytes
    return nbytes.values[_group_ranks(plan.layout, nbytes.group, count)]


@functools.lru_cache(maxsize=1024)
def _group_ranks(layout, group: str, count: int) -> np.ndarray:
    """The rank in `group` of each world rank 0 … count−1 (their place among their group's members in world order,
    as Split numbers them), from the plan's colors; the groups must lie within those ranks. Cached: do not modify."""
    plan = ParallelPlan(None, layout)
    colors = np.asarray(plan.colors(np.arange(count))[group])
    _, sizes = np.unique(colors, return_counts=True)
    if np.any(sizes != plan.group_size[group]):
        raise ValueError(f"ranks 0…{count - 1} do not hold whole {group} groups of layout {layout}")
    order = np.argsort(colors, kind="stable")
    ordered = colors[order]
    ranks = np.empty(count, dtype=np.int64)
    ranks[order] = np.arange(count) - np.searchsorted(ordered, ordered, side="left")
    return ranks
