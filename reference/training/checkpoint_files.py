"""What a checkpoint's files may be: the rules, in one place, that keep a checkpoint to its own folder and its own
bytes (docs/distributed.md, "What a checkpoint is trusted with").

Entries of a checkpoint folder (`step_N.h5`, `step_N.sharded/` and the files inside it, temporary files) are judged
by `os.lstat`, never through a symbolic link: only a regular file (or, for a sharded checkpoint, a real directory) is
one of ours. A symlink, a FIFO or a device under a checkpoint's name is skipped by listings and retention, refused
by saves, and opened by no reader (`open_plain` refuses it, O_NOFOLLOW).

Datasets of a sealed HDF5 file (sealed_file.py) must hold their raw bytes inside the file, exactly at their sealed
range: contiguous layout, no external storage, no filters, not virtual, not compact, and the offset and size HDF5
reports are the sealed ones. Otherwise HDF5 would read the bytes from elsewhere (another local file, for external
storage or a virtual dataset) while every digest still matches, since whoever writes a file can seal it again. Links
(soft, external) are refused before they are followed, so no other file is opened.

Imports: the standard library and h5py.
"""

from __future__ import annotations

import os
import stat

import h5py

__all__ = ["is_plain_file", "is_plain_dir", "listed", "open_plain", "dataset_names", "check_storage", "StorageError"]


class StorageError(ValueError):
    """A file of a checkpoint holds what it must not (a link, data stored elsewhere); the message names it."""


def _mode(path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return None


def is_plain_file(path) -> bool:
    """True for a regular file that is not a symbolic link."""
    mode = _mode(path)
    return mode is not None and stat.S_ISREG(mode)


def is_plain_dir(path) -> bool:
    """True for a directory that is not a symbolic link."""
    mode = _mode(path)
    return mode is not None and stat.S_ISDIR(mode)


def listed(directory) -> list[str]:
    """The names in a checkpoint directory; [] when it does not exist yet (a rank that leaves its creation to the
    rank holding the run folder's lock lists it empty)."""
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def open_plain(path):
    """Open a regular file for binary reading without following a symbolic link (OSError otherwise; a FIFO or a
    device is refused before it is opened, so a reader never blocks on one)."""
    if not is_plain_file(path):
        raise OSError(f"not a regular file ({'a symbolic link' if os.path.islink(path) else 'missing or special'})")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    return os.fdopen(fd, "rb")


def _hard_members(group, where: str) -> list:
    """The names in `group`, each checked to be a hard link (soft and external links are refused, unfollowed)."""
    names = list(group.keys())
    for name in names:
        if not isinstance(group.get(name, getlink=True), h5py.HardLink):
            raise StorageError(f"{where}{name} is a link, not a member of the file")
    return names


def dataset_names(f) -> set:
    """{"group/name"} of the datasets in the file's top-level groups. Every member must be a hard link, the top
    level groups only, and the groups datasets only (StorageError otherwise): nothing else is ever opened."""
    out = set()
    for group in _hard_members(f, ""):
        g = f[group]
        if not isinstance(g, h5py.Group):
            raise StorageError(f"{group} is not a group")
        for name in _hard_members(g, f"{group}/"):
            if not isinstance(g[name], h5py.Dataset):
                raise StorageError(f"{group}/{name} is not a dataset")
            out.add(f"{group}/{name}")
    return out


def check_storage(ds, sealed_range) -> None:
    """Raise StorageError unless dataset `ds` keeps its raw bytes in the file, contiguously, at exactly
    `sealed_range` (offset, nbytes; an empty dataset has an empty range). `sealed_range` None (an unsealed version 1
    file): the bytes must still be the dataset's own, in the file."""
    plist = ds.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise StorageError("is a virtual dataset (its data lives in other datasets or files)")
    if plist.get_external_count():
        raise StorageError("has external storage (its data lives in another file)")
    if layout != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
        raise StorageError("is not stored contiguously without filters (chunked, compact or compressed)")
    nbytes = ds.dtype.itemsize * ds.size
    offset, stored = ds.id.get_offset(), ds.id.get_storage_size()
    sealed_offset, sealed_nbytes = (offset, nbytes) if sealed_range is None else sealed_range
    if stored != nbytes or sealed_nbytes != nbytes or (nbytes and offset != sealed_offset):
        raise StorageError(f"is stored at bytes [{offset}, +{stored}) of the file, not at its sealed range "
                           f"[{sealed_offset}, +{sealed_nbytes})")
