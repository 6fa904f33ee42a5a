"""exp for numba kernels that LLVM can vectorise (numba's own np.exp is a scalar libm call per element).

Without Intel's SVML, numba compiles np.exp to one call of libm's exp/expf per element, which keeps every loop
that contains it scalar; NumPy's own ufunc is SIMD and about ten times faster. `vexp` is written with plain
arithmetic only, so loops around it vectorise:

    n = round(x / ln 2),  r = x − n·ln 2 (in two parts, Cody–Waite),  exp(x) = 2ⁿ · P(r),  |r| ≤ ln 2 / 2
    float32: Cephes expf's degree-7 polynomial (≤ 2 ulp);  float64: the Taylor series to r¹³ (truncation < 1e-17)
    2ⁿ is built from its bits; below the smallest normal result (x < −87.3 / −708.3) the value is 0, and
    exp(−∞) = 0 exactly (what masked scores need). Inputs above the overflow threshold are not expected (softmax
    arguments are ≤ 0, sigmoid arguments are −|z|).

`vsigmoid(z)` is σ(z) from e = vexp(−|z|) as in the reference (no overflow for large |z|), in z's float type.

Note for development: numba's cache keys a kernel on its own source file only. After editing this file, remove
accel/__pycache__ (or set NUMBA_CACHE_DIR to a fresh folder) so kernels that inline these functions recompile.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["vexp", "vsigmoid", "one_like"]


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.sext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _f64_from_bits(typingctx, bits):
    """The float64 whose bit pattern is the integer `bits` (64 bits)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(bits), codegen


def vexp(x):  # pragma: no cover - replaced by the overload inside numba kernels
    """exp(x), vectorisable inside numba kernels (module docstring)."""
    return np.exp(x)


def one_like(x):  # pragma: no cover - replaced by the overload inside numba kernels
    """1 in the float type of x (numba promotes float32 ⊙ Python float to float64; this keeps float32 arithmetic
    in float32, as NumPy does)."""
    return np.ones_like(x)


def vsigmoid(z):  # pragma: no cover - replaced by the overload inside numba kernels
    """σ(z) = 1/(1 + e^{−z}) evaluated from e^{−|z|}."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@overload(vexp)
def _vexp_overload(x):
    if x == types.float32:
        def exp32(x):
            lo = np.float32(-87.33654)
            xc = max(x, lo)
            n = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
            r = xc - n * np.float32(0.693359375)
            r = r + n * np.float32(2.12194440e-4)
            rr = r * r
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            p = p * rr + r + np.float32(1.0)
            scale = _f32_from_bits((np.int64(n) + 127) << 23)
            return p * scale if x > lo else np.float32(0.0)
        return exp32
    if x == types.float64:
        def exp64(x):
            lo = -708.3964185322641
            xc = max(x, lo)
            n = np.floor(xc * 1.4426950408889634 + 0.5)
            r = xc - n * 0.6931471803691238
            r = r - n * 1.9082149292705877e-10
            p = 1.0 / 6227020800.0
            p = p * r + 1.0 / 479001600.0
            p = p * r + 1.0 / 39916800.0
            p = p * r + 1.0 / 3628800.0
            p = p * r + 1.0 / 362880.0
            p = p * r + 1.0 / 40320.0
            p = p * r + 1.0 / 5040.0
            p = p * r + 1.0 / 720.0
            p = p * r + 1.0 / 120.0
            p = p * r + 1.0 / 24.0
            p = p * r + 1.0 / 6.0
            p = p * r + 0.5
            p = p * r + 1.0
            p = p * r + 1.0
            scale = _f64_from_bits((np.int64(n) + 1023) << 52)
            return p * scale if x > lo else 0.0
        return exp64
    return None


@overload(vsigmoid)
def _vsigmoid_overload(z):
    if z == types.float32:
        def sig32(z):
            e = vexp(-abs(z))
            one = np.float32(1.0)
            return one / (one + e) if z >= 0 else e / (one + e)
        return sig32
    if z == types.float64:
        def sig64(z):
            e = vexp(-abs(z))
            return 1.0 / (1.0 + e) if z >= 0 else e / (1.0 + e)
        return sig64
    return None


@overload(one_like)
def _one_like_overload(x):
    if x == types.float32:
        return lambda x: np.float32(1.0)
    if isinstance(x, types.Float):
        return lambda x: 1.0
    return None
