"""Keep freed host memory in the process instead of handing it back to the kernel after every array.

A training step allocates and frees the same large activations every step (a 2048×512 float32 activation is
4 MiB, the logits of bench-medium at 4×512 are 250 MiB). glibc's malloc serves blocks above its mmap threshold
(128 KiB, adapting up to 32 MiB) with a fresh mmap and returns them with munmap on free, and trims the top of the
heap back to the kernel; so every step touches its big arrays for the first time again, and each first touch of a
4 KiB page is a page fault that the kernel answers with a zeroed page. Measured on bench-medium 4×512 with the
numba backend (2 threads, `benchmarks/train_step.py --profile numba`, with and without TRINITY_HOST_MALLOC=default,
alternated; docs/performance.md): one step took 9.08 s and 7.61 s with glibc's defaults, 5.64 s and 6.06 s with the
settings below; the system time of the run fell from 13.8/9.5 s to 6.4/6.3 s; peak RSS did not change (the same
arrays are live at the peak either way).

    keep_freed_memory()   raise the mmap threshold to 1 GiB (32 MiB where an older glibc allows no more) and the
                          trim threshold to its maximum (mallopt), so freed blocks stay in the heap and the next
                          step reuses pages that are already mapped.

The price: memory freed by the process is not returned to the operating system until it exits (RSS stays at its
peak). That is the usual trade of a training process (PyTorch's caching allocators make the same one). It is a
no-op where the C library is not glibc, and when TRINITY_HOST_MALLOC=default is set in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory", "mmap_threshold"]

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # older glibc (before 2.35) refuses more than 32 MiB on 64-bit systems
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_applied: bool | None = None
mmap_threshold = 0  # the mmap threshold this module set (0: none); blocks above it are still mapped per allocation


def keep_freed_memory() -> bool:
    """Apply the policy above once per process; True when it is in effect (`mmap_threshold` says up to which size:
    1 GiB, or 32 MiB where glibc allows no more)."""
    global _applied, mmap_threshold
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("TRINITY_HOST_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    trimmed = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    mmap_threshold = next((t for t in _MMAP_THRESHOLDS if mallopt(_M_MMAP_THRESHOLD, t)), 0)
    _applied = trimmed and mmap_threshold > 0
    return _applied
