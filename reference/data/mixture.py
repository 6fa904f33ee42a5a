"""Phase mixes (SPEC §10): several data sources mixed by weight, the weights changing at token counts.

`MixtureLoader(sources, phases, seed)`: `sources` are loaders (PackedTokenLoader, RSDBLoader, ...) with the same
seq_len and eos_id; `phases` is [(start_tokens, weights), ...] with the first start 0, starts increasing, one
non-negative weight per source (not all zero; they are normalised). The phase in force for a row is the last one
whose start is <= the tokens served before that row: rows_served × seq_len (the rows of the one global stream, so
this is the trainer's tokens_seen).

Row r (counted over the whole run) comes from source i where i is drawn with the phase's probabilities from
`default_rng([seed, 0, r])`: the stream is a function of (seed, row) and the position, the same on every rank. (The 0
was the rank of the retired per-rank streams; it stays so that a stream begun before continues unchanged.) Each
source keeps its own stream (its rows are the next rows of that loader), so its own guarantees (every token once per
epoch, exact resume) hold within the mixture. For the trainer's intra-document mask each row carries its source's
doc_ids.

Reading only rows a..b-1 of n (`next_rows(n, keep)`, packing.py): the n picks come from (seed, row) alone; source i's
rows among the n are its next m_i rows, and those among [a, b) are a contiguous run lo_i..hi_i-1 of them (picks keep
row order), so source i is asked for `next_rows(m_i, keep=slice(lo_i, hi_i))` and reads only those.

`state_dict()` holds rows/batches served and every source's state_dict; `load_state_dict` continues exactly.
Sources should be endless (the default for both loaders).
"""

from __future__ import annotations

import numpy as np

from .packing import BatchedRows, kept_range
from .store import DataError, _nonneg_int, _positive_int, retired_ranks

__all__ = ["MixtureLoader", "check_phases"]


def check_phases(phases, num_sources: int) -> list[tuple[int, tuple[float, ...]]]:
    """Validated [(start_tokens, weights)]; raises DataError naming the bad entry."""
    if not isinstance(phases, (list, tuple)) or not phases:
        raise DataError("phases must be a non-empty list of (start_tokens, weights)")
    out = []
    for k, item in enumerate(phases):
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise DataError(f"phase {k}: expected (start_tokens, weights), got {item!r}")
        start, weights = item
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise DataError(f"phase {k}: start_tokens must be a non-negative integer, got {start!r}")
        if not isinstance(weights, (list, tuple)) or len(weights) != num_sources:
            raise DataError(f"phase {k}: needs {num_sources} weight(s), one per source, got {weights!r}")
        if any(isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not w >= 0
               or not np.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise DataError(f"phase {k}: weights must be finite, >= 0 and not all 0, got {list(weights)!r}")
        out.append((int(start), tuple(float(w) for w in weights)))
    if out[0][0] != 0:
        raise DataError(f"the first phase must start at 0 tokens, got {out[0][0]}")
    if any(b[0] <= a[0] for a, b in zip(out, out[1:])):
        raise DataError(f"phase starts must increase, got {[s for s, _ in out]}")
    return out


class MixtureLoader(BatchedRows):
    """`next_batch()` -> (tokens int64 [batch_size, seq_len], doc_ids int64 [batch_size, seq_len]) mixing `sources`
    by the weights of the phase in force (module docstring). Every rank reads this one stream (its own rows of a step,
    `next_batches(count, keep)`); a state of the retired per-rank streams loads only as rank 0 of 1."""

    kind = "mixture"

    def __init__(self, sources, phases, seed: int = 0, batch_size: int | None = None):
        if not sources:
            raise DataError("a mixture needs at least one source")
        self.sources = list(sources)
        self.seq_len = self.sources[0].seq_len
        self.eos_id = self.sources[0].eos_id
        for i, s in enumerate(self.sources):
            if s.seq_len != self.seq_len or s.eos_id != self.eos_id:
                raise DataError(f"source {i}: seq_len/eos_id {s.seq_len}/{s.eos_id} differ from source 0's "
                                f"{self.seq_len}/{self.eos_id}")
        self.phases = check_phases(phases, len(self.sources))
        self._starts = np.array([s for s, _ in self.phases], np.int64)
        self._cdfs = [np.cumsum(w) / sum(w) for _, w in self.phases]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.batch_size = _positive_int("batch_size", self.sources[0].batch_size if batch_size is None
                                        else batch_size)
        self.rows_served = self.batches_served = 0
        self.path = [getattr(s, "path", None) for s in self.sources]

    @property
    def tokens_served(self) -> int:
        """Tokens of the global stream served so far (rows_served × seq_len)."""
        return self.rows_served * self.seq_len

    def phase_at(self, tokens: int) -> int:
        return int(np.searchsorted(self._starts, tokens, side="right") - 1)

    def choose(self, row: int) -> int:
        """The source of row `row` (a function of seed, row and the phase in force)."""
        cdf = self._cdfs[self.phase_at(row * self.seq_len)]
        u = np.random.default_rng([self.seed, 0, row]).random()
        return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)

    def next_rows(self, n: int, keep=None) -> tuple[np.ndarray, np.ndarray]:
        """Past the next n rows, returning rows keep = slice(a, b) of them (tokens, doc_ids) [b - a, seq_len]; each
        source reads only its kept rows (module docstring). Without counting a batch."""
        a, b = kept_range(keep, _nonneg_int("n", n))
        picks = np.array([self.choose(self.rows_served + r) for r in range(n)], np.int64)
        tokens = np.empty((b - a, self.seq_len), np.int64)
        doc_ids = np.empty((b - a, self.seq_len), np.int64)
        for i in np.unique(picks):
            rows = np.flatnonzero(picks == i)
            lo, hi = np.searchsorted(rows, a), np.searchsorted(rows, b)
            t, d = self.sources[i].next_rows(rows.size, keep=slice(int(lo), int(hi)))
            tokens[rows[lo:hi] - a], doc_ids[rows[lo:hi] - a] = t, d
        self.rows_served += n
        self.source_rows = np.bincount(picks, minlength=len(self.sources))
        return tokens, doc_ids

    def state_dict(self) -> dict:
        return {"kind": self.kind, "rows_served": self.rows_served, "batches_served": self.batches_served,
                "seed": self.seed, "phases": [[s, list(w)] for s, w in self.phases],
                "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a mixture of the same sources, phases and seed (a state of the retired
        per-rank streams only as rank 0 of 1)."""
        kind = state.get("kind") if isinstance(state, dict) else None
        if kind != self.kind:
            raise DataError(f"loader state is from a {kind!r} loader, not {self.kind!r}")
        for key in ("rows_served", "batches_served"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DataError(f"loader state {key} must be a non-negative integer, got {v!r}")
        retired_ranks(state.get("rank", 0), state.get("world_size", 1), "loader state")
        if state.get("seed") != self.seed:
            raise DataError(f"loader state is from another stream: seed {state.get('seed')!r} != {self.seed}")
        if state.get("phases") != [[s, list(w)] for s, w in self.phases]:
            raise DataError(f"loader state is from another mixture: phases {state.get('phases')!r} != "
                            f"{[[s, list(w)] for s, w in self.phases]}")
        sources = state.get("sources")
        if not isinstance(sources, list) or len(sources) != len(self.sources):
            raise DataError(f"loader state holds {len(sources) if isinstance(sources, list) else 'no'} source "
                            f"state(s) for {len(self.sources)} sources")
        for i, (loader, s) in enumerate(zip(self.sources, sources)):
            try:
                loader.load_state_dict(s)
            except DataError as e:
                raise DataError(f"source {i}: {e}") from None
        self.rows_served, self.batches_served = int(state["rows_served"]), int(state["batches_served"])
