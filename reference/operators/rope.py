"""Rotary position embedding, half-split (NeoX) layout; local (sliding-window) layers only (SPEC §4.5)."""

from .array_module import array_namespace

__all__ = ["rope_tables", "rotate_half", "rope_forward", "rope_backward"]


def rope_tables(positions, head_dim, theta, dtype):
    """cos(emb), sin(emb) of shape [T, d_h] for integer positions [T] (SPEC §4.5).

    inv_freq_k = θ^{−2k/d_h} for k = 0 … d_h/2 − 1; φ = p · inv_freq; emb = concat(φ, φ).
    Computed in float64 and cast, so float64 runs carry no float32 rounding (HF computes these in float32).
    The tables live in the namespace of `positions` (a list or tuple: NumPy); dtype is one of its dtypes.
    """
    xp = array_namespace(positions)
    positions = xp.asarray(positions)
    inv_freq = 1.0 / (float(theta) ** (xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim))
    phi = xp.astype(positions, xp.float64)[:, None] * inv_freq[None, :]
    emb = xp.concat([phi, phi], axis=-1)
    return xp.astype(xp.cos(emb), dtype), xp.astype(xp.sin(emb), dtype)


def rotate_half(x):
    """rotate_half([x₁; x₂]) = [−x₂; x₁], halves taken over the last axis."""
    xp = array_namespace(x)
    half = x.shape[-1] // 2
    return xp.concat([-x[..., half:], x[..., :half]], axis=-1)


def rope_forward(x, cos, sin):
    """RoPE(x) = x ⊙ cos + rotate_half(x) ⊙ sin, for x [B, T, heads, d_h] and tables [T, d_h] (SPEC §4.5).

    The map is orthogonal, so the backward is its transpose: dx = dy ⊙ cos − rotate_half(dy ⊙ sin) (SPEC §5).
    ctx = (cos, sin).
    """
    c, s = cos[:, None, :], sin[:, None, :]
    return x * c + rotate_half(x) * s, (cos, sin)


def rope_backward(ctx, dy):
    """dx = dy ⊙ cos − rotate_half(dy ⊙ sin): the transpose of the rotation (SPEC §5 "RoPE")."""
    cos, sin = ctx
    c, s = cos[:, None, :], sin[:, None, :]
    return dy * c - rotate_half(dy * s)
