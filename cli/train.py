"""`trinity train RUN.toml [--resume | --restart] [--mesh SPEC]`: train with the Trinity recipe (SPEC §6, §7, §9).

The run file names the model, data, optimizer, schedule, balancing, loss coefficients, checkpoints and logging
(see trinity.run.run_config for every key). Bad run files fail before any work, naming the key. A progress
bar shows step, loss, tokens/s and time left; every step appends one JSON line to the metrics file. `--resume`
continues from the newest checkpoint of the run that verifies, bit for bit; a folder that already holds another
run's checkpoints is refused unless `--restart` removes them.

`--mesh SPEC` sets the parallel layout, overriding the run file's [parallel] section: comma-separated name=size
pairs of the mesh dimensions dp_replicate, dp_shard, cp and ep (unnamed ones are 1; trinity.distributed.layout),
e.g. on 4 ranks, params sharded over all 4 and each MoE layer's experts split in 2 groups (ep borrows its ranks
from dp_shard·cp; it does not add ranks):

    mpiexec -n 4 python -m mpi4py -m trinity.cli train run.toml --mesh dp_shard=4,ep=2

The job needs dp_replicate·dp_shard·cp ranks; a layout that does not fit the job, the model or the batch sizes is
refused before any work with the layouts that would fit. A refusal is one line, printed once for the whole job.
`--watchdog SECONDS` ([parallel] watchdog_seconds, default 600 under mpiexec, 0: off) ends a job one of whose ranks
stopped answering: a rank that waits that long in one collective names it and aborts the job.

Exit status: 0 done; 2 a problem with the run file, --mesh, the layout, data, paths or checkpoints (one line);
3 the loss or gradient norm went non-finite (the run stopped before the update); 130 / 143 stopped by SIGINT /
SIGTERM after writing a checkpoint; 1 a rank failed (under mpiexec `rank R: …`), e.g. a message whose checksum
did not match (`--checksums` / `[parallel] checksums = true`: every message carries a crc32 checked on receipt).
"""

from __future__ import annotations

from trinity.accel import BACKENDS

from .common import CLIError, add_precision_argument, load_backend

NAME = "train"
HELP = "train a model from a TOML run file (single process)"
DIVERGED = 3  # exit status of a run stopped by a non-finite loss or gradient norm


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__.split("\n\n")[0],
                              epilog="examples: trinity train configs/tiny-synthetic.toml; "
                                     "mpiexec -n 4 python -m mpi4py -m trinity.cli train run.toml "
                                     "--mesh dp_shard=4,ep=2")
    add_run_arguments(p)
    p.add_argument("--watchdog", type=float, metavar="SECONDS",
                   help="under mpiexec, end the job when a rank waits longer than this in one collective (a hung "
                        "rank), as [parallel] watchdog_seconds; 0 turns it off (default 600 under mpiexec)")
    p.set_defaults(run=run)
    return p


def add_run_arguments(p) -> None:
    """The arguments of a training run (also `trinity simulate`'s)."""
    p.add_argument("run_file", metavar="RUN.toml", help="the run file")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint of the run that verifies")
    start.add_argument("--restart", action="store_true",
                       help="start over: remove the checkpoints and metrics the run's folders already hold")
    p.add_argument("--backend", choices=BACKENDS,
                   help="operator table, overriding [train] backend of the run file (trinity.accel.get_backend)")
    add_precision_argument(p, default=None, what="overriding [train] precision of the run file")
    p.add_argument("--mesh", metavar="SPEC",
                   help="parallel layout, overriding the run file's [parallel] section: name=size pairs of "
                        "dp_replicate, dp_shard, cp, ep (unnamed ones are 1), e.g. dp_shard=2,ep=2; the job needs "
                        "dp_replicate*dp_shard*cp ranks")
    p.add_argument("--checksums", action="store_true",
                   help="send a crc32 with every message and check it on receipt, as [parallel] checksums = true: a "
                        "corrupted message stops the run naming both ranks (trinity.distributed.checksums)")


def run(args) -> int:
    from trinity.distributed.launch import LaunchError, world
    try:
        comm = world()
    except LaunchError as e:
        raise CLIError(str(e)) from None
    return train_on(args, comm)[0]


def _run_config(args):
    """The run file with the command line's overrides (--mesh, --checksums, --backend, --watchdog); a problem is a
    CLIError (one line)."""
    import dataclasses

    from trinity.distributed.layout import Layout, LayoutError
    from trinity.run.run_config import RunConfigError, load_run_config, valid_watchdog_seconds

    watchdog = getattr(args, "watchdog", None)  # `trinity simulate` has none: virtual ranks detect deadlocks
    if watchdog is not None and not valid_watchdog_seconds(watchdog):
        raise CLIError(f"--watchdog {watchdog}: must be a number of seconds >= 0 (0: off)")
    try:
        run_config = load_run_config(args.run_file)
    except (RunConfigError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if args.mesh is not None:  # the run file's schedule options stay unless the text names them
        try:
            layout = Layout.parse(args.mesh, options=run_config.layout.options)
        except LayoutError as e:
            raise CLIError(f"--mesh: {e}") from None
        run_config = dataclasses.replace(run_config, layout=layout)
    if args.checksums:
        run_config = dataclasses.replace(run_config, checksums=True)
    if watchdog is not None:
        run_config = dataclasses.replace(run_config, watchdog_seconds=watchdog)
    if args.backend:
        load_backend(args.backend)  # an unavailable backend is named as the option's, not the run file's
        run_config = dataclasses.replace(run_config, backend=args.backend)
    if args.precision:
        from trinity.reference.model.precision import check_precision
        try:
            check_precision(args.precision, run_config.dtype)
        except ValueError as e:
            raise CLIError(f"--precision: {e}") from None
        run_config = dataclasses.replace(run_config, precision=args.precision)
    return run_config


def _refuse_together(comm, error) -> None:
    """Under a job of several ranks, a rank whose run file or options failed joins the agreement the other ranks'
    Trainers run (startup.refuse_together), so that the job prints one line, once, and ends cleanly."""
    if comm is None or comm.Get_size() == 1:
        return
    from trinity.run.run_config import RunConfigError
    from trinity.run.startup import refuse_together
    try:
        refuse_together(comm, error)
    except RunConfigError as agreed:
        raise CLIError(str(agreed), status=getattr(error, "status", 2), every_rank=True) from None


def train_on(args, comm, prepare=None):
    """Train the run of `args` as one rank of `comm` (None: one process): (exit status, the Trainer or None).
    `prepare(trainer)`, when given, is called before training (trinity simulate turns traces on there)."""
    from trinity.distributed.checksums import ChecksumError
    from trinity.distributed.layout import LayoutError
    from trinity.run.run_config import RunConfigError
    from trinity.run.trainer import Trainer, TrainingDiverged
    from trinity.reference.data.store import DataError
    from trinity.reference.model.config import ConfigError
    from trinity.reference.training.checkpoint import CheckpointError

    try:
        run_config = _run_config(args)
    except (CLIError, ConfigError) as e:
        _refuse_together(comm, e)
        raise
    try:
        trainer = Trainer(run_config, resume=args.resume, restart=args.restart, comm=comm)
        if prepare is not None:
            prepare(trainer)
        last = trainer.train()
    except (RunConfigError, LayoutError, CheckpointError, DataError, FileNotFoundError) as e:
        raise CLIError(str(e), every_rank=getattr(e, "every_rank", False)) from None
    except TrainingDiverged as e:
        raise CLIError(str(e), status=DIVERGED, every_rank=getattr(e, "every_rank", False)) from None
    except ChecksumError as e:  # the receiving rank's: the job ends naming it, like any rank's failure
        raise CLIError(f"{e}; the newest complete checkpoint is the one to resume from", status=1) from None
    if trainer.stopped_by is not None:
        return 128 + int(trainer.stopped_by), trainer
    if last is not None:
        loss = last["loss"]
        trainer.log(f"step {last['step']}: loss {loss['total']:.4f} (ce {loss['ce']:.4f}, z {loss['z']:.2e}, "
                    f"balance {loss['balance']:.2e}); checkpoints in {run_config.checkpoint_dir}; "
                    f"metrics in {run_config.metrics_path}")
    return 0, trainer
