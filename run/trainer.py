"""The trainer: the Trinity recipe step by step, resumable bit for bit (SPEC §6, §7, §9; docs/architecture.md).

One optimizer step:
  1. sequences_per_step / micro_batch_size micro-batches: forward + backward each, gradients averaged, expert
     counts summed (SPEC §14 #8);
  2. global-norm gradient clipping;
  3. the load-balancing update of every expert_bias, once, before the parameter update (SPEC §6.1);
  4. Muon on hidden matrices and AdamW on embedding, head and gains, at the scheduled learning rates (SPEC §9);
  5. one metrics line (JSONL), the progress bar, and a checkpoint every `every` steps and at the end;
  6. with [eval], after every `every`-th step and the last, before that step's checkpoint: the held-out losses on the
     same batches every time (`evaluate`, run/eval_data.py), one eval line in the metrics. It changes nothing that
     training reads (params, optimizer and balancing state, loaders, RNG): a run with evaluation trains the same bits
     as one without, and a resumed run evaluates at the same steps.

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
import os
import signal
import sys
import time

import numpy as np

from trinity.accel.device import array_bytes
from trinity.distributed.layout import Layout
from trinity.distributed.peak_memory import peak_summary, rank_peaks
from trinity.reference.training.checkpoint import CheckpointError, CheckpointWriteError
from trinity.reference.training.evaluation import combine, evaluate
from trinity.reference.training.schedules import learning_rate
from trinity.reference.training.step import LOCAL, GlobalBatch, apply_update, compute_gradients

from .eval_data import fixed_batches
from .metrics_log import MetricsFileError
from .placement import batch_to_device, state_to_device, state_to_host
from .preemption import PreemptionGuard
from .run_config import RunConfig, RunConfigError
from .startup import Startup, _every_rank, build_loader, data_fingerprint

__all__ = ["Trainer", "TrainingDiverged", "FAULT_ENV", "FAULT_METRICS_ENV", "FAULT_MID_STEP_ENV",
           "FAULT_HANG_MID_STEP_ENV", "build_loader",
           "data_fingerprint"]

# Fault injection for tests: SIGKILL this process right after the checkpoint of this step is written
# (FAULT_ENV), or right after the metrics line of this step is written (FAULT_METRICS_ENV).
FAULT_ENV = "TRINITY_FAULT_KILL_AFTER_CHECKPOINT"
FAULT_METRICS_ENV = "TRINITY_FAULT_KILL_AFTER_METRICS"
# "R:S": rank R SIGKILLs itself in the middle of step S (after its gradients, before the update): the other ranks are
# then inside a collective.
FAULT_MID_STEP_ENV = "TRINITY_FAULT_KILL_MID_STEP"
# "R:S": rank R stops itself (SIGSTOP) in the middle of step S: a hung rank, which the others' watchdog ends.
FAULT_HANG_MID_STEP_ENV = "TRINITY_FAULT_STOP_MID_STEP"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm went non-finite (or too many steps were skipped): the run stopped before the
    update, and the message names the step and the checkpoint to resume from."""


class Trainer(Startup):
    """Trains the run's model. `comm` (launch.world(): mpi4py's COMM_WORLD, or a virtual communicator) makes it one
    rank of a job laid out by the run's [parallel] section (docs/distributed.md): every rank runs this same code on
    its part of each step; rank 0 alone logs, draws the progress bar and writes metrics and checkpoints. Its start
    (startup.py) takes the run folder's lock, held until `train` ends or `close()`.

    `backend`, an op table object, trains with it instead of the run's `[train] backend` (trinity.accel.get_backend
    checks it): the hook for a table from outside the package or a test's stand-in. A table on a device keeps the
    state there for the whole run (placement.py)."""

    def __init__(self, run: RunConfig, resume: bool = False, restart: bool = False, log=print, comm=None,
                 backend=None):
        self.run = run
        self._table = backend
        self.rank = 0 if comm is None else comm.Get_rank()
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        self.stopped_by: int | None = None  # the signal that ended `train` early (preemption), if any
        # A signal received elsewhere than this rank's thread (virtual ranks: the simulator's main thread), read at
        # every step boundary beside the rank's own; None: none.
        self.stop_requested = lambda: None
        distributed = comm is not None and not (comm.Get_size() == 1 and run.layout.sizes == Layout())
        try:
            self._start(resume, restart, comm, distributed)
        except BaseException:
            self.close()  # a refused start gives the run folder back as it found it
            raise

    def _start(self, resume: bool, restart: bool, comm, distributed: bool) -> None:
        """Prepare and agree (under a layout: every host's memory is checked there), then build or load the state
        and agree on it, then change the run folder (--restart) and build the mesh (startup.py). Under a layout a
        rank's error is carried by the next agreement to every rank."""
        failed = self._attempt(self._prepare, distributed, resume, restart, comm, distributed)
        self.mesh = LOCAL
        if distributed:
            self._agree(comm, failed, resume)
        failed = self._attempt(self._build_state, distributed, resume, distributed)
        if distributed:
            self._agree_state(comm, failed, resume)
        self._restart_folder()
        if distributed:
            self.mesh = self._build_mesh(comm)
            self._attach_mesh()
        if self.ops.on_device:  # the state moves to this rank's device once, for the whole run
            said = self.ops.select_device(self.local_rank)
            if said is not None:
                self.log(f"rank 0 computes on {said}" + (" (one GPU per rank: the rank's place on its host)"
                                                          if distributed else ""))
            self.params, self.opt_state, self.balance_state = state_to_device(self.ops, self.params, self.opt_state,
                                                                              self.balance_state)

    def host_state(self) -> tuple:
        """(params, optimizer state, balancing state) as the host keeps them: copies of a device table's arrays,
        the state itself for a NumPy table."""
        return state_to_host(self.ops, self.params, self.opt_state, self.balance_state)

    def whole_state(self) -> tuple[dict, dict]:
        """(params, optimizer state) as whole NumPy arrays keyed as in one process (collective under a layout:
        every rank then holds the whole model; for tests and small models, not for a run at scale)."""
        params, opt_state, _ = self.host_state()
        return self.mesh.whole_state(self.config, params, opt_state)

    def memory(self) -> dict:
        """Bytes this rank holds for params, gradients (one copy, as the step keeps them) and optimizer state."""
        params = sum(array_bytes(self.params[k]) for k in self.params)
        state = sum(array_bytes(v) for k, v in self.opt_state.items() if k != "step")
        return {"params": params, "grads": params, "optimizer": state}

    def next_batch(self, sequences: int) -> GlobalBatch:
        """This rank's rows of the step's global batch: `sequences` sequences read from the loader in
        micro_batch_size pieces, the same stream on every rank and under every layout; the loader reads only the
        rows this rank trains (mesh.local_sequences) and skips the others, so its state stays the same on every
        rank (training/step.py then cuts this rank's positions)."""
        rows = self.mesh.local_sequences(sequences)
        tokens, doc_ids = self.loader.next_batches(sequences // self.run.micro_batch_size, keep=rows)
        return batch_to_device(self.ops, GlobalBatch(tokens, doc_ids=doc_ids if self.config.intra_document_mask
                                                     else None, rows=rows, sequences=sequences))

    def train_step(self) -> dict:
        """One optimizer step (training/step.py); its metrics line. A step whose loss or gradient norm is not finite
        changes no parameter or balancing state: it raises TrainingDiverged, or under `on_nonfinite = "skip"`
        returns a line with "skipped": true (the batch it read is consumed)."""
        c, run = self.config, self.run
        t0 = time.perf_counter()
        self.mesh.begin_step(self.step + 1)
        sequences = self.batches.sequences(self.tokens_seen)
        result = compute_gradients(c, self.params, self.next_batch(sequences), micro_batch_size=run.micro_batch_size,
                                   ops=self.ops, mesh=self.mesh, recompute=run.recompute, check=False)
        if os.environ.get(FAULT_MID_STEP_ENV) == f"{self.rank}:{self.step + 1}":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get(FAULT_HANG_MID_STEP_ENV) == f"{self.rank}:{self.step + 1}":
            os.kill(os.getpid(), signal.SIGSTOP)
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
            "expert_load": {str(l): np.asarray(n).astype(int).tolist()
                            for l, n in self.ops.to_host(result.counts).items()},
            "skipped_steps": self.skipped_steps, "tokens_per_s": tokens / seconds, "seconds": seconds,
        }
        # rank 0's bytes held (they shrink as 1/(dp_shard·cp)) and sent, by kind and group (none in one process)
        metrics["layout"], metrics["memory"] = str(self.run.layout), self.memory()
        traffic = sorted(self.mesh.take_traffic().items())
        metrics["comm_bytes"] = {f"{kind}/{group}": n for (kind, group), n in traffic}
        # every rank's peak resident memory so far (its largest, which rank; each rank's in a job of <= 64 ranks)
        metrics["peak_rss"] = peak_summary(rank_peaks(self.mesh))
        if len(metrics["peak_rss"]["ranks"]) > 64:
            del metrics["peak_rss"]["ranks"]
        if self.start_report is not None:  # the first line of this process: what each rank read to start
            metrics["start"], self.start_report = self.start_report, None
        if result.batch_het is not None:  # SPEC §6.4
            metrics["batch_het"] = result.batch_het
        return metrics

    def eval_due(self) -> bool:
        """Whether the step just taken is followed by an evaluation: [eval] every `every` steps, and the last."""
        e = self.run.evaluation
        return e is not None and (self.step % e.every == 0 or self.step == self.run.steps)

    def evaluate(self) -> dict:
        """The held-out losses of the current params on every eval set (the same batches every time, each rank its
        rows and positions, as a step's), as an eval line for the metrics (collective under a layout)."""
        run, e = self.run, self.run.evaluation
        t0 = time.perf_counter()
        rows = self.mesh.local_sequences(e.sequences_per_batch)
        results = {}
        for s in self.eval_sets:
            batches = (batch_to_device(self.ops, b) for b in
                       fixed_batches(s.store, run.seq_len, e.sequences_per_batch, e.batches, rows=rows,
                                     doc_ids=self.config.intra_document_mask, seed=e.seed))
            results[s.name] = evaluate(self.config, self.params, batches, micro_batch_size=run.micro_batch_size,
                                       ops=self.ops, mesh=self.mesh, token_bytes=s.token_bytes)
        total = combine(results) if len(results) > 1 else next(iter(results.values()))
        line = {"step": self.step, "kind": "eval", "tokens_seen": self.tokens_seen, **total.as_line()}
        if len(results) > 1:
            line["sources"] = {name: {k: v for k, v in r.as_line().items()
                                      if k in ("loss", "perplexity", "bits_per_byte", "tokens")}
                               for name, r in results.items()}
        line["expert_load"] = {str(layer): n.astype(int).tolist() for layer, n in total.counts.items()}
        line["max_vio"] = {str(layer): v for layer, v in total.max_vio().items()}
        traffic = sorted(self.mesh.take_traffic().items())
        if traffic:
            line["comm_bytes"] = {f"{kind}/{group}": n for (kind, group), n in traffic}
        line["seconds"] = time.perf_counter() - t0
        return line

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
        return _every_rank(TrainingDiverged(message))

    # ---- the loop -----------------------------------------------------------------------------------------------
    def save(self) -> str:
        """Write the checkpoint of the current step. A failed write (full disk) is a RunConfigError naming
        [checkpoint] dir; parameters that went non-finite in the last update are a TrainingDiverged."""
        previous = self.last_checkpoint
        self.mesh.set_phase("checkpoint")
        params, opt_state, balance_state = self.host_state()
        common = dict(balancing_state=balance_state, tokens_seen=self.tokens_seen,
                      data_state=self.loader.state_dict(), rng_state=self.rng.bit_generator.state,
                      extra={"run_file": os.path.abspath(self.run.path), "seq_len": self.run.seq_len,
                             "skipped_steps": self.skipped_steps,
                             "metrics_lines": self.metrics.lines if self.metrics else None,
                             "layout": str(self.run.layout), "precision": self.run.precision},
                      tokenizer=self.tokenizer, data_fingerprint=self.fingerprint)
        try:
            if self.mesh.world_size > 1 and self.run.checkpoint_format == "sharded":
                # collective: a file per rank, then rank 0's manifest (sharded_checkpoint.py)
                path = self.checkpoints.save_sharded(self.step, self.mesh, params, opt_state, **common)
            else:  # one file; under a layout gathered from every rank and written by rank 0
                params, opt_state = self.mesh.whole_state(self.config, params, opt_state)
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
        ends it early after a checkpoint, with `stopped_by` set to the signal. The run folder's lock is given back at
        the end, however it ends."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict | None:
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
        last, last_eval = None, None
        with self.metrics or contextlib.nullcontext(), PreemptionGuard(self.log) as guard:
            while self.step < run.steps:
                row = self.train_step()
                self._write_metrics(row)
                saved = False
                if not row.get("skipped"):
                    last = row
                    if self.eval_due():
                        evaluated = self.evaluate()
                        self._write_metrics(evaluated)
                        last_eval = evaluated["loss"]["total"]
                        if bar is None:
                            self.log(f"eval after step {self.step}: loss {last_eval:.4f} (ce "
                                     f"{evaluated['loss']['ce']:.4f}, perplexity {evaluated['perplexity']:.2f})")
                    if bar is not None:
                        shown = dict(loss=f"{row['loss']['total']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}")
                        if last_eval is not None:
                            shown["eval"] = f"{last_eval:.4f}"
                        bar.set_postfix(**shown, refresh=False)
                        bar.update(1)
                    if self.step % run.checkpoint_every == 0 or self.step == run.steps:
                        self.save()
                        saved = True
                signum = self._agreed_signal(guard.signum or self.stop_requested())
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
        """The current params as a Hugging Face checkpoint. Under a layout rank 0 writes it key by key as the ranks
        send it their spans (sharded_export.py: no rank holds more than one whole key at a time)."""
        params = self.ops.to_host(self.params)  # a device table's copy; the params themselves otherwise
        if self.mesh.world_size > 1:
            from trinity.distributed.sharded_export import export_sharded_hf
            export_sharded_hf(self.mesh, params, folder)
        elif self.is_main:
            from trinity.reference.interop.hf import save_pretrained
            save_pretrained(folder, self.config, params)
        self.log(f"Hugging Face checkpoint of step {self.step} in {folder}")

    def _agreed_signal(self, signum):
        """The stop signal any rank received (ranks stop together, after the same step); one all-reduce per step
        under a layout."""
        self.mesh.set_phase("control")
        agreed = int(self.mesh.max(float(signum or 0), "world"))
        return agreed or None
