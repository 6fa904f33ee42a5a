"""Load balancing (SPEC §6): the SMEBU and sign updates against their equations, MaxVio, and both driving a skewed
router towards balance where `none` does not."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.reference import Config, evaluate_losses, init_params
from trinity.reference.training.balancing import (balance_step, init_balancing_state, max_violation, sign_update,
                                                  smebu_update)
from strategies import random_params


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 64), st.integers(1, 6), st.floats(1e-5, 1e-2), st.floats(0.0, 0.95), st.floats(0.1, 5.0),
       st.integers(0, 2**32 - 1))
def test_smebu_matches_its_equations_over_several_steps(E, steps, lam, beta, kappa, seed):
    """Trinity eqs. 23-28, written out element by element, momentum carried across steps."""
    rng = np.random.default_rng(seed)
    bias, momentum = np.zeros(E), np.zeros(E)
    b_ref, m_ref = [0.0] * E, [0.0] * E
    for _ in range(steps):
        counts = rng.integers(0, 50, E)
        bias, momentum = smebu_update(bias, momentum, counts, lam, beta, kappa)
        mean = sum(counts) / E
        if mean == 0:
            continue
        delta = [lam * math.tanh(kappa * (mean - n) / mean) for n in counts]
        centre = sum(delta) / E
        for i in range(E):
            m_ref[i] = beta * m_ref[i] + (1 - beta) * (delta[i] - centre)
            b_ref[i] += m_ref[i]
    np.testing.assert_allclose(momentum, m_ref, rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(bias, b_ref, rtol=1e-12, atol=1e-18)
    assert abs(bias.mean()) < 1e-15 and abs(momentum.mean()) < 1e-15  # centred Δb keeps both zero-mean


def test_smebu_moves_bias_towards_underloaded_experts_and_is_bounded():
    counts = np.array([100, 0, 50, 50])
    bias, momentum = smebu_update(np.zeros(4), np.zeros(4), counts, lam=1.0, beta=0.0, kappa=2.0)
    assert bias[1] > 0 > bias[0] and bias[2] == bias[3]
    assert np.abs(bias).max() <= 2.0  # |Δb| ≤ λ before centring, ≤ 2λ after
    unchanged = smebu_update(bias, momentum, np.zeros(4), 1.0, 0.5, 2.0)
    np.testing.assert_array_equal(unchanged[0], bias)  # a step with no tokens changes nothing


def test_sign_update_is_centred_gamma_steps():
    counts = np.array([10, 2, 6, 6])
    new = sign_update(np.zeros(4), counts, gamma=0.1)
    raw = 0.1 * np.sign(counts.mean() - counts)  # [-0.1, 0.1, 0, 0]
    np.testing.assert_allclose(new, raw - raw.mean(), rtol=1e-15)


def test_max_violation():
    assert max_violation([4, 4, 4, 4]) == 0.0
    assert max_violation([8, 0, 4, 4]) == pytest.approx(1.0)
    assert max_violation([0, 0]) == 0.0


def skewed_router_model(seed=0):
    """`tiny` with random weights and a router that sends most tokens to the low-numbered experts: each expert's
    gate row gets +α_e times the mean direction of its inputs, α decreasing with e."""
    c = Config.preset("tiny").replace(num_experts=8, num_experts_per_tok=2)
    p = random_params(c, seed, router=1.0, bias=0.0)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, c.vocab_size, (4, 32))
    _, stats = evaluate_losses(c, p, tokens, tokens)
    for layer in stats["layers"]:
        w = p[f"model.layers.{layer}.mlp.router.gate.weight"]
        direction = np.ones(c.hidden_size) / np.sqrt(c.hidden_size)
        w += np.linspace(3.0, -3.0, c.num_experts)[:, None] * direction[None, :]
        p[f"model.layers.{layer}.mlp.expert_bias"] = np.zeros(c.num_experts, np.float32)  # float32: decisions #18
    return c, p, tokens


@pytest.mark.parametrize("method, rate", [("smebu", 2e-2), ("sign", 1e-2)])
def test_balancing_drives_max_vio_down_on_a_skewed_router(method, rate):
    """Router weights frozen, only the bias moves: after 150 steps the balanced run's MaxVio is far below both its
    own start and the `none` run's (which stays where it started)."""
    base, params, tokens = skewed_router_model()

    def run(config):
        p = {k: v.copy() for k, v in params.items()}
        state = init_balancing_state(config, p)
        history = []
        for _ in range(150):
            _, stats = evaluate_losses(config, p, tokens, tokens)
            counts = {l: s["expert_counts"] for l, s in stats["layers"].items()}
            history.append(max(max_violation(n) for n in counts.values()))
            balance_step(config, p, state, counts)
        return history

    none = run(base.replace(load_balancing="none"))
    balanced = run(base.replace(load_balancing=method, smebu_lambda=rate, sign_update_rate=rate))
    assert none[0] == balanced[0] > 1.0  # the skew is real: some expert gets > 2× its share
    assert none[-1] == none[0]
    assert np.mean(balanced[-20:]) < 0.5 * none[-1]


@pytest.mark.parametrize("method", ["smebu", "sign"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_balancing_keeps_bias_and_momentum_float32(method, dtype):
    """docs/decisions.md #18: the bias and the SMEBU momentum are float32 whatever the model's dtype, across steps;
    each update is the float64 formula rounded once to float32, and b moves by exactly the stored m."""
    c = Config.preset("tiny").replace(load_balancing=method, smebu_lambda=1e-2, sign_update_rate=1e-2)
    params = init_params(c, seed=0, dtype=dtype)
    state = init_balancing_state(c, params)
    assert all(v.dtype == np.float32 for v in state.values())
    assert len(state) == (c.num_hidden_layers - c.num_dense_layers if method == "smebu" else 0)
    rng = np.random.default_rng(0)
    layers = range(c.num_dense_layers, c.num_hidden_layers)
    for _ in range(3):
        counts = {l: rng.integers(0, 40, c.num_experts).astype(np.float64) for l in layers}
        old = {l: params[f"model.layers.{l}.mlp.expert_bias"].copy() for l in layers}
        m_old = {k: v.copy() for k, v in state.items()}
        balance_step(c, params, state, counts)
        for l in layers:
            key = f"model.layers.{l}.mlp.expert_bias"
            assert params[key].dtype == np.float32, key
            if method == "sign":
                want = sign_update(old[l].astype(np.float64), counts[l], c.sign_update_rate).astype(np.float32)
            else:
                mkey = "smebu.momentum/" + key
                b64, m64 = smebu_update(old[l].astype(np.float64), m_old[mkey].astype(np.float64), counts[l],
                                        c.smebu_lambda, c.smebu_beta, c.smebu_kappa)
                assert state[mkey].dtype == np.float32
                np.testing.assert_array_equal(state[mkey], m64.astype(np.float32))
                want = (old[l].astype(np.float64) + state[mkey]).astype(np.float32)
            np.testing.assert_array_equal(params[key], want)
    assert all(v.dtype == dtype for k, v in params.items() if not k.endswith("expert_bias"))
    assert any(np.abs(params[f"model.layers.{l}.mlp.expert_bias"]).max() > 0 for l in layers)


def test_balance_step_stores_a_model_dtype_bias_as_float32():
    """A bias given in a float64 model's dtype (params cast key by key) is stored float32 after its first update."""
    c = Config.preset("tiny").replace(load_balancing="sign")
    params = {k: v.astype(np.float64) for k, v in init_params(c, seed=0, dtype=np.float64).items()}
    key = f"model.layers.{c.num_dense_layers}.mlp.expert_bias"
    assert params[key].dtype == np.float64
    balance_step(c, params, {}, {c.num_dense_layers: np.arange(c.num_experts, dtype=np.float64)})
    assert params[key].dtype == np.float32 and np.abs(params[key]).max() > 0
