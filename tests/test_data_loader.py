"""The packed token loader (reference/data/packing.py, SPEC §10): determinism, every document token exactly once per
epoch in document order, exact resume from state_dict, and clear errors for bad files and settings."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.reference.data.packing import PackedTokenLoader, document_ids
from trinity.reference.data.store import DataError, write_token_file

from strategies import check_packed_epochs, loader_corpora, tagged_documents

EOS = 0


def make_documents(lengths):
    """Documents whose tokens tell where they came from: doc i token j is 1 + (i * 1000 + j) (never EOS)."""
    return [np.arange(n, dtype=np.int64) + 1 + i * 1000 for i, n in enumerate(lengths)]


def expected_stream(documents, seed, epochs):
    """The reference stream: per epoch, the documents in default_rng([seed, epoch]) order, each followed by EOS."""
    parts = []
    for epoch in range(epochs):
        for d in np.random.default_rng([seed, epoch]).permutation(len(documents)):
            parts += [documents[d], [EOS]]
    return np.concatenate(parts).astype(np.int64)


def loader_for(directory, documents, seq_len, batch_size, seed=0):
    path = os.path.join(directory, "tokens.bin")
    write_token_file(path, documents, EOS)
    return PackedTokenLoader(path, seq_len=seq_len, batch_size=batch_size, eos_id=EOS, seed=seed)


doc_lengths = st.lists(st.one_of(st.integers(0, 3), st.integers(0, 40)), min_size=1, max_size=12)


@settings(max_examples=40)
@given(lengths=doc_lengths, seq_len=st.integers(1, 17), batch_size=st.integers(1, 4), seed=st.integers(0, 2**32))
def test_every_token_once_per_epoch_in_document_order(lengths, seq_len, batch_size, seed):
    documents = make_documents(lengths)
    total = sum(lengths) + len(lengths)
    with tempfile.TemporaryDirectory() as directory:
        loader = loader_for(directory, documents, seq_len, batch_size, seed)
        assert loader.num_documents == len(lengths) and loader.num_tokens == total
        need = 3 * total + seq_len * batch_size  # a bit more than three epochs
        batches = [loader.next_batch() for _ in range(-(-need // (seq_len * batch_size)))]
    for tokens, doc_ids in batches:
        assert tokens.shape == doc_ids.shape == (batch_size, seq_len)
        assert tokens.dtype == doc_ids.dtype == np.int64
        assert np.array_equal(doc_ids, document_ids(tokens, EOS))
    stream = np.concatenate([t.reshape(-1) for t, _ in batches])
    assert np.array_equal(stream, expected_stream(documents, seed, stream.size // total + 1)[: stream.size])
    # Independently of the reference stream: each epoch's slice splits at EOS into exactly the documents, once each.
    for epoch in range(3):
        chunk = stream[epoch * total:(epoch + 1) * total]
        assert chunk[-1] == EOS
        found = np.split(chunk, np.flatnonzero(chunk == EOS) + 1)[:-1]
        assert sorted(tuple(d[:-1]) for d in found) == sorted(tuple(d) for d in documents)


@settings(max_examples=40, deadline=None)
@given(lengths=loader_corpora(), seq_len=st.integers(1, 17), batch_size=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1), epochs=st.integers(2, 4))
def test_every_epoch_exactly_once(lengths, seq_len, batch_size, seed, epochs):
    """Over several epochs: the packed rows, flattened, are the documents whole and back to back (no padding, no gap:
    tails carried into the next row and the next epoch); split at EOS they come N per epoch in the documented order,
    every document exactly once (`strategies.check_packed_epochs`). Epochs after the first are checked as strictly
    as the first: a loader that skipped or repeated a document when it starts a new epoch fails here."""
    documents = tagged_documents(lengths)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "tokens.bin")
        write_token_file(path, documents, EOS)
        loader = PackedTokenLoader(path, seq_len, batch_size, EOS, seed=seed)
        parts, eos_seen = [], 0
        while eos_seen < epochs * len(documents):  # until `epochs` epochs are out (their documents, at least)
            tokens, doc_ids = loader.next_batch()
            assert np.array_equal(doc_ids, document_ids(tokens, EOS))
            parts.append(tokens.reshape(-1))
            eos_seen += int(np.count_nonzero(parts[-1] == EOS))
    check_packed_epochs(np.concatenate(parts), documents, seed, epochs, EOS)


def test_deterministic_from_seed_and_seed_changes_order(tmp_path):
    documents = make_documents([5, 9, 1, 0, 30, 4, 7, 12])
    a = loader_for(tmp_path, documents, 8, 2, seed=3)
    b = PackedTokenLoader(a.path, 8, 2, EOS, seed=3)
    c = PackedTokenLoader(a.path, 8, 2, EOS, seed=4)
    first_a = [a.next_batch()[0] for _ in range(10)]
    assert all(np.array_equal(x, b.next_batch()[0]) for x in first_a)
    assert not all(np.array_equal(x, c.next_batch()[0]) for x in first_a)
    assert a.batches_served == 10 and a.epoch >= 1


def test_doc_ids_restart_per_row_and_tail_is_carried(tmp_path):
    # One epoch order is fixed by a single document: [1..10, EOS] repeated; rows of 4 tokens.
    loader = loader_for(tmp_path, [np.arange(1, 11)], seq_len=4, batch_size=3)
    tokens, doc_ids = loader.next_batch()
    assert tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 1]]
    assert doc_ids.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["doc_offset"] == 1


@settings(max_examples=40)
@given(lengths=doc_lengths, seq_len=st.integers(1, 13), batch_size=st.integers(1, 3), seed=st.integers(0, 100),
       stops=st.lists(st.integers(0, 12), min_size=1, max_size=3))
def test_resume_continues_exactly(lengths, seq_len, batch_size, seed, stops):
    documents = make_documents(lengths)
    with tempfile.TemporaryDirectory() as directory:
        reference = loader_for(directory, documents, seq_len, batch_size, seed)
        expected = [reference.next_batch() for _ in range(sum(stops) + 6)]
        got, loader = [], PackedTokenLoader(reference.path, seq_len, batch_size, EOS, seed=seed)
        for stop in stops:  # run, save, drop the loader, build a fresh one, resume; several times
            got += [loader.next_batch() for _ in range(stop)]
            state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
            assert state["batches_served"] == len(got)
            loader = PackedTokenLoader(reference.path, seq_len, batch_size, EOS, seed=seed)
            loader.load_state_dict(state)
            assert loader.state_dict() == state
        got += [loader.next_batch() for _ in range(len(expected) - len(got))]
    for (t1, d1), (t2, d2) in zip(expected, got, strict=True):
        assert np.array_equal(t1, t2) and np.array_equal(d1, d2)


def test_resume_with_another_batch_size_continues_the_stream(tmp_path):
    documents = make_documents([3, 17, 0, 8, 25])
    a = loader_for(tmp_path, documents, 6, 2, seed=1)
    stream = np.concatenate([a.next_batch()[0].reshape(-1) for _ in range(9)])
    b = PackedTokenLoader(a.path, 6, 2, EOS, seed=1)
    b.next_batch()
    c = PackedTokenLoader(a.path, 4, 3, EOS, seed=1)
    c.load_state_dict(b.state_dict())
    rest = np.concatenate([c.next_batch()[0].reshape(-1) for _ in range(6)])
    assert np.array_equal(rest, stream[12:12 + rest.size])


def test_load_state_dict_errors(tmp_path):
    loader = loader_for(tmp_path, make_documents([4, 6]), 4, 1, seed=0)
    state = loader.state_dict()
    other = PackedTokenLoader(loader.path, 4, 1, EOS, seed=5)
    with pytest.raises(DataError, match="another stream: seed 0 != 5"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match=r"lacks \['doc_offset'\]"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "doc_offset"})
    with pytest.raises(DataError, match="doc_cursor 2 is out of range"):
        loader.load_state_dict({**state, "doc_cursor": 2})
    with pytest.raises(DataError, match="doc_offset 99 is out of range"):
        loader.load_state_dict({**state, "doc_offset": 99})
    with pytest.raises(DataError, match="non-negative integers"):
        loader.load_state_dict({**state, "epoch": -1})
    write_token_file(loader.path, make_documents([4, 7]), EOS)
    with pytest.raises(DataError, match="num_tokens 12 != 13"):
        PackedTokenLoader(loader.path, 4, 1, EOS).load_state_dict(state)


def test_file_and_setting_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="token file not found: .*nope.bin"):
        PackedTokenLoader(tmp_path / "nope.bin", 4, 1, EOS)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="odd.bin: size 10 bytes is not a multiple of 4"):
        PackedTokenLoader(odd, 4, 1, EOS)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.bin: the token file holds no tokens"):
        PackedTokenLoader(empty, 4, 1, EOS)
    no_eos = tmp_path / "noeos.bin"
    no_eos.write_bytes(np.array([0, 5, 6], "<u4").tobytes())
    with pytest.raises(DataError, match="must end with eos_id 0; its last 2 token"):
        PackedTokenLoader(no_eos, 4, 1, EOS)
    good = tmp_path / "good.bin"
    write_token_file(good, [[1, 2]], EOS)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DataError, match="seq_len must be an integer >= 1"):
            PackedTokenLoader(good, bad, 1, EOS)
    with pytest.raises(DataError, match="batch_size must be an integer >= 1"):
        PackedTokenLoader(good, 4, 0, EOS)
    with pytest.raises(DataError, match="eos_id"):
        PackedTokenLoader(good, 4, 1, 2**32)


def test_write_token_file(tmp_path):
    path = tmp_path / "t.bin"
    assert write_token_file(path, [[5, 6], [], np.array([2**32 - 1], np.uint64)], eos_id=7) == 6
    assert np.fromfile(path, "<u4").tolist() == [5, 6, 7, 7, 2**32 - 1, 7]
    assert os.listdir(tmp_path) == ["t.bin"]
    with pytest.raises(DataError, match="document 1 contains eos_id 7 at position 1"):
        write_token_file(path, [[1], [3, 7]], eos_id=7)
    with pytest.raises(DataError, match=r"document 0: token ids must lie in \[0, 2\*\*32\)"):
        write_token_file(path, [[-1]], eos_id=7)
    with pytest.raises(DataError, match="document 0: expected a 1-d sequence of integers"):
        write_token_file(path, [[1.5]], eos_id=7)
    # A failed write leaves the previous file intact and no temp file behind.
    assert np.fromfile(path, "<u4").tolist() == [5, 6, 7, 7, 2**32 - 1, 7] and os.listdir(tmp_path) == ["t.bin"]


def test_per_rank_streams_are_retired(tmp_path):
    """Loaders no longer stride documents by rank (every rank reads the one stream, packing.py): a loader for another
    rank, or a state one wrote, is refused in one line; a state of rank 0 of 1 (the same stream) continues."""
    loader = loader_for(tmp_path, make_documents([4, 6, 3]), 4, 1, seed=2)
    with pytest.raises(TypeError):  # the constructor has no rank any more
        PackedTokenLoader(loader.path, 4, 1, EOS, rank=1, world_size=3)
    loader.next_batch()
    state = loader.state_dict()
    assert "rank" not in state and "world_size" not in state
    fresh = PackedTokenLoader(loader.path, 4, 1, EOS, seed=2)
    for old in ({**state, "rank": 1, "world_size": 2}, {**state, "rank": 0, "world_size": 2}):
        with pytest.raises(DataError, match=r"^loader state is for rank \d of world_size 2: [^\n]*only rank 0 of 1 "
                                            r"continues$"):
            fresh.load_state_dict(old)
    fresh.load_state_dict({**state, "rank": 0, "world_size": 1})
    assert fresh.state_dict() == state
    assert np.array_equal(fresh.next_batch()[0], loader.next_batch()[0])


def test_state_written_before_ranks_existed_still_loads(tmp_path):
    loader = loader_for(tmp_path, make_documents([4, 6, 3]), 4, 1, seed=2)
    loader.next_batch()
    old = {k: v for k, v in loader.state_dict().items() if k != "kind"}
    fresh = PackedTokenLoader(loader.path, 4, 1, EOS, seed=2)
    fresh.load_state_dict(old)
    assert np.array_equal(fresh.next_batch()[0], loader.next_batch()[0])
    with pytest.raises(DataError, match="from a 'rsdb' loader"):
        fresh.load_state_dict({**old, "kind": "rsdb"})


# ---- the run file's [data] section and the trainer's loader --------------------------------------------------
RUN = """
[model]
preset = "tiny"
[model.overrides]
vocab_size = 300
intra_document_mask = true
[data]
seq_len = 16
micro_batch_size = 2
{data}
[train]
steps = 2
sequences_per_step = 4
[checkpoint]
dir = "ckpt"
[logging]
metrics = "metrics.jsonl"
progress = false
"""


def _prepared(tmp_path, name, texts):
    from trinity.reference.data.prepare import prepare

    folder = tmp_path / f"{name}_in"
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text)
    prepare([folder], tmp_path / name, use_bytes=True, workers=1, progress=False, log=lambda *a: None)
    return name


def test_run_file_data_section_builds_each_loader(tmp_path):
    from trinity.run.run_config import RunConfigError, load_run_config
    from trinity.run.trainer import Trainer, build_loader
    from trinity.reference.data.mixture import MixtureLoader
    from trinity.reference.data.rsdb import RSDBLoader

    rng = np.random.default_rng(0)
    texts = ["".join(chr(c) for c in rng.integers(97, 123, int(n))) for n in rng.integers(1, 90, 30)]
    web, code = _prepared(tmp_path, "web", texts), _prepared(tmp_path, "code", texts[::-1])
    write_token_file(tmp_path / "flat.bin", make_documents([5, 7, 3]), EOS)

    def run(data):
        path = tmp_path / "run.toml"
        path.write_text(RUN.format(data=data))
        return load_run_config(path)

    r = run('path = "flat.bin"\neos_id = 0')  # the existing keys keep working
    assert (r.data_loader, r.rsdb_buffer, r.data_sources, r.eos_id) == ("sequential", 1024, (), 0)
    assert isinstance(build_loader(r)[0], PackedTokenLoader)
    r = run(f'path = "{web}"\nloader = "rsdb"\nrsdb_buffer = 4')
    loader, stores = build_loader(r)
    assert isinstance(loader, RSDBLoader) and loader.capacity == 8 and loader.eos_id == 256 and r.eos_id is None
    trainer = Trainer(r, log=lambda *a: None)
    metrics = trainer.train_step()
    assert "batch_het" in metrics and trainer.loader.batches_served == 2
    r = run(f'phases = [[0, [1, 0]], [64, [0.5, 0.5]]]\n[[data.sources]]\npath = "{web}"\n'
            f'[[data.sources]]\npath = "{code}"')
    loader, stores = build_loader(r)
    assert isinstance(loader, MixtureLoader) and len(stores) == 2
    assert r.data_phases == ((0, (1.0, 0.0)), (64, (0.5, 0.5)))
    r = run(f'[[data.sources]]\npath = "{web}"\nweight = 3\n[[data.sources]]\npath = "{code}"')
    assert r.data_phases == ((0, (3.0, 1.0)),)
    trainer = Trainer(r, log=lambda *a: None)
    trainer.train_step()
    trainer.save()
    resumed = Trainer(r, resume=True, log=lambda *a: None)
    assert resumed.loader.state_dict() == trainer.loader.state_dict()
    for data, message in [
        ('path = "flat.bin"\neos_id = 0\nshuffle = true', r"\[data\] unknown key\(s\): shuffle"),
        ('path = "flat.bin"\neos_id = 0\nloader = "random"', r'\[data\] loader = .random.: must be "sequential"'),
        ('path = "flat.bin"\neos_id = 0\nrsdb_buffer = 8', r'rsdb_buffer needs loader = "rsdb"'),
        (f'path = "{web}"\n[[data.sources]]\npath = "{code}"', "exclude each other"),
        (f'phases = [[0, [1]]]\n[[data.sources]]\npath = "{web}"\n[[data.sources]]\npath = "{code}"',
         r"phases entries must be \[start_tokens, \[2 weight"),
        (f'phases = [[5, [1]]]\n[[data.sources]]\npath = "{web}"', "start with a phase at 0"),
        (f'phases = [[0, [1]]]\n[[data.sources]]\npath = "{web}"\nweight = 2', "not both"),
        (f'[[data.sources]]\npath = "{web}"\nmix = 1', r"\[data.sources.0\] unknown key\(s\): mix"),
        ('phases = [[0, [1]]]\npath = "flat.bin"', "phases needs"),
    ]:
        with pytest.raises(RunConfigError, match=message):
            run(data)
    with pytest.raises(RunConfigError, match="a flat token file needs eos_id"):
        build_loader(run('path = "flat.bin"'))
    with pytest.raises(RunConfigError, match="no such file or directory"):
        build_loader(run('path = "nope"'))
    with pytest.raises(RunConfigError, match="disagrees with"):
        build_loader(run(f'path = "{web}"\neos_id = 3'))
