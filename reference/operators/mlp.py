"""The SwiGLU activation h = silu(a) ⊙ c of every feed-forward (SPEC §4.7; backward §5). Elementwise arithmetic
only, so it runs on any array namespace as it is."""

from .activations import sigmoid

__all__ = ["swiglu_forward", "swiglu_backward"]


def swiglu_forward(a, c):
    """h = silu(a) ⊙ c (SPEC §4.7). ctx = (a, c, σ(a)): the backward needs
    da = dh ⊙ c ⊙ σ(a)(1 + a(1 − σ(a))) and dc = dh ⊙ silu(a)."""
    sig = sigmoid(a)
    return a * sig * c, (a, c, sig)


def swiglu_backward(ctx, dh):
    """da = dh ⊙ c ⊙ σ(a)(1 + a(1 − σ(a))), dc = dh ⊙ silu(a) (SPEC §5 "SwiGLU")."""
    a, c, sig = ctx
    return dh * c * sig * (1.0 + a * (1.0 - sig)), dh * a * sig
