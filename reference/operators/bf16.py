"""bfloat16 arithmetic emulated in float32, on NumPy or CuPy arrays (SPEC §9.2: Dion computes Newton–Schulz in bf16;
§4.11: what the released checkpoints keep in bf16). NumPy has no bfloat16 dtype and CuPy's is not relied on, so a
bf16 value is a float32 whose low 16 bits are zero:

    round_bf16(x)          float32 → nearest bf16 (round half to even), as float32; ±inf, NaN and overflow as a cast
    newton_schulz_bf16(G)  the reference's Newton–Schulz with every array between operations a bf16 value and every
                           product's factors bf16, accumulated in float32 (what a bf16 GEMM with float32 accumulation
                           computes before it rounds its output)

A product of two bf16 values is exact in float32 (8 + 8 significand bits ≤ 24), so a float32 matrix product of
bf16-valued factors is a bf16 GEMM with float32 accumulation, up to the order of its sums. The training step's
mixed precision (reference/model/precision.py) rounds with round_bf16; the cupy table runs the same code on CuPy.
"""

from __future__ import annotations

import numpy as np

from .optimizer_kernels import _coefficient_schedule

__all__ = ["BF16", "round_bf16", "bf16_matmul", "newton_schulz_rounded", "newton_schulz_bf16"]

BF16 = "bfloat16"


def _module(x):
    """cupy for a CuPy array, numpy otherwise."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def round_bf16(x):
    """float32 values rounded to the nearest bfloat16 (round half to even on the top 16 bits of the float32 pattern),
    as float32. ±inf stay, NaN stays NaN, finite values past bf16's largest round to ±inf, as a cast to bf16 does.
    x: a float32 (or float64, cast first) NumPy or CuPy array."""
    xp = _module(x)
    x = xp.asarray(x, dtype=xp.float32)
    bits = x.view(xp.uint32)  # same item size: a view of any layout
    lsb = (bits >> xp.uint32(16)) & xp.uint32(1)
    rounded = (bits + (xp.uint32(0x7FFF) + lsb)) & xp.uint32(0xFFFF0000)
    return xp.where(xp.isnan(x), x, rounded.view(xp.float32))


def bf16_matmul(a, b):
    """a @ b with both factors rounded to bf16 and the products accumulated in float32 (what a bf16 GEMM with a float32
    accumulator computes before it rounds its output)."""
    return round_bf16(a) @ round_bf16(b)


def newton_schulz_rounded(G, steps, coefficients, eps, dtype, rounded):
    """reference optimizer_kernels.newton_schulz on G's own module (NumPy or CuPy; the reference's operations in its
    order, so on NumPy the same bits), in `dtype`; with rounded=True every array between operations is rounded to
    bf16 (newton_schulz_bf16)."""
    xp = _module(G)
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {G.shape}")
    r = round_bf16 if rounded else (lambda x: x)
    tall = G.shape[-2] > G.shape[-1]
    X = G.astype(dtype, copy=False)
    if tall:
        X = xp.swapaxes(X, -1, -2)
    X64 = X.astype(xp.float64)
    norm = xp.sqrt(xp.sum(X64 * X64, axis=(-2, -1), keepdims=True))
    X = r(X / (norm + eps).astype(dtype))
    for a, b, c in _coefficient_schedule(coefficients, steps):
        A = r(r(X) @ r(xp.swapaxes(X, -1, -2)))
        B = r(b * A + c * r(A @ A))
        X = r(a * X + r(B @ X))
    if tall:  # a row-major copy, as a transposed view would not be
        X = xp.swapaxes(X, -1, -2)
    return xp.ascontiguousarray(X)


def newton_schulz_bf16(G, steps: int = 5, coefficients="dion", eps: float = 1e-8):
    """Newton–Schulz of reference optimizer_kernels.newton_schulz computed as Dion does in bfloat16 (SPEC §9.2): every
    array between operations is a bf16 value (float32 rounded by round_bf16), every product takes bf16 factors and
    accumulates in float32, every elementwise combination is formed in float32 and rounded once:

        X = bf16(G/(‖G‖_F + eps))      (Gᵀ when rows > cols; the norm in float64)
        A = bf16(X Xᵀ);   B = bf16(b A + c bf16(A A));   X = bf16(a X + bf16(B X))

    Returns float32 (bf16 values), row-major, shaped like G. Its error against exact arithmetic is that of bf16:
    tests/conformance/tolerances.py (ns_bf16_tol)."""
    return newton_schulz_rounded(G, steps, coefficients, eps, np.float32, rounded=True)
