"""Faults for a run on virtual ranks: a rank killed at a chosen step and phase (a checkpoint write included), or a
slow rank (a straggler). `trinity simulate … --fault SPEC` (repeatable):

    kill:rank=1,step=3                       rank 1 dies at its first collective of step 3
    kill:rank=2,step=2,phase=checkpoint,after=2   … at its third collective of step 2's checkpoint write
    slow:rank=0,seconds=0.01                 rank 0 waits 10 ms before every collective

A fault acts in Mesh.collective (the one door of every collective, which knows the step and phase), so it hits the
real distributed code where a real failure would. A killed rank raises RankKilled; the virtual communicator releases
every other rank and the run ends naming it, as a cluster job ends (the cluster mode's promise: a clear error
naming the rank, and the last complete checkpoint loads). Not done yet: corrupted messages with checksums.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Fault", "FaultPlan", "RankKilled", "parse_fault"]

_KINDS = {"kill": ("rank", "step", "phase", "after"), "slow": ("rank", "seconds")}


class RankKilled(RuntimeError):
    """A rank stopped by fault injection (the message names the rank, step, phase and collective)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int | None = None
    phase: str | None = None
    after: int = 0
    seconds: float = 0.0


def parse_fault(text: str) -> Fault:
    """'kill:rank=1,step=3[,phase=checkpoint][,after=2]' or 'slow:rank=0,seconds=0.01' → Fault (ValueError, one
    line, naming the bad part)."""
    kind, _, rest = text.partition(":")
    if kind not in _KINDS:
        raise ValueError(f"fault {text!r}: the kind must be one of {', '.join(_KINDS)}")
    values: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        name, _, value = part.partition("=")
        if name not in _KINDS[kind] or not value:
            raise ValueError(f"fault {text!r}: {part!r}: expected name=value with a name among "
                             f"{', '.join(_KINDS[kind])}")
        try:
            values[name] = value if name == "phase" else (float(value) if name == "seconds" else int(value))
        except ValueError:
            raise ValueError(f"fault {text!r}: {part!r} is not a number") from None
    needs = ("rank", "step") if kind == "kill" else ("rank", "seconds")
    if any(name not in values for name in needs):
        raise ValueError(f"fault {text!r}: {kind} needs {' and '.join(needs)}")
    return Fault(kind, **values)


class FaultPlan:
    """The faults of one rank; `before(mesh, kind, group)` is called by Mesh.collective before each collective."""

    def __init__(self, faults, rank: int):
        self.rank = rank
        self.faults = [f for f in faults if f.rank == rank]
        self.matched: dict = {}

    def before(self, mesh, kind: str, group: str) -> None:
        for i, f in enumerate(self.faults):
            if f.kind == "slow":
                time.sleep(f.seconds)
            elif mesh.step == f.step and (f.phase is None or mesh.phase == f.phase):
                self.matched[i] = self.matched.get(i, 0) + 1
                if self.matched[i] > f.after:
                    raise RankKilled(f"rank {self.rank} killed by fault injection at step {mesh.step} "
                                     f"({mesh.phase}, in {kind} on {group})")
