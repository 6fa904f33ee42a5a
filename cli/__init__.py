"""trinity.cli — see docs/architecture.md."""

from trinity.accel.blas_threads import prefer_sleeping_blas_threads

prefer_sleeping_blas_threads()  # before anything loads numpy (and OpenBLAS with it): accel/blas_threads.py
