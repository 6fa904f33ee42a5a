"""Elementwise activations shared by the gate, SwiGLU and the router (SPEC §4.4 step 7, §4.7, §4.8)."""

import numpy as np

__all__ = ["sigmoid", "silu"]


def sigmoid(z):
    """σ(z) = 1 / (1 + e^{−z}), evaluated without overflow for large |z| (e^{−|z|} ≤ 1 on both branches)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def silu(z):
    """silu(z) = z·σ(z) (SPEC §4.7)."""
    return z * sigmoid(z)
