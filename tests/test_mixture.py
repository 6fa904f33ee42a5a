"""Phase mixes (reference/mixture.py, SPEC §10): rows drawn from sources by the weights of the phase in force at the
tokens served, each source's own stream preserved, exact resume, and clear errors."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.reference.data import DataError, PackedTokenLoader, write_token_file
from trinity.reference.mixture import MixtureLoader
from trinity.reference.rsdb import RSDBLoader

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


def test_world_size_scales_tokens_served(tmp_path):
    paths = source_files(tmp_path, 2)
    srcs = [PackedTokenLoader(p, T, 2, EOS, rank=1, world_size=4) for p in paths]
    mix = MixtureLoader(srcs, [(0, [1, 0]), (8 * T, [0, 1])], seed=0, rank=1, world_size=4)
    picks = [row_source(r) for _ in range(3) for r in mix.next_batch()[0]]
    assert picks == [0, 0, 1, 1, 1, 1] and mix.tokens_served == 6 * T * 4  # phase 2 from global token 8*T


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
