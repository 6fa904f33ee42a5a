"""The launcher's side of a distributed run: the world communicator, rank-0 logging, and ending a failed job.

`world()` is the only place in trinity where `mpi4py.MPI.COMM_WORLD` is taken (docs/architecture.md,
"Communicators are an interface"): everything else receives a communicator as an argument, so the same code runs on
the virtual communicator of trinity.simulate. mpi4py is imported only when this process was started by an MPI
launcher, because importing `mpi4py.MPI` initialises MPI: a plain `trinity ...` in one process never needs mpi4py
(it is the `mpi` extra, not a dependency).

How a launcher is recognised, from the variables it sets in every rank's environment:

    MPICH / Hydra mpiexec, Intel MPI, srun --mpi=pmi2     PMI_RANK, PMI_SIZE
    PMIx launchers (srun --mpi=pmix, Open MPI 5 prterun)  PMIX_RANK
    Open MPI mpirun / mpiexec                             OMPI_COMM_WORLD_SIZE
    SLURM srun                                            SLURM_PROCID with SLURM_STEP_NUM_TASKS > 1

SLURM_PROCID (and SLURM_NTASKS, the allocation's task count) are also set in an sbatch script itself, where
nothing was launched by srun: they alone do not count. SLURM_STEP_NUM_TASKS is set by srun only, for its job step.

A failing rank must end the whole job: the other ranks are (or soon will be) blocked in a collective waiting for it
and would hang until the allocation runs out. `fail_job` reports the error naming the rank and calls `Abort`;
`python -m mpi4py` does the same for an exception nothing caught (see README, "Training on a cluster").

A rank the system kills (the OOM killer, a SIGKILL) cannot say so itself, and the launcher's report names a pid, not
always the first to die. So under a launcher each rank runs supervised (`supervise`): the process the launcher
started forks before MPI is initialised, the child is the rank, and the parent waits for it; when the child is
killed the parent prints "rank R (pid P on host): killed by SIGKILL during the job" and exits with 128 + signal,
which ends the job. The child dies with its parent (PR_SET_PDEATHSIG), so a job the launcher tears down leaves no
orphan. Signals the launcher sends (SIGINT, SIGTERM: preemption) are passed on to the child, which has a process
group of its own so that a signal sent to the launcher's group reaches it once, not twice (a second signal means
"stop now").
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["LaunchError", "launcher", "world", "rank_zero_log", "fail_job", "end_together", "supervise",
           "MPI_EXTRA_HINT", "SUPERVISE_ENV"]

# "0" turns the supervisor off (supervise); the supervised child finds "child" here.
SUPERVISE_ENV = "TRINITY_SUPERVISE"

MPI_EXTRA_HINT = "pip install 'trinity-moe[mpi]'"


class LaunchError(RuntimeError):
    """An MPI launcher started this process but MPI cannot be used (mpi4py missing, or an MPI library that did not
    join the launcher's job). The message is one line."""


def _int(env, name: str) -> int | None:
    value = env.get(name, "").strip()
    try:
        return int(value)
    except ValueError:
        return None


def launcher(environ=None) -> tuple[str, int | None] | None:
    """(the variable that shows an MPI launcher started this process, the job size it declares or None), or None
    when there is no launcher. Reads `environ` (default os.environ) only; imports nothing."""
    env = os.environ if environ is None else environ
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in env:
            return name, _int(env, name)
    for name in ("PMI_RANK", "PMIX_RANK"):
        if name in env:
            return name, None
    if "SLURM_PROCID" in env:
        steps = _int(env, "SLURM_STEP_NUM_TASKS")
        if steps is not None and steps > 1:
            return "SLURM_STEP_NUM_TASKS", steps
    return None


def world(environ=None):
    """The world communicator (mpi4py's MPI.COMM_WORLD) when an MPI launcher started this process, else None.

    None means a plain single process: mpi4py is not imported. Raises LaunchError (one line) when a launcher is
    detected but mpi4py is not installed, or when the launcher declares more ranks than MPI sees (each process came
    up as its own one-rank job: an srun without the site's `--mpi=pmi2|pmix`, or an mpiexec of another MPI than
    the one mpi4py uses), so that N copies never train side by side unaware of each other.
    """
    found = launcher(environ)
    if found is None:
        return None
    name, declared = found
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(f"started by an MPI launcher (${name} is set) but mpi4py cannot be imported ({e}): "
                          f"{MPI_EXTRA_HINT}") from None
    comm = MPI.COMM_WORLD
    if declared is not None and declared > 1 and comm.Get_size() == 1:
        raise LaunchError(f"the launcher started {declared} processes (${name}) but MPI sees a job of 1: each rank "
                          f"runs alone (with srun pass the site's --mpi=pmi2 or --mpi=pmix; with mpiexec use the "
                          f"one of the MPI that mpi4py was built for: {sys.executable} -m mpi4py --mpi-library)")
    return comm


def rank_zero_log(comm, file=None):
    """A `print`-like function that prints on rank 0 only (and in a single process, comm None); on other ranks it
    does nothing. Output is flushed at once, so lines from a job show up while it runs."""
    rank = 0 if comm is None else comm.Get_rank()
    if rank != 0:
        def log(*args, **kwargs):
            return None
        return log

    def log(*args, **kwargs):
        kwargs.setdefault("file", file if file is not None else sys.stdout)
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)
    return log


def fail_job(comm, rank: int, message: str, status: int = 1) -> int:
    """End the whole job after an error on this rank: print `rank R: <message>` on stderr (flushed) and call
    `comm.Abort(status)`, which makes the launcher stop every rank, including those blocked in a collective, and
    exit non-zero (a status of 0 aborts with 1: an abort is never a success).

    With comm None (a single process) it prints nothing and returns `status`: the caller reports the error itself,
    as it always has. With a real communicator it does not return.
    """
    if comm is None:
        return status
    try:
        sys.stdout.flush()
    except Exception:  # a closed pipe must not stop the abort
        pass
    try:
        sys.stderr.write(f"rank {rank}: {message}\n")  # one write: lines of several ranks do not interleave
        sys.stderr.flush()
    except Exception:
        pass
    _wait_for_output_to_leave()
    comm.Abort(int(status) or 1)
    raise SystemExit(int(status) or 1)  # not reached with mpi4py; a stand-in communicator's Abort may return


def end_together(comm, rank: int, message: str | None, status: int) -> int:
    """End the job from every rank alike, for an outcome every rank reached at the same point (a refused start,
    divergence, preemption): rank 0 prints `message` once, the ranks meet in a barrier, MPI is finalised (no abort,
    nothing left in /dev/shm) and the process exits with `status`. A communicator that is not mpi4py's (the virtual
    one) just returns the status."""
    if rank == 0 and message:
        sys.stderr.write(message + "\n")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if not type(comm).__module__.startswith("mpi4py"):
        return status
    from mpi4py import MPI
    comm.Barrier()
    MPI.Finalize()
    os._exit(status)  # not SystemExit: `python -m mpi4py` would turn a non-zero exit into MPI_Abort


def _wait_for_output_to_leave(timeout: float = 2.0) -> None:
    """Wait (at most `timeout` seconds) until the launcher has read what this rank wrote to stdout and stderr.

    Abort makes the launcher kill every rank at once, and what is still in the pipe from a rank to its launcher
    proxy is then lost: without this wait, the line naming the failing rank was sometimes missing (MPICH's Hydra on
    a loaded machine). When stdout / stderr is a pipe, its unread bytes (FIONREAD) show whether the reader has
    taken them; otherwise (a file, a terminal) there is nothing to wait for but a moment.
    """
    import time

    deadline = time.monotonic() + timeout
    try:
        import fcntl
        import stat
        import struct
        import termios
    except ImportError:  # not POSIX
        time.sleep(0.1)
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            while time.monotonic() < deadline:
                unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
                if unread <= 0:
                    break
                time.sleep(0.005)
        except (AttributeError, OSError, ValueError):
            continue
    time.sleep(0.05)  # read is not yet forwarded: let the proxy pass it on before the abort overtakes it


def _rank_of(env) -> str:
    for name in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if name in env:
            return env[name]
    return "?"


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent ends (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def supervise(environ=None) -> int | None:
    """Under an MPI launcher, split this process into a supervisor and the rank (module docstring). Returns None in
    the process that goes on to run the command (the rank, or an unsupervised process: no launcher, or
    TRINITY_SUPERVISE=0), and the exit status in the supervisor, which has nothing else to do."""
    env = os.environ if environ is None else environ
    if launcher(env) is None or env.get(SUPERVISE_ENV) in ("0", "child") or not hasattr(os, "fork"):
        return None
    if "mpi4py.MPI" in sys.modules:  # MPI is initialised: too late to fork safely
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        os.environ[SUPERVISE_ENV] = "child"
        os.setpgid(0, 0)  # its own process group: a signal to the launcher's group reaches it once, via the parent
        _die_with_parent()
        if os.getppid() != parent:  # the supervisor is already gone
            os._exit(1)
        return None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        import socket
        print(f"rank {_rank_of(env)} (pid {child} on {socket.gethostname()}): killed by "
              f"{signal.Signals(sig).name} during the job", file=sys.stderr, flush=True)
        return 128 + sig
    return os.WEXITSTATUS(status)
