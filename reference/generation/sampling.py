"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

The prompt is run once through the model with an empty kv_cache.KVCache (prefill, all prompt tokens at once);
then each new token is fed alone at the next absolute position (decode), attending to the cached keys and values.
Every step gives the same logits as running the full forward on the whole sequence so far (up to rounding in the
order of sums; tests/test_generation.py pins this at ~1e-12 in float64), at O(w) cache memory on sliding layers.

Sampling (`sample_next`), on the last position's logits z (float64):
- temperature == 0: greedy, argmax z (lowest token id on ties). top_p is ignored and no random number is drawn.
- otherwise p = softmax(z / temperature); with top_p < 1 only the nucleus is kept: the fewest most-likely tokens
  (sorted by z descending, lowest id first on ties) whose probabilities sum to ≥ top_p, renormalised. One uniform
  draw u ~ U[0, 1) from `numpy.random.default_rng(seed)` per token picks the token by inverse CDF, so the output
  is a deterministic function of the seed. As top_p → 0 the nucleus is the top token alone: greedy.

With an op table on a device (`ops.on_device`) the params must be the table's arrays (`ops.to_device(params)`); each
forward's tokens go to the device through `ops.to_device` (the prompt once per prefill chunk, then one id per new
token) and the last position's logits [V] come back through `ops.to_host` for sampling: the only copies; the KV
cache lives on the device (kv_cache.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..model.config import Config
from ..model.kv_cache import KVCache
from ..model.model import logits as model_logits
from ..model.ops import REFERENCE

__all__ = ["generate", "generate_stream", "sample_next", "check_sampling"]


def check_sampling(temperature: float, top_p: float) -> None:
    """ValueError unless 0 ≤ temperature < ∞ and 0 < top_p ≤ 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating, np.integer)) \
            or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


def sample_next(logits, temperature: float = 0.0, top_p: float = 1.0, rng: np.random.Generator | None = None) -> int:
    """The next token id from one position's logits [V] (see the module docstring for the rule).

    rng is needed when temperature > 0; exactly one uniform number is drawn from it per call."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if z.size == 0:
        raise ValueError("logits are empty")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits hold non-finite values (NaN or inf): the model's numbers overflowed")
    if temperature == 0:
        return int(np.argmax(z))
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng (numpy.random.Generator)")
    order = np.argsort(-z, kind="stable")  # most likely first, lowest id first on ties: order[0] == argmax
    zs = z[order] / float(temperature)
    p = np.exp(zs - zs[0])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p, side="left")) + 1  # fewest tokens with mass ≥ top_p
        p = p[:min(keep, p.size)]
    cdf = np.cumsum(p)
    u = rng.random() * cdf[-1]
    i = min(int(np.searchsorted(cdf, u, side="right")), p.size - 1)
    return int(order[i])


def generate_stream(config: Config, params: dict, prompt_tokens, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, ops=None,
                    prefill_chunk: int | None = None) -> Iterator[int]:
    """Yield the new token ids one at a time, as they are chosen (see `generate`). The arguments are checked
    before the first forward. prefill_chunk, when given, runs the prompt through the cache in pieces of that many
    tokens (bounds the prefill's [T, V] logits; the result is the same)."""
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim != 1 or prompt.size == 0 or (prompt.dtype.kind not in "iu"):
        raise ValueError(f"prompt_tokens must be a non-empty 1-D sequence of token ids, got "
                         f"dtype {prompt.dtype} shape {prompt.shape}")
    if prompt.min() < 0 or prompt.max() >= config.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {config.vocab_size}), "
                         f"found [{prompt.min()}, {prompt.max()}]")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if eos_id is not None and not (isinstance(eos_id, (int, np.integer)) and not isinstance(eos_id, bool)):
        raise ValueError(f"eos_id must be an integer or None, got {eos_id!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    check_sampling(temperature, top_p)
    return _generate(config, params, prompt.astype(np.int64), int(max_new_tokens), temperature, top_p, seed, eos_id,
                     ops or REFERENCE, prefill_chunk or prompt.size)


def _generate(config, params, prompt, max_new_tokens, temperature, top_p, seed, eos_id, ops, chunk):
    if max_new_tokens == 0:
        return
    rng = np.random.default_rng(seed)
    cache = KVCache(config, xp=ops.xp)
    for start in range(0, prompt.size, chunk):
        out = model_logits(config, params, ops.to_device(prompt[None, start:start + chunk]), ops=ops,
                           kv_cache=cache)
    for i in range(max_new_tokens):
        token = sample_next(ops.to_host(out[0, -1, :]), temperature, top_p, rng)
        yield token
        if (eos_id is not None and token == eos_id) or i + 1 == max_new_tokens:
            return
        out = model_logits(config, params, ops.to_device(np.array([[token]], dtype=np.int64)), ops=ops,
                           kv_cache=cache)


def generate(config: Config, params: dict, prompt_tokens, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, ops=None) -> list[int]:
    """Continue `prompt_tokens` (a non-empty 1-D sequence of ids) by up to max_new_tokens tokens; returns the new
    ids only (not the prompt). Greedy when temperature == 0, else temperature / top-p sampling, deterministic
    from `seed`. Generation stops after eos_id when given (the eos token is the last id returned). Runs with a
    KV cache: one prefill forward of the prompt, then one forward per new token. ops: the op table (default: the
    NumPy reference)."""
    return list(generate_stream(config, params, prompt_tokens, max_new_tokens, temperature, top_p, seed, eos_id,
                                ops))
