"""`trinity simulate RUN.toml --ranks N [--mesh SPEC] [--trace FILE]`: the cluster-mode trainer on N virtual ranks.

The same trainer as `trinity train` under `mpiexec`, unchanged, with trinity.simulate's virtual communicator in
place of MPI: N ranks as threads of this one process, every collective deterministic (sums in rank order). Rank 0
logs, writes the metrics and its part of the checkpoints exactly as under MPI, so a simulated run can be resumed by
`mpiexec` and the reverse. The layout is the run file's [parallel] section or --mesh; it must use N ranks.

--trace FILE writes every rank's collectives summarised per step (JSON: bytes by kind, mesh group, phase of the step
and link tier; `--ranks-per-node K` says which groups stay within a node); they are the bytes the cluster mode
counts itself (the metrics' `comm_bytes` are rank 0's). --timeout bounds any one wait of a rank in a collective, so
a layout bug that would hang a cluster fails here, naming the ranks and the collectives they wait in.

--fault SPEC injects a failure (trinity.simulate.virtual.faults): a rank killed at a step and phase, a checkpoint write
included; a message corrupted on its way to one receiver (caught, naming both ranks, when `--checksums` or
`[parallel] checksums = true` puts a crc32 on every message; unnoticed otherwise); a rank that hangs (the others'
waits exceed --timeout); or a straggler. The run then ends as a cluster job does, naming the rank.

Before any virtual rank starts, the input is checked and refused in one line (exit status 2): the run file, the
layout against --ranks and the model (with the layouts that fit; at most MAX_RANKS = 1024 virtual ranks), faults
that could never act (a rank or step beyond the run's, an unknown phase, phase=checkpoint at a step that saves
nothing; with --resume, a step at or before the checkpoint's, once the trainer loaded it), --trace's folder, and
numbers that are not finite and positive. A fault that never acted is named in one line at the end (exit status 2).
SIGINT/SIGTERM end the run as they end `trinity train`: the signal reaches the main thread, every rank stops after
the same step (the trainer's stop agreement), writes the checkpoint, and the exit status is 130/143; a second signal
exits at once; ranks that cannot reach the step's end (a hung rank) are abandoned after GRACE seconds, one line.

Exit status as for `trinity train`; a run that fails prints one line: the rank that failed ("rank 2: ..."), or for a
deadlock every rank and the collective it is blocked in.
"""

from __future__ import annotations

import json
import signal

from .common import CLIError
from .inputs import check_output_file, number, one_line_errors, whole
from .train import add_run_arguments, train_on

NAME = "simulate"
HELP = "train on N virtual ranks in this process (the cluster mode without MPI), with traffic traces"
MAX_RANKS = 1024  # virtual ranks are threads of one process, each holding its own state: more is a job for `plan`
MAX_TIMEOUT = 1e6  # seconds (11.6 days): longer waits are no bound


def add_parser(subparsers):
    p = one_line_errors(subparsers.add_parser(
        NAME, help=HELP, description=__doc__.split("\n\n")[0],
        epilog="example: trinity simulate run.toml --ranks 4 --mesh dp_shard=2,ep=2,cp=2 --trace trace.json"))
    add_run_arguments(p)
    p.add_argument("--ranks", type=whole(1, MAX_RANKS), required=True,
                   help=f"number of virtual ranks (the layout's world size; at most {MAX_RANKS})")
    p.add_argument("--trace", metavar="FILE", help="write the per-step traffic of every rank as JSON")
    p.add_argument("--ranks-per-node", type=whole(1), default=8, metavar="K",
                   help="ranks per node for the trace's link tiers (default 8)")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault (repeatable): kill|corrupt|hang:rank=R,step=S[,phase=P][,after=K] (a rank "
                        "dies, sends one corrupted message, stops calling collectives at its (K+1)-th collective of "
                        "step S) or slow:rank=R,seconds=T (trinity.simulate.virtual.faults)")
    p.add_argument("--timeout", type=number(0, MAX_TIMEOUT, above=True), default=600.0, metavar="S",
                   help="longest wait of a rank in one collective before the run fails as hung (default 600)")
    p.set_defaults(run=run)
    return p


GRACE = 5.0  # seconds after a signal for ranks that cannot reach a step boundary (a hung rank) before the run ends
NEVER_ACTED = 2  # the exit status of a run in which a fault never acted


def run(args) -> int:
    from trinity.run.preemption import PreemptionGuard
    from trinity.simulate.virtual.faults import FaultPlan, never_acted, spec
    from trinity.simulate.virtual.traces import summarise
    from trinity.simulate.virtual.virtual_comm import Abandoned, RankFailed, VirtualCluster

    faults = check_job(args)
    guard = PreemptionGuard()  # the signal reaches this (main) thread; every rank reads it after each step
    plans: list = []

    def prepare(trainer):
        stop_after_step(trainer, guard)
        refuse_faults_before_resume_point(trainer, faults)
        if not hasattr(trainer.mesh, "events"):  # one rank, no layout: the single process
            return
        trainer.mesh.record = args.trace is not None
        if faults:
            trainer.mesh.faults = FaultPlan(faults, trainer.rank)
            plans.append(trainer.mesh.faults)

    def rank(comm):
        status, trainer = train_on(args, comm, prepare)
        return status, list(getattr(trainer.mesh, "events", []))

    def give_up():
        return None if guard.signum is None else f"stopped by {signal.Signals(guard.signum).name}"

    try:
        with guard:
            results = VirtualCluster(args.ranks, timeout=args.timeout, give_up=give_up, grace=GRACE).run(rank)
    except Abandoned as e:
        raise CLIError(str(e), status=128 + int(guard.signum)) from None
    except RankFailed as e:
        error = _one_line(e, corrupted=any(f.kind == "corrupt" for plan in plans for f in plan.acted))
        if error is None:  # a bug: keep the traceback of the rank's exception
            raise
        raise error from None
    status = max(status for status, _ in results)
    if args.trace is not None:
        write_trace(args.trace, summarise([events for _, events in results], args.ranks_per_node))
    unused = never_acted(faults, plans)
    if status == 0 and unused:
        raise CLIError(f"--fault: {', '.join(map(spec, unused))}: never acted (the run ended without reaching "
                       f"it); the run itself completed", status=NEVER_ACTED)
    return status


def refuse_faults_before_resume_point(trainer, faults) -> None:
    """A resumed run starts after the checkpoint's step, known once the trainer loaded it (before any step): a
    fault at or before that step is refused on every rank alike, one line, exit 2; the run folder is left as it
    was (the trainer gives its lock back)."""
    from trinity.simulate.virtual.faults import check_resumed

    try:
        check_resumed(faults, trainer.step)
    except ValueError as e:
        trainer.close()
        raise CLIError(str(e), every_rank=True) from None


def check_job(args) -> list:
    """Everything `simulate` can refuse before a virtual rank starts (CLIError, one line): the faults, the trace's
    path, the run file, the layout against --ranks and the model, faults that could never act in this run. Returns
    the parsed faults."""
    from trinity.distributed.layout import Layout, LayoutError
    from trinity.run.run_config import RunConfigError, load_run_config
    from trinity.simulate.virtual.faults import check_faults, parse_fault

    try:
        faults = [parse_fault(text) for text in args.fault]
    except ValueError as e:
        raise CLIError(f"--fault: {e}") from None
    try:
        run_config = load_run_config(args.run_file)
    except RunConfigError as e:
        raise CLIError(str(e)) from None
    if args.trace is not None:
        check_output_file(args.trace, "--trace", run_inputs(args.run_file, run_config))
    layout = run_config.layout
    if args.mesh is not None:
        try:
            layout = Layout.parse(args.mesh, options=run_config.layout.options)
        except LayoutError as e:
            raise CLIError(f"--mesh: {e}") from None
    _check_layout(run_config, layout, args.ranks, given=args.mesh is not None or layout.sizes != Layout())
    try:
        check_faults(faults, args.ranks, run_config.steps, run_config.checkpoint_every)
    except ValueError as e:
        raise CLIError(f"--fault: {e}") from None
    return faults


def _check_layout(run_config, layout, ranks: int, given: bool) -> None:
    """Refuse a layout that cannot run on `ranks` virtual ranks (Layout.check: the rules of `trinity train`, with
    the layouts that fit), before any thread starts. Without the model's config at hand (a config.json that does
    not load: the trainer names that problem itself) only the world size is checked."""
    from trinity.distributed.layout import LayoutError
    from trinity.run.startup import NO_LAYOUT_HINT

    config = _model_config(run_config)
    hint = "" if given else NO_LAYOUT_HINT
    try:
        if config is None:
            if layout.world_size != ranks:
                raise LayoutError(f"layout {layout}: dp_replicate·dp_shard·cp = {layout.world_size}, but --ranks "
                                  f"is {ranks}")
        else:
            layout.check(world_size=ranks, config=config, seq_len=run_config.seq_len,
                         micro_batch_size=run_config.micro_batch_size, batch_sizes=run_config.batch_sizes)
    except LayoutError as e:
        raise CLIError(f"{e}{hint}") from None


def run_inputs(run_file: str, run) -> list:
    """What a run reads or keeps, which no output of `simulate` may replace: the run file, its model source, data,
    metrics file, checkpoint folder and export folder."""
    model = run.model_source[1] if run.model_source[0] != "preset" else None
    return [run_file, model, run.data_path, *run.data_sources, run.metrics_path, run.checkpoint_dir, run.hf_export]


def _model_config(run_config):
    """The Config the run trains, or None when it cannot be built here: the trainer then reports why, naming the run
    file's key."""
    from trinity.run.run_config import RunConfigError
    from trinity.run.startup import model_config

    try:
        return model_config(run_config)
    except RunConfigError:
        return None


def stop_after_step(trainer, guard) -> None:
    """Make a virtual rank's trainer stop as `trinity train` does on SIGINT/SIGTERM. The signal reaches the main
    thread (`guard`), never a rank's thread, so each rank reads it at its step boundary; the trainer's stop agreement
    (a maximum over every rank, once per step) then has every rank stop after the same step, write the checkpoint
    and return 128 + the signal."""
    trainer.stop_requested = lambda: guard.signum


def write_trace(path: str, summary: dict) -> None:
    """Write the trace atomically (its folder was checked before the run; a full disk is still one line)."""
    from trinity.reference.files import atomic_path

    try:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
    except OSError as e:
        raise CLIError(f"--trace {path}: cannot write ({e.strerror or e}); the run itself completed") from None


def _one_line(failed, corrupted: bool = False) -> CLIError | None:
    """The CLIError (one line, no traceback) for a virtual rank's failure: a fault, a user error, a deadlock, ranks
    calling different collectives, an Abort, any failure after an injected corruption went out (the unchecked run
    failing in its own way: bytes that no longer parse, say); None for anything else (a bug, which keeps its
    traceback)."""
    from trinity.simulate.virtual.faults import RankKilled
    from trinity.simulate.virtual.virtual_comm import Aborted, CollectiveMismatch, DeadlockError

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
    if corrupted:
        return CLIError(f"{rank}: {type(cause).__name__}: {cause} (after the injected corruption; --checksums "
                        f"would have named the message)", status=1)
    return None
