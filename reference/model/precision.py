"""Mixed precision: the training step's arithmetic precision, a wrapper around any op table (`[train] precision`).

    "full"   every operator computes in the parameters' dtype ([model] dtype: float32 or float64); the table as is
    "bf16"   float32 master weights, gradients and optimizer state; the operators compute on bfloat16 values with
             float32 accumulation, as a bf16 training run on a GPU does (torch autocast, Megatron's bf16 mode)

What "bf16" rounds (reference/operators/bf16.py round_bf16: a float32 whose low 16 bits are zero is a bf16 value),
and what it keeps in float32, following what the released checkpoints and transformers' afmoe do (SPEC §4.11):

    rounded to bf16   the inputs and outputs of every matrix product and elementwise operator: activations, their
                      gradients, and the weights where they are used (the master copy stays float32, so a weight is
                      cast to bf16 at each use, as autocast does); RoPE's cos/sin (computed in float32, then cast)
    float32           RMSNorm gains (every norm, q_norm/k_norm and the final norm), expert_bias, the router's
                      scores and gate weights (its logits are formed from bf16 x and W_r, then σ, top-k and
                      normalisation in float32), softmax and log-sum-exp inside attention, the cross-entropy and its
                      z-loss (logits upcast), the balance loss, every parameter gradient (a bf16 GEMM with a float32
                      output: dW = dyᵀx summed in float32, then accumulated over micro-batches in float32), the
                      residual stream between operators (as Megatron's fp32 residual option), AdamW
    bf16 products     a product of bf16 values is exact in float32, so a float32 product of rounded factors is a bf16
                      GEMM with float32 accumulation (up to its summation order)
    Newton–Schulz     in bf16 as Dion computes it (operators/bf16.py newton_schulz_bf16)

Activations are held as float32 arrays with bf16 values: the arithmetic of a bf16 run, not its memory (a bf16 array
dtype is a backend's business: CuPy has none to rely on, NumPy none at all).

The rules are one table, BF16_RULES: for each leaf operator, the arguments rounded on the way in and the results
rounded on the way out. An operator not in it passes through (dispatch works on integers; AdamW, clipping's sums and
the balance loss stay float32). The wrapper is applied around a backend's table before the parallel layout wraps it
(distributed.parallel_ops.ParallelOps), so collectives carry the float32 values they carry today.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

from ..operators.bf16 import BF16, newton_schulz_bf16, round_bf16
from .ops import ReferenceOps

__all__ = ["PRECISIONS", "BF16_RULES", "FLOAT32_OPS", "MixedPrecisionOps", "with_precision", "check_precision"]

PRECISIONS = ("full", "bf16")

ALL = "all"  # a result rule: the operator returns one array, rounded whole
# operator: (arguments rounded to bf16 on the way in, results rounded on the way out: indices into the returned
# tuple, or ALL). Forward results keep their ctx as the wrapped operator made it from the rounded inputs.
BF16_RULES: dict[str, tuple[tuple[str, ...], tuple[int, ...] | str]] = {
    "linear_forward": (("x", "w"), (0,)),
    "linear_backward": (("dy",), (0,)),  # dx in bf16; dW = dyᵀx in float32
    "embedding_forward": (("table",), (0,)),
    "embedding_backward": (("dx",), ()),  # the table's gradient in float32
    "rmsnorm_forward": (("x",), (0,)),  # the gain stays float32
    "rmsnorm_backward": (("dy",), (0,)),  # dγ in float32
    "rope_tables": ((), (0, 1)),
    "rope_forward": (("x",), (0,)),
    "rope_backward": (("dy",), ALL),
    "attention_forward": (("q", "k", "v"), (0,)),  # softmax and lse in float32
    "attention_backward": (("do",), (0, 1, 2)),
    "output_gate_forward": (("o", "g"), (0,)),
    "output_gate_backward": (("dy",), (0, 1)),
    "swiglu_forward": (("a", "c"), (0,)),
    "swiglu_backward": (("dh",), (0, 1)),
    "router_forward": (("x", "w_router"), ()),  # scores, top-k and gate weights in float32; expert_bias float32
    "router_backward": ((), (0,)),  # dx in bf16; dW_r in float32
    "experts_forward": (("x_grouped", "w1", "w3", "w2"), (0,)),
    "experts_backward": (("dy_grouped", "w1", "w3", "w2"), (0,)),  # dx in bf16; expert weight gradients float32
    "combine": (("y_grouped",), ALL),  # float32 gates times bf16 expert outputs, the sum rounded once
    "combine_backward": (("dy", "y_grouped"), (0,)),  # the gates' gradient in float32
    "scatter_to_tokens": (("rows",), ALL),
    "cross_entropy_forward": (("logits",), ()),  # the loss in float32 on bf16 logits
    "cross_entropy_backward": ((), ALL),
}
# The leaf operators that stay as the base computes them: the dispatch plan (integers) and the balance loss (on the
# float32 router scores). Every leaf operator is in exactly one of the two (tests/test_precision.py).
FLOAT32_OPS = ("dispatch", "balance_loss_forward", "balance_loss_backward")


def _round(x):
    """round_bf16 on a float array; anything else (integers, None, Python numbers) as it is."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or np.dtype(dtype).kind != "f":
        return x
    return round_bf16(x)


def _rounding(name, operator):
    """`operator` with BF16_RULES[name] applied: named arguments rounded in, the listed results rounded out."""
    names, results = BF16_RULES[name]
    signature = inspect.signature(getattr(ReferenceOps, name))

    @functools.wraps(operator)
    def rounded(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for arg in names:
            if arg in bound.arguments:
                bound.arguments[arg] = _round(bound.arguments[arg])
        out = operator(*bound.args, **bound.kwargs)
        if results == ALL:
            return _round(out)
        if not results:
            return out
        out = list(out)
        for i in results:
            out[i] = _round(out[i])
        return tuple(out)
    return rounded


class MixedPrecisionOps:
    """`base` (any op table) computing in bf16 by BF16_RULES; everything else (seams, scope, xp, the optimizer's
    AdamW and clipping kernels) is the base's. Newton–Schulz runs in bf16 (newton_schulz_bf16)."""

    precision = BF16

    def __init__(self, base):
        self.base = base
        self.name = f"{getattr(base, 'name', type(base).__name__)}+bf16"
        self.xp = base.xp
        for op in BF16_RULES:
            setattr(self, f"_{op}" if op in ("linear_forward", "linear_backward") else op,
                    _rounding(op, getattr(base, op)))

    def __getattr__(self, name):  # seams, scope, dispatch, balance loss, AdamW, clipping: the base's
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    # The linear ctx contract (model/seams.py LINEAR_CTX): the ctx holds the weight itself, which FSDP swaps for its
    # bucket's name until the backward. So the ctx keeps the float32 weight, and the backward rounds it again (the
    # same bf16 values; no rounded copy of a weight is kept between forward and backward).
    def linear_forward(self, x, w):
        y, (x16, _) = self._linear_forward(x, w)
        return y, (x16, w)

    def linear_backward(self, ctx, dy):
        x16, w = ctx
        return self._linear_backward((x16, round_bf16(w)), dy)

    def newton_schulz(self, G, steps: int = 5, coefficients="dion", eps: float = 1e-8, dtype=None):
        """Newton–Schulz in bf16 (Dion's precision, SPEC §9.2), returned in G's dtype (float32 master state)."""
        return newton_schulz_bf16(G, steps, coefficients, eps).astype(G.dtype, copy=False)

    def __repr__(self):
        return f"MixedPrecisionOps({self.base!r})"


def _check_name(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def check_precision(precision: str, dtype) -> None:
    """A one-line ValueError unless `precision` is one of PRECISIONS and fits the parameters' dtype (bf16 keeps
    float32 master weights)."""
    _check_name(precision)
    if precision == "bf16" and np.dtype(dtype) != np.dtype(np.float32):
        raise ValueError(f'precision = "bf16" keeps float32 master weights: the parameters are {np.dtype(dtype)} '
                         '(set [model] dtype = "float32")')


def with_precision(ops, precision: str):
    """The op table that computes `ops`' operators at `precision` ("full": ops itself; "bf16": MixedPrecisionOps).
    ops None means the reference table."""
    _check_name(precision)
    if precision == "full":
        return ops
    if ops is None:
        from .ops import REFERENCE
        ops = REFERENCE
    return MixedPrecisionOps(ops)
