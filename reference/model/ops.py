"""The operator table: every leaf operator of the model as a forward/backward pair, the optimizer kernels, and the
array module. There is one reference table, REFERENCE (trinity.accel.get_backend("reference") returns it).

Model code (layers.py, model.py, objective.py) is written once against an op table `ops`: it calls
`ops.linear_forward(...)`, never the functions directly, and reaches parameters, routed experts and attention keys
through the table's seams (seams.py: identities here, collectives under trinity.distributed). A backend
(trinity.accel) supplies a table with the same names and signatures and faster kernels; a tracing table (the step
inspector) wraps every call to record its inputs and outputs. `ops.scope(name)` marks where in the model a call happens ("model.layers.3.self_attn"); the
reference ignores it. `ops.to_device(tree)` / `ops.to_host(tree)` move arrays between the host's NumPy and the table's
module (the identity here; a device table's copies are trinity.accel.device's, counted).
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..operators import attention, embedding, linear, losses, mlp, moe, norms, optimizer_kernels, rope, router
from .seams import SingleProcessSeams

__all__ = ["ReferenceOps", "REFERENCE", "LEAF_OPS", "OPTIMIZER_KERNELS"]

LEAF_OPS = {
    linear: ["linear_forward", "linear_backward"],
    embedding: ["embedding_forward", "embedding_backward"],
    norms: ["rmsnorm_forward", "rmsnorm_backward"],
    rope: ["rope_tables", "rope_forward", "rope_backward"],
    attention: ["attention_forward", "attention_backward", "output_gate_forward", "output_gate_backward"],
    mlp: ["swiglu_forward", "swiglu_backward"],
    router: ["router_forward", "router_backward"],
    moe: ["dispatch", "experts_forward", "experts_backward", "combine", "combine_backward", "scatter_to_tokens"],
    losses: ["cross_entropy_forward", "cross_entropy_backward", "balance_loss_forward", "balance_loss_backward"],
}
# The optimizer kernels (operators/optimizer_kernels.py): training/optim.py's optimizer_step and clip_grad_norm
# take them from a table (`kernels=`).
OPTIMIZER_KERNELS = ["newton_schulz", "adamw_update", "sum_of_squares", "scaled"]


class ReferenceOps(SingleProcessSeams):
    """The NumPy reference: readable, float32 or float64, the definition every other table is checked against.
    The seams where parallelism enters (seams.py) are the single-process identities."""

    name = "reference"
    xp = np
    on_device = False  # NumPy is the host: to_device / to_host are the identity (nothing copied, nothing counted)

    def scope(self, name: str):
        return contextlib.nullcontext()

    @staticmethod
    def to_device(x):
        """x as the table's arrays: NumPy arrays already are (a device table copies them: accel/device.py)."""
        return x

    @staticmethod
    def to_host(x):
        """x as NumPy arrays on the host: the table's arrays already are."""
        return x


for _module, _names in [*LEAF_OPS.items(), (optimizer_kernels, OPTIMIZER_KERNELS)]:
    for _name in _names:
        setattr(ReferenceOps, _name, staticmethod(getattr(_module, _name)))

REFERENCE = ReferenceOps()
