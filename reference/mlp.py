"""SwiGLU feed-forward: the dense MLP of layers l < L_d and the shared expert (SPEC §4.7; backward §5)."""

from .activations import sigmoid
from .linear import linear_forward

__all__ = ["swiglu_forward", "swiglu_mlp_forward"]


def swiglu_forward(a, c):
    """h = silu(a) ⊙ c (SPEC §4.7). ctx = (a, c, σ(a)): the backward needs
    da = dh ⊙ c ⊙ σ(a)(1 + a(1 − σ(a))) and dc = dh ⊙ silu(a)."""
    sig = sigmoid(a)
    return a * sig * c, (a, c, sig)


def swiglu_mlp_forward(x, w_gate, w_up, w_down):
    """FFN(x) = W_down (silu(W_gate x) ⊙ W_up x) (SPEC §4.7). ctx holds the three linears' and the SwiGLU's ctx."""
    a, gate_ctx = linear_forward(x, w_gate)
    c, up_ctx = linear_forward(x, w_up)
    h, act_ctx = swiglu_forward(a, c)
    y, down_ctx = linear_forward(h, w_down)
    return y, (gate_ctx, up_ctx, act_ctx, down_ctx)
