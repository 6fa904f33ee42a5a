"""Evaluation during training ([eval]): eval lines in the metrics, a training stream it never changes, the same
schedule after a resume, per-source losses for a mixture, the same eval loss under a layout, and errors that name
the key.

- Bitwise: a run that evaluates after every step ends with the same params, optimizer and balancing state, data
  position and RNG as one that never evaluates, bit for bit, and its step lines are the same but for timings; in one
  process and on virtual ranks under a layout.
- A run stopped after step 3 (SIGTERM) and resumed writes the same eval lines at the same steps as one that ran
  through, and its metrics file holds exactly the uninterrupted run's lines.
- Under a layout the eval lines equal the single process's to 1e-10 relative (float64).
"""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from markov_files import train_and_held_files
from trinity.distributed.layout import Layout
from trinity.reference.data.prepare import prepare
from trinity.reference.training.checkpoint import load_checkpoint
from trinity.run.run_config import RunConfigError, load_run_config
from trinity.run.trainer import Trainer
from trinity.simulate.virtual.virtual_comm import VirtualCluster

RUN = """
[model]
preset = "tiny"
dtype = "float64"
[model.overrides]
sliding_window = 8
{overrides}
[data]
seq_len = 32
micro_batch_size = {mbs}
{data}
[train]
steps = {steps}
sequences_per_step = 4
[optimizer]
muon_lr = 0.02
adamw_lr = 0.01
[schedule]
warmup_steps = 1
[loss]
intra_document_mask = true
balance_loss_coeff = 0.01
{eval}
[checkpoint]
dir = "ckpt"
every = {every}
keep_last = 10
[logging]
metrics = "metrics.jsonl"
progress = false
"""
FLAT = 'path = "{train}"\neos_id = 0'
EVAL = '[eval]\nevery = {every}\nbatches = 2\nsequences_per_batch = 4\npath = "{held}"'
TIMING = ("seconds", "tokens_per_s", "peak_rss", "memory", "start")


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """(training token file, held-out token file) of one Markov source, disjoint documents."""
    return train_and_held_files(tmp_path_factory.mktemp("data"), 12000)


def _run(folder, data, steps=5, every=None, eval_every=None, overrides="", eval_text=None):
    folder.mkdir(parents=True, exist_ok=True)
    train, held = data
    evaluation = "" if eval_every is None else (eval_text or EVAL).format(every=eval_every, held=held)
    (folder / "run.toml").write_text(RUN.format(data=FLAT.format(train=train), steps=steps, every=every or steps,
                                                eval=evaluation, overrides=overrides, mbs=1))
    return load_run_config(folder / "run.toml")


def _lines(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _steps_and_evals(folder):
    lines = _lines(folder)
    return [x for x in lines if "kind" not in x], [x for x in lines if x.get("kind") == "eval"]


def _untimed(line):
    return {k: v for k, v in line.items() if k not in TIMING}


def _same_bits(a: dict, b: dict, what):
    assert set(a) == set(b), what
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), f"{what} {k}"


def test_eval_lines_follow_their_steps_and_training_is_bitwise_unchanged(tmp_path, flat):
    plain = Trainer(_run(tmp_path / "plain", flat), log=_quiet)
    plain.train()
    evaluated = Trainer(_run(tmp_path / "eval", flat, eval_every=1), log=_quiet)
    evaluated.train()
    a, b = load_checkpoint(plain.last_checkpoint), load_checkpoint(evaluated.last_checkpoint)
    for name in ("params", "optimizer_state", "balancing_state"):
        _same_bits(getattr(a, name), getattr(b, name), name)
    assert (a.data_state, a.rng_state, a.tokens_seen) == (b.data_state, b.rng_state, b.tokens_seen)
    assert a.extra["seq_len"] == 32  # what `trinity eval` takes as its default
    steps, evals = _steps_and_evals(tmp_path / "eval")
    assert [_untimed(x) for x in steps] == [_untimed(x) for x in _lines(tmp_path / "plain")]
    lines = _lines(tmp_path / "eval")
    assert [(x["step"], x.get("kind")) for x in lines] == [(s, k) for s in range(1, 6) for k in (None, "eval")]
    for e, s in zip(evals, steps):
        assert e["tokens_seen"] == s["tokens_seen"] and e["batches"] == 2 and e["sequences"] == 8
        assert e["tokens"] == 8 * 31 and set(e["loss"]) == {"total", "ce", "z", "balance"}
        assert abs(e["perplexity"] - np.exp(e["loss"]["ce"])) <= 1e-9 * e["perplexity"]
        assert set(e["expert_load"]) == set(s["expert_load"]) and "bits_per_byte" not in e  # a flat file: unknown
        assert sum(map(sum, e["expert_load"].values())) == 8 * 32 * 2 * len(e["expert_load"])
    assert evals[-1]["loss"]["ce"] < evals[0]["loss"]["ce"]  # it learns what it was not trained on


def test_a_resumed_run_keeps_the_eval_schedule(tmp_path, flat):
    through = Trainer(_run(tmp_path / "through", flat, steps=6, every=2, eval_every=2), log=_quiet)
    through.train()
    run = _run(tmp_path / "stopped", flat, steps=6, every=2, eval_every=2)
    first = Trainer(run, log=_quiet)
    first.stop_requested = lambda: signal.SIGTERM if first.step == 3 else None
    first.train()
    assert first.stopped_by == signal.SIGTERM and first.step == 3
    Trainer(run, resume=True, log=_quiet).train()
    want, got = _lines(tmp_path / "through"), _lines(tmp_path / "stopped")
    assert [(x["step"], x.get("kind")) for x in got] == [(x["step"], x.get("kind")) for x in want]
    assert [x["step"] for x in got if x.get("kind")] == [2, 4, 6]
    assert [_untimed(x) for x in got] == [_untimed(x) for x in want]


def _ranks(run):
    def rank(comm):
        trainer = Trainer(run, log=_quiet, comm=comm)
        trainer.train()
        params, state = trainer.whole_state()
        return params, state, dict(trainer.balance_state)

    return VirtualCluster(run.layout.world_size).run(rank)


@pytest.mark.parametrize("text", ["dp_shard=2,ep=2", "dp_replicate=2,cp=2", "dp_shard=2,cp=2,ep=2"])
def test_under_a_layout_evaluation_changes_no_bit_and_equals_the_single_process(tmp_path, flat, text):
    layout = Layout.parse(text)
    single = Trainer(_run(tmp_path / "single", flat, steps=3, eval_every=1), log=_quiet)
    single.train()
    plain = dataclasses.replace(_run(tmp_path / "plain", flat, steps=3), layout=layout)
    evaluated = dataclasses.replace(_run(tmp_path / "eval", flat, steps=3, eval_every=1), layout=layout)
    for (p0, s0, b0), (p1, s1, b1) in zip(_ranks(plain), _ranks(evaluated)):
        _same_bits(p0, p1, "params")
        _same_bits(s0, s1, "optimizer state")
        _same_bits(b0, b1, "balancing state")
    _, want = _steps_and_evals(tmp_path / "single")
    _, got = _steps_and_evals(tmp_path / "eval")
    assert [x["step"] for x in got] == [1, 2, 3]
    for g, w in zip(got, want):
        assert (g["tokens"], g["sequences"], g["expert_load"]) == (w["tokens"], w["sequences"], w["expert_load"])
        for part, value in w["loss"].items():
            assert abs(g["loss"][part] - value) <= 1e-10 * abs(value), (text, g["step"], part)
        assert g["comm_bytes"]  # the evaluation's own traffic, in its line


def _corpus(folder, seed, count=60):
    """Text files of words, distinct per document."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "tau"]
    folder.mkdir(parents=True)
    for i in range(count):
        text = f"doc {seed}-{i}: " + " ".join(rng.choice(words, rng.integers(20, 60)))
        (folder / f"d{i:03d}.txt").write_text(text)


def test_a_mixture_reports_each_source_held_out_set(tmp_path):
    for name, seed in (("web", 0), ("code", 1)):
        _corpus(tmp_path / f"{name}_text", seed)
        prepare([tmp_path / f"{name}_text"], tmp_path / name, use_bytes=True, holdout=0.25, workers=1,
                progress=False, log=_quiet)
    data = 'phases = [[0, [0.5, 0.5]]]\n[[data.sources]]\npath = "web"\n[[data.sources]]\npath = "code"'
    (tmp_path / "run.toml").write_text(RUN.format(data=data, steps=2, every=2, overrides="vocab_size = 257", mbs=1,
                                                  eval="[eval]\nevery = 2\nbatches = 2"))
    Trainer(load_run_config(tmp_path / "run.toml"), log=_quiet).train()
    _, evals = _steps_and_evals(tmp_path)
    (line,) = evals
    assert set(line["sources"]) == {"web", "code"}
    parts = line["sources"].values()
    assert line["tokens"] == sum(p["tokens"] for p in parts)
    mean = sum(p["loss"]["ce"] * p["tokens"] for p in parts) / line["tokens"]
    assert abs(line["loss"]["ce"] - mean) <= 1e-12 * mean
    assert all(p["bits_per_byte"] > 0 for p in parts) and line["bits_per_byte"] > 0  # bytes tokenizer: known


def test_eval_errors_name_the_key(tmp_path, flat):
    def refused(folder, **kwargs):
        with pytest.raises(RunConfigError) as e:
            Trainer(_run(tmp_path / folder, flat, **kwargs), log=_quiet)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "[eval] path" in refused("self", eval_every=1, eval_text='[eval]\nevery = {every}\npath = "' +
                                    str(flat[0]) + '"')
    assert "held-out set" in refused("none", eval_every=1, eval_text="[eval]\nevery = {every}")
    assert "[eval] batches = 500" in refused("small", eval_every=1,
                                             eval_text='[eval]\nevery = {every}\nbatches = 500\npath = "{held}"')
    for text, key in (("every = 0", "[eval] every"), ("every = 1\nbatches = 2\ntokens = 5", "exclude"),
                      ("every = 1\nsequences_per_batch = 3", "micro_batch_size"), ("every = 1\nfoo = 1", "foo")):
        folder = tmp_path / f"bad{abs(hash(text))}"
        folder.mkdir()
        (folder / "run.toml").write_text(RUN.format(data=FLAT.format(train=flat[0]), steps=2, every=2,
                                                    eval="[eval]\n" + text, overrides="", mbs=2))
        with pytest.raises(RunConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_run_config(folder / "run.toml")
    assert os.path.exists(flat[1])


@pytest.mark.parametrize("count,sequences,seq_len", [(2, 4, 16), (3, 2, 32), (1, 8, 8)])
def test_fixed_batches_spread_over_the_set_and_split_by_rows_like_training(flat, count, sequences, seq_len):
    """Row i of batch b is row (b·S + i)·k of the set's packed stream (k = ⌊R / (count·S)⌋, R its rows); every split
    of the rows gives the same rows, read unread-skipping; every evaluation reads the same tokens."""
    from trinity.reference.data.packing import PackedTokenLoader
    from trinity.reference.data.store import DocumentStore
    from trinity.run.eval_data import fixed_batches
    store = DocumentStore(flat[1], eos_id=0)
    stride = (store.num_tokens // seq_len) // (count * sequences)
    stream, _ = PackedTokenLoader(store, seq_len, 1).next_rows(count * sequences * stride)
    whole = list(fixed_batches(store, seq_len, sequences, count))
    assert len(whole) == count
    for b, batch in enumerate(whole):
        assert np.array_equal(batch.tokens, stream[(b * sequences + np.arange(sequences)) * stride])
        assert batch.rows is None and batch.sequences == sequences
    for cut in range(sequences + 1):
        parts = [list(fixed_batches(store, seq_len, sequences, count, rows=r))
                 for r in (slice(0, cut), slice(cut, sequences))]
        for b in range(count):
            assert np.array_equal(np.concatenate([parts[0][b].tokens, parts[1][b].tokens]), whole[b].tokens)
            assert np.array_equal(np.concatenate([parts[0][b].doc_ids, parts[1][b].doc_ids]), whole[b].doc_ids)
    again = list(fixed_batches(store, seq_len, sequences, count))
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(again, whole))
    with pytest.raises(Exception, match="fewer than"):
        fixed_batches(store, seq_len, sequences, store.num_tokens)


def test_the_documented_run_files_load():
    """configs/*.toml (the README's quickstart evaluates every 50 steps on 8 held-out batches)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    runs = {name: load_run_config(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.endswith(".toml")}
    assert runs["quickstart.toml"].evaluation.every == 50 and runs["quickstart.toml"].evaluation.batches == 8

