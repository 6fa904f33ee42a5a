"""Fresh init drawn in fixed blocks (docs/decisions.md #26, reference/model/params.py): any span [lo, hi) of a key's
whole flat array is created alone, bitwise equal to the single process's init sliced, by drawing only the blocks it
overlaps; the values follow the documented rule and SPEC §8's truncated normal."""

from __future__ import annotations

import hashlib
import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trinity.reference import Config, init_params, param_shapes
from trinity.reference.model import params as params_module
from trinity.reference.model.params import INIT_BLOCK, init_param_span, init_param_spans
from strategies import small_configs

B = INIT_BLOCK
# An embedding of 200,000 elements: three whole blocks and a partial fourth, rows of 200 that do not divide B.
MULTI_BLOCK = Config(vocab_size=1000, hidden_size=200, intermediate_size=16, moe_intermediate_size=8,
                     num_hidden_layers=2, num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=8, num_experts=4, num_experts_per_tok=2, num_shared_experts=1, sliding_window=8,
                     max_position_embeddings=64)
EMBED = "model.embed_tokens.weight"


@st.composite
def spans(draw, size: int, row: int, block: int):
    """(lo, hi) with 0 <= lo <= hi <= size: the whole key, an empty span, or ends anywhere, often on or next to a
    block or row boundary (so spans start and end mid-block and mid-row, and exactly on either)."""
    edges = {0, size}
    for step in (block, row):
        for m in range(min(size // step + 1, 50)):
            edges.update({m * step - 1, m * step, m * step + 1})
    edges = sorted(e for e in edges if 0 <= e <= size)
    point = st.one_of(st.integers(0, size), st.sampled_from(edges))
    kind = draw(st.sampled_from(["whole", "empty", "any", "any"]))
    if kind == "whole":
        return 0, size
    if kind == "empty":
        lo = draw(point)
        return lo, lo
    lo, hi = sorted((draw(point), draw(point)))
    return lo, hi


def _flat(config, key, seed, dtype):
    return init_params(config, seed=seed, dtype=dtype)[key].reshape(-1)


def _blocks_drawn(call):
    """Run call() and return the entropy of every generator it constructed, in order."""
    made, real = [], np.random.default_rng

    def counting(entropy=None, *args, **kwargs):
        made.append(tuple(entropy))
        return real(entropy, *args, **kwargs)

    with mock.patch.object(np.random, "default_rng", counting):
        call()
    return made


@given(config=small_configs(max_layers=3, max_hidden=32), seed=st.integers(0, 2**32 - 1),
       block=st.sampled_from([7, 100, 1000, INIT_BLOCK]), data=st.data())
def test_a_span_is_the_whole_init_sliced_bitwise(config, seed, block, data):
    """init_param_span == init_params(...)[key].reshape(-1)[lo:hi] bitwise in float32 and float64, for every kind
    of key (matrices, stacked experts, gains, expert bias) and spans on and off block and row boundaries; the block
    size is shrunk so that the small configs' keys span many blocks. float32 is the float64 draw rounded."""
    key = data.draw(st.sampled_from(sorted(param_shapes(config))), label="key")
    shape = param_shapes(config)[key]
    size = math.prod(shape)
    wanted = data.draw(st.lists(spans(size, shape[-1], block), min_size=1, max_size=3), label="spans")
    with mock.patch.object(params_module, "INIT_BLOCK", block):
        for dtype in (np.float32, np.float64):
            whole = _flat(config, key, seed, dtype)
            for lo, hi in wanted:
                span = init_param_span(config, key, lo, hi, seed=seed, dtype=dtype)
                assert span.shape == (hi - lo,) and span.dtype == whole.dtype
                np.testing.assert_array_equal(span, whole[lo:hi], strict=True)
        span64 = init_param_spans(config, {key: wanted}, seed=seed, dtype=np.float64)[key]
        span32 = init_param_spans(config, {key: wanted}, seed=seed, dtype=np.float32)[key]
    for a, b in zip(span32, span64):
        np.testing.assert_array_equal(a, b.astype(a.dtype), strict=True)


@pytest.mark.parametrize("lo, hi", [(0, 200_000), (0, 0), (B, B), (B - 1, B + 1), (B, 2 * B), (1, 3 * B - 1),
                                    (2 * B + 1, 200_000), (199_999, 200_000), (200 * 327 + 13, 200 * 981 + 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_spans_at_the_real_block_size(lo, hi, dtype):
    """The same at INIT_BLOCK itself, on a key of three whole blocks and a partial one, rows not dividing a block."""
    whole = _flat(MULTI_BLOCK, EMBED, 11, dtype)
    assert whole.size == 200_000
    np.testing.assert_array_equal(init_param_span(MULTI_BLOCK, EMBED, lo, hi, seed=11, dtype=dtype), whole[lo:hi],
                                  strict=True)


@given(config=small_configs(max_layers=3, max_hidden=32), block=st.sampled_from([7, 100, INIT_BLOCK]),
       data=st.data())
def test_a_span_draws_only_the_blocks_it_overlaps(config, block, data):
    """Cost: creating [lo, hi) constructs one generator per block that overlaps it, each once, with the entropy
    [seed, h(key), b], and no other; a constant key (gain, expert bias) constructs none."""
    key = data.draw(st.sampled_from(sorted(param_shapes(config))), label="key")
    shape = param_shapes(config)[key]
    lo, hi = data.draw(spans(math.prod(shape), shape[-1], block), label="span")
    with mock.patch.object(params_module, "INIT_BLOCK", block):
        made = _blocks_drawn(lambda: init_param_span(config, key, lo, hi, seed=5))
    constant = key.endswith("norm.weight") or key.endswith("expert_bias")
    expected = [] if constant or lo == hi else list(range(lo // block, (hi - 1) // block + 1))
    key_hash = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    assert made == [(5, key_hash, b) for b in expected]


def test_spans_of_a_large_key_draw_a_block_or_two_more_at_most():
    """At the real block size: a span inside one block draws that block; one crossing a boundary draws two; the
    whole key draws every block once."""
    for (lo, hi), blocks in {(10, 20): [0], (B - 5, B + 5): [0, 1], (3 * B, 3 * B + 1): [3],
                             (0, 200_000): [0, 1, 2, 3]}.items():
        made = _blocks_drawn(lambda: init_param_span(MULTI_BLOCK, EMBED, lo, hi, seed=0))
        assert [entropy[2] for entropy in made] == blocks, (lo, hi)


def _documented_block(seed: int, key: str, block: int, n: int, std: float, bound: float) -> np.ndarray:
    """Block `block` of `key` as docs/decisions.md #26 states it, written out independently of params.py."""
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"), block])
    x = rng.standard_normal(n)
    while (outside := np.abs(x) > bound).any():
        x[outside] = rng.standard_normal(int(outside.sum()))
    return x * std


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_follow_the_documented_rule(dtype):
    """Every block (the partial last one too) is the documented draw, times σ, cast: so the rule in the docs is the
    rule in the code, and a change of values cannot pass unnoticed."""
    whole = _flat(MULTI_BLOCK, EMBED, 3, dtype)
    for block in range(4):
        n = min(B, whole.size - block * B)
        expected = _documented_block(3, EMBED, block, n, MULTI_BLOCK.base_std, MULTI_BLOCK.init_truncation)
        np.testing.assert_array_equal(whole[block * B:block * B + n], expected.astype(dtype), strict=True)


def _truncated_std(bound: float) -> float:
    """Standard deviation of N(0, 1) truncated to [−bound, bound]: √(1 − 2bφ(b)/(2Φ(b) − 1))."""
    phi = math.exp(-bound * bound / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(1 - 2 * bound * phi / math.erf(bound / math.sqrt(2)))


@pytest.mark.parametrize("bound", [3.0, 1.5])
def test_a_large_key_is_a_truncated_normal(bound):
    """SPEC §8 over 2^20 values (16 blocks): all within ±bound·σ, std within 0.5% of the truncated normal's, mean
    ~0, and the blocks are independent streams (no two equal, neighbours uncorrelated)."""
    config = Config.preset("tiny").replace(vocab_size=4096, hidden_size=256, init_truncation=bound)
    sigma = config.base_std
    x = init_param_span(config, EMBED, 0, 4096 * 256, seed=1, dtype=np.float64)
    assert np.abs(x).max() <= bound * sigma
    assert abs(x.std() / (_truncated_std(bound) * sigma) - 1) < 5e-3
    assert abs(x.mean()) < 5 * sigma / math.sqrt(x.size)
    blocks = x.reshape(-1, B)
    assert len({b.tobytes() for b in blocks}) == len(blocks)
    for a, b in zip(blocks[:-1], blocks[1:]):
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(B)


def test_depth_init_scales_the_same_draws():
    """Under depth_init an output-side matrix of layer l is the same standard draws times σ/√(2(l+1)) (the
    truncation is in units of σ, so the redraws fall at the same places)."""
    key = "model.layers.1.self_attn.o_proj.weight"
    base = init_param_span(MULTI_BLOCK, key, 0, 200 * 16, seed=2, dtype=np.float64)
    deep = init_param_span(MULTI_BLOCK.replace(depth_init=True), key, 0, 200 * 16, seed=2, dtype=np.float64)
    np.testing.assert_allclose(deep, base / 2.0, rtol=1e-15, atol=0)


def test_keys_and_seeds_draw_their_own_values():
    """Two keys of one shape, or one key under two seeds, never share values."""
    q = init_param_span(MULTI_BLOCK, "model.layers.0.self_attn.q_proj.weight", 0, 16 * 200)
    gate = init_param_span(MULTI_BLOCK, "model.layers.0.self_attn.gate_proj.weight", 0, 16 * 200)
    assert not np.array_equal(q, gate)
    assert not np.array_equal(init_param_span(MULTI_BLOCK, EMBED, 0, 100, seed=0),
                              init_param_span(MULTI_BLOCK, EMBED, 0, 100, seed=1))


def test_init_param_spans_returns_each_keys_spans_in_order():
    wanted = {EMBED: [(B + 3, B + 9), (0, 4), (7, 7)], "model.norm.weight": [(0, 200)],
              "model.layers.1.mlp.expert_bias": [(1, 3)]}
    got = init_param_spans(MULTI_BLOCK, wanted, seed=4, dtype=np.float64)
    assert list(got) == list(wanted)
    for key, ranges in wanted.items():
        assert len(got[key]) == len(ranges)
        for (lo, hi), span in zip(ranges, got[key]):
            np.testing.assert_array_equal(span, init_param_span(MULTI_BLOCK, key, lo, hi, seed=4, dtype=np.float64),
                                          strict=True)
    assert got["model.layers.1.mlp.expert_bias"][0].dtype == np.float32
    np.testing.assert_array_equal(got["model.norm.weight"][0], np.ones(200))
    assert init_param_spans(MULTI_BLOCK, {}) == {}


@pytest.mark.parametrize("lo, hi", [(-1, 3), (5, 4), (0, 200_001)])
def test_a_span_outside_the_key_is_one_line(lo, hi):
    with pytest.raises(ValueError, match=r"^model\.embed_tokens\.weight: span \[") as error:
        init_param_span(MULTI_BLOCK, EMBED, lo, hi)
    assert "\n" not in str(error.value)


def test_an_unknown_key_is_one_line():
    with pytest.raises(KeyError, match="is not a parameter of this config"):
        init_param_spans(MULTI_BLOCK, {"model.layers.9.mlp.expert_bias": [(0, 1)]})
