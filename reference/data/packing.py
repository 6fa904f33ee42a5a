"""The sequential packing loader, and the document order every loader shares (SPEC §10). The data it reads:
store.py.

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

import numpy as np

from .store import DataError, _check_eos, _check_rank, _nonneg_int, _positive_int, open_store

__all__ = ["document_ids", "DocumentOrder", "BatchedRows", "PackedTokenLoader", "check_common_state"]

_STATE_KEYS = ("epoch", "doc_cursor", "doc_offset", "batches_served", "seed", "num_tokens", "num_documents")


def document_ids(tokens, eos_id):
    """doc(t) = number of EOS tokens strictly before t, per row (SPEC §4.6: the EOS belongs to the document it
    ends; Arcee's `block_causal`). tokens: [B, T] → int64 [B, T]."""
    is_eos = (np.asarray(tokens) == eos_id).astype(np.int64)
    return np.cumsum(is_eos, axis=-1) - is_eos


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

    doc_ids[b, t] is the number of EOS tokens strictly before t in row b (`document_ids`): a row that
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
