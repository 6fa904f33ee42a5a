"""The tracing op table: `TracingOps` wraps any op table (the NumPy reference, a backend) and records every leaf
call as an Event, handing back the wrapped table's own results untouched (bitwise the untraced values)."""

from __future__ import annotations

import contextlib
import inspect as _pyinspect
from typing import Callable

from ..model.ops import LEAF_OPS, REFERENCE
from .events import OUTPUT_NAMES, Event, _copy, _direction, _is_array, _short

__all__ = ["TracingOps", "ALIASES"]

_LEAF_NAMES = tuple(name for names in LEAF_OPS.values() for name in names)

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

# The model's role names for operators that carry no parameter (model/layers.py ctx keys); a tuple names the calls of
# one pass in order.
ALIASES = {"attention": "sdpa", "output_gate": "gate", "swiglu": "act", "rope": ("q_rope", "k_rope")}


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
