"""The cost model against published runs (published.py): the split into calibration and held-out halves, the fit
of the efficiencies on the calibration half only, and each run's prediction as a point and a range
(benchmarks/validate_published.py prints them; docs/simulation.md reports them).

Split rule (deterministic, fixed before any prediction): the in-scope runs of each source, in catalogue order,
alternate calibration, held out, calibration, …; Arcee's Trinity runs are always held out (they are what the planner
exists to predict: fitted on, the 33 days would be a fit, not a prediction). Out-of-scope runs are in neither half.

Fit: gemm_efficiency, attention_efficiency and link_efficiency minimise the mean absolute log ratio predicted/published
tokens/s over the calibration runs (robust: one run the model misses for reasons it does not count moves the fit
less than a square would let it), each within its plausible range (BOUNDS), by a coordinate search on a 0.01 grid,
four rounds, with a weak pull towards the stated priors 0.70, 0.45, 0.80 so that an efficiency the runs do not
constrain stays at its prior; memory efficiency stays at its stated 0.75. An efficiency is *constrained* when moving
it to either end of its range (ranges.py) raises the calibration runs' mean absolute log error by more than
CONSTRAINED; one that is not goes back to its prior (the others refitted with it there) and is reported as
unvalidated. The range of gemm_efficiency is the calibration runs' own scatter: for each, the factor on the fitted
gemm_efficiency that would make its prediction its published figure; the range spans their 10th to 90th percentile
(an 80 % interval on the calibration half by construction; the held-out half tests it).

Each run is predicted with trinity's schedule for its layout (the framework's differences are its notes) on the
catalogue GPU changed by the run's `hardware`; a run without a published layout takes the planner's fastest choice
under its `fixed` dimensions at the point assumptions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from trinity.distributed.layout import Layout

from .cost_model import account, time_account
from .hardware import get_hardware
from .published import CATALOGUE, PublishedRun, in_scope
from .ranges import Answer, answer_range, days_evaluator, gpu_assumptions, step_evaluator

__all__ = ["split", "fit", "RunResult", "predict_run", "run_hardware", "CONSTRAINED", "PRIORS", "BOUNDS",
           "calibration_error"]

PRIORS = {"gemm_efficiency": 0.70, "attention_efficiency": 0.45, "link_efficiency": 0.80}
# The plausible range of each efficiency the fit may choose from: cuBLAS and flash-attention kernels on H100 reach
# 0.3–0.95 of the peak and 0.15–0.9 at the sizes of these runs; NCCL's bus bandwidth within a node and across
# InfiniBand 0.5–0.95 of the link's. A fit at a bound is absorbing something the model does not count.
BOUNDS = {"gemm_efficiency": (0.30, 0.95), "attention_efficiency": (0.15, 0.90), "link_efficiency": (0.50, 0.95)}
CONSTRAINED = 0.005  # mean absolute log error added by an efficiency at an end of its range
PRIOR_WEIGHT = 1e-4


def split(runs=None) -> tuple[list[PublishedRun], list[PublishedRun]]:
    """(calibration, held out) of the in-scope runs (module docstring's rule)."""
    calibration, held_out, seen = [], [], {}
    for run in in_scope(CATALOGUE if runs is None else runs):
        if run.source == "arcee":
            held_out.append(run)
            continue
        k = seen.get(run.source, 0)
        seen[run.source] = k + 1
        (calibration if k % 2 == 0 else held_out).append(run)
    return calibration, held_out


def run_hardware(run: PublishedRun, efficiencies: dict | None = None):
    """The run's GPU: the catalogue's, changed by the run's published differences and `efficiencies`."""
    hw = dataclasses.replace(get_hardware(run.gpu), **run.hardware)
    if run.peak_range:
        hw = dataclasses.replace(hw, peak_flops=sum(run.peak_range) / 2)
    return dataclasses.replace(hw, **(efficiencies or {}))


def _layout(run: PublishedRun) -> Layout:
    return Layout.parse(run.layout)


def _account(run: PublishedRun, imbalance: float = 1.0):
    return account(run.config(), _layout(run), seq_len=run.seq_len, sequences=run.global_batch,
                   micro_batch_size=run.micro_batch, recompute=run.recompute, imbalance=imbalance)


def calibration_error(accounts, runs, hardware, values: dict) -> float:
    """Mean absolute log ratio predicted/published tokens/s over `runs` (with their `accounts`) under `values`."""
    total = 0.0
    for acc, run, hw in zip(accounts, runs, hardware):
        p = time_account(acc, dataclasses.replace(hw, **values))
        total += abs(math.log(p.tokens_per_s / run.gpus / run.tokens_per_s))
    return total / max(1, len(runs))


def _coordinate_search(loss, values: dict, names) -> dict:
    values = dict(values)
    for _ in range(4):
        for name in names:
            lo, hi = BOUNDS[name]
            grid = [round(lo + 0.01 * i, 2) for i in range(int(round((hi - lo) / 0.01)) + 1)]
            values[name] = min(grid, key=lambda x: loss({**values, name: x}))
    return values


def _needed_factor(acc, run, hw, values) -> float:
    """The factor on gemm_efficiency that makes a run's prediction its published tokens/s (bisection; the
    prediction grows with the factor), within the factors that keep it in (0, 1]."""
    lo, hi = 0.3, 1.0 / values["gemm_efficiency"]

    def tps(f):
        return time_account(acc, dataclasses.replace(hw, **{**values, "gemm_efficiency": values["gemm_efficiency"]
                                                           * f})).tokens_per_s / run.gpus
    if tps(hi) <= run.tokens_per_s:
        return hi
    if tps(lo) >= run.tokens_per_s:
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tps(mid) < run.tokens_per_s else (lo, mid)
    return (lo + hi) / 2


def fit(calibration: list[PublishedRun]) -> tuple[dict, dict, tuple]:
    """({efficiency: fitted value}, {efficiency: constrained?}, (low, high) factors on gemm_efficiency) from the
    calibration runs alone (module docstring). Runs without a layout or a published tokens/s are skipped (none are
    calibration runs by the split rule)."""
    runs = [r for r in calibration if r.layout and r.tokens_per_s]
    accounts = [_account(r) for r in runs]
    hardware = [run_hardware(r) for r in runs]

    def loss(v):
        prior = sum(math.log(v[k] / PRIORS[k]) ** 2 for k in PRIORS)
        return calibration_error(accounts, runs, hardware, v) + PRIOR_WEIGHT * prior

    def constrained_at(values):
        base = calibration_error(accounts, runs, hardware, values)
        out = {}
        for a in gpu_assumptions(dataclasses.replace(hardware[0] if hardware else get_hardware("h100"), **values)):
            if a.name in PRIORS:
                worse = max(calibration_error(accounts, runs, hardware, {**values, a.name: end})
                            for end in (a.fast, a.slow))
                out[a.name] = worse - base > CONSTRAINED
        return out

    values = _coordinate_search(loss, PRIORS, list(BOUNDS))
    constrained = constrained_at(values)
    if not all(constrained.values()):  # an efficiency the runs do not constrain keeps its prior; refit the others
        values = {k: (v if constrained[k] else PRIORS[k]) for k, v in values.items()}
        values = _coordinate_search(loss, values, [k for k in BOUNDS if constrained[k]])
        constrained = {k: constrained[k] and c for k, c in constrained_at(values).items()}
    factors = sorted(_needed_factor(a, r, h, values) for a, r, h in zip(accounts, runs, hardware))
    span = (_percentile(factors, 0.1), _percentile(factors, 0.9)) if factors else (0.85, 1.15)
    return values, constrained, (min(span[0], 1.0), max(span[1], 1.0))


def _percentile(sorted_values, q: float) -> float:
    """The q-quantile of sorted values, linear between neighbours."""
    x = q * (len(sorted_values) - 1)
    i = int(math.floor(x))
    j = min(i + 1, len(sorted_values) - 1)
    return sorted_values[i] + (x - i) * (sorted_values[j] - sorted_values[i])


@dataclass
class RunResult:
    """A run's prediction: its published figure, the predicted point and range (tokens/s per GPU, or days), the
    ratio point/published, the most sensitive assumption, the predicted memory per GPU (GiB) and the layout priced."""
    run: PublishedRun
    published: float
    answer: Answer
    unit: str
    memory_gib: float
    layout: str
    micro_batch: int
    recompute: bool

    @property
    def ratio(self) -> float:
        return self.answer.point / self.published

    @property
    def inside(self) -> bool:
        return self.answer.holds(self.published)


def _planned(run: PublishedRun, hw):
    """The planner's fastest choice for a run without a published layout (its `fixed` dimensions)."""
    from .planner import search
    plan = search(run.config(), gpus=run.gpus, hardware=hw, seq_len=run.seq_len, batches=list(run.batches),
                  tokens=run.tokens, micro_batches=(1, 2, 3, 4, 6, 8), fixed=dict(run.fixed))
    if plan.best is None:
        raise ValueError(f"{run.name}: no layout fits")
    return plan.best.first


def predict_run(run: PublishedRun, efficiencies: dict | None = None) -> RunResult:
    """The run predicted with `efficiencies` (default: the hardware's, i.e. the fitted ones), as a range."""
    if run.out_of_scope:
        raise ValueError(f"{run.name}: out of scope ({run.out_of_scope}); the model does not predict it")
    hw = run_hardware(run, efficiencies)
    config = run.config()
    if run.layout:
        layout, mbs, recompute = _layout(run), run.micro_batch, run.recompute
    else:
        best = _planned(run, hw)
        layout, mbs, recompute = best.layout, best.micro_batch_size, best.recompute
    assumptions = gpu_assumptions(hw, expert_parallel=layout.ep > 1, peak_range=run.peak_range,
                                  partial_recompute=run.partial_recompute)
    if run.days is not None:
        segments, batches = [], list(run.batches) or [(0.0, run.global_batch)]
        for i, (start, sequences) in enumerate(batches):
            end = batches[i + 1][0] if i + 1 < len(batches) else run.tokens
            segments.append((sequences, end - start))
        evaluate = days_evaluator(config, layout, hw, seq_len=run.seq_len, micro_batch_size=mbs, recompute=recompute,
                                  segments=segments)
        published, unit = run.days, "days"
        sequences = max(s for s, _ in segments)
    else:
        evaluate = step_evaluator(config, layout, hw, seq_len=run.seq_len, sequences=run.global_batch,
                                  micro_batch_size=mbs, recompute=recompute, what="tokens_per_s")
        per_gpu = evaluate
        evaluate = lambda values: per_gpu(values) / run.gpus  # noqa: E731
        published, unit, sequences = run.tokens_per_s, "tokens/s/GPU", run.global_batch
    memory = account(config, layout, seq_len=run.seq_len, sequences=sequences, micro_batch_size=mbs,
                     recompute=recompute).memory["total"] / 2 ** 30
    return RunResult(run, published, answer_range(evaluate, assumptions), unit, memory, str(layout), mbs, recompute)
