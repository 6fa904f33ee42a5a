"""Keep freed host memory in the process instead of handing it back to the kernel after every array.

A training step allocates and frees the same large activations every step (a 2048×512 float32 activation is
4 MiB, the logits of bench-medium at 4×512 are 250 MiB). glibc's malloc serves blocks above its mmap threshold
(128 KiB, adapting up to 32 MiB) with a fresh mmap and returns them with munmap on free, and trims the top of the
heap back to the kernel; so every step touches its big arrays for the first time again, and each first touch of a
4 KiB page is a page fault that the kernel answers with a zeroed page. Measured on bench-medium 4×512 with the
numba backend (2 threads, `benchmarks/train_step.py` profile in docs/performance.md): the forward+backward took
7.4 s with glibc's defaults and 5.0 s with the settings below, system time fell from ~10 s to ~5 s per run, and
peak RSS did not change (the same arrays are live at the peak either way).

    keep_freed_memory()   raise the mmap threshold to 1 GiB and the trim threshold to its maximum (mallopt), so
                          freed blocks stay in the heap and the next step reuses pages that are already mapped.

The price: memory freed by the process is not returned to the operating system until it exits (RSS stays at its
peak). That is the usual trade of a training process (PyTorch's caching allocators make the same one). It is a
no-op where the C library is not glibc, and when TRINITY_HOST_MALLOC=default is set in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the policy above once per process; True when it is in effect."""
    global _applied
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
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied
