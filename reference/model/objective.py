"""The training objective: one forward, the losses, one backward (SPEC §4, §5, §6.3, §7).

    total = ce + z + balance,   balance = Σ_{MoE layers} mean_{sequences} L_Bal   (SPEC §14 #6)

`loss_and_grads` is the public entry the trainer, the inspector and every backend's conformance test share;
`evaluate_losses` is its forward half alone (evaluation, finite differences).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..operators.array_module import array_namespace
from .config import Config
from .model import model_backward, model_forward
from .ops import REFERENCE

__all__ = ["loss_and_grads", "evaluate_losses", "LossScale"]


class LossScale(NamedTuple):
    """The denominators of the step's losses, for a rank or micro-batch that holds part of the step's batch: the
    counted tokens of the whole step (cross-entropy and z-loss), its number of sequences and their length (the
    balance loss's mean over sequences and tokens). Each part's losses and gradients are then its share of the
    step's, and the shares add up."""
    tokens: int
    sequences: int
    seq_len: int


def _forward_losses(config: Config, params: dict, tokens, labels, doc_ids, keep_ctx, recompute=False, embeds=None,
                    ops=None, positions=None, shift=True, scale: LossScale | None = None, check=True):
    """Forward and every loss; also the loss ctxs (for the backward) and the routing statistics."""
    c, ops = config, ops or REFERENCE
    out, ctx = model_forward(c, params, tokens, doc_ids, keep_ctx=True, recompute=recompute, embeds=embeds, ops=ops,
                             positions=positions, check=check)
    ce, zl, ce_ctx = ops.cross_entropy_forward(out, labels, c.z_loss_coeff, shift=shift,
                                               denom=None if scale is None else max(scale.tokens, 1))
    xp = array_namespace(out)
    B, T = out.shape[:2]
    some = math.prod(out.shape) > 0
    per_sequence = {} if scale is None else dict(seq_len=scale.seq_len, num_sequences=scale.sequences,
                                                 sequence_sum=ops.sequence_sum)
    balance = 0.0
    balance_ctxs = [None] * c.num_hidden_layers
    stats = {"layers": {}, "logits_max": float(xp.max(out)) if some else -math.inf,
             "logits_mean": float(xp.mean(out)) if some else 0.0, "tokens": int(xp.count_nonzero(ce_ctx.valid))}
    for layer, routing in enumerate(ctx["routing"]):
        if routing is None:
            continue
        scores, chosen, counts = routing
        stats["layers"][layer] = {"expert_counts": xp.asarray(counts, copy=True),
                                  "router_score_mean": float(xp.mean(scores)),
                                  "chosen_experts": xp.reshape(chosen, (B, T, -1))}
        if c.balance_loss_coeff > 0:
            E, K = scores.shape[-1], chosen.shape[-1]
            with ops.scope(f"model.layers.{layer}.mlp"):  # where the step inspector names it
                lb, balance_ctxs[layer] = ops.balance_loss_forward(xp.reshape(scores, (B, T, E)),
                                                                   xp.reshape(chosen, (B, T, K)), K,
                                                                   c.balance_loss_coeff, **per_sequence)
            balance += lb
    losses = {"total": ce + zl + balance, "ce": ce, "z": zl, "balance": balance}
    return losses, stats, (ctx if keep_ctx else None), ce_ctx, balance_ctxs


def evaluate_losses(config: Config, params: dict, tokens, labels, doc_ids=None, embeds=None, ops=None, *,
                    positions=None, shift=True, scale: LossScale | None = None, check=True):
    """The losses dict and stats of `loss_and_grads`, without the backward: nothing is kept for one (the forward
    keeps each layer's input only for the routing statistics, as under recompute). embeds: see model_forward;
    positions, shift, scale and check as in loss_and_grads (evaluation of part of a batch, training/evaluation.py)."""
    losses, stats, _, _, _ = _forward_losses(config, params, tokens, labels, doc_ids, keep_ctx=False, recompute=True,
                                             embeds=embeds, ops=ops, positions=positions, shift=shift, scale=scale,
                                             check=check)
    return losses, stats


def loss_and_grads(config: Config, params: dict, tokens, labels, doc_ids=None, recompute=False, embeds=None,
                   ops=None, *, positions=None, shift=True, scale: LossScale | None = None, check=True,
                   grads_into: dict | None = None):
    """Losses, gradients of `total` w.r.t. every parameter, and routing statistics.

    tokens, labels: int [B, T] with Hugging Face `labels` semantics (shifted inside, −100 ignored); doc_ids
    optional [B, T] for the intra-document mask (SPEC §4.6). recompute=True keeps only each layer's input and runs
    its forward again in the backward (less memory, bitwise-equal gradients). embeds: see model_forward. ops: the
    op table (None: the NumPy reference).

    For part of a training step (training/step.py): positions [T] the tokens' positions (a context-parallel rank's
    chunks), shift=False with labels already aligned to positions (labels[t] is what position t predicts), and
    scale (LossScale) the step's denominators, so that the losses and gradients are this part's share of the
    step's. check=False skips the parameter and input checks (the step checks once). grads_into: the gradients
    of earlier micro-batches (as the hand_back_grads seam returned them): this part's are added into those arrays in
    place, bucket by bucket as the backward hands them back, and those arrays are returned (model_backward's `into`).

    Returns (losses, grads, stats):
      losses: dict total, ce, z, balance (floats; z uses config.z_loss_coeff, balance config.balance_loss_coeff);
      grads:  exactly the keys of params (expert_bias gets zeros: it is not trained by gradient);
      stats:  {"layers": {l: {"expert_counts": int [E] (token, slot) assignments under the biased selection,
               "router_score_mean": float, "chosen_experts": int [B, T, K]}} for MoE layers,
               "logits_max", "logits_mean", "tokens": the number of tokens the CE counts,
               "embedding_output_grad": d total / d x⁰ [B, T, d], x⁰ = m·E_emb[tok] the residual stream's input}.
    """
    losses, stats, ctx, ce_ctx, balance_ctxs = _forward_losses(config, params, tokens, labels, doc_ids,
                                                               keep_ctx=True, recompute=recompute, embeds=embeds,
                                                               ops=ops, positions=positions, shift=shift,
                                                               scale=scale, check=check)
    ops = ctx["ops"]
    dscores = []
    for lb_ctx in balance_ctxs:
        ds = None if lb_ctx is None else ops.balance_loss_backward(lb_ctx)
        dscores.append(None if ds is None else array_namespace(ds).reshape(ds, (-1, ds.shape[-1])))
    grads, stats["embedding_output_grad"] = model_backward(config, params, ctx, ops.cross_entropy_backward(ce_ctx),
                                                           dscores, into=grads_into)
    return losses, grads, stats
