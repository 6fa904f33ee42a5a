"""Gradients of the reference against central finite differences in float64 (SPEC §5).

Every parameter key is checked along a random unit direction u: the central difference (L(p+hu) − L(p−hu))/2h
with one Richardson step (truncation O(h⁴)) must equal ⟨∇L, u⟩ to FD_TOL relative to the Cauchy-Schwarz bound
‖∇L_key‖·‖u‖ = ‖∇L_key‖. A key whose gradient is more than 10⁴× smaller than the whole gradient is measured against
that floor instead (1e-4·‖∇L‖, at least 1e-12), since the differences carry ~1e-12 of absolute rounding whatever the key.

Top-k is not smooth: a perturbation that moves a token across its top-k boundary changes which experts it uses.
Draws are kept away from ties by rejecting those whose smallest gap between the K-th and (K+1)-th biased score is
below GAP, and then by rejecting the draws where a perturbed evaluation still changes any token's selection (a
perturbation of an early layer moves every later router input, so the gap alone cannot rule that out).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

from trinity.reference import evaluate_losses, loss_and_grads, model_forward
from trinity.reference.operators.losses import (balance_loss_backward, balance_loss_forward, cross_entropy_backward,
                                                cross_entropy_forward)
from strategies import min_topk_gap, random_params, small_configs, token_batches

WORST = {"fd": 0.0, "examples": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    if WORST["examples"]:
        print(f"\n[finite differences] {WORST['examples']} configs; largest |fd − ⟨∇L, u⟩| / scale "
              f"{WORST['fd']:.2e} (bound {FD_TOL:.0e})")


H = 1e-4  # Richardson-extrapolated central differences: truncation O(h⁴) ≈ 1e-16, roundoff ≈ 1e-16·L/h ≈ 1e-12
GAP = 2e-3  # a unit-norm move of h shifts a sigmoid score by ≲ h·‖x‖/4, an order of magnitude below this
FD_TOL = 1e-6


def directional_fd(f, h=H):
    """(4·D(h/2) − D(h)) / 3 with D(h) = (f(h) − f(−h)) / 2h."""
    d = lambda s: (f(s) - f(-s)) / (2 * s)  # noqa: E731
    return (4 * d(h / 2) - d(h)) / 3


def unit(rng, shape):
    u = rng.standard_normal(shape)
    return u / np.linalg.norm(u)


@st.composite
def training_cases(draw):
    config = draw(small_configs(max_layers=4, max_hidden=32, max_vocab=48))
    config = config.replace(z_loss_coeff=draw(st.sampled_from([0.0, 1e-2, 0.5])),
                            balance_loss_coeff=draw(st.sampled_from([0.0, 1e-2, 0.5])))
    seed = draw(st.integers(0, 2**32 - 1))
    params = random_params(config, seed, router=draw(st.floats(0.5, 4.0)), bias=draw(st.floats(0.0, 0.3)))
    tokens, labels, doc_ids = draw(token_batches(config, max_batch=2, max_len=12))
    return config, params, tokens, labels, doc_ids, seed


def _routing(stats):
    return {layer: s["chosen_experts"] for layer, s in stats["layers"].items()}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(training_cases())
def test_every_gradient_matches_finite_differences(case):
    config, params, tokens, labels, doc_ids, seed = case
    _, ctx = model_forward(config, params, tokens, doc_ids)
    assume(min_topk_gap(config, params, ctx) > GAP)
    losses, grads, stats = loss_and_grads(config, params, tokens, labels, doc_ids)
    assert set(grads) == set(params)
    base_routing = _routing(stats)
    rng = np.random.default_rng(seed)

    def total(key, u):
        def f(step):
            moved = dict(params, **{key: params[key] + step * u})
            perturbed, perturbed_stats = evaluate_losses(config, moved, tokens, labels, doc_ids)
            for layer, chosen in _routing(perturbed_stats).items():
                if not np.array_equal(chosen, base_routing[layer]):
                    reject()  # this draw sits within h of a top-k boundary
            return perturbed["total"]
        return f

    floor = max(1e-4 * np.sqrt(sum(np.vdot(g, g) for g in grads.values())), 1e-12)
    for key, g in grads.items():
        if key.endswith("expert_bias"):
            assert not g.any(), "expert_bias selects only; it gets no gradient (SPEC §4.8)"
            continue
        u = unit(rng, g.shape)
        fd = directional_fd(total(key, u))
        scale = max(np.linalg.norm(g), floor)
        WORST["fd"] = max(WORST["fd"], abs(fd - np.vdot(g, u)) / scale)
        assert abs(fd - np.vdot(g, u)) <= FD_TOL * scale, (key, fd, np.vdot(g, u), scale)

    # The embedding input: d total / d x⁰ (x⁰ = m·embeds) through model_forward(embeds=...).
    embeds = params["model.embed_tokens.weight"][tokens]
    _, _, stats_e = loss_and_grads(config, params, tokens, labels, doc_ids, embeds=embeds)
    d_embeds = stats_e["embedding_output_grad"] * config.embedding_multiplier
    u = unit(rng, embeds.shape)
    fd = directional_fd(lambda s: evaluate_losses(config, params, tokens, labels, doc_ids,
                                                  embeds=embeds + s * u)[0]["total"])
    assert abs(fd - np.vdot(d_embeds, u)) <= FD_TOL * max(np.linalg.norm(d_embeds), floor)
    WORST["examples"] += 1


@settings(max_examples=15, deadline=None)
@given(training_cases())
def test_recompute_gradients_are_bitwise_equal(case):
    config, params, tokens, labels, doc_ids, _ = case
    stored = loss_and_grads(config, params, tokens, labels, doc_ids, recompute=False)
    recomputed = loss_and_grads(config, params, tokens, labels, doc_ids, recompute=True)
    assert stored[0] == recomputed[0]
    for key in params:
        np.testing.assert_array_equal(stored[1][key], recomputed[1][key], err_msg=key)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(2, 9), st.integers(2, 11), st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_cross_entropy_and_z_loss_gradient_elementwise(B, T, V, lam, seed):
    """Every logit's gradient of ce + z equals its central difference (SPEC §5), with HF's shift and −100."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, V)) * 3
    labels = np.where(rng.random((B, T)) < 0.3, -100, rng.integers(0, V, (B, T)))

    def loss(z):
        ce, zl, _ = cross_entropy_forward(z, labels, lam)
        return ce + zl

    dlogits = cross_entropy_backward(cross_entropy_forward(logits, labels, lam)[2])
    assert not dlogits[:, -1].any()  # the last position predicts nothing
    for idx in np.ndindex(logits.shape):
        e = np.zeros_like(logits)
        e[idx] = 1.0
        fd = directional_fd(lambda s: loss(logits + s * e))
        assert abs(fd - dlogits[idx]) <= 1e-9, idx


def test_cross_entropy_follows_hf_label_semantics():
    """ce = mean over counted positions t of (lse_t − logit_{t, labels[t+1]}); z = λ·mean lse²."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7))
    labels = np.array([[1, 2, -100, 4, 5], [-100, 0, 6, -100, -100]])
    terms, lses = [], []
    for b in range(2):
        for t in range(4):
            y = labels[b, t + 1]
            if y != -100:
                lse = np.log(np.exp(logits[b, t]).sum())
                terms.append(lse - logits[b, t, y])
                lses.append(lse)
    ce, zl, _ = cross_entropy_forward(logits, labels, 0.25)
    assert ce == pytest.approx(np.mean(terms), rel=1e-14)
    assert zl == pytest.approx(0.25 * np.mean(np.square(lses)), rel=1e-14)
    with pytest.raises(ValueError, match="labels must be token ids"):
        cross_entropy_forward(logits, np.full((2, 5), 9), 0.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 6), st.integers(0, 10_000))
def test_balance_loss_gradient_elementwise(B, T, E, seed):
    """dL_Bal/ds through s̃ = s/Σ_j s_j over all E experts, f held constant (SPEC §5, §6.3)."""
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, E + 1))
    scores = rng.uniform(0.05, 0.95, (B, T, E))
    chosen = np.argsort(-scores, axis=-1)[..., :K]
    loss, ctx = balance_loss_forward(scores, chosen, K, 0.3)
    ds = balance_loss_backward(ctx)
    for idx in np.ndindex(scores.shape):
        e = np.zeros_like(scores)
        e[idx] = 1.0
        fd = directional_fd(lambda s: balance_loss_forward(scores + s * e, chosen, K, 0.3)[0], h=1e-4)
        assert abs(fd - ds[idx]) <= 1e-10, idx
    # f_i = E/(K·T)·count_i: with uniform scores P_i = 1/E, so L = α·mean_b Σ_i f_i/E = α.
    uniform, _ = balance_loss_forward(np.full((B, T, E), 0.5), chosen, K, 0.3)
    assert uniform == pytest.approx(0.3, rel=1e-12)
