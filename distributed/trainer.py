"""The trainer: the Trinity recipe step by step, resumable bit for bit (SPEC §6, §7, §9; docs/architecture.md).

One optimizer step:
  1. sequences_per_step / micro_batch_size micro-batches: forward + backward each, gradients averaged, expert
     counts summed (SPEC §14 #8);
  2. global-norm gradient clipping;
  3. the load-balancing update of every expert_bias, once, before the parameter update (SPEC §6.1);
  4. Muon on hidden matrices and AdamW on embedding, head and gains, at the scheduled learning rates (SPEC §9);
  5. one metrics line (JSONL), the progress bar, and a checkpoint every `every` steps and at the end.

This is the single-process trainer; the distributed layouts will inject their communicators into the same loop.
State that makes a run resumable: params (expert_bias included), optimizer state, balancing state, step,
tokens seen, skipped steps, the data loader's position and the RNG. A run stopped at any moment and resumed from its
latest checkpoint ends with the same bits as a run that was never stopped.

What a run survives (docs/architecture.md, "Run safety"):
  - divergence: a non-finite loss or gradient norm is caught before the balancing and optimizer updates; by default
    the run stops (TrainingDiverged, exit 3) naming the step and the checkpoint to resume from, or with
    `[train] on_nonfinite = "skip"` the step is skipped (counted in the metrics) up to `max_skipped_steps`;
    checkpoints never hold NaN (save_checkpoint refuses it), so retention never removes the last finite one;
  - re-runs: a run folder belongs to one run (`run_id`): without --resume, existing checkpoints or metrics are
    refused unless --restart removes them; retention deletes only the run's own checkpoints;
  - kills: metrics.jsonl is cut back to the resumed step (metrics_log.py); a corrupt newest checkpoint is skipped
    for the newest one that verifies; SIGINT/SIGTERM finish the step and checkpoint (preemption.py);
  - changed data: each checkpoint holds a fingerprint of the data and a copy of the tokenizer; resuming on other
    data is refused, naming what changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import time
import uuid

import numpy as np

from trinity.accel import BackendUnavailable, get_backend
from trinity.reference import Config, ConfigError, init_params
from trinity.reference.data.mixture import MixtureLoader
from trinity.reference.data.packing import PackedTokenLoader
from trinity.reference.data.rsdb import RSDBLoader
from trinity.reference.data.store import DataError, DocumentStore
from trinity.reference.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_record
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.checkpoint import CheckpointError, CheckpointWriteError, config_changes
from trinity.reference.training.memory import available_memory_bytes, estimate_step_bytes
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.schedules import BatchSchedule, learning_rate
from trinity.reference.training.step import LOCAL, GlobalBatch, apply_update, compute_gradients

from .layout import Layout, LayoutError
from .mesh import allgather_json
from .metrics_log import MetricsFileError, MetricsLog, is_metrics_file
from .preemption import PreemptionGuard
from .run_config import RunConfig, RunConfigError, check_output_paths
from .sharded_checkpoint import ShardedCheckpointManager

__all__ = ["Trainer", "TrainingDiverged", "FAULT_ENV", "FAULT_METRICS_ENV", "FAULT_MID_STEP_ENV", "build_loader",
           "data_fingerprint"]

# Fault injection for tests: SIGKILL this process right after the checkpoint of this step is written
# (FAULT_ENV), or right after the metrics line of this step is written (FAULT_METRICS_ENV).
FAULT_ENV = "TRINITY_FAULT_KILL_AFTER_CHECKPOINT"
FAULT_METRICS_ENV = "TRINITY_FAULT_KILL_AFTER_METRICS"
# "R:S": rank R SIGKILLs itself in the middle of step S (after its gradients, before the update): the other ranks are
# then inside a collective.
FAULT_MID_STEP_ENV = "TRINITY_FAULT_KILL_MID_STEP"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm went non-finite (or too many steps were skipped): the run stopped before the
    update, and the message names the step and the checkpoint to resume from."""


def _every_rank(error):
    """Mark an error that every rank of the job raises at the same point (the command can then end the job once and
    cleanly instead of aborting it from each rank)."""
    error.every_rank = True
    return error


def _ranges(ranks: list[int]) -> str:
    return ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}…{ranks[-1]} ({len(ranks)})"


def _base_config(run: RunConfig):
    """(Config, params or None) from the run's model source: a preset, a config.json, or an HF checkpoint. Errors
    name the [model] key."""
    kind, value = run.model_source
    if kind == "preset":
        return Config.preset(value), None
    from trinity.reference.interop.hf import CheckpointError as HFError, load_pretrained
    try:
        if kind == "config":
            return Config.from_hf(value), None
        config, params = load_pretrained(value, dtype=np.dtype(run.dtype))
    except (ConfigError, HFError, OSError, ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise RunConfigError(f"[model] {kind} = {value!r}: {e}") from None
    for key, array in params.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise RunConfigError(f"[model] init_from = {value!r}: the weights hold NaN or infinity ({key})")
    return config, params


def data_fingerprint(stores) -> list[dict]:
    """Per data source: documents, tokens and the SHA-256 of its document index (where each document starts)."""
    return [{"documents": int(s.num_documents), "tokens": int(s.num_tokens),
             "index_sha256": hashlib.sha256(np.ascontiguousarray(s.starts, dtype="<i8").tobytes()).hexdigest()}
            for s in stores]


def _data_changes(saved, now, stores) -> list[str]:
    """What differs between a checkpoint's data fingerprint and the current data's, one phrase per change."""
    if not isinstance(saved, list) or len(saved) != len(now):
        return [f"{len(now)} data source(s) now, {len(saved) if isinstance(saved, list) else '?'} in the checkpoint"]
    changes = []
    for store, old, new in zip(stores, saved, now):
        what = [f"{k} {old.get(k)} -> {new[k]}" for k in ("documents", "tokens") if old.get(k) != new[k]]
        if not what and old.get("index_sha256") != new["index_sha256"]:
            what = ["the document boundaries differ"]
        if what:
            changes.append(f"{store.path}: " + ", ".join(what))
    return changes


def _dataset_tokenizer(stores):
    """(info, tokenizer.json bytes) of the prepared datasets' tokenizer, or None when no source names one (raw
    token files). Sources with different tokenizers are refused: their ids would mean different things."""
    records = []
    for store in stores:
        if getattr(store, "meta", None) is None:
            continue
        try:
            records.append((store.path, tokenizer_record(load_tokenizer(store.path))))
        except (TokenizerError, OSError) as e:
            raise RunConfigError(f"[data] {store.path}: its tokenizer cannot be read ({e})") from None
    if len({r[1][0].get("sha256") or r[1][0]["kind"] for r in records}) > 1:
        raise RunConfigError(f"[data] sources use different tokenizers: {', '.join(p for p, _ in records)}")
    return records[0][1] if records else None


def build_loader(run: RunConfig, rank: int = 0, world_size: int = 1):
    """(loader, [DocumentStore per data source]) for the run's [data] section: a PackedTokenLoader or RSDBLoader
    over `path` (a token file or prepared directory), or a MixtureLoader of one such loader per [[data.sources]]
    with the run's phases. Ranks read disjoint documents (data/packing.py). Errors name the [data] key."""
    paths = list(run.data_sources) if run.data_sources else [run.data_path]
    stores = []
    for path in paths:
        if not os.path.exists(path):
            raise RunConfigError(f"[data] path: no such file or directory {path}")
        try:
            stores.append(DocumentStore(path, run.eos_id))
        except DataError as e:
            raise RunConfigError(f"[data] {e}") from None
    if len({s.eos_id for s in stores}) > 1:
        raise RunConfigError(f"[data] sources disagree on eos_id: {[s.eos_id for s in stores]}")

    def one(store):
        if run.data_loader == "rsdb":
            return RSDBLoader(store, run.seq_len, run.micro_batch_size, buffer_size=run.rsdb_buffer,
                              seed=run.data_seed, rank=rank, world_size=world_size)
        return PackedTokenLoader(store, run.seq_len, run.micro_batch_size, seed=run.data_seed, rank=rank,
                                 world_size=world_size)

    try:
        if not run.data_sources:
            return one(stores[0]), stores
        phases = [(start, list(w)) for start, w in run.data_phases]
        return MixtureLoader([one(s) for s in stores], phases, seed=run.data_seed, rank=rank,
                             world_size=world_size), stores
    except DataError as e:
        raise RunConfigError(f"[data] {e}") from None


class Trainer:
    """Trains the run's model. `comm` (launch.world(): mpi4py's COMM_WORLD, or a virtual communicator) makes it one
    rank of a job laid out by the run's [parallel] section (docs/distributed.md): every rank runs this same code on
    its part of each step; rank 0 alone logs, draws the progress bar and writes metrics and checkpoints."""

    def __init__(self, run: RunConfig, resume: bool = False, restart: bool = False, log=print, comm=None):
        self.run = run
        self.rank = 0 if comm is None else comm.Get_rank()
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        self.stopped_by: int | None = None  # the signal that ended `train` early (preemption), if any
        distributed = comm is not None and not (comm.Get_size() == 1 and run.layout == Layout())
        failed = None
        try:
            self._prepare(resume, restart, comm)
        except RunConfigError as e:  # under a layout every rank first learns whether any failed (_agree)
            if not distributed:
                raise
            failed = e
        self.mesh = LOCAL
        if distributed:
            self._agree(comm, failed, resume)
            self.mesh = self._build_mesh(comm)
            self._shard_state()

    def _prepare(self, resume: bool, restart: bool, comm) -> None:
        """Everything before the first collective: the run file, model, backend, layout check, data, memory, run
        folder and resume point, and the whole state (built or loaded the same way on every rank)."""
        run = self.run
        check_output_paths(run)
        base, pretrained = _base_config(run)
        self.config = config = run.build_config(base)
        try:
            backend = get_backend(run.backend)
        except BackendUnavailable as e:
            raise RunConfigError(f"[train] backend = {run.backend!r}: {e}") from None
        self.ops = backend
        self._check_layout(comm)
        self.loader, self.stores = build_loader(run)
        for store in self.stores:
            largest = store.max_token()
            if largest >= config.vocab_size:
                raise RunConfigError(f"[data] {store.path} holds token id {largest} >= vocab_size "
                                     f"{config.vocab_size}")
        memory = self._check_memory(loaded=pretrained)
        self.fingerprint = data_fingerprint(self.stores)
        self.tokenizer = _dataset_tokenizer(self.stores)
        self.batches = BatchSchedule(run.sequences_per_step, run.batch_schedule)
        try:
            self.checkpoints = ShardedCheckpointManager(run.checkpoint_dir, keep_last=run.keep_last)
        except CheckpointError as e:
            raise RunConfigError(f"[checkpoint] dir = {run.checkpoint_dir!r}: {e}") from None
        self.metrics = MetricsLog(run.metrics_path) if self.is_main else None
        if not is_metrics_file(run.metrics_path):
            raise RunConfigError(f"[logging] metrics = {run.metrics_path!r}: holds a file that is not a trinity "
                                 f"metrics file; it is left alone: choose another path")
        if not resume and self.is_main:  # rank 0 decides for the job (an error there ends every rank)
            self._claim_folder(restart)
        ckpt = self._load_resume_point(config) if resume else None
        self.resumed_from = None if ckpt is None else (ckpt.path, ckpt.step)
        self.log(memory)
        self.last_checkpoint = None if ckpt is None else ckpt.path  # the newest one this run knows to be good
        self.metrics_lines = None if ckpt is None else ckpt.extra.get("metrics_lines")
        if ckpt is not None:
            self.params, self.opt_state, self.balance_state = ckpt.params, ckpt.optimizer_state, \
                ckpt.balancing_state
            self.step, self.tokens_seen = ckpt.step, ckpt.tokens_seen
            self.skipped_steps = int(ckpt.extra.get("skipped_steps", 0))
            self.run_id = ckpt.run_id or uuid.uuid4().hex
            self.loader.load_state_dict(ckpt.data_state)
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = ckpt.rng_state
            self.log(f"resumed from {ckpt.path} at step {self.step} ({self.tokens_seen:,} tokens seen)")
            changed = config_changes(ckpt.config, config, recipe=True)
            if changed:
                self.log(f"the recipe changed since that checkpoint (checkpoint != now): {'; '.join(changed)}")
        else:
            if resume:
                self.log(f"no checkpoint in {run.checkpoint_dir}: starting from step 0")
            if pretrained is not None:
                self.params = pretrained
            else:
                self.params = init_params(config, seed=run.init_seed, dtype=np.dtype(run.dtype))
            self.opt_state = init_optimizer_state(config, self.params)
            self.balance_state = init_balancing_state(config, self.params)
            self.step, self.tokens_seen, self.skipped_steps = 0, 0, 0
            self.run_id = uuid.uuid4().hex
            self.rng = np.random.default_rng(run.init_seed)
        self.checkpoints.run_id = self.run_id

    # ---- the layout ---------------------------------------------------------------------------------------------
    def _check_layout(self, comm) -> None:
        """Refuse, before any work, a layout the job cannot run, listing those that fit (Layout.check)."""
        run = self.run
        if run.layout == Layout():
            return
        if comm is None:
            raise RunConfigError(f"[parallel] layout {run.layout} needs {run.layout.world_size} ranks, but no MPI "
                                 f"launcher started this process: mpiexec -n {run.layout.world_size} python -m mpi4py "
                                 f"-m trinity.cli train {run.path} --mesh {run.layout}")
        try:
            run.layout.check(world_size=comm.Get_size(), config=self.config, seq_len=run.seq_len,
                             micro_batch_size=run.micro_batch_size, batch_sizes=run.batch_sizes)
        except LayoutError as e:
            raise RunConfigError(f"[parallel] {e}") from None

    def _agree(self, comm, failed: RunConfigError | None, resume: bool) -> None:
        """The ranks' first exchange: each one's error (if any) and a digest of the job it is about to run (the run
        configuration, the model, the resume point). An error on any rank, or ranks that disagree, is raised on every
        rank alike (`every_rank`: the command ends the job once, cleanly)."""
        job = None if failed else hashlib.sha256(json.dumps(
            [repr(self.run), self.config.to_dict(), self.resumed_from, self.step, self.tokens_seen],
            sort_keys=True, default=str).encode()).hexdigest()
        everyone = allgather_json(comm, {"error": None if failed is None else str(failed), "job": job})
        errors = [(r, e["error"]) for r, e in enumerate(everyone) if e["error"]]
        if errors:
            first, message = errors[0]
            where = ("every rank" if len(errors) == len(everyone) else
                     f"rank {first}" + (f" and {len(errors) - 1} more" if len(errors) > 1 else ""))
            raise _every_rank(RunConfigError(f"{message} ({where})"))
        jobs = {}
        for r, e in enumerate(everyone):
            jobs.setdefault(e["job"], []).append(r)
        if len(jobs) > 1:
            groups = " vs ".join(_ranges(rs) for rs in jobs.values())
            raise _every_rank(RunConfigError(f"the ranks are not running the same job (run file, model or resume "
                                             f"point differ): ranks {groups}; start every rank with the same run file"
                                             + (" and checkpoint folder" if resume else "")))

    def _build_mesh(self, comm):
        """The run's layout over `comm` (collective), and one line naming every rank's pid and host."""
        from .mesh import Mesh
        run = self.run
        mesh = Mesh(comm, run.layout, checksums=run.checksums)
        ranks = allgather_json(comm, [os.getpid(), socket.gethostname()])
        shown = "; ".join(f"rank {r} pid {pid} on {host}" for r, (pid, host) in enumerate(ranks[:16]))
        self.log(f"layout {run.layout} over {len(ranks)} ranks: {shown}" + (" …" if len(ranks) > 16 else ""))
        return mesh

    def _shard_state(self) -> None:
        """Under a layout, keep only this rank's shards of the params and optimizer state (every rank built or
        loaded the whole state the same way), and train with the layout's op table."""
        if self.mesh is LOCAL:
            return
        from .parallel_ops import parallelize
        self.run_id = self.checkpoints.run_id = allgather_json(self.mesh.comm, self.run_id)[0]  # rank 0's names it
        self.ops, self.params, self.opt_state = parallelize(self.ops, self.mesh, self.config, self.params,
                                                            self.opt_state)

    def whole_state(self) -> tuple[dict, dict]:
        """(params, optimizer state) as whole arrays keyed as in one process (collective under a layout)."""
        if self.mesh is LOCAL:
            return self.params, self.opt_state
        from .sharded_optim import gather_optimizer_state
        return self.params.full(), gather_optimizer_state(self.config, self.params, self.opt_state)

    def memory(self) -> dict:
        """Bytes this rank holds for params, gradients (one copy, as the step keeps them) and optimizer state."""
        params = sum(int(self.params[k].nbytes) for k in self.params)
        state = sum(int(np.asarray(v).nbytes) for k, v in self.opt_state.items() if k != "step")
        return {"params": params, "grads": params, "optimizer": state}

    def _check_memory(self, loaded=None) -> str:
        """Refuse, before any work, a run whose estimated peak memory exceeds what the machine has available: the larger
        of a step's (reference/training/memory.py) and a checkpoint save's (the state plus one in-memory copy of the
        file). `loaded`: params already in memory (init_from), not counted twice. Returns the estimate, to log."""
        run = self.run
        micro_steps = max(n for _, n in [(0, run.sequences_per_step), *run.batch_schedule]) // run.micro_batch_size
        estimate = estimate_step_bytes(self.config, run.micro_batch_size, run.seq_len, run.dtype, run.recompute,
                                       micro_steps=micro_steps)
        state = estimate["params"] + estimate["optimizer"]
        save = 2 * state + (state >> 4)
        total, peak = (save, "a checkpoint save") if save > estimate["total"] else (estimate["total"],
                                                                                   f"the step's {estimate['phase']}")
        available = available_memory_bytes()
        if available is not None and loaded is not None:
            available += sum(v.nbytes for v in loaded.values())
        gib = 2.0 ** 30
        said = (f"estimated peak memory {total / gib:.2f} GiB, in {peak} (params {estimate['params'] / gib:.2f}, "
                f"optimizer {estimate['optimizer'] / gib:.2f}, activations {estimate['activations'] / gib:.2f}, "
                f"logits {estimate['logits'] / gib:.2f} GiB)")
        if available is not None and total > available:
            raise RunConfigError(f"[data] seq_len = {run.seq_len}, micro_batch_size = {run.micro_batch_size}: {said} "
                                 f"exceeds the {available / gib:.2f} GiB available; "
                                 + ("this model's state does not fit this machine" if peak == "a checkpoint save" else
                                    "lower them" + ("" if run.recompute else ", or set [train] recompute = true")))
        return said + (f" of {available / gib:.2f} GiB available" if available is not None else "")

    def _claim_folder(self, restart: bool) -> None:
        """A new run needs a folder of its own: existing checkpoints (or a non-empty metrics file) are refused,
        unless `restart` removes them."""
        run = self.run
        found = self.checkpoints.list()
        metrics = os.path.isfile(run.metrics_path) and os.path.getsize(run.metrics_path) > 0
        if not found and not metrics:
            return
        if restart:
            removed = self.checkpoints.remove_all()
            self.log(f"--restart: removed {len(removed)} checkpoint(s) from {run.checkpoint_dir}"
                     + (f" and the metrics in {run.metrics_path}" if metrics else ""))
            return  # the metrics file is started empty by `train`
        where = (f"[checkpoint] dir = {run.checkpoint_dir!r}: holds checkpoints of an earlier run ("
                 f"{', '.join(os.path.basename(p) for p in found[-3:])}{', ...' if len(found) > 3 else ''})"
                 if found else f"[logging] metrics = {run.metrics_path!r}: holds the metrics of an earlier run")
        raise RunConfigError(f"{where}; continue it with --resume, give this run another [checkpoint] dir and "
                             f"[logging] metrics, or start over with --restart (removes the old checkpoints and "
                             f"metrics)")

    def _load_resume_point(self, config):
        """The newest checkpoint that verifies (None: none at all); skipped corrupt ones are logged; one whose
        data fingerprint differs from the current data is refused."""
        try:
            ckpt, skipped = self.checkpoints.load_newest_valid(config)
        except CheckpointError as e:
            raise RunConfigError(f"[checkpoint] dir = {self.run.checkpoint_dir!r}: {e}") from None
        for path, why in skipped:
            self.log(f"skipped checkpoint {path}: {why}")
        if ckpt is None and skipped:
            raise RunConfigError(f"[checkpoint] dir = {self.run.checkpoint_dir!r}: none of its {len(skipped)} "
                                 f"checkpoint(s) verifies (corrupt); start over with --restart")
        if ckpt is not None and ckpt.data_fingerprint is not None:
            changes = _data_changes(ckpt.data_fingerprint, self.fingerprint, self.stores)
            was, now = ckpt.tokenizer or {}, self.tokenizer[0] if self.tokenizer else {}
            if (was.get("kind"), was.get("sha256")) != (now.get("kind"), now.get("sha256")):
                changes.append(f"the tokenizer changed ({was.get('kind')} -> {now.get('kind')})")
            if changes:
                raise RunConfigError(f"[data] the training data changed since checkpoint {ckpt.path}: "
                                     f"{'; '.join(changes)}; resume on the same data, or start a new run")
        return ckpt

    # ---- one optimizer step -------------------------------------------------------------------------------------
    def next_batch(self, sequences: int) -> GlobalBatch:
        """The step's global batch: `sequences` sequences read from the loader in micro_batch_size pieces, the same
        on every rank and under every layout (each rank then trains on its part, training/step.py)."""
        pieces = [self.loader.next_batch() for _ in range(sequences // self.run.micro_batch_size)]
        tokens = np.concatenate([t for t, _ in pieces])
        doc_ids = np.concatenate([d for _, d in pieces]) if self.config.intra_document_mask else None
        return GlobalBatch(tokens, doc_ids=doc_ids)

    def train_step(self) -> dict:
        """One optimizer step (training/step.py); its metrics line. A step whose loss or gradient norm is not finite
        changes no parameter or balancing state: it raises TrainingDiverged, or under `on_nonfinite = "skip"`
        returns a line with "skipped": true (the batch it read is consumed)."""
        c, run = self.config, self.run
        t0 = time.perf_counter()
        if self.mesh is not LOCAL:
            self.mesh.begin_step(self.step + 1)
        sequences = self.batches.sequences(self.tokens_seen)
        result = compute_gradients(c, self.params, self.next_batch(sequences), micro_batch_size=run.micro_batch_size,
                                   ops=self.ops, mesh=self.mesh, recompute=run.recompute, check=False)
        if os.environ.get(FAULT_MID_STEP_ENV) == f"{self.rank}:{self.step + 1}":
            os.kill(os.getpid(), signal.SIGKILL)
        if not result.finite:
            return self._non_finite_step(result.losses, result.grad_norm, sequences, time.perf_counter() - t0)
        lr = {group: learning_rate(self.step, run.steps, peak, c.warmup_steps, c.lr_schedule,
                                   c.decay_start_fraction, c.lr_floor_ratio)
              for group, peak in (("muon", c.muon_lr), ("adamw", c.adamw_lr))}
        update = apply_update(c, self.params, self.opt_state, self.balance_state, result, lr["muon"], lr["adamw"],
                              ops=self.ops, mesh=self.mesh)
        tokens = sequences * run.seq_len
        self.step += 1
        self.tokens_seen += tokens
        seconds = time.perf_counter() - t0
        metrics = {
            "step": self.step, "tokens_seen": self.tokens_seen, "sequences": sequences, "loss": result.losses,
            "grad_norm": float(result.grad_norm), "lr": lr, "logits_max": result.logits_max,
            "logits_mean": result.logits_mean,
            "max_vio": {str(l): m["max_vio"] for l, m in update["balance"].items()},
            "expert_load": {str(l): np.asarray(n).astype(int).tolist() for l, n in result.counts.items()},
            "skipped_steps": self.skipped_steps, "tokens_per_s": tokens / seconds, "seconds": seconds,
        }
        if self.mesh is not LOCAL:  # rank 0's bytes held (they shrink as 1/(dp_shard·cp)) and sent, by kind and group
            metrics["layout"], metrics["memory"] = str(self.run.layout), self.memory()
            traffic = sorted(self.mesh.take_traffic().items())
            metrics["comm_bytes"] = {f"{kind}/{group}": n for (kind, group), n in traffic}
        if result.batch_het is not None:  # SPEC §6.4
            metrics["batch_het"] = result.batch_het
        return metrics

    def _non_finite_step(self, parts, grad_norm, sequences, seconds) -> dict:
        run, attempt = self.run, self.step + 1
        what = f"step {attempt}: loss {parts['total']:.6g}, gradient norm {grad_norm:.6g}"
        newest = self.last_checkpoint
        where = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written yet"
        if run.on_nonfinite == "skip" and self.skipped_steps < run.max_skipped_steps:
            self.skipped_steps += 1
            self.log(f"{what}: not finite, step skipped ({self.skipped_steps} of at most {run.max_skipped_steps})")
            return {"step": attempt, "skipped": True, "skipped_steps": self.skipped_steps,
                    "tokens_seen": self.tokens_seen, "sequences": sequences,
                    "loss": {k: (float(v) if np.isfinite(v) else None) for k, v in parts.items()},
                    "grad_norm": float(grad_norm) if np.isfinite(grad_norm) else None, "seconds": seconds}
        if run.on_nonfinite == "skip":
            raise self._diverged(f"{what}: not finite, and {self.skipped_steps} steps were skipped already "
                                   f"([train] max_skipped_steps = {run.max_skipped_steps}): stopped before the "
                                   f"update; {where}")
        raise self._diverged(f"{what}: not finite: stopped before the update (no checkpoint holds it); {where} "
                               f"(resuming from it replays the same data: resume with a lower learning rate, or "
                               f"set [train] on_nonfinite = \"skip\")")

    def _diverged(self, message: str) -> TrainingDiverged:
        """Divergence is decided from the step's global loss and norm: under a layout every rank stops alike."""
        error = TrainingDiverged(message)
        return error if self.mesh is LOCAL else _every_rank(error)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def save(self) -> str:
        """Write the checkpoint of the current step. A failed write (full disk) is a RunConfigError naming
        [checkpoint] dir; parameters that went non-finite in the last update are a TrainingDiverged."""
        previous = self.last_checkpoint
        self.mesh.set_phase("checkpoint")
        common = dict(balancing_state=self.balance_state, tokens_seen=self.tokens_seen,
                      data_state=self.loader.state_dict(), rng_state=self.rng.bit_generator.state,
                      extra={"run_file": os.path.abspath(self.run.path), "skipped_steps": self.skipped_steps,
                             "metrics_lines": self.metrics.lines if self.metrics else None,
                             "layout": str(self.run.layout)},
                      tokenizer=self.tokenizer, data_fingerprint=self.fingerprint)
        try:
            if self.mesh is not LOCAL and self.run.checkpoint_format == "sharded":
                # collective: a file per rank, then rank 0's manifest (sharded_checkpoint.py)
                path = self.checkpoints.save_sharded(self.step, self.mesh, self.params, self.opt_state, **common)
            else:  # one file; under a layout gathered from every rank and written by rank 0
                params, opt_state = self.whole_state()
                path = self.checkpoints.path_for(self.step)
                if self.is_main:
                    path = self.checkpoints.save(self.step, config=self.config, params=params,
                                                 optimizer_state=opt_state, **common)
        except CheckpointWriteError as e:
            raise RunConfigError(f"[checkpoint] dir = {self.run.checkpoint_dir!r}: {e}; the previous checkpoint "
                                 f"{previous or '(none)'} is intact") from None
        except CheckpointError as e:  # save_checkpoint refuses NaN: the last update overflowed
            raise TrainingDiverged(f"step {self.step}: {e}; the newest checkpoint is "
                                   f"{previous or '(none yet)'}") from None
        self.last_checkpoint = path
        if os.environ.get(FAULT_ENV) == str(self.step) and self.is_main:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def _write_metrics(self, row: dict) -> None:
        if not self.is_main:
            return
        try:
            self.metrics.write(row)
        except OSError as e:
            raise RunConfigError(f"[logging] metrics = {self.run.metrics_path!r}: cannot write "
                                 f"({e.strerror or e}); the newest checkpoint is "
                                 f"{self.last_checkpoint or '(none)'}") from None
        if os.environ.get(FAULT_METRICS_ENV) == str(row["step"]) and not row.get("skipped"):
            os.kill(os.getpid(), signal.SIGKILL)

    def train(self) -> dict | None:
        """Run to `[train] steps`; the last step's metrics (None when there was nothing to do). A SIGINT/SIGTERM
        ends it early after a checkpoint, with `stopped_by` set to the signal."""
        run = self.run
        if self.step >= run.steps:
            self.log(f"already at step {self.step} of {run.steps}: nothing to do")
            return None
        if self.is_main:
            try:
                cut = self.metrics.start(self.step, self.metrics_lines)
            except (OSError, MetricsFileError) as e:
                raise RunConfigError(f"[logging] metrics = {run.metrics_path!r}: "
                                     f"{getattr(e, 'strerror', None) or e}") from None
            if cut["dropped_lines"] or cut["dropped_unreadable"]:
                self.log(f"{run.metrics_path}: cut back to step {self.step} (dropped {cut['dropped_lines']} later "
                         f"line(s) and {len(cut['dropped_unreadable'])} unreadable line(s))")
        bar = None
        if run.progress and self.is_main:
            from tqdm import tqdm
            bar = tqdm(total=run.steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True)
        last = None
        with self.metrics or contextlib.nullcontext(), PreemptionGuard(self.log) as guard:
            while self.step < run.steps:
                row = self.train_step()
                self._write_metrics(row)
                saved = False
                if not row.get("skipped"):
                    last = row
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']['total']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                                        refresh=False)
                        bar.update(1)
                    if self.step % run.checkpoint_every == 0 or self.step == run.steps:
                        self.save()
                        saved = True
                signum = self._agreed_signal(guard.signum)
                if signum is not None and self.step < run.steps:  # (at the end the run is simply done)
                    path = self.last_checkpoint if saved else self.save()
                    self.stopped_by = signum
                    self.log(f"stopped by {signal.Signals(signum).name} after step {self.step}: checkpoint "
                             f"{path}; continue with --resume")
                    break
        if bar is not None:
            bar.close()
        if self.run.hf_export is not None and self.stopped_by is None:
            self.export_hf(self.run.hf_export)
        return last

    def export_hf(self, folder: str) -> None:
        """The current params as a Hugging Face checkpoint (save_pretrained; gathered from every rank, written by
        rank 0)."""
        from trinity.reference.interop.hf import save_pretrained
        params, _ = self.whole_state()
        if self.is_main:
            save_pretrained(folder, self.config, params)
            self.log(f"Hugging Face checkpoint of step {self.step} in {folder}")

    def _agreed_signal(self, signum):
        """The stop signal any rank received (ranks stop together, after the same step); one all-reduce per step
        under a layout."""
        if self.mesh is LOCAL:
            return signum
        self.mesh.set_phase("control")
        agreed = int(self.mesh.max(float(signum or 0), "data"))
        return agreed or None
