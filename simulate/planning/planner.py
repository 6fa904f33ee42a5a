"""The layout planner: every layout of a job that the cluster mode accepts, with every micro-batch size and with and
without activation recompute, predicted by the cost model; those that fit in memory ranked by throughput.

    plan = search(Config.preset("trinity-large"), gpus=2048, hardware=get_hardware("b300"), seq_len=8192,
                  batches=[(0, 12288), (4.9e12, 16384)], tokens=17e12)
    plan.best, plan.ranked[:10], plan.days
    add_ranges(plan, config, hardware, seq_len=8192, top=10)  # days and tokens/s as ranges (ranges.py)

Layouts are those of trinity.distributed.layout.fitting_layouts (the same rules `trinity train` checks: the world
size, ep dividing dp_shard·cp and the experts, the batch dividing into dp·micro-batch, cp chunks holding a sliding
window's halo), for every batch of the schedule. A layout is timed at each batch of the schedule (a batch raised
mid-run changes the micro-batches per rank) and its days are the sum over the schedule's segments; it is ranked by
mean tokens/s over the whole budget, memory checked at the largest batch.

The search is bounded, and refuses at once (SearchTooLarge, before any prediction) what would take minutes: more
than MAX_GPUS ranks, sequences longer than MAX_SEQ_LEN (the memory model walks a sequence's attention blocks), batch
sizes over MAX_SEQUENCES, more than MAX_EXAMINED layouts to test against the rules, or more than MAX_PREDICTIONS
predictions (choices × batch sizes; --fix narrows them). Layouts are enumerated from the batch rule (dp·micro-batch
divides every batch size, so dp divides their gcd and the world), then decided by Layout.problems: the same list as
fitting_layouts, without visiting the layouts of a million-rank world that the batch rule excludes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trinity.distributed.layout import DIMS, Layout

from .cost_model import Prediction, predict
from .limits import MAX_EXAMINED, MAX_GPUS, MAX_PREDICTIONS, MAX_SEQ_LEN, MAX_SEQUENCES

__all__ = ["Candidate", "Plan", "search", "explain", "layouts_to_plan", "SearchTooLarge", "add_ranges", "caveats",
           "fastest_with",
           "MAX_GPUS", "MAX_SEQ_LEN", "MAX_SEQUENCES", "MAX_EXAMINED", "MAX_PREDICTIONS"]


class SearchTooLarge(ValueError):
    """A search that would take minutes, refused before any prediction; the message (one line) names the limit."""


@dataclass
class Candidate:
    """A layout, micro-batch size and recompute choice, with its prediction at each batch of the schedule."""
    predictions: list  # [Prediction], one per batch of the schedule
    days: float
    imbalance: float = 1.0
    days_range: object = None  # ranges.Answer of the days (add_ranges), or None
    tps_range: object = None  # ranges.Answer of the first batch's tokens/s per GPU

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


def _divisors(n: int) -> list[int]:
    """The divisors of n, ascending, in O(√n) steps."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small) | {n // d for d in small})


def layouts_to_plan(*, gpus: int, config, seq_len: int, micro_batch_size: int, batch_sizes, fixed=None,
                    budget: list | None = None, options=None) -> list[Layout]:
    """fitting_layouts' list (every layout of `gpus` ranks that Layout.problems accepts, in its order), restricted
    to the sizes in `fixed`, visiting only layouts that the batch rule (dp·micro-batch divides every batch size) and
    the expert rule (ep divides dp_shard·cp and the experts) allow. `budget` = [layouts still to examine], shared by
    the calls of one search: SearchTooLarge when it runs out. `options`: the schedule options every layout carries
    (distributed/options.py; default none)."""
    fixed, budget = fixed or {}, budget if budget is not None else [MAX_EXAMINED]
    common = math.gcd(*(int(b) for b in batch_sizes))
    if common % micro_batch_size:
        return []
    job = dict(world_size=gpus, config=config, seq_len=seq_len, micro_batch_size=micro_batch_size,
               batch_sizes=list(batch_sizes))
    found = []
    for dp in _divisors(math.gcd(gpus, common // micro_batch_size)):
        cp = gpus // dp
        for dp_shard in _divisors(dp):
            for ep in _divisors(math.gcd(dp_shard * cp, config.num_experts)):
                layout = Layout(dp // dp_shard, dp_shard, cp, ep, **({} if options is None else {"options": options}))
                if any(getattr(layout, dim) != size for dim, size in fixed.items()):
                    continue
                budget[0] -= 1
                if budget[0] < 0:
                    raise SearchTooLarge(f"more than {MAX_EXAMINED:,} layouts to examine; narrow the search with "
                                         f"--fix (e.g. --fix ep=8) or a batch size with fewer divisors")
                if not layout.problems(**job):
                    found.append(layout)
    return sorted(found, key=lambda x: (sum(getattr(x, n) != 1 for n in DIMS), -x.dp_shard, x.cp, x.ep))


def check_size(*, gpus: int, seq_len: int, batches) -> None:
    """Refuse (SearchTooLarge) a job beyond the planner's limits (module docstring) before any work."""
    if not 1 <= gpus <= MAX_GPUS:
        raise SearchTooLarge(f"{gpus:,} GPUs: the planner takes 1 to {MAX_GPUS:,}")
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise SearchTooLarge(f"seq_len {seq_len:,}: the planner takes 1 to {MAX_SEQ_LEN:,} tokens")
    big = [s for _, s in batches if not 1 <= s <= MAX_SEQUENCES]
    if big:
        raise SearchTooLarge(f"batch size {big[0]:,}: the planner takes 1 to {MAX_SEQUENCES:,} sequences per step")


def search(config, *, gpus: int, hardware, seq_len: int, batches, tokens: float, micro_batches=(1, 2, 4, 8),
           recompute=(False, True), imbalance=1.0, fixed: dict | None = None, options=None) -> Plan:
    """Every (layout, micro-batch, recompute) of the job predicted and ranked (module docstring). `batches`: the
    batch schedule [(from token, sequences per step)], sorted, the first from 0; `fixed`: {dimension: size} that
    every layout must have (e.g. {"ep": 8}); `imbalance`: the busiest ep rank's load over the mean, a number or a
    function of ep (trinity.simulate.planning.routing.busiest_rank_factor over recorded counts); `options`: the schedule
    options of every layout (priced by the schedule they change). SearchTooLarge, before any prediction, for a search
    beyond the limits."""
    check_size(gpus=gpus, seq_len=seq_len, batches=batches)
    sizes = [s for _, s in batches]
    segments = _segments(batches, tokens)
    budget = [MAX_EXAMINED]
    layouts = {mbs: layouts_to_plan(gpus=gpus, config=config, seq_len=seq_len, micro_batch_size=mbs,
                                    batch_sizes=sizes, fixed=fixed, budget=budget, options=options)
               for mbs in micro_batches}
    predictions = sum(map(len, layouts.values())) * len(recompute) * len(sizes)
    if predictions > MAX_PREDICTIONS:
        raise SearchTooLarge(f"{predictions:,} predictions (layouts × micro-batch sizes × recompute × batch sizes), "
                             f"more than the limit of {MAX_PREDICTIONS:,}; narrow the search with --fix (e.g. "
                             f"--fix ep=8)")
    ranked, rejected, considered = [], [], 0
    for mbs in micro_batches:
        for layout in layouts[mbs]:
            imb = imbalance(layout.ep) if callable(imbalance) else imbalance
            for rc in recompute:
                preds = [predict(config, layout, hardware, seq_len=seq_len, sequences=s, micro_batch_size=mbs,
                                 recompute=rc, imbalance=imb) for s in sizes]
                by_size = dict(zip(sizes, preds))
                days = sum(by_size[s].days(n) for s, n in segments)
                cand = Candidate(preds, days, imb)
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


def add_ranges(plan: Plan, config, hardware, *, seq_len: int, top: int = 10, also=()) -> None:
    """The days and the first batch's tokens/s per GPU of the `top` ranked candidates (and of the candidates in
    `also`) as ranges over the stated assumptions (ranges.py), with the assumption each is most sensitive to
    (Candidate.days_range, .tps_range)."""
    from .ranges import answer_range, days_evaluator, gpu_assumptions, step_evaluator

    segments = _segments(plan.batches, plan.tokens)
    for cand in [*plan.ranked[:top], *also]:
        if cand.days_range is not None:
            continue
        p = cand.first
        assumptions = gpu_assumptions(hardware, expert_parallel=p.layout.ep > 1, imbalance=cand.imbalance)
        kw = dict(seq_len=seq_len, micro_batch_size=p.micro_batch_size, recompute=p.recompute,
                  imbalance=cand.imbalance)
        cand.days_range = answer_range(days_evaluator(config, p.layout, hardware, segments=segments, **kw),
                                       assumptions)
        tps = step_evaluator(config, p.layout, hardware, sequences=plan.batches[0][1], what="tokens_per_s", **kw)
        gpus = p.layout.world_size
        cand.tps_range = answer_range(lambda values: tps(values) / gpus, assumptions)


def fastest_with(plan: Plan, fixed: dict) -> Candidate | None:
    """The fastest fitting candidate whose layout has the sizes in `fixed` (e.g. {"ep": 8})."""
    return next((c for c in plan.ranked if all(getattr(c.first.layout, k) == v for k, v in fixed.items())), None)


def caveats(plan: Plan, hardware, gpu_key: str) -> list[str]:
    """Why the best plan's answer may not hold: the assumptions it rests on that the published runs do not
    validate (docs/simulation.md, "Validation on published runs")."""
    from .published import gpus_with_runs
    from .ranges import gpu_assumptions

    best = plan.best
    if best is None:
        return []
    out = []
    if gpu_key not in gpus_with_runs():
        out.append(f"no published run on {hardware.name} is in the validation set: its efficiencies are those fitted "
                   f"on H100 runs")
    if best.days_range is not None:
        name = best.days_range.most_sensitive
        validated = {a.name: a.validated for a in gpu_assumptions(hardware, expert_parallel=True,
                                                                  imbalance=best.imbalance)}
        if not validated.get(name, False):
            out.append(f"the answer is most sensitive to {name}, which no calibration run constrains (stated, not "
                       f"fitted)")
    p = best.first
    if p.bound in ("fsdp exposed", "ep/cp exchange", "step collectives") and \
            p.layout.world_size > hardware.ranks_per_node:
        out.append(f"the step is bound by communication ({p.bound}) across nodes, i.e. by the network cards: no "
                   f"calibration run is network-bound, so this rests on the stated network figures")
    return out
