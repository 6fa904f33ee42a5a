"""HDF5 traces: `write_trace` stores events, one group per module and phase
(model/layers/3/self_attn/q_proj/forward/outputs/y); `read_trace` reads them back."""

from __future__ import annotations

import json
import os

import numpy as np

from ..model.config import Config
from .events import Event, _is_array

__all__ = ["TRACE_FORMAT", "event_group", "write_trace", "read_trace"]

TRACE_FORMAT = "trinity-trace 1"


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

    from ..files import atomic_path

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
