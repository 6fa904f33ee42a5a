"""The MoE feed-forward: router, routed experts grouped by expert, shared expert, combine (SPEC §4.8, §4.9).

    y_MoE(x) = FFN_shared(x) + Σ_{k=1..K} g_k · FFN_{e_k}(x),   FFN_e(x) = W2_e (silu(W1_e x) ⊙ W3_e x)

The routed part is three steps, so that expert parallelism can later replace the first and last by all-to-alls:
  dispatch: sort the N·K (token, slot) assignments by expert, so each expert's tokens form one contiguous block;
  experts:  one matrix product per expert over its block (an expert with no tokens costs nothing);
  combine:  scale each expert output by its gate g and add it back to its token's row.
There is no capacity factor and no token dropping.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .activations import sigmoid
from .mlp import swiglu_backward, swiglu_forward, swiglu_mlp_backward, swiglu_mlp_forward
from .router import router_backward, router_forward

__all__ = ["Dispatch", "dispatch", "experts_forward", "experts_backward", "combine", "combine_backward", "moe_forward",
           "moe_backward"]


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
    return per_slot.reshape(num_tokens, top_k, -1).sum(axis=1)


def moe_forward(x, p, prefix, top_k, route_scale):
    """The MoE block for tokens x [N, d] with the layer's params p under `prefix` (…mlp.). Returns (y, ctx) with
    ctx = dict(router, plan, experts, shared, weights) — everything the backward and the balancing stats need."""
    weights, chosen, router_ctx = router_forward(x, p[prefix + "router.gate.weight"], p[prefix + "expert_bias"],
                                                 top_k, route_scale)
    num_experts = p[prefix + "router.gate.weight"].shape[0]
    plan = dispatch(chosen, num_experts)
    y_grouped, experts_ctx = experts_forward(x[plan.token], plan.offsets, p[prefix + "experts.gate_proj"],
                                             p[prefix + "experts.up_proj"], p[prefix + "experts.down_proj"])
    y = combine(y_grouped, weights, plan, x.shape[0])
    shared_ctx = None
    if prefix + "shared_experts.gate_proj.weight" in p:
        s = prefix + "shared_experts."
        y_shared, shared_ctx = swiglu_mlp_forward(x, p[s + "gate_proj.weight"], p[s + "up_proj.weight"],
                                                  p[s + "down_proj.weight"])
        y = y + y_shared
    ctx = dict(router=router_ctx, plan=plan, experts=experts_ctx, y_grouped=y_grouped, weights=weights,
               shared=shared_ctx)
    return y, ctx


def moe_backward(ctx, dy, p, prefix, dscores=None):
    """Backward of moe_forward for dy [N, d]: the input gradient sums the shared expert, the K routed experts and
    the router (SPEC §5). `dscores` [N, E] is the balance loss's gradient on the router scores (SPEC §6.3).
    Returns (dx, grads) with grads keyed like params under `prefix`."""
    plan, weights = ctx["plan"], ctx["weights"]
    N, K = weights.shape
    grads = {}
    dy_grouped, dweights = combine_backward(dy, ctx["y_grouped"], weights, plan)
    dx_grouped, dw1, dw3, dw2 = experts_backward(ctx["experts"], dy_grouped, p[prefix + "experts.gate_proj"],
                                                 p[prefix + "experts.up_proj"], p[prefix + "experts.down_proj"])
    grads[prefix + "experts.gate_proj"], grads[prefix + "experts.up_proj"] = dw1, dw3
    grads[prefix + "experts.down_proj"] = dw2
    dx = scatter_to_tokens(dx_grouped, plan, N, K)
    dx_router, grads[prefix + "router.gate.weight"] = router_backward(ctx["router"], dweights, dscores)
    dx += dx_router
    grads[prefix + "expert_bias"] = np.zeros_like(p[prefix + "expert_bias"])  # selection only: no gradient
    if ctx["shared"] is not None:
        dx_shared, (dwg, dwu, dwd) = swiglu_mlp_backward(ctx["shared"], dy)
        s = prefix + "shared_experts."
        grads[s + "gate_proj.weight"], grads[s + "up_proj.weight"], grads[s + "down_proj.weight"] = dwg, dwu, dwd
        dx += dx_shared
    return dx, grads
