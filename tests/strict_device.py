"""A stand-in device for tests without a GPU: the reference op table on array_api_strict arrays
(`StrictOps`, an op table whose `xp` is not NumPy, placed through trinity.accel.device like the cupy table), and a
guard that makes any silent NumPy conversion of a strict array fail (`no_numpy_conversion`), as a CuPy array's
`__array__` does on a GPU. Tests reach the table through get_backend's table hook (Trainer(..., backend=STRICT),
`--backend` of the commands' functions)."""

from __future__ import annotations

import contextlib

import array_api_strict

from trinity.accel.device import DeviceTable
from trinity.reference.model.ops import ReferenceOps

__all__ = ["StrictOps", "STRICT", "StrictArray", "no_numpy_conversion"]

StrictArray = type(array_api_strict.asarray(0))


class StrictOps(DeviceTable, ReferenceOps):
    """The reference's operators on array_api_strict: a device table whose arrays refuse to become NumPy arrays
    inside `no_numpy_conversion` (only accel/device.py's to_host, through DLPack, brings them back)."""

    name = "strict"
    xp = array_api_strict

    def __repr__(self):
        return "StrictOps()"


STRICT = StrictOps()


@contextlib.contextmanager
def no_numpy_conversion():
    """Strict arrays refuse np.asarray (and so every NumPy function) while inside, like device arrays."""
    def refuse(self, *args, **kwargs):
        raise TypeError("a strict array reached NumPy: a NumPy-only call on a device path")

    saved = StrictArray.__array__
    StrictArray.__array__ = refuse
    try:
        yield
    finally:
        StrictArray.__array__ = saved
