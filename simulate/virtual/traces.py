"""Traffic traces of a run on virtual ranks: every collective of every rank, summarised per step.

Each rank's Mesh records, with `mesh.record = True`, one event per collective it calls: the step, the phase
(forward, backward, reductions, optimizer; then metrics (every rank's peak memory), an evaluation's "eval/…" phases
(in the eval line's own comm_bytes), checkpoint and control, the stop agreement, which the trainer's step
`comm_bytes` leave out), the model bucket (embed, a layer, head) where the seams
know it, the collective's kind, its mesh group, the world ranks of that group, and the bytes that leave this rank
(the same count as the cluster mode's own accounting, Mesh.traffic, and the `comm_bytes` of its metrics).

`summarise` turns the ranks' events into per-step totals by kind, by group, by phase and by link tier: a collective
whose group lies within one node (ranks r // ranks_per_node equal) is "intra-node", else "inter-node".
"""

from __future__ import annotations

from collections import defaultdict

__all__ = ["summarise", "link_tier", "counted_in_step", "UNCOUNTED", "EVAL_PREFIX"]

# Phases after a step's metrics line: traced, but not in the trainer's per-step `comm_bytes`.
UNCOUNTED = ("metrics", "checkpoint", "control")
EVAL_PREFIX = "eval/"  # an evaluation's phases ("eval/forward", …): counted in the eval line's comm_bytes


def counted_in_step(phase: str) -> bool:
    """Whether a collective of this phase is in the step line's `comm_bytes` (not UNCOUNTED, not an evaluation's)."""
    return phase not in UNCOUNTED and not phase.startswith(EVAL_PREFIX)


def link_tier(ranks: list[int], ranks_per_node: int) -> str:
    """"intra-node" when every rank of the group is on one node, else "inter-node"."""
    return "intra-node" if len({r // ranks_per_node for r in ranks}) <= 1 else "inter-node"


def summarise(events_per_rank: list[list[dict]], ranks_per_node: int) -> dict:
    """{"ranks", "ranks_per_node", "steps": [{"step", "bytes", "by_kind", "by_group", "by_phase", "by_tier",
    "by_rank", "counted"}]}: bytes summed over every rank, and `counted` {rank: {"kind/group": bytes}} of the phases
    `counted_in_step`, which is what each rank's cluster-mode accounting reports for the step (the metrics'
    `comm_bytes` are rank 0's)."""
    steps: dict = defaultdict(lambda: {"bytes": 0, "by_kind": defaultdict(int), "by_group": defaultdict(int),
                                       "by_phase": defaultdict(int), "by_tier": defaultdict(int),
                                       "by_rank": defaultdict(int),
                                       "counted": defaultdict(lambda: defaultdict(int))})
    for rank, events in enumerate(events_per_rank):
        for e in events:
            s = steps[e["step"]]
            n = e["bytes"]
            s["bytes"] += n
            s["by_kind"][e["kind"]] += n
            s["by_group"][e["group"]] += n
            s["by_phase"][e["phase"]] += n
            s["by_tier"][link_tier(e["ranks"], ranks_per_node)] += n
            s["by_rank"][str(rank)] += n
            if counted_in_step(e["phase"]):
                s["counted"][str(rank)][f"{e['kind']}/{e['group']}"] += n
    return {"ranks": len(events_per_rank), "ranks_per_node": ranks_per_node,
            "steps": [{"step": step, **{k: _plain(v) for k, v in body.items()}} for step, body in sorted(steps.items())]}


def _plain(value):
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value
