"""The "numba" op table: the reference table with the operators that cost time replaced by numba kernels.

Model code is never duplicated: NumbaOps subclasses trinity.reference.model.ops.ReferenceOps and overrides leaf
operators only. What stays the reference's, and why:
    linear_forward/backward      one BLAS GEMM each already (x Wᵀ, dyᵀ x)
    embedding_forward            one NumPy gather
    rope_tables                  computed once per forward, O(T·d_h)
    balance_loss_forward/backward  O(B·T·E), negligible
Every override takes the reference's arguments and returns the reference's outputs; the ctx objects are tuples of
arrays consumed only by this table's own backwards, except those the model reads, which are the reference's named
types (router: RouterCtx, cross-entropy: CrossEntropyCtx, the dispatch plan).
"""

from __future__ import annotations

from trinity.reference.model.ops import ReferenceOps

from . import attention, elementwise, embedding, losses, moe, norms, router
from .newton_schulz import newton_schulz
from .optimizer_kernels import adamw_update, scaled, sum_of_squares

__all__ = ["NumbaOps", "OVERRIDDEN"]

OVERRIDDEN = {
    norms: ["rmsnorm_forward", "rmsnorm_backward"],
    elementwise: ["rope_forward", "rope_backward", "swiglu_forward", "swiglu_backward", "output_gate_forward",
                  "output_gate_backward"],
    attention: ["attention_forward", "attention_backward"],
    router: ["router_forward", "router_backward"],
    moe: ["dispatch", "experts_forward", "experts_backward", "combine", "combine_backward", "scatter_to_tokens"],
    losses: ["cross_entropy_forward", "cross_entropy_backward"],
    embedding: ["embedding_backward"],
}


class NumbaOps(ReferenceOps):
    """CPU kernels in numba (threads: NUMBA_NUM_THREADS), matrix products in BLAS; float32 or float64."""

    name = "numba"
    newton_schulz = staticmethod(newton_schulz)
    adamw_update = staticmethod(adamw_update)
    sum_of_squares = staticmethod(sum_of_squares)
    scaled = staticmethod(scaled)


for _module, _names in OVERRIDDEN.items():
    for _name in _names:
        setattr(NumbaOps, _name, staticmethod(getattr(_module, _name)))
