"""Elementwise activations shared by the gate, SwiGLU and the router (SPEC §4.4 step 7, §4.7, §4.8)."""

from .array_module import array_namespace

__all__ = ["sigmoid", "silu"]


def sigmoid(z):
    """σ(z) = 1 / (1 + e^{−z}), evaluated without overflow for large |z| (e^{−|z|} ≤ 1 on both branches)."""
    xp = array_namespace(z)
    e = xp.exp(-xp.abs(z))
    return xp.astype(xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)), z.dtype, copy=False)


def silu(z):
    """silu(z) = z·σ(z) (SPEC §4.7)."""
    return z * sigmoid(z)
