"""Answers as ranges: every prediction of a GPU run is a point (the hardware's fitted efficiencies, overlap on, the
given routing imbalance) and a range over stated assumption ranges, with the assumption that moves it most.

Assumptions (the point, then the two ends of its range; docs/simulation.md states them with the fit they come from):

  gemm_efficiency       the fitted point (hardware.FITTED) × the calibration runs' 10th … 90th percentile factor
                        (hardware.GEMM_SPAN; validation.fit) (at most 0.98)
  attention_efficiency  the fitted point × 0.75 … × 1.25 (at most 0.95)
  memory_efficiency     0.75; 0.60 … 0.90 (not fitted: stated)
  link_efficiency       the fitted point × 0.75 … × 1.15 (at most 0.95)
  overlap               on (the GPU rules of overlap.py) … off (every collective on the critical path)
  imbalance             under expert parallelism: the given busiest-rank factor … + 0.25 (a router balanced less
                        well than assumed)
  peak_flops            only where a published GPU's peak is not known exactly (a run's `peak_range`)
  recompute             only where a run recomputes part of the forward (selective activation checkpointing):
                        none … trinity's whole-layer recompute, the point at none

`answer_range(evaluate, assumptions)` evaluates a number (step seconds, days, tokens/s: any monotone answer) at the
point, at the corner where every assumption is at its fast end, at the corner where every one is at its slow end, and
with each assumption alone at either end of its range (the others at their points): the range is the least and the
most of all of them (so it holds the point), and the assumption whose own two ends differ most is the one the answer
is most sensitive to. `validated` says whether the published runs constrain an assumption (the fit of
validation.py: moving it across its range worsens the calibration runs' agreement); a plan that rests on an
unvalidated one says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .cost_model import account, time_account
from .hardware import FITTED, GEMM_SPAN, VALIDATED

__all__ = ["Assumption", "Answer", "gpu_assumptions", "answer_range", "step_evaluator", "days_evaluator",
           "HARDWARE_FIELDS"]

HARDWARE_FIELDS = ("gemm_efficiency", "attention_efficiency", "memory_efficiency", "link_efficiency", "peak_flops")
SPANS = {"gemm_efficiency": (*GEMM_SPAN, 0.98), "attention_efficiency": (0.75, 1.25, 0.95),
         "link_efficiency": (0.75, 1.15, 0.95)}  # × point at the slow end, × point at the fast end, cap


@dataclass(frozen=True)
class Assumption:
    """One assumption: its `point`, the value at the end of its range that makes a step fastest (`fast`) and slowest
    (`slow`), whether published runs constrain it (`validated`) and where it comes from (`why`)."""
    name: str
    point: float
    fast: float
    slow: float
    validated: bool
    why: str


@dataclass
class Answer:
    """A number as a range: `point`, `low`, `high`; `swings` {assumption: (its fast end's answer, its slow end's)}."""
    point: float
    low: float
    high: float
    swings: dict

    @property
    def most_sensitive(self) -> str:
        """The assumption whose own range moves the answer most."""
        return max(self.swings, key=lambda k: abs(self.swings[k][1] - self.swings[k][0]))

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high


def gpu_assumptions(hw, *, expert_parallel: bool = False, imbalance: float = 1.0,
                    peak_range: tuple | None = None, partial_recompute: bool = False) -> list[Assumption]:
    """The assumptions of a GPU prediction on `hw` (module docstring): its efficiencies are the points."""
    out = []
    for name, (down, up, cap) in SPANS.items():
        p = getattr(hw, name)
        validated = VALIDATED.get(name, False)
        why = (f"fitted on the calibration runs ({FITTED[name]:.2f})" if validated else
               "the stated prior: the calibration runs do not constrain it") if name in FITTED else "stated"
        out.append(Assumption(name, p, min(cap, max(p, p * up)), p * down, validated, why))
    out.insert(2, Assumption("memory_efficiency", hw.memory_efficiency, 0.90, 0.60, VALIDATED.get(
        "memory_efficiency", False), "stated"))
    out.append(Assumption("overlap", 1.0, 1.0, 0.0, VALIDATED.get("overlap", False),
                          "the GPU overlap rules (overlap.py) on, or nothing overlapping"))
    if expert_parallel:
        out.append(Assumption("imbalance", imbalance, imbalance, imbalance + 0.25, False,
                              "the busiest expert-parallel rank's routed rows over the mean"))
    if peak_range:
        low, high = peak_range
        out.append(Assumption("peak_flops", hw.peak_flops, high, low, False, "the GPU's dense peak, not published"))
    if partial_recompute:
        out.append(Assumption("recompute", 0.0, 0.0, 1.0, False,
                              "a selective activation checkpointing: between no recompute and a whole layer's"))
    return out


def answer_range(evaluate, assumptions: list[Assumption]) -> Answer:
    """The answer of `evaluate({name: value})` at the point and over the assumptions' ranges (module docstring)."""
    point = {a.name: a.point for a in assumptions}
    p = evaluate(point)
    values = [p, evaluate({a.name: a.fast for a in assumptions}), evaluate({a.name: a.slow for a in assumptions})]
    swings = {}
    for a in assumptions:
        ends = (evaluate({**point, a.name: a.fast}), evaluate({**point, a.name: a.slow}))
        swings[a.name] = ends
        values.extend(ends)
    return Answer(p, min(values), max(values), swings)


def _scenario(hw, values: dict):
    changes = {k: v for k, v in values.items() if k in HARDWARE_FIELDS}
    return dataclasses.replace(hw, **changes), bool(values.get("overlap", 1.0)), values.get("imbalance", 1.0)





def step_evaluator(config, layout, hw, *, seq_len: int, sequences: int, micro_batch_size: int,
                   recompute: bool = False, imbalance: float = 1.0, q: int = 2, what: str = "step_seconds"):
    """evaluate({assumption: value}) → the predicted step's `what` ("step_seconds", "tokens_per_s", "mfu") of the
    layout on `hw` changed by the values (the step's account is built once per imbalance and recompute)."""
    accounts: dict = {}

    def evaluate(values: dict) -> float:
        changed, overlap, _ = _scenario(hw, values)
        key = (values.get("imbalance", imbalance), bool(values.get("recompute", recompute)))
        if key not in accounts:
            accounts[key] = account(config, layout, seq_len=seq_len, sequences=sequences,
                                    micro_batch_size=micro_batch_size, recompute=key[1], imbalance=key[0], q=q,
                                    memory=False)
        return getattr(time_account(accounts[key], changed, overlap), what)

    return evaluate


def days_evaluator(config, layout, hw, *, seq_len: int, micro_batch_size: int, recompute: bool, segments,
                   imbalance: float = 1.0):
    """evaluate({assumption: value}) → days for `segments` [(sequences per step, tokens)] of a batch schedule."""
    steps = {s: step_evaluator(config, layout, hw, seq_len=seq_len, sequences=s, micro_batch_size=micro_batch_size,
                               recompute=recompute, imbalance=imbalance, what="tokens_per_s") for s, _ in segments}

    def evaluate(values: dict) -> float:
        return sum(tokens / steps[s](values) for s, tokens in segments) / 86400.0

    return evaluate
