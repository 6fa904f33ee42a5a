"""A sealed file: its first `size` bytes (an HDF5 user block, which HDF5 itself never reads) hold a header with the
SHA-256 of each named byte range (a dataset's raw data) and of everything else after the header, so damage anywhere
is found from the bytes alone, before any parser touches the file, and is reported by the name of the range it hit.
Every byte is hashed once: the "structure" digest reads the bytes outside the ranges in file order, with each range's
hex digest in its place.

Header (ASCII, padded with spaces to `size` bytes, `size` a power of two >= 512):

    TRINITY-SEALED <size> <hex of the JSON line>\\n
    {"sha256": <hex of the structure>, "length": <file length>, "ranges": {name: [offset, nbytes, <hex>], ...},
     "meta": {...}}\\n

so the header checks itself too. `meta` is free JSON that `read_header` returns without reading the body
(checkpoints keep their run_id there, so retention can tell whose a file is without parsing it). Verification
streams the file once and names the damaged ranges, or blames the file's structure when no range is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os

__all__ = ["SealError", "MAGIC", "header_size", "seal", "is_sealed", "read_header", "verify"]

MAGIC = b"TRINITY-SEALED "
_CHUNK = 16 << 20


class SealError(ValueError):
    """The file's bytes do not match its seal (or it has no readable seal); the message names what is damaged."""


def header_size(names, meta: dict | None = None) -> int:
    """A user-block size (a power of two >= 512) that holds the header for ranges named `names`."""
    need = 256 + len(json.dumps(meta or {})) + sum(len(json.dumps(n)) + 120 for n in names)
    size = 512
    while size < need:
        size *= 2
    return size


def _sha(view) -> str:
    return hashlib.sha256(view).hexdigest()


def _digests(read, size: int, length: int, ranges: dict) -> tuple[str, dict]:
    """(structure digest, {name: range digest}) of bytes [size, length), reading each byte once through
    read(offset, nbytes) -> iterable of chunks. Ranges must lie in [size, length) and not overlap."""
    structure, out, pos = hashlib.sha256(), {}, size
    for name, (off, n) in sorted(ranges.items(), key=lambda item: (item[1][0], item[1][1])):
        if n == 0:
            out[name] = _sha(b"")
            continue
        if off < pos or off + n > length:
            raise SealError("the seal header is damaged (ranges out of place)")
        for chunk in read(pos, off - pos):
            structure.update(chunk)
        h = hashlib.sha256()
        for chunk in read(off, n):
            h.update(chunk)
        out[name] = h.hexdigest()
        structure.update(out[name].encode("ascii"))
        pos = off + n
    for chunk in read(pos, length - pos):
        structure.update(chunk)
    return structure.hexdigest(), out


def seal(buf, size: int, ranges: dict, meta: dict | None = None) -> None:
    """Write the header into the first `size` bytes of the writable buffer `buf` (the whole file's bytes), for
    `ranges` {name: (offset, nbytes)} inside buf[size:]."""
    view = memoryview(buf)
    structure, digests = _digests(lambda off, n: (view[off:off + n],), size, len(view), ranges)
    table = {name: [int(off), int(n), digests[name]] for name, (off, n) in ranges.items()}
    body = {"sha256": structure, "length": len(view), "ranges": table, "meta": meta or {}}
    line = json.dumps(body, sort_keys=True).encode("ascii")
    header = MAGIC + f"{size} {_sha(line)}\n".encode("ascii") + line + b"\n"
    if len(header) > size:
        raise ValueError(f"seal header of {len(header)} bytes does not fit in {size}")
    view[:size] = header.ljust(size, b" ")


def is_sealed(path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_header(path) -> dict:
    """The parsed header (raises SealError when it is missing or unreadable). Its body is not verified."""
    with open(path, "rb") as f:
        first = f.read(128)
        if not first.startswith(MAGIC):
            raise SealError("no seal header (not a sealed file, or its first bytes are damaged)")
        try:
            size_text, line_sha = first[len(MAGIC):].split(b"\n", 1)[0].split(b" ")
            size = int(size_text)
        except ValueError:
            raise SealError("the seal header's first line is damaged") from None
        if size < 512 or size & (size - 1) or size > 1 << 30:
            raise SealError(f"the seal header's size {size} is damaged")
        f.seek(0)
        raw = f.read(size)
    try:
        _, line, padding = raw.split(b"\n", 2)
        if _sha(line).encode("ascii") != line_sha or padding.strip(b" "):
            raise ValueError("damaged")
        header = json.loads(line.decode("ascii"))
        ranges = header["ranges"]
        ok = (isinstance(header["sha256"], str) and isinstance(header["length"], int) and isinstance(ranges, dict)
              and isinstance(header["meta"], dict)
              and all(isinstance(e, list) and len(e) == 3 and all(isinstance(v, int) and v >= 0 for v in e[:2])
                      and isinstance(e[2], str) for e in ranges.values()))
    except (IndexError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise SealError("the seal header is damaged")
    header["size"] = size
    return header


def _chunks(f, start: int, n: int):
    f.seek(start)
    while n > 0:
        chunk = f.read(min(_CHUNK, n))
        if not chunk:
            return
        n -= len(chunk)
        yield chunk


def verify(path) -> dict:
    """Check the file against its seal; return the header. Raises SealError naming the damaged ranges (or the file
    structure, or a wrong length: a truncated or extended file)."""
    header = read_header(path)
    length = os.path.getsize(path)
    if length != header["length"]:
        raise SealError(f"the file has {length} bytes, its seal says {header['length']} (truncated?)")
    ranges = {name: (off, n) for name, (off, n, _) in header["ranges"].items()}
    with open(path, "rb") as f:
        structure, digests = _digests(lambda off, n: _chunks(f, off, n), header["size"], length, ranges)
    damaged = [name for name, (_, _, digest) in header["ranges"].items() if digests[name] != digest]
    if damaged:
        shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise SealError(f"{shown} {'fails its' if len(damaged) == 1 else 'fail their'} sha256 checksum")
    if structure != header["sha256"]:
        raise SealError("its structure (HDF5 metadata, names, attributes) fails the file's sha256 checksum")
    return header
