"""The reference runs on any array namespace: the xp rule (docs/architecture.md) checked under array-api-strict.

array-api-strict is NumPy behind the Array API standard and nothing more: no `.reshape` method, no integer-array
indexing, no `np.add.at`, no mixing with NumPy arrays or 0-d NumPy scalars. Here its arrays also refuse to become
NumPy arrays (`__array__` raises inside `no_numpy_conversion`, as a CuPy array's does), so a NumPy function that
reaches a strict array fails instead of quietly computing on the host. Every result must come back as a strict array
and equal the NumPy run's (float64, rtol 1e-12; the two run the same NumPy kernels underneath).

Checked: every leaf operator forward and backward and the optimizer kernels on random small shapes (hypothesis), and
one training step of the `tiny` preset with every feature on (sliding and global layers, the intra-document mask, MoE
with a shared expert, z-loss and balance loss, SMEBU or sign balancing, tied or untied head, two micro-batches, and
Muon + AdamW through apply_update with clipping).

Out of scope, NumPy on the host by design: data loading and packing (the batch is made with NumPy, then converted),
parameter initialisation (NumPy's RNG), checkpoints and HF interop, the numba backend, and the step's host
bookkeeping (the optimizer's step counter stays a NumPy scalar; losses and norms are Python floats). The trainer,
the KV cache and generation, evaluation, the inspector and the distributed seams run on strict arrays as a stand-in
device in tests/test_device_placement.py.
"""

from __future__ import annotations

import math

import array_api_strict as xps
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import random_params
from strict_device import no_numpy_conversion

from trinity.reference import Config
from trinity.reference.data.packing import document_ids
from trinity.reference.operators import (attention, embedding, linear, losses, mlp, moe, norms, optimizer_kernels,
                                         rope, router)
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.step import GlobalBatch, apply_update, compute_gradients

RTOL = 1e-12
StrictArray = type(xps.asarray(0))


# ---- conversion and comparison ------------------------------------------------------------------------------------
def to_strict(value):
    """NumPy arrays (anywhere in dicts, lists, tuples) as strict arrays; everything else unchanged."""
    if isinstance(value, np.ndarray):
        return xps.asarray(value, copy=True)
    if isinstance(value, dict):
        return {k: to_strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_strict(v) for v in value)
    return value


def assert_same(got, want, where="result"):
    """got (from strict inputs) has want's structure, strict arrays where want has NumPy arrays, equal values."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, StrictArray), f"{where}: expected a strict array, got {type(got).__name__}"
        got = np.asarray(got)
        assert got.shape == want.shape and got.dtype == want.dtype, f"{where}: {got.shape} {got.dtype} vs " \
                                                                   f"{want.shape} {want.dtype}"
        scale = float(np.max(np.abs(want))) if want.size and want.dtype.kind == "f" else 0.0
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=where)
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=RTOL, abs_tol=1e-300) or got == want, f"{where}: {got} vs {want}"
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


def check_namespaces(fn, **inputs):
    """fn(**inputs) on NumPy arrays and on their strict copies give the same results (copied first: some
    operators update their inputs in place)."""
    strict_inputs = to_strict(inputs)
    want = fn(**inputs)
    with no_numpy_conversion():
        got = fn(**strict_inputs)
    assert_same(got, want, fn.__name__)


def test_the_guard_catches_numpy_calls():
    """The check itself: a NumPy-only call on a strict array fails inside the guard."""
    x = xps.asarray(np.arange(4.0))
    with no_numpy_conversion():
        with pytest.raises(TypeError, match="reached NumPy"):
            np.add.at(np.zeros(4), np.arange(4), x)
        with pytest.raises(AttributeError):
            x.reshape(2, 2)  # not in the standard
    assert np.asarray(x).sum() == 6.0


# ---- the leaf operators on random shapes --------------------------------------------------------------------------
def _sizes():
    return st.fixed_dictionaries(dict(
        seed=st.integers(0, 2**32 - 1), B=st.integers(1, 2), T=st.integers(1, 40), hkv=st.integers(1, 2),
        r=st.integers(1, 2), dh=st.sampled_from([2, 4, 6]), d=st.integers(1, 8), E=st.integers(2, 6),
        K=st.integers(1, 3), V=st.integers(2, 16), window=st.sampled_from([None, 1, 3, 8, 17]),
        docs=st.booleans(), shift=st.booleans()))


def _distinct_choices(rng, rows, E, K):
    """[rows, K] distinct expert ids per row."""
    return np.stack([rng.permutation(E)[:K] for _ in range(rows)]).astype(np.int64).reshape(rows, K)


def _linear(x, w, dy):
    y, ctx = linear.linear_forward(x, w)
    return y, linear.linear_backward(ctx, dy)


def _embedding(tokens, table, dx):
    y, ctx = embedding.embedding_forward(tokens, table, 1.7)
    return y, embedding.embedding_backward(ctx, dx)


def _rmsnorm(x, gain, dy):
    y, ctx = norms.rmsnorm_forward(x, gain, 1e-5)
    return y, norms.rmsnorm_backward(ctx, dy)


def _rope(positions, x, dy):
    cos, sin = rope.rope_tables(positions, x.shape[-1], 100.0, x.dtype)
    y, ctx = rope.rope_forward(x, cos, sin)
    return cos, sin, y, rope.rope_backward(ctx, dy)


def _attention(q, k, v, g, do, docs, window):
    xp = q.__array_namespace__()
    o, ctx = attention.attention_forward(q, k, v, window=window, doc_ids=docs, block_budget=64)
    out, gate_ctx = attention.output_gate_forward(xp.reshape(o, g.shape), g)
    do_heads, dg = attention.output_gate_backward(gate_ctx, do)
    return out, dg, attention.attention_backward(ctx, xp.reshape(do_heads, q.shape), block_budget=64)


def _swiglu(a, c, dh):
    h, ctx = mlp.swiglu_forward(a, c)
    return h, mlp.swiglu_backward(ctx, dh)


def _router(x, w, bias, dweights, dscores, K):
    weights, chosen, ctx = router.router_forward(x, w, bias, K, 2.0)
    return weights, chosen, router.router_backward(ctx, dweights, dscores)


def _moe(x, chosen, weights, w1, w3, w2, dy, E):
    plan = moe.dispatch(chosen, E)
    rows = xp_take(x, plan.token)
    y_rows, ctx = moe.experts_forward(rows, plan.offsets, w1, w3, w2)
    y = moe.combine(y_rows, weights, plan, x.shape[0])
    dy_rows, dweights = moe.combine_backward(dy, y_rows, weights, plan)
    dx_rows, dw1, dw3, dw2 = moe.experts_backward(ctx, dy_rows, w1, w3, w2)
    dx = moe.scatter_to_tokens(dx_rows, plan, x.shape[0], chosen.shape[1])
    return tuple(plan), y, dweights, dx, dw1, dw3, dw2


def xp_take(x, index):
    return x.__array_namespace__().take(x, index, axis=0)


def _cross_entropy(logits, labels, shift):
    ce, z, ctx = losses.cross_entropy_forward(logits, labels, 1e-3, shift=shift)
    return ce, z, losses.cross_entropy_backward(ctx, 0.5)


def _balance(scores, chosen, K):
    loss, ctx = losses.balance_loss_forward(scores, chosen, K, 1e-2)
    return loss, losses.balance_loss_backward(ctx)


def _optimizer_kernels(G, X, m, v):
    O = optimizer_kernels.newton_schulz(G, steps=3)
    norm = optimizer_kernels.adamw_update(X, G, m, v, lr=1e-2, wd=0.1, beta1=0.9, beta2=0.95, eps=1e-8, step=3)
    return O, X, m, v, norm, optimizer_kernels.sum_of_squares(G), optimizer_kernels.scaled(G, 0.3)


@settings(max_examples=25)
@given(s=_sizes())
def test_leaf_operators_under_array_api_strict(s):
    rng = np.random.default_rng(s["seed"])
    B, T, hkv, dh, d, E, V = s["B"], s["T"], s["hkv"], s["dh"], s["d"], s["E"], s["V"]
    hq, K, N = hkv * s["r"], min(s["K"], s["E"]), s["B"] * s["T"]
    normal = rng.standard_normal

    check_namespaces(_linear, x=normal((B, T, d)), w=normal((3, d)), dy=normal((B, T, 3)))
    check_namespaces(_embedding, tokens=rng.integers(0, V, (B, T)), table=normal((V, d)), dx=normal((B, T, d)))
    check_namespaces(_rmsnorm, x=normal((B, T, hq, dh)), gain=normal(dh), dy=normal((B, T, hq, dh)))
    check_namespaces(_rope, positions=np.sort(rng.choice(4 * T, T, replace=False)), x=normal((B, T, hq, dh)),
                     dy=normal((B, T, hq, dh)))
    docs = np.cumsum(rng.random((B, T)) < 0.2, axis=1) if s["docs"] else None
    check_namespaces(_attention, q=normal((B, T, hq, dh)), k=normal((B, T, hkv, dh)), v=normal((B, T, hkv, dh)),
                     g=normal((B, T, hq * dh)), do=normal((B, T, hq * dh)), docs=docs, window=s["window"])
    check_namespaces(_swiglu, a=normal((N, d)), c=normal((N, d)), dh=normal((N, d)))
    check_namespaces(_router, x=normal((N, d)), w=normal((E, d)), bias=normal(E).astype(np.float32),
                     dweights=normal((N, K)), dscores=normal((N, E)) if s["docs"] else None, K=K)
    check_namespaces(_moe, x=normal((N, d)), chosen=_distinct_choices(rng, N, E, K), weights=normal((N, K)),
                     w1=normal((E, 5, d)), w3=normal((E, 5, d)), w2=normal((E, d, 5)), dy=normal((N, d)), E=E)
    labels = rng.integers(0, V, (B, T))
    labels[rng.random((B, T)) < 0.3] = losses.IGNORE_INDEX
    check_namespaces(_cross_entropy, logits=normal((B, T, V)), labels=labels, shift=s["shift"])
    check_namespaces(_balance, scores=rng.random((B, T, E)) + 0.01,
                     chosen=_distinct_choices(rng, N, E, K).reshape(B, T, K), K=K)
    shape = (2, d + 1, 3) if s["shift"] else (3, d + 1)  # a batch of tall matrices, or one wide one
    check_namespaces(_optimizer_kernels, G=normal(shape), X=normal(shape), m=normal(shape), v=rng.random(shape))


# ---- one training step of the model ---------------------------------------------------------------------------------
def _step_config(method: str, tied: bool) -> Config:
    return Config.preset("tiny").replace(
        vocab_size=64, sliding_window=8, intra_document_mask=True, load_balancing=method, balance_loss_coeff=1e-2,
        z_loss_coeff=1e-3, tie_word_embeddings=tied, smebu_lambda=1e-2, sign_update_rate=1e-2, grad_clip_norm=0.5)


def _step_batch(config: Config, S: int, T: int, seed: int) -> GlobalBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, config.vocab_size, (S, T))
    tokens[rng.random((S, T)) < 0.1] = 0  # EOS: documents end inside the rows
    labels = tokens.copy()
    labels[rng.random((S, T)) < 0.1] = losses.IGNORE_INDEX
    return GlobalBatch(tokens, labels, document_ids(tokens, 0))


def _train_step(config, params, opt_state, bal_state, batch):
    g = compute_gradients(config, params, batch, micro_batch_size=1)
    info = apply_update(config, params, opt_state, bal_state, g, 2e-2, 1e-2)
    return (g.losses, g.grads, g.grad_norm, g.counts, g.tokens, g.logits_max, g.logits_mean, g.batch_het,
            info["clipped_grads"], info["balance"], info["optimizer"], params, opt_state, bal_state)


@pytest.mark.parametrize("method, tied", [("smebu", False), ("sign", True)])
def test_training_step_under_array_api_strict(method, tied):
    config = _step_config(method, tied)
    windows = {config.window_of(layer) for layer in range(config.num_hidden_layers)}
    assert windows == {None, 8} and config.num_dense_layers >= 1 and config.num_shared_experts == 1
    params = random_params(config, seed=3)
    params = {k: v.astype(np.float32) if k.endswith("expert_bias") else v for k, v in params.items()}
    batch = _step_batch(config, S=2, T=24, seed=4)
    opt_state, bal_state = init_optimizer_state(config, params), init_balancing_state(config, params)

    strict = [to_strict(dict(params)), to_strict(dict(opt_state)), to_strict(dict(bal_state)),
              GlobalBatch(*(xps.asarray(a) for a in (batch.tokens, batch.labels, batch.doc_ids)))]
    strict[1]["step"] = opt_state["step"].copy()  # the step counter is host state
    want = _train_step(config, params, opt_state, bal_state, batch)
    with no_numpy_conversion():
        got = _train_step(config, *strict)
    got_opt, want_opt = dict(got[12]), dict(want[12])
    assert int(got_opt.pop("step")) == int(want_opt.pop("step")) == 1
    assert_same(got[:12] + (got_opt,) + got[13:], want[:12] + (want_opt,) + want[13:], "step")
    assert want[2] > config.grad_clip_norm  # clipping scaled the gradients


def test_a_cupy_array_gets_cupy_with_the_standard_functions_it_lacks(monkeypatch):
    """CuPy's ndarray has no __array_namespace__ (up to CuPy 15), and CuPy lacks vecdot, a `stable` argsort keyword
    and a few other standard names: array_namespace gives the operators `cupy` with those written from what it has.
    Checked with a stand-in module named cupy (no GPU here) built from NumPy without them."""
    import sys
    import types

    from trinity.reference.operators.array_module import array_namespace, with_standard_functions
    fake = types.ModuleType("cupy")
    for k in dir(np):
        if not k.startswith("__") and k not in ("vecdot", "concat", "isdtype", "astype", "argsort"):
            setattr(fake, k, getattr(np, k))
    fake.argsort = lambda x, axis=-1: np.argsort(x, axis=axis, kind="stable")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    Array = type("ndarray", (), {"__module__": "cupy._core.core"})
    xp = array_namespace(None, Array())
    a = np.random.default_rng(0).standard_normal((3, 4))
    assert np.allclose(xp.vecdot(a, a, axis=-1), np.vecdot(a, a, axis=-1))
    ids = np.array([2, 0, 2, 1, 0])
    assert np.array_equal(xp.argsort(ids, stable=True), np.argsort(ids, stable=True))
    assert xp.concat([a, a]).shape == (6, 4) and xp.isdtype(a.dtype, "real floating")
    assert xp.astype(a, np.float32).dtype == np.float32 and xp.sum is np.sum
    assert with_standard_functions(np) is np  # NumPy lacks none of them
