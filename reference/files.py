"""Atomic file writes, and the one CheckpointError that the checkpoint readers and writers raise. data/, interop/,
training/ and inspection/ all write files through `atomic_path`, so none of them imports another for it.

Writes are atomic: the file is written to `path + ".tmp-<pid>"` in the same directory, fsynced, renamed over `path`
with os.replace, and the directory is fsynced. A crash at any point leaves the previous file at `path` untouched; at
worst a `*.tmp-<pid>` file is left behind.

Imports: the standard library only.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["CheckpointError", "CloseOrAbort", "atomic_path", "fsync_dir", "open_new"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved: a missing file or key, an unexpected key, a wrong shape, an
    unsupported dtype, or a config that does not match the weights. The message names the key, with the expected and
    the found shape."""


class CloseOrAbort:
    """A writer used as a context manager (`with Writer(…) as w:`): its close() when the block ends normally, its
    abort() when the block raises (the exception goes on)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            self.abort()
        return False


def fsync_dir(directory: str) -> None:
    """fsync a directory (so a rename in it is durable); a no-op where the platform cannot."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_new(path: str, mode: str = "wb", **kwargs):
    """Open `path` for writing as a new file: whatever is there (a leftover, a planted symlink) is removed first and
    the file is created with O_EXCL and O_NOFOLLOW, so a write never goes through a link. `mode`: "wb", "w+b" or
    "w" (text; `kwargs` such as encoding go to os.fdopen)."""
    if os.path.lexists(path):
        os.remove(path)
    flags = os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    return os.fdopen(os.open(path, flags, 0o644), mode, **kwargs)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path `path + ".tmp-<pid>"` in the same directory; when the block ends normally the file is
    fsynced, renamed over `path` and the directory fsynced. On an exception the temporary file is removed and
    `path` is left as it was."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):  # a leftover, or a planted link: removed, never written through
        os.remove(tmp)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
