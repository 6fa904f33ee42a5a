"""Muon (Dion flavour) and AdamW (SPEC §9; §14 #2, #3, #4, #5): Newton–Schulz properties, two optimizer steps
against an independent hand computation, parameter grouping, gradient clipping."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trinity.reference import Config, init_params, param_shapes
from trinity.reference.operators.optimizer_kernels import NS_COEFFICIENTS, newton_schulz
from trinity.reference.training.optim import (clip_grad_norm, init_optimizer_state, muon_lr_scale, optimizer_step,
                                              param_group, weight_decay_for)

# Written out again from SPEC §9.2 / §9.3, not imported, so a typo in optim.py shows up here.
DION = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]
KELLER = [(3.4445, -4.7750, 2.0315)] * 5
TRIPLES = {"dion": DION, "keller": KELLER}

# Singular-value bands after 5 steps for inputs whose Frobenius-normalised singular values lie in [1/80, 1]
# (condition number ≤ 10 and min(m, n) ≤ 64, so σ_min/‖G‖_F ≥ 1/(10·8)). Measured by test_measured_bands.
LOWEST_NORMALISED_SIGMA = 1.0 / 80.0
BANDS = {"dion": (0.97775, 1.03178), "keller": (0.68183, 1.13436)}


def _scalar_ns(s, triples):
    """What the iteration does to each singular value: σ ← aσ + bσ³ + cσ⁵, step by step."""
    s = np.asarray(s, dtype=np.float64)
    for a, b, c in triples:
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def _orthonormal_columns(rng, rows, cols):
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))


def _well_conditioned(rng, m, n, cond=10.0):
    """G = U diag(s) Vᵀ with random orthonormal U [m, k], V [n, k], s descending in [1, cond], k = min(m, n)."""
    k = min(m, n)
    U, V = _orthonormal_columns(rng, m, k), _orthonormal_columns(rng, n, k)
    s = np.sort(rng.uniform(1.0, cond, k))[::-1]
    s[0], s[-1] = cond, 1.0  # use the whole range
    return U, s, V


shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))


# ---- Newton–Schulz ------------------------------------------------------------------------------------------------
def test_coefficient_tables_are_the_spec_ones():
    assert [tuple(t) for t in NS_COEFFICIENTS["dion"]] == DION
    assert [tuple(t) for t in NS_COEFFICIENTS["keller"]] == KELLER


def test_measured_bands():
    """Measured bands of the 5-step scalar map over normalised inputs σ ∈ [1/80, 1]:
        dion   [0.977751, 1.031775]    (the design band: every singular value ends within ~3% of 1)
        keller [0.681831, 1.134357]    (Keller Jordan's fixed triple: fast growth, loose band)
    Both bands hold for normalised σ ≥ ≈0.006 (dion) / ≈0.005 (keller); smaller singular values have not caught up
    after 5 steps (σ = 1e-3 ends near 0.47 with either set)."""
    x = np.geomspace(LOWEST_NORMALISED_SIGMA, 1.0, 400_001)
    for name, (lo, hi) in BANDS.items():
        y = _scalar_ns(x, TRIPLES[name])
        assert lo - 1e-5 <= y.min() <= lo + 1e-5 and hi - 1e-5 <= y.max() <= hi + 1e-5, (name, y.min(), y.max())


def test_coefficient_order_matters():
    """Sanity for the next test: the Dion triples in reverse order give a visibly different map, so comparing
    against the scalar map catches a mixed-up order."""
    x = np.geomspace(LOWEST_NORMALISED_SIGMA, 1.0, 1001)
    assert np.abs(_scalar_ns(x, DION) - _scalar_ns(x, DION[::-1])).max() > 1e-2


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), name=st.sampled_from(["dion", "keller"]))
def test_ns_moves_singular_values_only(shape, seed, name):
    """NS(U diag(s) Vᵀ) = U diag(p(s/(‖s‖₂ + ε))) Vᵀ with p the 5-step scalar map: the singular vectors of the
    polar factor U Vᵀ are kept and each singular value follows p. Breaks on a wrong normalisation (spectral instead
    of Frobenius), a wrong coefficient order, or a bad transpose for tall matrices."""
    m, n = shape
    U, s, V = _well_conditioned(np.random.default_rng(seed), m, n)
    G = (U * s) @ V.T
    X = newton_schulz(G, coefficients=name, eps=1e-8)
    assert X.shape == G.shape and X.dtype == np.float64
    expected = (U * _scalar_ns(s / (np.linalg.norm(s) + 1e-8), TRIPLES[name])) @ V.T
    np.testing.assert_allclose(X, expected, rtol=0, atol=1e-11)
    # Uᵀ X V is diagonal: the same singular vectors as the polar factor U Vᵀ.
    core = U.T @ X @ V
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0.0, atol=1e-11)


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), name=st.sampled_from(["dion", "keller"]))
def test_ns_singular_values_lie_in_the_band(shape, seed, name):
    """float32 (the training dtype here): every singular value of NS(G) lies in the measured band (± float32
    rounding), for condition number ≤ 10."""
    m, n = shape
    U, s, V = _well_conditioned(np.random.default_rng(seed), m, n)
    G = ((U * s) @ V.T).astype(np.float32)
    X = newton_schulz(G, coefficients=name)
    assert X.dtype == np.float32
    sv = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    lo, hi = BANDS[name]
    assert lo - 1e-4 <= sv.min() and sv.max() <= hi + 1e-4, (sv.min(), sv.max())


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3))
def test_ns_transpose_and_scale_invariance(shape, seed, scale):
    """NS(Gᵀ) = NS(G)ᵀ and NS(cG) = NS(G) for c > 0 (Frobenius pre-normalisation)."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal(shape)
    X = newton_schulz(G, eps=0.0)
    np.testing.assert_allclose(newton_schulz(G.T, eps=0.0), X.T, rtol=0, atol=1e-10)
    np.testing.assert_allclose(newton_schulz(scale * G, eps=0.0), X, rtol=0, atol=1e-10)


@given(batch=st.integers(1, 4), shape=shapes, seed=st.integers(0, 2**32 - 1),
       name=st.sampled_from(["dion", "keller"]))
def test_ns_batch_is_per_matrix(batch, shape, seed, name):
    """A [B, m, n] batch equals B separate calls; the matrices differ in scale by up to 10⁶, so one norm for the
    whole batch (or flattening) would fail."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((batch, *shape)) * (10.0 ** rng.uniform(-3, 3, (batch, 1, 1)))
    X = newton_schulz(G, coefficients=name)
    for b in range(batch):
        np.testing.assert_allclose(X[b], newton_schulz(G[b], coefficients=name), rtol=0, atol=1e-12)
    X4 = newton_schulz(G.reshape(1, batch, *shape), coefficients=name)
    np.testing.assert_allclose(X4[0], X, rtol=0, atol=1e-12)


def test_ns_dtypes_and_zero():
    G = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert newton_schulz(G).dtype == np.float32
    assert newton_schulz(G.astype(np.float32), dtype=np.float64).dtype == np.float64
    assert newton_schulz(G.astype(np.float64)).dtype == np.float64
    assert np.all(newton_schulz(np.zeros((2, 5, 3))) == 0)
    with pytest.raises(ValueError):
        newton_schulz(np.ones(3))


def test_ns_steps_beyond_the_table_repeat_the_last_triple():
    G = np.random.default_rng(0).standard_normal((6, 9))
    np.testing.assert_allclose(newton_schulz(G, steps=7),
                               newton_schulz(G, steps=7, coefficients=DION + DION[-1:] * 2))
    np.testing.assert_allclose(newton_schulz(G, steps=3), newton_schulz(G, steps=3, coefficients=DION[:3]))


# ---- lr scale and grouping ----------------------------------------------------------------------------------------
def test_muon_lr_scale_spec_examples():
    """SPEC §9.1 eq.41: Nano expert w2 [1024, 256] → 2; Mini q_proj [4096, 2048] → √2; w1 [I_m, d], I_m < d → 1."""
    c = Config.preset("tiny")
    assert muon_lr_scale(c, (1024, 256)) == 2.0
    assert muon_lr_scale(c, (128, 1024, 256)) == 2.0  # last two dims of an expert stack
    assert muon_lr_scale(c, (4096, 2048)) == pytest.approx(math.sqrt(2))
    assert muon_lr_scale(c, (256, 1024)) == 1.0
    d = c.replace(muon_lr_adjust="dion")
    assert muon_lr_scale(d, (256, 1024)) == 0.5 and muon_lr_scale(d, (1024, 256)) == 2.0


L = r"model\.layers\.\d+\."
GROUP_RULES = [  # (pattern, group) — the documented grouping, SPEC §9.1, §9.2, §14 #4
    (r"model\.embed_tokens\.weight|lm_head\.weight", "adamw"),
    (r".*norm\.weight", "adamw"),
    (L + r"mlp\.expert_bias", "none"),
    (L + r"self_attn\.(q|k|v|o|gate)_proj\.weight", "muon"),
    (L + r"mlp\.(gate|up|down)_proj\.weight", "muon"),
    (L + r"mlp\.shared_experts\.(gate|up|down)_proj\.weight", "muon"),
    (L + r"mlp\.experts\.(gate|up|down)_proj", "muon"),
    (L + r"mlp\.router\.gate\.weight", "router"),
]


@pytest.mark.parametrize("preset", ["tiny", "bench-medium"])
@pytest.mark.parametrize("router", ["muon", "adamw"])
def test_every_key_lands_in_its_documented_group(preset, router):
    c = Config.preset(preset).replace(router_optimizer=router, norm_weight_decay=0.01, weight_decay=0.2)
    seen = set()
    for key, shape in param_shapes(c).items():
        matches = [g for pattern, g in GROUP_RULES if re.fullmatch(pattern, key)]
        assert len(matches) == 1, (key, matches)
        expected = router if matches[0] == "router" else matches[0]
        assert param_group(c, key) == param_group(c, key, shape) == expected, key
        assert expected != "muon" or len(shape) >= 2
        assert len(shape) >= 2 or expected in ("adamw", "none")
        wd = weight_decay_for(c, key)
        assert wd == (0.01 if key.endswith("norm.weight") else 0.0 if expected == "none" else 0.2), key
        seen.add(expected)
    assert seen == {"muon", "adamw", "none"}


def test_matrix_optimizer_adamw_puts_every_parameter_on_adamw():
    c = Config.preset("tiny").replace(matrix_optimizer="adamw")
    groups = {key: param_group(c, key, shape) for key, shape in param_shapes(c).items()}
    assert {k for k, g in groups.items() if g != "adamw"} == {k for k in groups if k.endswith("expert_bias")}
    with pytest.raises(ValueError, match="matrix_optimizer"):
        Config.preset("tiny").replace(matrix_optimizer="sgd")


def test_state_layout():
    c = Config.preset("tiny")
    params = init_params(c, dtype=np.float32)
    state = init_optimizer_state(c, params)
    assert state["step"].dtype == np.int64 and state["step"].shape == () and state["step"] == 0
    expected = {"step"}
    for key in params:
        g = param_group(c, key)
        expected |= {"muon.momentum/" + key} if g == "muon" else {"adamw.m/" + key, "adamw.v/" + key} \
            if g == "adamw" else set()
    assert set(state) == expected
    for name, arr in state.items():
        if name != "step":
            key = name.split("/", 1)[1]
            assert arr.shape == params[key].shape and arr.dtype == np.float32 and not arr.any()


# ---- two steps against a hand computation -------------------------------------------------------------------------
def _hand_ns(G, triples, eps):
    """Zeropower of ONE matrix, straight from SPEC §9.2."""
    tall = G.shape[0] > G.shape[1]
    X = G.T if tall else G
    X = X / (math.sqrt(float((X * X).sum())) + eps)
    for a, b, c in triples:
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if tall else X


def _hand_group(c, key):
    if key.endswith("expert_bias"):
        return "none"
    if c.matrix_optimizer == "adamw":  # the all-AdamW baseline
        return "adamw"
    if key in ("model.embed_tokens.weight", "lm_head.weight") or key.endswith("norm.weight"):
        return "adamw"
    if key.endswith("router.gate.weight"):
        return c.router_optimizer
    return "muon"


def _hand_steps(c, params0, grads_seq, lrs):
    """Every parameter after len(grads_seq) steps, with plain loops (SPEC §9.2 Muon and scalar AdamW)."""
    out = {}
    for key, X0 in params0.items():
        group = _hand_group(c, key)
        X = X0.copy()
        if group == "none":
            out[key] = X
            continue
        wd = c.norm_weight_decay if key.endswith("norm.weight") else c.weight_decay
        M = np.zeros_like(X)
        V = np.zeros_like(X)
        for t, (grads, (lr_muon, lr_adamw)) in enumerate(zip(grads_seq, lrs), start=1):
            G = grads[key]
            if group == "muon":
                M = c.muon_momentum * M + G
                U = c.muon_momentum * M + G if c.muon_nesterov else M
                rows, cols = X.shape[-2:]
                scale = math.sqrt(max(1.0, rows / cols)) if c.muon_lr_adjust == "trinity" else math.sqrt(rows / cols)
                triples = TRIPLES[c.muon_ns_coefficients]
                if X.ndim == 3:
                    O = np.stack([_hand_ns(U[e], triples, c.muon_eps) for e in range(X.shape[0])])
                else:
                    O = _hand_ns(U, triples, c.muon_eps)
                X = X * (1 - lr_muon * wd) - lr_muon * scale * O
            else:
                b1, b2 = c.adamw_beta1, c.adamw_beta2
                M = b1 * M + (1 - b1) * G
                V = b2 * V + (1 - b2) * G * G
                m_hat, v_hat = M / (1 - b1 ** t), V / (1 - b2 ** t)
                X = X * (1 - lr_adamw * wd) - lr_adamw * m_hat / (np.sqrt(v_hat) + c.adamw_eps)
        out[key] = X
    return out


@pytest.mark.parametrize("nesterov, coefficients, adjust, router, matrices", [
    (False, "dion", "trinity", "muon", "muon"), (True, "keller", "dion", "adamw", "muon"),
    (False, "dion", "trinity", "muon", "adamw")])
def test_two_steps_match_hand_computation(nesterov, coefficients, adjust, router, matrices):
    c = Config.preset("tiny").replace(muon_nesterov=nesterov, muon_ns_coefficients=coefficients,
                                      muon_lr_adjust=adjust, router_optimizer=router, weight_decay=0.1,
                                      norm_weight_decay=0.0, muon_momentum=0.9, matrix_optimizer=matrices)
    params = init_params(c, seed=3, dtype=np.float64)
    # The shapes the test is about: a tall 3-D expert stack and a tall dense matrix (scale √2 under "trinity").
    assert params["model.layers.1.mlp.experts.down_proj"].shape == (8, 64, 32)
    assert params["model.layers.0.mlp.gate_proj.weight"].shape == (128, 64)
    rng = np.random.default_rng(7)
    grads_seq = [{k: rng.standard_normal(p.shape) for k, p in params.items()} for _ in range(2)]
    lrs = [(2e-2, 3e-3), (1e-2, 2e-3)]
    params0 = {k: p.copy() for k, p in params.items()}
    ids = {k: id(p) for k, p in params.items()}
    state = init_optimizer_state(c, params)
    for grads, (lm, la) in zip(grads_seq, lrs):
        info = optimizer_step(c, params, grads, state, lm, la)
        assert (info["muon_lr"], info["adamw_lr"]) == (lm, la)
    assert info["step"] == 2 and state["step"] == 2 and state["step"].dtype == np.int64
    expected = _hand_steps(c, params0, grads_seq, lrs)
    for key in params:
        assert id(params[key]) == ids[key], f"{key} was replaced, not updated in place"
        np.testing.assert_allclose(params[key], expected[key], rtol=1e-11, atol=1e-13, err_msg=key)
    bias = "model.layers.1.mlp.expert_bias"
    assert np.array_equal(params[bias], params0[bias])
    # The norm gain moved (Adam step) but without decay: a zero gradient would leave it exactly where it was.
    assert not np.array_equal(params["model.norm.weight"], params0["model.norm.weight"])


def test_zero_gradients_only_decay():
    """G = 0: Muon's O = 0 and AdamW's m̂ = 0, so X ← X(1 − ηλ); norm gains (λ = 0) stay put."""
    c = Config.preset("tiny")
    params = init_params(c, seed=0, dtype=np.float32)
    params0 = {k: p.copy() for k, p in params.items()}
    state = init_optimizer_state(c, params)
    optimizer_step(c, params, {k: np.zeros_like(p) for k, p in params.items()}, state, 0.5, 0.25)
    for key, p in params.items():
        assert p.dtype == np.float32
        group = param_group(c, key)
        factor = 1.0 if group == "none" else 1 - (0.5 if group == "muon" else 0.25) * weight_decay_for(c, key)
        np.testing.assert_allclose(p, params0[key] * np.float32(factor), rtol=1e-6, err_msg=key)


def test_float32_step_keeps_dtypes_and_needs_every_gradient():
    c = Config.preset("tiny")
    params = init_params(c, seed=0, dtype=np.float32)
    state = init_optimizer_state(c, params)
    rng = np.random.default_rng(0)
    grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}  # float64 grads are cast
    info = optimizer_step(c, params, grads, state, 1e-3, 1e-3)
    assert all(p.dtype == np.float32 for p in params.values())
    assert all(a.dtype == np.float32 for k, a in state.items() if k != "step")
    assert info["muon_tensors"] + info["adamw_tensors"] == len(params) - (c.num_hidden_layers - c.num_dense_layers)
    assert info["muon_update_norm"] > 0 and info["adamw_update_norm"] > 0
    del grads["lm_head.weight"]
    with pytest.raises(KeyError, match="lm_head"):
        optimizer_step(c, params, grads, state, 1e-3, 1e-3)


# ---- clipping -----------------------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5), log_scale=st.floats(-3, 3),
       max_norm=st.sampled_from([0.0, 0.1, 1.0, 10.0]))
def test_clip_grad_norm(seed, n, log_scale, max_norm):
    rng = np.random.default_rng(seed)
    grads = {f"w{i}": (rng.standard_normal(tuple(rng.integers(1, 6, rng.integers(1, 4)))) * 10 ** log_scale)
             .astype(np.float32) for i in range(n)}
    grads["model.layers.1.mlp.expert_bias"] = np.full(4, 1e3, dtype=np.float32)  # excluded from the norm
    before = {k: g.copy() for k, g in grads.items()}
    clipped, norm = clip_grad_norm(grads, max_norm)
    counted = [g.astype(np.float64).ravel() for k, g in before.items() if not k.endswith("expert_bias")]
    assert norm == pytest.approx(np.linalg.norm(np.concatenate(counted)), rel=1e-12)
    for k in grads:
        assert np.array_equal(grads[k], before[k]) and clipped[k] is not grads[k]
        assert clipped[k].dtype == np.float32
    assert np.array_equal(clipped["model.layers.1.mlp.expert_bias"], before["model.layers.1.mlp.expert_bias"])
    new = math.sqrt(sum(float((clipped[k].astype(np.float64) ** 2).sum()) for k in clipped
                        if not k.endswith("expert_bias")))
    if max_norm == 0:
        assert all(np.array_equal(clipped[k], before[k]) for k in grads)
    else:
        assert new == pytest.approx(min(norm, max_norm), rel=1e-6)
