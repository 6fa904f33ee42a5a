"""Device placement (docs/gpu.md "What moves where, when"): a run, `trinity generate`, `trinity eval`, `trinity inspect`
and cluster mode with an op table whose arrays live off the host.

Without a GPU the device is a stand-in (tests/strict_device.py): the reference's operators on array_api_strict arrays,
which refuse to become NumPy arrays inside `no_numpy_conversion` (as CuPy's do), so any silent host conversion fails.
The table reaches the code through get_backend's table hook (Trainer(..., backend=table), a command's --backend).

- A run of 4 steps (evaluation every 2, checkpoints at 2 and 4) on the stand-in equals the reference run bit for bit
  (float64: checkpoints and metrics lines), and moves exactly: the state to the device once, each step's batch
  arrays, each evaluation batch's; the host reads checkpoints, metrics' expert loads and evaluation sums. Resumed
  from its step-2 checkpoint it ends with the same bits again.
- `trinity generate` (sampling, with a KV cache), `trinity eval` and `trinity inspect --step` print what the
  reference prints.
- On virtual ranks (FSDP, expert and context parallel, replicas, every schedule option) the stand-in equals the
  reference table under the same layout bit for bit (collectives staged through the host, counted apart) and the
  single process to 1e-10; what is not wired yet (bfloat16 wire dtypes) is refused in one line, and so is a host
  with fewer GPUs than ranks.
- The simulated cupy table (NumPy arrays, Numba's CUDA simulator) through the same trainer path equals the reference
  to 1e-10 relative.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
from strict_device import STRICT, no_numpy_conversion

from markov_files import train_and_held_files
from trinity.accel.device import transfer_counts
from trinity.cli.main import _run, build_parser
from trinity.distributed.layout import Layout
from trinity.distributed.sharded_checkpoint import load_sharded
from trinity.reference.data.store import write_token_file
from trinity.reference.data.synthetic import MarkovSource
from trinity.reference.training.checkpoint import load_checkpoint
from trinity.run.run_config import RunConfigError, load_run_config
from trinity.run.trainer import Trainer
from trinity.simulate.virtual.virtual_comm import RankFailed, VirtualCluster

RUN = """
[model]
preset = "tiny"
dtype = "float64"
[model.overrides]
sliding_window = 8
{overrides}
[data]
seq_len = {seq_len}
micro_batch_size = 1
path = "{train}"
eos_id = 0
[train]
steps = {steps}
sequences_per_step = {sequences}
[optimizer]
muon_lr = 0.02
adamw_lr = 0.01
[schedule]
warmup_steps = 1
[loss]
intra_document_mask = true
balance_loss_coeff = 0.01
z_loss_coeff = 0.001
{eval}
[checkpoint]
dir = "ckpt"
every = 2
keep_last = 10
[logging]
metrics = "metrics.jsonl"
progress = false
"""
EVAL = '[eval]\nevery = 2\nbatches = 1\nsequences_per_batch = 2\npath = "{held}"'
TIMING = ("seconds", "tokens_per_s", "peak_rss", "start")


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(training token file, held-out token file) of one Markov source."""
    return train_and_held_files(tmp_path_factory.mktemp("data"), 6000)


def _run_config(folder, data, steps=4, sequences=2, seq_len=16, evaluate=True, overrides="", layout=None):
    folder.mkdir(parents=True, exist_ok=True)
    train, held = data
    (folder / "run.toml").write_text(RUN.format(train=train, steps=steps, sequences=sequences, seq_len=seq_len,
                                                overrides=overrides, eval=EVAL.format(held=held) if evaluate else ""))
    run = load_run_config(folder / "run.toml")
    return run if layout is None else dataclasses.replace(run, layout=Layout.parse(layout))


def _moved(before: dict) -> dict:
    return {k: v - before[k] for k, v in transfer_counts().items()}


def _lines(folder) -> list:
    """The metrics lines without their timings."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _same_bits(a: dict, b: dict, what: str):
    assert set(a) == set(b), what
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{what} {k}"


def _load(path: str):
    """A checkpoint file, or a sharded checkpoint (a layout's) reassembled."""
    return load_sharded(path) if os.path.isdir(path) else load_checkpoint(path)


def _same_checkpoint(a: str, b: str):
    x, y = _load(a), _load(b)
    for name in ("params", "optimizer_state", "balancing_state"):
        _same_bits(getattr(x, name), getattr(y, name), name)
    assert (x.step, x.tokens_seen, x.data_state, x.rng_state) == (y.step, y.tokens_seen, y.data_state, y.rng_state)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data):
    """The reference table's run: its folder and Trainer."""
    folder = tmp_path_factory.mktemp("reference")
    trainer = Trainer(_run_config(folder, data), log=_quiet)
    trainer.train()
    return folder, trainer


# ---- one process --------------------------------------------------------------------------------------------------
def test_a_run_on_a_device_is_the_reference_run_bit_for_bit_and_moves_its_state_once(tmp_path, data, reference_run):
    ref_folder, ref = reference_run
    run = _run_config(tmp_path, data)
    before = transfer_counts()
    with no_numpy_conversion():
        trainer = Trainer(run, log=_quiet, backend=STRICT)
        trainer.train()
    moved = _moved(before)
    assert _lines(tmp_path) == _lines(ref_folder)
    _same_checkpoint(trainer.last_checkpoint, ref.last_checkpoint)

    state = len(ref.params) + len(ref.opt_state) - 1 + len(ref.balance_state)  # the step counter stays on the host
    moe_layers = sum(trainer.config.is_moe_layer(layer) for layer in range(trainer.config.num_hidden_layers))
    batch = 2  # tokens and document ids (labels are the tokens)
    steps, evals, saves = 4, 2, 2
    assert moved == {"to_device": state + steps * batch + evals * batch,
                     "to_host": saves * state + steps * moe_layers + evals * moe_layers,
                     "staged_to_host": 0, "staged_to_device": 0}

    # resumed from the step-2 checkpoint (the step-4 one removed), it ends on the same bits; the state moves once
    os.remove(trainer.last_checkpoint)
    before = transfer_counts()
    with no_numpy_conversion():
        resumed = Trainer(run, resume=True, log=_quiet, backend=STRICT)
        assert resumed.step == 2
        resumed.train()
    assert _moved(before)["to_device"] == state + 2 * batch + 1 * batch
    assert _lines(tmp_path) == _lines(ref_folder)
    _same_checkpoint(resumed.last_checkpoint, ref.last_checkpoint)


def test_a_numpy_table_moves_nothing(tmp_path, data):
    """The reference's placement is the identity: the same objects, nothing copied or counted."""
    before = transfer_counts()
    trainer = Trainer(_run_config(tmp_path, data, steps=1, evaluate=False), log=_quiet)
    params = trainer.params
    trainer.train()
    assert trainer.params is params and _moved(before) == dict.fromkeys(transfer_counts(), 0)


# ---- the commands -------------------------------------------------------------------------------------------------
def _command(argv: list, backend=None) -> str:
    """`trinity ARGV` in this process (its stdout), with `backend` (an op table) in place of --backend's."""
    args = build_parser().parse_args([str(a) for a in argv])
    if backend is not None:
        args.backend = backend
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert _run(args) == 0
    return out.getvalue()


def _on_both(argv: list) -> tuple:
    """(the reference's output, the stand-in device's output, what the device run moved)."""
    want = _command(argv)
    before = transfer_counts()
    with no_numpy_conversion():
        got = _command(argv, STRICT)
    return want, got, _moved(before)


def test_generate_eval_and_inspect_on_a_device_print_the_references_results(tmp_path, data, reference_run):
    _, ref = reference_run
    ckpt, params = ref.last_checkpoint, len(ref.params)

    n = 6
    want, got, moved = _on_both(["generate", ckpt, "--prompt-tokens", "5,17,9,1,40,3,3,8,9,10", "--max-new-tokens",
                                 n, "--temperature", 0.8, "--top-p", 0.9, "--seed", 3, "--ignore-eos"])
    assert got == want and len(want.split()) == n
    # the params once; the prompt, then each new token but the last in; each token's logits out
    assert moved["to_device"] == params + 1 + (n - 1) and moved["to_host"] == n

    json_ref, json_dev = tmp_path / "ref.json", tmp_path / "dev.json"
    common = ["eval", ckpt, "--data", data[1], "--eos-id", 0, "--seq-len", 16, "--sequences-per-batch", 2,
              "--batches", 2, "--no-progress"]
    _command(common + ["--json", json_ref])
    with no_numpy_conversion():
        _command(common + ["--json", json_dev], STRICT)
    assert json.loads(json_dev.read_text()) == json.loads(json_ref.read_text())

    want, got, moved = _on_both(["inspect", ckpt, "--tokens", "5,17,9,1,40,3", "--step"])
    assert got == want and "optimizer step" in want


# ---- cluster mode -------------------------------------------------------------------------------------------------
def _ranks(run, backend):
    """Every rank's trainer after training on virtual ranks."""
    def rank(comm):
        trainer = Trainer(run, log=_quiet, comm=comm, backend=backend)
        trainer.train()
        return trainer
    return VirtualCluster(run.layout.world_size).run(rank)


EVERY_OPTION = ("dp_shard=2,ep=2,keep_gathered=all,reshard_after_forward=none,reduce_gradients=step,async_reduce=true,"
                "muon_owners=local,gather_dtype=float32,reduce_dtype=float32")


@pytest.mark.parametrize("layout, seq_len", [("dp_shard=2,ep=2", 16), ("dp_replicate=2", 16), (EVERY_OPTION, 16),
                                             ("dp_shard=2,cp=2,ep=2", 32), ("cp=2,cp_exchange=read", 32)],
                         ids=["fsdp+ep", "replicas", "every-option", "fsdp+cp+ep", "cp-read"])
def test_virtual_ranks_on_devices_stage_their_collectives_and_train_the_same_model(tmp_path, data, layout, seq_len):
    single = Trainer(_run_config(tmp_path / "single", data, steps=2, sequences=4, seq_len=seq_len), log=_quiet)
    single.train()
    want = _ranks(_run_config(tmp_path / "reference", data, steps=2, sequences=4, seq_len=seq_len, layout=layout),
                  None)
    run = _run_config(tmp_path / "device", data, steps=2, sequences=4, seq_len=seq_len, layout=layout)
    before = transfer_counts()
    with no_numpy_conversion():
        got = _ranks(run, STRICT)
    moved = _moved(before)

    # the same layout on the reference table: the same bits (the staging copies, it adds nothing)
    assert _lines(tmp_path / "device") == _lines(tmp_path / "reference")
    _same_checkpoint(got[0].last_checkpoint, want[0].last_checkpoint)
    # and the single process's model, up to the layout's order of sums (float32 wire dtypes round on purpose)
    rtol = 1e-10 if "float32" not in layout else 1e-5
    a, b = _load(got[0].last_checkpoint), _load(single.last_checkpoint)
    for k, v in b.params.items():
        np.testing.assert_allclose(a.params[k], v, rtol=rtol, atol=rtol * float(np.max(np.abs(v))), err_msg=k)
    for x, y in zip(_lines(tmp_path / "device"), _lines(tmp_path / "single")):
        for k in ("total", "ce", "z", "balance"):
            assert math.isclose(x["loss"][k], y["loss"][k], rel_tol=rtol), (x["step"], k)

    # each rank: its state once, each step's and evaluation's batch arrays; the collectives staged, counted apart
    state = sum(len(t.params) + len(t.opt_state) - 1 + len(t.balance_state) for t in got)
    assert moved["to_device"] == state + len(got) * (2 * 2 + 1 * 2)
    assert moved["staged_to_host"] > 0 and moved["staged_to_device"] > 0


@pytest.mark.parametrize("layout, what", [("dp_shard=2,gather_dtype=bfloat16", "gather_dtype = bfloat16"),
                                          ("dp_replicate=2,reduce_dtype=bfloat16", "reduce_dtype = bfloat16")])
def test_what_is_not_wired_on_a_device_yet_is_refused_in_one_line(tmp_path, data, layout, what):
    pytest.importorskip("ml_dtypes")
    run = _run_config(tmp_path, data, steps=1, sequences=4, evaluate=False, layout=layout)
    with pytest.raises(RankFailed) as failed:
        _ranks(run, STRICT)
    error = failed.value.__cause__
    assert isinstance(error, RunConfigError) and what in str(error) and "\n" not in str(error)


class _OneGPU(type(STRICT)):
    """The stand-in device on hosts of one GPU each."""

    def device_count(self):
        return 1


def test_a_host_with_fewer_gpus_than_ranks_is_refused_on_every_rank(tmp_path, data):
    run = _run_config(tmp_path, data, steps=1, sequences=4, evaluate=False, layout="dp_shard=2")
    with pytest.raises(RankFailed) as failed:
        _ranks(run, _OneGPU())
    assert "runs 2 ranks (0,1) but has 1 GPU(s): one GPU per rank" in str(failed.value.__cause__)


def test_an_op_table_off_numpy_needs_a_placement():
    """get_backend's table hook checks the table: one computing on another module must place its arrays."""
    from trinity.accel import get_backend
    from trinity.reference.model.ops import ReferenceOps

    class Unplaced(ReferenceOps):
        xp = STRICT.xp

    assert get_backend(STRICT) is STRICT
    with pytest.raises(ValueError, match="does not place its arrays there: mix in trinity.accel.device.DeviceTable"):
        get_backend(Unplaced())
    with pytest.raises(ValueError, match="lacks"):
        get_backend(object())


# ---- the simulated cupy table -------------------------------------------------------------------------------------
SMALL = """num_hidden_layers = 3
vocab_size = 64
hidden_size = 16
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 8
intermediate_size = 24
moe_intermediate_size = 8
num_experts = 4
num_shared_experts = 1"""


def test_the_simulated_cupy_table_trains_the_reference_model(tmp_path_factory):
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (the test extra)")
    from trinity.accel import BackendUnavailable, cupy_backend
    try:
        sim = cupy_backend.simulated()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("small")
    docs = MarkovSource(64, eos_id=0, branching=4, mean_doc_len=10, seed=1).documents(400)
    write_token_file(d / "train.bin", docs, eos_id=0)
    runs = [_run_config(d / name, (d / "train.bin", None), steps=2, seq_len=8, evaluate=False,
                        overrides=SMALL) for name in ("ref", "sim")]
    want = Trainer(runs[0], log=_quiet)
    want.train()
    got = Trainer(runs[1], log=_quiet, backend=sim)
    before = transfer_counts()
    got.train()
    assert _moved(before)["to_device"] == 2 * 2  # each step's tokens and document ids; the state moved at the start
    for x, y in zip(_lines(d / "sim"), _lines(d / "ref")):
        for k in ("total", "ce", "z", "balance"):
            assert math.isclose(x["loss"][k], y["loss"][k], rel_tol=1e-10), (x["step"], k)
        assert x["expert_load"] == y["expert_load"]
    a, b = load_checkpoint(got.last_checkpoint), load_checkpoint(want.last_checkpoint)
    for k, v in b.params.items():
        np.testing.assert_allclose(a.params[k], v, rtol=1e-10, atol=1e-12 * float(np.max(np.abs(v))), err_msg=k)
