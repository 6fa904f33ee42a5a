"""Fused RMSNorm forward / backward on the GPU (SPEC §4.3, §5 "RMSNorm"); reference: operators/norms.py.

One block per row: the row is read once for Σx², once more to write y (it is in L1/L2 by then). The backward reads
x, dy and γ once per row and writes dx; dγ = Σ_rows dy ⊙ x̂ is a column sum done in two deterministic passes
(per-group partials, then their sum in group order), never with atomics.
"""

from __future__ import annotations

import math

from ._common import SIMULATOR, THREADS, alloc, block_sum, cuda, launch, per_dtype, row_threads, zeros

__all__ = ["rmsnorm_forward", "rmsnorm_backward"]

_GROUPS = 8 if SIMULATOR else 64  # row groups of the dγ column sum (partials [groups, d])


@per_dtype
def _forward_kernel(ft):
    @cuda.jit
    def kernel(x, gain, eps, y, rho):
        """ρ_r = (Σ_j x_rj² / d + ε)^{−1/2};  y_rj = γ_j · x_rj · ρ_r.  Block = row r, its threads stride over j."""
        shared = cuda.shared.array(THREADS, ft)
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        d = x.shape[1]
        acc = ft(0.0)
        for j in range(tid, d, cuda.blockDim.x):
            acc += x[r, j] * x[r, j]
        ss = block_sum(shared, tid, acc)
        rr = 1 / math.sqrt(ss / d + eps)
        for j in range(tid, d, cuda.blockDim.x):
            y[r, j] = gain[j] * (x[r, j] * rr)
        if tid == 0:
            rho[r] = rr
    return kernel


@per_dtype
def _backward_kernel(ft):
    @cuda.jit
    def kernel(x, rho, gain, dy, dx):
        """u = γ ⊙ dy, x̂ = x ρ, c = Σ_j u_j x̂_j / d;  dx = ρ (u − x̂ c).  Block = row r."""
        shared = cuda.shared.array(THREADS, ft)
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        d = x.shape[1]
        rr = rho[r]
        acc = ft(0.0)
        for j in range(tid, d, cuda.blockDim.x):
            acc += gain[j] * dy[r, j] * (x[r, j] * rr)
        c = block_sum(shared, tid, acc) / d
        for j in range(tid, d, cuda.blockDim.x):
            dx[r, j] = rr * (gain[j] * dy[r, j] - (x[r, j] * rr) * c)
    return kernel


@per_dtype
def _gain_partials_kernel(ft):
    @cuda.jit
    def kernel(x, rho, dy, partial):
        """partial[g, j] = Σ_{r ≡ g mod G} dy_rj x_rj ρ_r: grid (column blocks, G groups); adjacent threads read
        adjacent columns (coalesced)."""
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        g = cuda.blockIdx.y
        groups = partial.shape[0]
        if j >= x.shape[1]:
            return
        acc = ft(0.0)
        for r in range(g, x.shape[0], groups):
            acc += dy[r, j] * (x[r, j] * rho[r])
        partial[g, j] = acc
    return kernel


@per_dtype
def _sum_rows_kernel(ft):
    @cuda.jit
    def kernel(partial, out):
        """out_j = Σ_g partial[g, j], in group order."""
        j = cuda.grid(1)
        if j >= partial.shape[1]:
            return
        acc = ft(0.0)
        for g in range(partial.shape[0]):
            acc += partial[g, j]
        out[j] = acc
    return kernel


def rmsnorm_forward(x, gain, eps):
    """y = γ ⊙ x ρ with ρ = (mean(x²) + ε)^{−1/2} over the last axis (SPEC §4.3), as reference rmsnorm_forward; the
    per-head QK norm is the same call on [..., heads, d_h]. x: [..., d], gain [d]; outputs of x's kind
    (_common.alloc). Returns (y, ctx) with ctx = (x, ρ [rows], γ): x̂ is recomputed in the backward instead of
    stored."""
    shape = tuple(x.shape)
    d = shape[-1]
    rows = math.prod(shape[:-1])
    x2 = x.reshape(rows, d)
    y = alloc((rows, d), x.dtype, x)
    rho = alloc((rows,), x.dtype, x)
    if rows:
        launch(_forward_kernel(x.dtype), rows, row_threads(d), x2, gain, x.dtype.type(eps), y, rho)
    return y.reshape(shape), (x, rho, gain)


def rmsnorm_backward(ctx, dy):
    """dx = ρ (u − x̂ · mean(u ⊙ x̂)) with u = γ ⊙ dy, dγ = Σ dy ⊙ x̂ over every leading axis (SPEC §5 "RMSNorm").
    Returns (dx, dγ), of x's kind."""
    x, rho, gain = ctx
    shape = tuple(x.shape)
    d = shape[-1]
    rows = math.prod(shape[:-1])
    x2, dy2 = x.reshape(rows, d), dy.reshape(rows, d)
    dx = alloc((rows, d), x.dtype, x)
    if not rows:
        return dx.reshape(shape), zeros((d,), x.dtype, x)
    groups = min(rows, _GROUPS)
    partial = alloc((groups, d), x.dtype, x)
    dgain = alloc((d,), x.dtype, x)
    launch(_backward_kernel(x.dtype), rows, row_threads(d), x2, rho, gain, dy2, dx)
    launch(_gain_partials_kernel(x.dtype), (math.ceil(d / THREADS), groups), THREADS, x2, rho, dy2, partial)
    launch(_sum_rows_kernel(x.dtype), math.ceil(d / THREADS), THREADS, partial, dgain)
    return dx.reshape(shape), dgain
