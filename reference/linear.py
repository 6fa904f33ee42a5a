"""Linear map without bias, torch convention W ∈ R^{out×in} (SPEC notation; §5 "Linear")."""

__all__ = ["linear_forward"]


def linear_forward(x, w):
    """y = x Wᵀ over the last axis of x. ctx = (x, W): the backward needs dx = dy W and dW = Σ_tokens dyᵀ x."""
    return x @ w.T, (x, w)
