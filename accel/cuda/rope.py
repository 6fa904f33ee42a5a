"""Rotary position embedding on the GPU, half-split (NeoX) layout (SPEC §4.5, §5 "RoPE"); reference: operators/rope.py.

One thread per rotated pair (x_k, x_{k+d_h/2}) of one (b, t, head): x is read once and y written once; the tables
cos, sin [T, d_h] (reference rope_tables, computed on the device from the positions) are shared by all heads and the
batch, so they stay in cache. The forward and the backward (the transpose rotation) are one kernel with a sign.
"""

from __future__ import annotations

from ._common import alloc, cuda, grid_stride, launch

__all__ = ["rope_forward", "rope_backward"]


@cuda.jit
def _rotate_kernel(x, cos, sin, sign, y):
    """For the pair k < h = d_h/2 at position t, with c = cos[t], s = sin[t]:
        sign = +1, x ⊙ cos + rotate_half(x) ⊙ sin:
            y_k = x_k c_k − x_{k+h} s_k,        y_{k+h} = x_{k+h} c_{k+h} + x_k s_{k+h}
        sign = −1, dy ⊙ cos − rotate_half(dy ⊙ sin) (the transpose):
            y_k = x_k c_k + x_{k+h} s_{k+h},    y_{k+h} = x_{k+h} c_{k+h} − x_k s_k
    x, y: [B·T, heads, d_h] flattened over (b, t); thread i ↦ (row, head, k)."""
    rows, heads, dh = x.shape
    half = dh // 2
    for i in range(cuda.grid(1), rows * heads * half, cuda.gridsize(1)):
        k = i % half
        head = (i // half) % heads
        row = i // (half * heads)
        t = row % cos.shape[0]
        a = x[row, head, k]
        b = x[row, head, k + half]
        if sign > 0:
            y[row, head, k] = a * cos[t, k] - b * sin[t, k]
            y[row, head, k + half] = b * cos[t, k + half] + a * sin[t, k + half]
        else:
            y[row, head, k] = a * cos[t, k] + b * sin[t, k + half]
            y[row, head, k + half] = b * cos[t, k + half] - a * sin[t, k]


def _rotate(x, cos, sin, sign):
    B, T, heads, dh = x.shape
    x3 = x.reshape(B * T, heads, dh)
    y = alloc((B * T, heads, dh), x.dtype, x)
    if B * T * heads * dh:
        launch(_rotate_kernel, *grid_stride(B * T * heads * (dh // 2)), x3, cos, sin, sign, y)
    return y.reshape(x.shape)


def rope_forward(x, cos, sin):
    """RoPE(x) = x ⊙ cos + rotate_half(x) ⊙ sin for x [B, T, heads, d_h] and tables [T, d_h] (SPEC §4.5), as reference
    rope_forward. Returns (y, ctx = (cos, sin)), y of x's kind."""
    return _rotate(x, cos, sin, 1), (cos, sin)


def rope_backward(ctx, dy):
    """dx = dy ⊙ cos − rotate_half(dy ⊙ sin): the transpose of the rotation (SPEC §5 "RoPE")."""
    cos, sin = ctx
    return _rotate(dy, cos, sin, -1)
