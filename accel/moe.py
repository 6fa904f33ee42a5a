"""The routed experts in numba + BLAS: dispatch, grouped expert FFNs, combine (SPEC §4.9, §5 "Expert combine").

dispatch   a counting sort of the N·K (token, slot) assignments by expert (stable, O(N·K)): the same Dispatch as
           the reference's stable argsort, so each expert's rows are one contiguous block, tokens in order.
experts    per expert one matrix product per stacked weight over its block (numpy @, i.e. BLAS, writing straight
           into the grouped output): [a | c] = x [W1; W3]ᵀ is one product of width 2I (wider products run closer to
           the BLAS peak than two of width I), then SwiGLU over all blocks at once in numba, then h W2ᵀ; experts
           with no tokens are skipped.
combine    per token y_t = Σ_k g_{t,k} · y_grouped[row(t, k)], a gather (no N·K×d temporary); scatter_to_tokens is
           the same gather without gates; combine_backward gives each grouped row g·dy and each gate ⟨dy, y⟩.
"""

from __future__ import annotations

import numpy as np

from trinity.reference.operators.moe import Dispatch

from ._jit import kernel, run_tasks
from .elementwise import swiglu_grads, swiglu_value

__all__ = ["dispatch", "experts_forward", "experts_backward", "combine", "combine_backward", "scatter_to_tokens"]

ROWS = 64  # tokens (or grouped rows) per task


@kernel
def _counting_sort(experts, num_experts, token, slot, offsets, counts):
    N, K = experts.shape
    for e in range(num_experts):
        counts[e] = 0
    for t in range(N):
        for k in range(K):
            counts[experts[t, k]] += 1
    offsets[0] = 0
    for e in range(num_experts):
        offsets[e + 1] = offsets[e] + counts[e]
    fill = offsets[:-1].copy()
    for t in range(N):
        for k in range(K):
            e = experts[t, k]
            token[fill[e]] = t
            slot[fill[e]] = k
            fill[e] += 1


def dispatch(experts, num_experts):
    """Group the (token, slot) assignments of `experts` [N, K] by expert id, stable (SPEC §4.9)."""
    ex = np.ascontiguousarray(experts, dtype=np.int64)
    if ex.size and (ex.min() < 0 or ex.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts})")
    M = ex.size
    token, slot = np.empty(M, dtype=np.int64), np.empty(M, dtype=np.int64)
    offsets, counts = np.empty(num_experts + 1, dtype=np.int64), np.empty(num_experts, dtype=np.int64)
    _counting_sort(ex, num_experts, token, slot, offsets, counts)
    return Dispatch(token, slot, offsets, counts)


@kernel
def _swiglu_rows_tasks(first, stride, n, backward, ac, dh, out):
    """Rows of ac [M, 2I] hold [a | c] of one grouped row. forward: out [M, I] = silu(a)·c;
    backward: out [M, 2I] = [da | dc] given dh [M, I]. Same per-element formulas as elementwise's SwiGLU."""
    M = ac.shape[0]
    I = ac.shape[1] // 2
    for task in range(first, n, stride):
        for r in range(task * ROWS, min(M, (task + 1) * ROWS)):
            a, c = ac[r, :I], ac[r, I:]
            if backward:
                g, da, dc = dh[r], out[r, :I], out[r, I:]
                for j in range(I):
                    da[j], dc[j] = swiglu_grads(g[j], a[j], c[j])
            else:
                h = out[r]
                for j in range(I):
                    h[j] = swiglu_value(a[j], c[j])


def _stacked_w13(w1, w3):
    """[E, 2I, d]: each expert's W1 over its W3, so x ↦ [a | c] is one matrix product per expert."""
    return np.concatenate((w1, w3), axis=1)


def _blocks(offsets, num_experts):
    return [(e, offsets[e], offsets[e + 1]) for e in range(num_experts) if offsets[e + 1] > offsets[e]]


def experts_forward(x_grouped, offsets, w1, w3, w2):
    """FFN_e(x) = W2_e (silu(W1_e x) ⊙ W3_e x) on each expert's block of rows (SPEC §4.9); ctx (x, offsets, ac, h)
    with ac = [a | c] per row."""
    M, d = x_grouped.shape
    I = w1.shape[1]
    w13 = _stacked_w13(w1, w3)
    ac = np.empty((M, 2 * I), dtype=x_grouped.dtype)
    h = np.empty((M, I), dtype=x_grouped.dtype)
    y = np.empty((M, d), dtype=x_grouped.dtype)
    blocks = _blocks(offsets, w1.shape[0])
    for e, lo, hi in blocks:
        np.matmul(x_grouped[lo:hi], w13[e].T, out=ac[lo:hi])
    run_tasks(_swiglu_rows_tasks, -(-M // ROWS), False, ac, ac, h)
    for e, lo, hi in blocks:
        np.matmul(h[lo:hi], w2[e].T, out=y[lo:hi])
    return y, (x_grouped, offsets, ac, h)


def experts_backward(ctx, dy_grouped, w1, w3, w2):
    """(dx_grouped, dW1, dW3, dW2) per expert block (SPEC §5); experts with no tokens get zero gradients.
    dW1 and dW3 come out of one product [da | dc]ᵀ x, and dx = [da | dc] [W1; W3] is one product over 2I."""
    x_grouped, offsets, ac, h = ctx
    dy_grouped = np.ascontiguousarray(dy_grouped, dtype=x_grouped.dtype)
    E, I = w1.shape[0], w1.shape[1]
    w13 = _stacked_w13(w1, w3)
    dx = np.empty_like(x_grouped)
    dh = np.empty_like(h)
    dac = np.empty_like(ac)
    dw13, dw2 = np.zeros((E, 2 * I, w1.shape[2]), dtype=w1.dtype), np.zeros_like(w2)
    blocks = _blocks(offsets, E)
    for e, lo, hi in blocks:
        np.matmul(dy_grouped[lo:hi], w2[e], out=dh[lo:hi])
        np.matmul(dy_grouped[lo:hi].T, h[lo:hi], out=dw2[e])
    run_tasks(_swiglu_rows_tasks, -(-ac.shape[0] // ROWS), True, ac, dh, dac)
    for e, lo, hi in blocks:
        np.matmul(dac[lo:hi].T, x_grouped[lo:hi], out=dw13[e])
        np.matmul(dac[lo:hi], w13[e], out=dx[lo:hi])
    return dx, np.ascontiguousarray(dw13[:, :I]), np.ascontiguousarray(dw13[:, I:]), dw2


# ---- combine and its transposes -----------------------------------------------------------------------------------
@kernel
def _row_of(plan_token, plan_slot, num_tokens, top_k):
    """row[t, k] = the grouped row holding token t's k-th choice (the inverse of the dispatch permutation)."""
    row = np.empty((num_tokens, top_k), dtype=np.int64)
    for m in range(plan_token.shape[0]):
        row[plan_token[m], plan_slot[m]] = m
    return row


@kernel
def _gather_tasks(first, stride, n, rows, row, weights, weighted, out):
    """out[t] = Σ_k w[t,k]·rows[row[t,k]] (weighted) or Σ_k rows[row[t,k]], k in order 0…K−1."""
    N, K = row.shape
    d = rows.shape[1]
    for task in range(first, n, stride):
        for t in range(task * ROWS, min(N, (task + 1) * ROWS)):
            for j in range(d):
                out[t, j] = 0.0
            for k in range(K):
                m = row[t, k]
                if weighted:
                    g = weights[t, k]
                    for j in range(d):
                        out[t, j] += g * rows[m, j]
                else:
                    for j in range(d):
                        out[t, j] += rows[m, j]


@kernel
def _combine_backward_tasks(first, stride, n, dy, y_grouped, weights, plan_token, plan_slot, dy_grouped, dweights):
    M, d = y_grouped.shape
    for task in range(first, n, stride):
        for m in range(task * ROWS, min(M, (task + 1) * ROWS)):
            t = plan_token[m]
            k = plan_slot[m]
            g = weights[t, k]
            acc = 0.0
            for j in range(d):
                dy_grouped[m, j] = g * dy[t, j]
                acc += np.float64(dy[t, j]) * np.float64(y_grouped[m, j])
            dweights[t, k] = acc


def _gather(rows, plan, num_tokens, weights, top_k):
    rows = np.ascontiguousarray(rows)
    row = _row_of(plan.token, plan.slot, num_tokens, top_k)
    out = np.empty((num_tokens, rows.shape[1]), dtype=rows.dtype)
    w = np.ones((1, 1), dtype=rows.dtype) if weights is None else np.ascontiguousarray(weights, dtype=rows.dtype)
    run_tasks(_gather_tasks, -(-num_tokens // ROWS), rows, row, w, weights is not None, out)
    return out


def combine(y_grouped, weights, plan: Dispatch, num_tokens):
    """y[t] = Σ_k g[t,k] · y_grouped[row of (t,k)] (SPEC §4.9: gates multiply expert outputs)."""
    return _gather(y_grouped, plan, num_tokens, weights, weights.shape[1])


def combine_backward(dy, y_grouped, weights, plan: Dispatch):
    """(dy_grouped, dweights): row (t, k) gets g[t,k]·dy[t]; gate (t, k) gets ⟨dy[t], y_grouped[row]⟩ (SPEC §5)."""
    y_grouped = np.ascontiguousarray(y_grouped)
    dy = np.ascontiguousarray(dy, dtype=y_grouped.dtype)
    dy_grouped = np.empty_like(y_grouped)
    dweights = np.zeros_like(weights)
    run_tasks(_combine_backward_tasks, -(-y_grouped.shape[0] // ROWS), dy, y_grouped,
              np.ascontiguousarray(weights), plan.token, plan.slot, dy_grouped, dweights)
    return dy_grouped, dweights


def scatter_to_tokens(rows, plan: Dispatch, num_tokens, top_k):
    """Σ over a token's K grouped rows: the transpose of gathering x[plan.token] (the dispatch)."""
    return _gather(rows, plan, num_tokens, None, top_k)
