"""Faults for a run on virtual ranks. `trinity simulate … --fault SPEC` (repeatable):

    kill:rank=1,step=3                       rank 1 dies at its first collective of step 3
    kill:rank=2,step=2,phase=checkpoint,after=2   … at its third collective of step 2's checkpoint write
    corrupt:rank=1,step=2[,phase=P][,after=K]     the data rank 1 sends in that collective reaches one other rank
                                             with a bit flipped, as over a faulty link
    hang:rank=1,step=2[,phase=P][,after=K]   rank 1 stops calling collectives there, as a hung process
    slow:rank=0,seconds=0.01                 rank 0 waits 10 ms before every collective

A fault acts in Mesh.collective (the one door of every collective, which knows the step and phase), so it hits the
real distributed code where a real failure would; kill, corrupt and hang act once, at the (K+1)-th collective of
step S (of phase P, when given: forward, backward, reductions, optimizer, metrics, checkpoint, control).
A fault that could never act is refused before the run, in one line: a negative rank or `after`, step 0, an
unknown phase (parse_fault), a rank or step beyond the run's (check_faults).

- kill: the rank raises RankKilled; the virtual communicator releases every other rank and the run ends naming it,
  as a cluster job ends (the cluster mode's promise: a clear error naming the rank, and the last complete
  checkpoint loads).
- corrupt: the virtual communicator flips a bit in every value of the copy of the rank's data that one receiver
  gets (the first rank after it, in group order, that reads any; the sender's buffers stay intact): floats, or the
  bytes of a checksummed message; integer messages leave it pending for the next (VirtualComm.corrupt_next_send). With checksums on
  (`[parallel] checksums = true` or `--checksums`, trinity.distributed.checksums) the receiver's check names the
  sender, the receiver, the collective, the group, the step and the phase, and the run ends; without them the
  corruption goes through silently and changes the result (every value: a gathered embedding is read only at a
  batch's tokens, so one flipped row changed nothing), or breaks the run in its own way (one line). phase=control
  is refused: the stop agreement's whole number survives a flipped mantissa bit.
A fault that never acted (`after` past the step's collectives, say) is named when the run ends, exit status 2
(trinity simulate; never_acted).
- hang: the rank blocks until another rank fails; the ranks waiting for it exceed `--timeout` and the run ends
  with DeadlockError naming every rank and the collective it is blocked in.
- slow: a straggler; nothing changes but the time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

__all__ = ["Fault", "FaultPlan", "RankKilled", "parse_fault", "check_faults", "check_resumed", "never_acted", "spec",
           "PHASES"]

# The phases of a step a fault can name: Mesh.set_phase's values (the step's seams, the trainer's checkpoint write and
# its stop agreement, "control").
PHASES = ("forward", "backward", "reductions", "optimizer", "metrics", "checkpoint", "control")
MAX_SLOW_SECONDS = 60.0  # a straggler's wait before every collective: more would only make a run take hours

_AT = ("rank", "step", "phase", "after")  # the fields of a fault that acts once, at a chosen collective
_KINDS = {"kill": _AT, "corrupt": _AT, "hang": _AT, "slow": ("rank", "seconds")}


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
    """'kill:rank=1,step=3[,phase=checkpoint][,after=2]' (corrupt and hang alike) or 'slow:rank=0,seconds=0.01' →
    Fault (ValueError, one line, naming the bad part)."""
    kind, _, rest = text.partition(":")
    if kind not in _KINDS:
        raise ValueError(f"fault {text!r}: the kind must be one of {', '.join(_KINDS)}")
    values: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        name, _, value = part.partition("=")
        if name not in _KINDS[kind] or not value:
            raise ValueError(f"fault {text!r}: {part!r}: expected name=value with a name among "
                             f"{', '.join(_KINDS[kind])}")
        if name in values:
            raise ValueError(f"fault {text!r}: {name} given twice")
        try:
            values[name] = value if name == "phase" else (float(value) if name == "seconds" else int(value))
        except ValueError:
            raise ValueError(f"fault {text!r}: {part!r} is not a number") from None
    needs = ("rank", "seconds") if kind == "slow" else ("rank", "step")
    if any(name not in values for name in needs):
        raise ValueError(f"fault {text!r}: {kind} needs {' and '.join(needs)}")
    why = _never_valid(values)
    if kind == "corrupt" and values.get("phase") == "control":
        why = ("a corruption in phase control could change nothing: the stop agreement's value is a whole number "
               "that a flipped mantissa bit leaves as it is")
    if why:
        raise ValueError(f"fault {text!r}: {why}")
    return Fault(kind, **values)


def _never_valid(values: dict) -> str | None:
    """Why a fault's values could not act in any run (a negative rank, step 0, an unknown phase, …), or None."""
    if values["rank"] < 0:
        return "rank must be 0 or more"
    if "step" in values and values["step"] < 1:
        return "step must be 1 or more (steps count from 1)"
    if values.get("after", 0) < 0:
        return "after must be 0 or more"
    if values.get("phase", PHASES[0]) not in PHASES:
        return f"phase {values['phase']!r} is none of {', '.join(PHASES)}"
    seconds = values.get("seconds", 0.0)
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_SLOW_SECONDS):
        return f"seconds must be from 0 to {MAX_SLOW_SECONDS:g}"
    return None


def check_faults(faults, ranks: int, steps: int, checkpoint_every: int | None = None) -> None:
    """Refuse (ValueError, one line) a fault that cannot act in a run of `ranks` ranks and `steps` steps: a rank
    beyond the ranks, a step beyond the run's last, phase=checkpoint at a step that writes no checkpoint (one every
    `checkpoint_every` steps and at the last; a signal's early checkpoint is no plan)."""
    for f in faults:
        if f.rank >= ranks:
            raise ValueError(f"{f.kind} fault at rank {f.rank}: the run has ranks 0 to {ranks - 1}")
        if f.step is not None and f.step > steps:
            raise ValueError(f"{f.kind} fault at step {f.step}: the run ends at step {steps} ([train] steps)")
        if (f.phase == "checkpoint" and checkpoint_every is not None and f.step % checkpoint_every
                and f.step != steps):
            raise ValueError(f"{spec(f)}: step {f.step} writes no checkpoint (one every {checkpoint_every} steps, "
                             f"[checkpoint] every, and at step {steps})")


def check_resumed(faults, step: int) -> None:
    """Refuse (ValueError, one line) a fault at or before `step`, the step a resumed run starts after."""
    for f in faults:
        if f.step is not None and f.step <= step:
            raise ValueError(f"--fault: {spec(f)}: the run resumes after step {step}, so step {f.step} never runs")


def spec(f: Fault) -> str:
    """The fault as a --fault SPEC."""
    if f.kind == "slow":
        return f"slow:rank={f.rank},seconds={f.seconds:g}"
    return (f"{f.kind}:rank={f.rank},step={f.step}" + (f",phase={f.phase}" if f.phase else "")
            + (f",after={f.after}" if f.after else ""))


def never_acted(faults, plans) -> list:
    """The faults that no rank's FaultPlan acted on (a step with fewer collectives than `after`, a phase a step did
    not reach, a corruption with no data of floats left to go into, a run of one process)."""
    acted = {f for plan in plans for f in plan.acted}
    return [f for f in faults if f not in acted]


class FaultPlan:
    """The faults of one rank; `before(mesh, kind, group)` is called by Mesh.collective before each collective.
    Corrupt and hang need the virtual communicator's fault methods (VirtualComm.corrupt_next_send, .hang).
    `acted`: the faults that acted (a corruption once it went out)."""

    def __init__(self, faults, rank: int):
        self.rank = rank
        self.faults = [f for f in faults if f.rank == rank]
        self.matched: dict = {}
        self.done: set = set()  # the faults that were due (each is due once)
        self.acted: set = set()

    def before(self, mesh, kind: str, group: str) -> None:
        for i, f in enumerate(self.faults):
            if f.kind == "slow":
                self.acted.add(f)
                time.sleep(f.seconds)
            elif i not in self.done and self._due(i, f, mesh):
                self.done.add(i)
                self._act(f, mesh, kind, group)

    def _due(self, i: int, f: Fault, mesh) -> bool:
        """Whether this collective is the (after+1)-th of the fault's step (and phase)."""
        if mesh.step != f.step or (f.phase is not None and mesh.phase != f.phase):
            return False
        self.matched[i] = self.matched.get(i, 0) + 1
        return self.matched[i] > f.after

    def _act(self, f: Fault, mesh, kind: str, group: str) -> None:
        where = f"at step {mesh.step} ({mesh.phase}, in {kind} on {group})"
        if f.kind == "corrupt":
            mesh.groups[group].corrupt_next_send(lambda: self.acted.add(f))
            return
        self.acted.add(f)
        if f.kind == "kill":
            raise RankKilled(f"rank {self.rank} killed by fault injection {where}")
        mesh.groups[group].hang(f"hung by fault injection {where}")
