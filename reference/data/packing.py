"""The sequential packing loader, the document order every loader shares, and what every loader shares: one global
stream of rows, of which a caller reads only the rows it keeps (SPEC §10). The data it reads: store.py.

Document order (shared by PackedTokenLoader and RSDBLoader): epoch e visits the documents in the order
`np.random.default_rng([seed, e]).permutation(num_documents)`.

One stream for every rank. A loader defines one global stream of rows, the same on every rank and under every
layout. `next_rows(n, keep=slice(a, b))` advances the loader past all n next rows but reads (from the store) and
returns only rows a..b-1; the rows it skips advance the position from document lengths alone, never reading a token.
So each data-parallel rank reads only its rows of a step's global batch, every rank's state_dict() stays the same,
and a resume under another layout continues the same stream. For every split of n into row ranges, the ranges'
kept rows, concatenated, are `next_rows(n)` (tests/test_data_rows.py). `next_batches(count, keep)` is `count`
next_batch() calls read this way (a step of count micro-batches).

PackedTokenLoader (sequential packing, TorchTitan style): the documents of epochs 0, 1, 2, ..., concatenated, form one
endless stream (a sequence may span two epochs). The stream is cut into rows of `seq_len` tokens, the tail of a
document carried into the next row, and rows are grouped `batch_size` at a time. Every token of every document
appears exactly once per epoch, in order within its document. Row r is the stream's tokens [r·T, (r+1)·T), so skipping
k rows moves the position k·T tokens on: a search in the prefix sums of the epoch's document lengths.

Its position (`state_dict()`) is a point in that stream: epoch, index in the epoch's order, and offset inside that
document. Resuming from it continues the stream exactly; seq_len and batch_size may differ on resume (the stream is
the same, only its cutting changes), while the data and seed must be the same. States written when loaders had
per-rank streams (rank/world_size) load when they are rank 0 of 1, the same stream; any other is refused.
"""

from __future__ import annotations

import numpy as np

from .store import DataError, _check_eos, _nonneg_int, _positive_int, open_store, retired_ranks

__all__ = ["document_ids", "DocumentOrder", "BatchedRows", "PackedTokenLoader", "check_common_state", "kept_range"]

_STATE_KEYS = ("epoch", "doc_cursor", "doc_offset", "batches_served", "seed", "num_tokens", "num_documents")


def document_ids(tokens, eos_id):
    """doc(t) = number of EOS tokens strictly before t, per row (SPEC §4.6: the EOS belongs to the document it
    ends; Arcee's `block_causal`). tokens: [B, T] → int64 [B, T]."""
    is_eos = (np.asarray(tokens) == eos_id).astype(np.int64)
    return np.cumsum(is_eos, axis=-1) - is_eos


def kept_range(keep, n: int) -> tuple[int, int]:
    """(a, b) of `keep` over n rows: None = all rows (0, n); slice(a, b) with 0 <= a <= b <= n, step 1 (None ends
    mean 0 and n)."""
    if keep is None:
        return 0, n
    ends = () if not isinstance(keep, slice) else (keep.start, keep.stop)
    if not isinstance(keep, slice) or keep.step not in (None, 1) or not all(
            v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) for v in ends):
        raise DataError(f"keep must be None or slice(a, b) of integers with step 1, got {keep!r}")
    a = 0 if keep.start is None else int(keep.start)
    b = n if keep.stop is None else int(keep.stop)
    if not 0 <= a <= b <= n:
        raise DataError(f"keep rows [{a}, {b}) must lie within the {n} rows read (0 <= a <= b <= {n})")
    return a, b


class DocumentOrder:
    """The per-epoch document order, default_rng([seed, epoch]).permutation(N), and the prefix sums of its document
    lengths: starts(epoch)[i] = Σ_{j<i} lengths[order[j]] (N + 1 entries, the last = the epoch's tokens)."""

    def __init__(self, num_documents: int, seed: int, lengths=None):
        self.num_documents = int(num_documents)
        self.seed = _nonneg_int("seed", seed)
        self.lengths = None if lengths is None else np.asarray(lengths, np.int64)
        self._cache = (None, None, None)

    def _load(self, epoch: int) -> None:
        if self._cache[0] != epoch:
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_documents)
            starts = None if self.lengths is None else np.concatenate([[0], np.cumsum(self.lengths[perm])])
            self._cache = (epoch, perm, starts)

    def __call__(self, epoch: int) -> np.ndarray:
        self._load(int(epoch))
        return self._cache[1]

    def starts(self, epoch: int) -> np.ndarray:
        self._load(int(epoch))
        return self._cache[2]

    def __len__(self):
        return self.num_documents


def check_common_state(state: dict, loader, keys) -> None:
    """Checks shared by the loaders' load_state_dict: a dict with these non-negative int keys, from the same data and
    seed, and not from a rank of the retired per-rank streams other than rank 0 of 1 (`store.retired_ranks`)."""
    if not isinstance(state, dict):
        raise DataError(f"loader state must be a dict, got {type(state).__name__}")
    retired_ranks(state.get("rank", 0), state.get("world_size", 1), "loader state")
    missing = [k for k in keys if k not in state]
    if missing:
        raise DataError(f"loader state lacks {missing}")
    bad = [k for k in keys if isinstance(state[k], bool) or not isinstance(state[k], (int, np.integer))
           or state[k] < 0]
    if bad:
        raise DataError(f"loader state fields {bad} must be non-negative integers")
    for key in ("seed", "num_tokens", "num_documents"):
        value, mine = state[key], getattr(loader, key)
        if int(value) != mine:
            raise DataError(f"loader state is from another stream: {key} {value!r} != {mine} "
                            f"(state != this loader over {loader.path})")


class BatchedRows:
    """What every loader shares: `next_rows(n, keep)` (the module docstring); `next_batch(keep)` is the next
    `batch_size` rows, counted in `batches_served`; `next_batches(count, keep)` is `count` of them; iterating yields
    whole batches until the stream ends (StopIteration)."""

    def _open(self, path, seq_len, batch_size, eos_id, seed):
        """Check the arguments every loader takes and open its DocumentStore."""
        self.seq_len = _positive_int("seq_len", seq_len)
        self.batch_size = _positive_int("batch_size", batch_size)
        if eos_id is not None:
            eos_id = _check_eos(eos_id)
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.store = open_store(path, eos_id)
        self.path, self.eos_id = self.store.path, self.store.eos_id

    def next_batch(self, keep=None) -> tuple[np.ndarray, np.ndarray]:
        """The next batch_size rows: `next_rows(batch_size, keep)`, counted as one batch."""
        batch = self.next_rows(self.batch_size, keep)
        self.batches_served += 1
        return batch

    def next_batches(self, count: int, keep=None) -> tuple[np.ndarray, np.ndarray]:
        """`count` next_batch() calls as one: rows keep = slice(a, b) of their count × batch_size rows, each call
        keeping its part of [a, b). Returns (tokens, doc_ids) [b - a, seq_len]; the state is that of `count`
        next_batch() calls whatever keep is."""
        count = _nonneg_int("count", count)
        a, b = kept_range(keep, count * self.batch_size)
        tokens, doc_ids = [], []
        for k in range(count):
            lo = k * self.batch_size
            t, d = self.next_batch(slice(min(max(a - lo, 0), self.batch_size), min(max(b - lo, 0), self.batch_size)))
            tokens.append(t)
            doc_ids.append(d)
        if not tokens:
            return np.zeros((0, self.seq_len), np.int64), np.zeros((0, self.seq_len), np.int64)
        return np.concatenate(tokens), np.concatenate(doc_ids)

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
    dataset directory (eos_id from its meta.json) or an open DocumentStore. `rank`/`world_size` are retired
    (module docstring): only rank 0 of 1 is accepted."""

    kind = "sequential"

    def __init__(self, path, seq_len: int, batch_size: int, eos_id: int | None = None, seed: int = 0):
        self._open(path, seq_len, batch_size, eos_id, seed)
        self.num_tokens, self.num_documents = self.store.num_tokens, self.store.num_documents
        self._starts, self._ends = self.store.starts, self.store.ends
        self.order = DocumentOrder(self.num_documents, self.seed, self._ends - self._starts)
        self._set_position(epoch=0, doc_cursor=0, doc_offset=0, batches_served=0)

    # ---- position -----------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The document order of `epoch` (module docstring)."""
        return self.order(int(epoch))

    def _set_position(self, epoch, doc_cursor, doc_offset, batches_served):
        self.epoch, self.doc_cursor, self.doc_offset = int(epoch), int(doc_cursor), int(doc_offset)
        self.batches_served = int(batches_served)
        self._order = self.epoch_order(self.epoch)

    def state_dict(self) -> dict:
        """The loader position as JSON-serialisable ints (plus seed and data size, checked on load)."""
        return {"kind": self.kind, "epoch": self.epoch, "doc_cursor": self.doc_cursor, "doc_offset": self.doc_offset,
                "batches_served": self.batches_served, "seed": self.seed, "num_tokens": self.num_tokens,
                "num_documents": self.num_documents}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a loader over the same data with the same seed."""
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

    # ---- rows ---------------------------------------------------------------------------------------------------
    def _skip(self, count: int) -> None:
        """Move the position `count` tokens on without reading them: p = starts[cursor] + offset + count in the
        epoch's token coordinates; epoch += p // num_tokens; then cursor = the last i with starts[i] <= p mod
        num_tokens and offset = (p mod num_tokens) − starts[cursor] (every document holds >= 1 token, its EOS)."""
        if count == 0:
            return
        p = int(self.order.starts(self.epoch)[self.doc_cursor]) + self.doc_offset + count
        epoch, p = self.epoch + p // self.num_tokens, p % self.num_tokens
        starts = self.order.starts(epoch)
        cursor = int(np.searchsorted(starts, p, side="right")) - 1
        self._set_position(epoch, cursor, p - int(starts[cursor]), self.batches_served)

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

    def next_rows(self, n: int, keep=None) -> tuple[np.ndarray, np.ndarray]:
        """Past the next n rows of the stream, returning rows keep = slice(a, b) of them (tokens, doc_ids)
        [b - a, seq_len], reading only their tokens; without counting a batch."""
        a, b = kept_range(keep, _nonneg_int("n", n))
        T = self.seq_len
        self._skip(a * T)
        tokens = np.empty((b - a) * T, dtype=np.int64)
        self._fill(tokens)
        self._skip((n - b) * T)
        tokens = tokens.reshape(b - a, T)
        return tokens, document_ids(tokens, self.eos_id)
