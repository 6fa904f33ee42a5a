"""Generation with a KV cache (reference/model/kv_cache.py, reference/generation/sampling.py, `trinity generate`).

The cache must be invisible: feeding a sequence through the cache in pieces (a prefill, then one token at a time,
or any chunking) gives the logits of the full forward on the whole sequence, to ~1e-12 in float64 (only the order
of sums differs), over drawn configs with windows shorter than the sequence (the ring buffer wraps), GQA, dense
layers, muP, tied heads, all-sliding and all-global layer patterns. Greedy generation then picks the same tokens as
recomputing the full forward at every step. Draws whose top-k routing or argmax is within GAP of a tie are
rejected: there a 1e-15 difference could legitimately flip a choice.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trinity.cli.main import main
from trinity.reference import Config, logits, model_backward, model_forward
from trinity.reference.generation.sampling import generate, generate_stream, sample_next
from trinity.reference.model.kv_cache import KVCache, LayerCache
from strategies import min_topk_gap, random_params, small_configs

GAP = 1e-9
RTOL = 1e-12


def _case_config(draw, **fixed):
    fields = dict(sliding_window=draw(st.integers(1, 8)), max_layers=4, max_hidden=32, max_vocab=48)
    layout = draw(st.sampled_from(["derived", "all_sliding", "all_global"]))
    config = draw(small_configs(**{**fields, **fixed}))
    if layout != "derived":
        kind = "sliding_attention" if layout == "all_sliding" else "full_attention"
        config = config.replace(layer_types=(kind,) * config.num_hidden_layers)
    return config


@st.composite
def chunked_cases(draw):
    """(config, params seed, tokens [B, T], chunk sizes summing to T)."""
    config = _case_config(draw)
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tokens = rng.integers(0, config.vocab_size, (B, T))
    first = draw(st.integers(1, T))  # the prefill
    chunks = [first]
    while sum(chunks) < T:
        chunks.append(draw(st.integers(1, T - sum(chunks))) if draw(st.booleans()) else 1)
    return config, draw(st.integers(0, 2**16)), tokens, chunks


def _assert_close(got, want, rtol=RTOL):
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


# ---- the cached forward equals the full forward ------------------------------------------------------------------
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(chunked_cases())
def test_cached_logits_equal_full_forward(case):
    config, seed, tokens, chunks = case
    params = random_params(config, seed)
    full, ctx = model_forward(config, params, tokens)
    assume(min_topk_gap(config, params, ctx) > GAP)
    cache = KVCache(config)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(logits(config, params, tokens[:, start:start + n], kv_cache=cache))
        start += n
    assert cache.length == tokens.shape[1]
    _assert_close(np.concatenate(pieces, axis=1), full)


def _greedy_by_recompute(config, params, prompt, n):
    """Greedy continuation recomputing the full forward at every step; None if a step is within GAP of a tie."""
    seq = list(prompt)
    for _ in range(n):
        out, ctx = model_forward(config, params, np.array([seq]))
        last = np.sort(out[0, -1])
        if min_topk_gap(config, params, ctx) <= GAP or (last.size > 1 and last[-1] - last[-2] <= GAP):
            return None
        seq.append(int(np.argmax(out[0, -1])))
    return seq[len(prompt):]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(st.data())
def test_greedy_generation_equals_full_recompute(data):
    config = _case_config(data.draw)
    params = random_params(config, data.draw(st.integers(0, 2**16)))
    P = data.draw(st.integers(1, 10))
    n = data.draw(st.integers(1, 14))
    prompt = np.random.default_rng(data.draw(st.integers(0, 2**16))).integers(0, config.vocab_size, P)
    want = _greedy_by_recompute(config, params, prompt, n)
    assume(want is not None)
    assert generate(config, params, prompt, n) == want


# explicit configs, so that every feature is covered whatever hypothesis draws
FEATURES = {
    "gqa_dense_mup_wraps": dict(num_attention_heads=4, num_key_value_heads=2, num_dense_layers=1, mup_enabled=True,
                                sliding_window=3),
    "mqa_window1": dict(num_attention_heads=3, num_key_value_heads=1, num_dense_layers=0, sliding_window=1),
    "all_dense_tied": dict(num_dense_layers=3, tie_word_embeddings=True, sliding_window=2),
    "all_sliding": dict(layer_types=("sliding_attention",) * 3, sliding_window=4, mup_enabled=True),
    "all_global": dict(layer_types=("full_attention",) * 3),
    "window_longer_than_sequence": dict(sliding_window=64),
}


def _feature_config(**changes):
    base = dict(vocab_size=40, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3,
                num_dense_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_experts=4,
                num_experts_per_tok=2, num_shared_experts=1, route_scale=2.0, global_attn_every_n_layers=3,
                sliding_window=4, rope_theta=100.0)
    return Config(**{**base, **changes})


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_features_prefill_then_decode(name):
    config = _feature_config(**FEATURES[name])
    params = random_params(config, 7)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (1, 20))
    full, ctx = model_forward(config, params, tokens)
    assert min_topk_gap(config, params, ctx) > GAP
    cache = KVCache(config)
    pieces = [logits(config, params, tokens[:, :6], kv_cache=cache)]
    pieces += [logits(config, params, tokens[:, t:t + 1], kv_cache=cache) for t in range(6, 20)]
    _assert_close(np.concatenate(pieces, axis=1), full)
    want = _greedy_by_recompute(config, params, tokens[0, :5], 12)
    assert want is not None
    assert generate(config, params, tokens[0, :5], 12) == want


def test_float32_cache_matches_float32_forward():
    config = _feature_config(**FEATURES["gqa_dense_mup_wraps"])
    params = {k: v.astype(np.float32) for k, v in random_params(config, 1).items()}
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    full = logits(config, params, tokens)
    cache = KVCache(config)
    got = np.concatenate([logits(config, params, tokens[:, :5], kv_cache=cache)]
                         + [logits(config, params, tokens[:, t:t + 1], kv_cache=cache) for t in range(5, 16)], axis=1)
    assert got.dtype == np.float32 and cache.layers[0].k.dtype == np.float32
    _assert_close(got, full, rtol=1e-5)


# ---- what the cache holds --------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 3, 5])
def test_ring_buffer_holds_exactly_w_keys_after_norm_and_rope(window):
    config = _feature_config(**{**FEATURES["gqa_dense_mup_wraps"], "sliding_window": window})
    params = random_params(config, 2)
    T = 17
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (1, T))
    cache = KVCache(config)
    logits(config, params, tokens[:, :4], kv_cache=cache)
    sizes = []
    for t in range(4, T):
        logits(config, params, tokens[:, t:t + 1], kv_cache=cache)
        sizes.append([c.k.shape[1] for c in cache.layers if c.window is not None])
    # sliding layers: a ring of exactly w slots from the first token on (O(w) memory)
    assert all(s == [window] * len(s) for s in sizes)
    _, ctx = model_forward(config, params, tokens)
    for layer, c in enumerate(cache.layers):
        k_full, v_full = ctx["layers"][layer]["self_attn"]["sdpa"][1:3]  # keys after QK-norm and RoPE
        k, v, pos = c.ordered()
        if config.is_sliding_layer(layer):
            assert c.window == window and c.k.shape[1] == window and c.size == window
            assert sorted(c.positions.tolist()) == list(range(T - window, T))
            assert all(c.positions[p % window] == p for p in range(T - window, T))
        else:
            assert c.window is None and c.size == T
        np.testing.assert_array_equal(pos, np.arange(T - c.size, T))
        _assert_close(k, k_full[:, T - c.size:])
        _assert_close(v, v_full[:, T - c.size:])


def test_sliding_cache_memory_stays_constant():
    config = _feature_config(sliding_window=3, layer_types=("sliding_attention",) * 3)
    params = random_params(config, 0)
    cache = KVCache(config)
    logits(config, params, np.arange(10)[None] % config.vocab_size, kv_cache=cache)
    before = cache.nbytes
    for t in range(30):
        logits(config, params, np.array([[t % config.vocab_size]]), kv_cache=cache)
    assert cache.nbytes == before == 3 * 2 * 4 * 8 * 8 * 3  # layers · (k, v) · h_kv · d_h · 8 bytes · w


def test_layer_cache_positions_and_growth():
    c = LayerCache(None)
    k = np.arange(2 * 20 * 1 * 2, dtype=np.float64).reshape(2, 20, 1, 2)
    k_all, v_all, q_pos, k_pos = c.update(k[:, :3], -k[:, :3])
    assert q_pos.tolist() == [0, 1, 2] and k_pos.tolist() == [0, 1, 2]
    k_all, v_all, q_pos, k_pos = c.update(k[:, 3:], -k[:, 3:])  # grows past its first capacity
    assert q_pos.tolist() == list(range(3, 20)) and k_pos.tolist() == list(range(20))
    np.testing.assert_array_equal(k_all, k)
    np.testing.assert_array_equal(v_all, -k)
    ring = LayerCache(4)
    _, _, q_pos, k_pos = ring.update(k[:, :6], k[:, :6])  # a prefill longer than the window
    assert q_pos.tolist() == list(range(6)) and k_pos.tolist() == list(range(6))
    assert ring.k.shape[1] == 4 and sorted(ring.positions.tolist()) == [2, 3, 4, 5]
    k_all, _, q_pos, k_pos = ring.update(k[:, 6:7], k[:, 6:7])
    assert q_pos.tolist() == [6] and k_pos.tolist() == [3, 4, 5, 6]  # exactly w keys including itself
    np.testing.assert_array_equal(k_all, k[:, 3:7])
    with pytest.raises(ValueError, match="do not fit"):
        ring.update(k[:1, :1], k[:1, :1])
    with pytest.raises(ValueError, match="window"):
        LayerCache(0)


def test_cache_refuses_backward_and_doc_ids():
    config = _feature_config()
    params = random_params(config, 0)
    tokens = np.zeros((1, 4), dtype=np.int64)
    out, ctx = model_forward(config, params, tokens, kv_cache=KVCache(config))
    with pytest.raises(ValueError, match="kv_cache"):
        model_backward(config, params, ctx, np.ones_like(out))
    with pytest.raises(ValueError, match="doc_ids"):
        model_forward(config, params, tokens, doc_ids=np.zeros((1, 4), dtype=np.int64), kv_cache=KVCache(config))
    with pytest.raises(ValueError, match="layers"):
        model_forward(config, params, tokens, kv_cache=KVCache(config.replace(num_hidden_layers=2)))


# ---- sampling --------------------------------------------------------------------------------------------------
class _FixedRng:
    """Stands in for a Generator: random() returns the given numbers."""

    def __init__(self, *u):
        self.u = list(u)

    def random(self):
        return self.u.pop(0)


def test_sample_next_inverse_cdf_temperature_and_nucleus():
    z = np.log([0.5, 0.3, 0.15, 0.05])
    for u, want in [(0.0, 0), (0.49, 0), (0.51, 1), (0.79, 1), (0.81, 2), (0.94, 2), (0.96, 3), (0.999, 3)]:
        assert sample_next(z, 1.0, 1.0, _FixedRng(u)) == want, u
    # nucleus 0.7: {0, 1} renormalised to (0.625, 0.375)
    for u, want in [(0.6, 0), (0.63, 1), (0.999, 1)]:
        assert sample_next(z, 1.0, 0.7, _FixedRng(u)) == want, u
    assert sample_next(z, 1.0, 0.85, _FixedRng(0.99)) == 2  # {0, 1, 2}
    assert sample_next(z, 1.0, 0.4, _FixedRng(0.99)) == 0  # the top token alone
    # temperature 2: p ∝ √p
    q = np.sqrt([0.5, 0.3, 0.15, 0.05])
    q /= q.sum()
    edge = float(q[0])
    assert sample_next(z, 2.0, 1.0, _FixedRng(edge - 1e-9)) == 0
    assert sample_next(z, 2.0, 1.0, _FixedRng(edge + 1e-9)) == 1
    # the order is by logit, not by id
    assert sample_next(z[::-1], 1.0, 0.4, _FixedRng(0.5)) == 3


def test_sample_next_frequencies():
    z = np.log([0.5, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(0)
    draws = np.array([sample_next(z, 1.0, 0.7, rng) for _ in range(5000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.625) < 0.03


def test_greedy_and_ties_pick_lowest_id():
    z = np.array([1.0, 3.0, 3.0, 0.0])
    assert sample_next(z) == 1
    assert sample_next(z, 1.0, 1e-12, np.random.default_rng(0)) == 1
    assert sample_next(z, 0.0, 0.3, None) == 1  # greedy ignores top_p and needs no rng
    with pytest.raises(ValueError, match="rng"):
        sample_next(z, 1.0, 1.0, None)
    with pytest.raises(ValueError, match="non-finite"):
        sample_next(np.array([0.0, np.nan]), 1.0, 1.0, np.random.default_rng(0))


@pytest.fixture(scope="module")
def small_model():
    config = _feature_config(**FEATURES["gqa_dense_mup_wraps"])
    return config, random_params(config, 11)


def test_sampling_deterministic_per_seed(small_model):
    config, params = small_model
    prompt = [1, 2, 3]
    runs = {s: generate(config, params, prompt, 15, temperature=1.5, top_p=0.95, seed=s) for s in range(4)}
    for s, out in runs.items():
        assert generate(config, params, prompt, 15, temperature=1.5, top_p=0.95, seed=s) == out
        assert len(out) == 15 and all(0 <= t < config.vocab_size for t in out)
    assert len({tuple(v) for v in runs.values()}) > 1  # the seed matters


def test_tiny_top_p_equals_greedy(small_model):
    config, params = small_model
    greedy = generate(config, params, [4, 5], 16)
    for seed in range(3):
        assert generate(config, params, [4, 5], 16, temperature=0.8, top_p=1e-9, seed=seed) == greedy
    assert generate(config, params, [4, 5], 16, temperature=0.0, top_p=0.3, seed=9) == greedy


def test_eos_stops_and_max_new_tokens(small_model):
    config, params = small_model
    greedy = generate(config, params, [7], 12)
    assert generate(config, params, [7], 12, eos_id=greedy[0]) == greedy[:1]
    k = max(i for i in range(len(greedy)) if greedy[i] not in greedy[:i])  # the last first occurrence
    assert generate(config, params, [7], 12, eos_id=greedy[k]) == greedy[:k + 1]
    assert generate(config, params, [7], 0) == []
    assert generate(config, params, [7], 5) == greedy[:5]
    assert list(generate_stream(config, params, [7], 12)) == greedy


def test_prefill_chunks_do_not_change_the_result(small_model):
    config, params = small_model
    prompt = list(range(1, 14))
    want = generate(config, params, prompt, 6)
    for chunk in (1, 4, 13, 100):
        assert list(generate_stream(config, params, prompt, 6, prefill_chunk=chunk)) == want


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_tokens=[]), "non-empty"),
    (dict(prompt_tokens=[[1, 2]]), "1-D"),
    (dict(prompt_tokens=[1.5]), "token ids"),
    (dict(prompt_tokens=[999]), r"\[0, 40\)"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(eos_id="x"), "eos_id"),
])
def test_generate_errors(small_model, kwargs, match):
    config, params = small_model
    args = {"prompt_tokens": [1], "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(config, params, **args)


# ---- the CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """Our checkpoint (float32) that carries the bytes tokenizer (as a run on a prepared dataset saves it), one that
    carries none (a run on synthetic data), and an HF directory of the same params with a trained BPE
    tokenizer.json."""
    from trinity.reference.training.checkpoint import save_checkpoint
    from trinity.reference.interop.hf import save_pretrained
    from trinity.reference.data.tokenizer import ByteTokenizer, tokenizer_record, train_bpe

    root = tmp_path_factory.mktemp("gen")
    config = _feature_config(**FEATURES["gqa_dense_mup_wraps"]).replace(vocab_size=300)
    params = {k: v.astype(np.float32) for k, v in random_params(config, 4).items()}
    data = root / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "bytes"}}))
    (data / "tokens.bin").write_bytes(b"")
    synth = root / "synth"
    synth.mkdir()
    (synth / "tokens.bin").write_bytes(b"")
    paths = {}
    for name, tokenizer in (("bytes", tokenizer_record(ByteTokenizer())), ("synth", None)):
        paths[name] = save_checkpoint(root / f"{name}.h5", config=config, params=params, optimizer_state={},
                                      balancing_state={}, step=1, tokens_seen=0, data_state={}, rng_state=None,
                                      tokenizer=tokenizer)
    hf = root / "hf"
    save_pretrained(hf, config, params)
    text = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 20
    train_bpe(text, 280, hf / "tokenizer.json")
    paths["hf"] = str(hf)
    return config, params, paths


def _run(capsys, *args):
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_checkpoint_prompt_tokens(cli_setup, capsys):
    config, params, paths = cli_setup
    want = generate(config, params, [5, 6, 7], 8)
    code, out, err = _run(capsys, paths["synth"], "--prompt-tokens", "5,6,7", "--max-new-tokens", 8, "--ignore-eos")
    assert code == 0, err
    assert out == " ".join(map(str, want)) + "\n"
    # sampling follows generate(seed)
    want = generate(config, params, [5, 6, 7], 8, temperature=0.9, top_p=0.8, seed=3)
    code, out, _ = _run(capsys, paths["synth"], "--prompt-tokens", "5, 6, 7", "--max-new-tokens", 8,
                        "--temperature", 0.9, "--top-p", 0.8, "--seed", 3, "--ignore-eos")
    assert out.split() == [str(t) for t in want]
    # --eos-id stops generation
    greedy = generate(config, params, [5, 6, 7], 8)
    code, out, _ = _run(capsys, paths["synth"], "--prompt-tokens", "5,6,7", "--max-new-tokens", 8,
                        "--eos-id", greedy[2])
    assert out.split() == [str(t) for t in greedy[:3]]


def _checkpoint_trained_on_bytes(root):
    """A checkpoint that carries the bytes tokenizer (a run on a prepared dataset saves it), and whose vocabulary is
    that tokenizer's (257: bytes 0..255 and EOS 256), so that every id the model can generate decodes, whatever the
    numbers; and a checkpoint of the same model that carries none (a run on a flat token file)."""
    from trinity.reference.training.checkpoint import save_checkpoint
    from trinity.reference.data.tokenizer import ByteTokenizer, tokenizer_record

    config = _feature_config(**FEATURES["gqa_dense_mup_wraps"]).replace(vocab_size=ByteTokenizer.vocab_size)
    params = {k: v.astype(np.float32) for k, v in random_params(config, 4).items()}
    data = root / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "bytes"}}))
    (data / "tokens.bin").write_bytes(b"")
    (root / "flat.bin").write_bytes(b"")
    paths = {}
    for name, tokenizer in (("bytes", tokenizer_record(ByteTokenizer())), ("flat", None)):
        paths[name] = save_checkpoint(root / f"{name}.h5", config=config, params=params, optimizer_state={},
                                      balancing_state={}, step=1, tokens_seen=0, data_state={}, rng_state=None,
                                      tokenizer=tokenizer)
    return config, params, paths


def test_cli_checkpoint_text_with_dataset_tokenizer(tmp_path, capsys):
    """`--prompt TEXT` on a checkpoint encodes the text with the tokenizer it carries from its run's dataset (here
    bytes: the non-ASCII prompt is its UTF-8 bytes) and decodes the continuation with it. Exact whatever ids greedy
    decoding picks: the model's vocabulary is the tokenizer's, so every id decodes."""
    from trinity.reference.data.tokenizer import ByteTokenizer

    config, params, paths = _checkpoint_trained_on_bytes(tmp_path)
    tok = ByteTokenizer()
    prompt = "héllo, wörld ✓"
    prompt_ids = tok.encode(prompt)
    assert prompt_ids == list(prompt.encode("utf-8")) and len(prompt_ids) > len(prompt)
    new = generate(config, params, prompt_ids, 10, eos_id=None)
    code, out, err = _run(capsys, paths["bytes"], "--prompt", prompt, "--max-new-tokens", 10, "--ignore-eos")
    assert code == 0, err
    assert out == prompt + tok.decode(new) + "\n"  # text by default: a tokenizer was found
    # the prompt went in as its bytes: the same ids as giving those bytes as --prompt-tokens, or the bytes tokenizer
    code, out, err = _run(capsys, paths["bytes"], "--prompt", prompt, "--max-new-tokens", 10, "--ignore-eos",
                          "--no-echo", "--output", "ids")
    assert code == 0, err
    assert out.split() == [str(t) for t in new]
    code, out, _ = _run(capsys, paths["flat"], "--prompt-tokens", ",".join(map(str, prompt_ids)),
                        "--max-new-tokens", 10, "--ignore-eos", "--output", "ids")
    assert out.split() == [str(t) for t in new]
    code, out, _ = _run(capsys, paths["flat"], "--prompt", prompt, "--tokenizer", "bytes", "--max-new-tokens", 10,
                        "--ignore-eos")
    assert out == prompt + tok.decode(new) + "\n"
    # without the dataset (a run on a flat token file) there is no tokenizer to find
    code, _, err = _run(capsys, paths["flat"], "--prompt", prompt, "--max-new-tokens", 2)
    assert code == 2 and "needs a tokenizer" in err


def test_cli_hf_directory_with_tokenizer(cli_setup, capsys):
    from trinity.reference.data.tokenizer import load_tokenizer

    config, params, paths = cli_setup
    tok = load_tokenizer(paths["hf"])
    prompt = tok.encode("the quick brown")
    new = generate(config, params, prompt, 6, eos_id=tok.eos_id)
    code, out, err = _run(capsys, paths["hf"], "--prompt", "the quick brown", "--max-new-tokens", 6, "--no-echo",
                          "--stats")
    assert code == 0, err
    assert out == tok.decode([t for t in new if t != tok.eos_id]) + "\n"
    assert "tokens/s" in err
    # --tokenizer overrides; the .h5 and the HF directory give the same tokens
    code, out, _ = _run(capsys, paths["synth"], "--prompt", "the quick brown", "--max-new-tokens", 6,
                        "--tokenizer", os.path.join(paths["hf"], "tokenizer.json"), "--output", "ids")
    assert out.split() == [str(t) for t in new]


@pytest.mark.parametrize("args, match", [
    (["{missing}", "--prompt-tokens", "1", "--max-new-tokens", "2"], "no such file"),
    (["{synth}", "--prompt", "hello", "--max-new-tokens", "2"], "needs a tokenizer"),
    (["{synth}", "--prompt-tokens", "1,x", "--max-new-tokens", "2"], "comma-separated"),
    (["{synth}", "--prompt-tokens", "1,300", "--max-new-tokens", "2"], "outside the model's vocabulary"),
    (["{synth}", "--prompt-tokens", "1", "--max-new-tokens", "-1"], "max-new-tokens"),
    (["{synth}", "--prompt-tokens", "1", "--max-new-tokens", "2", "--top-p", "2"], "--top-p"),
    (["{synth}", "--prompt-tokens", "1", "--max-new-tokens", "2", "--temperature", "-1"], "--temperature"),
    (["{synth}", "--prompt-tokens", "1", "--max-new-tokens", "2", "--tokenizer", "{missing}"], "tokenizer"),
    (["{meta}", "--prompt-tokens", "1", "--max-new-tokens", "2"], "checkpoint"),
])
def test_cli_errors_are_one_line(cli_setup, capsys, tmp_path, args, match):
    _, _, paths = cli_setup
    names = dict(missing=str(tmp_path / "nope.h5"), synth=paths["synth"],
                 meta=os.path.join(os.path.dirname(paths["bytes"]), "data", "meta.json"))
    code, out, err = _run(capsys, *[a.format(**names) for a in args])
    assert code == 2
    assert err.startswith("trinity generate: error:") and err.count("\n") == 1, err
    assert match in err


# ---- against Hugging Face generate (the oracle extra) -----------------------------------------------------------
@pytest.mark.oracle
@pytest.mark.parametrize("name, window", [("gqa_dense_mup_wraps", 3), ("mqa_window1", 2), ("all_global", None)])
def test_greedy_matches_hf_generate(name, window):
    """Greedy tokens equal HF's `generate` in float64, with HF's own KV cache and without it. (Window 1 is left
    out: transformers' cached path then disagrees with its own uncached forward, which ours matches.)"""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import hf_oracle as O

    changes = dict(FEATURES[name])
    if window is not None:
        changes["sliding_window"] = window
    config = _feature_config(**changes)
    params = random_params(config, 7)
    prompt = np.random.default_rng(3).integers(0, config.vocab_size, 6)
    want = _greedy_by_recompute(config, params, prompt, 12)
    assert want is not None
    assert generate(config, params, prompt, 12) == want
    model = O.hf_model_from_params(config, params, dtype=torch.float64, lift=True)
    for use_cache in (True, False):
        with O.lifted(), torch.no_grad():
            out = model.generate(torch.tensor(prompt[None]), max_new_tokens=12, do_sample=False, use_cache=use_cache,
                                 pad_token_id=0)
        assert out[0, len(prompt):].tolist() == want, f"use_cache={use_cache}"


def test_numba_backend_generates_the_same_tokens(cli_setup, capsys):
    from trinity.accel import BackendUnavailable, get_backend

    try:
        ops = get_backend("numba")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    config = _feature_config(**FEATURES["gqa_dense_mup_wraps"])
    params = random_params(config, 7)
    prompt = np.random.default_rng(3).integers(0, config.vocab_size, 6)
    assert generate(config, params, prompt, 12, ops=ops) == generate(config, params, prompt, 12)
    config, params, paths = cli_setup
    code, out, err = _run(capsys, paths["synth"], "--prompt-tokens", "5,6,7", "--max-new-tokens", 6, "--ignore-eos",
                          "--backend", "numba")
    assert code == 0, err
    assert out.split() == [str(t) for t in generate(config, params, [5, 6, 7], 6)]
