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
included, or a straggler; the run then ends as a cluster job does, naming the rank.

Exit status as for `trinity train`; a rank that fails is named ("rank 2: ...").
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
                   help="inject a fault (repeatable): kill:rank=R,step=S[,phase=P][,after=K] or "
                        "slow:rank=R,seconds=T (trinity.simulate.faults)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="longest wait of a rank in one collective before the run fails as hung (default 600)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from trinity.simulate.faults import FaultPlan, RankKilled, parse_fault
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
        cause = e.__cause__
        if isinstance(cause, RankKilled):
            raise CLIError(f"{cause}; the newest complete checkpoint is the one to resume from", status=1) from None
        if isinstance(cause, CLIError):
            if getattr(cause, "every_rank", False):
                raise cause from None
            raise CLIError(f"{str(e).split(':', 1)[0]}: {cause}", status=cause.status) from None
        raise
    statuses = {status for status, _ in results}
    if args.trace is not None:
        from trinity.reference.files import atomic_path
        with atomic_path(args.trace) as tmp, open(tmp, "w") as f:
            json.dump(summarise([events for _, events in results], args.ranks_per_node), f, indent=1)
    return max(statuses)
