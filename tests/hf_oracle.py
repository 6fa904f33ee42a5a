"""The Hugging Face oracle: transformers' `AfmoeForCausalLM` built from our params, with its float32 islands lifted.

Cast to float64, HF's AFMoE is not float64 end to end (SPEC §3.4): its RMSNorm computes in float32
(`hidden_states.to(torch.float32)`), RoPE frequencies come from a float32 `arange` and `.float()` positions, router
logits are cast `.to(torch.float32)`, and the eager attention softmax runs with `dtype=torch.float32`. Unlifted, a
float64 HF model differs from a true float64 computation by ~1e-6 relative, which would hide any real bug below that.

`lifted()` is a context manager that monkeypatches exactly those four places (class attributes and one module
global of `transformers.models.afmoe.modeling_afmoe`, restored on exit; site-packages is never modified) so that each
computes in `promote_types(input dtype, float32)`: float64 inputs stay float64, float32 and lower behave as upstream.
Everything else runs unchanged. Together with eager attention and eager experts (`experts_implementation="eager"`;
the grouped_mm experts refuse float64), HF becomes a float64 oracle.

expert_bias is float32 in our params whatever the model's dtype (docs/decisions.md #18). transformers ≥ 5.24 keeps it
float32 too (`_keep_in_fp32_modules_strict = ["expert_bias"]`); 5.23 holds it in float64 in a float64 model. Either
way it holds our float32 values exactly, and the lifted router adds it to float64 scores in float64 (torch promotes).
`hf_bias_dtype(model, dtype)` says which dtype the installed transformers uses.

Works with transformers 5.23 and 5.24 (5.24 renamed the `past_key_values` argument of the attention, decoder layer and
model forwards to `cache`; nothing here passes or patches it: the oracle runs without a KV cache).

Importing this module needs torch and transformers; tests import it after `pytest.importorskip`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from transformers import AfmoeConfig, AfmoeForCausalLM
from transformers.models.afmoe import modeling_afmoe as M

from trinity.reference.model.config import Config

__all__ = ["lifted", "hf_config", "load_hf", "hf_model_from_params", "to_hf_v5_state_dict", "hf_logits",
           "hf_router_logits", "topk_gaps", "f32_bias", "hf_bias_dtype"]


def f32_bias(params: dict) -> dict:
    """`params` with every expert_bias cast to float32, the dtype it has in our params in every model dtype
    (docs/decisions.md #18: what init_params and load_pretrained give). Other arrays are the same objects."""
    return {k: (np.asarray(v, dtype=np.float32) if k.endswith("mlp.expert_bias") else v) for k, v in params.items()}


def hf_bias_dtype(model, dtype: torch.dtype) -> torch.dtype:
    """The dtype transformers holds `mlp.expert_bias` in for a model loaded in `dtype`: float32 where the class keeps
    it strictly in float32 (transformers ≥ 5.24), else `dtype` for float32/float64 (5.23 keeps it float32 only for
    float16/bfloat16 models)."""
    if "expert_bias" in (getattr(model, "_keep_in_fp32_modules_strict", None) or []):
        return torch.float32
    return dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a lifted float32 island computes in: float64 stays float64; lower precisions use float32."""
    return torch.promote_types(dtype, torch.float32)


# ---- the four lifted islands (each mirrors the upstream code line for line, with the dtype lifted) ----------------
def _rmsnorm_forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(_compute_dtype(input_dtype))  # upstream: .to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight * hidden_states).to(input_dtype)


def _default_rope_parameters(config, device=None, seq_len=None, **kwargs):
    base = config.rope_parameters["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # upstream: torch.arange(0, dim, 2, dtype=torch.float)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    return inv_freq, 1.0


@torch.no_grad()
def _rope_forward(self, x, position_ids):
    dtype = _compute_dtype(x.dtype)  # upstream: position_ids.float(), inv_freq.to(torch.float)
    freqs = position_ids[..., None].to(dtype) * self.inv_freq.to(device=x.device, dtype=dtype)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * self.attention_scaling
    sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _router_forward(self, hidden_states, expert_bias):
    _, _, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    router_logits = router_logits.to(_compute_dtype(router_logits.dtype))  # upstream: .to(torch.float32)
    scores = torch.sigmoid(router_logits)
    _, selected_experts = torch.topk(scores + expert_bias, k=self.top_k, dim=1)
    top_scores = scores.gather(dim=1, index=selected_experts)
    denominator = top_scores.sum(dim=-1, keepdim=True) + 1e-20
    top_scores = top_scores / denominator
    top_scores = top_scores * self.route_scale
    return router_logits, top_scores, selected_experts


def _eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = M.repeat_kv(key, module.num_key_value_groups)
    value_states = M.repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # upstream: softmax(..., dtype=torch.float32)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=_compute_dtype(query.dtype)).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


_PATCHES = [
    (M.AfmoeRMSNorm, "forward", _rmsnorm_forward),
    (M.AfmoeRotaryEmbedding, "compute_default_rope_parameters", staticmethod(_default_rope_parameters)),
    (M.AfmoeRotaryEmbedding, "forward", _rope_forward),
    (M.AfmoeTokenChoiceRouter, "forward", _router_forward),
    (M, "eager_attention_forward", _eager_attention_forward),
]


@contextlib.contextmanager
def lifted():
    """Lift HF AFMoE's float32 islands to the input dtype (float64 stays float64) for the duration of the block.

    Patches class attributes / a module global and restores the originals on exit (also on error); nesting is safe.
    Build the model (RoPE inv_freq is computed at construction) and run its forward inside the block."""
    saved = [(obj, name, obj.__dict__[name]) for obj, name, _ in _PATCHES]
    try:
        for obj, name, new in _PATCHES:
            setattr(obj, name, new)
        yield
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def _maybe_lifted(flag: bool):
    return lifted() if flag else contextlib.nullcontext()


# ---- building HF models --------------------------------------------------------------------------------------------
def hf_config(config: Config, **overrides) -> AfmoeConfig:
    """An AfmoeConfig with the same HF fields as our Config."""
    d = config.to_hf()
    d.pop("model_type", None)
    d.pop("architectures", None)
    d.update(overrides)
    return AfmoeConfig(**d)


def _finish(model, lift: bool):
    model.eval()
    if lift:  # inv_freq must hold float64 values (the patched constructor computed them; recompute to be sure)
        rope = model.model.rotary_emb
        inv_freq, _ = _default_rope_parameters(model.config)
        rope.inv_freq = inv_freq.to(rope.inv_freq.device)
        rope.original_inv_freq = inv_freq.clone()
    return model


def load_hf(path, dtype=torch.float64, lift: bool = True, attn: str | None = "eager",
            experts: str | None = "eager") -> AfmoeForCausalLM:
    """`AfmoeForCausalLM.from_pretrained(path)` in `dtype`, lifted or not; attn/experts=None keep HF's defaults.
    Fails if loading reports any missing, unexpected or mismatched key."""
    kwargs = {"dtype": dtype}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if experts is not None:
        kwargs["experts_implementation"] = experts
    with _maybe_lifted(lift):
        model, info = AfmoeForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise AssertionError(f"from_pretrained({path}) reported {bad}")
    return _finish(model, lift)


def to_hf_v5_state_dict(config: Config, params: dict) -> dict[str, torch.Tensor]:
    """Our params -> the transformers v5 in-memory state dict (SPEC §3.2): experts.gate_up_proj [E, 2I, d] = gate
    rows then up rows; tied models also list lm_head.weight (= the embedding)."""
    sd = {}
    for key, value in params.items():
        if key.endswith("mlp.experts.up_proj"):
            continue
        if key.endswith("mlp.experts.gate_proj"):
            up = params[key[: -len("gate_proj")] + "up_proj"]
            sd[key[: -len("gate_proj")] + "gate_up_proj"] = torch.from_numpy(np.concatenate([value, up], axis=1))
        else:
            sd[key] = torch.from_numpy(np.ascontiguousarray(value))
    if config.num_shared_experts == 0:
        for l in range(config.num_dense_layers, config.num_hidden_layers):
            s = f"model.layers.{l}.mlp.shared_experts."
            dt = sd["model.embed_tokens.weight"].dtype
            sd[s + "gate_proj.weight"] = torch.zeros((0, config.hidden_size), dtype=dt)
            sd[s + "up_proj.weight"] = torch.zeros((0, config.hidden_size), dtype=dt)
            sd[s + "down_proj.weight"] = torch.zeros((config.hidden_size, 0), dtype=dt)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def hf_model_from_params(config: Config, params: dict, dtype=torch.float64, lift: bool = True,
                         attn: str | None = "eager", experts: str | None = "eager") -> AfmoeForCausalLM:
    """Build an HF model in memory (no files) and load our params into it with strict=True. load_state_dict copies
    expert_bias into the dtype HF holds it in (`hf_bias_dtype`): exact for our float32 bias in a float32 or float64
    model."""
    cfg = hf_config(config)
    kwargs = {"dtype": dtype}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if experts is not None:
        kwargs["experts_implementation"] = experts
    with _maybe_lifted(lift):
        model = AfmoeForCausalLM._from_config(cfg, **kwargs)
    sd = {k: v.to(dtype) for k, v in to_hf_v5_state_dict(config, params).items()}
    model.load_state_dict(sd, strict=True)
    return _finish(model, lift)


# ---- running HF models ---------------------------------------------------------------------------------------------
def hf_logits(model, tokens, lift: bool = True) -> np.ndarray:
    """Logits [B, T, V] as a numpy array in the model's dtype (no KV cache)."""
    with torch.no_grad(), _maybe_lifted(lift):
        out = model(input_ids=torch.as_tensor(np.asarray(tokens, dtype=np.int64)), use_cache=False)
    return out.logits.numpy()


def hf_router_logits(model, tokens, lift: bool = True) -> list[np.ndarray]:
    """The router logits z [B·T, E] of every MoE layer (HF's `output_router_logits=True`)."""
    with torch.no_grad(), _maybe_lifted(lift):
        out = model(input_ids=torch.as_tensor(np.asarray(tokens, dtype=np.int64)), use_cache=False,
                    output_router_logits=True)
    return [z.numpy() for z in out.router_logits]


def topk_gaps(scores: np.ndarray, expert_bias: np.ndarray, k: int) -> np.ndarray:
    """Per token, the gap between the K-th and (K+1)-th largest of s + b (inf when K = E): how far selection is
    from a tie. Float rounding can flip top-k only where this gap is tiny."""
    biased = np.sort(scores + expert_bias, axis=-1)[..., ::-1]
    if k >= biased.shape[-1]:
        return np.full(biased.shape[:-1], np.inf)
    return biased[..., k - 1] - biased[..., k]
