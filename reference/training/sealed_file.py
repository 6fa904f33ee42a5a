"""A sealed file: its first `size` bytes (an HDF5 user block, which HDF5 itself never reads) hold a header with the
SHA-256 of each named byte range (a dataset's raw data), block by block, and of everything else after the header, so
damage anywhere is found from the bytes alone, before any parser touches the file, and is reported by the name of
the range it hit; and a reader of part of a range verifies exactly the blocks it reads.

Header (ASCII, padded with spaces to `size` bytes, `size` a power of two >= 512):

    TRINITY-SEALED <size> <hex of the JSON line>\\n
    {"sha256": <hex of the structure>, "length": <file length>, "ranges": {name: [offset, nbytes, <hex>], ...},
     "block_size": B, "blocks": {name: [<hex of block 0>, <hex of block 1>, ...], ...}, "meta": {...}}\\n

so the header checks itself too. Block i of a range is its bytes [i·B, min((i+1)·B, nbytes)) (B a power of two,
BLOCK_SIZE = 1 MiB when sealed), a range's <hex> is the SHA-256 of its block digests (32 bytes each, in order), and
the "structure" digest reads the bytes outside the ranges in file order, with each range's <hex> in its place: every
byte is hashed once, and a range's blocks, its digest and the structure digest chain up to the header line.

Two ways to verify:
- `verify` streams the whole file once and names the damaged ranges, or blames the file's structure when no range
  is damaged (the whole-file check: every byte).
- `PartialReader` reads the header (self-checked), every byte outside the ranges (the structure: HDF5's metadata,
  names and attributes, small beside the data), checked against the structure digest with the header's range digests
  in their places, and then only the blocks that overlap what is asked for, each checked against its digest. What it
  never reads it never verifies. Its `image()` is the file with every range's bytes zeroed, for a parser to read the
  verified structure from without touching the file again.

A file sealed before block digests existed (no "block_size") still verifies whole; a PartialReader refuses it
(`has_blocks` False) and the caller reads it whole. `meta` is free JSON that `read_header` returns without reading
the body (checkpoints keep their run_id there, so retention can tell whose a file is without parsing it).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os

__all__ = ["seal_file", "SealError", "MAGIC", "BLOCK_SIZE", "header_size", "seal", "is_sealed", "read_header", "verify",
           "PartialReader"]

MAGIC = b"TRINITY-SEALED "
BLOCK_SIZE = 1 << 20  # bytes per block digest in a new seal (read at call time: tests seal with smaller blocks)
_CHUNK = 16 << 20
_MAX_BLOCK = 1 << 30


class SealError(ValueError):
    """The file's bytes do not match its seal (or it has no readable seal); the message names what is damaged."""


def _blocks(nbytes: int, block_size: int) -> int:
    return -(-nbytes // block_size) if block_size else 0


def header_size(nbytes: dict, meta: dict | None = None, block_size: int | None = None) -> int:
    """A user-block size (a power of two >= 512) that holds the header for ranges {name: nbytes}, sealed with blocks
    of `block_size` bytes (None: BLOCK_SIZE; 0: no block digests)."""
    block_size = BLOCK_SIZE if block_size is None else block_size
    need = 256 + len(json.dumps(meta or {})) + sum(len(json.dumps(name)) * 2 + 130 + 68 * _blocks(n, block_size)
                                                   for name, n in nbytes.items())
    size = 512
    while size < need:
        size *= 2
    return size


def _sha(view) -> str:
    return hashlib.sha256(view).hexdigest()


def _range_digest(blocks: list) -> str:
    """A range's digest: the SHA-256 of its block digests' 32 bytes each, in order."""
    return _sha(b"".join(bytes.fromhex(b) for b in blocks))


def _hash_range(chunks, block_size: int) -> tuple[str, list | None]:
    """(range digest, [block digests]) of the bytes in `chunks`; without blocks (block_size 0) the range digest is
    the SHA-256 of its bytes, as sealed before block digests."""
    h = hashlib.sha256()
    if not block_size:
        for chunk in chunks:
            h.update(chunk)
        return h.hexdigest(), None
    blocks, filled = [], 0
    for chunk in chunks:
        view = memoryview(chunk)
        while len(view):
            take = min(block_size - filled, len(view))
            h.update(view[:take])
            filled, view = filled + take, view[take:]
            if filled == block_size:
                blocks.append(h.hexdigest())
                h, filled = hashlib.sha256(), 0
    if filled:
        blocks.append(h.hexdigest())
    return _range_digest(blocks), blocks


def _in_order(ranges: dict, size: int, length: int) -> list:
    """[(name, offset, nbytes)] of the non-empty ranges in file order; SealError if they overlap or leave
    [size, length)."""
    out, pos = [], size
    for name, (off, n) in sorted(ranges.items(), key=lambda item: (item[1][0], item[1][1])):
        if n == 0:
            continue
        if off < pos or off + n > length:
            raise SealError("the seal header is damaged (ranges out of place)")
        out.append((name, off, n))
        pos = off + n
    return out


def _digests(read, size: int, length: int, ranges: dict, block_size: int, known: dict | None = None):
    """(structure digest, {name: range digest}, {name: [block digests]}) of bytes [size, length), reading each byte
    once through read(offset, nbytes) -> iterable of chunks. With `known` ({name: range digest}) the ranges are not
    read: their known digests stand in their places (the structure alone)."""
    structure, out, blocks, pos = hashlib.sha256(), {}, {}, size
    for name, (off, n) in ranges.items():
        if n == 0:
            out[name], blocks[name] = _hash_range([], block_size)
    for name, off, n in _in_order(ranges, size, length):
        for chunk in read(pos, off - pos):
            structure.update(chunk)
        if known is None:
            out[name], blocks[name] = _hash_range(read(off, n), block_size)
        else:
            out[name] = known[name]
        structure.update(out[name].encode("ascii"))
        pos = off + n
    for chunk in read(pos, length - pos):
        structure.update(chunk)
    return structure.hexdigest(), out, blocks


def _block_size(block_size: int | None) -> int:
    block_size = BLOCK_SIZE if block_size is None else int(block_size)
    if block_size and (block_size < 512 or block_size & (block_size - 1) or block_size > _MAX_BLOCK):
        raise ValueError(f"block_size {block_size} is not a power of two in [512, 2^30]")
    return block_size


def _header(size: int, length: int, ranges: dict, structure: str, digests: dict, blocks: dict, meta, block_size):
    """The seal's `size` bytes: the magic line naming the JSON line's SHA-256, then the JSON line (module docstring)."""
    table = {name: [int(off), int(n), digests[name]] for name, (off, n) in ranges.items()}
    body = {"sha256": structure, "length": length, "ranges": table, "meta": meta or {}}
    if block_size:
        body.update(block_size=block_size, blocks=blocks)
    line = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")
    header = MAGIC + f"{size} {_sha(line)}\n".encode("ascii") + line + b"\n"
    if len(header) > size:
        raise ValueError(f"seal header of {len(header)} bytes does not fit in {size}")
    return header.ljust(size, b" ")


def seal(buf, size: int, ranges: dict, meta: dict | None = None, block_size: int | None = None) -> None:
    """Write the header into the first `size` bytes of the writable buffer `buf` (the whole file's bytes), for
    `ranges` {name: (offset, nbytes)} inside buf[size:], with block digests of `block_size` bytes (None: BLOCK_SIZE;
    0: none, as sealed before block digests existed)."""
    block_size = _block_size(block_size)
    view = memoryview(buf)
    structure, digests, blocks = _digests(lambda off, n: (view[off:off + n],), size, len(view), ranges, block_size)
    view[:size] = _header(size, len(view), ranges, structure, digests, blocks, meta, block_size)


def seal_file(f, size: int, length: int, ranges: dict, range_chunks: dict, meta: dict | None = None,
              block_size: int | None = None) -> None:
    """`seal` for a file being written (the open binary file `f`, `length` bytes, header space [0, size) left for
    the seal) whose ranges' bytes the caller still holds: range_chunks {name: iterable of its byte chunks, in
    order} are hashed from memory; only the bytes outside the ranges (the HDF5 structure) are read back from `f`.
    The same header as `seal` of the whole image."""
    block_size = _block_size(block_size)
    digests, blocks = {}, {}
    for name, (_, n) in ranges.items():
        digests[name], blocks[name] = _hash_range(range_chunks[name] if n else [], block_size)

    def read(off, n):
        f.seek(off)
        while n > 0:
            chunk = f.read(min(n, _CHUNK))
            if not chunk:
                raise ValueError("seal_file: the file is shorter than its length")
            n -= len(chunk)
            yield chunk

    structure, _, _ = _digests(read, size, length, ranges, block_size, known=digests)
    f.seek(0)
    f.write(_header(size, length, ranges, structure, digests, blocks, meta, block_size))


def is_sealed(path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _blocks_ok(header: dict) -> bool:
    """The block table, when there is one: a power-of-two block size, the right number of digests per range, and
    each range's digest the SHA-256 of its blocks'."""
    if "block_size" not in header:
        return "blocks" not in header
    size, blocks, ranges = header["block_size"], header.get("blocks"), header["ranges"]
    if not (isinstance(size, int) and 512 <= size <= _MAX_BLOCK and not size & (size - 1)
            and isinstance(blocks, dict) and set(blocks) == set(ranges)):
        return False
    for name, (_, n, digest) in ranges.items():
        table = blocks[name]
        if not (isinstance(table, list) and len(table) == _blocks(n, size)
                and all(isinstance(b, str) and len(b) == 64 for b in table)):
            return False
        try:
            if _range_digest(table) != digest:
                return False
        except ValueError:  # not hex
            return False
    return True


def _parse_header(f) -> dict:
    """The self-checked header of the open file `f` (SealError when it is missing or damaged), with "size"."""
    f.seek(0)
    first = f.read(128)
    if not first.startswith(MAGIC):
        raise SealError("no seal header (not a sealed file, or its first bytes are damaged)")
    try:
        size_text, line_sha = first[len(MAGIC):].split(b"\n", 1)[0].split(b" ")
        size = int(size_text)
    except ValueError:
        raise SealError("the seal header's first line is damaged") from None
    if size < 512 or size & (size - 1) or size > _MAX_BLOCK:
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
                      and isinstance(e[2], str) for e in ranges.values())
              and _blocks_ok(header))
    except (IndexError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise SealError("the seal header is damaged")
    header["size"] = size
    return header


def read_header(path) -> dict:
    """The parsed header (raises SealError when it is missing or unreadable). Its body is not verified."""
    with open(path, "rb") as f:
        return _parse_header(f)


def _chunks(f, start: int, n: int):
    f.seek(start)
    while n > 0:
        chunk = f.read(min(_CHUNK, n))
        if not chunk:
            return
        n -= len(chunk)
        yield chunk


def _damaged(names: list) -> SealError:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return SealError(f"{shown} {'fails its' if len(names) == 1 else 'fail their'} sha256 checksum")


def verify(path) -> dict:
    """Check the whole file against its seal; return the header. Raises SealError naming the damaged ranges (or the
    file structure, or a wrong length: a truncated or extended file)."""
    header = read_header(path)
    length = os.path.getsize(path)
    if length != header["length"]:
        raise SealError(f"the file has {length} bytes, its seal says {header['length']} (truncated?)")
    ranges = {name: (off, n) for name, (off, n, _) in header["ranges"].items()}
    with open(path, "rb") as f:
        structure, digests, _ = _digests(lambda off, n: _chunks(f, off, n), header["size"], length, ranges,
                                         header.get("block_size", 0))
    damaged = [name for name, (_, _, digest) in header["ranges"].items() if digests[name] != digest]
    if damaged:
        raise _damaged(damaged)
    if structure != header["sha256"]:
        raise SealError("its structure (HDF5 metadata, names, attributes) fails the file's sha256 checksum")
    return header


class _Image(io.RawIOBase):
    """A read-only file of `length` bytes holding `segments` [(offset, bytes)] (sorted, disjoint) and zeros
    elsewhere: the verified structure, for h5py to parse without reading the file again."""

    def __init__(self, segments: list, length: int):
        super().__init__()
        self._segments, self._starts, self._length, self._pos = segments, [s for s, _ in segments], length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence] + offset
        return self._pos

    def readinto(self, buffer):
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), self._length - self._pos))
        lo, hi = self._pos, self._pos + n
        out[:n] = bytes(n)
        at = max(0, bisect.bisect_right(self._starts, lo) - 1)
        while at < len(self._segments) and self._segments[at][0] < hi:
            start, data = self._segments[at]
            a, b = max(lo, start), min(hi, start + len(data))
            if a < b:
                out[a - lo:b - lo] = data[a - start:b - start]
            at += 1
        self._pos = hi
        return n


class PartialReader:
    """Reads parts of a sealed file, verifying what it reads (module docstring): the header when opened, the
    structure on `image()`, and each block of a range that `read` touches. `bytes_read` counts the bytes read from
    the file. `f`: a file opened for binary reading (the caller opens it: checkpoint_files.open_plain)."""

    def __init__(self, f):
        self.f = f
        self.header = _parse_header(f)
        self.bytes_read = self.header["size"]
        self.ranges = {name: (off, n) for name, (off, n, _) in self.header["ranges"].items()}
        self.block_size = self.header.get("block_size", 0)
        length = os.fstat(f.fileno()).st_size
        if length != self.header["length"]:
            raise SealError(f"the file has {length} bytes, its seal says {self.header['length']} (truncated?)")

    @property
    def has_blocks(self) -> bool:
        """False for a file sealed before block digests: only `verify` (the whole file) can check it."""
        return bool(self.block_size)

    def _read(self, offset: int, n: int) -> bytearray:
        buf = bytearray(n)
        self.f.seek(offset)
        got = self.f.readinto(buf) if n else 0
        self.bytes_read += got
        if got != n:
            raise SealError(f"the file ends before byte {offset + n} (truncated?)")
        return buf

    def image(self) -> io.RawIOBase:
        """Verify the structure (every byte outside the ranges, with the header's range digests in their places) and
        return the file as a read-only file object holding the header and the structure, every range zeroed."""
        size, length = self.header["size"], self.header["length"]
        segments = [(0, self._read(0, size))]
        self.bytes_read -= size  # the header was counted when opened

        def read(offset, n):
            if n:
                segments.append((offset, self._read(offset, n)))
            return (segments[-1][1],) if n else ()
        known = {name: digest for name, (_, _, digest) in self.header["ranges"].items()}
        structure, _, _ = _digests(read, size, length, self.ranges, self.block_size, known)
        if structure != self.header["sha256"]:
            raise SealError("its structure (HDF5 metadata, names, attributes) fails the file's sha256 checksum")
        return _Image(segments, length)

    def read(self, name: str, start: int, stop: int) -> memoryview:
        """Bytes [start, stop) of range `name`, read as whole blocks, each checked against its digest (SealError
        naming the range and the block otherwise)."""
        off, n = self.ranges[name]
        if not 0 <= start <= stop <= n:
            raise SealError(f"{name}: bytes [{start}, {stop}) are outside its {n} bytes")
        if start == stop:
            return memoryview(bytearray())
        B = self.block_size
        first, last = start // B, -(-stop // B)
        buf = self._read(off + first * B, min(last * B, n) - first * B)
        digests = self.header["blocks"][name]
        for i in range(first, last):
            a = (i - first) * B
            if _sha(memoryview(buf)[a:a + B]) != digests[i]:
                raise SealError(f"{name} fails its sha256 checksum (block {i} of {len(digests)}, bytes "
                                f"[{off + i * B}, {off + min((i + 1) * B, n)}) of the file)")
        return memoryview(buf)[start - first * B:stop - first * B]
