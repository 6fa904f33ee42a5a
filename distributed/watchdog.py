"""A hung rank ends the job: a deadline on every collective a rank waits in (docs/distributed.md, "A hung rank").

Under mpiexec a rank that stops answering (SIGSTOP, a hung device, a deadlock in a library) leaves every other rank
blocked in its next collective forever. The ranks that are not hung are the ones waiting, so each rank watches
itself: the mesh arms this rank's `Watchdog` around every collective it runs (`Mesh.collective`, and the `Wait` of a
non-blocking one), and a thread checks the deadline about once a second. When a wait passes `seconds`, the watchdog
prints one line on stderr,

    rank R: no progress for S s in <collective> on group <g> (ranks …) at step N (<phase>); ending the job

and calls `comm.Abort(1)`, which makes the launcher stop every rank, the hung one included; if the abort does not end
this process within ABORT_GRACE seconds, it exits by itself (status 1). So a job with a hung rank ends within
`seconds` + about 1 s + the launcher's teardown after the other ranks reached their wait.

Time spent computing between collectives is not watched (a long step is not a hang): only waits are. The default is
WATCHDOG_DEFAULT seconds under a launcher; a single process has no collectives, and virtual ranks (trinity simulate)
have their own deadlock detection (--timeout), so neither runs a watchdog.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

__all__ = ["Watchdog", "WATCHDOG_DEFAULT", "ABORT_GRACE", "watchdog_seconds"]

WATCHDOG_DEFAULT = 600.0  # seconds in one collective under mpiexec before the job is ended
ABORT_GRACE = 10.0  # seconds an Abort may take before the watchdog ends this process itself


def watchdog_seconds(configured: float | None, comm) -> float:
    """The deadline a job over `comm` uses: the configured one (0: off), else WATCHDOG_DEFAULT, for mpi4py's
    communicators; 0 for no communicator (a single process) and for virtual ranks (they detect deadlocks
    themselves: trinity simulate --timeout)."""
    if comm is None or not type(comm).__module__.startswith("mpi4py"):
        return 0.0
    return WATCHDOG_DEFAULT if configured is None else float(configured)


class Watchdog:
    """A deadline on this rank's waits in collectives. `watch(what)` is a context manager around one wait; when a
    wait lasts longer than `seconds`, `expire(line)` runs once (default: print the line and abort the job through
    `comm`). `close()` stops the thread."""

    def __init__(self, seconds: float, rank: int, comm=None, expire=None, poll: float | None = None):
        self.seconds, self.rank, self.comm = float(seconds), rank, comm
        self._expire = expire or self._abort
        self._poll = poll if poll is not None else min(1.0, max(self.seconds / 4, 0.01))
        self._current: tuple | None = None  # (started, what): replaced as a whole, so the thread reads it atomically
        self._stop = threading.Event()
        self.fired: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"trinity-watchdog-rank-{rank}", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, what: str):
        """Arm the deadline for one wait, described by `what` (e.g. "Allreduce on group fsdp (ranks 0,1) at step 3
        (backward)"); nested waits keep the outer one's start."""
        outer = self._current
        if outer is None:
            self._current = (time.monotonic(), what)
        try:
            yield
        finally:
            self._current = outer

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            current = self._current
            if current is None:
                continue
            waited = time.monotonic() - current[0]
            if waited >= self.seconds:
                self.fired = (f"rank {self.rank}: no progress for {waited:.0f} s in {current[1]}; ending the job "
                              f"([parallel] watchdog_seconds = {self.seconds:g})")
                self._expire(self.fired)
                return

    def _abort(self, line: str) -> None:
        """Print `line` once and end the whole job (comm.Abort); exit this process if the abort does not."""
        threading.Thread(target=_exit_after, args=(ABORT_GRACE,), daemon=True).start()
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:
            pass
        from .launch import _wait_for_output_to_leave
        _wait_for_output_to_leave()
        if self.comm is not None:
            self.comm.Abort(1)
        os._exit(1)


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    os._exit(1)
