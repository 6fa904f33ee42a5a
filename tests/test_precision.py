"""Mixed precision (reference/model/precision.py, `[train] precision = "bf16"`) and the bf16 emulation under it
(reference/operators/bf16.py).

- round_bf16 is round-to-nearest-even to bf16: against an independent float64 definition and against ml_dtypes'
  bfloat16 cast; a bf16-factor product with float32 accumulation stays within its derived tolerance.
- BF16_RULES cover every leaf operator once (rounded or deliberately float32), and name real arguments.
- In a whole forward and backward the wrapped table hands its base bf16 values exactly where the rules say and
  float32 elsewhere (norm gains, expert_bias, the router's gate weights into combine), returns bf16 activations and
  float32 parameter gradients; the master weights and optimizer state stay float32 and are updated in float32.
- The bf16 step of the reference against float64: its loss within the first-order bf16 scale (tolerances.py).
- `[train] precision` in a run file: parsed, refused with float64 master weights, a run that resumes bit for bit.
Backends against the reference's bf16 step: tests/conformance/test_conformance_step.py (test_training_step_bf16).
"""

from __future__ import annotations

import dataclasses
import inspect
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "conformance"))
from tolerances import BF16, MODEL_C, PERTURBED_RUNS, bf16_product_tol, eps  # noqa: E402

from strategies import random_params  # noqa: E402
from trinity.reference import Config, loss_and_grads  # noqa: E402
from trinity.reference.model.ops import LEAF_OPS, REFERENCE, ReferenceOps  # noqa: E402
from trinity.reference.model.precision import (ALL, BF16_RULES, FLOAT32_OPS, MixedPrecisionOps,  # noqa: E402
                                               with_precision)
from trinity.reference.operators.bf16 import bf16_matmul, round_bf16  # noqa: E402
from trinity.reference.training.balancing import init_balancing_state  # noqa: E402
from trinity.reference.training.optim import init_optimizer_state  # noqa: E402
from trinity.reference.training.step import GlobalBatch, apply_update, compute_gradients  # noqa: E402


def _is_bf16(x) -> bool:
    """Every value of the float32 array x is a bf16 value (its low 16 bits are zero)."""
    x = np.asarray(x)
    return x.dtype == np.float32 and not np.any(x.view(np.uint32) & np.uint32(0xFFFF))


# ---- bf16 emulation -------------------------------------------------------------------------------------------------
def _bf16_by_arithmetic(x):
    """Round-to-nearest-even to 8 significant bits in float64 arithmetic (subnormals: a fixed step of 2⁻¹³³;
    beyond the largest bf16, ±inf): an independent definition of the bit trick in round_bf16."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    finite = np.isfinite(x) & (x != 0)
    e = np.floor(np.log2(np.abs(np.where(finite, x, 1.0))))
    ulp = 2.0 ** (np.maximum(e, -126) - 7)
    out = np.where(finite, np.round(x / ulp) * ulp, x)  # np.round: half to even
    largest = (2 - 2.0 ** -7) * 2.0 ** 127
    return np.where(np.abs(out) > largest, np.copysign(np.inf, out), out)


def test_round_bf16_is_round_to_nearest_even():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    special = np.array([0.0, -0.0, 1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 3.3961e38, 3.4e38,
                        -3.4e38, 1e-40, -1e-45, 2.0 ** -126, np.finfo(np.float32).max], np.float32)
    x = np.concatenate([x, special])
    got = round_bf16(x)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.astype(np.float64), _bf16_by_arithmetic(x))
    assert not np.any(got.view(np.uint32) & np.uint32(0xFFFF))
    nan_inf = round_bf16(np.array([np.nan, np.inf, -np.inf], np.float32))
    assert np.isnan(nan_inf[0]) and nan_inf[1] == np.inf and nan_inf[2] == -np.inf


@pytest.mark.parametrize("n", [1, 7, 300])
def test_bf16_product_is_within_its_tolerance(n):
    """A product with bf16 factors and float32 accumulation against float64: tolerances.bf16_product_tol (2u of the
    terms from rounding the factors, whatever n); and it is not the float32 product (the factors are rounded)."""
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((9, n)).astype(np.float32), rng.standard_normal((n, 4)).astype(np.float32)
    got = bf16_matmul(a, b)
    want = a.astype(np.float64) @ b.astype(np.float64)
    terms = float((np.abs(a).astype(np.float64) @ np.abs(b)).max())
    assert float(np.abs(got - want).max()) <= bf16_product_tol(n, terms)
    assert float(np.abs(got - a @ b).max()) > eps(np.float32) * terms
    assert eps(BF16) == 2.0 ** -7




def test_round_bf16_is_ml_dtypes_bfloat16_cast():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2 ** 32, 50000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x, np.array([np.inf, -np.inf, 0.0, -0.0, 3.4e38], np.float32)])
    with np.errstate(invalid="ignore"):  # NaN payloads
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    got = round_bf16(x)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.array_equal(np.isnan(got), np.isnan(want))


# ---- the rules -------------------------------------------------------------------------------------------------------
def test_every_leaf_operator_has_one_precision_rule():
    leaf = {name for names in LEAF_OPS.values() for name in names}
    assert set(BF16_RULES) | set(FLOAT32_OPS) == leaf
    assert not set(BF16_RULES) & set(FLOAT32_OPS)
    for name, (args, results) in BF16_RULES.items():
        parameters = inspect.signature(getattr(ReferenceOps, name)).parameters
        assert set(args) <= set(parameters), name
        assert results == ALL or all(isinstance(i, int) for i in results), name


def test_full_precision_is_the_table_itself_and_bad_names_are_refused():
    assert with_precision(REFERENCE, "full") is REFERENCE
    assert isinstance(with_precision(None, "bf16"), MixedPrecisionOps)
    with pytest.raises(ValueError, match="precision must be one of full, bf16"):
        with_precision(REFERENCE, "fp8")
    wrapped = with_precision(REFERENCE, "bf16")  # placement, seams and scope are the base table's
    assert wrapped.to_device == REFERENCE.to_device and wrapped.on_device is REFERENCE.on_device
    assert wrapped.gather_params == REFERENCE.gather_params and wrapped.xp is REFERENCE.xp


class _Spy:
    """An op table that records what each leaf operator receives and returns, then runs the reference's."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        attr = getattr(REFERENCE, name)
        if name not in BF16_RULES:
            return attr

        def recorded(*args, **kwargs):
            out = attr(*args, **kwargs)
            bound = inspect.signature(getattr(ReferenceOps, name)).bind(*args, **kwargs)
            self.calls.append((name, dict(bound.arguments), out))
            return out
        return recorded


def _config():
    return Config.preset("tiny").replace(intra_document_mask=True, z_loss_coeff=1e-2, balance_loss_coeff=1e-2)


def _batch(config, seed=0, S=2, T=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (S, T))
    return tokens, np.where(rng.random((S, T)) < 0.2, -100, tokens), np.sort(rng.integers(0, 2, (S, T)), axis=1)


def test_the_base_table_sees_bf16_exactly_where_the_rules_say():
    config = _config()
    params = {k: v.astype(np.float32) for k, v in random_params(config, 3).items()}
    tokens, labels, docs = _batch(config)
    spy = _Spy()
    _, grads, _ = loss_and_grads(config, params, tokens, labels, docs, ops=MixedPrecisionOps(spy))
    seen = {name for name, _, _ in spy.calls}
    assert seen == set(BF16_RULES)
    for name, arguments, out in spy.calls:
        rounded, results = BF16_RULES[name]
        for arg, value in arguments.items():
            if arg in rounded and getattr(value, "dtype", None) is not None and value.dtype.kind == "f":
                assert _is_bf16(value), (name, arg)
        assert name != "rmsnorm_forward" or not _is_bf16(arguments["gain"]), "the norm gains stay float32"
        assert name != "router_forward" or not _is_bf16(arguments["expert_bias"])
        assert name != "combine" or not _is_bf16(arguments["weights"]), "the router's gate weights stay float32"
    for key, g in grads.items():  # parameter gradients: float32 sums, not rounded
        assert g.dtype == np.float32, key
        if g.size > 8 and np.any(g):
            assert not _is_bf16(g), key
    for key, p in params.items():
        assert p.dtype == np.float32 and (p.size < 8 or not _is_bf16(p)), key  # the master copy is untouched


def test_wrapped_results_are_bf16_where_the_rules_say():
    rng = np.random.default_rng(0)
    ops = with_precision(REFERENCE, "bf16")
    x, w = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((3, 7)).astype(np.float32)
    y, ctx = ops.linear_forward(x, w)
    np.testing.assert_array_equal(y, round_bf16(round_bf16(x) @ round_bf16(w).T))
    dx, dw = ops.linear_backward(ctx, rng.standard_normal((5, 3)).astype(np.float32))
    assert _is_bf16(dx) and not _is_bf16(dw)
    gain = rng.uniform(0.5, 1.5, 7).astype(np.float32)
    y, (_, _, kept) = ops.rmsnorm_forward(x, gain, 1e-6)
    assert _is_bf16(y) and kept is gain
    G = rng.standard_normal((6, 4)).astype(np.float32)
    O = ops.newton_schulz(G, steps=5, coefficients="dion")
    assert O.dtype == np.float32 and _is_bf16(O) and not np.array_equal(O, REFERENCE.newton_schulz(G))


# ---- the bf16 step against float64 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bf16_loss_is_within_the_first_order_bf16_scale_of_float64(seed):
    """|loss_bf16 − loss_64| ≤ MODEL_C · natural32 · eps(bf16)/eps(float32), natural32 = the float32 step's distance
    to float64, on the parameters and on relative float32-ulp perturbations of them (tolerances.py); and the bf16
    loss is not the float32 one."""
    config = _config()
    params64 = random_params(config, seed)
    tokens, labels, docs = _batch(config, seed)
    want = loss_and_grads(config, params64, tokens, labels, docs)[0]["total"]
    rng = np.random.default_rng(seed)
    natural = 0.0
    for k in range(1 + PERTURBED_RUNS):
        p = params64 if k == 0 else {n: v * (1 + eps(np.float32) * rng.standard_normal(v.shape))
                                     for n, v in params64.items()}
        f32 = loss_and_grads(config, {n: v.astype(np.float32) for n, v in p.items()}, tokens, labels, docs)
        natural = max(natural, abs(f32[0]["total"] - want))
    params = {k: v.astype(np.float32) for k, v in params64.items()}
    got = loss_and_grads(config, params, tokens, labels, docs, ops=with_precision(REFERENCE, "bf16"))[0]["total"]
    assert abs(got - want) <= MODEL_C * natural * eps(BF16) / eps(np.float32)
    assert abs(got - want) > 10 * natural  # bf16, not float32


def test_a_bf16_step_keeps_float32_master_weights_and_state():
    config = _config()
    params = {k: v.astype(np.float32) for k, v in random_params(config, 5).items()}
    tokens, labels, docs = _batch(config, 5)
    ops = with_precision(REFERENCE, "bf16")
    opt, bal = init_optimizer_state(config, params), init_balancing_state(config, params)
    before = {k: v.copy() for k, v in params.items()}
    g = compute_gradients(config, params, GlobalBatch(tokens, labels, docs), micro_batch_size=1, ops=ops)
    apply_update(config, params, opt, bal, g, 1e-2, 1e-2, ops=ops)
    for tree in (params, opt, bal):
        for key, value in tree.items():
            if getattr(value, "dtype", None) is not None and value.dtype.kind == "f":
                assert value.dtype == np.float32, key
    moved = [k for k in params if not np.array_equal(params[k], before[k])]
    assert len(moved) > len(params) // 2


# ---- [train] precision in a run ---------------------------------------------------------------------------------------
RUN = """
[model]
preset = "tiny"
dtype = "{dtype}"
[data]
path = "{data}"
eos_id = 0
seq_len = 16
micro_batch_size = 2
[train]
steps = 4
sequences_per_step = 4
precision = "{precision}"
[optimizer]
muon_lr = 0.02
adamw_lr = 0.01
[checkpoint]
dir = "ckpt"
every = 2
keep_last = 5
[logging]
metrics = "metrics.jsonl"
progress = false
"""


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    from markov_files import markov_token_file
    return markov_token_file(tmp_path_factory.mktemp("data") / "train.bin", 400)


def _run_file(folder, data, precision="bf16", dtype="float32"):
    from trinity.run.run_config import load_run_config
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.toml").write_text(RUN.format(data=data, precision=precision, dtype=dtype))
    return load_run_config(folder / "run.toml")


def test_run_files_take_precision_and_refuse_what_does_not_fit(tmp_path, tokens_file):
    from trinity.run.run_config import RunConfigError
    assert _run_file(tmp_path / "a", tokens_file).precision == "bf16"
    with pytest.raises(RunConfigError, match=r'precision = "bf16" keeps float32 master weights'):
        _run_file(tmp_path / "b", tokens_file, dtype="float64")
    with pytest.raises(RunConfigError, match=r"\[train\] precision"):
        _run_file(tmp_path / "c", tokens_file, precision="fp16")


def test_a_bf16_run_resumes_bit_for_bit_and_differs_from_full_precision(tmp_path, tokens_file):
    import json

    from trinity.reference.training.checkpoint import load_checkpoint
    from trinity.run.trainer import Trainer

    def quiet(*args, **kwargs):
        pass

    def lines(folder):
        timing = ("seconds", "tokens_per_s", "peak_rss", "memory", "start")
        return [{k: v for k, v in json.loads(x).items() if k not in timing}
                for x in (folder / "metrics.jsonl").read_text().splitlines()]

    through = Trainer(_run_file(tmp_path / "through", tokens_file), log=quiet)
    through.train()
    run = _run_file(tmp_path / "stopped", tokens_file)
    first = Trainer(run, log=quiet)
    first.stop_requested = lambda: signal.SIGTERM if first.step == 2 else None
    first.train()
    assert first.step == 2
    resumed = Trainer(run, resume=True, log=quiet)
    resumed.train()
    assert lines(tmp_path / "stopped") == lines(tmp_path / "through")
    a, b = load_checkpoint(through.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    for name in ("params", "optimizer_state", "balancing_state"):
        x, y = getattr(a, name), getattr(b, name)
        assert set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x), name
    assert all(v.dtype == np.float32 for v in a.params.values())
    full = Trainer(_run_file(tmp_path / "full", tokens_file, precision="full"), log=quiet)
    full.train()
    assert lines(tmp_path / "full")[0]["loss"] != lines(tmp_path / "through")[0]["loss"]


def test_resuming_at_another_precision_says_so(tmp_path, tokens_file):
    from trinity.run.trainer import Trainer
    Trainer(_run_file(tmp_path / "r", tokens_file), log=lambda *a, **k: None).train()
    said = []
    full = dataclasses.replace(_run_file(tmp_path / "r", tokens_file, precision="full"), steps=5)
    Trainer(full, resume=True, log=lambda m, *a, **k: said.append(m)).train()
    assert any("[train] precision bf16 != full" in m for m in said), said


@pytest.mark.parametrize("text", ["dp_shard=2,ep=2", "dp_replicate=2,cp=2"])
def test_a_bf16_run_under_a_layout_is_the_single_process_bf16_run(tmp_path, tokens_file, text):
    """Virtual ranks: each step's loss equals the single process's within one bf16 rounding (eps(bf16) relative: the
    ranks sum in other orders in float32, which may straddle a bf16 boundary), and every rank's state is float32."""
    import json

    from trinity.distributed.layout import Layout
    from trinity.run.trainer import Trainer
    from trinity.simulate.virtual.virtual_comm import VirtualCluster

    def quiet(*args, **kwargs):
        pass

    Trainer(_run_file(tmp_path / "single", tokens_file), log=quiet).train()
    run = dataclasses.replace(_run_file(tmp_path / "layout", tokens_file), layout=Layout.parse(text))

    def rank(comm):
        trainer = Trainer(run, log=quiet, comm=comm)
        trainer.train()
        return trainer.whole_state()[0]

    for params in VirtualCluster(run.layout.world_size).run(rank):
        assert all(v.dtype == np.float32 for v in params.values())

    def losses(folder):
        return [json.loads(x)["loss"]["total"] for x in (folder / "metrics.jsonl").read_text().splitlines()]

    want, got = losses(tmp_path / "single"), losses(tmp_path / "layout")
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert abs(g - w) <= eps(BF16) * abs(w), (text, got, want)


# ---- --precision on the commands --------------------------------------------------------------------------------------
def test_the_commands_take_precision(tmp_path, tokens_file, capsys):
    from trinity.cli.main import main

    def loss_line(*extra):
        assert main(["inspect", "tiny", "--tokens", "1,2,3,4,5", "--step", *extra]) == 0
        return [x for x in capsys.readouterr().out.splitlines() if "loss total" in x][0]

    full, bf16 = loss_line(), loss_line("--precision", "bf16")
    assert full != bf16  # the bf16 step computed something else, and said it
    _run_file(tmp_path / "f64", tokens_file, precision="full", dtype="float64")
    assert main(["train", str(tmp_path / "f64" / "run.toml"), "--precision", "bf16"]) == 2
    assert 'precision = "bf16" keeps float32 master weights' in capsys.readouterr().err
    _run_file(tmp_path / "f32", tokens_file, precision="full")
    assert main(["train", str(tmp_path / "f32" / "run.toml"), "--precision", "bf16"]) == 0
    from trinity.reference.training.checkpoint import load_checkpoint
    last = sorted((tmp_path / "f32" / "ckpt").glob("step_*"))[-1]
    assert load_checkpoint(last).extra["precision"] == "bf16"
