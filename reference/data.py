"""Token data on disk and the sequential packing loader (SPEC §10).

Two on-disk forms, both read by `DocumentStore` (and so by every loader):
  - a flat token file: little-endian uint32 tokens, nothing else. Each document ends with `eos_id`, and the EOS
    belongs to the document it ends (SPEC §4.6), so the file must end with an EOS. `write_token_file` writes one
    atomically. The EOS positions (8 bytes per document) are found once, when the store is opened.
  - a prepared dataset directory (`trinity data prepare`, reference/prepare.py): meta.json (tokenizer, EOS id, counts,
    the shard list) and shards `shard_00000.bin` (the flat format above) each with `shard_00000.idx.npy` (int64
    document start offsets in that shard, saved with allow_pickle=False). All shards, in order, are one stream of
    documents: document numbers run over shard 0, then shard 1, ...

Document order (shared by PackedTokenLoader and RSDBLoader): epoch e visits the documents in the order
`np.random.default_rng([seed, e]).permutation(num_documents)[rank::world_size]`. Distributed ranks therefore read
disjoint sets of documents (documents strided by rank in one common permutation), and together every document once
per epoch; with world_size 1 this is the whole permutation.

PackedTokenLoader (sequential packing, TorchTitan style): the documents of epochs 0, 1, 2, ..., concatenated, form one
endless stream (a sequence may span two epochs). The stream is cut into rows of `seq_len` tokens, the tail of a
document carried into the next row, and rows are grouped `batch_size` at a time. Every token of every document
appears exactly once per epoch, in order within its document.

Its position (`state_dict()`) is a point in that stream: epoch, index in the epoch's order, and offset inside that
document. Resuming from it continues the stream exactly; seq_len and batch_size may differ on resume (the stream is
the same, only its cutting changes), while the data, seed, rank and world_size must be the same.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .attention import document_ids
from .checkpoint import atomic_path

__all__ = ["DataError", "DocumentStore", "DocumentOrder", "PackedTokenLoader", "write_token_file", "open_store",
           "TOKEN_DTYPE", "META_FILE"]

TOKEN_DTYPE = np.dtype("<u4")
META_FILE = "meta.json"
_SCAN_CHUNK = 1 << 24  # tokens per chunk when locating EOS tokens (bounds the scan's temporary memory)
_STATE_KEYS = ("epoch", "doc_cursor", "doc_offset", "batches_served", "seed", "num_tokens", "num_documents")


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


def _check_rank(rank, world_size) -> tuple[int, int]:
    world_size = _positive_int("world_size", world_size)
    rank = _nonneg_int("rank", rank)
    if rank >= world_size:
        raise DataError(f"rank {rank} must be < world_size {world_size}")
    return rank, world_size


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


class DocumentOrder:
    """The per-epoch document order of one rank: default_rng([seed, epoch]).permutation(N)[rank::world_size]."""

    def __init__(self, num_documents: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_documents = int(num_documents)
        self.seed = _nonneg_int("seed", seed)
        self.rank, self.world_size = _check_rank(rank, world_size)
        if self.num_documents <= self.rank:
            raise DataError(f"rank {self.rank} of {self.world_size} gets no documents: the data holds only "
                            f"{self.num_documents}")
        self._cache = (None, None)

    def __call__(self, epoch: int) -> np.ndarray:
        if self._cache[0] != epoch:
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_documents)
            self._cache = (epoch, perm[self.rank::self.world_size])
        return self._cache[1]

    def __len__(self):
        return len(range(self.rank, self.num_documents, self.world_size))


def check_common_state(state: dict, loader, keys) -> None:
    """Checks shared by the loaders' load_state_dict: a dict with these non-negative int keys, from the same data,
    seed, rank and world_size (rank/world_size absent = 0/1, as written before they existed)."""
    if not isinstance(state, dict):
        raise DataError(f"loader state must be a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise DataError(f"loader state lacks {missing}")
    bad = [k for k in keys if isinstance(state[k], bool) or not isinstance(state[k], (int, np.integer))
           or state[k] < 0]
    if bad:
        raise DataError(f"loader state fields {bad} must be non-negative integers")
    theirs = {"seed": state["seed"], "num_tokens": state["num_tokens"], "num_documents": state["num_documents"],
              "rank": state.get("rank", 0), "world_size": state.get("world_size", 1)}
    for key, value in theirs.items():
        mine = getattr(loader, key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) != mine:
            raise DataError(f"loader state is from another stream: {key} {value!r} != {mine} "
                            f"(state != this loader over {loader.path})")


class BatchedRows:
    """What every loader shares: `next_batch()` is the next `batch_size` rows of `next_rows(n)` (tokens, doc_ids),
    counted in `batches_served`; iterating yields batches until the stream ends (StopIteration)."""

    def _open(self, path, seq_len, batch_size, eos_id, seed, rank, world_size):
        """Check the arguments every loader takes and open its DocumentStore."""
        self.seq_len = _positive_int("seq_len", seq_len)
        self.batch_size = _positive_int("batch_size", batch_size)
        if eos_id is not None:
            eos_id = _check_eos(eos_id)
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.store = open_store(path, eos_id)
        self.path, self.eos_id = self.store.path, self.store.eos_id

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        batch = self.next_rows(self.batch_size)
        self.batches_served += 1
        return batch

    def __iter__(self):
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return


class PackedTokenLoader(BatchedRows):
    """`next_batch()` -> (tokens int64 [batch_size, seq_len], doc_ids int64 [batch_size, seq_len]).

    doc_ids[b, t] is the number of EOS tokens strictly before t in row b (`attention.document_ids`): a row that
    starts inside a document calls that document 0. `path` is a flat token file (eos_id required), a prepared
    dataset directory (eos_id from its meta.json) or an open DocumentStore. rank / world_size pick this rank's
    documents (module docstring)."""

    kind = "sequential"

    def __init__(self, path, seq_len: int, batch_size: int, eos_id: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self._open(path, seq_len, batch_size, eos_id, seed, rank, world_size)
        self.num_tokens, self.num_documents = self.store.num_tokens, self.store.num_documents
        self._starts, self._ends = self.store.starts, self.store.ends
        self.order = DocumentOrder(self.num_documents, self.seed, self.rank, self.world_size)
        self._set_position(epoch=0, doc_cursor=0, doc_offset=0, batches_served=0)

    # ---- position -----------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's document order in `epoch` (module docstring)."""
        return self.order(int(epoch))

    def _set_position(self, epoch, doc_cursor, doc_offset, batches_served):
        self.epoch, self.doc_cursor, self.doc_offset = int(epoch), int(doc_cursor), int(doc_offset)
        self.batches_served = int(batches_served)
        self._order = self.epoch_order(self.epoch)

    def state_dict(self) -> dict:
        """The loader position as JSON-serialisable ints (plus seed, rank and data size, checked on load)."""
        return {"kind": self.kind, "epoch": self.epoch, "doc_cursor": self.doc_cursor, "doc_offset": self.doc_offset,
                "batches_served": self.batches_served, "seed": self.seed, "num_tokens": self.num_tokens,
                "num_documents": self.num_documents, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a loader over the same data with the same seed, rank and world_size."""
        check_common_state(state, self, _STATE_KEYS)
        if state.get("kind", self.kind) != self.kind:
            raise DataError(f"loader state is from a {state['kind']!r} loader, not {self.kind!r}")
        cursor, offset = int(state["doc_cursor"]), int(state["doc_offset"])
        order = self.epoch_order(int(state["epoch"]))
        if cursor >= len(order):
            raise DataError(f"loader state doc_cursor {cursor} is out of range (num_documents {len(order)})")
        doc = order[cursor]
        length = int(self._ends[doc] - self._starts[doc])
        if offset >= length:
            raise DataError(f"loader state doc_offset {offset} is out of range (document length {length})")
        self._set_position(state["epoch"], cursor, offset, state["batches_served"])

    # ---- batches ------------------------------------------------------------------------------------------------
    def _fill(self, out: np.ndarray) -> None:
        """Copy the next len(out) tokens of the stream into `out`, advancing the position."""
        filled, total = 0, out.shape[0]
        while filled < total:
            doc = self._order[self.doc_cursor]
            length = int(self._ends[doc] - self._starts[doc])
            take = min(total - filled, length - self.doc_offset)
            out[filled:filled + take] = self.store.read(doc, self.doc_offset, self.doc_offset + take)
            filled += take
            self.doc_offset += take
            if self.doc_offset == length:  # document exhausted: next one (next epoch after the last)
                self.doc_offset = 0
                self.doc_cursor += 1
                if self.doc_cursor == len(self._order):
                    self._set_position(self.epoch + 1, 0, 0, self.batches_served)

    def next_rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n rows of the stream (tokens, doc_ids), without counting a batch."""
        tokens = np.empty((n, self.seq_len), dtype=np.int64)
        for row in tokens:
            self._fill(row)
        return tokens, document_ids(tokens, self.eos_id)

