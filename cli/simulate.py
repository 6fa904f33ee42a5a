"""`trinity simulate RUN.toml --ranks N [--mesh SPEC] [--trace FILE]`: the cluster-mode trainer on N virtual ranks.

The same trainer as `trinity train` under `mpiexec`, unchanged, with trinity.simulate's virtual communicator in
place of MPI: N ranks as threads of this one process, every collective deterministic (sums in rank order). Rank 0
logs, writes the metrics and its part of the checkpoints exactly as under MPI, so a simulated run can be resumed by
`mpiexec` and the reverse. The layout is the run file's [parallel] section or --mesh; it must use N ranks.

--trace FILE writes every rank's collectives summarised per step (JSON: bytes by kind, mesh group, phase of the step
and link tier; `--ranks-per-node K` says which groups stay within a node); they are the bytes the cluster mode
counts itself (the metrics' `comm_bytes` are rank 0's). --timeout bounds any one wait of a rank in a collective, so
a layout bug that would hang a cluster fails here, naming the ranks and the collectives they wait in.

--fault SPEC injects a failure (trinity.simulate.faults): a rank killed at a step and phase, a checkpoint write
included; a message corrupted on its way to one receiver (caught, naming both ranks, when `--checksums` or
`[parallel] checksums = true` puts a crc32 on every message; unnoticed otherwise); a rank that hangs (the others'
waits exceed --timeout); or a straggler. The run then ends as a cluster job does, naming the rank.

Exit status as for `trinity train`; a run that fails prints one line: the rank that failed ("rank 2: ..."), or for a
deadlock every rank and the collective it is blocked in.
"""

from __future__ import annotations

import json

from .common import CLIError
from .train import add_run_arguments, train_on

NAME = "simulate"
HELP = "train on N virtual ranks in this process (the cluster mode without MPI), with traffic traces"


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__.split("\n\n")[0],
                              epilog="example: trinity simulate run.toml --ranks 4 --mesh dp_shard=2,ep=2,cp=2 "
                                     "--trace trace.json")
    add_run_arguments(p)
    p.add_argument("--ranks", type=int, required=True, help="number of virtual ranks (the layout's world size)")
    p.add_argument("--trace", metavar="FILE", help="write the per-step traffic of every rank as JSON")
    p.add_argument("--ranks-per-node", type=int, default=8, metavar="K",
                   help="ranks per node for the trace's link tiers (default 8)")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault (repeatable): kill|corrupt|hang:rank=R,step=S[,phase=P][,after=K] (a rank "
                        "dies, sends one corrupted message, stops calling collectives at its (K+1)-th collective of "
                        "step S) or slow:rank=R,seconds=T (trinity.simulate.faults)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="longest wait of a rank in one collective before the run fails as hung (default 600)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from trinity.simulate.faults import FaultPlan, parse_fault
    from trinity.simulate.traces import summarise
    from trinity.simulate.virtual_comm import RankFailed, VirtualCluster

    if args.ranks < 1 or args.ranks_per_node < 1:
        raise CLIError(f"--ranks {args.ranks} / --ranks-per-node {args.ranks_per_node}: must be positive")
    try:
        faults = [parse_fault(text) for text in args.fault]
    except ValueError as e:
        raise CLIError(f"--fault: {e}") from None

    def prepare(trainer):
        if not hasattr(trainer.mesh, "events"):  # one rank, no layout: the single process
            return
        trainer.mesh.record = args.trace is not None
        trainer.mesh.faults = FaultPlan(faults, trainer.rank) if faults else None

    def rank(comm):
        status, trainer = train_on(args, comm, prepare)
        return status, list(getattr(trainer.mesh, "events", []))

    try:
        results = VirtualCluster(args.ranks, timeout=args.timeout).run(rank)
    except RankFailed as e:
        error = _one_line(e)
        if error is None:  # a bug: keep the traceback of the rank's exception
            raise
        raise error from None
    statuses = {status for status, _ in results}
    if args.trace is not None:
        from trinity.reference.files import atomic_path
        with atomic_path(args.trace) as tmp, open(tmp, "w") as f:
            json.dump(summarise([events for _, events in results], args.ranks_per_node), f, indent=1)
    return max(statuses)


def _one_line(failed) -> CLIError | None:
    """The CLIError (one line, no traceback) for a virtual rank's failure: a fault, a user error, a deadlock, ranks
    calling different collectives, an Abort; None for anything else (a bug, which keeps its traceback)."""
    from trinity.simulate.faults import RankKilled
    from trinity.simulate.virtual_comm import Aborted, CollectiveMismatch, DeadlockError

    cause, rank = failed.__cause__, str(failed).split(" failed", 1)[0]
    if isinstance(cause, RankKilled):
        return CLIError(f"{cause}; the newest complete checkpoint is the one to resume from", status=1)
    if isinstance(cause, CLIError):
        return cause if cause.every_rank else CLIError(f"{rank}: {cause}", status=cause.status)
    if isinstance(cause, DeadlockError):
        return CLIError(str(cause), status=1)
    if isinstance(cause, CollectiveMismatch):
        return CLIError(f"collective mismatch: {cause}", status=1)
    if isinstance(cause, Aborted):
        return CLIError(str(cause), status=cause.errorcode or 1)
    return None
