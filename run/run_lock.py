"""The lock on a run folder: one job at a time writes a run's checkpoints and metrics (docs/distributed.md,
"Starting a job").

A job takes `RunLock([checkpoint dir, metrics file])` before it changes anything (rank 0 under a launcher, the
process itself otherwise) and gives it back when it ends. Each place gets a lock file: `<checkpoint dir>/.trinity.lock`
and `<metrics file>.lock`. A lock is an flock(2) on that file, which the kernel drops when the holder's process ends
however it ends (a SIGKILL, the OOM killer), and the file names the holder: pid, host and when it took the lock.

- A second job is refused in one line naming the holder: "held by pid P on HOST since T".
- A lock file left by a job that was killed on this host holds no flock any more: the next job takes it over and
  says whose it was. A lock file naming another host (a shared file system) is refused whether or not its flock is
  held, since a file system's flock may not reach across hosts: the refusal names that host and says to remove the
  file once that job is known to be gone (a job that ends normally removes its lock file). On a file system without
  flock (some parallel file systems unless mounted with it) taking the lock fails in one line.
- The lock belongs to a process: two Trainers in one process (the simulator's virtual ranks, a test) share it; two
  processes (two `trinity train` commands, two mpiexec jobs) exclude each other.

Lock files are opened with O_NOFOLLOW (a planted symbolic link is refused, never followed) and removed on release;
every folder the lock had to create (the checkpoint folder and any missing parent of it) is removed again, deepest
first, if the job leaves it empty (a refused start changes nothing).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time

__all__ = ["RunLock", "RunLockError", "LOCK_NAME"]

LOCK_NAME = ".trinity.lock"  # inside the checkpoint folder; the metrics file's is `<metrics>.lock`

# Per process: lock file path → [fd, holders, folders created by the lock, deepest first]. The lock is a process's, so
# Trainers in one process share its hold (module docstring); the kernel's flock excludes other processes.
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


class RunLockError(RuntimeError):
    """Another job holds the lock, or a lock file cannot be taken; the message is one line naming the holder."""


def lock_paths(checkpoint_dir: str, metrics_path: str) -> list[tuple[str, str]]:
    """[(lock file, what it guards)] for a run's checkpoint folder and metrics file."""
    return [(os.path.join(os.path.abspath(checkpoint_dir), LOCK_NAME), f"[checkpoint] dir = {checkpoint_dir!r}"),
            (os.path.abspath(metrics_path) + ".lock", f"[logging] metrics = {metrics_path!r}")]


class RunLock:
    """The locks of one job on its run folder; `release()` (idempotent) gives them back. `took_over` lists the
    holders of stale lock files this job replaced, one phrase each (to log)."""

    def __init__(self, checkpoint_dir: str, metrics_path: str):
        self.took_over: list[str] = []
        self._taken: list[str] = []
        try:
            for path, what in lock_paths(checkpoint_dir, metrics_path):
                stale = _acquire(path, what)
                self._taken.append(path)
                if stale:
                    self.took_over.append(stale)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give back every lock this job holds (the last holder in the process removes the lock file)."""
        while self._taken:
            _release(self._taken.pop())


def _holder(record: dict) -> str:
    since = record.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')} since {when}"


def _read_record(fd: int) -> dict:
    """The holder written in a lock file ({} when it is empty or not ours)."""
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode()) if data else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _make_folders(folder: str, what: str) -> list[str]:
    """Create `folder` (absolute) and each missing parent; returns those this call created, deepest first (a folder
    someone else creates meanwhile is not ours). On failure nothing created stays and the error is one line."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    created: list[str] = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        except OSError as e:
            _remove_if_empty(created[::-1])
            raise RunLockError(f"{what}: cannot create the folder {path} ({e.strerror or e})") from None
        created.append(path)
    return created[::-1]


def _open_lock_file(path: str, what: str) -> tuple[int, list[str]]:
    """(fd of the lock file, the folders created for it, deepest first); refuses a symbolic link or a non-file."""
    created = _make_folders(os.path.dirname(path), what)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        _remove_if_empty(created)
        if e.errno == errno.ELOOP:
            raise RunLockError(f"{what}: its lock file {path} is a symbolic link; remove it") from None
        raise RunLockError(f"{what}: cannot create its lock file {path} ({e.strerror or e})") from None
    return fd, created


def _acquire(path: str, what: str) -> str | None:
    """Take the lock file `path` for this process; the holder of the stale lock replaced, or None."""
    with _HELD_GUARD:
        if path in _HELD:  # this process holds it already (module docstring)
            _HELD[path][1] += 1
            return None
        created: list[str] = []  # folders this job created, deepest first
        while True:
            fd, made = _open_lock_file(path, what)
            created = made + created
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                record = _read_record(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunLockError(f"{what}: cannot lock {path} ({e.strerror or e})") from None
                raise RunLockError(_refusal(what, path, record)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except OSError:
                same = False
            if not same:  # the holder removed the file between our open and our lock: take the new one
                os.close(fd)
                continue
            break
        previous = _read_record(fd)
        if previous.get("host") not in (None, socket.gethostname()):  # its flock may not reach here (docstring)
            os.close(fd)
            raise RunLockError(_refusal(what, path, previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise RunLockError(f"{what}: cannot write its lock file {path} ({e.strerror or e})") from None
        _HELD[path] = [fd, 1, created]
    return f"{path} ({_holder(previous)}, no longer running)" if previous else None


def _refusal(what: str, path: str, record: dict) -> str:
    """The one line refusing a second job: who holds the lock, and what to do."""
    here = socket.gethostname()
    if record.get("host") not in (None, here):
        return (f"{what}: another job holds this run folder ({_holder(record)}), which cannot be checked from "
                f"{here}; if that job is no longer running, remove {path} and start again")
    return (f"{what}: another job is running in this run folder ({_holder(record)}); wait for it to end, stop it, "
            f"or give this run another [checkpoint] dir and [logging] metrics")


def _release(path: str) -> None:
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[path]
    fd, _, created = held
    try:
        os.unlink(path)  # while still locked: a job waiting on this inode then sees it is gone (_acquire)
    except OSError:
        pass
    os.close(fd)
    _remove_if_empty(created)


def _remove_if_empty(folders: list[str]) -> None:
    """Remove each of `folders` (deepest first) that is empty; one that is not stays, and so do its parents."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return
