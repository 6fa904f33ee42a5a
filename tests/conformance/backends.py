"""The conformance suite's backend names, beyond trinity.accel.get_backend's (conftest.py chooses among them)."""

from __future__ import annotations

__all__ = ["SIMULATED", "load_backend", "is_simulated"]

SIMULATED = "cupy-sim"  # the cupy op table with NumPy and the Numba-CUDA kernels under the CUDA simulator


def load_backend(name):
    """The op table a backend name stands for here: get_backend(name), or the simulated cupy table for SIMULATED
    (trinity.accel.cupy_backend.simulated()). Raises BackendUnavailable as get_backend does."""
    if name == SIMULATED:
        from trinity.accel.cupy_backend import simulated
        return simulated()
    from trinity.accel import get_backend
    return get_backend(name)


def is_simulated(backend) -> bool:
    """Whether `backend` runs its kernels under the CUDA simulator (slow: tests draw smaller shapes for it)."""
    return bool(getattr(backend, "simulated", False))
