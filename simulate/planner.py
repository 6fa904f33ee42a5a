"""The layout planner: every layout of a job that the cluster mode accepts, with every micro-batch size and with and
without activation recompute, predicted by the cost model; those that fit in memory ranked by throughput.

    plan = search(Config.preset("trinity-large"), gpus=2048, hardware=get_hardware("b300"), seq_len=8192,
                  batches=[(0, 12288), (4.9e12, 16384)], tokens=17e12)
    plan.best, plan.ranked[:10], plan.days

Layouts come from trinity.distributed.layout.fitting_layouts (the same rules `trinity train` checks: the world
size, ep dividing dp_shard·cp and the experts, the batch dividing into dp·micro-batch, cp chunks holding a sliding
window's halo), for every batch of the schedule. A layout is timed at each batch of the schedule (a batch raised
mid-run changes the micro-batches per rank) and its days are the sum over the schedule's segments; it is ranked by
mean tokens/s over the whole budget, memory checked at the largest batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trinity.distributed.layout import fitting_layouts

from .cost_model import Prediction, predict

__all__ = ["Candidate", "Plan", "search", "explain"]


@dataclass
class Candidate:
    """A layout, micro-batch size and recompute choice, with its prediction at each batch of the schedule."""
    predictions: list  # [Prediction], one per batch of the schedule
    days: float

    @property
    def first(self) -> Prediction:
        return self.predictions[0]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.predictions)

    @property
    def peak_memory(self) -> float:
        return max(p.memory["total"] for p in self.predictions)


@dataclass
class Plan:
    ranked: list  # fitting candidates, fastest first
    rejected: list  # candidates that do not fit in memory
    tokens: float
    batches: list
    considered: int = 0
    notes: list = field(default_factory=list)

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None


def _segments(batches, tokens):
    """[(sequences, tokens in that segment)] of a schedule [(from token, sequences)] up to `tokens`."""
    out = []
    for i, (start, sequences) in enumerate(batches):
        end = batches[i + 1][0] if i + 1 < len(batches) else tokens
        if end > start:
            out.append((sequences, min(end, tokens) - start))
    return out


def search(config, *, gpus: int, hardware, seq_len: int, batches, tokens: float, micro_batches=(1, 2, 4, 8),
           recompute=(False, True), imbalance=1.0, fixed: dict | None = None) -> Plan:
    """Every (layout, micro-batch, recompute) of the job predicted and ranked (module docstring). `batches`: the
    batch schedule [(from token, sequences per step)], sorted, the first from 0; `fixed`: {dimension: size} that
    every layout must have (e.g. {"ep": 8}); `imbalance`: the busiest ep rank's load over the mean, a number or a
    function of ep (trinity.simulate.routing.busiest_rank_factor over recorded counts)."""
    fixed = fixed or {}
    sizes = [s for _, s in batches]
    segments = _segments(batches, tokens)
    ranked, rejected, considered = [], [], 0
    for mbs in micro_batches:
        for layout in fitting_layouts(world_size=gpus, config=config, seq_len=seq_len, micro_batch_size=mbs,
                                      batch_sizes=sizes):
            if any(getattr(layout, dim) != size for dim, size in fixed.items()):
                continue
            imb = imbalance(layout.ep) if callable(imbalance) else imbalance
            for rc in recompute:
                preds = [predict(config, layout, hardware, seq_len=seq_len, sequences=s, micro_batch_size=mbs,
                                 recompute=rc, imbalance=imb) for s in sizes]
                by_size = dict(zip(sizes, preds))
                days = sum(by_size[s].days(n) for s, n in segments)
                cand = Candidate(preds, days)
                considered += 1
                (ranked if cand.fits else rejected).append(cand)
    ranked.sort(key=lambda c: c.days)
    rejected.sort(key=lambda c: c.peak_memory)
    return Plan(ranked, rejected, tokens, list(batches), considered)


def explain(plan: Plan, hardware) -> list[str]:
    """Why the best layout wins: the phase that bounds its step, and what the runners-up lose to it."""
    best = plan.best
    if best is None:
        return ["no layout fits in memory"]
    p = best.first
    share = {k: v / p.step_seconds for k, v in p.phases.items()}
    lines = [f"the best step ({p.layout}, micro-batch {p.micro_batch_size}, recompute "
             f"{'on' if p.recompute else 'off'}) is bound by {p.bound}: {share[p.bound]:.0%} of its "
             f"{p.step_seconds:.3g} s (" + ", ".join(f"{k} {v:.0%}" for k, v in share.items() if v >= 0.005) + ")"]
    seen = set()
    for other in plan.ranked[1:]:
        q = other.first
        key = (q.layout.dp_shard, q.layout.ep, q.layout.cp)
        if key in seen or len(seen) >= 3:
            continue
        seen.add(key)
        worse = max(q.phases, key=lambda k: q.phases[k] - p.phases.get(k, 0.0))
        lines.append(f"{q.layout} (micro-batch {q.micro_batch_size}, recompute {'on' if q.recompute else 'off'}) is "
                     f"{other.days / best.days:.2f}x the days: {worse} {q.phases[worse]:.3g} s against "
                     f"{p.phases.get(worse, 0.0):.3g} s")
    if plan.rejected:
        r = plan.rejected[0]
        lines.append(f"{len(plan.rejected)} choices do not fit in {hardware.hbm_bytes / 1e9:.0f} GB; the leanest of "
                     f"them needs {r.peak_memory / 1e9:.0f} GB per GPU")
    return lines
