"""Elementwise operators in numba: SwiGLU and the attention output gate (one fused kernel), and RoPE.

    SwiGLU (SPEC §4.7, §5)       h = silu(a) ⊙ c;   da = dh ⊙ c ⊙ σ(a)(1 + a(1 − σ(a))),  dc = dh ⊙ a σ(a)
    output gate (SPEC §4.4, §5)  y = o ⊙ σ(g);      do = dy ⊙ σ(g),  dg = dy ⊙ o ⊙ σ(g)(1 − σ(g))
    RoPE (SPEC §4.5, §5)         y = x ⊙ cos + rotate_half(x) ⊙ sin;  dx = dy ⊙ cos − rotate_half(dy ⊙ sin)

σ is evaluated as in the reference, from e = exp(−|z|) (never overflows), with the vectorisable _math.vexp.
Each forward and backward is one pass over memory (NumPy needs a temporary per elementary operation); σ is
recomputed in the backward instead of stored, so the ctx holds only the inputs: (a, c) for SwiGLU, (o, g) for the
gate, (cos, sin) for RoPE.
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel, run_tasks
from ._math import one_like, vsigmoid

__all__ = ["swiglu_forward", "swiglu_backward", "output_gate_forward", "output_gate_backward", "rope_forward",
           "rope_backward"]

CHUNK = 1 << 15  # elements per task
SWIGLU, SWIGLU_BACKWARD, GATE, GATE_BACKWARD = 0, 1, 2, 3


@kernel
def swiglu_value(a, c):
    """silu(a)·c for one element (inlined into the loops that call it, which stay vectorisable)."""
    return a * vsigmoid(a) * c


@kernel
def swiglu_grads(dh, a, c):
    """(da, dc) of h = silu(a)·c for one element, given dh."""
    s = vsigmoid(a)
    one = one_like(s)
    return dh * c * s * (one + a * (one - s)), dh * a * s


@kernel
def _gated_tasks(first, stride, n, mode, a, c, dy, out1, out2):
    """mode SWIGLU: out1 = silu(a)·c;  SWIGLU_BACKWARD: (out1, out2) = (da, dc);
    GATE: out1 = a·σ(c) (a = o, c = g);  GATE_BACKWARD: (out1, out2) = (do, dg)."""
    size = a.shape[0]
    for task in range(first, n, stride):
        lo, hi = task * CHUNK, min(size, (task + 1) * CHUNK)
        if mode == SWIGLU:
            for i in range(lo, hi):
                out1[i] = swiglu_value(a[i], c[i])
        elif mode == SWIGLU_BACKWARD:
            for i in range(lo, hi):
                out1[i], out2[i] = swiglu_grads(dy[i], a[i], c[i])
        elif mode == GATE:
            for i in range(lo, hi):
                out1[i] = a[i] * vsigmoid(c[i])
        else:
            for i in range(lo, hi):
                s = vsigmoid(c[i])
                out1[i] = dy[i] * s
                out2[i] = dy[i] * a[i] * s * (one_like(s) - s)


def _run(mode, a, c, dy=None, two=False):
    shape = a.shape
    flat = [np.ascontiguousarray(t, dtype=a.dtype).reshape(-1) for t in (a, c, a if dy is None else dy)]
    out1 = np.empty_like(flat[0])
    out2 = np.empty_like(flat[0]) if two else out1
    run_tasks(_gated_tasks, -(-flat[0].size // CHUNK), mode, *flat, out1, out2)
    return (out1.reshape(shape), out2.reshape(shape)) if two else out1.reshape(shape)


def swiglu_forward(a, c):
    """h = silu(a) ⊙ c (SPEC §4.7). ctx = (a, c)."""
    return _run(SWIGLU, a, c), (a, c)


def swiglu_backward(ctx, dh):
    """(da, dc) (SPEC §5 "SwiGLU")."""
    a, c = ctx
    return _run(SWIGLU_BACKWARD, a, c, dh, two=True)


def output_gate_forward(o, g):
    """Õ = O ⊙ σ(G) (SPEC §4.4 step 7). ctx = (O, G)."""
    return _run(GATE, o, g), (o, g)


def output_gate_backward(ctx, dy):
    """(dO, dG) (SPEC §5 "Attention gate")."""
    o, g = ctx
    return _run(GATE_BACKWARD, o, g, dy, two=True)


# ---- RoPE ---------------------------------------------------------------------------------------------------------
@kernel
def _rope_tasks(first, stride, n, x, cos, sin, transpose, y):
    """x, y: [B·T, heads, d_h] rows; row i has position i mod T. transpose=False: the rotation, True: its transpose."""
    rows, heads, dh = x.shape
    T = cos.shape[0]
    half = dh // 2
    for task in range(first, n, stride):
        for i in range(task * 64, min(rows, (task + 1) * 64)):
            t = i % T
            for h in range(heads):
                for j in range(half):
                    x1 = x[i, h, j]
                    x2 = x[i, h, j + half]
                    if transpose:  # dx = dy ⊙ cos − rotate_half(dy ⊙ sin)
                        y[i, h, j] = x1 * cos[t, j] + x2 * sin[t, j + half]
                        y[i, h, j + half] = x2 * cos[t, j + half] - x1 * sin[t, j]
                    else:  # y = x ⊙ cos + rotate_half(x) ⊙ sin, rotate_half(x) = [−x₂; x₁]
                        y[i, h, j] = x1 * cos[t, j] - x2 * sin[t, j]
                        y[i, h, j + half] = x2 * cos[t, j + half] + x1 * sin[t, j + half]


def _rope(x, cos, sin, transpose):
    B, T, heads, dh = x.shape
    xr = np.ascontiguousarray(x).reshape(B * T, heads, dh)
    y = np.empty_like(xr)
    c = np.ascontiguousarray(cos, dtype=x.dtype)
    s = np.ascontiguousarray(sin, dtype=x.dtype)
    run_tasks(_rope_tasks, -(-(B * T) // 64), xr, c, s, transpose, y)
    return y.reshape(x.shape)


def rope_forward(x, cos, sin):
    """RoPE(x) = x ⊙ cos + rotate_half(x) ⊙ sin for x [B, T, heads, d_h], tables [T, d_h] (SPEC §4.5). ctx = (cos,
    sin)."""
    return _rope(x, cos, sin, False), (cos, sin)


def rope_backward(ctx, dy):
    """dx = dy ⊙ cos − rotate_half(dy ⊙ sin) (SPEC §5 "RoPE")."""
    cos, sin = ctx
    return _rope(dy, cos, sin, True)
