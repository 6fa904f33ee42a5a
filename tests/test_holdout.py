"""The held-out split of `trinity data prepare --holdout FRACTION|N_DOCS` (reference/data/holdout.py, prepare.py,
SPEC §10): the split is a function of each file's content (SHA-256), whatever the input order, workers or
tokenizer; duplicates land on one side; the held-out set is a prepared dataset of its own in <out>/holdout; and no
loader over the training data ever reads a held-out document (the leak test)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest

from trinity.cli.main import main as trinity_main
from trinity.reference.data.holdout import HoldoutError, count_rule, fraction_rule, parse_holdout
from trinity.reference.data.mixture import MixtureLoader
from trinity.reference.data.packing import PackedTokenLoader
from trinity.reference.data.prepare import HOLDOUT_DIR, PrepareError, prepare
from trinity.reference.data.rsdb import RSDBLoader
from trinity.reference.data.store import DocumentStore
from trinity.reference.data.tokenizer import load_tokenizer

EOS = 256  # the bytes tokenizer's
MARKER = re.compile(rb"@([A-Z])(\d{5})@")
FILLER = "the quick brown fox jumps over the lazy dog while a small cat naps in warm sun".split()


def quiet(*args):
    pass


def marker(tag: str, i: int) -> str:
    return f"@{tag}{i:05d}@"


def make_corpus(root, n, tag="A", seed=0):
    """n distinct documents, each its marker four times between filler words (no digits, no '@', no newline):
    files root/d{i:04d}.txt. Returns {marker: text}."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    texts = {}
    for i in range(n):
        words = [FILLER[k] for k in rng.integers(0, len(FILLER), int(rng.integers(2, 12)))]
        m = marker(tag, i)
        text = f"{m} {' '.join(words[: len(words) // 2])} {m}{m} {' '.join(words[len(words) // 2:])} {m}"
        with open(os.path.join(root, f"d{i:04d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        texts[m] = text
    return texts


def sha_value(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")


def doc_texts(directory):
    """The documents of a prepared dataset, decoded with its own tokenizer, in stored order."""
    store, tok = DocumentStore(directory), load_tokenizer(directory)
    return [tok.decode(np.asarray(store.read(i, 0, store.length(i) - 1), np.int64))
            for i in range(store.num_documents)]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the rule --------------------------------------------------------------------------------------------------
def test_parse_holdout():
    assert parse_holdout("0.05").fraction == 0.05 and parse_holdout("5e-2").fraction == 0.05
    assert parse_holdout("500").documents == 500 and parse_holdout(3).documents == 3
    assert parse_holdout(0.25).fraction == 0.25
    for bad, message in [("0", ">= 1"), ("-3", ">= 1"), ("0.0", "strictly between"), ("1.0", "strictly between"),
                         ("1.5", "strictly between"), ("1e3", "strictly between"), ("abc", "not a number"),
                         ("nan", "not a number"), ("inf", "not a number"), ("", "not a number"),
                         (True, "must be a fraction"), (float("nan"), "strictly between")]:
        with pytest.raises(HoldoutError, match=message):
            parse_holdout(bad)


def test_rules_are_exact_at_their_bounds():
    """fraction: h < f·2**256 exactly; count: the n smallest and anything equal to the n-th."""
    rule = fraction_rule(0.5)
    assert rule.holds(((1 << 255) - 1).to_bytes(32, "big")) and not rule.holds((1 << 255).to_bytes(32, "big"))
    digests = [v.to_bytes(32, "big") for v in (9, 3, 7, 3, 5)]
    rule, count = count_rule(iter(digests), 2)
    assert count == 5 and [rule.holds(d) for d in digests] == [False, True, False, True, False]
    rule, _ = count_rule(iter(digests), 3)
    assert [rule.holds(d) for d in digests] == [False, True, False, True, True]


# ---- the split ---------------------------------------------------------------------------------------------------
def test_same_split_for_any_input_order_workers_and_tokenizer_and_duplicates_on_one_side(tmp_path):
    texts = make_corpus(tmp_path / "a", 30, "A")
    texts.update(make_corpus(tmp_path / "b", 30, "B", seed=1))
    dup = tmp_path / "dup"
    dup.mkdir()
    for i, m in enumerate(sorted(texts)[::2]):  # every other document twice more: byte-identical copies
        (dup / f"copy{i:03d}.txt").write_text(texts[m])
        (dup / f"again{i:03d}.txt").write_text(texts[m])
    f = 0.3
    runs = [([tmp_path / "a", tmp_path / "b", dup], {"workers": 1, "use_bytes": True}),
            ([dup, tmp_path / "b", tmp_path / "a"], {"workers": 2, "use_bytes": True}),
            ([tmp_path / "b", dup, tmp_path / "a"], {"workers": 1, "train_bpe_vocab": 300})]
    splits = []
    for k, (inputs, options) in enumerate(runs):
        out = tmp_path / f"out{k}"
        meta = prepare(inputs, out, holdout=f, progress=False, log=quiet, **options)
        held, train = doc_texts(out / HOLDOUT_DIR), doc_texts(out)
        assert meta["holdout"]["documents"] == len(held) and meta["documents"] == len(train)
        assert len(held) + len(train) == 120
        splits.append((sorted(held), sorted(train)))
    assert splits[0] == splits[1] == splits[2]
    held, train = splits[0]
    assert not set(held) & set(train)  # a duplicate never lands on both sides
    assert set(held) == {t for t in texts.values() if sha_value(t) / 2**256 < f}  # the documented rule
    duplicated = {texts[m] for m in sorted(texts)[::2]}
    assert any(held.count(t) == 3 for t in duplicated) and any(train.count(t) == 3 for t in duplicated)


def test_fraction_is_roughly_right_and_the_counts_add_up(tmp_path):
    make_corpus(tmp_path / "in", 400)
    meta = prepare([tmp_path / "in"], tmp_path / "out", use_bytes=True, holdout=0.2, workers=1, progress=False,
                   log=quiet)
    held, train = DocumentStore(tmp_path / "out" / HOLDOUT_DIR), DocumentStore(tmp_path / "out")
    assert 55 <= held.num_documents <= 105  # 80 expected, sd 8
    record = meta["holdout"]
    assert record == {"path": "holdout", "rule": "sha256-of-content", "fraction": 0.2,
                      "documents": held.num_documents, "tokens": held.num_tokens}
    assert meta["documents"] == train.num_documents == 400 - held.num_documents
    assert meta["tokens"] == train.num_tokens and meta["files"] == 400
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["holdout"] == record


def test_a_number_of_documents_is_exact_plus_duplicates(tmp_path):
    texts = make_corpus(tmp_path / "in", 50)
    lines = []
    meta = prepare([tmp_path / "in"], tmp_path / "out", use_bytes=True, holdout="7", workers=1, progress=False,
                   log=lines.append)
    smallest = sorted(texts.values(), key=sha_value)[:7]
    assert sorted(doc_texts(tmp_path / "out" / HOLDOUT_DIR)) == sorted(smallest)
    assert meta["holdout"]["asked_documents"] == 7 and meta["holdout"]["documents"] == 7
    assert meta["documents"] == 43 and "held out 7 documents" in lines[0] and "duplicate" not in lines[0]
    # Two copies of the 7th smallest: held out with it, and the summary says so.
    (tmp_path / "in" / "z1.txt").write_text(smallest[-1])
    (tmp_path / "in" / "z2.txt").write_text(smallest[-1])
    lines.clear()
    meta = prepare([tmp_path / "in"], tmp_path / "out", use_bytes=True, holdout=7, workers=1, progress=False,
                   log=lines.append)
    assert meta["holdout"]["documents"] == 9 and meta["documents"] == 43
    assert "held out 9 documents" in lines[0] and "plus 2 exact duplicate(s)" in lines[0]


def test_the_held_out_set_is_a_prepared_dataset_of_the_held_out_files(tmp_path):
    """Its own meta.json, shards, index and tokenizer.json copy; DocumentStore and the tokenizer open it, and its
    documents are exactly the held-out files' tokens, in input order."""
    texts = make_corpus(tmp_path / "in", 40)
    files = sorted((tmp_path / "in").iterdir())
    out = tmp_path / "out"
    meta = prepare([tmp_path / "in"], out, train_bpe_vocab=320, holdout=0.25, shard_tokens=64, workers=1,
                   progress=False, log=quiet)
    hold = out / HOLDOUT_DIR
    hmeta = json.loads((hold / "meta.json").read_text())
    assert hmeta["format"] == meta["format"] and hmeta["tokenizer"] == meta["tokenizer"]
    assert hmeta["held_out_by"] == {"rule": "sha256-of-content", "fraction": 0.25} and "holdout" not in hmeta
    assert (hold / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert len(hmeta["shards"]) > 1 and sorted(os.listdir(hold)) == sorted(
        ["meta.json", "tokenizer.json"] + [f for s in hmeta["shards"] for f in (s["tokens"], s["index"])])
    tok = load_tokenizer(out)
    expect = [p.read_text() for p in files if sha_value(p.read_text()) / 2**256 < 0.25]
    store = DocumentStore(hold)
    assert store.num_documents == hmeta["documents"] == len(expect) and store.num_tokens == hmeta["tokens"]
    for i, text in enumerate(expect):
        assert np.array_equal(store.read(i, 0, store.length(i)), tok.encode(text) + [tok.eos_id])
    assert sorted(doc_texts(out)) == sorted(set(texts.values()) - set(expect))


# ---- the leak test (acceptance) ------------------------------------------------------------------------------------
def pieces(tokens, doc_ids):
    """Each row cut where its doc id changes: contiguous runs of one document, as bytes (EOS as b'\\n')."""
    out = []
    for row, ids in zip(np.asarray(tokens), np.asarray(doc_ids)):
        cuts = np.flatnonzero(np.diff(ids)) + 1
        for part in np.split(np.where(row == EOS, 10, row), cuts):
            out.append(part.astype(np.uint8).tobytes())
    return out


def read_stream(loader, rows, keep_splits=None):
    """`rows` rows of the loader's stream as pieces; with keep_splits, each step of 8 rows is read as the kept
    slices of several ranks (next_rows(8, keep)), as a data-parallel run reads it."""
    out = []
    for _ in range(rows // 8):
        if keep_splits is None:
            out += pieces(*loader.next_rows(8))
        else:
            state = loader.state_dict()
            for a, b in keep_splits:  # every rank replays the step from the same state and keeps its rows
                loader.load_state_dict(state)
                out += pieces(*loader.next_rows(8, keep=slice(a, b)))
    return out


def check_no_leak(stream_pieces, train_texts, held_texts):
    """No held-out marker in any piece, every piece a run of some training document, every training marker seen."""
    corpus = "".join(t + "\n" for t in train_texts).encode()
    seen = set()
    for piece in stream_pieces:
        assert piece in corpus, piece  # a piece of a held-out document is no substring of the training text
        seen.update(m.group(0).decode() for m in MARKER.finditer(piece))
    held_markers = {m.group(0).decode() for t in held_texts for m in MARKER.finditer(t.encode())}
    train_markers = {m.group(0).decode() for t in train_texts for m in MARKER.finditer(t.encode())}
    assert not seen & held_markers
    assert seen == train_markers


def test_no_loader_ever_reads_a_held_out_document(tmp_path):
    corpora = {}
    for tag in "AB":
        texts = make_corpus(tmp_path / f"in{tag}", 60, tag, seed=ord(tag))
        out = tmp_path / f"out{tag}"
        meta = prepare([tmp_path / f"in{tag}"], out, use_bytes=True, holdout=0.25, workers=1, progress=False,
                       log=quiet)
        held = doc_texts(out / HOLDOUT_DIR)
        train = [t for t in texts.values() if t not in held]
        assert 0 < len(held) < 60 and set(held) <= set(texts.values())
        assert DocumentStore(out).num_documents + meta["holdout"]["documents"] == 60  # training + held out = inputs
        corpora[tag] = (out, train, held)
    out, train, held = corpora["A"]
    tokens = sum(len(t) + 1 for t in train)
    rows = 3 * tokens // 32 // 8 * 8  # about three epochs of 32-token rows
    check_no_leak(read_stream(PackedTokenLoader(out, 32, 8, seed=1), rows), train, held)
    check_no_leak(read_stream(PackedTokenLoader(out, 32, 8, seed=2), rows, [(0, 3), (3, 3), (3, 8)]), train, held)
    check_no_leak(read_stream(RSDBLoader(out, 32, 8, buffer_size=8, seed=3), rows), train, held)
    check_no_leak(read_stream(RSDBLoader(out, 32, 8, buffer_size=8, seed=4), rows, [(0, 5), (5, 8)]), train, held)

    def mixture(seed):
        sources = [PackedTokenLoader(corpora["A"][0], 32, 8, seed=seed),
                   RSDBLoader(corpora["B"][0], 32, 8, buffer_size=8, seed=seed)]
        return MixtureLoader(sources, [(0, [0.5, 0.5])], seed=seed)

    both_train, both_held = corpora["A"][1] + corpora["B"][1], corpora["A"][2] + corpora["B"][2]
    check_no_leak(read_stream(mixture(5), 2 * rows), both_train, both_held)
    check_no_leak(read_stream(mixture(6), 2 * rows, [(0, 2), (2, 7), (7, 8)]), both_train, both_held)


# ---- the output directory ------------------------------------------------------------------------------------------
def test_preparing_again_rewrites_or_removes_the_held_out_set(tmp_path):
    make_corpus(tmp_path / "in", 40)
    out = tmp_path / "out"
    first = prepare([tmp_path / "in"], out, use_bytes=True, holdout=0.5, shard_tokens=100, workers=1,
                    progress=False, log=quiet)
    assert len(json.loads((out / HOLDOUT_DIR / "meta.json").read_text())["shards"]) > 2
    second = prepare([tmp_path / "in"], out, use_bytes=True, holdout=3, workers=1, progress=False, log=quiet)
    hmeta = json.loads((out / HOLDOUT_DIR / "meta.json").read_text())
    assert second["holdout"]["documents"] == hmeta["documents"] == 3 != first["holdout"]["documents"]
    assert sorted(os.listdir(out / HOLDOUT_DIR)) == ["meta.json", "shard_00000.bin", "shard_00000.idx.npy"]
    assert DocumentStore(out).num_documents == 37
    third = prepare([tmp_path / "in"], out, use_bytes=True, workers=1, progress=False, log=quiet)
    assert not os.path.lexists(out / HOLDOUT_DIR) and "holdout" not in third and third["documents"] == 40
    # What an interrupted preparation leaves (a holdout/ with shards and no meta.json) is prepared into.
    (out / HOLDOUT_DIR).mkdir()
    (out / HOLDOUT_DIR / "shard_00007.bin").write_bytes(b"\0" * 8)
    prepare([tmp_path / "in"], out, use_bytes=True, holdout=0.5, workers=1, progress=False, log=quiet)
    assert "shard_00007.bin" not in os.listdir(out / HOLDOUT_DIR)


def test_a_holdout_folder_that_is_not_ours_is_refused_before_anything_is_written(tmp_path, capsys):
    make_corpus(tmp_path / "in", 20)
    elsewhere = tmp_path / "elsewhere"
    make_corpus(elsewhere, 3, "Z")
    cases = {}
    for name, plant in [("foreign", lambda h: (h.mkdir(), (h / "notes.md").write_text("mine"))),
                        ("nested", lambda h: (h.mkdir(), (h / HOLDOUT_DIR).mkdir())),
                        ("badmeta", lambda h: (h.mkdir(), (h / "meta.json").write_text('{"format": "x"}'))),
                        ("file", lambda h: h.write_text("a file")),
                        ("link", lambda h: h.symlink_to(elsewhere, target_is_directory=True))]:
        out = tmp_path / name
        prepare([tmp_path / "in"], out, use_bytes=True, holdout=0.5, workers=1, progress=False, log=quiet)
        shutil.rmtree(out / HOLDOUT_DIR)
        plant(out / HOLDOUT_DIR)
        cases[name] = out
    for name, out in cases.items():
        for holdout in (None, "0.5"):
            before = snapshot(tmp_path)
            with pytest.raises(PrepareError, match=f"output directory {re.escape(str(out))} holds a {HOLDOUT_DIR}"):
                prepare([tmp_path / "in"], out, use_bytes=True, holdout=holdout, workers=1, progress=False,
                        log=quiet)
            argv = ["data", "prepare", str(tmp_path / "in"), "--out", str(out), "--bytes", "--workers", "1",
                    "--no-progress"] + (["--holdout", holdout] if holdout else [])
            assert trinity_main(argv) == 2, name
            err = capsys.readouterr().err.splitlines()
            assert len(err) == 1 and err[0].startswith("trinity data: error: output directory "), err
            assert snapshot(tmp_path) == before, name
    assert (elsewhere / "d0000.txt").is_file() and not (elsewhere / "meta.json").exists()


def test_cli_holdout_summary_and_one_line_errors(tmp_path, capsys):
    make_corpus(tmp_path / "in", 12)
    out = tmp_path / "out"
    base = ["data", "prepare", str(tmp_path / "in"), "--bytes", "--workers", "1", "--no-progress", "--out"]
    assert trinity_main(base + [str(out), "--holdout", "4"]) == 0
    printed = capsys.readouterr().out
    assert "prepared 8 documents" in printed and "held out 4 documents" in printed
    assert str(out / HOLDOUT_DIR) in printed
    for value, message in [("0", ">= 1"), ("-2", ">= 1"), ("1.0", "strictly between 0 and 1"),
                           ("2.5", "strictly between 0 and 1"), ("ten", "not a number"),
                           ("12", "only 12 usable document"), ("40", "only 12 usable document"),
                           ("1e-9", "holds out none of the 12"), ("0.9999999", "holds out all of the 12")]:
        target = tmp_path / f"o_{value}"
        assert trinity_main(base + [str(target), "--holdout", value]) == 2, value
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("trinity data: error: --holdout ") and message in err[0], err
        assert not target.exists()  # refused before anything is written


def test_a_trained_bpe_never_sees_held_out_text(tmp_path):
    """One document is a long unique word ("qxvqxv...") that a BPE trained on it learns as merges; held out (it
    has the smallest hash, so --holdout 1 picks it), no token of the trained vocabulary holds "qx"."""
    corpus = tmp_path / "in"
    make_corpus(corpus, 30)
    others = [sha_value(p.read_text()) for p in corpus.iterdir()]
    special = next(t for t in (("qxv" * 40 + " ") * k for k in range(1, 2000)) if sha_value(t) < min(others))
    (corpus / "special.txt").write_text(special)

    def vocab(out):
        return json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]

    prepare([corpus], tmp_path / "all", train_bpe_vocab=300, workers=1, progress=False, log=quiet)
    assert any("qx" in token for token in vocab(tmp_path / "all"))  # the control: seen, it becomes merges
    meta = prepare([corpus], tmp_path / "out", train_bpe_vocab=300, holdout=1, workers=1, progress=False,
                   log=quiet)
    assert meta["holdout"]["documents"] == 1 and doc_texts(tmp_path / "out" / HOLDOUT_DIR) == [special]
    assert not any("qx" in token for token in vocab(tmp_path / "out"))
    assert special not in doc_texts(tmp_path / "out")
