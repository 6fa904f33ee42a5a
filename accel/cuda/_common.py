"""What every CUDA kernel module shares: device arrays in and out, per-dtype kernel factories, block reductions.

numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, so this module asks
`trinity.accel.cuda.select_simulator` first: importing any kernel module on a machine without a CUDA device runs
the kernels under Numba's CUDA simulator, and a real GPU is used when there is one.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from . import select_simulator

select_simulator()

from numba import cuda  # noqa: E402  (after select_simulator)
from numba.core import config  # noqa: E402

__all__ = ["cuda", "SIMULATOR", "THREADS", "device", "empty", "zeros", "host", "float_type", "per_dtype",
           "grid_1d", "sigmoid", "block_sum", "block_max"]

SIMULATOR = bool(config.ENABLE_CUDASIM)
# Threads per block of the row kernels (a power of two: block_sum halves it). The simulator runs every thread as a
# Python thread, so it gets small blocks; results do not depend on the block size beyond float rounding.
THREADS = 32 if SIMULATOR else 256

_FLOAT_TYPES = {np.dtype(np.float32): numba.float32, np.dtype(np.float64): numba.float64}


def device(x):
    """A numba device array for x: a numba device array as is, anything with __cuda_array_interface__ (a CuPy
    array) as a zero-copy view, a host array copied to the device."""
    if hasattr(x, "copy_to_host"):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x)
    return cuda.to_device(np.ascontiguousarray(x))


def empty(shape, dtype):
    return cuda.device_array(shape, dtype=np.dtype(dtype))


def zeros(shape, dtype):
    return cuda.to_device(np.zeros(shape, dtype=np.dtype(dtype)))


def host(x):
    """The values of a device array (numba's, or any __cuda_array_interface__ one) or host array as numpy."""
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x).copy_to_host()
    return np.asarray(x)


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
        return cached(float_type(dtype))
    return get


def grid_1d(n, threads=THREADS):
    """Blocks of `threads` covering n elements (at least one block)."""
    return max(1, math.ceil(n / threads)), threads


@cuda.jit(device=True)
def sigmoid(z):
    """σ(z) = 1/(1 + e^{−z}) without overflow: e^{−|z|} ≤ 1 on both branches (as reference activations.sigmoid)."""
    e = math.exp(-abs(z))
    if z >= 0:
        return 1 / (1 + e)
    return e / (1 + e)


@cuda.jit(device=True)
def block_sum(shared, tid, value):
    """Σ of `value` over the THREADS threads of a block (tree reduction in shared[THREADS]); every thread gets it.
    The order of additions is fixed by THREADS, so the result is the same on every run."""
    shared[tid] = value
    cuda.syncthreads()
    half = THREADS // 2
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
    """max of `value` over the THREADS threads of a block; every thread gets it."""
    shared[tid] = value
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if tid < half:
            shared[tid] = max(shared[tid], shared[tid + half])
        cuda.syncthreads()
        half //= 2
    total = shared[0]
    cuda.syncthreads()
    return total
