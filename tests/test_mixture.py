"""Phase mixes (reference/data/mixture.py, SPEC §10): rows drawn from sources by the weights of the phase in force at
the tokens served, each source's own stream preserved, exact resume, and clear errors."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.reference.data.mixture import MixtureLoader
from trinity.reference.data.packing import PackedTokenLoader
from trinity.reference.data.rsdb import RSDBLoader
from trinity.reference.data.store import DataError, write_token_file

from strategies import check_packed_epochs, check_rsdb_accounts, loader_corpora, tagged_documents, token_counts

EOS = 0
T = 8


def source_files(directory, n=3):
    """Source k holds tokens 1 + k*10000 + ...: a row's source is visible in its tokens."""
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        docs = [rng.integers(1, 5000, int(rng.integers(1, 30))) + k * 10000 for _ in range(40)]
        paths.append(os.path.join(directory, f"s{k}.bin"))
        write_token_file(paths[-1], docs, EOS)
    return paths


def loaders(paths, kinds=None, seed=0):
    kinds = kinds or ["sequential"] * len(paths)
    return [PackedTokenLoader(p, T, 2, EOS, seed=seed) if k == "sequential"
            else RSDBLoader(p, T, 2, EOS, buffer_size=3, seed=seed) for p, k in zip(paths, kinds)]


def row_source(tokens):
    words = tokens[tokens != EOS]
    return int(words[0] // 10000) if words.size else -1


def test_weights_of_each_phase_are_followed(tmp_path):
    paths = source_files(tmp_path)
    phases = [(0, [0.6, 0.4, 0.0]), (4000 * T, [0.0, 1.0, 3.0])]
    mix = MixtureLoader(loaders(paths), phases, seed=1, batch_size=8)
    rows = [tokens for _ in range(1000) for tokens in mix.next_batch()[0]]
    first = np.bincount([row_source(r) for r in rows[:4000]], minlength=3) / 4000
    second = np.bincount([row_source(r) for r in rows[4000:]], minlength=3) / 4000
    assert abs(first[0] - 0.6) < 0.03 and abs(first[1] - 0.4) < 0.03 and first[2] == 0
    assert second[0] == 0 and abs(second[1] - 0.25) < 0.03 and abs(second[2] - 0.75) < 0.03
    assert mix.tokens_served == 8000 * T


def test_phase_switches_at_the_token_count_and_sources_keep_their_streams(tmp_path):
    paths = source_files(tmp_path, 2)
    mix = MixtureLoader(loaders(paths), [(0, [1, 0]), (5 * T, [0, 1])], seed=0, batch_size=3)
    tokens = np.concatenate([mix.next_batch()[0] for _ in range(4)])
    assert [row_source(r) for r in tokens] == [0] * 5 + [1] * 7
    # Each source's rows are exactly that loader's own stream.
    alone = loaders(paths)
    assert np.array_equal(tokens[:5], alone[0].next_rows(5)[0])
    assert np.array_equal(tokens[5:], alone[1].next_rows(7)[0])


def test_per_rank_streams_are_retired_and_phases_follow_the_global_rows(tmp_path):
    """One stream for every rank: the phase switches at the stream's tokens (rows × T), a mixture or a state for
    another rank is refused in one line, and a state of rank 0 of 1 (the stream as it was) continues."""
    paths = source_files(tmp_path, 2)
    mix = MixtureLoader(loaders(paths), [(0, [1, 0]), (4 * T, [0, 1])], seed=0, batch_size=2)
    picks = [row_source(r) for _ in range(3) for r in mix.next_batch()[0]]
    assert picks == [0, 0, 0, 0, 1, 1] and mix.tokens_served == 6 * T
    with pytest.raises(TypeError):  # the constructor has no rank any more
        MixtureLoader(loaders(paths), [(0, [1, 1])], rank=1, world_size=4)
    state = mix.state_dict()
    assert "rank" not in state and "world_size" not in state
    with pytest.raises(DataError, match=r"^loader state is for rank 1 of world_size 4: .*only rank 0 of 1 continues$"):
        MixtureLoader(loaders(paths), [(0, [1, 0]), (4 * T, [0, 1])]).load_state_dict({**state, "rank": 1,
                                                                                          "world_size": 4})
    fresh = MixtureLoader(loaders(paths), [(0, [1, 0]), (4 * T, [0, 1])], batch_size=2)
    fresh.load_state_dict({**state, "rank": 0, "world_size": 1})
    assert np.array_equal(fresh.next_batch()[0], mix.next_batch()[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), stops=st.lists(st.integers(0, 6), min_size=1, max_size=3),
       kinds=st.lists(st.sampled_from(["sequential", "rsdb"]), min_size=3, max_size=3),
       switch=st.integers(1, 40), batch=st.integers(1, 4))
def test_resume_continues_exactly(seed, stops, kinds, switch, batch):
    phases = [(0, [1.0, 2.0, 0.5]), (switch * T, [0.0, 1.0, 1.0])]
    with tempfile.TemporaryDirectory() as directory:
        paths = source_files(directory)
        reference = MixtureLoader(loaders(paths, kinds, seed), phases, seed=seed, batch_size=batch)
        expected = [reference.next_batch() for _ in range(sum(stops) + 5)]
        got, mix = [], MixtureLoader(loaders(paths, kinds, seed), phases, seed=seed, batch_size=batch)
        for stop in stops:
            got += [mix.next_batch() for _ in range(stop)]
            state = json.loads(json.dumps(mix.state_dict()))
            mix = MixtureLoader(loaders(paths, kinds, seed), phases, seed=seed, batch_size=batch)
            mix.load_state_dict(state)
            assert mix.state_dict() == state
        got += [mix.next_batch() for _ in range(len(expected) - len(got))]
    for (t1, d1), (t2, d2) in zip(expected, got, strict=True):
        assert np.array_equal(t1, t2) and np.array_equal(d1, d2)


@settings(max_examples=30, deadline=None)
@given(corpora=st.lists(loader_corpora(max_documents=8, max_length=20), min_size=2, max_size=3),
       kinds=st.lists(st.sampled_from(["sequential", "rsdb"]), min_size=3, max_size=3),
       weights=st.lists(st.floats(0.2, 1.0), min_size=6, max_size=6), switch=st.integers(0, 30),
       batch_size=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_each_source_gives_every_token_once_per_epoch_over_several_epochs(corpora, kinds, weights, switch,
                                                                            batch_size, seed):
    """Within a mixture each source keeps its own promise, over several of that source's epochs. A row's source
    shows in its tokens (source s holds ids s*100_000 + ...) and must be `choose(row)`. The rows a sequential source
    gave, flattened, are its documents whole, back to back, per epoch in the documented order (check_packed_epochs);
    for an RSDB source, after every batch the tokens it gave plus those unread in its buffer are exactly the
    documents its source handed out (check_rsdb_accounts). Run until every source has passed its third epoch."""
    epochs, n = 3, len(corpora)
    documents = [tagged_documents(lengths, s) for s, lengths in enumerate(corpora)]
    phases = [(0, weights[:n]), ((switch + 1) * T, weights[3:3 + n])]
    size = 1 + max((int(d.max()) for docs in documents for d in docs if d.size), default=EOS)
    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for s, docs in enumerate(documents):
            paths.append(os.path.join(directory, f"s{s}.bin"))
            write_token_file(paths[-1], docs, EOS)
        sources = [PackedTokenLoader(p, T, 2, EOS, seed=seed + s) if kinds[s] == "sequential" else
                   RSDBLoader(p, T, 2, EOS, buffer_size=1 + s, seed=seed + s) for s, p in enumerate(paths)]
        mix = MixtureLoader(sources, phases, seed=seed, batch_size=batch_size)
        given_rows = [[] for _ in range(n)]
        emitted = [np.zeros(size, np.int64) for _ in range(n)]
        per_pass = [sum(len(d) + 1 for d in docs) for docs in documents]

        def passed(s):
            state = sources[s].state_dict()
            if sources[s].kind == "sequential":
                return state["epoch"] >= epochs
            return state["src_epoch"] >= epochs and emitted[s].sum() >= epochs * per_pass[s]

        for _ in range(3000):  # far more than needed (a few hundred rows)
            if all(passed(s) for s in range(n)):
                break
            first = mix.rows_served
            tokens, _ = mix.next_batch()
            for r, row in enumerate(tokens):
                s = mix.choose(first + r)
                words = row[row != EOS]
                assert words.size == 0 or np.all(words // 100_000 == s), (first + r, s, row)
                given_rows[s].append(row)
                emitted[s] += token_counts(row, size)
            for s, src in enumerate(sources):
                if src.kind == "rsdb":
                    check_rsdb_accounts(src.state_dict(), emitted[s], documents[s], EOS)
        assert all(passed(s) for s in range(n))
    for s in range(n):
        if kinds[s] == "sequential":
            check_packed_epochs(np.concatenate(given_rows[s]).reshape(-1), documents[s], seed + s, epochs, EOS)


def test_errors(tmp_path):
    paths = source_files(tmp_path, 2)
    with pytest.raises(DataError, match="first phase must start at 0"):
        MixtureLoader(loaders(paths), [(5, [1, 1])])
    with pytest.raises(DataError, match="phase 0: needs 2 weight"):
        MixtureLoader(loaders(paths), [(0, [1])])
    with pytest.raises(DataError, match="not all 0"):
        MixtureLoader(loaders(paths), [(0, [0, 0])])
    with pytest.raises(DataError, match="phase starts must increase"):
        MixtureLoader(loaders(paths), [(0, [1, 0]), (0, [0, 1])])
    with pytest.raises(DataError, match="source 1: seq_len/eos_id"):
        MixtureLoader([PackedTokenLoader(paths[0], T, 2, EOS), PackedTokenLoader(paths[1], T + 1, 2, EOS)],
                      [(0, [1, 1])])
    mix = MixtureLoader(loaders(paths), [(0, [1, 1])], seed=0)
    mix.next_batch()
    state = mix.state_dict()
    with pytest.raises(DataError, match="another mixture: phases"):
        MixtureLoader(loaders(paths), [(0, [1, 2])], seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="another stream: seed"):
        MixtureLoader(loaders(paths), [(0, [1, 1])], seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="source 0: loader state is from another stream: seed"):
        MixtureLoader(loaders(paths, seed=3), [(0, [1, 1])], seed=0).load_state_dict(state)
