"""Where arrays cross between the host and the device for the cupy op table: the only place they do (docs/gpu.md
"The copy rule").

    to_device(x, xp)      host arrays (or a dict / list / tuple of them) as arrays of the table's module `xp`:
                          a copy to the GPU for CuPy; for NumPy (the simulated table) a copy too, so that the
                          simulated device array is its own buffer, as on a GPU. Counted.
    to_host(x)            device arrays (or a dict / list / tuple of them) as NumPy arrays: cupy.asnumpy, or a copy
                          under the simulation. Counted.
    transfer_counts()     how many arrays each of the two has moved so far in this process
    watch_transfers()     a context manager that also counts the primitive conversions anything else might make
                          (numba.cuda.to_device / device_array / copy_to_host, the simulator's copies around a kernel
                          launched with a host array, cupy.asnumpy, cupy.asarray / cupy.array of a NumPy array):
                          `with watch_transfers() as seen: step(...)`, then seen is {name: count}

A training step calls to_device at its boundary only (a batch in; parameters and optimizer state once, before the
first step) and to_host only for what the host keeps (checkpoints, logs). Inside a step nothing moves, except the
Python scalars the reference's API returns (losses, token counts, statistics: a few per micro-batch) and the one
integer the grouped expert GEMMs size their padding with (per MoE layer and micro-batch): reads of single values,
which a GPU waits for but which copy no array.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter

import numpy as np

__all__ = ["to_device", "to_host", "transfer_counts", "watch_transfers"]

_LOCK = threading.Lock()
_COUNTS: Counter = Counter()  # diagnostics only: how many arrays to_device / to_host moved in this process
_WATCHERS: list[Counter] = []  # the counters of the watch_transfers blocks now open


def _note(name: str) -> None:
    with _LOCK:
        _COUNTS[name] += 1
        for seen in _WATCHERS:
            seen[name] += 1


def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _tree(fn, x):
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: _tree(fn, v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_tree(fn, v) for v in x)
    return fn(x)


def to_device(x, xp):
    """x (an array, or a dict / list / tuple of arrays; None stays None) as arrays of the module `xp` (cupy, or numpy
    for the simulated table). Every array is copied and counted, except CuPy arrays already there."""
    def one(a):
        if xp is not np and _is_cupy(a):
            return a
        _note("to_device")
        return xp.array(np.asarray(a), copy=True)
    return _tree(one, x)


def to_host(x):
    """x (a device array, or a dict / list / tuple of them) as NumPy arrays; every array is copied and counted."""
    def one(a):
        _note("to_host")
        if _is_cupy(a):
            import cupy
            return cupy.asnumpy(a)
        return np.array(a, copy=True)
    return _tree(one, x)


def transfer_counts() -> dict:
    """{"to_device": n, "to_host": n}: the arrays to_device and to_host have moved in this process so far."""
    with _LOCK:
        return {"to_device": _COUNTS["to_device"], "to_host": _COUNTS["to_host"]}


# ---- watching the primitives ---------------------------------------------------------------------------------------
def _counting(seen: Counter, name: str, fn, when=None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            with _LOCK:
                seen[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def _numpy_input(a, *args, **kwargs) -> bool:
    return isinstance(a, np.ndarray) or (isinstance(a, (list, tuple)) and len(a) > 0)


def _patch_points():
    """(owner, attribute, name, condition) of every primitive conversion importable here."""
    import sys
    points = []
    cuda = sys.modules.get("numba.cuda")
    if cuda is not None:  # only when numba.cuda is already imported: importing it here would fix its mode
        points += [(cuda, "to_device", "numba.cuda.to_device", None),
                   (cuda, "device_array", "numba.cuda.device_array", None)]
        sim = sys.modules.get("numba.cuda.simulator.cudadrv.devicearray")
        if sim is not None and "simulator" in getattr(cuda.to_device, "__module__", ""):
            # a kernel launched with a host array: the simulator copies it in (auto_device → to_device) and out
            points += [(sim, "to_device", "simulator copy in", None),
                       (sim.FakeCUDAArray, "copy_to_host", "simulator copy_to_host", None),
                       (sim.FakeCUDAArray, "copy_to_device", "simulator copy_to_device", None)]
        else:
            try:
                from numba.cuda.cudadrv.devicearray import DeviceNDArrayBase
                points += [(DeviceNDArrayBase, "copy_to_host", "numba copy_to_host", None),
                           (DeviceNDArrayBase, "copy_to_device", "numba copy_to_device", None)]
            except ImportError:
                pass
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        # cupy.ndarray's own methods (.get(), float()) belong to an extension type and cannot be wrapped; the op
        # table never calls .get() (tests/test_cupy_backend.py reads its source), and float() is the scalar exception
        points += [(cupy, "asnumpy", "cupy.asnumpy", None),
                   (cupy, "asarray", "cupy.asarray of a host array", _numpy_input),
                   (cupy, "array", "cupy.array of a host array", _numpy_input)]
    return points


@contextlib.contextmanager
def watch_transfers():
    """Count, inside the block, every array moved by to_device / to_host and every primitive conversion listed in
    the module docstring (wherever it is called from). Yields a Counter {name: count}, filled as the block runs.
    Patches module attributes for the block's duration: not for concurrent use with unrelated code."""
    seen: Counter = Counter()
    patched = []
    with _LOCK:
        _WATCHERS.append(seen)
    try:
        for owner, attr, name, when in _patch_points():
            original = getattr(owner, attr)
            setattr(owner, attr, _counting(seen, name, original, when))
            patched.append((owner, attr, original))
        yield seen
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)
        with _LOCK:
            _WATCHERS.remove(seen)
