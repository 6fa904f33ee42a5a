"""The metrics file of a run: one JSON object per line, one line per optimizer step (and one per skipped step).

The file always reads as one run. A fresh run starts it empty; a resumed run first cuts it back to what it held
when the checkpoint was written: the first `keep_lines` readable lines (the count the checkpoint records), or, for
checkpoints that record none, the lines of steps up to the resumed one. Lines written after the checkpoint (by the
interrupted run, and written again now) and any line that is not a whole JSON object (cut short by a kill or a full
disk) are dropped, and the kept lines are written to a temporary file that replaces the old one atomically. After
any number of kills and resumes the file holds exactly the lines an uninterrupted run writes (timing aside).

A file that does not start like a metrics file (`{"step": `) is never overwritten: MetricsFileError.
"""

from __future__ import annotations

import json
import os

from trinity.reference.files import atomic_path

__all__ = ["MetricsLog", "MetricsFileError", "read_lines", "is_metrics_file"]

_SIGNATURE = b'{"step": '  # every line this module writes starts so (json.dumps keeps "step" first)


class MetricsFileError(ValueError):
    """The metrics path holds a file that is not a metrics file; it is left alone."""


def is_metrics_file(path) -> bool:
    """True for a missing or empty file and for one that starts like the lines `MetricsLog` writes."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return True
    with open(path, "rb") as f:
        return f.read(len(_SIGNATURE)) == _SIGNATURE


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
        self.path = os.path.realpath(os.fspath(path))  # a symlinked file is rewritten where it lives
        self.lines = 0  # lines in the file: what a checkpoint records to cut back to
        self._out = None

    def start(self, step: int, keep_lines: int | None = None) -> dict:
        """Cut the file back (atomically) to its first `keep_lines` readable lines, or without a count to the lines
        of steps <= `step` (nothing at step 0), and open it for appending. Returns {"dropped_lines": n,
        "dropped_unreadable": [line numbers]}. MetricsFileError if the file is not a metrics file."""
        if not is_metrics_file(self.path):
            raise MetricsFileError(f"{self.path} is not a metrics file (its first line is not a trinity metrics "
                                   f"line); refusing to overwrite it")
        kept, dropped, unreadable = [], 0, []
        if (step > 0 or keep_lines) and os.path.exists(self.path):
            good, unreadable = read_lines(self.path)
            for _, row, text in good:
                if (len(kept) < keep_lines) if keep_lines is not None else (row["step"] <= step):
                    kept.append(text)
                else:
                    dropped += 1
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
        self._out = open(self.path, "a", encoding="utf-8")
        self.lines = len(kept)
        return {"dropped_lines": dropped, "dropped_unreadable": unreadable}

    def write(self, row: dict) -> None:
        self._out.write(json.dumps(row) + "\n")
        self._out.flush()
        self.lines += 1

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
