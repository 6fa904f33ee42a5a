"""Events of a traced run: `Event` (one operator call, or one step of the update), the names of each operator's
results (OUTPUT_NAMES, GRAD_OF) and the --layer / --op filter (name_matches, event_matches). Naming rules: the
package docstring (inspection/__init__.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Event", "OUTPUT_NAMES", "GRAD_OF", "name_matches", "event_matches"]

# Names of each operator's results, in order; a trailing "ctx" is the operator's saved context (not recorded as an
# output). Operators not listed: out0, out1, … and, for *_forward, the last result is the ctx.
OUTPUT_NAMES = {
    "linear_forward": ("y", "ctx"), "linear_backward": ("dx", "dw"),
    "embedding_forward": ("x", "ctx"), "embedding_backward": ("dtable",),
    "rmsnorm_forward": ("y", "ctx"), "rmsnorm_backward": ("dx", "dgain"),
    "rope_tables": ("cos", "sin"), "rope_forward": ("y", "ctx"), "rope_backward": ("dx",),
    "attention_forward": ("o", "ctx"), "attention_backward": ("dq", "dk", "dv"),
    "output_gate_forward": ("y", "ctx"), "output_gate_backward": ("do", "dg"),
    "swiglu_forward": ("h", "ctx"), "swiglu_backward": ("da", "dc"),
    "router_forward": ("weights", "experts", "ctx"), "router_backward": ("dx", "dw_router"),
    "dispatch": ("plan",), "experts_forward": ("y_grouped", "ctx"),
    "experts_backward": ("dx_grouped", "dw1", "dw3", "dw2"),
    "combine": ("y",), "combine_backward": ("dy_grouped", "dweights"), "scatter_to_tokens": ("y",),
    "cross_entropy_forward": ("ce", "z", "ctx"), "cross_entropy_backward": ("dlogits",),
    "balance_loss_forward": ("loss", "ctx"), "balance_loss_backward": ("dscores",),
}

# Backward output → the forward argument (a parameter) it is the gradient of.
GRAD_OF = {"dw": "w", "dgain": "gain", "dtable": "table", "dw_router": "w_router", "dw1": "w1", "dw3": "w3",
           "dw2": "w2"}

_BACKWARD_ONLY = {"scatter_to_tokens"}
_LAYER = re.compile(r"^model\.layers\.(\d+)(?:\.|$)")


def _short(op: str) -> str:
    for suffix in ("_forward", "_backward"):
        if op.endswith(suffix):
            return op[: -len(suffix)]
    return op


def _direction(op: str) -> str:
    return "backward" if op.endswith("_backward") or op in _BACKWARD_ONLY else "forward"


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not np.isscalar(x)


def _copy(x):
    """A private copy of an array (numpy, cupy or any Array API namespace's) or of each array field of a tuple; other
    values as they are."""
    if _is_array(x):
        return x.copy() if hasattr(x, "copy") else x.__array_namespace__().asarray(x, copy=True)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_copy(v) for v in x))
    return x


# ---- events -------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Event:
    """One operator call (or one step of the update: balancing, optimizer) of a traced run.

    name:    qualified name following the model ("model.layers.3.self_attn.q_proj"); `phase` separates the
             forward, backward, loss, balancing and optimizer events of the same module.
    op:      the op-table name ("linear_forward"), or "balance_step", "muon", "adamw", "clip_grad_norm", "losses".
    inputs:  argument name → value. Arrays are private copies taken before the call, except parameters, which are
             the live arrays (see `param_keys`); the ctx argument of a backward is not listed (see `forward`).
    outputs: result name → value, private copies (OUTPUT_NAMES); the ctx is kept apart in `ctx`.
    param_keys: argument name → params key for the arguments that are parameters (for a backward: those of its
             forward).
    forward: for a backward, the forward Event whose ctx it consumed (None when that event was filtered out).
    """
    index: int
    name: str
    op: str
    phase: str
    scope: str
    inputs: dict
    outputs: dict
    param_keys: dict = field(default_factory=dict)
    ctx: Any = field(default=None, repr=False)
    forward: "Event | None" = field(default=None, repr=False)

    @property
    def layer(self) -> int | None:
        m = _LAYER.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def short(self) -> str:
        """The last component of the name: "q_proj", "router", "sdpa"."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def param_grads(self) -> dict:
        """For a backward event: params key → this call's gradient of that parameter (the tied embedding gets two
        parts, from the table lookup and from the head, which `loss_and_grads` sums)."""
        out = {}
        for name, value in self.outputs.items():
            arg = GRAD_OF.get(name)
            if arg is not None and arg in self.param_keys:
                out[self.param_keys[arg]] = value
        return out

    def arrays(self, which: str = "outputs") -> dict:
        """The array-valued entries of inputs or outputs (tuples of arrays flattened as name.field)."""
        items = {}
        for name, value in getattr(self, which).items():
            if _is_array(value):
                items[name] = value
            elif isinstance(value, tuple) and hasattr(value, "_fields"):
                items.update({f"{name}.{f}": v for f, v in zip(value._fields, value) if _is_array(v)})
        return items

    def __repr__(self):
        shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in self.arrays().items())
        return f"Event({self.index}, {self.phase} {self.name} [{self.op}] -> {shapes})"


def name_matches(name: str, op: str, layers=None, ops=None) -> bool:
    """The --layer / --op filter on an event's name and op. layers: layer indices (events outside every layer never
    match a layer filter). ops: names matched against any component of the name ("q_proj", "router", "sdpa",
    "self_attn": a module and everything in it), the op with or without _forward/_backward ("linear",
    "attention_forward", "muon"), or the full name as a shell pattern ("model.layers.*.mlp.experts")."""
    import fnmatch

    if layers is not None:
        m = _LAYER.match(name)
        if m is None or int(m.group(1)) not in set(layers):
            return False
    if ops:
        parts = name.split(".")
        return any(pattern in parts or pattern in (op, _short(op)) or fnmatch.fnmatchcase(name, pattern)
                   for pattern in ops)
    return True


def event_matches(event: Event, layers=None, ops=None) -> bool:
    """name_matches for an Event."""
    return name_matches(event.name, event.op, layers, ops)
