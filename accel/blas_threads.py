"""Let OpenBLAS's idle worker threads sleep soon, so they do not compete with the numba kernels that run between
matrix products.

After each product OpenBLAS keeps its worker threads spinning for 2^OPENBLAS_THREAD_TIMEOUT cycles (default 2^28,
about 0.1 s here) in case another product follows. In a training step the next call is usually a numba kernel
running on its own pool (accel/_jit.py), so on a machine with as many threads as cores a spinning BLAS worker takes
a core from it. Measured on bench-medium 4×512, 2 threads (`benchmarks/train_step.py --child numba --steps 3` with
OMP/OPENBLAS/NUMBA_NUM_THREADS=2, the two settings alternated three times; docs/performance.md): attention fell from about 0.9 s to 0.55 s per step and
the whole step by about 5%, the products themselves unchanged within noise.

    prefer_sleeping_blas_threads()   set OPENBLAS_THREAD_TIMEOUT=4 (the smallest) in the environment unless the user
                                     set it; it only takes effect if OpenBLAS has not been loaded yet (i.e. before
                                     numpy is imported), so the `trinity` command calls it first thing.
"""

from __future__ import annotations

import os

__all__ = ["prefer_sleeping_blas_threads", "BLAS_ENV"]

BLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}


def prefer_sleeping_blas_threads() -> None:
    """Put BLAS_ENV into os.environ where the user has not set those variables."""
    for name, value in BLAS_ENV.items():
        os.environ.setdefault(name, value)
