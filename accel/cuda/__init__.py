"""trinity.accel.cuda: Numba-CUDA kernels for the operators cuBLAS does not cover (docs/gpu.md).

Each module holds forward/backward pairs with the reference operator's semantics (trinity.reference.operators).
The launch functions return arrays of the kind of their inputs (_common.alloc): CuPy arrays for CuPy arrays (the cupy
op table on a GPU), NumPy arrays for NumPy arrays under the simulator (the same table on a CPU), numba device arrays
otherwise; kernels see zero-copy views of CuPy and simulated NumPy arrays (only host arrays on a GPU are copied, for
the kernel tests). Matrix products are not here: they go to cuBLAS through CuPy (trinity.accel.cupy_backend).

    attention   flash attention forward / backward (GQA, causal, sliding window, documents, explicit positions)
    norms       fused RMSNorm forward / backward
    rope        rotary embedding forward / backward
    elementwise SwiGLU and the attention output gate, forward / backward
    router      sigmoid scores, biased top-k and normalised weights; its backward to the logits; dispatch plan
    losses      cross-entropy + z-loss over vocabulary chunks (online log-sum-exp), forward / backward
    embedding   the embedding's backward: a deterministic segment sum (no atomics)

Without a GPU the kernels run under Numba's CUDA simulator. numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda
is first imported; `select_simulator()` turns the simulator on when no CUDA device is present and leaves a real GPU
alone. The kernel modules call it before they import numba.cuda (so import them before anything else imports
numba.cuda); this package's __init__ imports neither numba nor numba.cuda.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["has_cuda_device", "select_simulator", "simulator_enabled"]

_SIM_ENV = "NUMBA_ENABLE_CUDASIM"


def has_cuda_device() -> bool:
    """Whether the CUDA driver (libcuda) loads and reports at least one device; imports nothing from numba."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
        except AttributeError:
            return False
    return False


def select_simulator() -> bool:
    """Enable Numba's CUDA simulator unless a CUDA device is present or NUMBA_ENABLE_CUDASIM is already set.

    Must run before numba.cuda is first imported (numba.cuda picks simulator or driver at import); when numba itself
    is already imported, its config is re-read from the environment. Raises RuntimeError when numba.cuda was
    already imported in the other mode. Returns whether the simulator is on. Harmless for the numba CPU backend:
    the variable only concerns numba.cuda.
    """
    if _SIM_ENV not in os.environ and not has_cuda_device():
        os.environ[_SIM_ENV] = "1"
    wanted = os.environ.get(_SIM_ENV, "0").strip() not in ("", "0")
    if "numba.core.config" in sys.modules:
        sys.modules["numba.core.config"].reload_config()
    if "numba.cuda" in sys.modules and _imported_as_simulator() != wanted:
        raise RuntimeError(f"numba.cuda was imported before select_simulator() with {_SIM_ENV} "
                           f"{'off' if wanted else 'on'}; import trinity.accel.cuda kernels before numba.cuda")
    return wanted


def _imported_as_simulator() -> bool:
    """Which mode the already imported numba.cuda chose: the simulator's to_device lives in its simulator package."""
    to_device = getattr(sys.modules["numba.cuda"], "to_device", None)
    return "simulator" in getattr(to_device, "__module__", "")


def simulator_enabled() -> bool:
    """Whether numba's config currently has the CUDA simulator on (imports numba)."""
    from numba.core import config
    return bool(config.ENABLE_CUDASIM)
