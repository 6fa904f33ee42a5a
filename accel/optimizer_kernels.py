"""The optimizer's elementwise kernels in numba: AdamW in one pass, and the two halves of global-norm clipping
(SPEC §9.2, §14 #3). Drop-ins for trinity.reference.operators.optimizer_kernels.adamw_update, sum_of_squares and scaled.

The reference AdamW is eight NumPy passes over every parameter with three temporaries the size of the parameter
(m/denom, √v, the update); here each element is read and written once:

    m ← β₁m + (1 − β₁)g;  v ← β₂v + (1 − β₂)g²;  δ = c₁ · (m / (√v / c₂ + ε));  X ← X·(1 − ηλ) − δ
    c₁ = η/(1 − β₁ᵗ),  c₂ = √(1 − β₂ᵗ)

with every scalar rounded to the parameter's dtype first and every operation rounded to it, in the reference's
order (float32 products and quotients of float32 operands are exact in float64, so the result is the same bits as
NumPy's). Sums of squares (the update norm, the gradient norm) are accumulated in float64 per block of BLOCK
elements and the blocks added in order, so results do not depend on the number of threads.
"""

from __future__ import annotations

import math

import numpy as np

from trinity.reference.operators.optimizer_kernels import adamw_update as reference_adamw_update
from trinity.reference.operators.optimizer_kernels import scaled as reference_scaled
from trinity.reference.operators.optimizer_kernels import sum_of_squares as reference_sum_of_squares

from ._jit import kernel, run_tasks

__all__ = ["adamw_update", "sum_of_squares", "scaled"]

BLOCK = 1 << 16  # elements per task
SUB = 1024  # elements per vectorised stretch of the AdamW loop


@kernel
def _squares64(x, lo, hi):
    """Σ x[lo:hi]² in float64 with 8 interleaved partial sums (independent chains in a fixed order, which LLVM's
    SLP vectoriser packs into vector registers), added pairwise at the end."""
    xs = x[lo:hi]
    n = hi - lo
    p = np.zeros(8, dtype=np.float64)
    for i in range(0, n - 7, 8):
        for u in range(8):
            p[u] += np.float64(xs[i + u]) * np.float64(xs[i + u])
    tail = 0.0
    for i in range(n - n % 8, n):
        tail += np.float64(xs[i]) * np.float64(xs[i])
    return ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7])) + tail


@kernel
def _adamw_tasks(first, stride, n, x, g, m, v, coef, partial):
    """coef = (β₁, 1 − β₁, β₂, 1 − β₂, c₂, ε, c₁, 1 − ηλ) in x's dtype; partial[task] = Σ δ² of the task's block.
    The update loops have no loop-carried sum, so LLVM vectorises them; δ goes through a small buffer to the sum."""
    b1, a1, b2, a2, c2, eps, c1, decay = coef[0], coef[1], coef[2], coef[3], coef[4], coef[5], coef[6], coef[7]
    size = x.shape[0]
    delta = np.empty(SUB, dtype=x.dtype)
    for task in range(first, n, stride):
        acc = 0.0
        for lo in range(task * BLOCK, min(size, (task + 1) * BLOCK), SUB):
            hi = min(size, lo + SUB, (task + 1) * BLOCK)
            # slices indexed from 0 and one store per loop: LLVM can then prove the accesses affine, check
            # aliasing once per loop and vectorise; a stretch of SUB elements stays in L1 across the four loops
            xs, gs, ms, vs = x[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
            for j in range(hi - lo):
                ms[j] = ms[j] * b1 + a1 * gs[j]
            for j in range(hi - lo):
                vs[j] = vs[j] * b2 + a2 * (gs[j] * gs[j])
            for j in range(hi - lo):
                delta[j] = c1 * (ms[j] / (np.sqrt(vs[j]) / c2 + eps))
            for j in range(hi - lo):
                xs[j] = xs[j] * decay - delta[j]
            acc += _squares64(delta, 0, hi - lo)
        partial[task] = acc


@kernel
def _sum_of_squares_tasks(first, stride, n, x, partial):
    size = x.shape[0]
    for task in range(first, n, stride):
        partial[task] = _squares64(x, task * BLOCK, min(size, (task + 1) * BLOCK))


@kernel
def _scaled_tasks(first, stride, n, x, scale, out):
    size = x.shape[0]
    for task in range(first, n, stride):
        for i in range(task * BLOCK, min(size, (task + 1) * BLOCK)):
            out[i] = np.float64(x[i]) * scale


def _tasks(size: int) -> int:
    return -(-size // BLOCK)


def _flat_view(a):
    """a as a 1-D view (no copy), or None when it is not a contiguous float32/float64 array."""
    if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64) or not a.flags.c_contiguous:
        return None
    return a.reshape(-1)


def adamw_update(X, G, m, v, *, lr: float, wd: float, beta1: float, beta2: float, eps: float, step: int) -> float:
    """trinity.reference.operators.optimizer_kernels.adamw_update in one pass (same arguments, same bits, same returned
    norm up to the order of the float64 sum). Non-contiguous or mixed-dtype state falls back to the reference."""
    if not (np.shape(X) == np.shape(m) == np.shape(v) == np.shape(G)):
        raise ValueError(f"adamw_update needs one shape for parameter, gradient and both moments, got "
                         f"{np.shape(X)}, {np.shape(G)}, {np.shape(m)}, {np.shape(v)}")
    x, mf, vf = _flat_view(X), _flat_view(m), _flat_view(v)
    if x is None or mf is None or vf is None or not (X.dtype == m.dtype == v.dtype):
        return reference_adamw_update(X, G, m, v, lr=lr, wd=wd, beta1=beta1, beta2=beta2, eps=eps, step=step)
    g = np.ascontiguousarray(G, dtype=m.dtype).reshape(-1)
    coef = np.array([beta1, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2 ** step), eps,
                     lr / (1.0 - beta1 ** step), 1.0 - lr * wd], dtype=m.dtype)
    partial = np.zeros(_tasks(x.size), dtype=np.float64)
    run_tasks(_adamw_tasks, partial.size, x, g, mf, vf, coef, partial)
    return math.sqrt(float(partial.sum()))


def _float_flat(x):
    """x as a contiguous 1-D float32/float64 array (copied only when strided), or None for other dtypes."""
    x = np.asarray(x)
    return np.ascontiguousarray(x).reshape(-1) if x.dtype in (np.float32, np.float64) else None


def sum_of_squares(x) -> float:
    """Σ x² in float64 (trinity.reference.operators.optimizer_kernels.sum_of_squares; equal up to the order of the sum);
    other dtypes go to the reference."""
    flat = _float_flat(x)
    if flat is None:
        return reference_sum_of_squares(x)
    partial = np.zeros(_tasks(flat.size), dtype=np.float64)
    run_tasks(_sum_of_squares_tasks, partial.size, flat, partial)
    return float(partial.sum())


def scaled(x, scale: float):
    """x·scale formed in float64 and rounded once to x's dtype (trinity.reference.operators.optimizer_kernels.scaled;
    same bits); other dtypes go to the reference."""
    flat = _float_flat(x)
    if flat is None:
        return reference_scaled(x, scale)
    out = np.empty_like(flat)
    run_tasks(_scaled_tasks, _tasks(flat.size), flat, float(scale), out)
    return out.reshape(np.shape(x))
