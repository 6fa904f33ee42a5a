"""The traffic of one training step, for the cost model: the parallel plan's collective schedule
(trinity.distributed.schedule, whose docstring gives every collective's bytes) summed over ranks. Nothing here
restates a byte size: what the cost model prices is what the plan says each rank calls, and a trace of virtual ranks
equals that schedule collective by collective (tests/test_plan_schedule.py; benchmarks/comm_volume.py prints the
totals' ratio, 1.000).

A step's collectives are summed per (kind, group, cost phase), the cost phase saying where the step calls them:
"gather" (FSDP parameter gathers, prefetched), "scatter" (gradient reduce-scatters over fsdp or efsdp), "exchange"
(every other collective of the forward and backward: expert-parallel and context-parallel exchanges, the balance
loss's sums, on the critical path), "step" (the step's reductions, the optimizer's exchanges and the stop agreement).

Every rank calls the same collectives; only some bytes differ between ranks (distributed Muon's pieces, a cp rank's
halo neighbours, the routed rows). Without routing counts every replica repeats the first one's bytes (the ranks of
one replica, dp_shard·cp of them, stand for all: nothing loops over every rank, so a plan of a million GPUs sums a
few arrays of dp_shard·cp entries), and the busiest rank's routed rows are `imbalance` × the even spread; with
counts, every rank's bytes are summed.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from trinity.distributed.plan import ParallelPlan, bucket_parts, part_group
from trinity.distributed.schedule import Itemsizes, PerRank, per_rank, step_program

__all__ = ["Collective", "Itemsizes", "ring_steps", "flat_buckets", "shapes_key", "step_collectives", "analytic",
           "group_sizes", "cost_phase"]


@dataclass(frozen=True)
class Collective:
    """One kind of collective of a step: `calls` calls per rank over groups of n ranks; bytes leaving the busiest
    rank in all of them (`rank_bytes`) and leaving every rank together (`total_bytes`); `phase` the cost phase
    (module docstring)."""
    kind: str
    group: str
    n: int
    phase: str
    calls: int
    rank_bytes: float
    total_bytes: float


def ring_steps(kind: str, n: int) -> int:
    """Latency steps of one call: an all-reduce 2⌈log₂ n⌉ (a tree or recursive doubling, as NCCL and MPICH run the
    small ones; a large one's time is its bytes), the ring collectives n−1."""
    return 2 * math.ceil(math.log2(n)) if kind == "Allreduce" else n - 1


def group_sizes(layout) -> dict:
    """{group: its size} (the plan's)."""
    return ParallelPlan(None, layout).group_size


@functools.lru_cache(maxsize=256)
def flat_buckets(config, ep):
    """{model bucket: [(group, optimizer, [local shapes])]}: the FSDP flat buckets (distributed.plan.bucket_parts;
    cached: do not modify)."""
    return {model_bucket: [(part_group(part), optimizer, [shape for _, shape in members])
                           for (part, optimizer), members in parts.items()]
            for model_bucket, parts in bucket_parts(config, ep).items()}


def shapes_key(shapes) -> tuple:
    """A bucket's shapes as a tuple of tuples of ints (the cache key of owners_of)."""
    return tuple(tuple(int(x) for x in s) for s in shapes)


def cost_phase(call) -> str:
    """The cost phase of a scheduled call (module docstring)."""
    if call.kind == "Iallgather":
        return "gather"
    if call.kind in ("Reduce_scatter_block", "Ireduce_scatter_block") and call.group in ("fsdp", "efsdp"):
        return "scatter"
    return "exchange" if call.phase in ("forward", "backward") else "step"


def step_collectives(config, layout, S, T, mbs, items: Itemsizes, counts=None, recompute=False, doc_ids=True,
                     imbalance=1.0, *, checksums=False, control=True) -> list[Collective]:
    """Every collective of one step (the plan's schedule, trinity.distributed.schedule), summed per (kind, group,
    cost phase) over ranks. counts[rank][mb][layer] = the rank's routing counts [E] (under ep > 1); without them the
    rows spread evenly and the busiest rank sends `imbalance` × the mean."""
    plan = ParallelPlan(config, layout)
    program = step_program(plan, S, T, mbs, items, recompute, doc_ids, counts, checksums=checksums, control=control)
    W = layout.world_size
    count = W if counts is not None else layout.dp_shard * layout.cp  # the ranks whose bytes stand for all
    acc: dict = {}  # key → [calls per rank, bytes on every rank, {id: (PerRank, times)}]
    for calls, times in program.blocks:
        for call in calls:
            entry = acc.setdefault((call.kind, call.group, cost_phase(call)), [0, 0, {}])
            entry[0] += times
            if isinstance(call.nbytes, PerRank):
                key = id(call.nbytes.values)  # equal buckets share their cached arrays: summed once
                entry[2][key] = (call.nbytes, entry[2].get(key, (None, 0))[1] + times)
            else:
                entry[1] += times * call.nbytes
    out = []
    for (kind, group, phase), (calls, same, varying) in acc.items():
        if varying:
            sent = same + sum(times * per_rank(plan, nbytes, count) for nbytes, times in varying.values())
            busiest, total = np.max(sent).item(), np.sum(sent).item() * (W // count)
        else:
            busiest, total = same, same * W
        if counts is None and (kind, group) == ("Alltoallv", "ep"):
            busiest *= imbalance
        out.append(Collective(kind, group, plan.group_size[group], phase, calls, busiest, total))
    return out


def analytic(config, layout, S, T, mbs, itemsize, counts, recompute=False, doc_ids=True, *, checksums=False,
             control=True):
    """{(kind, group): bytes summed over ranks} of one step, every element `itemsize` bytes (or Itemsizes)."""
    items = itemsize if isinstance(itemsize, Itemsizes) else Itemsizes.of(itemsize)
    out = defaultdict(int)
    for col in step_collectives(config, layout, S, T, mbs, items, counts, recompute, doc_ids, checksums=checksums,
                                control=control):
        out[(col.kind, col.group)] += col.total_bytes
    return {k: v for k, v in out.items() if v}
