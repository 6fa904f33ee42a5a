"""The sigmoid top-K router in numba (SPEC §4.8, §5 "Router").

forward   z = x W_rᵀ (BLAS);  s = σ(z) (the reference's own σ, so selections agree bit for bit with the reference
          given the same z);  one kernel per token row: top-K of s + b by repeated arg-max with the lowest index
          winning ties (the order of a stable descending sort, SPEC §14 #14), S = Σ_𝒦 s, g_k = ρ s_{e_k}/(S + 1e−20).
backward  one kernel per token row: ds_{e_m} = (ρ/S)(dg_m − (1/ρ) Σ_k dg_k g_k) on the chosen experts, plus the
          balance loss's dscores on all E; dz = ds ⊙ s(1 − s);  then dx = dz W_r, dW_r = dzᵀ x (BLAS).
ctx has the reference's layout (x, W_r, s, 𝒦, S [N, 1], ρ, z): the model reads s and 𝒦 for its routing statistics.
"""

from __future__ import annotations

import numpy as np

from trinity.reference.operators.activations import sigmoid
from trinity.reference.operators.router import RouterCtx

from ._jit import kernel, run_tasks

__all__ = ["router_forward", "router_backward"]

ROWS = 256  # tokens per task


@kernel
def _select_tasks(first, stride, n, s, bias, route_scale, experts, weights, total):
    N, E = s.shape
    K = experts.shape[1]
    taken = np.zeros(E, dtype=np.bool_)
    for task in range(first, n, stride):
        for t in range(task * ROWS, min(N, (task + 1) * ROWS)):
            for e in range(E):
                taken[e] = False
            for k in range(K):
                best = -1
                for e in range(E):
                    if not taken[e]:
                        v = s[t, e] + bias[e]
                        if best < 0 or v > s[t, best] + bias[best]:
                            best = e
                taken[best] = True
                experts[t, k] = best
            tot = s[t, experts[t, 0]]
            for k in range(1, K):
                tot += s[t, experts[t, k]]
            total[t, 0] = tot
            for k in range(K):
                weights[t, k] = s[t, experts[t, k]] / (total[t, 0] + 1e-20) * route_scale


@kernel
def _backward_tasks(first, stride, n, s, experts, total, route_scale, dweights, dscores, has_dscores, dz):
    N, E = s.shape
    K = experts.shape[1]
    for task in range(first, n, stride):
        for t in range(task * ROWS, min(N, (task + 1) * ROWS)):
            for e in range(E):
                dz[t, e] = dscores[t, e] if has_dscores else 0.0
            inner = 0.0  # Σ_k dg_k g_k
            for k in range(K):
                g = s[t, experts[t, k]] / (total[t, 0] + 1e-20) * route_scale
                inner += np.float64(dweights[t, k]) * g
            for k in range(K):
                e = experts[t, k]
                dz[t, e] += (route_scale / total[t, 0]) * (dweights[t, k] - inner / route_scale)
            for e in range(E):
                dz[t, e] = dz[t, e] * s[t, e] * (1.0 - s[t, e])


def router_forward(x, w_router, expert_bias, top_k, route_scale):
    """(weights g [N, K], experts 𝒦 [N, K] int64, ctx) as in the reference router_forward (SPEC §4.8)."""
    z = x @ w_router.T
    s = sigmoid(z)
    N, E = s.shape
    experts = np.empty((N, top_k), dtype=np.int64)
    weights = np.empty((N, top_k), dtype=s.dtype)
    total = np.empty((N, 1), dtype=s.dtype)
    bias = np.ascontiguousarray(expert_bias, dtype=s.dtype)
    run_tasks(_select_tasks, -(-N // ROWS), np.ascontiguousarray(s), bias, s.dtype.type(route_scale), experts,
              weights, total)
    return weights, experts, RouterCtx(x, w_router, s, experts, total, route_scale, z)


def router_backward(ctx, dweights, dscores=None):
    """(dx, dW_r) through the normalised unbiased scores (SPEC §5 "Router"); dscores: the balance loss's [N, E]."""
    x, w_router, s, experts, total, route_scale, _ = ctx
    N, E = s.shape
    dz = np.empty_like(s)
    ds = np.zeros((1, 1), dtype=s.dtype) if dscores is None else np.ascontiguousarray(dscores, dtype=s.dtype)
    run_tasks(_backward_tasks, -(-N // ROWS), s, experts, total, s.dtype.type(route_scale),
              np.ascontiguousarray(dweights, dtype=s.dtype), ds, dscores is not None, dz)
    return dz @ w_router, dz.T @ x
