"""The training objective: one forward, the losses, one backward (SPEC §4, §5, §6.3, §7).

    total = ce + z + balance,   balance = Σ_{MoE layers} mean_{sequences} L_Bal   (SPEC §14 #6)

`loss_and_grads` is the public entry the trainer, the inspector and every backend's conformance test share.
"""

from __future__ import annotations

import numpy as np

from .config import Config
from .losses import balance_loss_backward, balance_loss_forward, cross_entropy_backward, cross_entropy_forward
from .model import model_backward, model_forward

__all__ = ["loss_and_grads"]


def loss_and_grads(config: Config, params: dict, tokens, labels, doc_ids=None, recompute=False):
    """Losses, gradients of `total` w.r.t. every parameter, and routing statistics.

    tokens, labels: int [B, T] with Hugging Face `labels` semantics (shifted inside, −100 ignored); doc_ids
    optional [B, T] for the intra-document mask (SPEC §4.6). recompute=True keeps only each layer's input and runs
    its forward again in the backward (less memory, bitwise-equal gradients).

    Returns (losses, grads, stats):
      losses: dict total, ce, z, balance (floats; z uses config.z_loss_coeff, balance config.balance_loss_coeff);
      grads:  exactly the keys of params (expert_bias gets zeros: it is not trained by gradient);
      stats:  {"layers": {l: {"expert_counts": int [E] (token, slot) assignments under the biased selection,
               "router_score_mean": float}} for MoE layers, "logits_max", "logits_mean", "tokens": counted tokens}.
    """
    c = config
    out, ctx = model_forward(c, params, tokens, doc_ids, keep_ctx=True, recompute=recompute)
    ce, zl, ce_ctx = cross_entropy_forward(out, labels, c.z_loss_coeff)
    B, T = out.shape[:2]

    balance = 0.0
    dscores = [None] * c.num_hidden_layers
    stats = {"layers": {}, "logits_max": float(out.max()), "logits_mean": float(out.mean()),
             "tokens": int(ce_ctx[2].sum())}
    for layer, routing in enumerate(ctx["routing"]):
        if routing is None:
            continue
        scores, chosen, counts = routing
        stats["layers"][layer] = {"expert_counts": counts.copy(), "router_score_mean": float(scores.mean())}
        if c.balance_loss_coeff > 0:
            E, K = scores.shape[-1], chosen.shape[-1]
            lb, lb_ctx = balance_loss_forward(scores.reshape(B, T, E), chosen.reshape(B, T, K), K,
                                              c.balance_loss_coeff)
            balance += lb
            dscores[layer] = balance_loss_backward(lb_ctx).reshape(B * T, E)

    dlogits = cross_entropy_backward(ce_ctx)
    grads, _ = model_backward(c, params, ctx, dlogits, dscores)
    losses = {"total": ce + zl + balance, "ce": ce, "z": zl, "balance": balance}
    return losses, grads, stats
