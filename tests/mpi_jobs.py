"""Running real MPI jobs from tests: `run_mpi(n, args)` starts `mpiexec -n N python -m mpi4py ARGS...` and returns
(returncode, stdout, stderr, seconds).

The job runs with one thread per rank (NUMBA_NUM_THREADS, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS = 1: the CI
machine has 2 cores, and oversubscribed threads make ranks 3-4x slower), with MPIEXEC_TIMEOUT as the launcher's
own backstop against a hung job, and a hard subprocess timeout above that. `mpiexec` is the one next to this
interpreter (the `mpich` wheel's, installed by the `mpi` extra) or else the first on PATH.

Tests that need MPI use `requires_mpi` (a skipif mark): without mpi4py or mpiexec they skip with the reason.
`.ci/run` installs the `mpi` extra, so in CI they run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import pytest

__all__ = ["mpiexec_path", "mpi_available", "why_no_mpi", "requires_mpi", "job_env", "run_mpi", "LAUNCHER_VARS",
           "REPO_ROOT"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Launcher variables that must not leak from the environment pytest runs in into a test that wants "no launcher"
# (trinity.distributed.launch.launcher reads these).
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_PORT", "PMIX_RANK", "PMIX_NAMESPACE", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")


def mpiexec_path() -> str | None:
    """`mpiexec` next to sys.executable (a venv's bin/), else the first on PATH, else None."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec")


def why_no_mpi() -> str | None:
    """Why MPI jobs cannot run here (one line), or None when they can."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    if mpiexec_path() is None:
        return "no mpiexec next to the interpreter or on PATH (pip install -e '.[mpi]' brings MPICH's)"
    return None


def mpi_available() -> bool:
    return why_no_mpi() is None


requires_mpi = pytest.mark.skipif(not mpi_available(), reason=why_no_mpi() or "")


def job_env(env: dict | None = None, *, mpiexec_timeout: int = 60) -> dict:
    """The environment of a test job: this one without launcher variables inherited from outside, one thread per
    rank, MPIEXEC_TIMEOUT, then `env` on top."""
    out = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    out.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MPIEXEC_TIMEOUT=str(mpiexec_timeout))
    if env:
        out.update(env)
    return out


def run_mpi(n: int, args: list[str], timeout: float = 60, env: dict | None = None,
            cwd: str | None = None) -> tuple[int, str, str, float]:
    """Run `mpiexec -n N <python> -m mpi4py ARGS...`: (returncode, stdout, stderr, wall seconds).

    MPIEXEC_TIMEOUT (the launcher kills the job after it) is `timeout` rounded up; the subprocess itself is killed
    a few seconds later still, and then the test fails saying so (a hung job never hangs the suite).
    """
    mpiexec = mpiexec_path()
    if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip(why_no_mpi() or "no MPI")
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py", *[str(a) for a in args]]
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10, cwd=cwd or REPO_ROOT,
                           env=job_env(env, mpiexec_timeout=max(1, int(-(-timeout // 1)))),
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"MPI job {' '.join(cmd)} still running after {timeout + 10:.0f} s (hung)\n"
                    f"stdout:\n{out}\nstderr:\n{err}")
    return r.returncode, r.stdout, r.stderr, time.monotonic() - start


def ended_by_itself(err: str) -> bool:
    """Whether a job ended by itself, not by the launcher's MPIEXEC_TIMEOUT (MPICH's mpiexec then prints "APPLICATION
    TIMED OUT" and may even exit 0). A hang-only check: no wall-clock bound, which a loaded machine would break."""
    return "APPLICATION TIMED OUT" not in err


def refused_by_every_rank(code: int, out: str, err: str) -> bool:
    """Whether a job ended as one that every rank refused to start (launch.end_together: every rank exits 2 after
    MPI_Finalize). MPICH's mpiexec (Hydra) kills with SIGKILL any rank still finishing once the first has exited
    non-zero, and then reports 9 with its "BAD TERMINATION" banner (docs/distributed.md, "Starting a job"): a race
    between ranks that all exit 2, seen on a loaded machine. Either is the job refusing; anything else is not."""
    return code == 2 or (code == 9 and "BAD TERMINATION" in out + err)
