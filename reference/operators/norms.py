"""RMSNorm over the last axis: the four sandwich norms, the final norm and the per-head QK norms (SPEC §4.3)."""

from .array_module import array_namespace

__all__ = ["rmsnorm_forward", "rmsnorm_backward"]


def rmsnorm_forward(x, gain, eps):
    """y = γ ⊙ x̂ with x̂ = x · ρ and ρ = (mean(x²) + ε)^{−1/2}, the mean over the last axis (SPEC §4.3).

    The same function serves the per-head QK norm (SPEC §4.4 step 2): x is [..., heads, d_h] and one γ ∈ R^{d_h}
    broadcasts over every head, so its gradient sums over tokens and heads (SPEC §5).
    ctx = (x̂, ρ, γ): the backward is dx = ρ(u − x̂·mean(u ⊙ x̂)) with u = γ ⊙ dy, and dγ = Σ dy ⊙ x̂.
    """
    xp = array_namespace(x)
    rho = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + float(eps))  # ε rounded to x's dtype
    x_hat = x * rho
    return gain * x_hat, (x_hat, rho, gain)


def rmsnorm_backward(ctx, dy):
    """With u = γ ⊙ dy: dx = ρ (u − x̂ · mean(u ⊙ x̂)), dγ = Σ dy ⊙ x̂ over every leading axis (tokens, and heads
    for the QK norm) (SPEC §5 "RMSNorm")."""
    x_hat, rho, gain = ctx
    xp = array_namespace(dy, x_hat)
    u = gain * dy
    dx = rho * (u - x_hat * xp.mean(u * x_hat, axis=-1, keepdims=True))
    dgain = xp.sum(xp.reshape(dy * x_hat, (-1, dy.shape[-1])), axis=0)
    return dx, dgain
