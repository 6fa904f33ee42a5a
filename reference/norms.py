"""RMSNorm over the last axis: the four sandwich norms, the final norm and the per-head QK norms (SPEC §4.3)."""

import numpy as np

__all__ = ["rmsnorm_forward"]


def rmsnorm_forward(x, gain, eps):
    """y = γ ⊙ x̂ with x̂ = x · ρ and ρ = (mean(x²) + ε)^{−1/2}, the mean over the last axis (SPEC §4.3).

    The same function serves the per-head QK norm (SPEC §4.4 step 2): x is [..., heads, d_h] and one γ ∈ R^{d_h}
    broadcasts over every head, so its gradient sums over tokens and heads (SPEC §5).
    ctx = (x̂, ρ, γ): the backward is dx = ρ(u − x̂·mean(u ⊙ x̂)) with u = γ ⊙ dy, and dγ = Σ dy ⊙ x̂.
    """
    rho = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.asarray(eps, dtype=x.dtype))
    x_hat = x * rho
    return gain * x_hat, (x_hat, rho, gain)
