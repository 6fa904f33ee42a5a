"""Learning-rate and batch-size schedules (SPEC §9.1; decisions §14 #11).

lr(step) for step = 0, 1, …, total − 1:
  warmup   lr = peak · (step + 1) / warmup_steps                       while step < warmup_steps
  "wsd"    constant peak until decay_start = ⌊decay_start_fraction · total⌋ (never before warmup ends), then
           linear to floor = lr_floor_ratio · peak at the last step (Nano, Mini: decay to 0)
  "cosine" floor + (peak − floor) · ½(1 + cos(π·progress)) from the end of warmup to the last step
           (Large: cosine to 0.1 × peak)
Batch size: sequences per optimizer step change once a token count is reached (Large: 12,288 → 16,384
sequences after 4.9T tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["learning_rate", "BatchSchedule"]


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str = "wsd",
                  decay_start_fraction: float = 0.88, floor_ratio: float = 0.0) -> float:
    if step < 0 or total_steps <= 0:
        raise ValueError(f"step must be >= 0 and total_steps > 0, got step={step}, total_steps={total_steps}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = floor_ratio * peak
    last = max(total_steps - 1, warmup_steps)
    if schedule == "wsd":
        start = max(warmup_steps, int(decay_start_fraction * total_steps))
        if step < start:
            return peak
        span = max(last - start, 1)
        return peak + (floor - peak) * min(1.0, (step - start) / span)
    if schedule == "cosine":
        span = max(last - warmup_steps, 1)
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule must be 'wsd' or 'cosine', got {schedule!r}")


@dataclass(frozen=True)
class BatchSchedule:
    """Sequences per optimizer step: `initial`, then each (tokens_threshold, sequences) once tokens_seen ≥ the
    threshold. Thresholds must increase."""
    initial: int
    changes: tuple = ()

    def __post_init__(self):
        if self.initial <= 0:
            raise ValueError(f"sequences per step must be positive, got {self.initial}")
        thresholds = [t for t, _ in self.changes]
        if thresholds != sorted(thresholds) or any(s <= 0 for _, s in self.changes):
            raise ValueError(f"batch schedule thresholds must increase and sizes be positive: {self.changes}")

    def sequences(self, tokens_seen: int) -> int:
        current = self.initial
        for threshold, sequences in self.changes:
            if tokens_seen >= threshold:
                current = sequences
        return current
