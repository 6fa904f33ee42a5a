"""The one place numba kernels get their compile options, and the thread pool that runs them.

    @kernel                 compile a kernel: serial machine code, GIL released while it runs
    run_tasks(fn, n, …)     run fn(first, stride, n, …) on every worker thread: worker i takes tasks
                            i, i + threads, i + 2·threads, … of the n independent tasks

Every kernel is compiled with fastmath=False (IEEE semantics: no reassociation, no contraction into FMAs, NaN and
inf handled as NumPy does), cache=True (machine code is written next to the source, so runs after the first do not
compile), nogil=True and error_model="numpy" (division by zero gives inf/nan instead of raising, which keeps loops
free of checks). Kernels specialise per dtype on first use; float32 and float64 are both supported.

Why a thread pool and not `numba.njit(parallel=True)` + `prange`: the kernels here are task loops (tiles of
attention, chunks of rows) whose bodies are a few hundred lines; measured on this project's attention kernels,
parfor lowering took 2-3× the compile time of the same serial code (8-15 s of CPU per kernel and dtype instead of
4-5 s), which the test suite pays on every clean checkout. Serial nogil kernels on a pool of
`numba.get_num_threads()` threads (NUMBA_NUM_THREADS, or numba.set_num_threads) give the same parallelism.

Results never depend on the number of threads: a task list is fixed by the shapes, each task writes only its own
outputs, and sums across tasks are formed afterwards in a fixed order, so outputs are bitwise the same whatever
NUMBA_NUM_THREADS is.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba

__all__ = ["kernel", "run_tasks", "threads"]

kernel = numba.njit(parallel=False, fastmath=False, cache=True, nogil=True, error_model="numpy")

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def threads() -> int:
    """Worker threads the kernels use: numba's thread count (NUMBA_NUM_THREADS unless set_num_threads changed it)."""
    return max(1, int(numba.get_num_threads()))


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="trinity-accel")
            _pool_size = size
        return _pool


def run_tasks(fn, n: int, *args) -> None:
    """Call fn(first, stride, n, *args) for first = 0 … workers−1 with stride = workers, concurrently; the kernel
    loops `for task in range(first, n, stride)`. Interleaving the tasks balances causal attention, whose later
    tiles cost more. One worker (or one task) runs inline."""
    workers = min(threads(), n)
    if workers <= 1:
        if n > 0:
            fn(0, 1, n, *args)
        return
    futures = [_executor(threads()).submit(fn, i, workers, n, *args) for i in range(workers)]
    for f in futures:
        f.result()
