"""What every CUDA kernel module shares: arrays in and out, launches, per-dtype kernel factories, block reductions.

numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, so this module asks
`trinity.accel.cuda.select_simulator` first: importing any kernel module on a machine without a CUDA device runs
the kernels under Numba's CUDA simulator, and a real GPU is used when there is one.
"""

from __future__ import annotations

import functools
import math
import sys
import threading

import numba
import numpy as np

from . import select_simulator

select_simulator()

from numba import cuda  # noqa: E402  (after select_simulator)
from numba.core import config  # noqa: E402

__all__ = ["cuda", "SIMULATOR", "THREADS", "device", "namespace", "alloc", "zeros", "arange", "host", "launch",
           "float_type", "per_dtype", "grid_1d", "grid_stride", "row_threads", "sigmoid", "block_sum", "block_max"]

SIMULATOR = bool(config.ENABLE_CUDASIM)
# Threads per block of the row kernels at most (a power of two: block_sum halves it; row_threads picks fewer for
# short rows). The simulator runs every thread as a Python thread, so it gets small blocks; results do not depend
# on the block size beyond float rounding.
THREADS = 8 if SIMULATOR else 256
# The simulator's threads hand the GIL to each other at every syncthreads while its block manager polls them; at
# Python's default switch interval (5 ms) each hand-over waits for it. Launches under the simulator run with this
# interval instead (restored after): 5-10× faster here.
_SIM_SWITCH_INTERVAL = 1e-4

_FLOAT_TYPES = {np.dtype(np.float32): numba.float32, np.dtype(np.float64): numba.float64}

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeCUDAArray
else:
    _FakeCUDAArray = None


def _serialise_simulated_shared_arrays():
    """Make the simulator's cuda.shared.array safe for a block's threads (numba-cuda 0.30). It keeps a launch's
    shared arrays in a dict keyed by the calling line and creates one when absent, without a lock: two threads can
    both find none and each get an array of its own, so "shared" memory is not shared and a block reduction or a
    staged tile reads another thread's garbage (CI saw a cupy-sim step's loss off by 0.1 on a loaded machine).
    Replaced here by the same rule (one array per calling line and launch; dynamic shared memory as numba's)
    under one lock. On a GPU nothing changes."""
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    if getattr(kernelapi.FakeCUDAShared.array, "_trinity_locked", False):
        return
    dynamic = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or numba's refusal: numba's own answer
            return dynamic(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            found = self._allocations.get(key)
            if found is None:
                dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                found = self._allocations[key] = np.empty(shape, dt)
        return found

    array._trinity_locked = True
    kernelapi.FakeCUDAShared.array = array


if SIMULATOR:
    _serialise_simulated_shared_arrays()

# The simulator runs one kernel at a time (its kernel context and a kernel's grid are process-wide): launches from
# several threads (virtual ranks) take turns. On a device launches are asynchronous and need no lock.
_SIM_LOCK = threading.RLock()


# ---- arrays in and out -------------------------------------------------------------------------------------------
# Three kinds of arrays reach the launch functions, and outputs take the kind of the inputs:
#   CuPy arrays (the cupy op table on a GPU)        → outputs allocated with CuPy, kernels see zero-copy views
#   NumPy arrays under the simulator (the same table in CI: NumPy plays the device's array module)
#                                                    → outputs allocated with NumPy, kernels see zero-copy views
#   numba device arrays, or NumPy arrays on a GPU   → numba device arrays (host arrays are copied over: kernel
#                                                      tests only, never the op table)
def namespace(x):
    """The array module of x when it is a CuPy array (cupy) or a NumPy array (numpy); None otherwise."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    if isinstance(x, np.ndarray):
        return np
    return None


def _out_module(like):
    """The module that allocates outputs for inputs like `like`: cupy, numpy (simulator only) or None (numba)."""
    xp = namespace(like)
    if xp is np and not SIMULATOR:
        return None
    return xp


def device(x):
    """What a kernel is launched with, never a copy of a device array: a numba device array as is; anything with
    __cuda_array_interface__ (a CuPy array) as a zero-copy view; under the simulator a NumPy array as a zero-copy
    view (the simulator would otherwise copy it in and back out around the launch); a host array on a GPU copied to
    the device (kernel tests only)."""
    if hasattr(x, "copy_to_host"):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x)
    if SIMULATOR and isinstance(x, np.ndarray):
        return _FakeCUDAArray(x)
    return cuda.to_device(np.ascontiguousarray(x))


def alloc(shape, dtype, like):
    """An uninitialised array of the kind of `like` (see above)."""
    xp = _out_module(like)
    if xp is None:
        return cuda.device_array(shape, dtype=np.dtype(dtype))
    return xp.empty(shape, dtype=np.dtype(dtype))


def zeros(shape, dtype, like):
    """Zeros of the kind of `like`, filled on the device (no host array is copied)."""
    xp = _out_module(like)
    if xp is not None:
        return xp.zeros(shape, dtype=np.dtype(dtype))
    out = cuda.device_array(shape, dtype=np.dtype(dtype))
    if out.size:
        flat = out.reshape(out.size)
        launch(_fill, *grid_stride(out.size), flat, 0)
    return out


def arange(n, like):
    """0, 1, …, n−1 as int64, of the kind of `like`."""
    xp = _out_module(like)
    if xp is not None:
        return xp.arange(n, dtype=np.int64)
    out = cuda.device_array((n,), dtype=np.int64)
    if n:
        launch(_iota, *grid_stride(n), out)
    return out


def host(x):
    """The values of a device array (numba's, or any __cuda_array_interface__ one) or host array as numpy (tests)."""
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x).copy_to_host()
    return np.asarray(x)


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray) or hasattr(x, "copy_to_host") or hasattr(x, "__cuda_array_interface__")


def launch(kernel, blocks, threads, *args):
    """kernel[blocks, threads](*args) with every array argument passed through `device` (so the simulator never
    copies); under the simulator one launch at a time."""
    args = [device(a) if _is_array(a) else a for a in args]
    if SIMULATOR:
        with _SIM_LOCK:
            before = sys.getswitchinterval()
            sys.setswitchinterval(_SIM_SWITCH_INTERVAL)
            try:
                kernel[blocks, threads](*args)
            finally:
                sys.setswitchinterval(before)
    else:
        kernel[blocks, threads](*args)


def row_threads(n: int) -> int:
    """Threads per block for a row of n elements: the smallest power of two ≥ n, at most THREADS (a block reduces
    over blockDim.x threads, so short rows, e.g. a QK norm's d_h, leave no thread idle)."""
    return min(THREADS, 1 << max(0, int(n) - 1).bit_length())


def float_type(dtype):
    """The numba scalar type kernels compute in: float32 inputs accumulate in float32, float64 in float64."""
    dt = np.dtype(dtype)
    if dt not in _FLOAT_TYPES:
        raise TypeError(f"CUDA kernels take float32 or float64 arrays, got {dt}")
    return _FLOAT_TYPES[dt]


def per_dtype(factory):
    """Cache a kernel factory `factory(ft)` (ft a numba float type) by the array dtype it is called with."""
    cached = functools.cache(factory)

    @functools.wraps(factory)
    def get(dtype):
        if not SIMULATOR:
            return cached(float_type(dtype))
        # Under the simulator a running kernel swaps the module's `cuda` for its fake one (numba's
        # swapped_cuda_module), so a kernel built by another thread (a virtual rank) meanwhile would meet the fake
        # module's missing `jit`: builds wait for the launch lock, as launches do.
        with _SIM_LOCK:
            return cached(float_type(dtype))
    return get


def grid_1d(n, threads=THREADS):
    """Blocks of `threads` covering n elements (at least one block)."""
    return max(1, math.ceil(n / threads)), threads


_SIM_STRIDE_BLOCKS = 2  # blocks of a grid-stride kernel under the simulator (every GPU thread is a Python thread)


def grid_stride(n, threads=THREADS):
    """(blocks, threads) for a grid-stride kernel over n elements (`for i in range(grid(1), n, gridsize(1))`): as
    many blocks as cover n on a device, at most _SIM_STRIDE_BLOCKS under the simulator (fewer Python threads, each
    taking several elements; the same results)."""
    blocks, threads = grid_1d(n, threads)
    return (min(blocks, _SIM_STRIDE_BLOCKS) if SIMULATOR else blocks), threads


@cuda.jit(device=True)
def sigmoid(z):
    """σ(z) = 1/(1 + e^{−z}) without overflow: e^{−|z|} ≤ 1 on both branches (as reference activations.sigmoid)."""
    e = math.exp(-abs(z))
    if z >= 0:
        return 1 / (1 + e)
    return e / (1 + e)


@cuda.jit(device=True)
def block_sum(shared, tid, value):
    """Σ of `value` over the blockDim.x threads of a block (a power of two ≤ THREADS; tree reduction in
    shared[THREADS]); every thread gets it. The order of additions is fixed by the block size, so the result is the
    same on every run."""
    shared[tid] = value
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            shared[tid] += shared[tid + half]
        cuda.syncthreads()
        half //= 2
    total = shared[0]
    cuda.syncthreads()  # shared may be reused right after
    return total


@cuda.jit(device=True)
def block_max(shared, tid, value):
    """max of `value` over the blockDim.x threads of a block (a power of two ≤ THREADS); every thread gets it."""
    shared[tid] = value
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            shared[tid] = max(shared[tid], shared[tid + half])
        cuda.syncthreads()
        half //= 2
    total = shared[0]
    cuda.syncthreads()
    return total


@cuda.jit
def _fill(a, value):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[i] = value


@cuda.jit
def _iota(a):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[i] = i
