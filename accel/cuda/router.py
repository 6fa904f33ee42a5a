"""Router scores, top-k selection, gate weights and the MoE dispatch plan on the GPU (SPEC §4.8, §4.9, §5 "Router");
reference: operators/router.py and operators/moe.py (dispatch).

The logits z = W_r x are a matrix product (cuBLAS, the caller's); here one thread per token reads its E logits and
writes its E scores and K choices. dx = dz W_r and dW_r = dzᵀ x of the backward are products too: router_backward
returns dz. The dispatch plan is a counting sort without atomics, so its order is the reference's stable order.
"""

from __future__ import annotations

import math

import numpy as np

from trinity.reference.operators.moe import Dispatch
from trinity.reference.operators.router import RouterCtx

from ._common import THREADS, alloc, cuda, grid_1d, launch, per_dtype, sigmoid, zeros

__all__ = ["router_forward", "router_backward", "dispatch"]

_CHUNK = 64  # dispatch: assignments per counting thread


@per_dtype
def _forward_kernel(ft):
    @cuda.jit
    def kernel(z, bias, top_k, route_scale, s, experts, weights, total):
        """Token n (one thread):  s = σ(z_n);  𝒦 = TopK_K(s + b), descending, lowest index first on ties;
        S = Σ_{k∈𝒦} s_{e_k};  g_k = ρ s_{e_k} / (S + 1e−20) (SPEC §4.8). The k-th pick is the largest (v, −e) below
        the (k−1)-th in that order, so no "taken" flags are needed: O(K·E) per token."""
        n = cuda.grid(1)
        if n >= z.shape[0]:
            return
        E = z.shape[1]
        for e in range(E):
            s[n, e] = sigmoid(z[n, e])
        prev_v = ft(0.0)
        prev_e = -1
        acc = ft(0.0)
        for k in range(top_k):
            best_v = ft(0.0)
            best_e = -1
            for e in range(E):
                v = s[n, e] + bias[e]  # b (float32) upcast to the scores' dtype
                below = prev_e < 0 or v < prev_v or (v == prev_v and e > prev_e)
                if below and (best_e < 0 or v > best_v):
                    best_v = v
                    best_e = e
            experts[n, k] = best_e
            prev_v = best_v
            prev_e = best_e
            acc += s[n, best_e]
        total[n, 0] = acc
        for k in range(top_k):
            weights[n, k] = s[n, experts[n, k]] / (acc + 1e-20) * route_scale
    return kernel


@per_dtype
def _backward_kernel(ft):
    @cuda.jit
    def kernel(s, experts, total, route_scale, dweights, dscores, has_dscores, dz):
        """Token n (SPEC §5 "Router"), with g_k = ρ s_{e_k}/S:
            ds = dscores_n (or 0);   ds_{e_m} += (ρ/S)(dg_m − (1/ρ) Σ_k dg_k g_k) for the chosen m;
            dz = ds ⊙ s(1 − s)."""
        n = cuda.grid(1)
        if n >= s.shape[0]:
            return
        E, K = s.shape[1], experts.shape[1]
        S = total[n, 0]
        for e in range(E):
            dz[n, e] = dscores[n, e] if has_dscores else ft(0.0)
        dot = ft(0.0)
        for k in range(K):
            dot += dweights[n, k] * (s[n, experts[n, k]] / (S + 1e-20) * route_scale)
        for k in range(K):
            e = experts[n, k]
            dz[n, e] += (route_scale / S) * (dweights[n, k] - dot / route_scale)
        for e in range(E):
            dz[n, e] *= s[n, e] * (1 - s[n, e])
    return kernel


def router_forward(logits, expert_bias, top_k, route_scale, x=None, w_router=None):
    """s = σ(z), 𝒦 = TopK_K(s + b), g_k = ρ s_{e_k} / (Σ_𝒦 s + 1e−20) (SPEC §4.8), as reference router_forward but
    from the logits z = x W_rᵀ [N, E] (a cuBLAS product). x and w_router, when given, are kept in the ctx for the
    caller's dx, dW_r products. Returns (weights [N, K], experts [N, K] int64, RouterCtx), of z's kind."""
    z = logits
    N, E = z.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    s = alloc((N, E), z.dtype, z)
    experts = alloc((N, top_k), np.int64, z)
    weights = alloc((N, top_k), z.dtype, z)
    total = alloc((N, 1), z.dtype, z)
    if N:
        launch(_forward_kernel(z.dtype), *grid_1d(N), z, expert_bias, top_k, z.dtype.type(route_scale), s, experts,
               weights, total)
    return weights, experts, RouterCtx(x, w_router, s, experts, total, route_scale, z)


def router_backward(ctx, dweights, dscores=None):
    """dz [N, E] of reference router_backward (SPEC §5 "Router"): the gradient reaches the logits only through the
    normalised unbiased scores of the chosen experts, plus `dscores` [N, E] on every score when given. The caller
    finishes with two cuBLAS products: dx = dz W_r, dW_r = dzᵀ x."""
    s, experts, total = ctx.scores, ctx.experts, ctx.total
    N = s.shape[0]
    dz = alloc(s.shape, s.dtype, s)
    extra = dscores if dscores is not None else alloc((1, 1), s.dtype, s)
    if N:
        launch(_backward_kernel(s.dtype), *grid_1d(N), s, experts, total, s.dtype.type(ctx.route_scale), dweights,
               extra, dscores is not None, dz)
    return dz


@cuda.jit
def _chunk_counts(flat, chunk, hist):
    """hist[c, e] = #{i in chunk c : flat[i] = e} (thread c owns row c of the zeroed hist)."""
    c = cuda.grid(1)
    if c >= hist.shape[0]:
        return
    for i in range(c * chunk, min(flat.size, (c + 1) * chunk)):
        hist[c, flat[i]] += 1


@cuda.jit
def _expert_offsets(hist, counts, offsets):
    """One block. Per expert e (threads over e): hist[c, e] ← Σ_{c'<c} hist[c', e] (exclusive scan over chunks) and
    counts[e] = the column total; then thread 0: offsets[0] = 0, offsets[e+1] = offsets[e] + counts[e]."""
    tid = cuda.threadIdx.x
    E = counts.size
    for e in range(tid, E, cuda.blockDim.x):
        run = 0
        for c in range(hist.shape[0]):
            here = hist[c, e]
            hist[c, e] = run
            run += here
        counts[e] = run
    cuda.syncthreads()
    if tid == 0:
        offsets[0] = 0
        for e in range(E):
            offsets[e + 1] = offsets[e] + counts[e]


@cuda.jit
def _scatter(flat, top_k, chunk, hist, offsets, token, slot):
    """Chunk c, in index order: assignment i = n·K + k of expert e goes to row offsets[e] + (earlier assignments of
    e), which is the reference's stable argsort order: (token, slot) = (i // K, i % K)."""
    c = cuda.grid(1)
    if c >= hist.shape[0]:
        return
    for i in range(c * chunk, min(flat.size, (c + 1) * chunk)):
        e = flat[i]
        row = offsets[e] + hist[c, e]
        hist[c, e] += 1
        token[row] = i // top_k
        slot[row] = i % top_k


def dispatch(experts, num_experts):
    """The reference dispatch plan (operators/moe.py) on the device: assignments of experts [N, K] (ids in
    [0, num_experts)) grouped by expert, stable. Returns Dispatch(token, slot, offsets [E+1], counts [E]) of int64
    arrays of the kind of `experts`. Three kernels: per-chunk counts, per-expert scan + offsets, scatter."""
    N, K = experts.shape
    flat = experts.reshape(N * K)
    chunks = max(1, math.ceil(N * K / _CHUNK))
    hist = zeros((chunks, num_experts), np.int64, experts)
    counts = alloc((num_experts,), np.int64, experts)
    offsets = alloc((num_experts + 1,), np.int64, experts)
    token = alloc((N * K,), np.int64, experts)
    slot = alloc((N * K,), np.int64, experts)
    blocks, threads = grid_1d(chunks)
    launch(_chunk_counts, blocks, threads, flat, _CHUNK, hist)
    launch(_expert_offsets, 1, THREADS, hist, counts, offsets)
    launch(_scatter, blocks, threads, flat, K, _CHUNK, hist, offsets, token, slot)
    return Dispatch(token, slot, offsets, counts)
