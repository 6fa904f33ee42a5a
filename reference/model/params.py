"""Parameter names, shapes, initialization and counts.

Params are data (docs/architecture.md): a flat `dict[str, ndarray]` keyed by the Hugging Face names of SPEC §3.1,
except that the routed experts of a layer are stacked into three tensors

    model.layers.{l}.mlp.experts.gate_proj  [E, I_m, d]   (W1 of every expert)
    model.layers.{l}.mlp.experts.up_proj    [E, I_m, d]   (W3)
    model.layers.{l}.mlp.experts.down_proj  [E, d, I_m]   (W2)

Gradients and optimizer moments use the same keys. Conversion to the per-expert HF layout lives in interop/hf.py.
"""

from __future__ import annotations

import hashlib
import math
import operator
from typing import NamedTuple

import numpy as np

from ..operators.array_module import array_namespace
from .config import Config

__all__ = ["param_shapes", "init_params", "init_param_span", "init_param_spans", "INIT_BLOCK", "param_count",
           "ParamCount", "layer_prefix", "EXPERT_KEYS", "check_params", "is_norm_gain", "is_expert_bias",
           "EXPERT_BIAS_DTYPE", "param_dtype", "param_buckets", "bucket_of"]

EXPERT_KEYS = ("gate_proj", "up_proj", "down_proj")

# `model.layers.{l}.mlp.expert_bias` is float32 whatever the model's dtype (docs/decisions.md #18): Hugging Face keeps
# it so (`_keep_in_fp32_modules_strict = ["expert_bias"]` since transformers 5.24) and the released checkpoints store
# it so. It only selects experts (s + b, SPEC §4.8), never multiplies an activation.
EXPERT_BIAS_DTYPE = np.dtype(np.float32)


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def param_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every parameter key with its shape, in a fixed order (SPEC §3.1, experts stacked)."""
    c = config
    d, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, d)}
    for l in range(c.num_hidden_layers):
        p = layer_prefix(l)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm"):
            shapes[p + norm + ".weight"] = (d,)
        a = p + "self_attn."
        shapes[a + "q_proj.weight"] = (c.q_width, d)
        shapes[a + "k_proj.weight"] = (c.kv_width, d)
        shapes[a + "v_proj.weight"] = (c.kv_width, d)
        shapes[a + "gate_proj.weight"] = (c.q_width, d)
        shapes[a + "o_proj.weight"] = (d, c.q_width)
        shapes[a + "q_norm.weight"] = (c.head_dim,)
        shapes[a + "k_norm.weight"] = (c.head_dim,)
        m = p + "mlp."
        if not c.is_moe_layer(l):
            shapes.update(_swiglu_shapes(m, d, c.intermediate_size))
            continue
        shapes[m + "router.gate.weight"] = (E, d)
        shapes[m + "expert_bias"] = (E,)
        shapes[m + "experts.gate_proj"] = (E, I, d)
        shapes[m + "experts.up_proj"] = (E, I, d)
        shapes[m + "experts.down_proj"] = (E, d, I)
        if c.num_shared_experts > 0:
            shapes.update(_swiglu_shapes(m + "shared_experts.", d, c.shared_intermediate_size))
    shapes["model.norm.weight"] = (d,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


def bucket_of(key: str):
    """The bucket a parameter is gathered with (seams.py): the layer number for `model.layers.{l}.…`, "embed" for
    the embedding table, "head" for the final norm and the untied head."""
    if key.startswith("model.layers."):
        return int(key.split(".", 3)[2])
    return "embed" if key == "model.embed_tokens.weight" else "head"


def param_buckets(config: Config) -> dict:
    """{bucket: [keys]} in the order the forward uses them: "embed", 0 … L−1, "head" (the order parameters are
    gathered in under FSDP, and reversed in the backward)."""
    buckets: dict = {"embed": [], **{layer: [] for layer in range(config.num_hidden_layers)}, "head": []}
    for key in param_shapes(config):
        buckets[bucket_of(key)].append(key)
    return buckets


def _swiglu_shapes(prefix: str, d: int, width: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (width, d), prefix + "up_proj.weight": (width, d),
            prefix + "down_proj.weight": (d, width)}


def is_expert_bias(key: str) -> bool:
    """`model.layers.{l}.mlp.expert_bias`: float32 in every model dtype (EXPERT_BIAS_DTYPE)."""
    return key.endswith("mlp.expert_bias")


def param_dtype(key: str, dtype) -> np.dtype:
    """The dtype parameter `key` has in a model of dtype `dtype`: float32 for the expert bias, else `dtype`."""
    return EXPERT_BIAS_DTYPE if is_expert_bias(key) else np.dtype(dtype)


def is_norm_gain(key: str) -> bool:
    """RMSNorm gains (layer norms, q/k norms, final norm): 1-D, no weight decay (SPEC §9.1)."""
    return key.endswith("norm.weight")


def _is_post_norm(key: str) -> bool:
    return key.endswith("post_attention_layernorm.weight") or key.endswith("post_mlp_layernorm.weight")


def _is_output_side(key: str) -> bool:
    """Matrices that write into the residual stream or the router: o_proj, every down_proj (w2), router gate."""
    return key.endswith("o_proj.weight") or "down_proj" in key or key.endswith("router.gate.weight")


# Fresh init is drawn in fixed blocks (docs/decisions.md #26): a key's whole array, flattened in C order, is cut
# into blocks of INIT_BLOCK elements (the last one shorter), and block b draws from its own stream. A span [lo, hi)
# therefore needs only the blocks it overlaps, and every layout (and the single process) gets the same values.
INIT_BLOCK = 1 << 16


def _key_hash(key: str) -> int:
    """The first 8 bytes of sha256(key), little-endian: a stable 64-bit name for the key's streams."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def _block_seed(seed: int, key_hash: int, block: int) -> list[int]:
    """The entropy of block `block` of a key: an independent, stable stream per (seed, key, block), so adding a key
    never shifts another key's values and a block never depends on which other blocks are drawn."""
    return [int(seed), key_hash, int(block)]


def _truncated_normal(rng: np.random.Generator, shape, std: float, bound: float) -> np.ndarray:
    """θ ~ N(0, σ²) truncated to [−bound·σ, bound·σ] by redrawing the samples outside (SPEC §8); float64."""
    x = rng.standard_normal(shape)
    out = np.abs(x) > bound
    while out.any():
        x[out] = rng.standard_normal(int(out.sum()))
        out = np.abs(x) > bound
    return x * std


def _init_std(config: Config, key: str) -> float:
    """σ of a weight matrix: `config.base_std`, divided by √(2(l+1)) for output-side matrices under `depth_init`."""
    if config.depth_init and _is_output_side(key):
        return config.base_std / np.sqrt(2.0 * (int(key.split(".")[2]) + 1))
    return config.base_std


def _key_shape(shapes: dict, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise KeyError(f"{key!r} is not a parameter of this config")
    return shapes[key]


def _init_span(config: Config, key: str, size: int, lo: int, hi: int, seed: int, dtype) -> np.ndarray:
    """Elements [lo, hi) of key's whole flat init (see init_param_span), drawing only the blocks they overlap."""
    lo, hi = operator.index(lo), operator.index(hi)
    if not 0 <= lo <= hi <= size:
        raise ValueError(f"{key}: span [{lo}, {hi}) is not within [0, {size}] with lo <= hi")
    out_dtype = param_dtype(key, dtype)
    if is_expert_bias(key):
        return np.zeros(hi - lo, dtype=out_dtype)
    if is_norm_gain(key):
        return np.full(hi - lo, config.post_norm_init if _is_post_norm(key) else 1.0, dtype=out_dtype)
    std, bound, key_hash = _init_std(config, key), config.init_truncation, _key_hash(key)
    out = np.empty(hi - lo, dtype=out_dtype)
    if lo == hi:
        return out
    for block in range(lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK + 1):
        start = block * INIT_BLOCK
        stop = min(start + INIT_BLOCK, size)
        rng = np.random.default_rng(_block_seed(seed, key_hash, block))
        values = _truncated_normal(rng, stop - start, std, bound)  # float64, then cast once on assignment
        first, last = max(lo, start), min(hi, stop)
        out[first - lo:last - lo] = values[first - start:last - start]
    return out


def init_param_span(config: Config, key: str, lo: int, hi: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Elements [lo, hi) of parameter `key`'s fresh init, its whole array flattened in C order: a 1-D array of
    hi − lo values, bitwise `init_params(config, seed, dtype)[key].reshape(-1)[lo:hi]`.

    Weight matrices are drawn in blocks: block b covers flat elements [b·INIT_BLOCK, (b+1)·INIT_BLOCK) and draws
    from `np.random.default_rng([seed, h, b])`, h the first 8 bytes of sha256(key) little-endian: standard normals
    for the whole block, those outside [−bound, bound] redrawn from the same stream (in order, until none is left),
    times σ, in float64, then cast. Only the blocks that overlap [lo, hi) are drawn; constant keys (gains, expert
    bias) are filled. Raises KeyError for a key the config does not have, ValueError unless 0 <= lo <= hi <= size.
    """
    shape = _key_shape(param_shapes(config), key)
    return _init_span(config, key, math.prod(shape), lo, hi, seed, dtype)


def init_param_spans(config: Config, wanted: dict, seed: int = 0, dtype=np.float32) -> dict[str, list[np.ndarray]]:
    """`wanted` = {key: [(lo, hi), …]} → {key: [init_param_span(config, key, lo, hi, seed, dtype), …]}, one 1-D
    array per span, in the order given: what a rank that holds these spans creates of a fresh model."""
    shapes = param_shapes(config)
    spans = {}
    for key, ranges in wanted.items():
        size = math.prod(_key_shape(shapes, key))
        spans[key] = [_init_span(config, key, size, lo, hi, seed, dtype) for lo, hi in ranges]
    return spans


def init_params(config: Config, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Fresh parameters per SPEC §8 (Arcee's training init, not HF's).

    - every weight matrix (embedding, lm_head, q/k/v/gate, w1/w3 of experts, shared and dense MLP):
      TruncNormal(0, σ²) on [−3σ, 3σ] with σ = `config.base_std` (0.5/√d under muP);
    - output-side matrices (o_proj, every down_proj, router gate): σ, or σ/√(2(l+1)) when `depth_init`;
    - pre-norm, q_norm, k_norm and final-norm gains 1; post-norm gains 1/√L (§14 #9);
    - expert_bias 0, in float32 whatever `dtype` (EXPERT_BIAS_DTYPE, docs/decisions.md #18).
    Each key is its whole span (init_param_span): values depend only on (seed, key, block), so any sharding of the
    keys into spans gives these values bitwise (docs/decisions.md #26), and they are drawn in float64 then cast, so
    float32 and float64 params agree.
    """
    params = {}
    for key, shape in param_shapes(config).items():
        params[key] = _init_span(config, key, math.prod(shape), 0, math.prod(shape), seed, dtype).reshape(shape)
    return params


class ParamCount(NamedTuple):
    total: int
    active: int  # per token: everything but the (E − K) routed experts a token does not use


def param_count(config: Config) -> ParamCount:
    """Total and per-token active parameter counts, from shapes only (nothing is allocated).

    Active counts the embedding and head (SPEC §2 "with embeddings") and K of the E routed experts.
    """
    total = active = 0
    E, K = config.num_experts, config.num_experts_per_tok
    for key, shape in param_shapes(config).items():
        n = int(np.prod(shape, dtype=np.int64))
        total += n
        if ".mlp.experts." in key:
            n = n // E * K
        active += n
    return ParamCount(total, active)


def check_params(config: Config, params: dict) -> np.dtype:
    """Raise KeyError/ValueError naming the key if `params` does not match `config` (missing or unexpected key,
    wrong shape, non-float or mixed dtype). Returns the model's float dtype: the one dtype every parameter but the
    expert biases shares.

    `model.layers.{l}.mlp.expert_bias` is float32 in every model dtype (docs/decisions.md #18); a bias in the model's
    own dtype (params cast key by key, `{k: v.astype(np.float64) ...}`) is accepted too and used as it is. Any other
    bias dtype is an error."""
    shapes = param_shapes(config)
    missing = [k for k in shapes if k not in params]
    if missing:
        raise KeyError(f"params lack {len(missing)} key(s) the config needs, e.g. {missing[0]!r} "
                       f"(expected shape {shapes[missing[0]]})")
    extra = [k for k in params if k not in shapes]
    if extra:
        raise KeyError(f"params hold key(s) the config does not have, e.g. {extra[0]!r} "
                       f"(shape {tuple(array_namespace(params[extra[0]]).asarray(params[extra[0]]).shape)})")
    dtypes, biases = set(), {}
    for k, shape in shapes.items():
        xp = array_namespace(params[k])
        value = xp.asarray(params[k])
        found = tuple(value.shape)
        if found != shape:
            raise ValueError(f"{k}: expected shape {shape}, found {found}")
        if is_expert_bias(k):
            biases[k] = value.dtype
        else:
            dtypes.add(value.dtype)
    if len(dtypes) != 1 or not xp.isdtype(next(iter(dtypes)), "real floating"):
        raise ValueError(f"params must share one float dtype (expert_bias aside), found {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    for k, found in biases.items():
        if found not in (getattr(xp, EXPERT_BIAS_DTYPE.name), dtype):
            raise ValueError(f"{k}: expert_bias must be float32 (or the model's {dtype}), found {found}")
    return dtype
