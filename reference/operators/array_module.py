"""The array module rule: an operator takes its array namespace `xp` from its inputs, never from an import.

Every array of the Array API standard names its namespace: `x.__array_namespace__()` is `numpy` for a NumPy 2
array, `cupy` for a CuPy array, `array_api_strict` for a strict one. The operators call only functions of the
standard through that `xp` (docs/architecture.md "The xp rule"), so the same code runs on each.
"""

from __future__ import annotations

import numpy as np

__all__ = ["array_namespace"]


def array_namespace(*arrays):
    """The namespace of the first argument that is an Array API array; NumPy when none is (Python scalars, lists,
    None). Arguments from different namespaces are not checked here: the first array's namespace rejects the others
    when they meet."""
    for x in arrays:
        get = getattr(x, "__array_namespace__", None)
        if get is not None:
            return get()
    return np
