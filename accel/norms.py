"""Fused RMSNorm in numba: the sandwich norms, the final norm and the per-head QK norms (SPEC §4.3, §5 "RMSNorm").

One pass per row over the last axis (a row is a token, or a (token, head) pair for the QK norm):
    forward   ρ = (mean(x²) + ε)^{−1/2},  x̂ = x·ρ,  y = γ ⊙ x̂
    backward  u = γ ⊙ dy,  dx = ρ (u − x̂ · mean(u ⊙ x̂)),  dγ = Σ_rows dy ⊙ x̂
Row sums are accumulated in float64. dγ is summed per fixed chunk of rows, then over chunks in order, so it does
not depend on the thread count. ctx has the reference's layout (x̂, ρ [..., 1], γ).
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel, run_tasks

__all__ = ["rmsnorm_forward", "rmsnorm_backward", "ROWS_PER_TASK"]

ROWS_PER_TASK = 256


@kernel
def _forward_tasks(first, stride, n, x, gain, eps, y, x_hat, rho):
    rows, width = x.shape
    for task in range(first, n, stride):
        for i in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            ss = 0.0
            for j in range(width):
                ss += np.float64(x[i, j]) * np.float64(x[i, j])
            rho[i] = 1.0 / np.sqrt(ss / width + eps)
            r = rho[i]  # rounded to the array's dtype
            for j in range(width):
                xh = x[i, j] * r
                x_hat[i, j] = xh
                y[i, j] = gain[j] * xh


@kernel
def _backward_tasks(first, stride, n, x_hat, rho, gain, dy, dx, dgain_parts):
    rows, width = x_hat.shape
    for task in range(first, n, stride):
        part = dgain_parts[task]
        for j in range(width):
            part[j] = 0.0
        for i in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc = 0.0
            for j in range(width):
                acc += np.float64(gain[j] * dy[i, j]) * np.float64(x_hat[i, j])
            mean = acc / width
            r = rho[i]
            for j in range(width):
                dx[i, j] = r * (gain[j] * dy[i, j] - x_hat[i, j] * mean)
                part[j] += np.float64(dy[i, j]) * np.float64(x_hat[i, j])


def rmsnorm_forward(x, gain, eps):
    """y = γ ⊙ x ρ with ρ = (mean(x²) + ε)^{−1/2} over the last axis (SPEC §4.3); γ broadcasts over heads."""
    shape = x.shape
    x2 = np.ascontiguousarray(x).reshape(-1, shape[-1])
    g = np.ascontiguousarray(gain, dtype=x.dtype)
    y = np.empty_like(x2)
    x_hat = np.empty_like(x2)
    rho = np.empty(x2.shape[0], dtype=x.dtype)
    run_tasks(_forward_tasks, -(-x2.shape[0] // ROWS_PER_TASK), x2, g, float(eps), y, x_hat, rho)
    return y.reshape(shape), (x_hat.reshape(shape), rho.reshape(shape[:-1] + (1,)), gain)


def rmsnorm_backward(ctx, dy):
    """dx = ρ (u − x̂·mean(u ⊙ x̂)) with u = γ ⊙ dy; dγ = Σ dy ⊙ x̂ over every leading axis (SPEC §5)."""
    x_hat, rho, gain = ctx
    shape = x_hat.shape
    xh = x_hat.reshape(-1, shape[-1])
    d = np.ascontiguousarray(dy, dtype=x_hat.dtype).reshape(xh.shape)
    g = np.ascontiguousarray(gain, dtype=x_hat.dtype)
    dx = np.empty_like(xh)
    tasks = -(-xh.shape[0] // ROWS_PER_TASK)
    parts = np.empty((tasks, shape[-1]), dtype=np.float64)
    run_tasks(_backward_tasks, tasks, xh, rho.reshape(-1), g, d, dx, parts)
    return dx.reshape(shape), parts.sum(axis=0).astype(x_hat.dtype)
