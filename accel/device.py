"""Where arrays cross between the host and the device: the only place they do (docs/gpu.md "The copy rule").

    to_device(x, xp)      host arrays (or a dict / list / tuple of them, or an object with `map_arrays`, e.g.
                          ShardedParams) as arrays of the module `xp`: a copy to the GPU for CuPy; for NumPy (the
                          simulated table) a copy too, so that the simulated device array is its own buffer, as on a
                          GPU; for any other Array API module (the tests' array_api_strict stand-in) `xp.asarray`
                          of a copy. Counted.
    to_host(x)            device arrays (or a tree of them) as NumPy arrays: cupy.asnumpy, a copy under the
                          simulation, `np.from_dlpack` of any other Array API array (never `np.asarray`, which a
                          device array refuses). Counted.
    staged=True           either of them as a collective's staging (distributed/mesh.py: to_host → MPI →
                          to_device), counted apart as "staged_to_host" / "staged_to_device": the one allowed copy
                          inside a step, under a layout with a device table (MPI is not CUDA-aware here)
    DeviceTable           the mixin of an op table whose arrays live on a device (CupyOps, and the tests' stand-in):
                          `ops.to_device(x)` / `ops.to_host(x)` are the two functions above on the table's module,
                          `on_device` is True, `device_count()` / `select_device(local_rank)` count the host's
                          GPUs and pick the rank's (one per rank; nothing to pick for a stand-in). The reference
                          table (and numba's) has the same three with NumPy as the host: the identity, nothing
                          copied, nothing counted (reference/model/ops.py)
    array_bytes(a)        the bytes of an array of any module (Array API arrays need not have `nbytes`)
    transfer_counts()     how many arrays each has moved so far in this process
    watch_transfers()     a context manager that also counts the primitive conversions anything else might make
                          (numba.cuda.to_device / device_array / copy_to_host, the simulator's copies around a kernel
                          launched with a host array, cupy.asnumpy, cupy.asarray / cupy.array of a NumPy array):
                          `with watch_transfers() as seen: step(...)`, then seen is {name: count}

A training step calls to_device at its boundary only (a batch in; parameters and optimizer state once, before the
first step) and to_host only for what the host keeps (checkpoints, metrics, evaluation results). Inside a step nothing
moves, except the staged collectives of a layout and the Python scalars the reference's API returns (losses, token
counts, statistics: a few per micro-batch) and the one integer the grouped expert GEMMs size their padding with (per
MoE layer and micro-batch): reads of single values, which a GPU waits for but which copy no array.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter

import numpy as np

from trinity.reference.operators.array_module import array_bytes

__all__ = ["to_device", "to_host", "DeviceTable", "array_bytes", "is_host_array", "transfer_counts",
           "watch_transfers", "COUNTED"]

COUNTED = ("to_device", "to_host", "staged_to_host", "staged_to_device")

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


def is_host_array(x) -> bool:
    """Whether x is a NumPy array or scalar (what MPI and the host read directly)."""
    return isinstance(x, (np.ndarray, np.generic))


def _tree(fn, x):
    """fn over every array of x: a dict, list, tuple or named tuple of them (nested), an object with `map_arrays`, or
    an array; anything else (None, numbers, strings) as it is."""
    if isinstance(x, dict):
        return {k: _tree(fn, v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_tree(fn, v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_tree(fn, v) for v in x)
    if hasattr(x, "map_arrays"):
        return x.map_arrays(lambda a: _tree(fn, a))
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return x
    return fn(x)


def to_device(x, xp, staged: bool = False):
    """x (an array, or a dict / list / tuple of arrays, or an object with `map_arrays`; what is not an array stays as
    it is) as arrays of the module `xp` (cupy, numpy for the simulated table, or another Array API module). Every
    array is copied and counted, except CuPy arrays already there."""
    def one(a):
        if xp is not np and _is_cupy(a):
            return a
        _note("staged_to_device" if staged else "to_device")
        host = np.asarray(a)
        if xp is np or _is_cupy_module(xp):
            return xp.array(host, copy=True)
        return xp.asarray(host, copy=True)
    return _tree(one, x)


def _is_cupy_module(xp) -> bool:
    return getattr(xp, "__name__", "").split(".")[0] == "cupy"


def to_host(x, staged: bool = False):
    """x (a device array, or a tree of them) as NumPy arrays; every array is copied and counted."""
    def one(a):
        _note("staged_to_host" if staged else "to_host")
        if _is_cupy(a):
            import cupy
            return cupy.asnumpy(a)
        if is_host_array(a):
            return np.array(a, copy=True)
        return np.array(np.from_dlpack(a), copy=True)  # an Array API array: never through __array__
    return _tree(one, x)


class DeviceTable:
    """The placement of an op table whose arrays live on a device (module docstring): mix it in before the table's
    base class. `xp` is the table's module."""

    on_device = True
    device_index = None  # the GPU this process chose (select_device), when it chose one

    def to_device(self, x):
        """x's arrays copied to the device (counted)."""
        return to_device(x, self.xp)

    def to_host(self, x):
        """x's arrays copied to the host as NumPy arrays (counted)."""
        return to_host(x)

    def device_count(self) -> int | None:
        """The devices this host has for the table's ranks; None when it has none to count (a stand-in)."""
        return None

    def select_device(self, local_rank: int) -> str | None:
        """Choose this process's device for a rank that is `local_rank`-th on its host (one GPU per rank); returns
        a line saying which, or None when the table has no devices to choose from (a simulation, a stand-in)."""
        return None


def transfer_counts() -> dict:
    """{"to_device": n, "to_host": n, "staged_to_host": n, "staged_to_device": n}: the arrays moved in this process
    so far (staged: by a layout's collectives)."""
    with _LOCK:
        return {name: _COUNTS[name] for name in COUNTED}


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
