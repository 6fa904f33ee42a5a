"""Linear map without bias, torch convention W ∈ R^{out×in} (SPEC notation; §5 "Linear")."""

from .array_module import array_namespace

__all__ = ["linear_forward", "linear_backward"]


def linear_forward(x, w):
    """y = x Wᵀ over the last axis of x. ctx = (x, W): the backward needs dx = dy W and dW = Σ_tokens dyᵀ x."""
    return x @ w.T, (x, w)


def linear_backward(ctx, dy):
    """dx = dy W, dW = Σ_tokens dyᵀ x (SPEC §5 "Linear"); leading axes of x and dy are flattened as tokens."""
    x, w = ctx
    xp = array_namespace(dy, x)
    dw = xp.reshape(dy, (-1, dy.shape[-1])).T @ xp.reshape(x, (-1, x.shape[-1]))
    return dy @ w, dw
