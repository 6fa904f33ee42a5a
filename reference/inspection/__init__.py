"""The step inspector: run the model through a tracing op table and see every operator's inputs and outputs.

Model code is written once against an op table (model/ops.py); `TracingOps` wraps any table (the NumPy reference, later
a numba or cupy backend) and records every leaf call as an `Event`. The traced run is the same computation as the
untraced one: the wrapper calls the wrapped table's own functions with the same arguments and hands their results back
untouched, so every value is bitwise that of `logits` / `loss_and_grads` (tests/test_inspector.py proves it).

Event names follow the model's structure (the HF module tree, SPEC §3.1):
  - an operator whose arguments include parameters is named after them, found by identity in the params dict:
    `linear_forward(a, params["model.layers.3.self_attn.q_proj.weight"])` is "model.layers.3.self_attn.q_proj";
    several parameters give their common prefix (`experts_forward` → "model.layers.3.mlp.experts"), and a prefix
    that adds nothing to the scope falls back to scope + operator ("model.layers.3.mlp.router");
    the tied head is "lm_head";
  - any other operator is named scope + operator, with the model's own role names where the op table's name is
    generic (attention → "sdpa", output_gate → "gate", swiglu → "act", the two RoPE calls → "q_rope", "k_rope"),
    and a counter "_1", "_2", … when the same name repeats in a pass;
  - an operator called outside every scope takes the scope of the operator that produced its first array input
    (the balance loss of a layer → "model.layers.3.mlp.balance_loss"), else stays at the top ("cross_entropy");
  - a backward is named after the forward whose ctx it consumes: `Event.phase` tells them apart.

Python API:

    from trinity.reference.inspection import step_through
    for event in step_through(config, params, tokens, labels=None, step=False):
        event.name, event.op, event.phase, event.inputs, event.outputs

runs one forward (labels given: also the losses and the backward; step=True: also gradient clipping, the
load-balancing update and one optimizer step at the recipe's peak learning rates, exactly as the trainer orders
them), pausing after each operator until the loop asks for the next one. `write_trace` / `read_trace` store a
trace in HDF5, one group per module (model/layers/3/self_attn/q_proj/forward/outputs/y).

Modules, by job:
    events.py     Event (one recorded call), the result names (OUTPUT_NAMES, GRAD_OF), the --layer / --op filter
    tracing.py    TracingOps, the op table that wraps another and records every leaf call
    stepping.py   StepThrough / step_through: one forward, backward and update, paused after each event
    analysis.py   tensor_stats, attention_entropy
    traces.py     write_trace / read_trace (HDF5)

Imports: operators/, model/, files.py and, for step=True, training/ (balancing, optimizer); only the cli (and the
tests) import this package.
"""

from .analysis import attention_entropy, tensor_stats
from .events import GRAD_OF, OUTPUT_NAMES, Event, event_matches, name_matches
from .stepping import RouterInfo, StepThrough, step_through
from .traces import TRACE_FORMAT, read_trace, write_trace
from .tracing import TracingOps

__all__ = ["Event", "TracingOps", "StepThrough", "step_through", "write_trace", "read_trace",
           "attention_entropy", "tensor_stats", "event_matches", "name_matches", "RouterInfo", "OUTPUT_NAMES",
           "GRAD_OF", "TRACE_FORMAT"]
