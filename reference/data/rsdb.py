"""RSDB, the Random Sequential Document Buffer (SPEC §10), over the same data as the sequential loader.

Source: the documents in the order of packing.py (`default_rng([seed, e]).permutation(N)` for epochs e = 0, 1, ...;
endless, or `epochs` epochs when given). Buffer: whole documents, each with a read head.
  1. The buffer starts with 2 × buffer_size documents (the internal size is twice the user size), read heads at 0.
  2. A training row is filled by repeatedly picking a live (not yet exhausted) buffered document uniformly at random
     and copying tokens from its read head until the row is full or the document is exhausted; the read head moves
     on. The picks of row r (counted over the whole run, all batches) use `default_rng([seed, 0, r])`, so the
     stream is a function of (seed, row) and the position. (The 0 was the rank of the retired per-rank streams; it
     stays so that a stream begun before continues unchanged.)
  3. When the live count falls to buffer_size, finished documents are purged and new ones are loaded from the
     source in bulk, back to 2 × buffer_size (or until a finite source is exhausted).
A row is a concatenation of pieces of documents. Each piece is its own document for the intra-document mask:
doc_ids[b, t] is the index of the piece holding t within row b. (A piece ends early only when the row is full, so
every piece but a row's last ends with its document's EOS; the ids therefore equal `packing.document_ids`, the EOS
count, and a piece that starts inside a document is a new document that sees only itself.)

No token is dropped or repeated: every token of every document is emitted exactly once per pass of the source, in
order within its document (read heads only move forward). With `epochs=k` the stream ends when the source is
exhausted and the buffer drained; the last batch is padded with eos_id at doc id -1 and the next call raises
StopIteration.

Reading only some rows (packing.py, `next_rows(n, keep)`): the buffer's state never depends on token contents. A
pick needs the live count, a take needs the document's length and read head, a refill needs the source order: all
lengths and positions. So a skipped row runs the same picks and moves the same read heads without reading a token;
only kept rows read the store. Its cost: one `default_rng` and one draw per piece of every skipped row, CPU only
(~50 µs a row measured at T = 4096 over ~800-token documents, buffer_size 1024; reading a row costs ~30x that),
the price of every rank holding the same buffer.

`state_dict()` (JSON-serialisable) holds the source position, every buffered document with its read head, the live
list and the rows served; `load_state_dict` continues the stream exactly.
"""

from __future__ import annotations

import numpy as np

from .packing import BatchedRows, DocumentOrder, check_common_state, kept_range
from .store import DataError, _nonneg_int, _positive_int

__all__ = ["RSDBLoader"]

_STATE_KEYS = ("src_epoch", "src_cursor", "rows_served", "batches_served", "seed", "num_tokens", "num_documents",
               "buffer_size")


class RSDBLoader(BatchedRows):
    """`next_batch()` -> (tokens int64 [batch_size, seq_len], doc_ids int64 [batch_size, seq_len]); see the module
    docstring. `path` is a flat token file (eos_id required), a prepared dataset directory or a DocumentStore;
    `buffer_size` is the user-specified size (documents; the internal size is twice it). Every rank reads this one
    stream (its own rows of a step, `next_batches(count, keep)`; packing.py)."""

    kind = "rsdb"

    def __init__(self, path, seq_len: int, batch_size: int, eos_id: int | None = None, buffer_size: int = 1024,
                 seed: int = 0, epochs: int | None = None):
        self.buffer_size = _positive_int("buffer_size", buffer_size)
        self.capacity = 2 * self.buffer_size
        self.epochs = None if epochs is None else _positive_int("epochs", epochs)
        self._open(path, seq_len, batch_size, eos_id, seed)
        self.num_tokens, self.num_documents = self.store.num_tokens, self.store.num_documents
        self._lengths = self.store.ends - self.store.starts
        self.order = DocumentOrder(self.num_documents, self.seed)
        self.src_epoch, self.src_cursor = 0, 0
        self.rows_served = self.batches_served = 0
        self.slots: list[list[int]] = []  # [document, read head] per buffered document
        self.live: list[int] = []  # indices into slots of the documents not yet exhausted
        self.refills = 0
        self._refill()

    # ---- buffer -------------------------------------------------------------------------------------------------
    def source_exhausted(self) -> bool:
        return self.epochs is not None and self.src_epoch >= self.epochs

    def _refill(self) -> None:
        """Purge finished documents, then load new ones until the buffer holds `capacity` (2 × buffer_size)."""
        self.slots = [self.slots[i] for i in self.live]
        self.live = list(range(len(self.slots)))
        order = self.order(self.src_epoch)
        while len(self.slots) < self.capacity and not self.source_exhausted():
            self.live.append(len(self.slots))
            self.slots.append([int(order[self.src_cursor]), 0])
            self.src_cursor += 1
            if self.src_cursor == len(order):
                self.src_epoch, self.src_cursor = self.src_epoch + 1, 0
                order = self.order(self.src_epoch)
        self.refills += 1

    def buffered_tokens(self) -> int:
        """Tokens still unread in the buffer."""
        return int(sum(int(self._lengths[self.slots[i][0]]) - self.slots[i][1] for i in self.live))

    def _fill_row(self, tokens: np.ndarray | None, doc_ids: np.ndarray | None) -> int:
        """Fill one row from the buffer; returns how many tokens were filled (< seq_len only at a finite end).
        tokens None: a skipped row, the same picks and read-head moves without reading a token."""
        rng = np.random.default_rng([self.seed, 0, self.rows_served])
        self.rows_served += 1
        filled, piece, total = 0, 0, self.seq_len
        while filled < total and self.live:
            j = int(rng.integers(len(self.live)))
            slot = self.slots[self.live[j]]
            doc, head = slot
            length = int(self._lengths[doc])
            take = min(total - filled, length - head)
            if tokens is not None:
                tokens[filled:filled + take] = self.store.read(doc, head, head + take)
                doc_ids[filled:filled + take] = piece
            piece += 1
            filled += take
            slot[1] = head + take
            if slot[1] == length:  # exhausted: drop from the live list (swap-remove), refill at the low mark
                self.live[j] = self.live[-1]
                self.live.pop()
                if len(self.live) <= self.buffer_size and not self.source_exhausted():
                    self._refill()
        return filled

    # ---- rows ---------------------------------------------------------------------------------------------------
    def next_rows(self, n: int, keep=None) -> tuple[np.ndarray, np.ndarray]:
        """Past the next n rows, returning rows keep = slice(a, b) of them (tokens, doc_ids) [b - a, seq_len] and
        reading only their tokens; without counting a batch. At the end of a finite stream the rest is padded with
        eos_id at doc id -1; StopIteration when nothing is left."""
        a, b = kept_range(keep, _nonneg_int("n", n))
        if not self.live:
            raise StopIteration
        tokens = np.full((b - a, self.seq_len), self.eos_id, dtype=np.int64)
        doc_ids = np.full((b - a, self.seq_len), -1, dtype=np.int64)
        for r in range(n):
            kept = a <= r < b
            if self._fill_row(tokens[r - a] if kept else None, doc_ids[r - a] if kept else None) < self.seq_len:
                break
        return tokens, doc_ids

    # ---- position -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": self.kind, "src_epoch": self.src_epoch, "src_cursor": self.src_cursor,
                "rows_served": self.rows_served, "batches_served": self.batches_served,
                "slots": [list(s) for s in self.slots], "live": list(self.live), "buffer_size": self.buffer_size,
                "epochs": self.epochs, "seed": self.seed, "num_tokens": self.num_tokens,
                "num_documents": self.num_documents}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of an RSDBLoader over the same data with the same seed, buffer_size and
        epochs."""
        check_common_state(state, self, _STATE_KEYS)
        if state.get("kind") != self.kind:
            raise DataError(f"loader state is from a {state.get('kind')!r} loader, not {self.kind!r}")
        if int(state["buffer_size"]) != self.buffer_size or state.get("epochs") != self.epochs:
            raise DataError(f"loader state is from another stream: buffer_size/epochs "
                            f"{state['buffer_size']}/{state.get('epochs')} != {self.buffer_size}/{self.epochs}")
        slots, live = state.get("slots"), state.get("live")
        if not isinstance(slots, list) or not isinstance(live, list) or len(slots) > self.capacity:
            raise DataError(f"loader state slots/live must be lists (at most {self.capacity} slots)")
        clean = []
        for s in slots:
            if not (isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                for x in s)
                    and 0 <= s[0] < self.num_documents and 0 <= s[1] <= self._lengths[s[0]]):
                raise DataError(f"loader state slot {s!r} is not a [document, read head] of this data")
            clean.append([int(s[0]), int(s[1])])
        if len(set(live)) != len(live) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                  and 0 <= i < len(clean) for i in live):
            raise DataError("loader state live list must hold distinct slot indices")
        live_set = set(live)
        for i, (doc, head) in enumerate(clean):
            if (i in live_set) != (head < self._lengths[doc]):
                what = "live" if i in live_set else "finished"
                raise DataError(f"loader state slot {i} is {what} but its read head is {head} of "
                                f"{int(self._lengths[doc])}")
        order_len = len(self.order)
        if int(state["src_cursor"]) >= order_len:
            raise DataError(f"loader state src_cursor {state['src_cursor']} is out of range ({order_len})")
        self.src_epoch, self.src_cursor = int(state["src_epoch"]), int(state["src_cursor"])
        self.rows_served, self.batches_served = int(state["rows_served"]), int(state["batches_served"])
        self.slots, self.live = clean, [int(i) for i in live]
