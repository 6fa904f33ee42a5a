"""Properties of the attention core, masks, RoPE and GQA (SPEC §4.4-§4.6)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.reference.operators import attention as attn
from trinity.reference.data.packing import document_ids
from trinity.reference.operators.attention import allowed, attention_forward
from trinity.reference.operators.rope import rope_forward, rope_tables

# float64 softmax-weighted sums of O(1) values over ≤ 64 keys: rounding is a few ulps of 1.
TOL64 = 1e-12


def dense_attention(q, k, v, window=None, doc_ids=None):
    """The textbook formula with an explicit T×T mask and repeated KV heads: the oracle for the blocked form.
    Returns (O, lse) with lse = log Σ_s exp(S[t,s]) over the allowed keys."""
    B, T, hq, dh = q.shape
    r = hq // k.shape[2]
    k_rep, v_rep = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k_rep) / np.sqrt(dh)
    mask = allowed(np.arange(T), np.arange(T), window, doc_ids, doc_ids)
    mask = mask[:, None] if mask.ndim == 3 else mask
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v_rep), np.log(np.exp(s).sum(-1))


@st.composite
def attention_case(draw):
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, 40))
    hkv = draw(st.integers(1, 3))
    r = draw(st.integers(1, 3))
    dh = draw(st.sampled_from([2, 4, 8]))
    window = draw(st.one_of(st.none(), st.integers(1, 48)))
    use_docs = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, hkv * r, dh))
    k = rng.standard_normal((B, T, hkv, dh))
    v = rng.standard_normal((B, T, hkv, dh))
    docs = np.sort(rng.integers(0, 4, (B, T)), axis=1) if use_docs else None
    return q, k, v, window, docs


@settings(max_examples=60, deadline=None)
@given(attention_case(), st.sampled_from([16, 64, 1 << 22]))
def test_blocked_attention_equals_dense_softmax(case, budget):
    """The blocked, banded computation equals softmax over an explicit mask, whatever the block size
    (small budgets force many query blocks)."""
    q, k, v, window, docs = case
    blocks = list(attn.query_blocks(np.arange(q.shape[1]), np.arange(q.shape[1]), window,
                                    q.shape[0] * q.shape[2], budget))
    o, ctx = attention_forward(q, k, v, window=window, doc_ids=docs, block_budget=budget)
    o_dense, lse_dense = dense_attention(q, k, v, window, docs)
    np.testing.assert_allclose(o, o_dense, atol=TOL64, rtol=0)
    np.testing.assert_allclose(ctx[4], lse_dense, atol=TOL64, rtol=0)  # the row log-normalisers
    # The blocks tile the queries, and a sliding block reaches back no further than its first query's window
    # (rounded down to a multiple of 16 keys).
    assert [b[0] for b in blocks] == sorted(b[0] for b in blocks) and blocks[-1][1] == q.shape[1]
    if window is not None:
        assert all(s0 % 16 == 0 and s0 > t0 - window - 16 for t0, _, s0, _ in blocks)


@given(st.integers(1, 3000), st.one_of(st.none(), st.integers(1, 600)), st.integers(1, 64),
       st.sampled_from([16, 1000, 1 << 14, 1 << 22]))
def test_largest_query_block_is_the_largest_of_query_blocks(T, window, rows, budget):
    """The memory model's closed form (a few candidate blocks) equals the largest block `query_blocks` yields for the
    contiguous positions 0..T−1, and the block count."""
    pos = np.arange(T)
    blocks = list(attn.query_blocks(pos, pos, window, rows, budget))
    want = max((t1 - t0) * (s1 - s0) for t0, t1, s0, s1 in blocks), len(blocks)
    assert attn.largest_query_block(T, window, rows, budget) == want


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.one_of(st.none(), st.integers(1, 35)), st.integers(0, 10_000))
def test_each_query_sees_exactly_the_allowed_keys(T, window, seed):
    """Changing V at key s changes the output of query t iff allowed(t, s); a window w shows exactly
    min(w, t+1) keys including the query itself (SPEC §4.6)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, T, 1, 4)) for _ in range(3))
    base, _ = attention_forward(q, k, v, window=window)
    mask = allowed(np.arange(T), np.arange(T), window)
    for t in range(T):
        visible = np.flatnonzero(mask[t])
        assert len(visible) == (t + 1 if window is None else min(window, t + 1))
        assert visible.max() == t
    for s in range(T):
        v2 = v.copy()
        v2[0, s] += 10.0
        changed, _ = attention_forward(q, k, v2, window=window)
        moved = np.abs(changed - base).max(axis=(0, 2, 3)) > 1e-12
        np.testing.assert_array_equal(moved, mask[:, s])


@settings(max_examples=40, deadline=None)
@given(attention_case())
def test_gqa_equals_attention_with_repeated_kv_heads(case):
    """Query head i reads KV head ⌊i/r⌋ (contiguous blocks): same as MHA over KV heads repeated r times."""
    q, k, v, window, docs = case
    r = q.shape[2] // k.shape[2]
    o, _ = attention_forward(q, k, v, window=window, doc_ids=docs)
    o_rep, _ = attention_forward(q, np.repeat(k, r, axis=2), np.repeat(v, r, axis=2), window=window, doc_ids=docs)
    np.testing.assert_allclose(o, o_rep, atol=TOL64, rtol=0)


def test_window_at_least_sequence_length_is_plain_causal():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 12, 2, 4)) for _ in range(3))
    causal, _ = attention_forward(q, k, v, window=None)
    for w in (12, 13, 100):
        windowed, _ = attention_forward(q, k, v, window=w)
        np.testing.assert_array_equal(windowed, causal)
    narrow, _ = attention_forward(q, k, v, window=11)
    assert np.abs(narrow[:, 11] - causal[:, 11]).max() > 1e-6  # query 11 lost key 0


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([2, 4, 8, 16]), st.integers(0, 500), st.integers(0, 500), st.integers(-200, 200),
       st.floats(100.0, 1e6), st.integers(0, 10_000))
def test_rope_scores_depend_only_on_relative_position(dh, p, s, shift, theta, seed):
    """⟨RoPE(q, p+Δ), RoPE(k, s+Δ)⟩ = ⟨RoPE(q, p), RoPE(k, s)⟩ (SPEC §4.5), and RoPE preserves norms."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 1, dh))
    shift = max(shift, -min(p, s))

    def rotated(x, pos):
        cos, sin = rope_tables(np.array([pos]), dh, theta, np.float64)
        return rope_forward(x, cos, sin)[0].ravel()

    score = rotated(q, p) @ rotated(k, s)
    shifted = rotated(q, p + shift) @ rotated(k, s + shift)
    assert abs(score - shifted) <= 1e-9 * (1 + abs(score))  # angles up to ~700 rad: ~1e-13 relative each
    np.testing.assert_allclose(np.linalg.norm(rotated(q, p)), np.linalg.norm(q), rtol=1e-12)


def test_rope_is_half_split_neox_layout():
    """Pair k of the rotation couples dims k and k + d_h/2 (not 2k, 2k+1)."""
    dh = 8
    x = np.zeros((1, 1, 1, dh))
    x[..., 1] = 1.0
    cos, sin = rope_tables(np.array([3]), dh, 10000.0, np.float64)
    y = rope_forward(x, cos, sin)[0].ravel()
    angle = 3 * 10000.0 ** (-2 * 1 / dh)
    expected = np.zeros(dh)
    expected[1], expected[1 + dh // 2] = np.cos(angle), np.sin(angle)
    np.testing.assert_allclose(y, expected, atol=1e-15)


def test_document_ids_put_eos_in_the_document_it_ends():
    tokens = np.array([[5, 0, 7, 7, 0, 0, 3]])
    np.testing.assert_array_equal(document_ids(tokens, eos_id=0), [[0, 0, 1, 1, 1, 2, 3]])


def test_intra_document_mask_blocks_other_documents():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 10, 2, 4)) for _ in range(3))
    docs = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    o, _ = attention_forward(q, k, v, doc_ids=docs)
    v2 = v.copy()
    v2[0, :3] += 5.0  # only document 0 changes
    o2, _ = attention_forward(q, k, v2, doc_ids=docs)
    assert np.abs(o2[0, :3] - o[0, :3]).max() > 1e-3
    np.testing.assert_array_equal(o2[0, 3:], o[0, 3:])


@settings(deadline=None, max_examples=20)
@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 60), st.integers(0, 2 ** 31 - 1))
def test_queries_out_of_every_key_s_reach_get_zero_output_and_no_gradient(Tq, window, gap, seed):
    """Queries at positions before (or beyond the window of) every key: their blocks have no key span at all. O = 0,
    lse = −∞ and zero gradients for them, the other queries as the dense masked softmax says."""
    rng = np.random.default_rng(seed)
    Tk = 12
    q, k, v = (rng.standard_normal((1, n, 2, 4)) for n in (Tq, Tk, Tk))
    q_pos = np.arange(Tq) + gap
    k_pos = np.arange(Tk) + 30
    o, ctx = attention_forward(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos, block_budget=64)
    ok = allowed(q_pos, k_pos, window)  # [Tq, Tk]
    scores = np.einsum("bthd,bshd->bhts", q, k) / 2.0
    scores = np.where(ok, scores, -np.inf)
    m = np.max(np.where(ok, scores, -1e300), axis=-1, keepdims=True)
    p = np.where(ok, np.exp(scores - m), 0.0)
    l = p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", p / np.where(l > 0, l, 1.0), v)
    np.testing.assert_allclose(o, want, rtol=1e-12, atol=1e-14)
    none = ~ok.any(axis=1)
    assert np.all(np.isneginf(ctx[4][0][:, none])) and np.all(o[:, none] == 0)
    dq, _, _ = attn.attention_backward(ctx, np.ones_like(o))
    assert np.all(dq[:, none] == 0)
