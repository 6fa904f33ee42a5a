"""safetensors files byte by byte: parse a header, find a checkpoint's weight files, read a range of a tensor's
elements with exact byte ranges, and write a file header first, tensor by tensor.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor's name to
{dtype, shape, data_offsets} (offsets relative to the end of the header; an optional "__metadata__" of strings), then
the data: each tensor in C order, little-endian, at its offsets. A range of a tensor's flat (C-order) elements is
therefore one contiguous byte range of the file: `read_elements` seeks to it and reads exactly it.

`SafetensorsWriter` writes what `safetensors.numpy.save_file` writes, byte for byte (the data ordered by dtype size,
largest first, then by name; the header in that order, compact JSON, padded with spaces to a multiple of 8), but it
knows every name, dtype and shape before any data arrive: it writes the header first and each tensor at its offset
when it comes, so the caller holds one tensor at a time.

Imports: numpy and files.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from typing import NamedTuple

import numpy as np

from ..files import CheckpointError, CloseOrAbort, atomic_path, open_new

__all__ = ["DTYPES", "WRITE_TAGS", "Entry", "read_header", "weight_files", "read_elements", "SafetensorsWriter",
           "WEIGHTS_NAME", "INDEX_NAME"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype tag -> (numpy dtype used to read it, bytes per element). BF16 has no numpy dtype: it is read as
# raw little-endian uint16 and widened to float32 exactly (a bf16 number is the high half of a float32).
DTYPES = {"F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
WRITE_TAGS = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
# safetensors.serialize orders the data by dtype, largest first (its Dtype enum: F16 < BF16 < F32 < F64), then by name.
_DTYPE_ORDER = {"F16": 0, "BF16": 1, "F32": 2, "F64": 3}
_MAX_HEADER = 100 * 1024 * 1024
CHUNK_BYTES = 16 * 1024 * 1024  # the most bytes one read or write moves (bounds the memory beside the arrays)


class Entry(NamedTuple):
    """One tensor of a safetensors file, from its header."""
    key: str
    file: str
    dtype: str  # safetensors tag: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def read_header(filename: str) -> tuple[dict[str, Entry], int]:
    """Parse a safetensors header (8-byte little-endian length N, then N bytes of JSON), checked against the file
    size. Returns the tensors by name and the header's size in bytes (8 + N)."""
    size = os.path.getsize(filename)
    with open(filename, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{filename}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{filename}: header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{filename}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{filename}: header is not a JSON object")
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{filename}: malformed header entry for {key}: {info!r}") from None
        if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype][1]:
            raise CheckpointError(f"{filename}: {key} has shape {shape} and dtype {dtype} but {end - begin} bytes")
        if not 0 <= begin <= end or 8 + n + end > size:
            raise CheckpointError(f"{filename}: {key} data_offsets {[begin, end]} lie outside the file")
        entries[key] = Entry(key, filename, dtype, shape, 8 + n + begin)
    return entries, 8 + n


def weight_files(path: str) -> tuple[list[str], dict | None]:
    """The safetensors files of a checkpoint directory: `model.safetensors`, else the shards named by
    `model.safetensors.index.json` (with its weight_map). Pickle-based files are never read."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
    if os.path.isfile(single):
        return [single], None
    if not os.path.isfile(index):
        pickles = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if
                   os.path.exists(os.path.join(path, f))]
        why = f"; found {pickles[0]}, but pickle-based weights are never loaded" if pickles else ""
        raise CheckpointError(f"missing file: {path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}{why}")
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must map keys to shard file names")
    files = []
    for key, name in weight_map.items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index}: key {key} maps to {name!r}, which is not a file name in {path}")
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"missing file: shard {name} (listed in {INDEX_NAME} for key {key}) "
                                  f"is not in {path}")
        if full not in files:
            files.append(full)
    return files, weight_map


def _read_exact(raw, entry: Entry, view: memoryview) -> None:
    """Fill `view` from the raw file's current position (short reads retried); a file that ends first is truncated."""
    done = 0
    while done < len(view):
        got = raw.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{entry.file}: {entry.key} is truncated")
        done += got


def read_elements(raw, entry: Entry, first: int, out: np.ndarray) -> int:
    """out[:] = entry's flat elements [first, first + out.size), cast to out.dtype; returns the bytes read.

    Reads exactly that byte range of the file (`raw`: the file opened unbuffered, `open(name, "rb", buffering=0)`),
    in chunks of at most CHUNK_BYTES: straight into `out` when the file's dtype is out's, else through a chunk
    buffer. BF16 is widened exactly (each uint16 becomes the high half of a float32), then cast. `out` is 1-D and
    C-contiguous."""
    disk, size = DTYPES[entry.dtype]
    n = out.size
    if first < 0 or first + n > math.prod(entry.shape):
        raise CheckpointError(f"{entry.file}: elements [{first}, {first + n}) lie outside {entry.key} "
                              f"{entry.shape}")
    raw.seek(entry.offset + first * size)
    per = max(1, CHUNK_BYTES // size)
    direct = entry.dtype != "BF16" and np.dtype(disk) == out.dtype
    for a in range(0, n, per):
        b = min(n, a + per)
        if direct:
            _read_exact(raw, entry, memoryview(out[a:b]).cast("B"))
            continue
        buf = bytearray((b - a) * size)
        _read_exact(raw, entry, memoryview(buf))
        chunk = np.frombuffer(buf, dtype=disk)
        if entry.dtype == "BF16":
            wide = chunk.astype(np.uint32)
            wide <<= 16
            chunk = wide.view(np.float32)
        out[a:b] = chunk
    return n * size


class SafetensorsWriter(CloseOrAbort):
    """Write one safetensors file whose tensors (name -> (dtype tag F16/F32/F64, shape)) are all known up front: the
    header first, then each tensor's bytes at its offset as `write(name, array)` hands it over, in any order. The
    bytes equal `safetensors.numpy.save_file` of the same tensors and metadata (data ordered by dtype size, largest
    first, then by name; the header in that order). The file is written as `filename + ".tmp-<pid>"`; `close()`
    checks every tensor with data was written, fsyncs and renames it over `filename` (files.atomic_path); `abort()`
    or an exception in a `with` block removes it and leaves `filename` as it was."""

    def __init__(self, filename, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None):
        order = sorted(tensors, key=lambda name: (-_DTYPE_ORDER[tensors[name][0]], name))
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._where: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        offset = 0
        for name in order:
            tag, shape = tensors[name]
            end = offset + math.prod(shape) * DTYPES[tag][1]
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, end]}
            self._where[name] = (offset, tag, tuple(shape))
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self._written: set[str] = set()
        self._open = True
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(filename))
        self._file = self._stack.enter_context(open_new(tmp))
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, array) -> None:
        """Write tensor `name` (its whole array, of the declared shape), cast to its declared dtype, in row chunks
        of at most CHUNK_BYTES (so a cast never copies the whole tensor)."""
        if not self._open:
            raise CheckpointError(f"{name}: the file is already closed")
        if name not in self._where:
            raise CheckpointError(f"{name}: not a tensor of this file")
        if name in self._written:
            raise CheckpointError(f"{name}: written twice")
        offset, tag, shape = self._where[name]
        array = np.asarray(array)
        if array.shape != shape:
            raise CheckpointError(f"{name}: expected shape {shape}, found {array.shape}")
        disk = np.dtype(DTYPES[tag][0])
        self._file.seek(self._data_start + offset)
        if array.size:
            array = array.reshape(1) if array.ndim == 0 else array
            per = max(1, CHUNK_BYTES // (math.prod(array.shape[1:]) * disk.itemsize))  # first-axis rows a chunk
            for a in range(0, len(array), per):
                self._file.write(memoryview(np.ascontiguousarray(array[a:a + per], dtype=disk)).cast("B"))
        self._written.add(name)

    def close(self) -> None:
        """Check every tensor with data was written, then fsync and rename the file into place."""
        if not self._open:
            return
        missing = [n for n, (_, _, shape) in self._where.items() if n not in self._written and math.prod(shape)]
        if missing:
            self.abort()
            raise CheckpointError(f"missing key {missing[0]}: never written ({len(missing)} tensors missing)")
        self._open = False
        self._stack.close()

    def abort(self) -> None:
        """Remove the temporary file; the target is left as it was."""
        if self._open:
            self._open = False
            error = CheckpointError("aborted")
            self._stack.__exit__(CheckpointError, error, error.__traceback__)
