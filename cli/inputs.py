"""Checks of command-line input, run before any work (every subcommand's usage errors; `trinity simulate`'s and
`trinity plan`'s numbers and output files).

- `one_line_errors(parser)`: argparse's own errors (a missing option, a value its `type=` refuses) become one line,
  `trinity <cmd>: error: …`, exit status 2, without the usage text (the project's rule for every user error); under
  an MPI launcher only rank 0 prints it (every rank parses the same command line, so every rank refuses alike).
  `build_parser` (cli/main.py) applies it to every parser.
- `whole(low, high)` and `number(low, high)`: argparse `type=` functions for an integer in [low, high] and a finite
  float in its range; NaN, infinity and out-of-range values are refused naming the range.
- `check_output_file(path, option)`: an output file (`--trace`, `--json`, `--png`) can be written where it is to go:
  not a folder, its folder exists and takes a new file. Nothing is created or changed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile

from .common import CLIError

__all__ = ["one_line_errors", "whole", "number", "check_output_file"]


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser`'s usage errors one line on stderr, `<prog>: error: <message>`, and exit status 2."""
    def error(message: str):
        if _launched_rank() in (None, 0):
            print(f"{parser.prog}: error: {' '.join(str(message).splitlines())}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def _launched_rank(environ=None) -> int | None:
    """This process's rank as an MPI launcher declares it in the environment (before MPI is started), or None."""
    env = os.environ if environ is None else environ
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def _count(n: float) -> str:
    """1000000 → "1,000,000", 1e6 → "1,000,000", 0.5 → "0.5"."""
    return f"{int(n):,}" if float(n).is_integer() else f"{n:g}"


def whole(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (high None: no upper limit)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            limit = f"at least {_count(low)}" if high is None else f"from {_count(low)} to {_count(high)}"
            raise argparse.ArgumentTypeError(f"{text!r}: must be {limit}")
        return value

    parse.__name__ = "whole number"
    return parse


def number(low: float, high: float = math.inf, *, above: bool = False):
    """An argparse type: a finite float >= low (> low with `above`) and <= high; NaN and infinity are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
        if value < low or (above and value == low) or value > high:
            lower = f"{'above' if above else 'at least'} {_count(low)}"
            raise argparse.ArgumentTypeError(
                f"{text!r}: must be {lower}" + (f" and at most {_count(high)}" if math.isfinite(high) else ""))
        return value

    parse.__name__ = "number"
    return parse


def check_output_file(path: str, option: str, inputs=()) -> None:
    """Refuse (CLIError, one line) an output path that cannot be written: a folder, something that is not a regular
    file, a folder that does not exist or takes no new file (the file is written next to itself, then renamed); or
    one of the command's `inputs` (files, or folders whose every file is an input: a run file, its data, its metrics
    and checkpoint folder, the checkpoint or config being read), which the output would replace."""
    where = f"{option} {path}"
    if not path:
        raise CLIError(f"{option}: an empty path")
    clash = _input_at(path, inputs)
    if clash is not None:
        raise CLIError(f"{where}: would overwrite {clash}, an input of this command; write it elsewhere")
    if os.path.isdir(path):
        raise CLIError(f"{where}: is a folder")
    if os.path.lexists(path) and not os.path.exists(path):
        raise CLIError(f"{where}: is a broken symbolic link")
    if os.path.exists(path) and not os.path.isfile(path):
        raise CLIError(f"{where}: is not a regular file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{where}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CLIError(f"{where}: the folder {folder} is not writable ({e.strerror or e})") from None


def _input_at(path: str, inputs) -> str | None:
    """The input (as given) that writing `path` would replace: the same file, or a file inside an input folder."""
    target = os.path.realpath(path)
    for given in inputs:
        if not given:
            continue
        where = os.path.realpath(os.fspath(given))
        if target == where or target.startswith(where.rstrip(os.sep) + os.sep):
            return os.fspath(given)
        with contextlib.suppress(OSError):
            if os.path.exists(path) and os.path.samefile(path, given):  # a hard link to an input
                return os.fspath(given)
    return None
