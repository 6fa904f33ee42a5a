"""Packed token loading (SPEC §10): documents from a flat token file, shuffled per epoch and packed sequentially
into fixed-length sequences, the tail of a document carried into the next sequence (TorchTitan style).

Token file: little-endian uint32 tokens, nothing else. Each document ends with `eos_id`, and the EOS belongs to the
document it ends (SPEC §4.6), so the file must end with an EOS. `write_token_file` writes one atomically.

Stream: epoch e visits the documents in the order `np.random.default_rng([seed, e]).permutation(num_documents)`;
their tokens, concatenated, form one endless stream over epochs 0, 1, 2, ... (a sequence may span two epochs).
The stream is cut into rows of `seq_len` tokens and rows are grouped `batch_size` at a time. Every token of every
document appears exactly once per epoch, in order within its document.

The loader position (`state_dict()`) is a point in that stream: epoch, index in the epoch's permutation, and offset
inside that document. Resuming from it continues the stream exactly; seq_len and batch_size may differ on resume
(the stream is the same, only its cutting changes), while the file and seed must be the same.
"""

from __future__ import annotations

import os

import numpy as np

from .attention import document_ids
from .checkpoint import atomic_path

__all__ = ["DataError", "PackedTokenLoader", "write_token_file", "TOKEN_DTYPE"]

TOKEN_DTYPE = np.dtype("<u4")
_SCAN_CHUNK = 1 << 24  # tokens per chunk when locating EOS tokens (bounds the scan's temporary memory)
_STATE_KEYS = ("epoch", "doc_cursor", "doc_offset", "batches_served", "seed", "num_tokens", "num_documents")


class DataError(ValueError):
    """A token file or loader setting that cannot be used; the message names the file or the setting."""


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_eos(eos_id) -> int:
    if isinstance(eos_id, (bool, np.bool_)) or not isinstance(eos_id, (int, np.integer)) \
            or not 0 <= eos_id < 2**32:
        raise DataError(f"eos_id must be an integer in [0, 2**32), got {eos_id!r}")
    return int(eos_id)


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


class PackedTokenLoader:
    """`next_batch()` -> (tokens int64 [batch_size, seq_len], doc_ids int64 [batch_size, seq_len]).

    doc_ids[b, t] is the number of EOS tokens strictly before t in row b (`attention.document_ids`): a row that
    starts inside a document calls that document 0. The file is opened read-only with np.memmap; the EOS positions
    (8 bytes per document) are found once when the loader is built."""

    def __init__(self, path, seq_len: int, batch_size: int, eos_id: int, seed: int = 0):
        self.path = os.fspath(path)
        self.seq_len = _positive_int("seq_len", seq_len)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.eos_id = _check_eos(eos_id)
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"token file not found: {self.path}")
        size = os.path.getsize(self.path)
        if size % TOKEN_DTYPE.itemsize:
            raise DataError(f"{self.path}: size {size} bytes is not a multiple of 4 (expected uint32 tokens)")
        if size == 0:
            raise DataError(f"{self.path}: the token file holds no tokens")
        self.tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")
        n = self.tokens.shape[0]
        ends = [np.flatnonzero(self.tokens[i:i + _SCAN_CHUNK] == self.eos_id) + (i + 1)
                for i in range(0, n, _SCAN_CHUNK)]
        self._ends = np.concatenate(ends).astype(np.int64)  # exclusive end of each document (after its EOS)
        if self._ends.size == 0 or self._ends[-1] != n:
            tail = n - (int(self._ends[-1]) if self._ends.size else 0)
            raise DataError(f"{self.path}: the file must end with eos_id {self.eos_id}; its last {tail} token(s) "
                            f"belong to no document")
        self._starts = np.concatenate([[0], self._ends[:-1]])
        self.num_tokens = int(n)
        self.num_documents = int(self._ends.size)
        self._set_position(epoch=0, doc_cursor=0, doc_offset=0, batches_served=0)

    # ---- position -----------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The document order of `epoch`: a permutation drawn from default_rng([seed, epoch])."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_documents)

    def _set_position(self, epoch, doc_cursor, doc_offset, batches_served):
        self.epoch, self.doc_cursor, self.doc_offset = int(epoch), int(doc_cursor), int(doc_offset)
        self.batches_served = int(batches_served)
        self._order = self.epoch_order(self.epoch)

    def state_dict(self) -> dict:
        """The loader position as JSON-serialisable ints (plus seed and file size, checked on load)."""
        return {"epoch": self.epoch, "doc_cursor": self.doc_cursor, "doc_offset": self.doc_offset,
                "batches_served": self.batches_served, "seed": self.seed, "num_tokens": self.num_tokens,
                "num_documents": self.num_documents}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a loader over the same file with the same seed."""
        if not isinstance(state, dict):
            raise DataError(f"loader state must be a dict, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"loader state lacks {missing}")
        bad = [k for k in _STATE_KEYS if isinstance(state[k], bool) or not isinstance(state[k], (int, np.integer))
               or state[k] < 0]
        if bad:
            raise DataError(f"loader state fields {bad} must be non-negative integers")
        for key, mine in (("seed", self.seed), ("num_tokens", self.num_tokens), ("num_documents", self.num_documents)):
            if int(state[key]) != mine:
                raise DataError(f"loader state is from another stream: {key} {int(state[key])} != {mine} "
                                f"(state != this loader over {self.path})")
        cursor, offset = int(state["doc_cursor"]), int(state["doc_offset"])
        if cursor >= self.num_documents:
            raise DataError(f"loader state doc_cursor {cursor} is out of range (num_documents {self.num_documents})")
        doc = self.epoch_order(int(state["epoch"]))[cursor]
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
            start = int(self._starts[doc]) + self.doc_offset
            take = min(total - filled, int(self._ends[doc]) - start)
            out[filled:filled + take] = self.tokens[start:start + take]
            filled += take
            self.doc_offset += take
            if start + take == self._ends[doc]:  # document exhausted: next one (next epoch after the last)
                self.doc_offset = 0
                self.doc_cursor += 1
                if self.doc_cursor == self.num_documents:
                    self._set_position(self.epoch + 1, 0, 0, self.batches_served)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        for row in tokens:
            self._fill(row)
        self.batches_served += 1
        return tokens, document_ids(tokens, self.eos_id)

    def __iter__(self):
        while True:
            yield self.next_batch()
