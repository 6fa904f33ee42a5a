"""The array module rule: an operator takes its array namespace `xp` from its inputs, never from an import.

Every array of the Array API standard names its namespace: `x.__array_namespace__()` is `numpy` for a NumPy 2
array, `cupy` for a CuPy array, `array_api_strict` for a strict one. The operators call only functions of the
standard through that `xp` (docs/architecture.md "The xp rule"), so the same code runs on each.
"""

from __future__ import annotations

import functools
import math
import sys
import types

import numpy as np

__all__ = ["array_namespace", "with_standard_functions", "array_bytes", "itemsize"]


def array_namespace(*arrays):
    """The namespace of the first argument that is an Array API array; NumPy when none is (Python scalars, lists,
    None). Arguments from different namespaces are not checked here: the first array's namespace rejects the others
    when they meet. A CuPy array (whose ndarray has no __array_namespace__ up to CuPy 15) gives `cupy` with the few
    standard functions it lacks (`with_standard_functions`)."""
    for x in arrays:
        get = getattr(x, "__array_namespace__", None)
        if get is not None:
            return get()
        if type(x).__module__.split(".")[0] == "cupy":
            return with_standard_functions(sys.modules["cupy"])
    return np


@functools.lru_cache(maxsize=8)
def with_standard_functions(module):
    """`module` (a NumPy-like array module) with the Array API functions the operators call that it lacks, written
    from functions it has: vecdot(a, b, axis) = Σ a·b over axis (real inputs), argsort(x, axis, stable) (a module
    whose sort takes no `stable` keyword sorts stably, as CuPy's radix sort does), concat = concatenate,
    isdtype (NumPy's, on the module's NumPy dtypes), astype(x, dtype, copy). The module itself when it lacks none."""
    missing = {}
    if not hasattr(module, "vecdot"):
        missing["vecdot"] = lambda a, b, axis=-1: module.sum(a * b, axis=axis)
    try:
        module.argsort(module.asarray([1, 0]), stable=True)
    except TypeError:
        missing["argsort"] = lambda x, axis=-1, stable=True, descending=False: (
            module.argsort(-x if descending else x, axis=axis))
    if not hasattr(module, "concat"):
        missing["concat"] = lambda arrays, axis=0: module.concatenate(arrays, axis=axis)
    if not hasattr(module, "isdtype"):
        missing["isdtype"] = np.isdtype
    if not hasattr(module, "astype"):
        missing["astype"] = lambda x, dtype, copy=True: x.astype(dtype, copy=copy)
    if not missing:
        return module
    namespace = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
    namespace.__name__ = getattr(module, "__name__", "namespace")
    for name, function in missing.items():
        setattr(namespace, name, function)
    return namespace


def itemsize(a) -> int:
    """Bytes per element of array `a` of any namespace: its dtype's `itemsize`, else from the standard's finfo /
    iinfo (an Array API dtype need not have `itemsize`)."""
    n = getattr(a.dtype, "itemsize", None)
    if n is not None:
        return int(n)
    xp = array_namespace(a)
    if xp.isdtype(a.dtype, "bool"):
        return 1
    return (xp.finfo(a.dtype) if xp.isdtype(a.dtype, "real floating") else xp.iinfo(a.dtype)).bits // 8


def array_bytes(a) -> int:
    """The bytes of array `a` of any namespace: its `nbytes`, else size × itemsize."""
    n = getattr(a, "nbytes", None)
    return int(n) if n is not None else math.prod(a.shape) * itemsize(a)
