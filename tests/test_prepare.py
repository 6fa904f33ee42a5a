"""Tokenizers (reference/data/tokenizer.py) and `trinity data prepare` (reference/data/prepare.py, SPEC §10): bytes /
trained byte-level BPE / HF tokenizer.json, encode/decode round trips, undecodable files (strict: skipped and reported;
replace: kept), shards with document indexes read back as one stream by the loaders, determinism across workers."""

from __future__ import annotations

import functools
import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.cli.main import main as trinity_main
from trinity.reference.data.packing import PackedTokenLoader
from trinity.reference.data.prepare import PrepareError, find_files, prepare
from trinity.reference.data.rsdb import RSDBLoader
from trinity.reference.data.store import DataError, DocumentStore, write_token_file
from trinity.reference.data.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer, train_bpe

BAD_UTF8 = b"x = 1  # caf\xe9 in latin-1\n"
TEXTS = {
    "a.py": "def add(a, b):\n    return a + b\n",
    "pkg/b.py": "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "pkg/c.txt": "Grüße, 世界! Emoji 🙂 and tabs\tand\nnewlines\n",
    "pkg/deep/d.py": "import os\nprint(os.getcwd())  # <|endoftext|> and </s> are just text here\n",
    "pkg/empty.py": "",
}


def make_corpus(root, bad=True):
    for name, text in TEXTS.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    if bad:
        with open(os.path.join(root, "pkg", "bad.py"), "wb") as f:
            f.write(BAD_UTF8)
    return root


def documents_of(directory):
    """The documents of a prepared dataset, as token arrays without their EOS, in stored order."""
    store = DocumentStore(directory)
    return [np.asarray(store.read(i, 0, store.length(i) - 1), np.int64) for i in range(store.num_documents)]


def quiet(*args):
    pass


@functools.lru_cache(maxsize=None)
def small_bpe():
    directory = tempfile.mkdtemp()
    texts = list(TEXTS.values()) * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    return train_bpe(texts, 400, os.path.join(directory, "tokenizer.json"))


@functools.lru_cache(maxsize=None)
def hf_checkpoint_dir():
    """An HF-style checkpoint folder: tokenizer.json (byte-level BPE with <pad>, </s>) and config.json naming EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tempfile.mkdtemp()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<pad>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(TEXTS.values()) * 10, trainer=trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "afmoe", "eos_token_id": 1}, f)
    return directory


# ---- tokenizers ----------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(text=st.text())
def test_round_trip_bytes_and_bpe(text):
    for tok in (ByteTokenizer(), small_bpe()):
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_byte_tokenizer_facts():
    tok = load_tokenizer("bytes")
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("bytes", 257, 256)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([0x61, 0xFF, 256, 0x62]) == "a\ufffdb"  # invalid bytes replaced, EOS dropped


def test_load_tokenizer_sources(tmp_path):
    ckpt = hf_checkpoint_dir()
    by_dir, by_file = load_tokenizer(ckpt), load_tokenizer(os.path.join(ckpt, "tokenizer.json"))
    assert by_dir.kind == by_file.kind == "hf" and by_dir.eos_id == by_file.eos_id == 1
    assert by_dir.decode(by_dir.encode(TEXTS["pkg/c.txt"])) == TEXTS["pkg/c.txt"]
    # tokenizer_config.json naming eos_token, when config.json is absent
    other = tmp_path / "tc"
    other.mkdir()
    (other / "tokenizer.json").write_bytes(open(os.path.join(ckpt, "tokenizer.json"), "rb").read())
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    assert load_tokenizer(other).eos_id == 0
    assert load_tokenizer(other, eos_id=5).eos_id == 5
    bpe = small_bpe()
    assert bpe.kind == "bpe" and bpe.eos_id == 0 and bpe.token_to_id("<|endoftext|>") == 0
    with pytest.raises(FileNotFoundError, match="tokenizer source not found"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="neither a prepared dataset"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "junk.json")


# ---- prepare -------------------------------------------------------------------------------------------------
def test_strict_skips_and_reports_undecodable_files(tmp_path):
    corpus = make_corpus(tmp_path / "in")
    lines = []
    meta = prepare([corpus], tmp_path / "out", use_bytes=True, errors="strict", workers=1, progress=False,
                   log=lines.append)
    bad = str(corpus / "pkg" / "bad.py")
    assert [p["path"] for p in meta["undecodable"]] == [bad] and "0xe9" in meta["undecodable"][0]["reason"]
    assert meta["files"] == 6 and meta["documents"] == 5 and meta["replaced"] == []
    assert any("skipped 1 file(s) that are not valid UTF-8" in line and bad in line for line in lines)
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk["undecodable"] == meta["undecodable"]
    tok = load_tokenizer(tmp_path / "out")
    texts = [tok.decode(d) for d in documents_of(tmp_path / "out")]
    # files in walk order (a folder's files sorted, then its sub-folders sorted), the bad one left out
    order = ["a.py", "pkg/b.py", "pkg/bad.py", "pkg/c.txt", "pkg/empty.py", "pkg/deep/d.py"]
    assert find_files([corpus]) == [str(corpus / n) for n in order]
    assert texts == [TEXTS[n] for n in order if n != "pkg/bad.py"]
    assert meta["tokens"] == sum(len(t.encode()) + 1 for t in TEXTS.values())


def test_replace_keeps_undecodable_files_with_replacement_characters(tmp_path):
    corpus = make_corpus(tmp_path / "in")
    lines = []
    meta = prepare([corpus], tmp_path / "out", use_bytes=True, errors="replace", workers=1, progress=False,
                   log=lines.append)
    assert meta["undecodable"] == [] and [p["path"] for p in meta["replaced"]] == [str(corpus / "pkg" / "bad.py")]
    assert meta["documents"] == 6 and any("replacement characters" in line for line in lines)
    texts = [ByteTokenizer().decode(d) for d in documents_of(tmp_path / "out")]
    assert BAD_UTF8.decode("utf-8", errors="replace") in texts


def test_train_bpe_dataset_round_trips_every_file(tmp_path):
    corpus = make_corpus(tmp_path / "in", bad=False)
    meta = prepare([corpus], tmp_path / "out", train_bpe_vocab=300, workers=1, progress=False, log=quiet)
    assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["file"] == "tokenizer.json"
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path / "out")
    assert tok.kind == "bpe" and tok.eos_id == meta["eos_id"] and tok.vocab_size == meta["vocab_size"] <= 300
    docs = documents_of(tmp_path / "out")
    files = find_files([corpus])
    assert [tok.decode(d) for d in docs] == [open(p, encoding="utf-8").read() for p in files]
    assert all(tok.eos_id not in d for d in docs)  # "<|endoftext|>" in d.py is encoded as text
    assert meta["eos_in_text_dropped"] == 0


def test_hf_tokenizer_json_dataset(tmp_path):
    corpus = make_corpus(tmp_path / "in", bad=False)
    ckpt = hf_checkpoint_dir()
    meta = prepare([corpus], tmp_path / "out", tokenizer=os.path.join(ckpt, "tokenizer.json"), workers=1,
                   progress=False, log=quiet)
    assert meta["tokenizer"]["kind"] == "hf" and meta["eos_id"] == 1  # from config.json beside the source
    assert meta["tokenizer"]["source"] == os.path.join(ckpt, "tokenizer.json")
    tok = load_tokenizer(tmp_path / "out")
    assert tok.kind == "hf" and tok.eos_id == 1 and tok.path == str(tmp_path / "out" / "tokenizer.json")
    docs = documents_of(tmp_path / "out")
    assert [tok.decode(d) for d in docs] == [open(p, encoding="utf-8").read() for p in find_files([corpus])]
    assert all(1 not in d for d in docs)  # the literal "</s>" in d.py did not become the EOS id


def test_shards_index_and_loaders_read_the_directory_as_one_stream(tmp_path):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "in"
    corpus.mkdir()
    texts = ["".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(0, 80)))) for _ in range(40)]
    for i, t in enumerate(texts):
        (corpus / f"f{i:03d}.txt").write_text(t)
    meta = prepare([corpus], tmp_path / "out", use_bytes=True, shard_tokens=300, workers=1, progress=False,
                   log=quiet)
    assert len(meta["shards"]) > 3 and sum(s["num_documents"] for s in meta["shards"]) == 40
    for shard in meta["shards"]:
        idx = np.load(tmp_path / "out" / shard["index"], allow_pickle=False)
        tokens = np.fromfile(tmp_path / "out" / shard["tokens"], "<u4")
        assert idx.dtype == np.int64 and idx[0] == 0 and tokens.size == shard["num_tokens"]
        assert np.all(tokens[idx[1:] - 1] == 256) and tokens[-1] == 256
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["meta.json"] + [f for s in meta["shards"]
                                                                           for f in (s["tokens"], s["index"])])
    # The same documents in one flat file give the same loader streams, sequential and RSDB.
    flat = tmp_path / "flat.bin"
    write_token_file(flat, [list(t.encode()) for t in texts], 256)
    for make in (lambda p: PackedTokenLoader(p, 16, 3, seed=2, **({"eos_id": 256} if p == flat else {})),
                 lambda p: RSDBLoader(p, 16, 3, eos_id=256, buffer_size=4, seed=2)):
        a, b = make(tmp_path / "out"), make(flat)
        assert a.num_documents == b.num_documents == 40 and a.num_tokens == b.num_tokens
        for _ in range(30):
            (t1, d1), (t2, d2) = a.next_batch(), b.next_batch()
            assert np.array_equal(t1, t2) and np.array_equal(d1, d2)
    with pytest.raises(DataError, match="disagrees with"):
        PackedTokenLoader(tmp_path / "out", 16, 3, eos_id=0)
    with pytest.raises(DataError, match="needs eos_id"):
        PackedTokenLoader(flat, 16, 3)
    # Preparing again into the same folder with fewer shards removes the stale ones; an output folder inside the
    # input is not read.
    meta2 = prepare([tmp_path], tmp_path / "out", use_bytes=True, glob="*.txt", workers=1, progress=False, log=quiet)
    assert len(meta2["shards"]) == 1 and meta2["files"] == 40
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "shard_00000.bin", "shard_00000.idx.npy"]


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    corpus = make_corpus(tmp_path / "in")
    for w in (1, 2):
        prepare([corpus], tmp_path / f"out{w}", train_bpe_vocab=300, shard_tokens=40, workers=w, progress=False,
                log=quiet)
    names = sorted(os.listdir(tmp_path / "out1"))
    assert names == sorted(os.listdir(tmp_path / "out2"))
    for name in names:
        if name != "meta.json":
            assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name
    m1, m2 = (json.loads((tmp_path / f"out{w}" / "meta.json").read_text()) for w in (1, 2))
    for key in ("tokens", "documents", "shards", "undecodable", "tokenizer"):
        assert m1[key] == m2[key]


def test_cli_prepare_with_glob(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    assert trinity_main(["data", "prepare", str(corpus), "--out", str(out), "--glob", "*.py", "--bytes",
                         "--workers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "prepared 4 documents" in printed and "from 5 files" in printed and "not valid UTF-8" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"] == 5 and meta["glob"] == "*.py" and len(meta["undecodable"]) == 1
    assert trinity_main(["data", "prepare", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "input not found" in capsys.readouterr().err
    assert trinity_main(["data", "prepare", str(corpus), "--out", str(out), "--glob", "*.rs"]) == 2
    assert "no input files found" in capsys.readouterr().err


def test_prepare_errors(tmp_path):
    corpus = make_corpus(tmp_path / "in")
    with pytest.raises(PrepareError, match="choose one of"):
        prepare([corpus], tmp_path / "o", use_bytes=True, train_bpe_vocab=300, progress=False, log=quiet)
    with pytest.raises(PrepareError, match="errors must be"):
        prepare([corpus], tmp_path / "o", errors="ignore", progress=False, log=quiet)
    with pytest.raises(TokenizerError, match="vocab size must be an integer >= 258"):
        prepare([corpus], tmp_path / "o", train_bpe_vocab=10, workers=1, progress=False, log=quiet)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.py").write_bytes(BAD_UTF8)
    with pytest.raises(PrepareError, match="none of the 1 input files could be used"):
        prepare([only_bad], tmp_path / "o2", workers=1, progress=False, log=quiet)
    assert not os.path.exists(tmp_path / "o2" / "meta.json")


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_that_is_not_a_dataset_is_refused_before_anything_is_written(tmp_path, capsys):
    """--out onto an existing file, a non-empty folder that is not a prepared dataset, or a folder with a foreign
    meta.json: one line, exit 2, nothing written or removed. An empty folder, a prepared dataset and what an
    interrupted preparation leaves (shards, no meta.json) are prepared into as before."""
    corpus = make_corpus(tmp_path / "in", bad=False)
    args = ["data", "prepare", str(corpus), "--bytes", "--workers", "1", "--no-progress", "--out"]
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    user_dir = tmp_path / "docs"
    user_dir.mkdir()
    (user_dir / "a.md").write_text("mine")
    (user_dir / "shard_00000.bin").write_bytes(b"\0" * 8)  # a name we write, next to one we do not
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text('{"format": "something-else"}')
    for out, message in [(target, "exists and is a file"), (user_dir, r"is not empty and is not a prepared dataset "
                                                                     r"\(it holds a.md\)"),
                         (foreign, "holds a meta.json that is not a prepared dataset's")]:
        before = _snapshot(tmp_path)
        with pytest.raises(PrepareError, match=message):
            prepare([corpus], out, use_bytes=True, workers=1, progress=False, log=quiet)
        assert trinity_main(args + [str(out)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("trinity data: error: output ") and str(out) in err[0], err
        assert _snapshot(tmp_path) == before
    (tmp_path / "empty").mkdir()
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "shard_00003.bin").write_bytes(b"\0" * 8)
    (interrupted / "shard_00000.bin.tmp-123").write_bytes(b"\0" * 8)
    for out in (tmp_path / "empty", interrupted, interrupted):  # the last: a prepared dataset, prepared again
        assert trinity_main(args + [str(out)]) == 0
        assert json.loads((out / "meta.json").read_text())["documents"] == 5
    assert "shard_00003.bin" not in os.listdir(interrupted)


def test_synthetic_out_onto_a_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert trinity_main(["data", "synthetic", "--out", str(tmp_path / "d"), "--tokens", "100"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("trinity data: error: --out ") and "is a directory" in err[0]
    (tmp_path / "file").write_text("x")
    assert trinity_main(["data", "synthetic", "--out", str(tmp_path / "file" / "t.bin"), "--tokens", "100"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("trinity data: error: cannot write --out"), err
    assert (tmp_path / "file").read_text() == "x"
