"""The routed-expert operators of the MoE feed-forward: dispatch, grouped experts, combine (SPEC §4.9).

    y_MoE(x) = FFN_shared(x) + Σ_{k=1..K} g_k · FFN_{e_k}(x),   FFN_e(x) = W2_e (silu(W1_e x) ⊙ W3_e x)

The routed part is three steps (composed with the router and shared expert in layers.moe_forward), so that expert
parallelism can later replace the first and last by all-to-alls:
  dispatch: sort the N·K (token, slot) assignments by expert, so each expert's tokens form one contiguous block;
  experts:  one matrix product per expert over its block (an expert with no tokens costs nothing);
  combine:  scale each expert output by its gate g and add it back to its token's row.
There is no capacity factor and no token dropping.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .activations import sigmoid
from .mlp import swiglu_backward, swiglu_forward

__all__ = ["Dispatch", "dispatch", "experts_forward", "experts_backward", "combine", "combine_backward",
           "scatter_to_tokens"]


class Dispatch(NamedTuple):
    """Assignments grouped by expert: rows [offsets[e], offsets[e+1]) of the grouped arrays belong to expert e."""
    token: np.ndarray  # [N·K] token index of each grouped row
    slot: np.ndarray  # [N·K] which of the token's K choices it is
    offsets: np.ndarray  # [E+1]
    counts: np.ndarray  # [E] tokens per expert (the load that balancing reads)


def dispatch(experts, num_experts):
    """Group the (token, slot) assignments of `experts` [N, K] by expert id (stable: tokens in order)."""
    N, K = experts.shape
    order = np.argsort(experts.reshape(-1), kind="stable")
    counts = np.bincount(experts.reshape(-1), minlength=num_experts)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return Dispatch(order // K, order % K, offsets, counts)


def experts_forward(x_grouped, offsets, w1, w3, w2):
    """FFN_e on each expert's contiguous block of rows: x_grouped [M, d] → y_grouped [M, d] (SPEC §4.9).

    w1, w3: [E, I, d]; w2: [E, d, I]. ctx per row block: the gate and up pre-activations a, c and h = silu(a) ⊙ c.
    """
    M, d = x_grouped.shape
    I = w1.shape[1]
    a = np.empty((M, I), dtype=x_grouped.dtype)
    c = np.empty_like(a)
    h = np.empty_like(a)
    y = np.empty((M, d), dtype=x_grouped.dtype)
    for e in range(w1.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        xe = x_grouped[lo:hi]
        a[lo:hi] = xe @ w1[e].T
        c[lo:hi] = xe @ w3[e].T
        h[lo:hi], _ = swiglu_forward(a[lo:hi], c[lo:hi])
        y[lo:hi] = h[lo:hi] @ w2[e].T
    return y, (x_grouped, offsets, a, c, h)


def experts_backward(ctx, dy_grouped, w1, w3, w2):
    """Per expert block (SPEC §5 "Expert combine" and "SwiGLU"): dh = dy W2_e, dW2_e = dyᵀ h,
    (da, dc) = SwiGLU backward, dW1_e = daᵀ x, dW3_e = dcᵀ x, dx = da W1_e + dc W3_e.
    Experts with no tokens get zero gradients. Returns (dx_grouped, dW1, dW3, dW2)."""
    x_grouped, offsets, a, c, h = ctx
    dx = np.empty_like(x_grouped)
    dw1, dw3, dw2 = np.zeros_like(w1), np.zeros_like(w3), np.zeros_like(w2)
    for e in range(w1.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        dy = dy_grouped[lo:hi]
        dh = dy @ w2[e]
        dw2[e] = dy.T @ h[lo:hi]
        da, dc = swiglu_backward((a[lo:hi], c[lo:hi], sigmoid(a[lo:hi])), dh)
        xe = x_grouped[lo:hi]
        dw1[e] = da.T @ xe
        dw3[e] = dc.T @ xe
        dx[lo:hi] = da @ w1[e] + dc @ w3[e]
    return dx, dw1, dw3, dw2


def combine(y_grouped, weights, plan: Dispatch, num_tokens):
    """y[t] = Σ_k g[t,k] · y_grouped[row of (t,k)] (SPEC §4.9: gates multiply expert outputs)."""
    scaled = weights[plan.token, plan.slot][:, None] * y_grouped
    return scatter_to_tokens(scaled, plan, num_tokens, weights.shape[1])


def combine_backward(dy, y_grouped, weights, plan: Dispatch):
    """Each grouped row (t, k) gets g[t,k]·dy[t]; each gate gets dg[t,k] = ⟨dy[t], FFN_{e_k}(x_t)⟩ (SPEC §5)."""
    dy_rows = dy[plan.token]
    dweights = np.zeros_like(weights)
    dweights[plan.token, plan.slot] = np.einsum("md,md->m", dy_rows, y_grouped)
    return weights[plan.token, plan.slot][:, None] * dy_rows, dweights


def scatter_to_tokens(rows, plan: Dispatch, num_tokens, top_k):
    """Σ over a token's K grouped rows: the transpose of gathering x[plan.token] (the dispatch)."""
    per_slot = np.empty((num_tokens * top_k, rows.shape[1]), dtype=rows.dtype)
    per_slot[plan.token * top_k + plan.slot] = rows
    return per_slot.reshape(num_tokens, top_k, rows.shape[1]).sum(axis=1)
