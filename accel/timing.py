"""Per-operator timing of any op table: where a training step's time goes, for every backend alike.

    timed = TimedOps(get_backend("numba"))
    loss_and_grads(config, params, tokens, labels, ops=timed)
    print(timed.report())

TimedOps forwards every attribute to the wrapped table; each leaf operator (and optimizer kernel) call is timed with
time.perf_counter and time.process_time (CPU time of the whole process, all threads; steadier than wall time on a
shared machine) and summed per operator name.
"""

from __future__ import annotations

import time
from collections import defaultdict

from trinity.reference.model.ops import LEAF_OPS

__all__ = ["TimedOps", "OP_NAMES", "OPTIMIZER_KERNELS"]

OPTIMIZER_KERNELS = ("newton_schulz", "adamw_update", "sum_of_squares", "scaled")

OP_NAMES = tuple(name for names in LEAF_OPS.values() for name in names) + OPTIMIZER_KERNELS


class TimedOps:
    """A timing wrapper around an op table (same names and signatures)."""

    def __init__(self, table):
        self._table = table
        self.name = table.name
        self.xp = table.xp
        self.wall = defaultdict(float)
        self.cpu = defaultdict(float)
        self.calls = defaultdict(int)

    def scope(self, name):
        return self._table.scope(name)

    def reset(self):
        self.wall.clear()
        self.cpu.clear()
        self.calls.clear()

    def __getattr__(self, name):
        fn = getattr(self._table, name)
        if name not in OP_NAMES:
            return fn

        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - w
                self.cpu[name] += time.process_time() - c
                self.calls[name] += 1
        return timed

    def report(self, total_wall=None) -> str:
        """A table of operators by wall time: calls, wall s, CPU s, and share of total_wall (default: their sum)."""
        total = total_wall or sum(self.wall.values()) or 1.0
        lines = [f"{'operator':24s} {'calls':>6s} {'wall s':>8s} {'cpu s':>8s} {'share':>6s}"]
        for name in sorted(self.wall, key=self.wall.get, reverse=True):
            lines.append(f"{name:24s} {self.calls[name]:6d} {self.wall[name]:8.3f} {self.cpu[name]:8.3f} "
                         f"{self.wall[name] / total:6.1%}")
        lines.append(f"{'(sum of operators)':24s} {'':6s} {sum(self.wall.values()):8.3f} {sum(self.cpu.values()):8.3f}")
        return "\n".join(lines)
