"""What a training run survives: divergence, re-runs in the same folder, kills and resumes (metrics.jsonl), corrupt
checkpoints, changed data and tokenizers, and preemption signals (run/trainer.py, metrics_log.py,
preemption.py, reference/training/checkpoint.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from trinity.run.run_config import load_run_config
from trinity.run.trainer import FAULT_METRICS_ENV, Trainer, TrainingDiverged
from trinity.reference.data.store import write_token_file
from trinity.reference.data.synthetic import MarkovSource
from trinity.reference.training.checkpoint import CheckpointManager, load_checkpoint

RUN = """
[model]
{model}
dtype = "{dtype}"
{overrides}
[data]
path = "{data}"
{eos}
seq_len = 32
micro_batch_size = 4
[train]
steps = {steps}
sequences_per_step = 8
{train}
[optimizer]
muon_lr = 0.02
adamw_lr = {adamw_lr}
[checkpoint]
dir = "ckpt"
every = {every}
keep_last = {keep_last}
[logging]
metrics = "metrics.jsonl"
progress = false
"""
TIMING = ("tokens_per_s", "seconds", "peak_rss")  # the only fields allowed to differ between two runs of the same steps


def write_run(folder, steps=6, every=3, keep_last=2, adamw_lr=0.01, train="", model='preset = "tiny"',
              data="tokens.bin", dtype="float32", tokens=8000, overrides="", eos="eos_id = 0"):
    os.makedirs(folder, exist_ok=True)
    if data == "tokens.bin":
        source = MarkovSource(256, eos_id=0, branching=4, mean_doc_len=40, seed=0)
        write_token_file(os.path.join(folder, "tokens.bin"), source.documents(tokens), eos_id=0)
    path = os.path.join(folder, "run.toml")
    with open(path, "w") as f:
        f.write(RUN.format(steps=steps, every=every, keep_last=keep_last, adamw_lr=adamw_lr, train=train,
                           model=model, data=data, dtype=dtype, overrides=overrides, eos=eos))
    return path


def edit_run(run, old: str, new: str) -> None:
    with open(run) as f:
        text = f.read()
    assert old in text, old
    with open(run, "w") as f:
        f.write(text.replace(old, new))


def trinity(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "trinity.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def error_line(result) -> str:
    """The one line a failed command printed on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def metrics_rows(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def folder_bytes(folder) -> dict:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def assert_same_state(a, b):
    for name in ("params", "optimizer_state", "balancing_state"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.keys() == tb.keys() and ta
        for key in ta:
            np.testing.assert_array_equal(ta[key], tb[key], err_msg=f"{name}[{key}]")
    assert (a.step, a.tokens_seen, a.data_state, a.rng_state) == (b.step, b.tokens_seen, b.data_state, b.rng_state)


# ---- 2. divergence ------------------------------------------------------------------------------------------------
def test_divergence_stops_before_the_update_and_keeps_the_finite_checkpoint(tmp_path):
    """An AdamW learning rate of 1e30 overflows the model in its first update: step 2's gradient norm is NaN. The run
    stops with status 3 and one line naming step 2 and the checkpoint to resume from; with keep_last = 1 that finite
    checkpoint survives, no checkpoint holds NaN, and the metrics have no line for the failed step."""
    run = write_run(tmp_path, steps=6, every=1, keep_last=1, adamw_lr=1e30)
    out = trinity("train", run)
    assert out.returncode == 3, out.stderr
    line = error_line(out)
    newest = os.path.join(tmp_path, "ckpt", "step_00000001.h5")
    assert line.startswith("trinity train: error: step 2: ") and "not finite" in line and newest in line
    assert CheckpointManager(tmp_path / "ckpt").list() == [newest]
    ck = load_checkpoint(newest)
    for tree in (ck.params, ck.optimizer_state, ck.balancing_state):
        assert all(np.isfinite(v).all() for v in tree.values() if v.dtype.kind == "f")
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1]


def test_a_non_finite_step_changes_nothing(tmp_path):
    """In process: the step that fails leaves params, optimizer and balancing state bitwise as they were."""
    trainer = Trainer(load_run_config(write_run(tmp_path, adamw_lr=1e30)), log=lambda *a: None)
    trainer.train_step()
    before = [{k: v.copy() for k, v in tree.items()}
              for tree in (trainer.params, trainer.opt_state, trainer.balance_state)]
    with pytest.raises(TrainingDiverged, match="step 2: .*not finite"):
        trainer.train_step()
    for old, tree in zip(before, (trainer.params, trainer.opt_state, trainer.balance_state)):
        for key in old:
            assert old[key].tobytes() == np.asarray(tree[key]).tobytes(), key
    assert trainer.step == 1


def test_skip_policy_counts_skipped_steps_up_to_its_limit(tmp_path):
    run = write_run(tmp_path, steps=6, every=1, keep_last=1, adamw_lr=1e30,
                    train='on_nonfinite = "skip"\nmax_skipped_steps = 2')
    out = trinity("train", run)
    assert out.returncode == 3, out.stderr
    assert "2 steps were skipped already" in error_line(out).split("error: ")[1]
    rows = metrics_rows(tmp_path)
    assert [(r["step"], r.get("skipped", False), r["skipped_steps"]) for r in rows] == \
        [(1, False, 0), (2, True, 1), (2, True, 2)]
    assert rows[1]["grad_norm"] is None  # non-finite numbers are written as null (valid JSON)
    assert CheckpointManager(tmp_path / "ckpt").list() == [os.path.join(tmp_path, "ckpt", "step_00000001.h5")]


def test_init_from_weights_with_nan_are_refused(tmp_path):
    from trinity.reference import Config, init_params, save_pretrained

    config = Config.preset("tiny")
    params = init_params(config, seed=0)
    params["model.layers.1.self_attn.o_proj.weight"][2, 3] = np.inf
    save_pretrained(tmp_path / "hf", config, params)
    run = write_run(tmp_path, model=f'init_from = "{tmp_path / "hf"}"')
    out = trinity("train", run)
    assert out.returncode == 2
    assert "[model] init_from" in error_line(out) and "NaN or infinity (model.layers.1.self_attn.o_proj.weight)" \
        in error_line(out)
    assert not os.path.exists(tmp_path / "ckpt") or os.listdir(tmp_path / "ckpt") == []


# ---- 3. a run folder belongs to one run ---------------------------------------------------------------------------
def test_a_second_run_in_the_same_folder_is_refused_unless_restart(tmp_path):
    run = write_run(tmp_path, steps=4, every=2)
    assert trinity("train", run).returncode == 0
    before = folder_bytes(tmp_path / "ckpt")
    metrics_before = (tmp_path / "metrics.jsonl").read_bytes()
    out = trinity("train", run)
    assert out.returncode == 2
    line = error_line(out)
    assert "[checkpoint] dir" in line and "step_00000004.h5" in line
    assert "--resume" in line and "--restart" in line and "another [checkpoint] dir" in line
    assert folder_bytes(tmp_path / "ckpt") == before and (tmp_path / "metrics.jsonl").read_bytes() == metrics_before
    old_run = load_checkpoint(tmp_path / "ckpt" / "step_00000004.h5").run_id
    out = trinity("train", run, "--restart")
    assert out.returncode == 0, out.stderr
    assert "--restart: removed 2 checkpoint(s)" in out.stdout
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3, 4]  # one run's lines, not two
    assert load_checkpoint(tmp_path / "ckpt" / "step_00000004.h5").run_id != old_run


# ---- 4. the metrics file reads as one run -------------------------------------------------------------------------
def test_kills_and_resumes_give_the_lines_of_an_uninterrupted_run(tmp_path):
    """Kill after step 4's metrics line (checkpoint at 3), cut a line short as a full disk would, resume, kill again
    after step 5, resume to the end: metrics.jsonl equals the uninterrupted run's line by line (timing aside), and
    the final states are bitwise equal."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert trinity("train", write_run(whole, steps=8, every=3)).returncode == 0
    run = write_run(broken, steps=8, every=3)
    out = trinity("train", run, env={FAULT_METRICS_ENV: "4"})
    assert out.returncode == -signal.SIGKILL
    assert [r["step"] for r in metrics_rows(broken)] == [1, 2, 3, 4]
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tokens_seen": 16')  # a line cut short
    out = trinity("train", run, "--resume", env={FAULT_METRICS_ENV: "5"})
    assert out.returncode == -signal.SIGKILL
    assert "dropped 1 later line(s) and 1 unreadable line(s)" in out.stdout
    out = trinity("train", run, "--resume")
    assert out.returncode == 0, out.stderr
    assert without_timing(metrics_rows(broken)) == without_timing(metrics_rows(whole))
    assert_same_state(load_checkpoint(whole / "ckpt" / "step_00000008.h5"),
                      load_checkpoint(broken / "ckpt" / "step_00000008.h5"))


# ---- 5. verified checkpoints and fallback -------------------------------------------------------------------------
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path):
    run = write_run(tmp_path, steps=6, every=3)
    assert trinity("train", run).returncode == 0
    newest = tmp_path / "ckpt" / "step_00000006.h5"
    with h5py.File(newest, "r") as f:
        offset = f["params/model.embed_tokens.weight"].id.get_offset() + 100
    with open(newest, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    out = trinity("generate", newest, "--prompt-tokens", "1,2", "--max-new-tokens", "2")
    assert out.returncode == 2
    assert "step_00000006.h5: params/model.embed_tokens.weight fails its sha256 checksum" in error_line(out)
    edit_run(run, "steps = 6", "steps = 9")
    out = trinity("train", run, "--resume")
    assert out.returncode == 0, out.stderr
    assert f"skipped checkpoint {newest}" in out.stdout and "fails its sha256" in out.stdout
    assert "at step 3" in out.stdout


# ---- 6. a checkpoint carries its tokenizer and a fingerprint of its data -------------------------------------------
def _prepare(folder, text_dir, *how):
    out = trinity("data", "prepare", text_dir, "--out", folder, "--no-progress", *how)
    assert out.returncode == 0, out.stderr


def test_checkpoint_tokenizer_survives_re_preparing_the_data(tmp_path):
    from trinity.cli.common import load_model, load_model_tokenizer
    from trinity.reference.data.tokenizer import load_tokenizer

    texts = tmp_path / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "print", "(", ")", ":", "\n"]
    for i in range(40):
        (texts / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 60)))
    data = tmp_path / "data"
    _prepare(data, texts, "--train-bpe", "300")
    trained_with = load_tokenizer(data)
    run = write_run(tmp_path, steps=2, every=2, data="data", eos="",
                    overrides=f"[model.overrides]\nvocab_size = {trained_with.vocab_size}")
    out = trinity("train", run)
    assert out.returncode == 0, out.stderr
    ckpt = tmp_path / "ckpt" / "step_00000002.h5"
    # Re-prepare the data folder with another tokenizer: the checkpoint still decodes with its own.
    import shutil
    shutil.rmtree(data)
    _prepare(data, texts, "--bytes")
    model = load_model(str(ckpt))
    tok = load_model_tokenizer(None, model)
    prompt = "def alpha(beta):\n    return gamma"
    assert tok.encode(prompt) == trained_with.encode(prompt) != load_tokenizer(data).encode(prompt)
    assert (tok.eos_id, tok.vocab_size) == (trained_with.eos_id, trained_with.vocab_size)
    out = trinity("generate", ckpt, "--prompt", prompt, "--max-new-tokens", "3")
    assert out.returncode == 0 and out.stdout.startswith(prompt), out.stderr
    # Resuming on the changed data is refused, saying what changed.
    edit_run(run, "steps = 2", "steps = 4")
    out = trinity("train", run, "--resume")
    assert out.returncode == 2
    line = error_line(out)
    assert "[data] the training data changed since checkpoint" in line and "tokens" in line
    assert "the tokenizer changed (bpe -> bytes)" in line


def test_resume_on_a_changed_token_file_names_what_changed(tmp_path):
    run = write_run(tmp_path, steps=2, every=2)
    assert trinity("train", run).returncode == 0
    source = MarkovSource(256, eos_id=0, branching=4, mean_doc_len=40, seed=1)
    write_token_file(tmp_path / "tokens.bin", source.documents(9000), eos_id=0)
    edit_run(run, "steps = 2", "steps = 4")
    out = trinity("train", run, "--resume")
    assert out.returncode == 2
    line = error_line(out)
    assert "training data changed" in line and "tokens.bin: documents" in line


# ---- 7. preemption -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, sig):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    steps = 30
    run = write_run(stopped, steps=steps, every=100)
    child = subprocess.Popen([sys.executable, "-m", "trinity.cli", "train", run], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for two steps, so that the signal arrives mid-run
        if os.path.exists(stopped / "metrics.jsonl") and len(metrics_rows(stopped)) >= 2:
            break
        time.sleep(0.05)
    child.send_signal(sig)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 128 + sig, err
    rows = metrics_rows(stopped)
    at = rows[-1]["step"]
    assert at < steps, "the run ended before the signal: make it longer"
    path = os.path.join(stopped, "ckpt", f"step_{at:08d}.h5")
    assert f"checkpoint {path}" in out and CheckpointManager(stopped / "ckpt").list() == [path]
    resumed = trinity("train", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert trinity("train", write_run(whole, steps=steps, every=100)).returncode == 0
    assert without_timing(metrics_rows(stopped)) == without_timing(metrics_rows(whole))
    final = f"step_{steps:08d}.h5"
    assert_same_state(load_checkpoint(whole / "ckpt" / final), load_checkpoint(stopped / "ckpt" / final))


def test_a_second_signal_exits_at_once():
    script = textwrap.dedent("""
        import os, signal, time
        from trinity.run.preemption import PreemptionGuard
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(600)  # a second signal that did not end the process would end the test in a timeout
        print("not reached")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 143 and "not reached" not in out.stdout
    assert "second SIGTERM: exiting now" in out.stderr


# ---- 8. a full disk ------------------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A file-size limit (what a full disk looks like to a writer) makes the step-4 checkpoint fail: status 2, one
    line naming [checkpoint] dir and the intact previous checkpoint, which still loads, and no temporary file left."""
    import resource

    run = write_run(tmp_path, steps=2, every=2)
    assert trinity("train", run).returncode == 0
    previous = tmp_path / "ckpt" / "step_00000002.h5"
    before = previous.read_bytes()
    edit_run(run, "steps = 2", "steps = 4")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 4, len(before) // 4))

    out = subprocess.run([sys.executable, "-m", "trinity.cli", "train", run, "--resume"], capture_output=True,
                         text=True, timeout=600, preexec_fn=limit)
    assert out.returncode == 2, out.stderr
    line = error_line(out)
    assert "[checkpoint] dir" in line and "cannot write checkpoint (File too large)" in line
    assert f"the previous checkpoint {previous} is intact" in line
    assert previous.read_bytes() == before and sorted(os.listdir(tmp_path / "ckpt")) == [previous.name]
    assert load_checkpoint(previous).step == 2


def test_a_step_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path):
    """Micro-batches of 4 sequences of 2**21 tokens: their logits alone need far more memory than any test machine
    has. Refused in one line with the estimate, before a step is tried (not a MemoryError much later)."""
    from trinity.reference.training.memory import available_memory_bytes

    if available_memory_bytes() is None:
        pytest.skip("this machine does not tell its available memory")
    run = write_run(tmp_path, overrides="[model.overrides]\nmax_position_embeddings = 4194304")
    edit_run(run, "seq_len = 32", "seq_len = 2097152")
    out = trinity("train", run)
    assert out.returncode == 2
    line = error_line(out)
    assert "[data] seq_len = 2097152, micro_batch_size = 4: estimated peak memory" in line
    assert "GiB available" in line and "recompute = true" in line
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_signal_right_after_a_skipped_step_keeps_the_metrics_of_one_run(tmp_path):
    """SIGTERM lands just after a skipped step: the checkpoint written then records the skipped line, so the resumed
    run's metrics equal the uninterrupted run's (which stops at its skip limit)."""
    def run_in(folder):
        return load_run_config(write_run(folder, steps=6, every=100, adamw_lr=1e30,
                                         train='on_nonfinite = "skip"\nmax_skipped_steps = 2'))

    with pytest.raises(TrainingDiverged):
        Trainer(run_in(tmp_path / "whole"), log=lambda *a: None).train()
    trainer = Trainer(run_in(tmp_path / "stopped"), log=lambda *a: None)
    step = trainer.train_step

    def step_then_signal():
        row = step()
        if row.get("skipped"):
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    trainer.train_step = step_then_signal
    trainer.train()
    assert trainer.stopped_by == signal.SIGTERM
    with pytest.raises(TrainingDiverged):
        Trainer(run_in(tmp_path / "stopped"), resume=True, log=lambda *a: None).train()
    rows = [(r["step"], r.get("skipped", False), r["skipped_steps"]) for r in metrics_rows(tmp_path / "stopped")]
    assert rows == [(1, False, 0), (2, True, 1), (2, True, 2)]
    assert without_timing(metrics_rows(tmp_path / "stopped")) == without_timing(metrics_rows(tmp_path / "whole"))


def test_a_file_that_is_not_a_metrics_file_is_never_overwritten(tmp_path):
    run = write_run(tmp_path, steps=2, every=2)
    edit_run(run, 'metrics = "metrics.jsonl"', 'metrics = "notes.txt"')
    (tmp_path / "notes.txt").write_text("my precious notes\n")
    for flags in ((), ("--resume",), ("--restart",)):
        out = trinity("train", run, *flags)
        assert out.returncode == 2
        assert "[logging] metrics = " in error_line(out) and "not a trinity metrics file" in error_line(out)
        assert (tmp_path / "notes.txt").read_text() == "my precious notes\n"
    assert not os.path.exists(tmp_path / "ckpt") or os.listdir(tmp_path / "ckpt") == []


def test_a_diverged_run_resumes_with_a_lower_learning_rate(tmp_path):
    """The recipe may change on resume (logged, field by field); the model and what shapes the saved state may not.
    So a run that diverged after a bad learning-rate change goes on from its newest checkpoint with a lower one."""
    run = write_run(tmp_path, steps=2, every=2)
    assert trinity("train", run).returncode == 0
    edit_run(run, "steps = 2", "steps = 6")
    edit_run(run, "adamw_lr = 0.01", "adamw_lr = 1e30")
    out = trinity("train", run, "--resume")
    assert out.returncode == 3 and "step 4: " in error_line(out) and "step_00000002.h5" in error_line(out)
    edit_run(run, "adamw_lr = 1e30", "adamw_lr = 0.01")
    out = trinity("train", run, "--resume")
    assert out.returncode == 0, out.stderr
    assert "at step 2" in out.stdout
    assert "the recipe changed since that checkpoint (checkpoint != now): adamw_lr 1e+30 != 0.01" not in out.stdout
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]["total"]) for r in metrics_rows(tmp_path))
    assert load_checkpoint(tmp_path / "ckpt" / "step_00000006.h5").config.adamw_lr == 0.01
    edit_run(run, "adamw_lr = 0.01", "adamw_lr = 0.005")
    edit_run(run, "steps = 6", "steps = 8")
    out = trinity("train", run, "--resume")
    assert out.returncode == 0, out.stderr
    assert "the recipe changed since that checkpoint (checkpoint != now): adamw_lr 0.01 != 0.005" in out.stdout
    edit_run(run, "steps = 8", "steps = 10")
    edit_run(run, "progress = false", "progress = false\n[balancing]\nmethod = \"sign\"")
    out = trinity("train", run, "--resume")
    assert out.returncode == 2 and "another model: load_balancing 'smebu' != 'sign'" in error_line(out)
