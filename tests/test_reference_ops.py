"""Properties of the remaining forward operators and of the composed model (SPEC §4.1-§4.3, §4.7-§4.10)."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trinity.reference import Config, init_params, logits, model_forward
from trinity.reference.model.layers import moe_forward
from trinity.reference.model.ops import REFERENCE
from trinity.reference.operators.activations import sigmoid, silu
from trinity.reference.operators.embedding import embedding_forward
from trinity.reference.operators.moe import dispatch
from trinity.reference.operators.norms import rmsnorm_forward
from trinity.reference.operators.router import router_forward, select_top_k


@st.composite
def router_case(draw):
    N = draw(st.integers(1, 30))
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    d = draw(st.integers(1, 8))
    rho = draw(st.floats(0.1, 4.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return rng.standard_normal((N, d)), rng.standard_normal((E, d)), rng.standard_normal(E) * 0.3, K, rho


@settings(max_examples=60, deadline=None)
@given(router_case())
def test_router_weights_sum_to_route_scale_and_come_from_unbiased_scores(case):
    x, w, bias, K, rho = case
    g, chosen, ctx = router_forward(x, w, bias, K, rho)
    s = sigmoid(x @ w.T)
    np.testing.assert_allclose(g.sum(-1), rho, rtol=1e-12)
    picked = np.take_along_axis(s, chosen, -1)
    np.testing.assert_allclose(g, rho * picked / (picked.sum(-1, keepdims=True) + 1e-20), rtol=1e-12)
    # The selection is the top-K of s + b: every chosen biased score ≥ every unchosen one.
    biased = s + bias
    for row, sel in zip(biased, chosen):
        rest = np.setdiff1d(np.arange(len(row)), sel)
        assert len(set(sel)) == K
        if len(rest):
            assert row[sel].min() >= row[rest].max()


@settings(max_examples=60, deadline=None)
@given(router_case())
def test_bias_changes_selection_never_weights(case):
    """A bias that flips the selection changes which experts are chosen, and the weights are still ρ·s/Σs of the
    chosen ones; a bias that does not flip the selection leaves the weights bit-identical."""
    x, w, bias, K, rho = case
    g0, chosen0, _ = router_forward(x, w, np.zeros_like(bias), K, rho)
    # A constant shift of every bias never changes the ranking, hence never the output.
    g1, chosen1, _ = router_forward(x, w, np.full_like(bias, 0.7), K, rho)
    np.testing.assert_array_equal(chosen0, chosen1)
    np.testing.assert_array_equal(g0, g1)
    # A huge bias on one expert forces it into every token's selection, with its unbiased weight.
    E = w.shape[0]
    assume(K < E)
    boosted = np.zeros(E)
    boosted[E - 1] = 10.0
    g2, chosen2, ctx = router_forward(x, w, boosted, K, rho)
    assert (chosen2 == E - 1).any(axis=-1).all()
    s = ctx[2]
    picked = np.take_along_axis(s, chosen2, -1)
    np.testing.assert_allclose(g2, rho * picked / (picked.sum(-1, keepdims=True) + 1e-20), rtol=1e-12)


def test_top_k_ties_pick_the_lowest_index_first():
    scores = np.array([[0.5, 0.5, 0.5, 0.5], [0.1, 0.9, 0.9, 0.2]])
    np.testing.assert_array_equal(select_top_k(scores, 2), [[0, 1], [1, 2]])


def _naive_moe(x, p, prefix, K, rho):
    """Token by token: shared FFN + Σ_k g_k FFN_{e_k}, written as the SPEC §4.9 equation."""
    w_r, bias = p[prefix + "router.gate.weight"], p[prefix + "expert_bias"]
    out = np.zeros_like(x)
    for t, xt in enumerate(x):
        s = sigmoid(w_r @ xt)
        chosen = np.argsort(-(s + bias), kind="stable")[:K]
        g = rho * s[chosen] / (s[chosen].sum() + 1e-20)  # the 1e-20 matters when every chosen s is tiny
        for gk, e in zip(g, chosen):
            h = silu(p[prefix + "experts.gate_proj"][e] @ xt) * (p[prefix + "experts.up_proj"][e] @ xt)
            out[t] += gk * (p[prefix + "experts.down_proj"][e] @ h)
        sh = prefix + "shared_experts."
        if sh + "gate_proj.weight" in p:
            h = silu(p[sh + "gate_proj.weight"] @ xt) * (p[sh + "up_proj.weight"] @ xt)
            out[t] += p[sh + "down_proj.weight"] @ h
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2), st.integers(1, 20), st.integers(0, 10_000))
def test_grouped_moe_equals_token_by_token_formula(E, shared, N, seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, E + 1))
    c = Config.preset("tiny").replace(num_experts=E, num_experts_per_tok=K, num_shared_experts=shared)
    p = init_params(c, seed, np.float64)
    prefix = "model.layers.1.mlp."
    p[prefix + "expert_bias"] = rng.standard_normal(E) * 0.05
    p[prefix + "router.gate.weight"] *= 30
    x = rng.standard_normal((N, c.hidden_size))
    y, ctx = moe_forward(REFERENCE, x, p, prefix, K, 1.7)
    np.testing.assert_allclose(y, _naive_moe(x, p, prefix, K, 1.7), rtol=1e-10, atol=1e-13)
    # The grouped rows are contiguous per expert and cover every (token, slot) once.
    plan = ctx["plan"]
    assert plan.counts.sum() == N * K and plan.offsets[-1] == N * K
    for e in range(E):
        rows = slice(plan.offsets[e], plan.offsets[e + 1])
        np.testing.assert_array_equal(ctx["router"][3][plan.token[rows], plan.slot[rows]], e)


def test_dispatch_counts_every_assignment():
    experts = np.array([[2, 0], [2, 1], [0, 2]])
    plan = dispatch(experts, 4)
    np.testing.assert_array_equal(plan.counts, [2, 1, 3, 0])
    np.testing.assert_array_equal(plan.offsets, [0, 2, 3, 6, 6])
    np.testing.assert_array_equal(plan.token, [0, 2, 1, 0, 1, 2])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.floats(1e-3, 1e3), st.integers(0, 10_000))
def test_rmsnorm_output_has_unit_rms_times_gain_and_is_scale_invariant(n, scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, n))
    gain = rng.standard_normal(n)
    y, _ = rmsnorm_forward(x, np.ones(n), 0.0)
    np.testing.assert_allclose(np.sqrt((y * y).mean(-1)), 1.0, rtol=1e-12)
    y1, _ = rmsnorm_forward(x, gain, 0.0)
    y2, _ = rmsnorm_forward(x * scale, gain, 0.0)
    np.testing.assert_allclose(y1, y2, rtol=1e-11, atol=1e-12)
    # ε enters under the square root: y = γx/√(mean x² + ε)
    eps = 0.3
    y3, _ = rmsnorm_forward(x, gain, eps)
    np.testing.assert_allclose(y3, gain * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps), rtol=1e-13)


def test_embedding_scales_activations_not_weights():
    table = np.arange(12.0).reshape(4, 3)
    x, _ = embedding_forward(np.array([[3, 1, 3]]), table, multiplier=2.0)
    np.testing.assert_array_equal(x, 2.0 * table[[3, 1, 3]][None])
    np.testing.assert_array_equal(table, np.arange(12.0).reshape(4, 3))


def test_mup_multiplies_embeddings_by_sqrt_d():
    """Doubling the embedding table and switching muP off is the same model when √d = 2 (d = 4)."""
    c = Config.preset("tiny").replace(hidden_size=4, head_dim=4, num_attention_heads=2, num_key_value_heads=1)
    p = init_params(c, 0, np.float64)
    tokens = np.array([[1, 5, 9, 2]])
    q = dict(p, **{"model.embed_tokens.weight": 2.0 * p["model.embed_tokens.weight"],
                   "lm_head.weight": p["lm_head.weight"]})
    np.testing.assert_allclose(logits(c, p, tokens), logits(c.replace(mup_enabled=False), q, tokens), rtol=1e-12)


def test_tied_head_uses_the_embedding_matrix():
    c = Config.preset("tiny").replace(tie_word_embeddings=True)
    p = init_params(c, 0, np.float64)
    assert "lm_head.weight" not in p
    out, ctx = model_forward(c, p, np.array([[1, 2, 3]]))
    h = ctx["lm_head"][0]
    np.testing.assert_allclose(out, h @ p["model.embed_tokens.weight"].T, rtol=1e-14)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.booleans())
def test_intra_document_mask_makes_a_document_independent_of_its_neighbours(seed, windowed):
    """With doc ids, a document's logits are the same whatever is packed before or after it (SPEC §4.6), and
    equal to running the document alone at positions 0… (RoPE is relative; global layers are NoPE)."""
    rng = np.random.default_rng(seed)
    c = Config.preset("tiny").replace(sliding_window=4 if windowed else 64)
    p = init_params(c, seed, np.float64)
    p = {k: v * (1 + 0.2 * rng.standard_normal(v.shape)) if v.ndim else v for k, v in p.items()}
    doc = rng.integers(0, c.vocab_size, 7)
    before_a, before_b = rng.integers(0, c.vocab_size, 5), rng.integers(0, c.vocab_size, 5)
    after_a, after_b = rng.integers(0, c.vocab_size, 4), rng.integers(0, c.vocab_size, 4)
    ids = np.array([0] * 5 + [1] * 7 + [2] * 4)
    out_a = logits(c, p, np.concatenate([before_a, doc, after_a]), doc_ids=ids)[5:12]
    out_b = logits(c, p, np.concatenate([before_b, doc, after_b]), doc_ids=ids)[5:12]
    alone = logits(c, p, doc)
    # Different neighbours, shifted positions: only rounding differs (float64, ~10 layers of O(1) values).
    np.testing.assert_allclose(out_a, alone, atol=1e-10 * np.abs(alone).max())
    np.testing.assert_allclose(out_b, alone, atol=1e-10 * np.abs(alone).max())
    # Without the mask the neighbours do leak in.
    leaky = logits(c, p, np.concatenate([before_a, doc, after_a]))[5:12]
    assert np.abs(leaky - alone).max() > 1e-6


def test_batch_rows_are_independent():
    c = Config.preset("tiny")
    p = init_params(c, 0, np.float64)
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (3, 9))
    batched = logits(c, p, tokens)
    for b in range(3):
        np.testing.assert_allclose(batched[b], logits(c, p, tokens[b]), rtol=0, atol=1e-12)


def test_float32_and_float64_params_agree():
    c = Config.preset("tiny")
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (2, 16))
    y32 = logits(c, init_params(c, 0, np.float32), tokens)
    y64 = logits(c, init_params(c, 0, np.float64), tokens)
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    np.testing.assert_allclose(y32, y64, atol=1e-4 * np.abs(y64).max())


@pytest.mark.parametrize("bad, message", [
    (lambda t: t.astype(np.float32), "integer array"),
    (lambda t: t + 1000, "token ids must lie in"),
    (lambda t: t[0, 0], "integer array"),
])
def test_bad_tokens_raise_clear_errors(bad, message):
    c = Config.preset("tiny")
    p = init_params(c, 0, np.float32)
    with pytest.raises(ValueError, match=message):
        model_forward(c, p, bad(np.zeros((1, 4), dtype=np.int64)))


def test_params_that_do_not_match_the_config_name_the_key():
    c = Config.preset("tiny")
    p = init_params(c, 0, np.float32)
    tokens = np.zeros((1, 4), dtype=np.int64)
    q = dict(p)
    del q["model.layers.2.mlp.experts.up_proj"]
    with pytest.raises(KeyError, match="model.layers.2.mlp.experts.up_proj"):
        logits(c, q, tokens)
    q = dict(p, **{"model.layers.0.self_attn.q_proj.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"q_proj.weight: expected shape \(64, 64\), found \(3, 3\)"):
        logits(c, q, tokens)
