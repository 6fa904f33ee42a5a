"""One training step, the same function for the trainer, the step inspector and the benchmarks, in one process and
under every parallel layout (docs/distributed.md; SPEC §6, §7, §9, §14 #8).

    1. The global batch: S sequences of T tokens, defined by the loader and the same whatever the layout. This rank
       takes its data-parallel slice of the sequences (mesh.local_sequences) and its context-parallel chunks of each
       (mesh.local_positions), the targets of its positions coming from the whole sequences.
    2. Micro-batches of `micro_batch_size` of those sequences: forward + backward each. Every loss is a sum over this
       rank's tokens divided by the step's global denominators (objective.LossScale: the counted tokens of the whole
       step, its sequences and their length), so the shares of every rank and micro-batch add up to the step's mean
       losses and their gradients to its gradient. Gradients leave the model bucket by bucket through the op table's
       hand_back_grads seam (FSDP: reduce-scattered there) and are summed over micro-batches; after the last, the
       end_gradients seam sums them over the replicas (and finishes what FSDP deferred to the step's end).
    3. Expert counts, loss shares and the gradient norm are summed over the mesh.
    4. Global-norm clipping, the load-balancing update of every expert_bias (SPEC §6.1), then the optimizer
       (SPEC §9) — the caller applies them (`apply_update`) only when the loss and norm are finite.

Every reduction goes through the mesh; `LOCAL` is the mesh of one process, where each is the identity. A reduction
names its group from one vocabulary (training/groups.py): "world" (every rank holding different tokens), "dp" (the
data-parallel ranks, each its own sequences), "cp" (the ranks holding chunks of the same sequences), "fsdp" (the
ranks holding different parts of the gradients, for the clip norm), "dp_replicate" (the ranks holding the same part
of the gradients but different tokens: their gradients are summed once per step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from ..model.config import Config
from ..model.model import check_inputs
from ..model.objective import LossScale, loss_and_grads
from ..model.seams import SingleProcessSeams
from ..operators.array_module import array_namespace
from ..operators.losses import IGNORE_INDEX
from .balancing import balance_step, momentum_key
from .groups import check_group
from .optim import clip_grad_norm, grad_norm, optimizer_step

__all__ = ["LocalMesh", "LOCAL", "GlobalBatch", "Gradients", "RankInputs", "rank_inputs", "compute_gradients",
           "apply_update", "LOSS_PARTS"]

LOSS_PARTS = ("total", "ce", "z", "balance")


class LocalMesh:
    """The mesh of one process: one rank holds every sequence, every position and every parameter whole, so each
    reduction is the identity and the optimizer is training/optim.py's. It has the whole interface of
    trinity.distributed's Mesh that the trainer, the step and the seams use, so no caller asks which mesh it has."""

    sizes = {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "ep": 1}
    rank, world_size = 0, 1

    def begin_step(self, step: int) -> None:
        """A training step begins (a distributed mesh tags its traces and restarts its byte counts)."""

    def take_traffic(self) -> dict:
        """The bytes sent since the last call, {(kind, group): bytes}: none in one process."""
        return {}

    @staticmethod
    def whole_state(config, params, optimizer_state) -> tuple[dict, dict]:
        """(params, optimizer state) as whole arrays: they are whole here."""
        return params, optimizer_state

    def local_sequences(self, num_sequences: int) -> slice:
        """The rows of the global batch this rank trains on."""
        return slice(0, num_sequences)

    def local_positions(self, seq_len: int, xp=np):
        """The positions of each sequence this rank holds, increasing, as an array of module `xp` (the batch's)."""
        return xp.arange(seq_len)

    def sum(self, value, group: str):
        """Σ of `value` (a number or an array) over the ranks of `group` (one of groups.GROUPS)."""
        check_group(group)
        return value

    def max(self, value, group: str):
        check_group(group)
        return value

    def set_phase(self, phase: str, layer=None) -> None:
        """Where in the step the next collectives happen (a distributed mesh records it in its traces)."""

    @contextlib.contextmanager
    def evaluation(self):
        """An evaluation runs inside (a distributed mesh traces its collectives as "eval/<phase>")."""
        yield self

    @staticmethod
    def optimizer_step(config, params, grads, state, muon_lr, adamw_lr, kernels=None, observe=None):
        return optimizer_step(config, params, grads, state, muon_lr, adamw_lr, kernels, observe=observe)


LOCAL = LocalMesh()


@dataclass
class GlobalBatch:
    """The step's sequences: tokens [S, T]; labels [S, T] with Hugging Face semantics (position t predicts
    labels[t+1], −100 ignored; default: the tokens); doc_ids [S, T] for the intra-document mask, or None.

    `rows` = slice(a, b) when the arrays hold only rows a … b−1 of a global batch of `sequences` rows (a rank reads
    only its own rows, mesh.local_sequences); None: they are the whole batch."""
    tokens: np.ndarray
    labels: np.ndarray | None = None
    doc_ids: np.ndarray | None = None
    rows: slice | None = None
    sequences: int | None = None

    def __post_init__(self):
        if self.labels is None:
            self.labels = self.tokens
        if self.rows is None:
            self.sequences = self.tokens.shape[0]
        elif self.sequences is None or self.rows.stop - self.rows.start != self.tokens.shape[0]:
            raise ValueError(f"GlobalBatch: rows {self.rows} of {self.sequences} sequences do not match tokens of "
                             f"shape {tuple(self.tokens.shape)}")

    @property
    def shape(self):
        """(S, T) of the global batch."""
        return (self.sequences, self.tokens.shape[1])

    def counted_tokens(self, mesh) -> int:
        """The global batch's counted target positions (labels[:, 1:] != −100): S·(T−1) when the labels are the
        tokens; else counted here, summed over the data-parallel ranks when this batch is one rank's rows."""
        S, T = self.shape
        if self.labels is self.tokens:
            return S * (T - 1)
        xp = array_namespace(self.labels)
        here = int(xp.count_nonzero(xp.asarray(self.labels)[:, 1:] != IGNORE_INDEX))
        return here if self.rows is None else int(mesh.sum(here, "dp"))


@dataclass
class Gradients:
    """What compute_gradients returns: everything summed over micro-batches and the mesh, except `grads` (as the
    hand_back_grads seam keeps them: this rank's shards under FSDP; whole in one process, unclipped)."""
    grads: dict
    losses: dict  # the step's mean losses, LOSS_PARTS
    grad_norm: float  # before clipping
    counts: dict  # {MoE layer: (token, slot) assignments per expert [E]}
    tokens: int  # counted tokens of the step
    sequences: int
    logits_max: float
    logits_mean: float
    batch_het: float | None = None  # max_i L_i − mean_i L_i over the step's micro-batches (SPEC §6.4); None: one
    stats: list = field(default_factory=list)  # this rank's loss_and_grads stats per micro-batch

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.losses["total"]) and np.isfinite(self.grad_norm))


def _aligned_targets(labels):
    """targets [S, T]: targets[:, t] = labels[:, t+1], −100 at the last position (which predicts nothing)."""
    xp = array_namespace(labels)
    last = xp.full((labels.shape[0], 1), IGNORE_INDEX, dtype=xp.int64)
    return xp.concat([xp.astype(labels[:, 1:], xp.int64), last], axis=1)


def _columns(x, positions, whole: bool):
    """x[:, positions] for a [S, T] array (x itself when this rank holds every position)."""
    if whole:
        return x
    xp = array_namespace(x)
    return xp.take(x, xp.asarray(positions), axis=1)


class RankInputs(NamedTuple):
    """What this rank computes of a GlobalBatch: its rows (mesh.local_sequences) at its positions
    (mesh.local_positions). `whole`: it holds whole sequences, so `targets` are the labels with Hugging Face's shift
    still to apply (shift=True); else `targets[:, t]` is what position `positions[t]` predicts (shift=False)."""
    tokens: object
    targets: object
    doc_ids: object
    positions: object
    whole: bool
    rows: slice  # this rank's rows within the batch's arrays


def rank_inputs(batch: GlobalBatch, mesh=LOCAL) -> RankInputs:
    """This rank's part of `batch` (step 1 of the module docstring): the same cut for training and evaluation."""
    S, T = batch.shape
    rows = mesh.local_sequences(S)
    if batch.rows is not None:  # the batch holds this rank's rows only
        if (batch.rows.start, batch.rows.stop) != (rows.start, rows.stop):
            raise ValueError(f"the batch holds rows {batch.rows.start}:{batch.rows.stop} of {S}, this rank trains "
                             f"rows {rows.start}:{rows.stop}")
        rows = slice(0, rows.stop - rows.start)
    xp = array_namespace(batch.tokens)
    positions = mesh.local_positions(T, xp)
    whole = positions.shape[0] == T  # this rank holds whole sequences: the labels keep HF's shift
    labels = xp.asarray(batch.labels)
    targets = labels if whole else _aligned_targets(labels)
    return RankInputs(tokens=_columns(batch.tokens[rows, :], positions, whole),
                      targets=_columns(targets[rows, :], positions, whole),
                      doc_ids=None if batch.doc_ids is None else _columns(batch.doc_ids[rows, :], positions, whole),
                      positions=positions, whole=whole, rows=rows)


def compute_gradients(config: Config, params, batch: GlobalBatch, *, micro_batch_size: int | None = None, ops=None,
                      mesh=LOCAL, recompute: bool = False, check: bool = True) -> Gradients:
    """Steps 1-3 of the module docstring: the losses, gradients and expert counts of one step of `batch`.
    micro_batch_size: sequences per forward on this rank (default: all of its sequences at once)."""
    c = config
    S, T = batch.shape
    if check:
        check_inputs(c, params, batch.tokens, batch.doc_ids)
    mine = rank_inputs(batch, mesh)
    tokens, targets, docs, positions, whole = mine.tokens, mine.targets, mine.doc_ids, mine.positions, mine.whole
    xp = array_namespace(tokens)
    scale = LossScale(tokens=batch.counted_tokens(mesh), sequences=S, seq_len=T)
    local = tokens.shape[0]
    mbs = local if micro_batch_size is None else micro_batch_size
    if local % max(mbs, 1):
        raise ValueError(f"{local} sequences on this rank are not a whole number of micro-batches of {mbs}")
    grads_sum, counts, parts = None, {}, dict.fromkeys(LOSS_PARTS, 0.0)
    micro_losses, all_stats = [], []
    logit_max, logit_mean_sum = -np.inf, 0.0
    counted_rows = xp.asarray(batch.labels)[mine.rows, 1:] != IGNORE_INDEX  # whole sequences' counted targets
    for m0 in range(0, local, max(mbs, 1)):
        mb = slice(m0, m0 + mbs)
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is caught by the caller, by name
            # each micro-batch's gradients are added into the running sums as its backward hands them back, so one
            # set of gradients exists at a time (the same sums, in the same order, as adding whole sets after)
            losses, grads, stats = loss_and_grads(c, params, tokens[mb, :], targets[mb, :],
                                                  None if docs is None else docs[mb, :], recompute=recompute, ops=ops,
                                                  positions=None if whole else positions, shift=whole, scale=scale,
                                                  check=False, grads_into=grads_sum)
        grads_sum = grads
        for layer, s in stats["layers"].items():
            counts[layer] = counts.get(layer, 0) + s["expert_counts"]
        for k in LOSS_PARTS:
            parts[k] += losses[k]
        # this micro-batch's own mean loss (its share rescaled by its own denominators), for BatchHet
        own_tokens = max(int(xp.count_nonzero(counted_rows[mb, :])), 1)
        micro_losses.append((losses["ce"] + losses["z"]) * scale.tokens / own_tokens
                            + losses["balance"] * S / (mb.stop - mb.start))
        logit_max = max(logit_max, stats["logits_max"])
        logit_mean_sum += stats["logits_mean"]
        all_stats.append(stats)
    mesh.set_phase("reductions")
    # the replicas' sums, once per step, and whatever the parameter seam deferred to the step's end (FSDP reduced
    # within a replica already, or does it now: reduce_gradients="step")
    grads_sum = (ops if ops is not None else SingleProcessSeams()).end_gradients(grads_sum, mesh)
    micro_losses = mesh.sum(np.asarray(micro_losses, dtype=np.float64), "cp")
    counts = {layer: mesh.sum(n, "world") for layer, n in counts.items()}
    summed = mesh.sum(np.array([parts[k] for k in LOSS_PARTS], dtype=np.float64), "world")
    micro_total = len(all_stats) * mesh.sizes["dp_replicate"] * mesh.sizes["dp_shard"] * mesh.sizes["cp"]
    return Gradients(
        grads=grads_sum, losses=dict(zip(LOSS_PARTS, map(float, summed))),
        grad_norm=grad_norm(grads_sum, ops, lambda total: mesh.sum(total, "fsdp")),
        counts=counts, tokens=scale.tokens, sequences=S, logits_max=float(mesh.max(logit_max, "world")),
        logits_mean=float(mesh.sum(logit_mean_sum, "world")) / max(micro_total, 1),
        batch_het=_batch_het(micro_losses, mesh), stats=all_stats)


def _batch_het(micro_losses: np.ndarray, mesh) -> float | None:
    """BatchHet = max_i L_i − mean_i L_i over the micro-batches of every data-parallel rank (SPEC §6.4)."""
    dp = mesh.sizes["dp_replicate"] * mesh.sizes["dp_shard"]
    if len(micro_losses) * dp < 2:
        return None
    top = float(mesh.max(float(micro_losses.max()), "dp"))
    return top - float(mesh.sum(float(micro_losses.sum()), "dp")) / (len(micro_losses) * dp)


def apply_update(config: Config, params, optimizer_state: dict, balancing_state: dict, gradients: Gradients,
                 muon_lr: float, adamw_lr: float, *, ops=None, mesh=LOCAL, on_clip: Callable | None = None,
                 on_balance: Callable | None = None, observe: Callable | None = None) -> dict:
    """Step 4: clip the gradients to config.grad_clip_norm by the step's global norm, move every expert_bias by the
    step's counts (before the parameter update, SPEC §6.1), then one optimizer step at the given learning rates.
    Updates params and the states in place. Returns {"clipped_grads", "balance": {layer: metrics}, "optimizer":
    optimizer_step's info}.

    Hooks for the step inspector: on_clip(norm, scale); on_balance(layer, counts, bias_before, momentum_before,
    metrics) after each layer's update; observe(key, group, X, G, lr, state) before each parameter's update,
    returning a callable run after it (or None) (optim.optimizer_step).
    """
    c = config
    norm = gradients.grad_norm
    grads, _ = clip_grad_norm(gradients.grads, c.grad_clip_norm, ops, norm=norm)
    if on_clip is not None:
        on_clip(norm, min(1.0, c.grad_clip_norm / norm) if c.grad_clip_norm > 0 and norm > 0 else 1.0)
    balance = {}
    for layer in sorted(gradients.counts):
        key = f"model.layers.{layer}.mlp.expert_bias"
        before = params[key]
        momentum = balancing_state.get(momentum_key(key))
        momentum = None if momentum is None else array_namespace(momentum).asarray(momentum, copy=True)
        balance.update(balance_step(c, params, balancing_state, {layer: gradients.counts[layer]}))
        if on_balance is not None:
            on_balance(layer, gradients.counts[layer], before, momentum, balance[layer])
    mesh.set_phase("optimizer")
    info = mesh.optimizer_step(c, params, grads, optimizer_state, muon_lr, adamw_lr, kernels=ops, observe=observe)
    return {"clipped_grads": grads, "balance": balance, "optimizer": info}
