"""Token data on disk (SPEC §10).

Two on-disk forms, both read by `DocumentStore` (and so by every loader):
  - a flat token file: little-endian uint32 tokens, nothing else. Each document ends with `eos_id`, and the EOS
    belongs to the document it ends (SPEC §4.6), so the file must end with an EOS. `write_token_file` writes one
    atomically. The EOS positions (8 bytes per document) are found once, when the store is opened.
  - a prepared dataset directory (`trinity data prepare`, reference/data/prepare.py): meta.json (tokenizer, EOS id,
    counts, the shard list) and shards `shard_00000.bin` (the flat format above) each with `shard_00000.idx.npy` (int64
    document start offsets in that shard, saved with allow_pickle=False). All shards, in order, are one stream of
    documents: document numbers run over shard 0, then shard 1, ...

The loaders read it through a DocumentStore: packing.py (sequential packing, and the document order every loader
shares), rsdb.py, mixture.py.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..files import atomic_path

__all__ = ["DataError", "DocumentStore", "write_token_file", "open_store", "TOKEN_DTYPE", "META_FILE"]

TOKEN_DTYPE = np.dtype("<u4")
META_FILE = "meta.json"
_SCAN_CHUNK = 1 << 24  # tokens per chunk when locating EOS tokens (bounds the scan's temporary memory)


class DataError(ValueError):
    """A token file or loader setting that cannot be used; the message names the file or the setting."""


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _nonneg_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_eos(eos_id) -> int:
    if isinstance(eos_id, (bool, np.bool_)) or not isinstance(eos_id, (int, np.integer)) \
            or not 0 <= eos_id < 2**32:
        raise DataError(f"eos_id must be an integer in [0, 2**32), got {eos_id!r}")
    return int(eos_id)


def retired_ranks(rank, world_size, what: str = "loader") -> None:
    """Loaders once gave each rank its own stream (documents strided by rank); now every rank reads the one global
    stream and keeps its rows (packing.py). Rank 0 of 1 is that stream; anything else is refused in one line."""
    if (isinstance(rank, bool) or isinstance(world_size, bool) or not isinstance(rank, (int, np.integer))
            or not isinstance(world_size, (int, np.integer)) or (int(rank), int(world_size)) != (0, 1)):
        raise DataError(f"{what} is for rank {rank!r} of world_size {world_size!r}: per-rank loader streams are "
                        f"retired; every rank reads the one global stream and keeps its rows "
                        f"(next_rows(n, keep=slice(a, b))), so only rank 0 of 1 continues")


def write_token_file(path, documents, eos_id: int) -> int:
    """Write `documents` (an iterable of integer sequences, none containing eos_id) as uint32 tokens, each document
    followed by eos_id, atomically (temp file, fsync, rename). An empty document becomes a lone EOS. Returns the
    number of tokens written."""
    eos_id = _check_eos(eos_id)
    total = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for i, doc in enumerate(documents):
                doc = np.asarray(doc)
                if doc.ndim != 1 or (doc.size and doc.dtype.kind not in "iu"):
                    raise DataError(f"document {i}: expected a 1-d sequence of integers, got "
                                    f"shape {doc.shape} dtype {doc.dtype}")
                doc = doc.astype(np.int64) if doc.size else np.zeros(0, np.int64)
                if doc.size and (doc.min() < 0 or doc.max() >= 2**32):
                    raise DataError(f"document {i}: token ids must lie in [0, 2**32), found "
                                    f"{doc.min()}..{doc.max()}")
                if np.any(doc == eos_id):
                    raise DataError(f"document {i} contains eos_id {eos_id} at position "
                                    f"{int(np.flatnonzero(doc == eos_id)[0])}; EOS may only end a document")
                f.write(np.append(doc, eos_id).astype(TOKEN_DTYPE).tobytes())
                total += doc.size + 1
            f.flush()
    return total


def _open_tokens(path: str) -> np.memmap:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file not found: {path}")
    size = os.path.getsize(path)
    if size % TOKEN_DTYPE.itemsize:
        raise DataError(f"{path}: size {size} bytes is not a multiple of 4 (expected uint32 tokens)")
    if size == 0:
        raise DataError(f"{path}: the token file holds no tokens")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def _scan_starts(tokens: np.ndarray, eos_id: int, path: str) -> np.ndarray:
    """Document start offsets of a flat token array (documents end with eos_id)."""
    n = tokens.shape[0]
    ends = [np.flatnonzero(tokens[i:i + _SCAN_CHUNK] == eos_id) + (i + 1) for i in range(0, n, _SCAN_CHUNK)]
    ends = np.concatenate(ends).astype(np.int64)  # exclusive end of each document (after its EOS)
    if ends.size == 0 or ends[-1] != n:
        tail = n - (int(ends[-1]) if ends.size else 0)
        raise DataError(f"{path}: the file must end with eos_id {eos_id}; its last {tail} token(s) "
                        f"belong to no document")
    return np.concatenate([[0], ends[:-1]]).astype(np.int64)


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{directory}: a data directory needs {META_FILE} (made by `trinity data prepare`)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


class DocumentStore:
    """Read-only random access to the documents of a flat token file or a prepared dataset directory.

    Document i spans global offsets [starts[i], ends[i]) of the virtual concatenation of all shards and ends with
    eos_id. `read(i, a, b)` returns its tokens a..b (uint32, a view of the memory map)."""

    def __init__(self, path, eos_id: int | None = None):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self._open_dir(eos_id)
        else:
            if eos_id is None:
                raise DataError(f"{self.path}: a flat token file needs eos_id (only a prepared directory's "
                                f"meta.json names it)")
            self.eos_id = _check_eos(eos_id)
            self.meta = None
            mm = _open_tokens(self.path)
            self._maps, self._files = [mm], [self.path]
            starts = [_scan_starts(mm, self.eos_id, self.path)]
            self._finish(starts)

    def _open_dir(self, eos_id):
        meta = self.meta = _read_meta(self.path)
        meta_eos = meta.get("eos_id")
        if meta_eos is None and isinstance(meta.get("tokenizer"), dict):
            meta_eos = meta["tokenizer"].get("eos_id")
        if meta_eos is None:
            if eos_id is None:
                raise DataError(f"{self.path}/{META_FILE} names no eos_id")
            meta_eos = eos_id
        try:
            self.eos_id = _check_eos(meta_eos)
        except DataError as e:
            raise DataError(f"{self.path}/{META_FILE}: {e}") from None
        if eos_id is not None and _check_eos(eos_id) != self.eos_id:
            raise DataError(f"eos_id {eos_id} disagrees with {self.path}/{META_FILE} eos_id {self.eos_id}")
        shards = meta.get("shards")
        if not isinstance(shards, list) or not shards:
            raise DataError(f"{self.path}/{META_FILE}: no shards listed")
        self._maps, self._files, starts = [], [], []
        for k, shard in enumerate(shards):
            if not (isinstance(shard, dict) and isinstance(shard.get("tokens"), str)
                    and isinstance(shard.get("index"), str)):
                raise DataError(f"{self.path}/{META_FILE}: shard {k} must name its tokens and index files")
            names = [shard["tokens"], shard["index"]]
            if any(os.path.isabs(n) or os.path.basename(n) != n for n in names):
                raise DataError(f"{self.path}/{META_FILE}: shard {k} files must be plain names in the directory")
            file = os.path.join(self.path, shard["tokens"])
            mm = _open_tokens(file)
            try:
                idx = np.load(os.path.join(self.path, shard["index"]), allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:  # a cut .npy ends in EOFError
                raise DataError(f"{self.path}/{shard['index']}: cannot read the document index "
                                f"({e or type(e).__name__})") from None
            n = mm.shape[0]
            if idx.ndim != 1 or idx.dtype.kind not in "iu" or idx.size == 0 or idx[0] != 0 \
                    or np.any(np.diff(idx) <= 0) or idx[-1] >= n:
                raise DataError(f"{self.path}/{shard['index']}: not increasing document starts within {n} tokens")
            idx = idx.astype(np.int64)
            if mm[n - 1] != self.eos_id or np.any(mm[idx[1:] - 1] != self.eos_id):
                raise DataError(f"{file}: documents listed in {shard['index']} do not end with eos_id {self.eos_id}")
            self._maps.append(mm)
            self._files.append(file)
            starts.append(idx)
        self._finish(starts)

    def _finish(self, starts):
        sizes = np.array([m.shape[0] for m in self._maps], np.int64)
        self.shard_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.starts = np.concatenate([s + b for s, b in zip(starts, self.shard_base)]).astype(np.int64)
        self.ends = np.concatenate([self.starts[1:], [int(sizes.sum())]]).astype(np.int64)
        self.doc_shard = np.concatenate([np.full(s.size, k, np.int32) for k, s in enumerate(starts)])
        self.num_tokens = int(sizes.sum())
        self.num_documents = int(self.starts.size)

    def length(self, doc: int) -> int:
        return int(self.ends[doc] - self.starts[doc])

    def read(self, doc: int, a: int, b: int) -> np.ndarray:
        k = int(self.doc_shard[doc])
        s = int(self.starts[doc] - self.shard_base[k])
        return self._maps[k][s + a:s + b]

    def max_token(self) -> int:
        """The largest token id in the data (a chunked scan)."""
        return max(int(m[i:i + _SCAN_CHUNK].max()) for m in self._maps for i in range(0, m.shape[0], _SCAN_CHUNK))

    @property
    def files(self) -> list[str]:
        return list(self._files)


def open_store(path, eos_id: int | None = None) -> DocumentStore:
    """A DocumentStore for `path` (a flat token file or a prepared directory), or `path` itself if it is one."""
    return path if isinstance(path, DocumentStore) else DocumentStore(path, eos_id)
