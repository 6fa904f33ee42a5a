"""The analytic traffic of one training step: every collective a rank calls, from the config, the layout, the batch
shape and the routing counts only (it never runs the distributed code). The cost model times these; the
benchmark benchmarks/comm_volume.py checks their bytes against what the mesh counts (ratio 1.000 at every layout).

Notation: W ranks, R = dp_replicate, F = dp_shard·cp (fsdp group), ep, cp, dp = R·dp_shard; S sequences of T tokens,
micro-batches of B sequences, m = S/(dp·B) per rank; d hidden, E experts (E_l = E/ep per rank), h_kv, d_h; q the
bytes per element moved (the model's dtype, or on GPUs q_gather / q_reduce / q_act: bf16 gathers and activations,
fp32 reductions); 8 bytes for int64 / float64 scalars. Ring conventions, bytes leaving one rank for a send buffer of
s bytes over n ranks: Allreduce ⌊2(n−1)s/n⌋, Reduce_scatter_block and Alltoall (n−1)s/n, Allgather and Iallgather
(n−1)s; Alltoallv: the bytes sent to other ranks. Every group of a given name has the same size and every rank is
in one of them, so for the symmetric collectives the total is W × the per-rank bytes.

FSDP (fsdp.py, plan.bucket_parts). Flat buckets: per model bucket (embed, each layer, head) one per optimizer group ("muon" |
"adamw", sharded over fsdp, n = F) plus the routed experts of a MoE layer (E_l experts' w1, w3, w2, over
efsdp, n = F/ep); expert_bias is not in any. Size z = Σ elements, padded to P = ⌈z/n⌉·n, shard P/n.
  Iallgather  [group]          per gather of a model bucket, per flat bucket: (n−1)·(P/n)·q per rank. Gathers per
                               micro-batch: embed 1 (+2 tied: the head's forward and backward), each layer 2
                               (forward, backward; recompute reuses the backward's), head 2 (forward, backward).
  Reduce_scatter_block [group] per micro-batch, per flat bucket: (n−1)·(P/n)·q per rank.
  Allreduce dp_replicate       once per step (after the micro-batches), per flat bucket: ⌊2(R−1)·(P/n)·q/R⌋ per rank.
Distributed Muon (sharded_optim.py), per Muon flat bucket with n > 1: each matrix (a stacked [E_l, o, i] is E_l)
has an owner (plan.owners_of: largest o·i·min(o, i) first, each to the least-loaded rank, ties to the
lowest); every element held by a
rank other than its matrix's owner goes to the owner (Alltoallv #1) and comes back orthogonalised (#2):
  Alltoallv [group]            2·q·Σ_matrices |matrix outside the owner's shard|, per group (R groups of fsdp,
                               R·ep of efsdp).
EP (expert_parallel.py), per MoE layer per micro-batch (×2 forward exchanges with recompute), per ep group g:
  Alltoall ep                  counts [ep, E_l] int64: ep·(ep−1)·E_l·8 per group.
  Alltoallv ep                 dispatch, combine, combine backward, dispatch backward each move the X_g routed rows
                               that leave their rank: X_g = Σ_{r∈g} Σ_{e not on r} c_r[e] (c_r: rank r's counts),
                               4·X_g·d·q per group (+2·X_g·d·q with recompute). Without counts (planning): each rank
                               sends (ep−1)/ep of its B·(T/cp)·K rows, the busiest receives `imbalance` × the mean.
CP (context_parallel.py), per micro-batch, T_l = T/cp tokens per rank, kv = 2·B·h_kv·d_h·q bytes per position:
  Allgather cp                 global layer: k,v (cp−1)·T_l·kv and doc ids (cp−1)·B·T_l·8 per rank (×2 with
                               recompute).
  Reduce_scatter_block cp      global layer backward: dk,dv laid out by owner [cp, …]: (cp−1)·T_l·kv per rank.
  Alltoallv cp                 sliding layer, halo h = w−1 > 0: 2(cp−1) halos per cp group (each rank but the
                               first gets one from r−1, each but the last one from r+1): 2(cp−1)·h·(kv + B·8) forward
                               (k,v and doc ids; ×2 recompute), 2(cp−1)·h·kv backward (the halos' gradients).
  Allreduce cp                 balance loss sequence_sum, per MoE layer: counts [B, E]·q; and once per step the
                               micro-batch losses, m·8 (BatchHet).
Step reductions (reference/training/step.py, sharded_optim.py), once per step, each a separate Allreduce:
  world                        expert counts per MoE layer E·8; the four loss parts 4·8; logits max 8; logits mean 8.
  dp                           BatchHet max 8 and sum 8 (when m·dp ≥ 2).
  fsdp                        gradient norm² 8; the optimizer's update norms² 2·8.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from trinity.distributed.plan import bucket_parts, owners_of, part_group

__all__ = ["Collective", "Itemsizes", "ring", "ring_steps", "flat_buckets", "muon_moved", "shapes_key",
           "step_collectives", "analytic", "group_sizes"]


@dataclass(frozen=True)
class Itemsizes:
    """Bytes per element moved: gathered parameters, reduced gradients, activations (k, v, routed rows)."""
    gather: int
    reduce: int
    act: int

    @classmethod
    def of(cls, q: int) -> "Itemsizes":
        return cls(q, q, q)


@dataclass(frozen=True)
class Collective:
    """One kind of collective of a step: `calls` calls over groups of n ranks; bytes leaving the busiest rank in all
    of them (`rank_bytes`) and leaving every rank together (`total_bytes`). `phase`: where the step calls it —
    "gather" (FSDP parameter gathers, prefetched), "scatter" (gradient reduce-scatters), "exchange" (EP and CP, on
    the critical path of the forward and backward), "step" (once per step: replica all-reduce, Muon, scalars)."""
    kind: str
    group: str
    n: int
    phase: str
    calls: int
    rank_bytes: float
    total_bytes: float


def ring(kind: str, n: int, s: float) -> float:
    """Bytes leaving one rank for a send buffer of s bytes over n ranks (the ring conventions above)."""
    if n == 1:
        return 0
    return {"Allreduce": 2 * (n - 1) * s // n, "Reduce_scatter_block": (n - 1) * s // n,
            "Alltoall": (n - 1) * s // n}.get(kind, (n - 1) * s)


def ring_steps(kind: str, n: int) -> int:
    """Latency steps of one call: an all-reduce 2⌈log₂ n⌉ (a tree or recursive doubling, as NCCL and MPICH run the
    small ones; a large one's time is its bytes), the ring collectives n−1."""
    return 2 * math.ceil(math.log2(n)) if kind == "Allreduce" else n - 1


def group_sizes(layout) -> dict:
    L = layout
    return {"world": L.world_size, "dp": L.dp, "cp": L.cp, "fsdp": L.dp_shard * L.cp,
            "efsdp": L.dp_shard * L.cp // L.ep, "dp_replicate": L.dp_replicate, "ep": L.ep}


@functools.lru_cache(maxsize=256)
def flat_buckets(config, ep):
    """{model bucket: [(group, optimizer, [local shapes])]}: the FSDP flat buckets (distributed.plan.bucket_parts,
    which plan_buckets lays out; cached: do not modify)."""
    return {model_bucket: [(part_group(part), optimizer, [shape for _, shape in members])
                           for (part, optimizer), members in parts.items()]
            for model_bucket, parts in bucket_parts(config, ep).items()}


def shapes_key(shapes) -> tuple:
    """A bucket's shapes as a tuple of tuples of ints (the cache key of owners_of)."""
    return tuple(tuple(int(x) for x in s) for s in shapes)


def muon_moved(shapes, n):
    """Elements of a Muon bucket over n ranks that are not on their matrix's owner (distributed Muon's owner rule,
    distributed.plan.owners_of)."""
    return _moved(shapes_key(shapes), n)


@functools.lru_cache(maxsize=4096)
def _moved(shapes: tuple, n: int) -> int:
    matrices = owners_of(shapes, n)
    shard = -(-matrices[-1][1] // n)
    return sum((hi - lo) - max(0, min(hi, (owner + 1) * shard) - max(lo, owner * shard))
               for lo, hi, owner, _ in matrices)


def step_collectives(config, layout, S, T, mbs, items: Itemsizes, counts=None, recompute=False, doc_ids=True,
                     imbalance=1.0) -> list[Collective]:
    """Every collective of one step (module docstring), summed per (kind, group, phase). counts[rank][mb][layer] = the
    rank's routing counts [E] (under ep > 1); without them the rows are spread evenly and the busiest rank gets
    `imbalance` × the mean."""
    c, L = config, layout
    W, F, cp, ep = L.world_size, L.dp_shard * L.cp, L.cp, L.ep
    size = group_sizes(L)
    m, B, E, d = S // (L.dp * mbs), mbs, c.num_experts, c.hidden_size
    fwd = 2 if recompute else 1  # forward exchanges of a layer (again in the backward under recompute)
    moe = [l for l in range(c.num_hidden_layers) if c.is_moe_layer(l)]
    acc: dict = {}  # (kind, group, phase) → [calls, busiest rank's bytes, every rank's bytes]

    def add(kind, group, phase, calls, rank_bytes, total_bytes):
        a = acc.setdefault((kind, group, phase), [0, 0, 0])
        a[0] += calls
        a[1] += rank_bytes
        a[2] += total_bytes

    def symmetric(kind, group, s, phase, calls=1):  # every rank of every group sends the same s-byte buffer
        n = size[group]
        if n > 1 and calls:
            b = calls * ring(kind, n, s)
            add(kind, group, phase, calls, b, W * b)

    # FSDP: gathers, reduce-scatters, dp_replicate all-reduces; distributed Muon
    gathers = {"embed": 1 + 2 * bool(c.tie_word_embeddings), "head": 2, **{l: 2 for l in range(c.num_hidden_layers)}}
    for model_bucket, parts in flat_buckets(c, ep).items():
        for group, opt, shapes in parts:
            n = size[group]
            shard = -(-sum(math.prod(s) for s in shapes) // n)
            symmetric("Iallgather", group, shard * items.gather, "gather", m * gathers[model_bucket])
            symmetric("Reduce_scatter_block", group, shard * n * items.reduce, "scatter", m)
            symmetric("Allreduce", "dp_replicate", shard * items.reduce, "step")
            if opt == "muon" and n > 1:
                moved = 2 * items.reduce * muon_moved(shapes, n)
                add("Alltoallv", group, "step", 2, moved / n, moved * (W // n))
    # EP: counts and four row exchanges per MoE layer per micro-batch, per ep group
    if ep > 1:
        El = E // ep
        exchanges = 2 * fwd + 2
        for layer in moe:
            symmetric("Alltoall", "ep", E * 8, "exchange", m * fwd)
            if counts is None:  # rows leaving a rank in the step's micro-batches
                rows = m * B * (T // cp) * c.num_experts_per_tok * (ep - 1) / ep
                busiest, total = rows * imbalance, rows * W
            else:
                leaving = []
                for rank in range(W):
                    f = rank % F
                    local = slice(f % ep * El, (f % ep + 1) * El)
                    leaving.append(sum(int(np.sum(counts[rank][mb][layer]) - np.sum(counts[rank][mb][layer][local]))
                                       for mb in range(m)))
                busiest, total = max(leaving), sum(leaving)
            b = exchanges * d * items.act
            add("Alltoallv", "ep", "exchange", exchanges * m, busiest * b, total * b)
    # CP: k,v gathering / halos, their gradients, the balance loss's per-sequence counts, the micro-batch losses
    if cp > 1:
        Tl, kv = T // cp, 2 * B * c.num_key_value_heads * c.head_dim * items.act
        for layer in range(c.num_hidden_layers):
            w = c.window_of(layer)
            if w is None:
                symmetric("Allgather", "cp", Tl * kv, "exchange", m * fwd)
                if doc_ids:
                    symmetric("Allgather", "cp", B * Tl * 8, "exchange", m * fwd)
                symmetric("Reduce_scatter_block", "cp", cp * Tl * kv, "exchange", m)
            elif w > 1:
                per_group = 2 * (cp - 1) * (w - 1) * (fwd * (kv + (B * 8 if doc_ids else 0)) + kv)
                # a middle rank sends halos to both neighbours, 2 of the group's 2(cp−1); with cp = 2 one each
                busiest = per_group * (1 if cp == 2 else 2) / (2 * (cp - 1))
                add("Alltoallv", "cp", "exchange", m * (fwd + 1), m * busiest, m * per_group * (W // cp))
        if c.balance_loss_coeff > 0:
            symmetric("Allreduce", "cp", B * E * items.reduce, "exchange", m * len(moe))
        symmetric("Allreduce", "cp", m * 8, "step")
    # step reductions
    for s in [E * 8] * len(moe) + [4 * 8, 8, 8]:
        symmetric("Allreduce", "world", s, "step")
    if m * L.dp >= 2:
        symmetric("Allreduce", "dp", 8, "step", 2)
    symmetric("Allreduce", "fsdp", 8, "step")
    symmetric("Allreduce", "fsdp", 2 * 8, "step")
    return [Collective(kind, group, size[group], phase, *a) for (kind, group, phase), a in acc.items()]


def analytic(config, layout, S, T, mbs, itemsize, counts, recompute=False, doc_ids=True):
    """{(kind, group): bytes summed over ranks} of one step, every element `itemsize` bytes."""
    out = defaultdict(int)
    for col in step_collectives(config, layout, S, T, mbs, Itemsizes.of(itemsize), counts, recompute, doc_ids):
        out[(col.kind, col.group)] += int(col.total_bytes)
    return {k: v for k, v in out.items() if v}
