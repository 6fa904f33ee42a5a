"""Causal-LM cross-entropy with z-loss on the GPU, the vocabulary in chunks (SPEC §4.10, §7, §5 "Cross-entropy +
z-loss"); reference: operators/losses.py.

One block per predicting position: each thread walks its strided share of the V logits keeping an online
log-sum-exp (m, l), and the block merges the pairs of its threads. So the forward reads the logits once and keeps
nothing [N, V]-sized: the ctx holds lse, the target and validity per position. The backward reads the logits once
more and writes dlogits, P·(1 + 2λ lse)/N − onehot/N, recomputing P = exp(z − lse) on the fly.
"""

from __future__ import annotations

import math

import numpy as np

from trinity.reference.operators.losses import IGNORE_INDEX, CrossEntropyCtx

from ._common import THREADS, alloc, block_max, block_sum, cuda, host, launch, namespace, per_dtype, row_threads, zeros

__all__ = ["cross_entropy_forward", "cross_entropy_backward"]


@per_dtype
def _forward_kernel(ft):
    @cuda.jit
    def kernel(logits, labels, shift, P, lse, nll, target, valid, bad):
        """Position (b, t < P), one block, threads strided over v:
            target y = labels[b, t+1] (shift) or labels[b, t];  valid = y ≠ −100
            per thread: m = max z_v, l = Σ e^{z_v − m} over its v;  block: M = max m, L = Σ l e^{m − M}
            lse = M + log L;  nll = lse − z_y (0 when not valid).  An id outside [0, V) sets bad[0] = 1."""
        shared = cuda.shared.array(THREADS, ft)
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        V = logits.shape[2]
        b, t = row // P, row % P
        m = ft(-math.inf)
        l = ft(0.0)
        for v in range(tid, V, cuda.blockDim.x):
            x = logits[b, t, v]
            if x > m:
                l = l * math.exp(m - x) + ft(1.0)
                m = x
            else:
                l += math.exp(x - m)
        M = block_max(shared, tid, m)
        part = l * math.exp(m - M) if l > 0 else ft(0.0)
        L = block_sum(shared, tid, part)
        if tid == 0:
            y = labels[b, t + shift]
            ok = y != IGNORE_INDEX
            if ok and (y < 0 or y >= V):
                bad[0] = 1
                ok = False
            lse[b, t] = M + math.log(L)
            valid[b, t] = ok
            target[b, t] = y if ok else 0
            nll[b, t] = lse[b, t] - logits[b, t, y] if ok else ft(0.0)
    return kernel


@per_dtype
def _backward_kernel(ft):
    @cuda.jit
    def kernel(logits, target, valid, lse, lam, inv_denom, dlogits):
        """Position (b, t), one block, threads over v (SPEC §5): on counted positions
            dz_v = e^{z_v − lse} (1 + 2λ lse)/N − [v = y]/N   (here already times `scale`: inv_denom = scale/N),
        and 0 on positions that do not count (ignored labels, and with shift the last position)."""
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        T, V = logits.shape[1], logits.shape[2]
        P = lse.shape[1]
        b, t = row // T, row % T
        counted = t < P and valid[b, t]
        if not counted:
            for v in range(tid, V, cuda.blockDim.x):
                dlogits[b, t, v] = 0
            return
        c = (1 + 2 * lam * lse[b, t]) * inv_denom
        y = target[b, t]
        for v in range(tid, V, cuda.blockDim.x):
            g = math.exp(logits[b, t, v] - lse[b, t]) * c
            if v == y:
                g -= inv_denom
            dlogits[b, t, v] = g
    return kernel


def cross_entropy_forward(logits, labels, z_loss_coeff=0.0, *, shift=True, denom=None):
    """ce = (1/N) Σ_t (lse_t − z_{t,y_t}),  z = λ_z (1/N) Σ_t lse_t² over the N counted positions (SPEC §4.10, §7), as
    reference cross_entropy_forward: labels −100 ignored, shifted inside unless shift=False, N = max(count, 1) or
    `denom`. logits [B, T, V] float, labels [B, T] integer, both of one kind (CuPy, NumPy under the simulator, or
    numba device arrays).
    Returns (ce, z, ctx) with ce, z Python floats: the per-position terms are summed where they are (CuPy / NumPy),
    and only the sums, the count and the bad-label flag are read back as scalars (numba device arrays: copied)."""
    z = logits
    lab = labels
    if tuple(lab.shape) != tuple(z.shape)[:-1] or np.dtype(lab.dtype).kind not in "iu":
        raise ValueError(f"labels must be an integer array shaped like tokens {tuple(z.shape)[:-1]}, "
                         f"got dtype {lab.dtype} shape {tuple(lab.shape)}")
    B, T, V = z.shape
    P = T - 1 if shift else T
    lse, nll = alloc((B, P), z.dtype, z), alloc((B, P), z.dtype, z)
    target, valid = alloc((B, P), np.int64, z), alloc((B, P), np.bool_, z)
    bad = zeros((1,), np.int32, z)
    if B * P:
        launch(_forward_kernel(z.dtype), B * P, row_threads(V), z, lab, int(shift), P, lse, nll, target, valid, bad)
    if int(bad[0]):
        raise ValueError(f"labels must be token ids in [0, {V}) or {IGNORE_INDEX}")
    xp = namespace(nll)
    if xp is None:  # numba device arrays (kernel tests): the terms come to the host
        xp, valid_s, lse_s, nll_s = np, host(valid), host(lse), host(nll)
    else:
        valid_s, lse_s, nll_s = valid, lse, nll
    n = int(xp.count_nonzero(valid_s))
    denom = max(n, 1) if denom is None else denom
    ce = float(xp.sum(nll_s) / denom)
    zl = float(z_loss_coeff * xp.sum(xp.where(valid_s, lse_s * lse_s, 0.0)) / denom)
    return ce, zl, CrossEntropyCtx(z, target, valid, lse, denom, z_loss_coeff)


def cross_entropy_backward(ctx, scale=1.0):
    """dlogits = (softmax(z_t)(1 + 2λ_z lse_t) − onehot(y_t)) · scale/N on counted positions, 0 elsewhere (SPEC §5
    "Cross-entropy + z-loss"), as reference cross_entropy_backward; shaped like the logits, of their kind."""
    logits, target, valid, lse, denom, lam = ctx
    B, T, V = logits.shape
    ft = logits.dtype.type
    dlogits = alloc((B, T, V), logits.dtype, logits)
    if B * T:
        launch(_backward_kernel(logits.dtype), B * T, row_threads(V), logits, target, valid, lse, ft(lam),
               ft(scale / denom), dlogits)
    return dlogits
