"""Each rank reads only its rows of the global batch (reference/data/packing.py, "One stream for every rank"): for
any split of a step's rows into data-parallel ranges, the ranks' kept rows, concatenated, are the whole batch; every
rank's loader state after the step is the whole loader's; a rank reads from the store only the tokens of its rows;
and a rank's state resumes the stream mid-way, under another split. For the sequential, RSDB and mixture loaders,
over several steps and epochs."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.reference.data.mixture import MixtureLoader
from trinity.reference.data.packing import PackedTokenLoader, kept_range
from trinity.reference.data.rsdb import RSDBLoader
from trinity.reference.data.store import DataError, DocumentStore, write_token_file

from strategies import tagged_documents

EOS = 0
KINDS = ("sequential", "rsdb", "rsdb_finite", "mixture")


class CountingStore(DocumentStore):
    """A DocumentStore that counts what is read from it: calls of read() and tokens returned."""

    def __init__(self, path, eos_id):
        super().__init__(path, eos_id)
        self.calls = self.tokens = 0

    def read(self, doc, a, b):
        out = super().read(doc, a, b)
        self.calls += 1
        self.tokens += out.shape[0]
        return out


class Corpus:
    """Token files of two sources (source s holds ids s*100_000 + ...) and how to build a loader of each kind over
    counting stores. The mixture draws from a sequential loader of source 0 and an RSDB loader of source 1, its phase
    switching after `switch` + 1 rows."""

    def __init__(self, directory, lengths, seq_len, batch_size, seed, switch):
        self.paths = []
        for s, ls in enumerate(lengths):
            self.paths.append(os.path.join(directory, f"s{s}.bin"))
            write_token_file(self.paths[-1], tagged_documents(ls, s), EOS)
        self.seq_len, self.batch_size, self.seed, self.switch = seq_len, batch_size, seed, switch

    def build(self, kind):
        """(loader, [its counting stores])."""
        T, B, seed = self.seq_len, self.batch_size, self.seed
        stores = [CountingStore(p, EOS) for p in self.paths]
        if kind == "sequential":
            return PackedTokenLoader(stores[0], T, B, seed=seed), stores[:1]
        if kind in ("rsdb", "rsdb_finite"):
            epochs = 2 if kind == "rsdb_finite" else None
            return RSDBLoader(stores[0], T, B, buffer_size=2, seed=seed, epochs=epochs), stores[:1]
        sources = [PackedTokenLoader(stores[0], T, 3, seed=seed), RSDBLoader(stores[1], T, 2, buffer_size=1,
                                                                             seed=seed + 1)]
        return MixtureLoader(sources, [(0, [1, 2]), ((self.switch + 1) * T, [3, 1])], seed=seed, batch_size=B), stores


def split(cuts, rows):
    """The dp row ranges [a_r, b_r) of `rows` rows at the sorted cut points (ranges may be empty)."""
    edges = [0] + sorted(min(c, rows) for c in cuts) + [rows]
    return list(zip(edges[:-1], edges[1:]))


def tokens_read(stores):
    return sum(s.tokens for s in stores)


def step(loader, count, keep):
    """One step: (tokens, doc_ids) of rows keep of `count` micro-batches, or None where the stream has ended."""
    try:
        return loader.next_batches(count, keep)
    except StopIteration:
        return None


def whole_step(loader, count):
    """The same step as `count` next_batch() calls, the path the trainer used before rows were kept."""
    out = []
    for _ in range(count):
        try:
            out.append(loader.next_batch())
        except StopIteration:
            return None
    return np.concatenate([t for t, _ in out]), np.concatenate([d for _, d in out])


corpora = st.lists(st.lists(st.one_of(st.integers(0, 3), st.integers(0, 30)), min_size=1, max_size=10),
                   min_size=2, max_size=2)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), lengths=corpora, seq_len=st.integers(1, 9), batch_size=st.integers(1, 4),
       count=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), switch=st.integers(0, 20),
       steps=st.lists(st.lists(st.integers(0, 16), min_size=4, max_size=4), min_size=1, max_size=6),
       resume_at=st.integers(0, 6), resume_rank=st.integers(0, 4))
def test_ranks_rows_concatenate_to_the_batch_and_states_agree(kind, lengths, seq_len, batch_size, count, seed,
                                                              switch, steps, resume_at, resume_rank):
    """Each step (a new split of the rows over 5 ranks every step, empty ranges allowed): the ranks' kept rows,
    concatenated, == the whole loader's batch (count next_batch() calls); every rank's state_dict() == the whole
    loader's; rank r read exactly (b_r - a_r) × T tokens from its stores (a finite RSDB stream at its end: at most
    that). At step `resume_at` one rank's state, through JSON (with the old format's rank 0 / world_size 1 added),
    restarts every rank's loader: the stream goes on unchanged. A finite stream ends (StopIteration) on every rank
    at the same step."""
    T, S = seq_len, count * batch_size
    with tempfile.TemporaryDirectory() as directory:
        corpus = Corpus(directory, lengths, seq_len, batch_size, seed, switch)
        whole, _ = corpus.build(kind)
        ranks = [corpus.build(kind) for _ in range(5)]
        for k, cuts in enumerate(steps):
            if k == resume_at:
                state = json.loads(json.dumps(ranks[resume_rank][0].state_dict()))
                if kind != "mixture":
                    state.update(rank=0, world_size=1)
                ranks = [corpus.build(kind) for _ in range(5)]
                for loader, _ in ranks:
                    loader.load_state_dict(state)
            ranges = split(cuts, S)
            want = whole_step(whole, count)
            before = [tokens_read(stores) for _, stores in ranks]
            got = [step(ranks[r][0], count, slice(a, b)) for r, (a, b) in enumerate(ranges)]
            for r, (a, b) in enumerate(ranges):
                read = tokens_read(ranks[r][1]) - before[r]
                if kind == "rsdb_finite":
                    assert read <= (b - a) * T
                else:
                    assert read == (b - a) * T, f"rank {r} rows [{a}, {b}) read {read} tokens, not {(b - a) * T}"
                assert ranks[r][0].state_dict() == whole.state_dict(), f"step {k}: rank {r}'s state differs"
            if want is None:
                assert all(g is None for g in got), f"step {k}: the stream ended for the whole loader only"
                break
            assert all(g is not None for g in got)
            assert np.array_equal(np.concatenate([t for t, _ in got]), want[0])
            assert np.array_equal(np.concatenate([d for _, d in got]), want[1])
            for (a, b), (t, _) in zip(ranges, got):
                assert t.shape == (b - a, T)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), lengths=corpora, seq_len=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
       calls=st.lists(st.tuples(st.integers(0, 40), st.lists(st.integers(0, 40), min_size=3, max_size=3)), min_size=1,
                      max_size=5))
def test_next_rows_of_any_count_splits_exactly(kind, lengths, seq_len, seed, calls):
    """next_rows(n, keep) for any n (not a multiple of a batch, 0 included) and any split of the n rows: the ranks'
    rows concatenate to next_rows(n), the states agree, and each rank read only its rows' tokens."""
    with tempfile.TemporaryDirectory() as directory:
        corpus = Corpus(directory, lengths, seq_len, 2, seed, 7)
        whole, _ = corpus.build(kind)
        ranks = [corpus.build(kind) for _ in range(4)]
        for n, cuts in calls:
            ranges = split(cuts, n)
            try:
                want = whole.next_rows(n)
            except StopIteration:
                for loader, _ in ranks:
                    with pytest.raises(StopIteration):
                        loader.next_rows(n, slice(0, 0))
                break
            got = []
            for r, (a, b) in enumerate(ranges):
                before = tokens_read(ranks[r][1])
                got.append(ranks[r][0].next_rows(n, slice(a, b)))
                assert tokens_read(ranks[r][1]) - before <= (b - a) * seq_len
                assert ranks[r][0].state_dict() == whole.state_dict()
            assert np.array_equal(np.concatenate([t for t, _ in got]), want[0])
            assert np.array_equal(np.concatenate([d for _, d in got]), want[1])


def test_a_skipping_rank_reads_nothing_and_skips_epochs_by_lengths(tmp_path):
    """A rank that keeps no rows reads no token, however far it skips (here 50 epochs of a sequential loader in one
    call), and lands where the reading loader lands."""
    corpus = Corpus(tmp_path, [[5, 0, 9, 2], [3]], 4, 2, 11, 3)
    for kind in KINDS[:2] + KINDS[3:]:
        skipper, stores = corpus.build(kind)
        reader, _ = corpus.build(kind)
        n = 50 * (6 + 1 + 10 + 3) // 4 + 3  # rows of 4 tokens over 50 epochs of source 0 (its documents + EOS)
        tokens, doc_ids = skipper.next_rows(n, slice(n, n))
        assert tokens.shape == doc_ids.shape == (0, 4) and tokens_read(stores) == 0 and stores[0].calls == 0
        reader.next_rows(n)
        assert skipper.state_dict() == reader.state_dict()
        assert np.array_equal(skipper.next_rows(3)[0], reader.next_rows(3)[0])


def test_keep_errors(tmp_path):
    loader, _ = Corpus(tmp_path, [[3, 4], [2]], 4, 2, 0, 1).build("sequential")
    for keep, message in [(slice(0, 5), r"keep rows \[0, 5\) must lie within the 4 rows"),
                          (slice(3, 2), r"keep rows \[3, 2\)"), (slice(-1, 2), r"keep rows \[-1, 2\)"),
                          (slice(0, 4, 2), "step 1"), ((0, 2), "keep must be None or slice"),
                          (slice(0.5, 2), "slice\\(a, b\\) of integers")]:
        with pytest.raises(DataError, match=message):
            loader.next_rows(4, keep)
    with pytest.raises(DataError, match="count must be a non-negative integer"):
        loader.next_batches(-1)
    assert kept_range(None, 7) == (0, 7) and kept_range(slice(None, 3), 7) == (0, 3)
    assert loader.state_dict()["doc_cursor"] == 0 and loader.state_dict()["doc_offset"] == 0
