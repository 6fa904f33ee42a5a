"""The "cupy" (NVIDIA GPU) backend: not implemented yet (a later issue). `load` explains what is missing."""

from __future__ import annotations

__all__ = ["load"]


def load():
    from . import BackendUnavailable

    try:
        import cupy
    except ImportError:
        raise BackendUnavailable("backend 'cupy' needs the cupy package and an NVIDIA GPU "
                                 "(pip install 'trinity-moe[gpu]'); cupy is not installed") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any CUDA runtime failure means no usable GPU
        raise BackendUnavailable(f"backend 'cupy': no usable CUDA device ({type(e).__name__}: {e})") from None
    if count < 1:
        raise BackendUnavailable("backend 'cupy': cupy is installed but no CUDA device is visible")
    raise BackendUnavailable("backend 'cupy' is not implemented yet: the GPU kernels are a later issue; "
                             "use 'numba' (CPU) or 'reference'")
