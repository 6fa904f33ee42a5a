"""Hypothesis strategies and random inputs shared by the conformance tests (no torch needed here).

Random weights are drawn for every parameter, router gate and expert_bias included: a zero router makes every
score tie at 0.5, so top-k would be decided by index alone (SPEC §3.4, §8, §14 #14).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from trinity.reference import Config, param_shapes


def often_multiple_of_4(lo, hi):
    """Any size in [lo, hi], or a multiple of 4 there (torch's float32 grouped_mm needs multiples of 4)."""
    return st.one_of(st.integers(lo, hi), st.integers(-(-lo // 4), hi // 4).map(lambda n: 4 * n))


@st.composite
def small_configs(draw, max_layers=5, max_hidden=64, max_vocab=64, **fixed):
    """A small valid Config over every axis the model has: muP on/off, 0–2 dense layers, windows shorter and longer
    than the sequence, GQA ratios 1…h_q, head_dim independent of hidden/heads, 0–2 shared experts, route_scale,
    top-k up to E, tied or untied head. `fixed` overrides any field."""
    h_q = draw(st.integers(1, 6))
    h_kv = draw(st.sampled_from([k for k in range(1, h_q + 1) if h_q % k == 0]))
    layers = draw(st.integers(1, max_layers))
    E = draw(st.integers(1, 8))
    fields = dict(
        vocab_size=draw(st.integers(2, max_vocab)), hidden_size=draw(often_multiple_of_4(4, max_hidden)),
        intermediate_size=draw(st.integers(1, 48)), moe_intermediate_size=draw(often_multiple_of_4(1, 24)),
        num_hidden_layers=layers, num_dense_layers=draw(st.integers(0, min(2, layers))),
        num_attention_heads=h_q, num_key_value_heads=h_kv, head_dim=2 * draw(st.integers(1, 10)),
        num_experts=E, num_experts_per_tok=draw(st.integers(1, E)), num_shared_experts=draw(st.integers(0, 2)),
        route_scale=draw(st.floats(0.25, 3.0)), sliding_window=draw(st.integers(1, 32)),
        global_attn_every_n_layers=draw(st.integers(1, 4)), mup_enabled=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()), rope_theta=draw(st.sampled_from([10000.0, 100.0, 1e6])),
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])), max_position_embeddings=64)
    fields.update(fixed)
    return Config(**fields)


def random_params(config: Config, seed: int, router: float = 2.0, bias: float = 0.1) -> dict[str, np.ndarray]:
    """Float64 random values for every param.

    Matrices ~ N(0, 1/fan_in) so activations stay O(1); norm gains ~ U(0.5, 1.5); the router gate is scaled so that
    logits spread by about `router`; expert_bias ~ N(0, bias²), comparable to the gaps between sigmoid scores."""
    rng = np.random.default_rng(seed)
    d = config.hidden_size
    params = {}
    for key, shape in param_shapes(config).items():
        if key.endswith("expert_bias"):
            params[key] = rng.normal(0.0, bias, shape)
        elif len(shape) == 1:
            params[key] = rng.uniform(0.5, 1.5, shape)
        elif key == "model.embed_tokens.weight":
            params[key] = rng.normal(0.0, 1.0 / math.sqrt(d) if config.mup_enabled else 1.0, shape)
        elif key.endswith("router.gate.weight"):
            params[key] = rng.normal(0.0, router / math.sqrt(d), shape)
        else:
            params[key] = rng.normal(0.0, 1.0 / math.sqrt(shape[-1]), shape)
    return params


def topk_gaps(scores: np.ndarray, expert_bias: np.ndarray, k: int) -> np.ndarray:
    """Per token, the gap between the K-th and (K+1)-th largest of s + b (inf when K = E): how far the selection
    is from a tie. Rounding or a small perturbation can flip top-k only where this gap is small."""
    biased = np.sort(scores + expert_bias, axis=-1)[..., ::-1]
    if k >= biased.shape[-1]:
        return np.full(biased.shape[:-1], np.inf)
    return biased[..., k - 1] - biased[..., k]


def min_topk_gap(config: Config, params: dict, model_ctx) -> float:
    """The smallest top-k boundary gap over every MoE layer and token of a model_forward ctx."""
    gap = math.inf
    for layer, routing in enumerate(model_ctx["routing"]):
        if routing is not None:
            scores = routing[0]
            bias = params[f"model.layers.{layer}.mlp.expert_bias"]
            gap = min(gap, float(topk_gaps(scores, bias, config.num_experts_per_tok).min()))
    return gap


@st.composite
def token_batches(draw, config: Config, max_batch=2, max_len=24):
    """(tokens, labels, doc_ids or None): labels are the tokens with some positions set to −100 (ignored)."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(2, max_len))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tokens = rng.integers(0, config.vocab_size, (B, T))
    labels = np.where(rng.random((B, T)) < draw(st.sampled_from([0.0, 0.2, 0.5])), -100, tokens)
    doc_ids = np.sort(rng.integers(0, 3, (B, T)), axis=1) if draw(st.booleans()) else None
    return tokens, labels, doc_ids
