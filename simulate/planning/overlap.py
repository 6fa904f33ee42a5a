"""The cost model's overlap and latency rules, per collective of the schedule: for each (kind, group, phase) of a
call of distributed/schedule.py's step program, what it can hide under and how many latency steps one call pays.
One table, read by traffic_model.step_collectives (which sums the schedule per rule) and cost_model (which times it);
docs/simulation.md prints the same table.

On a GPU (stated, not measured; a communication stream beside the compute stream, as NCCL runs it):

  kind                   group          phase              hides under                               latency/call
  Iallgather             fsdp, efsdp    forward            the forward's compute (prefetched: posted  ring, n−1
                                                           one bucket ahead, it runs while the bucket
                                                           before it computes)
  Iallgather             fsdp, efsdp    backward           the backward's compute (likewise)         ring, n−1
  Reduce_scatter_block   fsdp, efsdp    backward           the backward's compute when the schedule  ring, n−1
                                                           posts it non-blocking (an I-kind, or the
                                                           layout's async_reduce option: pipelined
                                                           under the layers still to go back); else
                                                           nothing: the step waits for each one
  Allreduce              dp_replicate   backward           the backward's compute (replicas reduced  tree, 2⌈log₂n⌉
                                                           per bucket as gradients come)
  Allreduce              dp_replicate   reductions         nothing: reduced once per step after the  tree, 2⌈log₂n⌉
                                                           backward (trinity's schedule)
  Alltoall               ep             forward            nothing: a MoE layer waits for its counts Bruck, ⌈log₂n⌉
  Alltoallv              ep             forward, backward  nothing: a MoE layer waits for its rows   direct, 1
  Allgather              cp             forward            nothing: a global layer waits for k, v    ring, n−1
  Reduce_scatter_block   cp             backward           nothing: dk, dv before the layer below    ring, n−1
  Alltoallv              cp             forward, backward  nothing: a sliding layer waits for halos  direct, 1
  Allreduce              cp             forward            nothing (the balance loss's counts)       tree
  Alltoallv              fsdp, efsdp    optimizer          nothing: Muon's owners wait for matrices  direct, 1
  Allreduce              any            reductions, optimizer, metrics, control: nothing             tree

"direct": every peer's message is posted at once (MPICH's and NCCL's Alltoallv, grouped sends), so a call pays one
step of latency, not n−1 in sequence; its bytes are what leaves the rank. "ring": n−1 steps in sequence (NCCL's and
MPICH's ring for large gathers and reduce-scatters). "tree": 2⌈log₂n⌉ (a reduction up and a broadcast down, or
recursive doubling). "Bruck": ⌈log₂n⌉ rounds (MPICH's short Alltoall).

What can hide only hides under the compute of the same pass: the cost model exposes max(0, hidden traffic − compute)
per pass (forward, backward), summed over the step's micro-batches; the links are shared, so everything that hides
under one pass adds up before it is compared with that pass's compute. On the host (this machine's MPI) nothing
overlaps: the cost model is called with overlap=False and every second of every collective is on the critical path.

A published run whose schedule trinity does not run (pipeline parallelism, DualPipe, FP8 dispatch or compute, tensor
parallelism) is not predicted: the run catalogue (published.py) lists it as out of scope, and nothing here stands in
for it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

__all__ = ["Rule", "rule", "latency_steps", "RULES_TABLE"]

FSDP_GROUPS = ("fsdp", "efsdp")


@dataclass(frozen=True)
class Rule:
    """How the cost model treats one collective: `phase` the step phase it is reported under ("fsdp": data-parallel
    traffic, "exchange": EP/CP exchanges of a layer, "step": once per step), `hides_under` the pass whose compute can
    hide it ("forward", "backward") or None (critical path), `latency` the step rule ("ring", "tree", "bruck",
    "direct")."""
    phase: str
    hides_under: str | None
    latency: str


def _blocking(kind: str) -> bool:
    return not kind.startswith("I")


def rule(kind: str, group: str, phase: str, layout=None) -> Rule:
    """The rule of a call of `kind` over `group` in schedule phase `phase` (forward, backward, reductions,
    optimizer, metrics, control; an evaluation's "eval/…" is its pass). `layout`: its options say whether a
    reduce-scatter is posted non-blocking (async_reduce)."""
    return _rule(kind, group, phase, bool(getattr(getattr(layout, "options", None), "async_reduce", False)))


@functools.lru_cache(maxsize=1024)
def _rule(kind: str, group: str, phase: str, async_reduce: bool) -> Rule:
    phase = phase.removeprefix("eval/")
    if kind in ("Iallgather", "Allgather") and group in FSDP_GROUPS:
        return Rule("fsdp", phase if kind == "Iallgather" and phase in ("forward", "backward") else None, "ring")
    if kind in ("Reduce_scatter_block", "Ireduce_scatter_block", "Ireduce_scatter") and group in FSDP_GROUPS:
        asynchronous = not _blocking(kind) or async_reduce
        return Rule("fsdp", "backward" if asynchronous and phase == "backward" else None, "ring")
    if kind in ("Allreduce", "Iallreduce") and group == "dp_replicate":
        return Rule("fsdp" if phase == "backward" else "step", "backward" if phase == "backward" else None, "tree")
    if kind in ("Alltoallv", "Ialltoallv"):
        return Rule("exchange" if phase in ("forward", "backward") else "step", None, "direct")
    if kind == "Alltoall":
        return Rule("exchange" if phase in ("forward", "backward") else "step", None, "bruck")
    if kind in ("Allreduce", "Iallreduce"):
        return Rule("exchange" if phase in ("forward", "backward") else "step", None, "tree")
    # cp's Allgather and Reduce_scatter_block, and any other ring collective
    return Rule("exchange" if phase in ("forward", "backward") else "step", None, "ring")


def latency_steps(latency: str, n: int) -> int:
    """Latency steps of one call over n ranks under rule `latency` (module docstring)."""
    if n <= 1:
        return 0
    if latency == "ring":
        return n - 1
    if latency == "tree":
        return 2 * math.ceil(math.log2(n))
    if latency == "bruck":
        return math.ceil(math.log2(n))
    return 1


RULES_TABLE = [  # (kind, group, phase) examples of the table above, for the docs and tests
    ("Iallgather", "fsdp", "forward"), ("Iallgather", "efsdp", "backward"), ("Reduce_scatter_block", "fsdp", "backward"),
    ("Allreduce", "dp_replicate", "reductions"), ("Allreduce", "dp_replicate", "backward"),
    ("Alltoall", "ep", "forward"), ("Alltoallv", "ep", "backward"), ("Allgather", "cp", "forward"),
    ("Reduce_scatter_block", "cp", "backward"), ("Alltoallv", "cp", "forward"), ("Allreduce", "cp", "forward"),
    ("Alltoallv", "fsdp", "optimizer"), ("Allreduce", "world", "reductions"), ("Allreduce", "world", "control"),
]
