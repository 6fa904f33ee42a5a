"""SwiGLU and the attention output gate on the GPU (SPEC §4.7, §4.4 step 7, §5); reference: operators/mlp.py and
operators/attention.py (output_gate_*).

Both are sigmoid-based products of two same-shaped arrays, one thread per element (a grid-stride loop): the forward
reads 2 arrays and writes 1; the backward reads 3 (the two inputs and the incoming gradient) and writes 2. σ is
recomputed in the backward instead of being stored, so ctx holds only the two inputs.
"""

from __future__ import annotations

import math

from ._common import alloc, cuda, grid_stride, launch, sigmoid

__all__ = ["swiglu_forward", "swiglu_backward", "output_gate_forward", "output_gate_backward"]


@cuda.jit
def _swiglu_fwd(a, c, h):
    """h = silu(a) ⊙ c = a σ(a) c (SPEC §4.7)."""
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        h[i] = a[i] * sigmoid(a[i]) * c[i]


@cuda.jit
def _swiglu_bwd(a, c, dh, da, dc):
    """da = dh c σ(a)(1 + a(1 − σ(a))),  dc = dh a σ(a) (SPEC §5 "SwiGLU")."""
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        s = sigmoid(a[i])
        da[i] = dh[i] * c[i] * s * (1 + a[i] * (1 - s))
        dc[i] = dh[i] * a[i] * s


@cuda.jit
def _gate_fwd(o, g, y):
    """Õ = O ⊙ σ(G) (SPEC §4.4 step 7)."""
    for i in range(cuda.grid(1), o.size, cuda.gridsize(1)):
        y[i] = o[i] * sigmoid(g[i])


@cuda.jit
def _gate_bwd(o, g, dy, do, dg):
    """dO = dÕ σ(G),  dG = dÕ O σ(G)(1 − σ(G)) (SPEC §5 "Attention gate")."""
    for i in range(cuda.grid(1), o.size, cuda.gridsize(1)):
        s = sigmoid(g[i])
        do[i] = dy[i] * s
        dg[i] = dy[i] * o[i] * s * (1 - s)


def _launch(kernel, inputs, n_out):
    """Run an elementwise kernel over the flattened inputs (same shape); returns n_out arrays shaped like the first
    input, of its kind (_common.alloc)."""
    shape, dtype = tuple(inputs[0].shape), inputs[0].dtype
    n = math.prod(shape)
    flat = [x.reshape(n) for x in inputs]
    outs = [alloc((n,), dtype, inputs[0]) for _ in range(n_out)]
    if n:
        launch(kernel, *grid_stride(n), *flat, *outs)
    return [y.reshape(shape) for y in outs]


def swiglu_forward(a, c):
    """h = silu(a) ⊙ c (SPEC §4.7), as reference swiglu_forward. Returns (h, ctx = (a, c))."""
    (h,) = _launch(_swiglu_fwd, (a, c), 1)
    return h, (a, c)


def swiglu_backward(ctx, dh):
    """da = dh ⊙ c ⊙ σ(a)(1 + a(1 − σ(a))), dc = dh ⊙ silu(a) (SPEC §5 "SwiGLU"). Returns (da, dc)."""
    a, c = ctx
    da, dc = _launch(_swiglu_bwd, (a, c, dh), 2)
    return da, dc


def output_gate_forward(o, g):
    """Õ = O ⊙ σ(G) (SPEC §4.4 step 7), as reference output_gate_forward. Returns (Õ, ctx = (O, G))."""
    (y,) = _launch(_gate_fwd, (o, g), 1)
    return y, (o, g)


def output_gate_backward(ctx, dy):
    """dO = dÕ ⊙ σ(G), dG = dÕ ⊙ O ⊙ σ(G)(1 − σ(G)) (SPEC §5). Returns (dO, dG)."""
    o, g = ctx
    do, dg = _launch(_gate_bwd, (o, g, dy), 2)
    return do, dg
