"""A whole training step of the backend against the reference, on small drawn configs (SPEC §4-§7, §9).

The step is checked stage by stage, each stage on the inputs it would see in training:
  1. loss_and_grads(ops=backend): every loss, every gradient, the embedding-output gradient and the routing
     statistics (chosen experts and expert counts must be identical: the draws stay away from top-k ties);
     with and without activation recompute;
  2. the balancing update from the backend's expert counts (identical counts give identical bits);
  3. the optimizer step on the reference's clipped gradients with the backend's newton_schulz in place of the
     reference's: every updated parameter and optimizer state.
Stage 3 takes the reference's gradients rather than the backend's because the first optimizer step is not a
continuous function of its inputs at the scale of rounding: AdamW's first update is lr·g/(|g| + ε) ≈ lr·sign(g),
so a gradient within its tolerance of 0 may flip a whole lr step, and Newton–Schulz multiplies differences along
small singular directions by ∏ a_j ≈ 500. The backend's part of the optimizer (Newton–Schulz) is what stage 3 pins.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from backends import is_simulated
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from strategies import min_topk_gap, random_params, small_configs, token_batches
from tolerances import (BF16, PERTURBED_RUNS, bf16_step_tol, check_close, eps, model_reduction_length, model_tol,
                        topk_gap)
from trinity.reference import loss_and_grads, model_forward
from trinity.reference.model.ops import REFERENCE
from trinity.reference.model.precision import with_precision
from trinity.reference.operators.optimizer_kernels import _coefficient_schedule
from trinity.reference.training.balancing import balance_step, init_balancing_state
from trinity.reference.training.optim import clip_grad_norm, init_optimizer_state, optimizer_step, param_group

STEP_SETTINGS = settings(max_examples=25, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                HealthCheck.filter_too_much])


def _to_backend(ops, params):
    return {k: ops.xp.asarray(v) for k, v in params.items()}


def _np(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, (dict, np.ndarray)) else np.asarray(x)


@st.composite
def step_cases(draw, max_layers=3, max_hidden=32, max_vocab=48, max_batch=2, max_len=24):
    config = draw(small_configs(max_layers=max_layers, max_hidden=max_hidden, max_vocab=max_vocab))
    config = config.replace(z_loss_coeff=draw(st.sampled_from([0.0, 1e-2, 0.3])),
                            balance_loss_coeff=draw(st.sampled_from([0.0, 1e-2, 0.3])),
                            load_balancing=draw(st.sampled_from(["sign", "smebu", "none"])),
                            muon_ns_coefficients=draw(st.sampled_from(["dion", "keller"])))
    params = random_params(config, draw(st.integers(0, 2**32 - 1)), router=draw(st.floats(0.5, 4.0)),
                           bias=draw(st.floats(0.0, 0.3)))
    tokens, labels, doc_ids = draw(token_batches(config, max_batch=max_batch, max_len=max_len))
    return config, params, tokens, labels, doc_ids, draw(st.booleans())


@STEP_SETTINGS
@given(step_cases())
def test_training_step(backend, dtype, record, case):
    if is_simulated(backend):
        pytest.skip("the simulated table runs test_training_step_simulated (smaller models)")
    check_training_step(backend, dtype, record, case)


# The CUDA simulator runs every GPU thread as a Python thread: a smaller model, one sequence, fewer examples
# (~2-6 s of CPU each here; conftest.py SIM_EXAMPLES and the marker below).
@pytest.mark.sim_examples(3)
@STEP_SETTINGS
@given(step_cases(max_layers=2, max_hidden=16, max_vocab=32, max_batch=1, max_len=12))
def test_training_step_simulated(backend, dtype, record, case):
    if not is_simulated(backend):
        pytest.skip("for tables under the CUDA simulator (the others run test_training_step)")
    check_training_step(backend, dtype, record, case)


def check_training_step(backend, dtype, record, case):
    """Stages 1-3 of the module docstring for one drawn case."""
    config, params64, tokens, labels, doc_ids, recompute = case
    params = {k: v.astype(dtype) for k, v in params64.items()}
    T = tokens.shape[1]
    _, ctx = model_forward(config, params, tokens, doc_ids)
    assume(min_topk_gap(config, params, ctx) > topk_gap(dtype, config, T))

    # 1. losses, gradients, statistics. The rounding scale of each output (tolerances.py): the reference in float32
    # against float64, and float64 runs on parameters perturbed by relative float32 ulps.
    losses_r, grads_r, stats_r = loss_and_grads(config, params, tokens, labels, doc_ids)
    runs = [loss_and_grads(config, {k: v.astype(t) for k, v in params64.items()}, tokens, labels, doc_ids)
            for t in (np.float32, np.float64)]
    rng = np.random.default_rng(0)
    for _ in range(PERTURBED_RUNS):
        perturbed = {k: v * (1 + eps(np.float32) * rng.standard_normal(v.shape)) for k, v in params64.items()}
        runs.append(loss_and_grads(config, perturbed, tokens, labels, doc_ids))
    assume(all(_same_routing(stats_r, r[2]) for r in runs))  # every run routes alike
    f64, others = runs[1], runs[:1] + runs[2:]
    inputs = [None if a is None else backend.xp.asarray(a) for a in (tokens, labels, doc_ids)]  # the batch moved in
    losses_b, grads_b, stats_b = loss_and_grads(config, _to_backend(backend, params), *inputs, recompute=recompute,
                                                ops=backend)
    n = model_reduction_length(config, T)

    # The gradient's global scale; at least the balance loss's coefficient: with K = E every f_i is equal, the balance
    # loss is the constant α and its gradient is exactly 0 in exact arithmetic, leaving rounding of terms of size ~α
    # (the whole gradient, when no label counts).
    G = max([float(np.max(np.abs(g))) for g in grads_r.values()] + [config.balance_loss_coeff])

    def check(actual, expected, part, key, what, scale=G):
        natural = max(float(np.max(np.abs(np.asarray(r[part][key], np.float64) - f64[part][key]))) for r in others)
        check_close(actual, expected, dtype, n, what=what, recorder=record, tol=model_tol(dtype, natural, n, scale))

    for key in ("ce", "z", "balance", "total"):
        check(losses_b[key], losses_r[key], 0, key, f"step loss {key}", abs(losses_r[key]))
    assert stats_b["tokens"] == stats_r["tokens"]
    assert _same_routing(stats_b, stats_r), "the backend chose other experts than the reference"
    assert set(grads_b) == set(grads_r)
    for key, g_r in grads_r.items():
        g_b = _np(grads_b[key])
        assert g_b.dtype == g_r.dtype, key
        if key.endswith("expert_bias"):
            np.testing.assert_array_equal(g_b, 0)
            continue
        check(g_b, g_r, 1, key, "step grad " + _kind(key))
    key = "embedding_output_grad"
    check(_np(stats_b[key]), stats_r[key], 2, key, "step grad embedding output")

    # 2. balancing from the backend's counts
    counts_r = {layer: s["expert_counts"] for layer, s in stats_r["layers"].items()}
    counts_b = {layer: _np(s["expert_counts"]) for layer, s in stats_b["layers"].items()}
    p_r, p_b = dict(params), dict(params)
    bal_r, bal_b = init_balancing_state(config, params), init_balancing_state(config, params)
    balance_step(config, p_r, bal_r, counts_r)
    balance_step(config, p_b, bal_b, counts_b)
    for key in p_r:
        np.testing.assert_array_equal(p_b[key], p_r[key], err_msg=key)
    for key in bal_r:
        np.testing.assert_array_equal(bal_b[key], bal_r[key], err_msg=key)

    # 3. the optimizer on the reference's clipped gradients, with the backend's Newton–Schulz
    clipped, _ = clip_grad_norm(grads_r, config.grad_clip_norm)
    new_r, state_r = _optimizer(config, params, clipped, None)
    new_b, state_b = _optimizer(config, params, clipped, backend)
    steps = config.muon_ns_steps
    cond = float(np.prod([abs(a) for a, _, _ in _coefficient_schedule(config.muon_ns_coefficients, steps)]))
    for key, x_r in new_r.items():
        x_b = new_b[key]
        if param_group(config, key, x_r.shape) != "muon":
            np.testing.assert_array_equal(x_b, x_r, err_msg=key)  # same code, same inputs
            continue
        m, k = sorted(x_r.shape[-2:])
        delta_r, delta_b = x_r - params[key], x_b - params[key]
        check_close(delta_b, delta_r, dtype, steps * (2 * m + k), scale=float(np.abs(delta_r).max()) * cond,
                    what="step muon update", recorder=record)
    for key in state_r:
        np.testing.assert_array_equal(state_b[key], state_r[key], err_msg=key)  # momenta: the gradients only


# ---- the bf16 step ---------------------------------------------------------------------------------------------------
@STEP_SETTINGS
@given(step_cases())
def test_training_step_bf16(backend, record, case):
    if is_simulated(backend):
        pytest.skip("the simulated table runs test_training_step_bf16_simulated (smaller models)")
    check_training_step_bf16(backend, record, case)


@pytest.mark.sim_examples(3)
@STEP_SETTINGS
@given(step_cases(max_layers=2, max_hidden=16, max_vocab=32, max_batch=1, max_len=12))
def test_training_step_bf16_simulated(backend, record, case):
    if not is_simulated(backend):
        pytest.skip("for tables under the CUDA simulator (the others run test_training_step_bf16)")
    check_training_step_bf16(backend, record, case)


def check_training_step_bf16(backend, record, case):
    """The backend's table at precision "bf16" (float32 master weights, bf16 operators: reference/model/precision.py)
    against the reference's bf16 step: losses, gradients (float32, every one), the embedding-output gradient and the
    routing, within bf16_step_tol of the reference bf16 step's own rounding (tolerances.py); then Newton–Schulz in
    bf16 inside the Muon update. The gradients must also differ from the float32 step's (the rounding happened)."""
    config, params64, tokens, labels, doc_ids, recompute = case
    params = {k: v.astype(np.float32) for k, v in params64.items()}
    T = tokens.shape[1]
    ref16 = with_precision(REFERENCE, "bf16")
    runs = [loss_and_grads(config, params64, tokens, labels, doc_ids),
            loss_and_grads(config, params, tokens, labels, doc_ids, ops=ref16)]
    rng = np.random.default_rng(0)
    for _ in range(PERTURBED_RUNS):
        perturbed = {k: (v * (1 + eps(np.float32) * rng.standard_normal(v.shape))).astype(np.float32)
                     for k, v in params64.items()}
        runs.append(loss_and_grads(config, perturbed, tokens, labels, doc_ids, ops=ref16))
    f64, (losses_r, grads_r, stats_r), others = runs[0], runs[1], runs[1:]
    assume(all(_same_routing(f64[2], r[2]) for r in others))  # bf16 rounding moved no top-k choice
    inputs = [None if a is None else backend.xp.asarray(a) for a in (tokens, labels, doc_ids)]
    losses_b, grads_b, stats_b = loss_and_grads(config, _to_backend(backend, params), *inputs, recompute=recompute,
                                                ops=with_precision(backend, "bf16"))
    assume(_same_routing(stats_b, stats_r))  # a bf16 rounding boundary straddled by float32 differences (docstring)
    n = model_reduction_length(config, T)
    G = max([float(np.max(np.abs(g))) for g in grads_r.values()] + [config.balance_loss_coeff])

    def check(actual, expected, part, key, what, scale=G):
        natural = max(float(np.max(np.abs(np.asarray(r[part][key], np.float64) - f64[part][key]))) for r in others)
        check_close(actual, expected, BF16, n, what=what, recorder=record, tol=bf16_step_tol(natural, n, scale))

    for key in ("ce", "z", "balance", "total"):
        check(losses_b[key], losses_r[key], 0, key, f"bf16 step loss {key}", abs(losses_r[key]))
    assert stats_b["tokens"] == stats_r["tokens"]
    assert set(grads_b) == set(grads_r)
    for key, g_r in grads_r.items():
        g_b = _np(grads_b[key])
        assert g_b.dtype == np.float32, key
        if not key.endswith("expert_bias"):
            check(g_b, g_r, 1, key, "bf16 step grad " + _kind(key))
    key = "embedding_output_grad"
    check(_np(stats_b[key]), stats_r[key], 2, key, "bf16 step grad embedding output")
    full32 = loss_and_grads(config, params, tokens, labels, doc_ids)[1]
    assert any(not np.array_equal(grads_r[k], full32[k]) for k in grads_r if np.any(full32[k])), \
        "the bf16 step computed the float32 step"

    # Newton–Schulz in bf16 inside the Muon update: the backend's bf16 table against the reference's
    clipped, _ = clip_grad_norm(grads_r, config.grad_clip_norm)
    new_r, _ = _optimizer(config, params, clipped, ref16)
    new_b, _ = _optimizer(config, params, clipped, with_precision(backend, "bf16"))
    steps = config.muon_ns_steps
    for key, x_r in new_r.items():
        if param_group(config, key, x_r.shape) == "muon":
            m, k = sorted(x_r.shape[-2:])
            delta_r, delta_b = x_r - params[key], new_b[key] - params[key]
            check_close(delta_b, delta_r, BF16, steps * (2 * m + k), scale=float(np.abs(delta_r).max()),
                        what="bf16 step muon update", recorder=record)


def _same_routing(stats_a, stats_b) -> bool:
    """Identical chosen experts and expert counts in every MoE layer."""
    if set(stats_a["layers"]) != set(stats_b["layers"]):
        return False
    return all(np.array_equal(_np(stats_a["layers"][l][f]), stats_b["layers"][l][f])
               for l in stats_b["layers"] for f in ("chosen_experts", "expert_counts"))


def _kind(key: str) -> str:
    """A parameter key without its layer index, for the error summary."""
    parts = key.split(".")
    return ".".join(p for p in parts if not p.isdigit()).replace("model.layers.", "").replace("model.", "")


def _optimizer(config, params, grads, backend):
    """One optimizer_step on copies; `backend`'s optimizer kernels replace the reference's when given."""
    p = {k: v.copy() for k, v in params.items()}
    state = init_optimizer_state(config, p)
    if backend is None:
        optimizer_step(config, p, grads, state, config.muon_lr, config.adamw_lr)
        return p, state

    def ns(G, **kwargs):
        return _np(backend.newton_schulz(backend.xp.asarray(G), **kwargs))

    # the optimizer holds NumPy arrays; the elementwise kernels take them as they are (CuPy's would need host copies)
    kernels = SimpleNamespace(newton_schulz=ns, adamw_update=backend.adamw_update)
    optimizer_step(config, p, grads, state, config.muon_lr, config.adamw_lr, kernels=kernels)
    return p, state
