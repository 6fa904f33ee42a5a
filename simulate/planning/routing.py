"""Routing imbalance for the cost model: how much more than the mean the busiest expert-parallel rank receives, from
the routing counts a run recorded (the trainer's metrics.jsonl: `expert_load`, the whole step's tokens per expert of
each MoE layer), for any ep.

Under ep the experts [r·E/ep, (r+1)·E/ep) live on ep rank r, so a layer's rank loads are the counts summed in ep
consecutive blocks; every layer waits for its busiest rank, so the factor is the mean over layers and steps of
max(block sums) / mean(block sums) (1.0 for ep = 1, and for a perfectly balanced router). This is the rank-level
MaxVio + 1; `trinity plan --max-vio` sets it directly instead.
"""

from __future__ import annotations

import numpy as np

__all__ = ["busiest_rank_factor", "read_expert_loads"]


def busiest_rank_factor(loads: list[dict], ep: int) -> float:
    """Mean over steps and MoE layers of the busiest ep rank's routed tokens over the mean; `loads` is a list of
    {layer: counts [E]} (one per step). ValueError when ep does not divide E."""
    if ep == 1:
        return 1.0
    shares = []
    for row in loads:
        for counts in row.values():
            counts = np.asarray(counts, dtype=np.float64)
            if counts.size % ep:
                raise ValueError(f"ep = {ep} does not divide the {counts.size} experts of the recorded counts")
            blocks = counts.reshape(ep, -1).sum(axis=1)
            if blocks.sum() > 0:
                shares.append(blocks.max() / blocks.mean())
    return float(np.mean(shares)) if shares else 1.0


def read_expert_loads(path) -> list[dict]:
    """The `expert_load` of every step of a metrics.jsonl (trinity.run.metrics_log.read_lines); ValueError
    in one line when there is none."""
    from trinity.run.metrics_log import read_lines

    good, _ = read_lines(path)
    loads = [row["expert_load"] for _, row, _ in good if row.get("expert_load")]
    if not loads:
        raise ValueError(f"{path}: no step with expert_load (a metrics.jsonl of a MoE training run)")
    return loads
