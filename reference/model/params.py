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
from typing import NamedTuple

import numpy as np

from ..operators.array_module import array_namespace
from .config import Config

__all__ = ["param_shapes", "init_params", "param_count", "ParamCount", "layer_prefix", "EXPERT_KEYS", "check_params",
           "is_norm_gain", "is_expert_bias", "EXPERT_BIAS_DTYPE", "param_dtype", "param_buckets", "bucket_of"]

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


def _key_seed(seed: int, key: str) -> list[int]:
    """An independent, stable random stream per (seed, key): adding a key never shifts another key's values."""
    digest = hashlib.sha256(key.encode()).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def _truncated_normal(rng: np.random.Generator, shape, std: float, bound: float) -> np.ndarray:
    """θ ~ N(0, σ²) truncated to [−bound·σ, bound·σ] by redrawing the samples outside (SPEC §8)."""
    x = rng.standard_normal(shape)
    out = np.abs(x) > bound
    while out.any():
        x[out] = rng.standard_normal(int(out.sum()))
        out = np.abs(x) > bound
    return x * std


def init_params(config: Config, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Fresh parameters per SPEC §8 (Arcee's training init, not HF's).

    - every weight matrix (embedding, lm_head, q/k/v/gate, w1/w3 of experts, shared and dense MLP):
      TruncNormal(0, σ²) on [−3σ, 3σ] with σ = `config.base_std` (0.5/√d under muP);
    - output-side matrices (o_proj, every down_proj, router gate): σ, or σ/√(2(l+1)) when `depth_init`;
    - pre-norm, q_norm, k_norm and final-norm gains 1; post-norm gains 1/√L (§14 #9);
    - expert_bias 0, in float32 whatever `dtype` (EXPERT_BIAS_DTYPE, docs/decisions.md #18).
    Values depend only on (seed, key), and are drawn in float64 then cast, so float32 and float64 params agree.
    """
    dtype = np.dtype(dtype)
    params = {}
    std = config.base_std
    for key, shape in param_shapes(config).items():
        if is_expert_bias(key):
            params[key] = np.zeros(shape, dtype=EXPERT_BIAS_DTYPE)
        elif is_norm_gain(key):
            gain = config.post_norm_init if _is_post_norm(key) else 1.0
            params[key] = np.full(shape, gain, dtype=dtype)
        else:
            sigma = std
            if config.depth_init and _is_output_side(key):
                layer = int(key.split(".")[2])
                sigma = std / np.sqrt(2.0 * (layer + 1))
            rng = np.random.default_rng(_key_seed(seed, key))
            params[key] = _truncated_normal(rng, shape, sigma, config.init_truncation).astype(dtype)
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
