"""Preemption: SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before they kill a job) end a training
run with a checkpoint instead of losing the work since the last one.

The first signal only sets a flag: the trainer finishes the optimizer step under way, writes a checkpoint, says
where it is, and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal exits at
once with that status (an atomic checkpoint write in progress leaves only a temporary file; the previous
checkpoints are untouched). Handlers are installed only in the main thread and restored on exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["PreemptionGuard"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PreemptionGuard:
    """`with PreemptionGuard(log) as guard:` ... `if guard.signum: save and stop`."""

    def __init__(self, log=print):
        self.log = log
        self.signum: int | None = None
        self._previous = {}

    @property
    def exit_status(self) -> int | None:
        return None if self.signum is None else 128 + self.signum

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"trinity: second {name}: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"trinity: {name} received: finishing this step and writing a checkpoint (send it again to exit "
              f"at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
