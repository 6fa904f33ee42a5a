"""`trinity train RUN.toml [--resume]`: train in one process with the Trinity recipe (SPEC §6, §7, §9).

The run file names the model, data, optimizer, schedule, balancing, loss coefficients, checkpoints and logging
(see trinity.distributed.run_config for every key). Bad run files fail before any work, naming the key. A progress
bar shows step, loss, tokens/s and time left; every step appends one JSON line to the metrics file. `--resume`
continues from the newest checkpoint in the run's checkpoint folder, bit for bit.
"""

from __future__ import annotations

from trinity.accel import BACKENDS

from .common import CLIError, load_backend

NAME = "train"
HELP = "train a model from a TOML run file (single process)"


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__.split("\n\n")[0],
                              epilog="example: trinity train configs/tiny-synthetic.toml")
    p.add_argument("run_file", metavar="RUN.toml", help="the run file")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run")
    p.add_argument("--backend", choices=BACKENDS,
                   help="operator table, overriding [train] backend of the run file (trinity.accel.get_backend)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import dataclasses

    from trinity.distributed.run_config import RunConfigError, load_run_config
    from trinity.distributed.trainer import Trainer
    from trinity.reference.checkpoint import CheckpointError

    try:
        run_config = load_run_config(args.run_file)
        if args.backend:
            load_backend(args.backend)  # an unavailable backend is named as the option's, not the run file's
            run_config = dataclasses.replace(run_config, backend=args.backend)
        trainer = Trainer(run_config, resume=args.resume)
    except (RunConfigError, CheckpointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    last = trainer.train()
    if last is not None:
        loss = last["loss"]
        print(f"step {last['step']}: loss {loss['total']:.4f} (ce {loss['ce']:.4f}, z {loss['z']:.2e}, "
              f"balance {loss['balance']:.2e}); checkpoints in {run_config.checkpoint_dir}; "
              f"metrics in {run_config.metrics_path}")
    return 0
