"""Every leaf operator of the op table, forward and backward, against the NumPy reference (SPEC §4, §5).

One suite for every backend (selected in conftest.py); each test runs in float32 and float64 with the tolerances
of tolerances.py. A backend's ctx objects are its own: each backward gets the ctx of the same table's forward and
the same upstream gradient as the reference's. Arrays cross into the backend through `ops.xp` (NumPy or CuPy).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from backends import is_simulated
from tolerances import BF16, check_close, ns_bf16_tol, rtol
from trinity.reference.model.ops import LEAF_OPS, REFERENCE

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                          HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)


# ---- moving arrays between NumPy and the backend ---------------------------------------------------------------
def to_backend(ops, x):
    if isinstance(x, np.ndarray):
        return ops.xp.asarray(x)
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(to_backend(ops, v) for v in x)
    if hasattr(x, "_fields"):  # a NamedTuple such as the dispatch plan
        return type(x)(*(to_backend(ops, v) for v in x))
    return x


def to_numpy(x):
    if hasattr(x, "get") and not isinstance(x, (dict, np.ndarray)):  # cupy
        return x.get()
    return np.asarray(x)


def run(ops, name, *args, **kwargs):
    """Call ops.<name> with the arguments moved to the backend."""
    return getattr(ops, name)(*(to_backend(ops, a) for a in args), **kwargs)


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def amax(x) -> float:
    return float(np.max(np.abs(x))) if np.size(x) else 0.0


def absolute(x):
    """|x| for arrays (recursively in tuples); everything else unchanged."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return np.abs(x)
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(absolute(v) for v in x)
    return x


def terms(fn, *args):
    """The size of the terms behind each output of a bilinear or monotone operator: the reference operator on the
    absolute values of its inputs (tolerances.py); a tuple of outputs gives a tuple of scales."""
    out = fn(*(absolute(a) for a in args))
    return tuple(amax(o) for o in out) if isinstance(out, tuple) else amax(out)


def test_table_has_every_leaf_op(backend):
    for names in LEAF_OPS.values():
        for name in names:
            assert callable(getattr(backend, name)), name
    for name in ("newton_schulz", "adamw_update", "sum_of_squares", "scaled"):  # the optimizer kernels
        assert callable(getattr(backend, name)), name
    assert backend.xp is not None and isinstance(backend.name, str)
    with backend.scope("model.layers.0"):
        pass


# ---- linear, embedding, RMSNorm, RoPE ----------------------------------------------------------------------------
@SETTINGS
@given(st.lists(st.integers(1, 5), min_size=0, max_size=2), st.integers(1, 40), st.integers(1, 40), seeds)
def test_linear(backend, dtype, record, lead, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, (*lead, 3, d_in), dtype), randn(rng, (d_out, d_in), dtype, d_in ** -0.5)
    (y_r, c_r), (y_b, c_b) = REFERENCE.linear_forward(x, w), run(backend, "linear_forward", x, w)
    check_close(to_numpy(y_b), y_r, dtype, d_in, scale=terms(lambda *a: REFERENCE.linear_forward(*a)[0], x, w),
                what="linear_forward", recorder=record)
    dy = randn(rng, y_r.shape, dtype)
    (dx_r, dw_r), (dx_b, dw_b) = REFERENCE.linear_backward(c_r, dy), run(backend, "linear_backward", c_b, dy)
    s_dx, s_dw = terms(REFERENCE.linear_backward, c_r, dy)
    check_close(to_numpy(dx_b), dx_r, dtype, d_out, scale=s_dx, what="linear_backward dx", recorder=record)
    check_close(to_numpy(dw_b), dw_r, dtype, dy.size // d_out, scale=s_dw, what="linear_backward dW",
                recorder=record)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 30), st.integers(1, 16), st.booleans(), seeds)
def test_embedding(backend, dtype, record, B, T, V, d, mup, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T))
    table = randn(rng, (V, d), dtype)
    m = float(np.sqrt(d)) if mup else 1.0
    (x_r, c_r), (x_b, c_b) = REFERENCE.embedding_forward(tokens, table, m), run(backend, "embedding_forward", tokens,
                                                                                  table, m)
    check_close(to_numpy(x_b), x_r, dtype, 1, what="embedding_forward", recorder=record)
    dx = randn(rng, x_r.shape, dtype)
    dt_r, dt_b = REFERENCE.embedding_backward(c_r, dx), run(backend, "embedding_backward", c_b, dx)
    check_close(to_numpy(dt_b), dt_r, dtype, B * T, scale=terms(REFERENCE.embedding_backward, c_r, dx),
                what="embedding_backward", recorder=record)


@pytest.mark.sim_examples(6)  # the simulator's slowest kernels (block reductions, flash tiles)
@SETTINGS
@given(st.sampled_from([(), (2,), (3, 4)]), st.integers(1, 70), st.integers(0, 3), st.sampled_from([1e-5, 1e-6]),
       seeds)
def test_rmsnorm(backend, dtype, record, lead, width, heads, eps, seed):
    """The sandwich/final norm ([..., d]) and the per-head QK norm ([..., heads, d_h], one γ for all heads)."""
    rng = np.random.default_rng(seed)
    shape = (*lead, 5, *((heads,) if heads else ()), width)
    x = randn(rng, shape, dtype, 3.0)
    gain = rng.uniform(0.5, 1.5, width).astype(dtype)
    (y_r, c_r), (y_b, c_b) = REFERENCE.rmsnorm_forward(x, gain, eps), run(backend, "rmsnorm_forward", x, gain, eps)
    check_close(to_numpy(y_b), y_r, dtype, width, what="rmsnorm_forward", recorder=record)
    dy = randn(rng, shape, dtype)
    (dx_r, dg_r), (dx_b, dg_b) = REFERENCE.rmsnorm_backward(c_r, dy), run(backend, "rmsnorm_backward", c_b, dy)
    # dx = ρ(u − x̂·mean(u ⊙ x̂)) cancels (exactly, for width 1): measure it against its terms ρ·|u|.
    u = np.abs(gain * dy)
    size = amax(c_r[1] * (u + np.abs(c_r[0]) * np.mean(u * np.abs(c_r[0]), axis=-1, keepdims=True)))
    check_close(to_numpy(dx_b), dx_r, dtype, width, scale=size, what="rmsnorm_backward dx", recorder=record)
    check_close(to_numpy(dg_b), dg_r, dtype, x.size // width + width, scale=amax(np.abs(dy * c_r[0]).reshape(
        -1, width).sum(0)), what="rmsnorm_backward dgain", recorder=record)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 4), st.integers(1, 16).map(lambda h: 2 * h),
       st.sampled_from([100.0, 10000.0, 1e6]), st.integers(0, 1000), seeds)
def test_rope(backend, dtype, record, B, T, heads, dh, theta, offset, seed):
    rng = np.random.default_rng(seed)
    positions = np.arange(offset, offset + T)
    tables_r = REFERENCE.rope_tables(positions, dh, theta, dtype)
    tables_b = run(backend, "rope_tables", positions, dh, theta, dtype)
    for t_r, t_b in zip(tables_r, tables_b):
        check_close(to_numpy(t_b), t_r, dtype, 1, what="rope_tables", recorder=record)
    x = randn(rng, (B, T, heads, dh), dtype)
    (y_r, c_r), (y_b, c_b) = REFERENCE.rope_forward(x, *tables_r), run(backend, "rope_forward", x, *tables_r)
    size = 2 * amax(x) * max(amax(tables_r[0]), amax(tables_r[1]))  # |x₁ cos| + |x₂ sin|
    check_close(to_numpy(y_b), y_r, dtype, 2, scale=size, what="rope_forward", recorder=record)
    dy = randn(rng, x.shape, dtype)
    dx_r, dx_b = REFERENCE.rope_backward(c_r, dy), run(backend, "rope_backward", c_b, dy)
    size = 2 * amax(dy) * max(amax(tables_r[0]), amax(tables_r[1]))
    check_close(to_numpy(dx_b), dx_r, dtype, 2, scale=size, what="rope_backward", recorder=record)


# ---- attention, gate, SwiGLU ---------------------------------------------------------------------------------------
@st.composite
def attention_cases(draw):
    """GQA shapes, causal or sliding (windows shorter and longer than T), with or without document ids, and a
    query block that is a suffix of the keys (cached keys before the queries: the KV-cache / CP layout)."""
    h_kv = draw(st.integers(1, 3))
    r = draw(st.integers(1, 3))
    B, dh = draw(st.integers(1, 2)), draw(st.integers(1, 20))
    Tk = draw(st.integers(1, 150))
    Tq = draw(st.one_of(st.just(Tk), st.integers(1, Tk)))
    window = draw(st.one_of(st.none(), st.integers(1, 80)))
    docs = draw(st.booleans())
    return B, Tq, Tk, h_kv * r, h_kv, dh, window, docs, draw(seeds)


def _attention_inputs(case, dtype):
    B, Tq, Tk, hq, hkv, dh, window, docs, seed = case
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, (B, Tq, hq, dh), dtype, 2.0), randn(rng, (B, Tk, hkv, dh), dtype, 2.0), \
        randn(rng, (B, Tk, hkv, dh), dtype)
    kwargs = dict(window=window)
    doc = np.sort(rng.integers(0, 4, (B, Tk)), axis=1) if docs else None
    if Tq == Tk:
        kwargs["doc_ids"] = doc
    else:
        kwargs.update(q_pos=np.arange(Tk - Tq, Tk), k_pos=np.arange(Tk))
        kwargs["doc_ids"] = None if doc is None else (doc[:, Tk - Tq:], doc)
    return q, k, v, kwargs, rng


def _simulator_sized(case):
    """A drawn attention case cut to what the CUDA simulator runs in about a second: at most 40 keys, one sequence,
    two KV heads (the masks, windows, GQA ratios and query suffixes stay as drawn)."""
    B, Tq, Tk, hq, hkv, dh, window, docs, seed = case
    r = hq // hkv
    hkv = min(hkv, 2)
    Tk = min(Tk, 40)
    return 1, min(Tq, Tk), Tk, hkv * r, hkv, dh, window, docs, seed


@pytest.mark.sim_examples(6)  # the simulator's slowest kernels (block reductions, flash tiles)
@SETTINGS
@given(attention_cases())
def test_attention(backend, dtype, record, case):
    if is_simulated(backend):
        case = _simulator_sized(case)
    q, k, v, kwargs, rng = _attention_inputs(case, dtype)
    B, Tq, Tk, hq, hkv, dh = case[:6]
    (o_r, c_r) = REFERENCE.attention_forward(q, k, v, **kwargs)
    (o_b, c_b) = run(backend, "attention_forward", q, k, v, **kwargs)
    n = dh + Tk
    check_close(to_numpy(o_b), o_r, dtype, n, scale=np.abs(v).max(), what="attention_forward", recorder=record)
    do = randn(rng, o_r.shape, dtype)
    grads_r = REFERENCE.attention_backward(c_r, do)
    grads_b = run(backend, "attention_backward", c_b, do)
    # Terms: dQ = Σ_s P(dP − D) K/√d_h with dP = dO·V (a length-d_h dot): |terms| ≲ |dO||V||K|; likewise dK, dV.
    amax = lambda a: float(np.abs(a).max())  # noqa: E731
    scales = (amax(do) * amax(v) * amax(k), amax(do) * amax(v) * amax(q), amax(do))
    for name, g_r, g_b, s in zip(("dq", "dk", "dv"), grads_r, grads_b, scales):
        check_close(to_numpy(g_b), g_r, dtype, n + Tq * (hq // hkv), scale=max(s, amax(g_r)),
                    what=f"attention_backward {name}", recorder=record)


@SETTINGS
@given(st.lists(st.integers(1, 12), min_size=1, max_size=3), seeds)
def test_output_gate_and_swiglu(backend, dtype, record, shape, seed):
    rng = np.random.default_rng(seed)
    for fwd, bwd in (("output_gate_forward", "output_gate_backward"), ("swiglu_forward", "swiglu_backward")):
        a, c = randn(rng, shape, dtype, 4.0), randn(rng, shape, dtype, 4.0)
        (y_r, c_r), (y_b, c_b) = getattr(REFERENCE, fwd)(a, c), run(backend, fwd, a, c)
        check_close(to_numpy(y_b), y_r, dtype, 1, what=fwd, recorder=record)
        dy = randn(rng, shape, dtype)
        # σ(1 + a(1 − σ)) and σ(1 − σ) are sums of terms: size them by absolute values (σ(|a|) ≥ σ(a)).
        sig = 1 / (1 + np.exp(-np.abs(a if fwd.startswith("swiglu") else c).astype(np.float64)))
        if fwd.startswith("swiglu"):
            sizes = (amax(dy * c * sig * (1 + np.abs(a))), amax(dy * a * sig))
        else:
            sizes = (amax(dy * sig), amax(dy * a * sig))
        for i, (g_r, g_b) in enumerate(zip(getattr(REFERENCE, bwd)(c_r, dy), run(backend, bwd, c_b, dy))):
            check_close(to_numpy(g_b), g_r, dtype, 1, scale=max(sizes[i], amax(g_r)), what=f"{bwd} [{i}]",
                        recorder=record)


# ---- router, dispatch, experts, combine ----------------------------------------------------------------------------
@SETTINGS
@given(st.integers(1, 40), st.integers(1, 10), st.data(), st.integers(1, 24), st.floats(0.25, 3.0), st.booleans(),
       seeds)
def test_router(backend, dtype, record, N, E, data, d, rho, balance_grad, seed):
    K = data.draw(st.integers(1, E))
    rng = np.random.default_rng(seed)
    x, w = randn(rng, (N, d), dtype), randn(rng, (E, d), dtype, 2.0 / np.sqrt(d))
    bias = randn(rng, E, dtype, 0.1)
    g_r, e_r, c_r = REFERENCE.router_forward(x, w, bias, K, rho)
    # Selections may differ only where the K-th and (K+1)-th biased scores are within the scores' rounding.
    biased = np.sort(c_r[2] + bias, axis=-1)[:, ::-1]
    if K < E:
        assume(float((biased[:, K - 1] - biased[:, K]).min()) > 10 * rtol(dtype, d))
    g_b, e_b, c_b = run(backend, "router_forward", x, w, bias, K, rho)
    np.testing.assert_array_equal(to_numpy(e_b), e_r)
    check_close(to_numpy(g_b), g_r, dtype, d + K, what="router_forward weights", recorder=record)
    dweights = randn(rng, (N, K), dtype)
    dscores = randn(rng, (N, E), dtype) if balance_grad else None
    (dx_r, dw_r) = REFERENCE.router_backward(c_r, dweights, dscores)
    (dx_b, dw_b) = run(backend, "router_backward", c_b, dweights, dscores)
    # Terms of dz: |dscores|·s(1−s) and, on the chosen experts, (ρ/S)(|dg_m| + Σ_k |dg_k g_k|/ρ)·s(1−s).
    s, total = c_r[2].astype(np.float64), c_r[4].astype(np.float64)
    dz = np.zeros_like(s) if dscores is None else np.abs(dscores).astype(np.float64)
    chosen = (rho / total) * (np.abs(dweights) + np.abs(dweights * g_r).sum(-1, keepdims=True) / rho)
    np.put_along_axis(dz, e_r, np.take_along_axis(dz, e_r, -1) + chosen, -1)
    dz *= s * (1 - s)
    check_close(to_numpy(dx_b), dx_r, dtype, E + K, scale=amax(dz @ np.abs(w)), what="router_backward dx",
                recorder=record)
    check_close(to_numpy(dw_b), dw_r, dtype, N + K, scale=amax(dz.T @ np.abs(x)), what="router_backward dW",
                recorder=record)


def _plan(rng, N, E, K):
    """Distinct top-K expert choices per token among the first `used` ≥ K experts, so that experts with no token
    occur."""
    used = int(rng.integers(K, E + 1))
    return np.stack([rng.permutation(used)[:K] for _ in range(N)]).astype(np.int64)


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 8), st.data(), seeds)
def test_dispatch(backend, dtype, record, N, E, data, seed):
    K = data.draw(st.integers(1, E))
    experts = _plan(np.random.default_rng(seed), N, E, K)
    plan_r, plan_b = REFERENCE.dispatch(experts, E), run(backend, "dispatch", experts, E)
    for field in ("token", "slot", "offsets", "counts"):
        np.testing.assert_array_equal(to_numpy(getattr(plan_b, field)), getattr(plan_r, field), err_msg=field)


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 8), st.data(), st.integers(1, 24), st.integers(1, 20), seeds)
def test_experts_and_combine(backend, dtype, record, N, E, data, d, I, seed):
    K = data.draw(st.integers(1, E))
    rng = np.random.default_rng(seed)
    experts = _plan(rng, N, E, K)
    plan, plan_b = REFERENCE.dispatch(experts, E), run(backend, "dispatch", experts, E)
    x = randn(rng, (N, d), dtype)
    w1, w3 = randn(rng, (E, I, d), dtype, d ** -0.5), randn(rng, (E, I, d), dtype, d ** -0.5)
    w2 = randn(rng, (E, d, I), dtype, I ** -0.5)
    xg = x[plan.token]
    (y_r, c_r), (y_b, c_b) = REFERENCE.experts_forward(xg, plan.offsets, w1, w3, w2), \
        run(backend, "experts_forward", xg, plan_b.offsets, w1, w3, w2)
    fwd_abs = REFERENCE.experts_forward(np.abs(xg), plan.offsets, np.abs(w1), np.abs(w3), np.abs(w2))
    check_close(to_numpy(y_b), y_r, dtype, d + I, scale=amax(fwd_abs[0]), what="experts_forward", recorder=record)
    dyg = randn(rng, y_r.shape, dtype)
    sizes = terms(lambda c, *a: REFERENCE.experts_backward(fwd_abs[1], *a), c_r, dyg, w1, w3, w2)
    lengths = (2 * I + d, N, N, N)  # dx: dh over d, then one sum over [da | dc] (2I terms)
    for name, g_r, g_b, n, size in zip(("dx", "dW1", "dW3", "dW2"), REFERENCE.experts_backward(c_r, dyg, w1, w3, w2),
                                       run(backend, "experts_backward", c_b, dyg, w1, w3, w2), lengths, sizes):
        check_close(to_numpy(g_b), g_r, dtype, n, scale=size, what=f"experts_backward {name}", recorder=record)
    weights = rng.uniform(0.1, 1.0, (N, K)).astype(dtype)
    out_r, out_b = REFERENCE.combine(y_r, weights, plan, N), run(backend, "combine", y_r, weights, plan_b, N)
    check_close(to_numpy(out_b), out_r, dtype, K, scale=terms(REFERENCE.combine, y_r, weights, plan, N),
                what="combine", recorder=record)
    dy = randn(rng, (N, d), dtype)
    sizes = terms(REFERENCE.combine_backward, dy, y_r, weights, plan)
    for name, g_r, g_b, n, size in zip(("dy_grouped", "dweights"), REFERENCE.combine_backward(dy, y_r, weights, plan),
                                       run(backend, "combine_backward", dy, y_r, weights, plan_b), (1, d), sizes):
        check_close(to_numpy(g_b), g_r, dtype, n, scale=size, what=f"combine_backward {name}", recorder=record)
    s_r, s_b = REFERENCE.scatter_to_tokens(dyg, plan, N, K), run(backend, "scatter_to_tokens", dyg, plan_b, N, K)
    check_close(to_numpy(s_b), s_r, dtype, K, scale=terms(REFERENCE.scatter_to_tokens, dyg, plan, N, K),
                what="scatter_to_tokens", recorder=record)


# ---- losses --------------------------------------------------------------------------------------------------------
@pytest.mark.sim_examples(6)  # the simulator's slowest kernels (block reductions, flash tiles)
@SETTINGS
@given(st.integers(1, 3), st.integers(1, 20), st.integers(2, 300), st.sampled_from([0.0, 0.2, 1.0]),
       st.sampled_from([0.0, 1e-4, 0.3]), st.floats(0.5, 2.0), seeds)
@example(B=1, T=2, V=2, ignored=0.0, lam=0.0, scale=1.0, seed=286622479)  # target probability 0.999 (softmax_term)
def test_cross_entropy(backend, dtype, record, B, T, V, ignored, lam, scale, seed):
    rng = np.random.default_rng(seed)
    logits = randn(rng, (B, T, V), dtype, 4.0)
    labels = np.where(rng.random((B, T)) < ignored, -100, rng.integers(0, V, (B, T)))
    ce_r, z_r, c_r = REFERENCE.cross_entropy_forward(logits, labels, lam)
    ce_b, z_b, c_b = run(backend, "cross_entropy_forward", logits, labels, lam)
    n = V + B * T
    check_close(float(ce_b), ce_r, dtype, n, scale=max(abs(ce_r), 1.0), what="cross_entropy ce", recorder=record)
    check_close(float(z_b), z_r, dtype, n, scale=max(abs(z_r), lam), what="cross_entropy z", recorder=record)
    d_r, d_b = REFERENCE.cross_entropy_backward(c_r, scale), run(backend, "cross_entropy_backward", c_b, scale)
    # softmax = exp(z − lse): an absolute error δ in z − lse (δ ≈ eps·|z − lse|) is a relative error δ in exp.
    cond = 1.0 + amax(logits[:, :-1] - c_r[3][..., None]) if T > 1 else 1.0
    # dz = softmax·coef − onehot/N: where the target's probability is near 1 the two nearly cancel, and the rounding
    # left is eps of the softmax term, not of the small difference (the explore profile found p = 0.999, V = 2)
    check_close(to_numpy(d_b), d_r, dtype, V, scale=max(amax(d_r), softmax_term(c_r, scale)) * cond,
                what="cross_entropy_backward", recorder=record)


def softmax_term(ctx, scale) -> float:
    """The largest |softmax·coef| of cross_entropy_backward (before the one-hot is subtracted), in float64."""
    logits, _, valid, lse, denom, lam = ctx
    coef = np.where(valid, (1.0 + 2.0 * lam * lse) * (scale / denom), 0.0)
    z = logits[:, :valid.shape[1]].astype(np.float64)
    return amax(np.exp(z - np.asarray(lse, dtype=np.float64)[..., None]) * coef[..., None])


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 8), st.data(), st.floats(1e-3, 1.0), seeds)
def test_balance_loss(backend, dtype, record, B, T, E, data, coeff, seed):
    K = data.draw(st.integers(1, E))
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.01, 0.99, (B, T, E)).astype(dtype)
    experts = _plan(rng, B * T, E, K).reshape(B, T, K)
    l_r, c_r = REFERENCE.balance_loss_forward(scores, experts, K, coeff)
    l_b, c_b = run(backend, "balance_loss_forward", scores, experts, K, coeff)
    check_close(float(l_b), l_r, dtype, E + T, scale=coeff, what="balance_loss", recorder=record)
    d_r, d_b = REFERENCE.balance_loss_backward(c_r, 0.5), run(backend, "balance_loss_backward", c_b, 0.5)
    check_close(to_numpy(d_b), d_r, dtype, E, scale=coeff / (T * B), what="balance_loss_backward", recorder=record)


# ---- Muon's Newton–Schulz ------------------------------------------------------------------------------------------
@SETTINGS
@given(st.sampled_from([(), (3,)]), st.integers(1, 48), st.integers(1, 48), st.sampled_from(["dion", "keller"]),
       st.integers(1, 6), seeds)
def test_newton_schulz(backend, dtype, record, batch, m, n, coefficients, steps, seed):
    from trinity.reference.operators.optimizer_kernels import newton_schulz

    G = randn(np.random.default_rng(seed), (*batch, m, n), dtype)
    X_r = newton_schulz(G, steps=steps, coefficients=coefficients)
    X_b = to_numpy(backend.newton_schulz(backend.xp.asarray(G), steps=steps, coefficients=coefficients))
    assert X_b.dtype == X_r.dtype
    # Each step is three products (after the transpose m ≤ n: X Xᵀ over n, A² over m, B X over m). The map
    # σ ↦ aσ + bσ³ + cσ⁵ multiplies a perturbation along a small singular value by a, so a rounding difference made
    # at step i grows by ∏_{j>i} a_j: the condition factor is ∏ |a_j| (≈ 493 for Dion's five steps).
    from trinity.reference.operators.optimizer_kernels import _coefficient_schedule

    cond = float(np.prod([abs(a) for a, _, _ in _coefficient_schedule(coefficients, steps)]))
    check_close(X_b, X_r, dtype, steps * (2 * min(m, n) + max(m, n)), scale=amax(X_r) * cond,
                what="newton_schulz", recorder=record)


@SETTINGS
@given(st.sampled_from([(), (3,)]), st.integers(1, 48), st.integers(1, 48), st.sampled_from(["dion", "keller"]),
       st.integers(1, 6), st.floats(-3, 3), seeds)
def test_newton_schulz_bf16(backend, dtype, record, batch, m, n, coefficients, steps, log_size, seed):
    """A table's bf16 Newton–Schulz (newton_schulz(..., dtype="bfloat16"), tables with `ns_bf16`) against the float64
    reference, within tolerances.ns_bf16_tol, on inputs of condition number ≤ 10 (tolerances.py: bf16 cannot
    resolve smaller singular directions); the output holds bf16 values. dtype is the input's."""
    if not getattr(backend, "ns_bf16", False):
        pytest.skip(f"{backend.name} has no bf16 Newton–Schulz")
    from trinity.reference.operators.optimizer_kernels import _coefficient_schedule, newton_schulz

    rng = np.random.default_rng(seed)
    k = min(m, n)
    U = np.linalg.qr(rng.standard_normal((*batch, m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((*batch, n, k)))[0]
    s = rng.uniform(0.1, 1.0, (*batch, k)) * 10.0 ** log_size
    G = ((U * s[..., None, :]) @ np.swapaxes(V, -1, -2)).astype(dtype)
    X_r = newton_schulz(G.astype(np.float64), steps=steps, coefficients=coefficients)
    X_b = to_numpy(backend.newton_schulz(backend.xp.asarray(G), steps=steps, coefficients=coefficients,
                                         dtype=BF16))
    assert X_b.dtype == np.float32 and X_b.shape == G.shape
    bits = X_b.view(np.uint32)
    assert not np.any(bits & np.uint32(0xFFFF)), "the bf16 result has bits below bf16's 8-bit significand"
    schedule = _coefficient_schedule(coefficients, steps)
    check_close(X_b, X_r, BF16, 1, what="newton_schulz bf16", recorder=record,
                tol=ns_bf16_tol(schedule, steps * (2 * k + max(m, n)), amax(X_r)))


# ---- AdamW and clipping kernels (SPEC §9.2, §14 #3) ---------------------------------------------------------------
BLOCK = 1 << 16  # elements per task of the numba optimizer kernels (accel/optimizer_kernels.py)


@SETTINGS
@given(st.one_of(st.lists(st.integers(1, 64), min_size=1, max_size=3), st.just([BLOCK + 3])), st.integers(1, 2000),
       st.floats(0.0, 0.3),
       st.sampled_from([(0.9, 0.95), (0.8, 0.999), (0.0, 0.0)]), st.sampled_from([1e-8, 1e-3]), st.booleans(), seeds)
def test_adamw_update(backend, dtype, record, shape, step, wd, betas, eps, transposed_grad, seed):
    """Same bits as the reference for parameter and state (elementwise, same order and roundings); the update norm
    is a float64 sum of n squares in another order: relative error ≤ n·ε₆₄ (the worst case of any summation order).
    Shapes: small ones, and one just over the kernels' task block (BLOCK elements), so several tasks share the work."""
    from trinity.reference.operators.optimizer_kernels import adamw_update

    rng = np.random.default_rng(seed)
    X, m = randn(rng, shape, dtype), randn(rng, shape, dtype, 0.1)
    v = np.abs(randn(rng, shape, dtype, 0.01))
    G = randn(rng, shape[::-1], dtype).T if transposed_grad else randn(rng, shape, dtype)
    kw = dict(lr=1e-3, wd=wd, beta1=betas[0], beta2=betas[1], eps=eps, step=step)
    ref = [a.copy() for a in (X, m, v)]
    got = [to_backend(backend, a.copy()) for a in (X, m, v)]
    n_r = adamw_update(*ref[:1], G, *ref[1:], **kw)
    n_b = backend.adamw_update(got[0], to_backend(backend, G), got[1], got[2], **kw)
    for name, r, b in zip(("X", "m", "v"), ref, got):
        np.testing.assert_array_equal(to_numpy(b), r, err_msg=f"adamw_update {name}")
    assert abs(n_b - n_r) <= X.size * np.finfo(np.float64).eps * n_r
    try:  # mismatched shapes are an error, never a silent update (or an out-of-bounds write)
        backend.adamw_update(got[0], to_backend(backend, G), got[1], got[2][..., :-1] if v.shape[-1] > 1 else
                             got[2][..., None], **kw)
    except ValueError:
        pass
    else:
        raise AssertionError("adamw_update accepted a second moment of another shape")


@SETTINGS
@given(st.one_of(st.lists(st.integers(1, 64), min_size=1, max_size=3), st.just([BLOCK + 3])), st.floats(-30, 30),
       st.booleans(), seeds)
def test_clip_kernels(backend, dtype, record, shape, log_scale, transposed, seed):
    """sum_of_squares: float64 accumulation of n exact squares in another order, relative error ≤ n·ε₆₄; scaled:
    the same bits (one float64 product rounded once)."""
    from trinity.reference.operators.optimizer_kernels import scaled, sum_of_squares

    rng = np.random.default_rng(seed)
    x = randn(rng, shape[::-1], dtype).T if transposed else randn(rng, shape, dtype)
    s_r, s_b = sum_of_squares(x), backend.sum_of_squares(to_backend(backend, x))
    assert abs(s_b - s_r) <= x.size * np.finfo(np.float64).eps * s_r
    factor = float(np.exp(log_scale) / 7.0)
    np.testing.assert_array_equal(to_numpy(backend.scaled(to_backend(backend, x), factor)), scaled(x, factor))
