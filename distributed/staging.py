"""Collectives on device arrays, staged through the host (docs/distributed.md "Device arrays"; docs/gpu.md).

MPI here moves host memory only (no CUDA-aware MPI is assumed), so a collective whose buffers are a device table's
arrays goes through the host, in `Mesh.collective`:

    send buffer     copied to the host (trinity.accel.device.to_host, staged: counted as "staged_to_host")
    receive buffer  a NumPy buffer of its shape and dtype receives; at the end of the call (for a non-blocking one, at
                    its Wait) it is copied into the device buffer (to_device, staged: "staged_to_device")
    the rest        as for host buffers (rank-ordered sums, checksums, byte counts: all on the host copies)

A NumPy buffer (the reference and numba tables, the simulated cupy table, whose "device" arrays are NumPy arrays, and
every control buffer: counts, JSON) is passed as it is: nothing is copied. These staged copies are the one exception
to "no copy inside a step" (docs/gpu.md "The copy rule"). CUDA-aware MPI, which would pass device pointers straight
to the library, is the next step.

`host_copy` / `device_copy` are the same staged copies where a seam needs them outside a collective's buffers: an
expert-parallel dispatch's per-expert counts travel to the host to size the exchange, and the offsets and row order
it derives from them travel back; context parallel's exchange, which cuts and packs NumPy arrays, runs on host
copies of k, v and the document ids, and its results travel back (context_parallel.py); the ranks' positions travel
to the device once (Mesh.local_positions).
"""

from __future__ import annotations

import numpy as np

from trinity.accel.device import is_host_array, to_device, to_host
from trinity.reference.operators.array_module import array_namespace

__all__ = ["stage", "host_copy", "device_copy", "numpy_dtype"]


def numpy_dtype(dtype) -> np.dtype:
    """The NumPy dtype of an array module's dtype (NumPy's and CuPy's are NumPy dtypes; an Array API module's is named
    like one, e.g. array_api_strict.float64)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1])


def host_copy(a):
    """A device array's staged copy on the host; a NumPy array as it is."""
    return a if is_host_array(a) else to_host(a, staged=True)


def device_copy(a, xp):
    """A host array's staged copy in module `xp`; the array itself when xp is NumPy."""
    return a if xp is np else to_device(a, xp, staged=True)


def _buffer(arg):
    """(array, rebuild) of a collective's buffer argument: an array, or [array, (counts, displacements)] (Alltoallv)."""
    if isinstance(arg, list):
        return arg[0], lambda a: [a, *arg[1:]]
    return arg, lambda a: a


def stage(args) -> tuple:
    """(host args, finish): `args` of a buffer collective (send buffer first, receive buffer second) with their device
    arrays replaced by host ones (module docstring); finish() lands what was received in the device receive buffer
    (None when nothing is to land: both buffers were on the host)."""
    if len(args) < 2:
        return args, None
    (send, resend), (recv, rerecv) = _buffer(args[0]), _buffer(args[1])
    if is_host_array(send) and is_host_array(recv):
        return args, None
    host_send = host_copy(send)
    if is_host_array(recv):
        return (resend(host_send), args[1], *args[2:]), None
    host_recv = np.empty(recv.shape, dtype=numpy_dtype(recv.dtype))

    def finish():
        recv[...] = to_device(host_recv, array_namespace(recv), staged=True)

    return (resend(host_send), rerecv(host_recv), *args[2:]), finish


class StagedRequest:
    """A non-blocking collective's request whose Wait also lands the received buffer on the device."""

    def __init__(self, request, finish):
        self._request, self._finish = request, finish

    def Wait(self, *args, **kwargs):
        result = self._request.Wait(*args, **kwargs)
        if self._finish is not None:
            self._finish()
            self._finish = None
        return result

    def __getattr__(self, name):
        return getattr(self._request, name)
