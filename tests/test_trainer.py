"""`trinity train`: run files, learning, exact resume after SIGKILL, balancing in training."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from trinity.run.run_config import RunConfigError, load_run_config
from trinity.run.trainer import FAULT_ENV, Trainer
from trinity.reference import Config, save_pretrained
from trinity.reference.data.store import write_token_file
from trinity.reference.data.synthetic import MarkovSource
from trinity.reference.training.checkpoint import CheckpointManager, load_checkpoint

RUN = """
[model]
{model}
dtype = "float32"
[model.overrides]
{overrides}
[data]
path = "tokens.bin"
eos_id = 0
seq_len = 32
micro_batch_size = 4
[train]
steps = {steps}
sequences_per_step = 8
backend = "{backend}"
[optimizer]
muon_lr = 0.02
adamw_lr = 0.01
[schedule]
warmup_steps = 2
[balancing]
method = "{method}"
smebu_lambda = {lam}
[checkpoint]
dir = "ckpt"
every = {every}
keep_last = 2
[logging]
metrics = "metrics.jsonl"
progress = false
"""


def make_run(tmp_path, steps=6, every=3, method="smebu", lam=5e-4, model='preset = "tiny"', overrides="",
             tokens=20000, backend="reference"):
    source = MarkovSource(256, eos_id=0, branching=4, mean_doc_len=40, seed=0)
    write_token_file(tmp_path / "tokens.bin", source.documents(tokens), eos_id=0)
    path = tmp_path / "run.toml"
    path.write_text(RUN.format(model=model, steps=steps, every=every, method=method, lam=lam, overrides=overrides,
                               backend=backend))
    return path


def trinity(*args, env=None):
    return subprocess.run([sys.executable, "-m", "trinity.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    """A run of 2N steps and a run SIGKILLed right after its step-N checkpoint then resumed to 2N end with
    bitwise-equal params, optimizer state, balancing state and data position."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_a, run_b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    whole = trinity("train", str(run_a))
    assert whole.returncode == 0, whole.stderr
    killed = trinity("train", str(run_b), env={FAULT_ENV: "3"})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    assert [os.path.basename(p) for p in CheckpointManager(tmp_path / "b" / "ckpt").list()] == ["step_00000003.h5"]
    resumed = trinity("train", str(run_b), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    a = load_checkpoint(tmp_path / "a" / "ckpt" / "step_00000006.h5")
    b = load_checkpoint(tmp_path / "b" / "ckpt" / "step_00000006.h5")
    for name in ("params", "optimizer_state", "balancing_state"):
        tree_a, tree_b = getattr(a, name), getattr(b, name)
        assert tree_a.keys() == tree_b.keys() and tree_a
        for key in tree_a:
            assert tree_a[key].dtype == tree_b[key].dtype
            np.testing.assert_array_equal(tree_a[key], tree_b[key], err_msg=f"{name}[{key}]")
    assert (a.step, a.tokens_seen, a.data_state, a.rng_state) == (b.step, b.tokens_seen, b.data_state, b.rng_state)
    # The balancing state really moved (otherwise equality would be vacuous).
    assert any(np.abs(v).max() > 0 for v in a.balancing_state.values())


def test_training_lowers_the_loss_and_logs_every_step(tmp_path):
    run = make_run(tmp_path, steps=30, every=30)
    trainer = Trainer(load_run_config(run), log=lambda *_: None)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[0], rows[-1]
    assert last["loss"]["ce"] < first["loss"]["ce"] - 1.0  # from ≈ ln 256 = 5.5 towards the 1.2 floor
    for key in ("loss", "grad_norm", "lr", "max_vio", "expert_load", "logits_max", "logits_mean", "tokens_per_s"):
        assert key in last
    assert set(last["loss"]) == {"total", "ce", "z", "balance"}
    assert set(last["lr"]) == {"muon", "adamw"}
    assert set(last["max_vio"]) == {"1", "2", "3"}  # the MoE layers of `tiny`
    assert sum(last["expert_load"]["1"]) == 8 * 32 * 2  # (token, slot) assignments: sequences·T·K
    assert last["tokens_seen"] == 30 * 8 * 32


def test_smebu_beats_none_on_a_skewed_router_during_training(tmp_path):
    """Start from an HF checkpoint whose routers favour the low-numbered experts; after the same steps, SMEBU's
    MaxVio is below the `none` run's."""
    from test_balancing import skewed_router_model

    config, params, _ = skewed_router_model()
    params = {k: v.astype(np.float32) for k, v in params.items()}
    save_pretrained(tmp_path / "skewed", config, params)
    max_vio = {}
    for method in ("none", "smebu"):
        (tmp_path / method).mkdir()
        run = make_run(tmp_path / method, steps=25, every=25, method=method, lam=1e-2,
                       model=f'init_from = "{tmp_path / "skewed"}"')  # [schedule] warmup_steps = 2
        Trainer(load_run_config(run), log=lambda *_: None).train()
        rows = [json.loads(line) for line in open(tmp_path / method / "metrics.jsonl")]
        max_vio[method] = np.mean([max(r["max_vio"].values()) for r in rows[-5:]])
        first = max(rows[0]["max_vio"].values())
    assert first > 0.5  # skewed from the first step: the busiest expert gets > 1.5× its share
    print(f"\n[balancing] MaxVio over the last 5 of 25 steps: none {max_vio['none']:.3f}, "
          f"smebu {max_vio['smebu']:.3f} (first step {first:.3f})")
    assert max_vio["smebu"] < 0.5 * max_vio["none"], max_vio


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("[data]", "[data]\nbatch = 3"), r"\[data\] unknown key\(s\): batch"),
    (lambda s: s.replace("muon_lr = 0.02", "muon_lrr = 0.02"), r"\[optimizer\] unknown key: muon_lrr"),
    (lambda s: s.replace("seq_len = 32", 'seq_len = "long"'), r"\[data\] seq_len = 'long'"),
    (lambda s: s.replace("sequences_per_step = 8", "sequences_per_step = 6"), "multiple of"),
    (lambda s: s.replace('method = "smebu"', 'method = "aux"'), r"\[balancing\] method = 'aux'"),
    (lambda s: s.replace('preset = "tiny"', 'preset = "tiny"\nconfig = "x.json"'), "exactly one of"),
    (lambda s: s + "\n[extras]\nx = 1\n", r"unknown section\(s\): extras"),
    (lambda s: s.replace("[model.overrides]", "[model.overrides]\nhidden = 3"), "unknown Config field"),
])
def test_bad_run_files_name_the_key(tmp_path, edit, message):
    path = make_run(tmp_path, tokens=200)
    path.write_text(edit(path.read_text()))
    with pytest.raises(RunConfigError, match=message):
        load_run_config(path)


def test_cli_reports_bad_run_files_in_one_line(tmp_path):
    path = make_run(tmp_path, tokens=200)
    path.write_text(path.read_text().replace("steps = 6", "steps = 0"))
    result = trinity("train", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["trinity train: error: [train] steps = 0: must be a positive integer"]
    assert not (tmp_path / "ckpt").exists()  # failed before any work


def test_tokens_outside_the_vocabulary_fail_before_training(tmp_path):
    path = make_run(tmp_path, tokens=500, overrides="vocab_size = 100")
    with pytest.raises(RunConfigError, match="token id .* >= vocab_size 100"):
        Trainer(load_run_config(path), log=lambda *_: None)


def test_resume_with_another_model_is_refused(tmp_path):
    path = make_run(tmp_path, steps=2, every=2, tokens=2000)
    Trainer(load_run_config(path), log=lambda *_: None).train()
    path.write_text(path.read_text().replace("[model.overrides]", "[model.overrides]\nsliding_window = 8"))
    result = trinity("train", str(path), "--resume")
    assert result.returncode == 2 and "sliding_window" in result.stderr


def test_numba_backend_trains_like_the_reference(tmp_path):
    """The same run on the numba table: per-step losses agree to float32 accuracy (the conformance suite pins each
    op; this checks the trainer really passes the table through, optimizer included)."""
    pytest.importorskip("numba")
    losses = {}
    for backend in ("reference", "numba"):
        (tmp_path / backend).mkdir()
        run = make_run(tmp_path / backend, steps=3, every=3, tokens=3000, backend=backend)
        Trainer(load_run_config(run), log=lambda *_: None).train()
        losses[backend] = [json.loads(line)["loss"]["total"] for line in open(tmp_path / backend / "metrics.jsonl")]
    np.testing.assert_allclose(losses["numba"], losses["reference"], rtol=1e-4)


def test_cli_backend_overrides_the_run_file(tmp_path):
    """`trinity train RUN --backend X` replaces [train] backend: an unavailable X fails naming it, before training."""
    try:
        import cupy  # noqa: F401
        pytest.skip("cupy is installed here")
    except ImportError:
        pass
    path = make_run(tmp_path, tokens=200, backend="reference")
    out = trinity("train", str(path), "--backend", "cupy")
    assert out.returncode == 2 and "--backend cupy" in out.stderr, out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unavailable_backend_fails_before_training(tmp_path):
    path = make_run(tmp_path, tokens=200, backend="cupy")
    try:
        import cupy  # noqa: F401
        pytest.skip("cupy is installed here")
    except ImportError:
        pass
    with pytest.raises(RunConfigError, match="backend = 'cupy'"):
        Trainer(load_run_config(path), log=lambda *_: None)
