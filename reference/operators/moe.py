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

from .activations import sigmoid
from .array_module import array_namespace
from .mlp import swiglu_backward, swiglu_forward
from .scatter import run_offsets

__all__ = ["Dispatch", "dispatch", "experts_forward", "experts_backward", "combine", "combine_backward",
           "scatter_to_tokens"]


class Dispatch(NamedTuple):
    """Assignments grouped by expert: rows [offsets[e], offsets[e+1]) of the grouped arrays belong to expert e."""
    token: object  # [N·K] token index of each grouped row
    slot: object  # [N·K] which of the token's K choices it is
    offsets: object  # [E+1]
    counts: object  # [E] tokens per expert (the load that balancing reads)


def dispatch(experts, num_experts):
    """Group the (token, slot) assignments of `experts` [N, K] by expert id (stable: tokens in order). Grouped row
    j holds the assignment at flat index order_j = token·K + slot of `experts`."""
    xp = array_namespace(experts)
    N, K = experts.shape
    flat = xp.reshape(experts, (-1,))
    order = xp.argsort(flat, stable=True)
    offsets = run_offsets(xp.take(flat, order), num_experts)  # the count-and-cumulative-sum by binary search
    return Dispatch(order // K, order % K, offsets, offsets[1:] - offsets[:-1])


def _blocks(offsets):
    """The (expert, first row, end row) of every expert with rows, as Python ints."""
    bounds = [int(offsets[e]) for e in range(offsets.shape[0])]
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if lo < hi]


def experts_forward(x_grouped, offsets, w1, w3, w2):
    """FFN_e on each expert's contiguous block of rows: x_grouped [M, d] → y_grouped [M, d] (SPEC §4.9).

    w1, w3: [E, I, d]; w2: [E, d, I]. ctx per row block: the gate and up pre-activations a, c and h = silu(a) ⊙ c.
    """
    xp = array_namespace(x_grouped)
    M, d = x_grouped.shape
    I = w1.shape[1]
    a = xp.empty((M, I), dtype=x_grouped.dtype)
    c = xp.empty_like(a)
    h = xp.empty_like(a)
    y = xp.empty((M, d), dtype=x_grouped.dtype)
    for e, lo, hi in _blocks(offsets):
        xe = x_grouped[lo:hi, ...]
        a[lo:hi, ...] = xe @ w1[e, ...].T
        c[lo:hi, ...] = xe @ w3[e, ...].T
        h[lo:hi, ...], _ = swiglu_forward(a[lo:hi, ...], c[lo:hi, ...])
        y[lo:hi, ...] = h[lo:hi, ...] @ w2[e, ...].T
    return y, (x_grouped, offsets, a, c, h)


def experts_backward(ctx, dy_grouped, w1, w3, w2):
    """Per expert block (SPEC §5 "Expert combine" and "SwiGLU"): dh = dy W2_e, dW2_e = dyᵀ h,
    (da, dc) = SwiGLU backward, dW1_e = daᵀ x, dW3_e = dcᵀ x, dx = da W1_e + dc W3_e.
    Experts with no tokens get zero gradients. Returns (dx_grouped, dW1, dW3, dW2)."""
    x_grouped, offsets, a, c, h = ctx
    xp = array_namespace(dy_grouped, x_grouped)
    dx = xp.empty_like(x_grouped)
    dw1, dw3, dw2 = xp.zeros_like(w1), xp.zeros_like(w3), xp.zeros_like(w2)
    for e, lo, hi in _blocks(offsets):
        dy = dy_grouped[lo:hi, ...]
        dh = dy @ w2[e, ...]
        dw2[e, ...] = dy.T @ h[lo:hi, ...]
        ae = a[lo:hi, ...]
        da, dc = swiglu_backward((ae, c[lo:hi, ...], sigmoid(ae)), dh)
        xe = x_grouped[lo:hi, ...]
        dw1[e, ...] = da.T @ xe
        dw3[e, ...] = dc.T @ xe
        dx[lo:hi, ...] = da @ w1[e, ...] + dc @ w3[e, ...]
    return dx, dw1, dw3, dw2


def _grouped_order(plan: Dispatch, top_k):
    """order_j = token_j·K + slot_j: the flat [N·K] index of grouped row j's assignment (a permutation)."""
    return plan.token * top_k + plan.slot


def combine(y_grouped, weights, plan: Dispatch, num_tokens):
    """y[t] = Σ_k g[t,k] · y_grouped[row of (t,k)] (SPEC §4.9: gates multiply expert outputs)."""
    xp = array_namespace(y_grouped, weights)
    gates = xp.take(xp.reshape(weights, (-1,)), _grouped_order(plan, weights.shape[1]))
    return scatter_to_tokens(gates[:, None] * y_grouped, plan, num_tokens, weights.shape[1])


def combine_backward(dy, y_grouped, weights, plan: Dispatch):
    """Each grouped row (t, k) gets g[t,k]·dy[t]; each gate gets dg[t,k] = ⟨dy[t], FFN_{e_k}(x_t)⟩ (SPEC §5).
    The gates' gradients come in grouped-row order; the inverse permutation of order puts them back in [N, K]."""
    xp = array_namespace(dy, y_grouped)
    N, K = weights.shape
    order = _grouped_order(plan, K)
    dy_rows = xp.take(dy, plan.token, axis=0)
    dgates = xp.vecdot(dy_rows, y_grouped, axis=-1)
    dweights = xp.reshape(xp.take(dgates, xp.argsort(order)), (N, K))
    gates = xp.take(xp.reshape(weights, (-1,)), order)
    return gates[:, None] * dy_rows, dweights


def scatter_to_tokens(rows, plan: Dispatch, num_tokens, top_k):
    """Σ over a token's K grouped rows: the transpose of gathering x[plan.token] (the dispatch).

    Grouped row j is assignment order_j = token_j·K + slot_j, and order is a permutation of [0, N·K), so the
    scatter rows → [N·K] is the gather by its inverse, argsort(order); then y[t] = Σ_k per_slot[t, k], slot by slot
    (no scatter-add needed)."""
    xp = array_namespace(rows)
    per_slot = xp.take(rows, xp.argsort(_grouped_order(plan, top_k)), axis=0)
    return xp.sum(xp.reshape(per_slot, (num_tokens, top_k, rows.shape[1])), axis=1)
