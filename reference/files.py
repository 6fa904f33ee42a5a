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

__all__ = ["CheckpointError", "atomic_path", "fsync_dir"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved: a missing file or key, an unexpected key, a wrong shape, an
    unsupported dtype, or a config that does not match the weights. The message names the key, with the expected and
    the found shape."""


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


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path `path + ".tmp-<pid>"` in the same directory; when the block ends normally the file is
    fsynced, renamed over `path` and the directory fsynced. On an exception the temporary file is removed and
    `path` is left as it was."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
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
