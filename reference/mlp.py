"""SwiGLU feed-forward: the dense MLP of layers l < L_d and the shared expert (SPEC §4.7; backward §5)."""

from .activations import sigmoid
from .linear import linear_backward, linear_forward

__all__ = ["swiglu_forward", "swiglu_backward", "swiglu_mlp_forward", "swiglu_mlp_backward"]


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


def swiglu_backward(ctx, dh):
    """da = dh ⊙ c ⊙ σ(a)(1 + a(1 − σ(a))), dc = dh ⊙ silu(a) (SPEC §5 "SwiGLU")."""
    a, c, sig = ctx
    return dh * c * sig * (1.0 + a * (1.0 - sig)), dh * a * sig


def swiglu_mlp_backward(ctx, dy):
    """Backward of swiglu_mlp_forward: returns dx and (dW_gate, dW_up, dW_down)."""
    gate_ctx, up_ctx, act_ctx, down_ctx = ctx
    dh, dw_down = linear_backward(down_ctx, dy)
    da, dc = swiglu_backward(act_ctx, dh)
    dx_gate, dw_gate = linear_backward(gate_ctx, da)
    dx_up, dw_up = linear_backward(up_ctx, dc)
    return dx_gate + dx_up, (dw_gate, dw_up, dw_down)
