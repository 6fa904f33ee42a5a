"""The step inspector: run the model through a tracing op table and see every operator's inputs and outputs.

Model code is written once against an op table (ops.py); `TracingOps` wraps any table (the NumPy reference, later
a numba or cupy backend) and records every leaf call as an `Event`. The traced run is the same computation as the
untraced one: the wrapper calls the wrapped table's own functions with the same arguments and hands their results
back untouched, so every value is bitwise that of `logits` / `loss_and_grads` (tests/test_inspector.py proves it).

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

    from trinity.reference.inspector import step_through
    for event in step_through(config, params, tokens, labels=None, step=False):
        event.name, event.op, event.phase, event.inputs, event.outputs

runs one forward (labels given: also the losses and the backward; step=True: also gradient clipping, the
load-balancing update and one optimizer step at the recipe's peak learning rates, exactly as the trainer orders
them), pausing after each operator until the loop asks for the next one. `write_trace` / `read_trace` store a
trace in HDF5, one group per module (model/layers/3/self_attn/q_proj/forward/outputs/y).
"""

from __future__ import annotations

import contextlib
import inspect as _pyinspect
import json
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .config import Config
from .model import check_inputs, model_forward
from .objective import loss_and_grads
from .ops import LEAF_OPS, REFERENCE

__all__ = ["Event", "TracingOps", "StepThrough", "step_through", "write_trace", "read_trace",
           "attention_entropy", "tensor_stats", "event_matches", "name_matches", "RouterInfo", "OUTPUT_NAMES", "GRAD_OF", "TRACE_FORMAT"]

TRACE_FORMAT = "trinity-trace 1"

_LEAF_NAMES = tuple(name for names in LEAF_OPS.values() for name in names)

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

# Values inside an operator's ctx worth seeing, recorded as extra outputs when the ctx has the reference layout
# (router_forward ctx = (x, W_r, s, experts, S, ρ, z); attention_forward ctx = (q, k, v, o, lse, …)) and the
# value the expected shape: (ctx length, {name: (index, expected shape from the bound arguments)}).
_CTX_EXTRAS = {
    "router_forward": (7, {"scores": (2, lambda a: (a["x"].shape[0], a["w_router"].shape[0])),
                           "router_logits": (6, lambda a: (a["x"].shape[0], a["w_router"].shape[0]))}),
    "attention_forward": (10, {"lse": (4, lambda a: (a["q"].shape[0], a["q"].shape[2], a["q"].shape[1]))}),
}


def _ctx_extras(op: str, bound: dict, ctx) -> dict:
    spec = _CTX_EXTRAS.get(op)
    if spec is None or not isinstance(ctx, tuple) or len(ctx) != spec[0]:
        return {}
    out = {}
    for name, (i, shape_of) in spec[1].items():
        try:
            ok = _is_array(ctx[i]) and tuple(ctx[i].shape) == tuple(shape_of(bound))
        except (KeyError, AttributeError, IndexError, TypeError):
            ok = False
        if ok:
            out[name] = _copy(ctx[i])
    return out

# The model's role names for operators that carry no parameter (layers.py ctx keys); a tuple names the calls of
# one pass in order.
ALIASES = {"attention": "sdpa", "output_gate": "gate", "swiglu": "act", "rope": ("q_rope", "k_rope")}

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
    """A private copy of an array (numpy or cupy) or of each array field of a tuple; other values as they are."""
    if _is_array(x):
        return x.copy()
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


# ---- the tracing op table -----------------------------------------------------------------------------------------
class TracingOps:
    """An op table that wraps `base` (any table with the LEAF_OPS names, `xp` and `scope`) and records each call.

    params: the params dict the model runs with: parameters are recognised by identity (call `set_params` after
    replacing entries, e.g. after the balancing update). keep(name, op, phase) → bool chooses the events that are
    recorded (None: all); the others cost nothing but the call. on_event(event) is called after each recorded
    call, from the thread running the model. capture(name, op) → bool chooses calls whose raw results (not copies)
    are stored in `captured[(phase, name)]` whatever `keep` says.
    """

    def __init__(self, base=None, params: dict | None = None, keep: Callable | None = None,
                 on_event: Callable | None = None, capture: Callable | None = None):
        self.base = base if base is not None else REFERENCE
        self.xp = self.base.xp
        self.name = f"trace({getattr(self.base, 'name', type(self.base).__name__)})"
        self.keep, self.on_event, self.capture = keep, on_event, capture
        self.events: list[Event] = []
        self.captured: dict = {}
        self._stack: list[str] = []
        self._signatures: dict = {}
        self.set_params(params or {})
        self.reset()

    # -- bookkeeping
    def set_params(self, params: dict):
        """Recognise the arrays of `params` as parameters (by identity)."""
        self._param_of = {id(v): k for k, v in params.items()}
        self._param_refs = dict(params)  # keeps the ids valid
        self._tied = ("lm_head.weight" not in params) and "model.embed_tokens.weight" in params

    def reset(self):
        """Start a new pass: name counters restart (events and captures are kept)."""
        self._used: dict = {}
        self._occurrence: dict = {}
        self._ctx_owner: dict = {}  # id(ctx) → (ctx, name, event or None)
        self._producer: dict = {}  # id(array) → (weakref, scope)
        self._index = len(self.events)

    @property
    def current_scope(self) -> str:
        return ".".join(s for s in self._stack if s)

    @contextlib.contextmanager
    def scope(self, name: str):
        self._stack.append(name)
        try:
            with self.base.scope(name):
                yield
        finally:
            self._stack.pop()

    def __getattr__(self, name):  # anything else of the base table (not traced)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.base, name)

    # -- naming
    def _signature(self, op: str, fn):
        if op not in self._signatures:
            try:
                target = getattr(fn, "py_func", fn)  # numba dispatchers keep the Python function here
                self._signatures[op] = _pyinspect.signature(target)
            except (TypeError, ValueError):
                self._signatures[op] = None
        return self._signatures[op]

    def _bind(self, op, fn, args, kwargs) -> dict:
        sig = self._signature(op, fn)
        if sig is not None:
            try:
                bound = sig.bind(*args, **kwargs)
                return dict(bound.arguments)
            except TypeError:
                pass
        named = {f"arg{i}": a for i, a in enumerate(args)}
        named.update(kwargs)
        return named

    def _producer_scope(self, bound: dict) -> str:
        for value in bound.values():
            x = value
            while _is_array(x):
                hit = self._producer.get(id(x))
                if hit is not None and hit[0]() is x:
                    return hit[1]
                x = getattr(x, "base", None)
            if _is_array(value):
                break
        return ""

    def _register(self, value, scope: str):
        import weakref

        if scope and _is_array(value):
            try:
                self._producer[id(value)] = (weakref.ref(value), scope)
            except TypeError:
                pass

    def _unique(self, direction: str, name: str) -> str:
        n = self._used.get((direction, name), 0)
        self._used[(direction, name)] = n + 1
        return name if n == 0 else f"{name}_{n}"

    def _name(self, op: str, direction: str, bound: dict, param_keys: dict, owner) -> tuple[str, str]:
        """(name, scope) of a call."""
        scope = self.current_scope
        if owner is not None:  # a backward: its forward's name
            return owner[1], scope
        if param_keys:
            keys = list(param_keys.values())
            if op == "linear_forward" and self._tied and keys == ["model.embed_tokens.weight"]:
                return self._unique(direction, "lm_head"), scope
            parts = [k[:-len(".weight")].split(".") if k.endswith(".weight") else k.split(".") for k in keys]
            common = parts[0]
            for p in parts[1:]:
                n = 0
                while n < min(len(common), len(p)) and common[n] == p[n]:
                    n += 1
                common = common[:n]
            prefix = ".".join(common)
            if prefix and prefix != scope:
                return self._unique(direction, prefix), scope
        if not scope:
            scope = self._producer_scope(bound)
        short = _short(op)
        alias = ALIASES.get(short, short)
        if isinstance(alias, tuple):
            k = (direction, scope, short)
            i = self._occurrence.get(k, 0)
            self._occurrence[k] = i + 1
            alias = alias[i] if i < len(alias) else f"{short}"
        name = f"{scope}.{alias}" if scope else alias
        return self._unique(direction, name), scope

    # -- the call
    def _call(self, op: str, fn, args, kwargs):
        bound = self._bind(op, fn, args, kwargs)
        direction = _direction(op)
        ctx_in = bound.get("ctx") if direction == "backward" else None
        owner = self._ctx_owner.get(id(ctx_in)) if ctx_in is not None else None
        if owner is not None and owner[0] is not ctx_in:
            owner = None
        param_keys = {a: self._param_of[id(v)] for a, v in bound.items()
                      if _is_array(v) and id(v) in self._param_of and self._param_refs[self._param_of[id(v)]] is v}
        if owner is not None and owner[2] is not None:
            param_keys = {**owner[2].param_keys, **param_keys}
        elif owner is not None:
            param_keys = {**owner[3], **param_keys}
        name, scope = self._name(op, direction, bound, param_keys, owner)
        keep = self.keep is None or self.keep(name, op, direction)
        inputs = None
        if keep:
            inputs = {a: (v if a in param_keys else _copy(v)) for a, v in bound.items() if not (a == "ctx" and
                                                                                                 direction == "backward")}
        result = fn(*args, **kwargs)

        outs = result if isinstance(result, tuple) and not hasattr(result, "_fields") else (result,)
        names = OUTPUT_NAMES.get(op)
        if names is None or len(names) != len(outs):
            names = tuple(f"out{i}" for i in range(len(outs)))
            if direction == "forward" and op.endswith("_forward") and len(outs) > 1:
                names = names[:-1] + ("ctx",)
        ctx_out = outs[-1] if names and names[-1] == "ctx" else None
        if self.capture is not None and self.capture(name, op):
            self.captured[(direction, name)] = result

        event = None
        if keep:
            outputs = {n: _copy(v) for n, v in zip(names, outs) if n != "ctx"}
            outputs.update(_ctx_extras(op, bound, ctx_out))
            event = Event(index=self._index, name=name, op=op, phase=direction, scope=scope, inputs=inputs,
                          outputs=outputs, param_keys=param_keys, ctx=ctx_out if ctx_out is not None else ctx_in,
                          forward=owner[2] if owner is not None else None)
            self._index += 1
        if ctx_out is not None:
            self._ctx_owner[id(ctx_out)] = (ctx_out, name, event, param_keys)
            if isinstance(ctx_out, tuple):
                for v in ctx_out:
                    self._register(v, scope)
        for v in outs:
            self._register(v, scope)
        if event is not None:
            self.events.append(event)
            if self.on_event is not None:
                self.on_event(event)
        return result

    def emit(self, name: str, op: str, phase: str, inputs: dict, outputs: dict, param_keys=None) -> Event | None:
        """Record a non-operator event (losses, balancing, optimizer) in the same stream."""
        if self.keep is not None and not self.keep(name, op, phase):
            return None
        event = Event(index=self._index, name=name, op=op, phase=phase, scope="", inputs=inputs, outputs=outputs,
                      param_keys=dict(param_keys or {}))
        self._index += 1
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        return event


def _make_wrapper(op: str):
    def wrapper(self, *args, **kwargs):
        return self._call(op, getattr(self.base, op), args, kwargs)

    wrapper.__name__ = op
    wrapper.__qualname__ = f"TracingOps.{op}"
    wrapper.__doc__ = f"Traced `{op}` of the wrapped table."
    return wrapper


for _op in _LEAF_NAMES:
    setattr(TracingOps, _op, _make_wrapper(_op))


# ---- stepping through a run ---------------------------------------------------------------------------------------
class _Cancelled(BaseException):
    pass


@dataclass
class RouterInfo:
    """One MoE layer's routing of the inspected tokens: scores s [N, E], chosen experts [N, K] (biased selection),
    gate weights g [N, K], the expert bias b [E] used for the selection, and (token, slot) counts per expert [E]."""
    scores: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    counts: np.ndarray


class StepThrough:
    """One forward (+ losses and backward when labels are given, + the update when step=True), operator by operator.

    Iterate it for the events, in the order they happen; the model thread waits after each event until the next is
    asked for, and stopping early (break) ends it. `run()` instead runs everything and returns self. Afterwards:
      logits [B, T, V]; losses, grads (unclipped), stats (as loss_and_grads); routers {layer: RouterInfo};
      with step: grad_norm, clipped_grads, balance (balance_step's metrics), optimizer (optimizer_step's info),
      lr {"muon", "adamw"}; params, optimizer_state, balancing_state (after the step).
    Parameters are copied before a step unless inplace=True (then `params` and the states are updated in place,
    as the trainer does).

    lr: (muon_lr, adamw_lr) for the step; default the config's peak rates. optimizer_state, balancing_state: the
    run's state (default fresh: init_optimizer_state / init_balancing_state). ops: the table to trace (default the
    reference). keep(name, op, phase): which events to record (default all).
    """

    def __init__(self, config: Config, params: dict, tokens, labels=None, doc_ids=None, *, backward: bool | None = None,
                 step: bool = False, optimizer_state: dict | None = None, balancing_state: dict | None = None,
                 lr: tuple[float, float] | None = None, ops=None, keep: Callable | None = None, inplace: bool = False):
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
            labels = None if labels is None else np.asarray(labels)[None]
            doc_ids = None if doc_ids is None else np.asarray(doc_ids)[None]
        if step and labels is None:
            labels = tokens
        self.backward = (labels is not None) if backward is None else bool(backward)
        if self.backward and labels is None:
            labels = tokens
        self.tokens, doc_ids = check_inputs(config, params, tokens, doc_ids)
        self.labels = None if labels is None else np.asarray(labels)
        self.config, self.doc_ids, self.step = config, doc_ids, bool(step)
        if self.step and not inplace:
            params = {k: v.copy() for k, v in params.items()}
            optimizer_state = None if optimizer_state is None else {k: np.array(v, copy=True) for k, v in
                                                                    optimizer_state.items()}
            balancing_state = None if balancing_state is None else {k: v.copy() for k, v in balancing_state.items()}
        self.params, self.optimizer_state, self.balancing_state = params, optimizer_state, balancing_state
        self.lr_peak, self.base_ops, self.keep = lr, ops, keep
        self.events: list[Event] = []
        self.logits = self.losses = self.grads = self.stats = None
        self.routers: dict[int, RouterInfo] = {}
        self.grad_norm = self.clipped_grads = self.balance = self.optimizer = self.lr = None
        self._started = False

    # -- the computation, calling emit(event) after each recorded event
    def _compute(self, emit):
        from .balancing import balance_step, init_balancing_state
        from .optim import clip_grad_norm, init_optimizer_state, optimizer_step, param_group

        c, params = self.config, self.params
        keep = None if self.keep is None else (lambda name, op, phase: self.keep(name, op, phase))
        tracer = TracingOps(self.base_ops, params, keep=keep, on_event=emit,
                            capture=lambda name, op: op == "router_forward" or name == "lm_head")
        self.tracer = tracer
        if self.backward:
            self.losses, self.grads, self.stats = loss_and_grads(c, params, self.tokens, self.labels, self.doc_ids,
                                                                 ops=tracer)
            tracer.emit("loss", "losses", "loss", {}, {k: float(v) for k, v in self.losses.items()})
        else:
            _, ctx = model_forward(c, params, self.tokens, self.doc_ids, keep_ctx=True, ops=tracer)
        self.logits = tracer.captured[("forward", "lm_head")][0]
        for (phase, name), result in tracer.captured.items():
            m = _LAYER.match(name)
            if phase != "forward" or m is None or len(result) != 3:
                continue
            layer = int(m.group(1))
            weights, experts, rctx = result
            scores = getattr(rctx, "scores", None)
            self.routers[layer] = RouterInfo(scores, experts, weights, params[f"model.layers.{layer}.mlp.expert_bias"],
                                             np.bincount(experts.reshape(-1), minlength=c.num_experts))
        if not self.step:
            return

        # The update, in the trainer's order: clip, balancing, optimizer (distributed/trainer.py).
        kernels = self.base_ops if hasattr(self.base_ops, "adamw_update") else None  # a backend's optimizer kernels
        self.clipped_grads, self.grad_norm = clip_grad_norm(self.grads, c.grad_clip_norm, kernels)
        scale = min(1.0, c.grad_clip_norm / self.grad_norm) if c.grad_clip_norm > 0 and self.grad_norm > 0 else 1.0
        tracer.emit("clip_grad_norm", "clip_grad_norm", "clip", {"max_norm": c.grad_clip_norm},
                    {"grad_norm": self.grad_norm, "scale": scale})
        if self.balancing_state is None:
            self.balancing_state = init_balancing_state(c, params)
        if self.optimizer_state is None:
            self.optimizer_state = init_optimizer_state(c, params)
        self.balance = {}
        for layer in sorted(self.stats["layers"]):
            counts = self.stats["layers"][layer]["expert_counts"]
            key = f"model.layers.{layer}.mlp.expert_bias"
            mkey = "smebu.momentum/" + key
            old = params[key]
            m_old = self.balancing_state.get(mkey)
            m_old = None if m_old is None else m_old.copy()
            self.balance.update(balance_step(c, params, self.balancing_state, {layer: counts}))
            new = params[key]
            outputs = {"bias": new.copy(), "delta": (new - old)}
            if mkey in self.balancing_state:
                outputs["momentum"] = self.balancing_state[mkey].copy()
            inputs = {"counts": np.array(counts, copy=True), "bias": old, "method": c.load_balancing}
            if m_old is not None:
                inputs["momentum"] = m_old
            outputs.update({k: float(v) for k, v in self.balance[layer].items()})
            tracer.emit(key, "balance_step", "balancing", inputs, outputs)
        tracer.set_params(params)

        muon_lr, adamw_lr = self.lr_peak if self.lr_peak is not None else (c.muon_lr, c.adamw_lr)
        self.lr = {"muon": float(muon_lr), "adamw": float(adamw_lr)}
        state = self.optimizer_state
        t0 = int(state["step"])
        info = {"muon_tensors": 0, "adamw_tensors": 0, "muon_update_norm": 0.0, "adamw_update_norm": 0.0}
        for key, X in params.items():
            group = param_group(c, key, X.shape)
            if group == "none":
                continue
            # One parameter at a time: optimizer_step's per-parameter updates are independent given the step
            # count, so this is bitwise the trainer's single call (tests/test_inspector.py checks it).
            own = {k: v for k, v in state.items() if k != "step" and k.endswith("/" + key)}
            sub = {"step": np.array(t0, dtype=np.int64), **own}
            name = key[: -len(".weight")] if key.endswith(".weight") else key
            wanted = tracer.keep is None or tracer.keep(name, group, "optimizer")
            before = X.copy() if wanted else None
            r = optimizer_step(c, {key: X}, {key: self.clipped_grads[key]}, sub, muon_lr, adamw_lr, kernels)
            for g in ("muon", "adamw"):
                info[f"{g}_tensors"] += r[f"{g}_tensors"]
                info[f"{g}_update_norm"] += r[f"{g}_update_norm"] ** 2
            if wanted:
                outputs = {"update": X - before}
                outputs.update({k.split("/", 1)[0]: v.copy() for k, v in own.items()})
                tracer.emit(name, group, "optimizer", {"grad": self.clipped_grads[key], "param": before,
                                                       "lr": muon_lr if group == "muon" else adamw_lr},
                            outputs, {"param": key})
        if isinstance(state["step"], np.ndarray) and state["step"].ndim == 0:
            state["step"][...] = t0 + 1
        else:
            state["step"] = np.array(t0 + 1, dtype=np.int64)
        self.optimizer = {"step": t0 + 1, "muon_lr": float(muon_lr), "adamw_lr": float(adamw_lr),
                          "muon_tensors": info["muon_tensors"], "adamw_tensors": info["adamw_tensors"],
                          "muon_update_norm": float(np.sqrt(info["muon_update_norm"])),
                          "adamw_update_norm": float(np.sqrt(info["adamw_update_norm"]))}

    def _start(self):
        if self._started:
            raise RuntimeError("a StepThrough runs once; make a new one")
        self._started = True

    def run(self) -> "StepThrough":
        """Run everything (no pausing); events in self.events."""
        self._start()
        self._compute(self.events.append)
        return self

    def __iter__(self):
        self._start()
        handoff: queue.Queue = queue.Queue(maxsize=1)
        resume = threading.Semaphore(0)
        cancel = threading.Event()

        def emit(event):
            self.events.append(event)
            handoff.put(("event", event))
            resume.acquire()
            if cancel.is_set():
                raise _Cancelled()

        def worker():
            try:
                self._compute(emit)
            except _Cancelled:
                handoff.put(("cancelled", None))
                return
            except BaseException as e:  # handed to the consumer, raised there
                handoff.put(("error", e))
                return
            handoff.put(("done", None))

        thread = threading.Thread(target=worker, name="trinity-step-through", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = handoff.get()
                if kind == "event":
                    yield value
                    resume.release()
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            if thread.is_alive():
                cancel.set()
                resume.release()
                # drain so the worker can finish
                while thread.is_alive():
                    try:
                        handoff.get(timeout=0.05)
                        resume.release()
                    except queue.Empty:
                        pass
                thread.join()


def step_through(config: Config, params: dict, tokens, labels=None, step: bool = False, **kwargs) -> StepThrough:
    """Iterate the events of one forward (labels: + backward; step: + balancing and optimizer step), one operator
    at a time. See StepThrough for the keywords and for the results available afterwards."""
    return StepThrough(config, params, tokens, labels, step=step, **kwargs)


# ---- analysis -----------------------------------------------------------------------------------------------------
def tensor_stats(x) -> dict:
    """shape, dtype, rms, min, max (float64) and the count of non-finite entries of an array."""
    a = np.asarray(x)
    out = {"shape": tuple(a.shape), "dtype": str(a.dtype)}
    if a.size == 0 or a.dtype.kind not in "biuf":
        return {**out, "rms": float("nan"), "min": float("nan"), "max": float("nan"), "nonfinite": 0}
    a64 = a.astype(np.float64, copy=False)
    finite = np.isfinite(a64)
    bad = int(a64.size - finite.sum())
    v = a64[finite] if bad else a64
    if v.size == 0:
        return {**out, "rms": float("nan"), "min": float("nan"), "max": float("nan"), "nonfinite": bad}
    return {**out, "rms": float(np.sqrt(np.mean(v * v))), "min": float(v.min()), "max": float(v.max()),
            "nonfinite": bad}


def attention_entropy(q, k, window=None, doc_ids=None, q_pos=None, k_pos=None) -> np.ndarray:
    """Entropy (nats) of each query's attention distribution, [B, h_q, Tq], from the sdpa inputs q [B, Tq, h_q, d_h]
    and k [B, Tk, h_kv, d_h] (after QK-norm and RoPE): the full masked softmax of SPEC §4.4 step 5 with the mask of
    §4.6, one head at a time (global layers need every earlier key; fine at inspection lengths)."""
    from .attention import allowed, positions_and_docs

    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, Tq, hq, dh = q.shape
    Tk, hkv = k.shape[1], k.shape[2]
    r = hq // hkv
    q_pos, k_pos, q_doc, k_doc = positions_and_docs(Tq, Tk, q_pos, k_pos, doc_ids)
    mask = allowed(q_pos, k_pos, window, None if q_doc is None else np.asarray(q_doc),
                   None if k_doc is None else np.asarray(k_doc))
    if mask.ndim == 2:
        mask = np.broadcast_to(mask, (B, Tq, Tk))
    out = np.zeros((B, hq, Tq))
    for h in range(hq):
        s = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // r]) * dh ** -0.5
        s = np.where(mask, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        p = np.exp(s - m)
        z = p.sum(axis=-1, keepdims=True)
        p = p / np.where(z > 0, z, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, h] = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    return out


# ---- HDF5 traces --------------------------------------------------------------------------------------------------
def _to_numpy(x):
    get = getattr(x, "get", None)
    if get is not None and not isinstance(x, np.ndarray):
        return np.asarray(get())
    return np.asarray(x)


def _attr_value(v):
    if v is None:
        return "None"
    if isinstance(v, (bool, int, float, str, np.integer, np.floating, np.bool_)):
        return v
    if isinstance(v, np.dtype) or isinstance(v, type):
        return str(np.dtype(v))
    return repr(v)


def event_group(event: Event) -> str:
    """The HDF5 group of an event: its name with dots as slashes, then its phase: model/layers/3/mlp/router/forward."""
    return "/".join(event.name.split(".")) + "/" + event.phase


def write_trace(path, events, *, config: Config | None = None, tokens=None, labels=None, attrs: dict | None = None):
    """Write events to HDF5, atomically. Each event is a group `event_group(event)` holding `inputs/<arg>` and
    `outputs/<name>` datasets (arrays and numbers); parameter matrices are not copied but named in the attribute
    `params` (JSON argument → key; 1-D parameters such as gains and expert_bias are copied too); other arguments (eps, window, …) are attributes; attributes op, index, scope.
    The file's root has format, config (JSON) and `attrs`, and datasets tokens / labels when given."""
    import h5py

    from .checkpoint import atomic_path

    path = os.fspath(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = TRACE_FORMAT
            if config is not None:
                f.attrs["config"] = json.dumps(config.to_dict())
            for k, v in (attrs or {}).items():
                f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
            if tokens is not None:
                f["tokens"] = np.asarray(tokens)
            if labels is not None:
                f["labels"] = np.asarray(labels)
            for event in events:
                g = f.require_group(event_group(event))
                g.attrs.update({"op": event.op, "index": event.index, "scope": event.scope,
                                "params": json.dumps(event.param_keys)})
                for which in ("inputs", "outputs"):
                    sub = g.require_group(which)
                    values = getattr(event, which)
                    for name, value in values.items():
                        if which == "inputs" and name in event.param_keys and np.ndim(value) > 1:
                            continue  # parameter matrices are named in the attribute `params`, not copied
                        if isinstance(value, tuple) and hasattr(value, "_fields"):
                            for fname, fv in zip(value._fields, value):
                                if _is_array(fv):
                                    sub[f"{name}.{fname}"] = _to_numpy(fv)
                        elif _is_array(value) or isinstance(value, (int, float, np.number, bool, np.bool_)):
                            sub[name] = _to_numpy(value)
                        elif isinstance(value, tuple) and all(_is_array(v) for v in value) and value:
                            for i, v in enumerate(value):
                                sub[f"{name}.{i}"] = _to_numpy(v)
                        else:
                            g.attrs[f"{which}.{name}"] = _attr_value(value)
    return path


def read_trace(path) -> dict:
    """Read a trace written by write_trace: {(name, phase): {"op", "index", "params", "inputs": {…},
    "outputs": {…}, "attrs": {…}}}, plus the root under key None: {"attrs", "tokens", "labels"}."""
    import h5py

    out: dict = {}
    with h5py.File(os.fspath(path), "r") as f:
        if f.attrs.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path}: not a trinity trace (format {f.attrs.get('format')!r})")
        out[None] = {"attrs": dict(f.attrs), "tokens": f["tokens"][()] if "tokens" in f else None,
                     "labels": f["labels"][()] if "labels" in f else None}

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "op" in obj.attrs:
                module, phase = name.rsplit("/", 1)
                rec = {"op": obj.attrs["op"], "index": int(obj.attrs["index"]),
                       "params": json.loads(obj.attrs["params"]),
                       "attrs": {k: v for k, v in obj.attrs.items() if k not in ("op", "index", "params")}}
                for which in ("inputs", "outputs"):
                    rec[which] = {k: v[()] for k, v in obj[which].items()} if which in obj else {}
                out[(module.replace("/", "."), phase)] = rec

        f.visititems(visit)
    return out
