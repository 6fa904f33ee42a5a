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

Under an MPI launcher with more than one rank (`mpiexec -n 4 python -m mpi4py -m trinity.cli ...`,
trinity.distributed.launch.world()), an error on any rank must end the whole job, because the other ranks may be
blocked in a collective waiting for it: a CLIError / ConfigError prints `rank R: trinity <cmd>: error: <message>`,
any other exception its traceback and then `rank R: trinity <cmd>: <Type>: <message>`, and the rank calls
`Abort(status)` (launch.fail_job), so the launcher stops every rank and exits non-zero within seconds. On success
every rank returns normally. In a single process (no launcher, or a job of one rank) nothing changes. Each rank runs
supervised (launch.supervise): a rank killed by the system is named by its supervisor.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from trinity.distributed.launch import LaunchError, end_together, fail_job, supervise, world
from trinity.reference.model.config import ConfigError

from .common import CLIError
from .inputs import one_line_errors

COMMANDS = ("info", "train", "simulate", "plan", "data", "generate", "inspect", "plot", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trinity",
        description="Arcee Trinity / Hugging Face afmoe sparse MoE models in NumPy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__package__}.{name}")
        module.add_parser(sub)
    _every_parser(parser, one_line_errors)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of `trinity <command>` (for `trinity data`, the parser of `data` itself)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def _every_parser(parser: argparse.ArgumentParser, apply) -> None:
    """`apply` to `parser` and to every subcommand's parser below it (`trinity data prepare` is two levels down)."""
    apply(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _every_parser(child, apply)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # usage errors: one line, exit 2 (rank 0 prints: cli/inputs.py)
    if extra:  # named by the subcommand that was given them, as its other usage errors are
        _subcommand_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        comm = world()  # None in a plain single process: mpi4py is not imported
    except LaunchError as e:
        print(f"trinity {args.command}: error: {e}", file=sys.stderr)
        return 2
    if comm is not None and comm.Get_size() > 1:
        return _run_on_ranks(args, comm)
    return _run(args)


def _run(args) -> int:
    """One process: errors the user can fix are one line and their status; anything else raises (traceback)."""
    try:
        return int(args.run(args) or 0)
    except (CLIError, ConfigError) as e:
        print(f"trinity {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "status", 2)
    except BrokenPipeError:  # `trinity info ... | head`
        return 0
    except KeyboardInterrupt:
        return 130


def _run_on_ranks(args, comm) -> int:
    """One rank of a job of several: the same subcommand, but any error ends the whole job through fail_job
    (comm.Abort), naming this rank, so that no other rank hangs in a collective waiting for it."""
    rank = comm.Get_rank()
    where = f"trinity {args.command}"
    try:
        status = int(args.run(args) or 0)
        # every rank returns the same status (e.g. 143 after an agreed preemption): end together, without an abort
        return status if status == 0 else end_together(comm, rank, None, status)
    except (CLIError, ConfigError) as e:
        if getattr(e, "every_rank", False):
            return end_together(comm, rank, f"{where}: error: {e}", getattr(e, "status", 2))
        return fail_job(comm, rank, f"{where}: error: {e}", getattr(e, "status", 2))
    except BrokenPipeError:
        return fail_job(comm, rank, f"{where}: output closed (broken pipe)", 1)
    except KeyboardInterrupt:
        return fail_job(comm, rank, f"{where}: interrupted", 130)
    except SystemExit as e:
        if e.code is None or e.code == 0:
            raise
        status = e.code if isinstance(e.code, int) else 1
        return fail_job(comm, rank, f"{where}: exited with status {e.code}", status)
    except Exception as e:  # a bug: keep its traceback, then end the job
        traceback.print_exc()
        sys.stderr.flush()
        message = " ".join(str(e).splitlines())
        return fail_job(comm, rank, f"{where}: {type(e).__name__}: {message} (traceback above)", 1)


def entry() -> int:
    """The program's entry point (the `trinity` script, `python -m trinity.cli`): under an MPI launcher this process
    becomes the rank's supervisor and the command runs in its child (launch.supervise); else `main`."""
    status = supervise()
    return main() if status is None else status


if __name__ == "__main__":
    sys.exit(entry())
