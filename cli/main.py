"""The `trinity` command.

Each subcommand is one module `trinity.cli.<name>` that defines

    NAME = "info"                       # the subcommand word
    HELP = "one line for `trinity -h`"
    def add_parser(subparsers): ...     # add its argparse parser and `set_defaults(run=run)`
    def run(args) -> int: ...           # do the work; return the exit status

and is listed in COMMANDS below. Modules must keep their top-level imports light (heavy packages such as
mpi4py, numba or matplotlib are imported inside `run`), because `trinity -h` imports every one of them.

Errors the user can fix raise `trinity.cli.common.CLIError` (or `ConfigError`): `main` prints one line,
`trinity <cmd>: error: <message>`, on stderr and returns 2 (or the CLIError's own `status`, e.g. 3 for a training
run stopped by divergence). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from trinity.reference.model.config import ConfigError

from .common import CLIError

COMMANDS = ("info", "train", "data", "generate", "inspect", "plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trinity",
        description="Arcee Trinity / Hugging Face afmoe sparse MoE models in NumPy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__package__}.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    try:
        return int(args.run(args) or 0)
    except (CLIError, ConfigError) as e:
        print(f"trinity {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "status", 2)
    except BrokenPipeError:  # `trinity info ... | head`
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
