"""The trainer: the Trinity recipe step by step, resumable bit for bit (SPEC §6, §7, §9; ARCHITECTURE.md).

One optimizer step:
  1. sequences_per_step / micro_batch_size micro-batches: forward + backward each, gradients averaged, expert
     counts summed (SPEC §14 #8);
  2. global-norm gradient clipping;
  3. the load-balancing update of every expert_bias, once, before the parameter update (SPEC §6.1);
  4. Muon on hidden matrices and AdamW on embedding, head and gains, at the scheduled learning rates (SPEC §9);
  5. one metrics line (JSONL), the progress bar, and a checkpoint every `every` steps and at the end.

This is the single-process trainer; the distributed layouts will inject their communicators into the same loop.
State that makes a run resumable: params (expert_bias included), optimizer state, balancing state, step,
tokens seen, the data loader's position and the RNG. A run stopped at any moment and resumed from its latest
checkpoint ends with the same bits as a run that was never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

from trinity.accel import BackendUnavailable, get_backend
from trinity.reference import Config, init_params, loss_and_grads
from trinity.reference.balancing import balance_step, init_balancing_state
from trinity.reference.checkpoint import CheckpointManager, load_checkpoint
from trinity.reference.data import DataError, DocumentStore, PackedTokenLoader
from trinity.reference.mixture import MixtureLoader
from trinity.reference.rsdb import RSDBLoader
from trinity.reference.optim import clip_grad_norm, init_optimizer_state, optimizer_step
from trinity.reference.schedules import BatchSchedule, learning_rate

from .run_config import RunConfig, RunConfigError

__all__ = ["Trainer", "FAULT_ENV", "build_loader"]

# Fault injection for tests: SIGKILL this process right after the checkpoint of this step is written.
FAULT_ENV = "TRINITY_FAULT_KILL_AFTER_CHECKPOINT"


def _base_config(run: RunConfig):
    """(Config, params or None) from the run's model source: a preset, a config.json, or an HF checkpoint."""
    kind, value = run.model_source
    if kind == "preset":
        return Config.preset(value), None
    if kind == "config":
        return Config.from_hf(value), None
    from trinity.reference.hf_interop import load_pretrained
    config, params = load_pretrained(value, dtype=np.dtype(run.dtype))
    return config, params


def build_loader(run: RunConfig, rank: int = 0, world_size: int = 1):
    """(loader, [DocumentStore per data source]) for the run's [data] section: a PackedTokenLoader or RSDBLoader
    over `path` (a token file or prepared directory), or a MixtureLoader of one such loader per [[data.sources]]
    with the run's phases. Ranks read disjoint documents (data.py). Errors name the [data] key."""
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
    def __init__(self, run: RunConfig, resume: bool = False, log=print):
        self.run, self.log = run, log
        base, pretrained = _base_config(run)
        self.config = config = run.build_config(base)
        try:
            self.ops = get_backend(run.backend)
        except BackendUnavailable as e:
            raise RunConfigError(f"[train] backend = {run.backend!r}: {e}") from None
        self.loader, stores = build_loader(run)
        self.batches = BatchSchedule(run.sequences_per_step, run.batch_schedule)
        self.checkpoints = CheckpointManager(run.checkpoint_dir, keep_last=run.keep_last)
        latest = self.checkpoints.latest() if resume else None
        if latest is not None:
            ckpt = load_checkpoint(latest, config=config)
            self.params, self.opt_state, self.balance_state = ckpt.params, ckpt.optimizer_state, \
                ckpt.balancing_state
            self.step, self.tokens_seen = ckpt.step, ckpt.tokens_seen
            self.loader.load_state_dict(ckpt.data_state)
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = ckpt.rng_state
            log(f"resumed from {latest} at step {self.step} ({self.tokens_seen:,} tokens seen)")
        else:
            if resume:
                log(f"no checkpoint in {run.checkpoint_dir}: starting from step 0")
            if pretrained is not None:
                self.params = pretrained
            else:
                self.params = init_params(config, seed=run.init_seed, dtype=np.dtype(run.dtype))
            self.opt_state = init_optimizer_state(config, self.params)
            self.balance_state = init_balancing_state(config, self.params)
            self.step, self.tokens_seen = 0, 0
            self.rng = np.random.default_rng(run.init_seed)
        for store in stores:
            largest = store.max_token()
            if largest >= config.vocab_size:
                raise RunConfigError(f"[data] {store.path} holds token id {largest} >= vocab_size "
                                     f"{config.vocab_size}")

    # ---- one optimizer step -------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        c, run = self.config, self.run
        t0 = time.perf_counter()
        sequences = self.batches.sequences(self.tokens_seen)
        micro_steps = sequences // run.micro_batch_size
        grads_sum, counts, micro_losses = None, {}, []
        parts = {"total": 0.0, "ce": 0.0, "z": 0.0, "balance": 0.0}
        logit_max, logit_mean = -np.inf, 0.0
        for _ in range(micro_steps):
            tokens, doc_ids = self.loader.next_batch()
            losses, grads, stats = loss_and_grads(c, self.params, tokens, tokens,
                                                  doc_ids if c.intra_document_mask else None,
                                                  recompute=run.recompute, ops=self.ops)
            if grads_sum is None:
                grads_sum = grads
            else:
                for k, g in grads.items():
                    grads_sum[k] += g
            for layer, s in stats["layers"].items():
                counts[layer] = counts.get(layer, 0) + s["expert_counts"]
            for k in parts:
                parts[k] += losses[k] / micro_steps
            micro_losses.append(losses["total"])
            logit_max = max(logit_max, stats["logits_max"])
            logit_mean += stats["logits_mean"] / micro_steps
        scale = np.asarray(1.0 / micro_steps, dtype=np.dtype(run.dtype))
        grads = {k: g * scale for k, g in grads_sum.items()}
        grads, grad_norm = clip_grad_norm(grads, c.grad_clip_norm, self.ops)
        balance = balance_step(c, self.params, self.balance_state, counts)
        lr = {group: learning_rate(self.step, run.steps, peak, c.warmup_steps, c.lr_schedule,
                                   c.decay_start_fraction, c.lr_floor_ratio)
              for group, peak in (("muon", c.muon_lr), ("adamw", c.adamw_lr))}
        optimizer_step(c, self.params, grads, self.opt_state, lr["muon"], lr["adamw"], self.ops)
        tokens = sequences * run.seq_len
        self.step += 1
        self.tokens_seen += tokens
        seconds = time.perf_counter() - t0
        metrics = {
            "step": self.step, "tokens_seen": self.tokens_seen, "sequences": sequences, "loss": parts,
            "grad_norm": float(grad_norm), "lr": lr, "logits_max": float(logit_max), "logits_mean": float(logit_mean),
            "max_vio": {str(l): m["max_vio"] for l, m in balance.items()},
            "expert_load": {str(l): counts[l].astype(int).tolist() for l in counts},
            "tokens_per_s": tokens / seconds, "seconds": seconds,
        }
        if micro_steps > 1:  # SPEC §6.4: BatchHet = max_i L_i − mean_i L_i over the step's micro-batch losses
            metrics["batch_het"] = float(max(micro_losses) - np.mean(micro_losses))
        return metrics

    # ---- the loop -----------------------------------------------------------------------------------------------
    def save(self):
        self.checkpoints.save(self.step, config=self.config, params=self.params, optimizer_state=self.opt_state,
                              balancing_state=self.balance_state, tokens_seen=self.tokens_seen,
                              data_state=self.loader.state_dict(), rng_state=self.rng.bit_generator.state,
                              extra={"run_file": os.path.abspath(self.run.path)})
        if os.environ.get(FAULT_ENV) == str(self.step):
            os.kill(os.getpid(), signal.SIGKILL)

    def train(self) -> dict | None:
        run = self.run
        if self.step >= run.steps:
            self.log(f"already at step {self.step} of {run.steps}: nothing to do")
            return None
        os.makedirs(os.path.dirname(run.metrics_path) or ".", exist_ok=True)
        bar = None
        if run.progress:
            from tqdm import tqdm
            bar = tqdm(total=run.steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True)
        metrics = None
        # Resuming appends; lines past the checkpoint (from the interrupted run) are superseded by the new ones.
        with open(run.metrics_path, "a", encoding="utf-8") as out:
            while self.step < run.steps:
                metrics = self.train_step()
                out.write(json.dumps(metrics) + "\n")
                out.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']['total']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}",
                                    refresh=False)
                    bar.update(1)
                if self.step % run.checkpoint_every == 0 or self.step == run.steps:
                    self.save()
        if bar is not None:
            bar.close()
        return metrics
