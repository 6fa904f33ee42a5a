"""The metrics file of a run: one JSON object per line, one line per optimizer step (and one per skipped step).

The file always reads as one run. A fresh run starts it empty; a resumed run first cuts it back to the resumed
step: the lines of steps after the checkpoint (written by the interrupted run, and written again now) and any line
that is not a whole JSON object (cut short by a kill or a full disk) are dropped, and the kept lines are written
to a temporary file that replaces the old one atomically. After any number of kills and resumes the file holds
exactly the lines an uninterrupted run writes (their timing fields aside).
"""

from __future__ import annotations

import json
import os

from trinity.reference.checkpoint import atomic_path

__all__ = ["MetricsLog", "read_lines"]


def read_lines(path) -> tuple[list[tuple[int, dict, str]], list[int]]:
    """([(line number, object, text)] for each line holding a JSON object with an integer "step",
    [numbers of the other, unreadable lines]); line numbers count from 1."""
    good, bad = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
                row = json.loads(text)
            except (UnicodeDecodeError, ValueError):
                bad.append(number)
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if not text.endswith("\n") or not isinstance(step, int) or isinstance(step, bool):
                bad.append(number)
                continue
            good.append((number, row, text))
    return good, bad


class MetricsLog:
    """Appends one JSON line per step to `path`, flushed at once. `start(step)` opens it for a run at `step`
    (0: a new run) and returns what it dropped; raises OSError when the file cannot be read or written."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._out = None

    def start(self, step: int) -> dict:
        """Cut the file back to the lines of steps <= `step` (atomically) and open it for appending. Returns
        {"dropped_steps": n, "dropped_unreadable": [line numbers]}."""
        kept, dropped, unreadable = [], 0, []
        if step > 0 and os.path.exists(self.path):
            good, unreadable = read_lines(self.path)
            for _, row, text in good:
                if row["step"] <= step:
                    kept.append(text)
                else:
                    dropped += 1
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
        self._out = open(self.path, "a", encoding="utf-8")
        return {"dropped_steps": dropped, "dropped_unreadable": unreadable}

    def write(self, row: dict) -> None:
        self._out.write(json.dumps(row) + "\n")
        self._out.flush()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
