"""The AFMoE model composed from the operators: attention block, decoder layer, whole model (SPEC §4).

Every function here is a forward that returns (output, ctx): ctx holds each operator's own ctx, which is exactly
what the matching backward consumes. `keep_ctx=False` drops them as soon as a layer is done (inference, long
sequences). Shapes: B sequences of T tokens, hidden d.
"""

from __future__ import annotations

import numpy as np

from .attention import attention_forward, output_gate_forward
from .config import Config
from .embedding import embedding_forward
from .linear import linear_forward
from .mlp import swiglu_mlp_forward
from .moe import moe_forward
from .norms import rmsnorm_forward
from .params import check_params, layer_prefix
from .rope import rope_forward, rope_tables

__all__ = ["attention_block_forward", "decoder_layer_forward", "model_forward", "logits", "check_inputs"]


def attention_block_forward(config: Config, p: dict, prefix: str, a, layer: int, rope, doc_ids):
    """Gated GQA attention with QK-norm on the normed input a [B, T, d] (SPEC §4.4):

        Q, K, V, G = a W_qᵀ, a W_kᵀ, a W_vᵀ, a W_gᵀ         (heads split: [B, T, h, d_h])
        Q, K = RMSNorm_{d_h}(Q; γ_q), RMSNorm_{d_h}(K; γ_k)  (per token and head)
        Q, K = RoPE(Q), RoPE(K)                               (sliding layers only; global layers are NoPE)
        O = concat_i softmax(Q_i K_{⌊i/r⌋}ᵀ/√d_h + M) V_{⌊i/r⌋}
        out = (O ⊙ σ(G)) W_oᵀ
    """
    c = config
    B, T, _ = a.shape
    hq, hkv, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    ctx = {}
    q, ctx["q_proj"] = linear_forward(a, p[prefix + "q_proj.weight"])
    k, ctx["k_proj"] = linear_forward(a, p[prefix + "k_proj.weight"])
    v, ctx["v_proj"] = linear_forward(a, p[prefix + "v_proj.weight"])
    g, ctx["gate_proj"] = linear_forward(a, p[prefix + "gate_proj.weight"])
    q, ctx["q_norm"] = rmsnorm_forward(q.reshape(B, T, hq, dh), p[prefix + "q_norm.weight"], c.rms_norm_eps)
    k, ctx["k_norm"] = rmsnorm_forward(k.reshape(B, T, hkv, dh), p[prefix + "k_norm.weight"], c.rms_norm_eps)
    v = v.reshape(B, T, hkv, dh)
    window = c.window_of(layer)
    if window is not None:
        cos, sin = rope
        q, ctx["q_rope"] = rope_forward(q, cos, sin)
        k, ctx["k_rope"] = rope_forward(k, cos, sin)
    o, ctx["sdpa"] = attention_forward(q, k, v, window=window, doc_ids=doc_ids)
    o, ctx["gate"] = output_gate_forward(o.reshape(B, T, hq * dh), g)
    out, ctx["o_proj"] = linear_forward(o, p[prefix + "o_proj.weight"])
    return out, ctx


def decoder_layer_forward(config: Config, p: dict, layer: int, x, rope, doc_ids):
    """Depth-scaled sandwich norm around attention and the FFN (SPEC §4.2); the residual sits outside the post-norm:

        x ← x + RMSNorm(Attn(RMSNorm(x; γ_in)); γ_post_attn)
        x ← x + RMSNorm(F(RMSNorm(x; γ_pre_mlp)); γ_post_mlp),   F = dense SwiGLU if l < L_d, else MoE
    """
    c = config
    pre = layer_prefix(layer)
    B, T, d = x.shape
    ctx = {}
    a, ctx["input_layernorm"] = rmsnorm_forward(x, p[pre + "input_layernorm.weight"], c.rms_norm_eps)
    attn, ctx["self_attn"] = attention_block_forward(c, p, pre + "self_attn.", a, layer, rope, doc_ids)
    attn, ctx["post_attention_layernorm"] = rmsnorm_forward(attn, p[pre + "post_attention_layernorm.weight"],
                                                            c.post_eps)
    x = x + attn
    b, ctx["pre_mlp_layernorm"] = rmsnorm_forward(x, p[pre + "pre_mlp_layernorm.weight"], c.rms_norm_eps)
    m = pre + "mlp."
    if c.is_moe_layer(layer):
        f, ctx["mlp"] = moe_forward(b.reshape(B * T, d), p, m, c.num_experts_per_tok, c.route_scale)
    else:
        f, ctx["mlp"] = swiglu_mlp_forward(b.reshape(B * T, d), p[m + "gate_proj.weight"], p[m + "up_proj.weight"],
                                           p[m + "down_proj.weight"])
    f, ctx["post_mlp_layernorm"] = rmsnorm_forward(f.reshape(B, T, d), p[pre + "post_mlp_layernorm.weight"],
                                                   c.post_eps)
    return x + f, ctx


def model_forward(config: Config, params: dict, tokens, doc_ids=None, keep_ctx=True, check=True):
    """Tokens [B, T] → logits [B, T, V] (SPEC §4.1, §4.2, §4.10):

        x⁰ = m · E_emb[tok]          (m = √d under muP)
        x^l = DecoderLayer_l(x^{l−1})
        logits = RMSNorm(x^L; γ_final) W_lmᵀ   (W_lm = E_emb when tie_word_embeddings)

    Positions are 0…T−1 in every row (SPEC §14 #12). doc_ids [B, T], when given, adds the intra-document mask of
    SPEC §4.6 (see attention.document_ids to derive them from EOS tokens). Returns (logits, ctx) where ctx has
    "embed", "layers" (one ctx per layer, or None when keep_ctx is False), "norm" and "lm_head".
    """
    if check:
        tokens, doc_ids = check_inputs(config, params, tokens, doc_ids)
    c = config
    dtype = params["model.embed_tokens.weight"].dtype
    x, embed_ctx = embedding_forward(tokens, params["model.embed_tokens.weight"], c.embedding_multiplier)
    rope = rope_tables(np.arange(tokens.shape[1]), c.head_dim, c.rope_theta, dtype)
    layer_ctxs = []
    for layer in range(c.num_hidden_layers):
        x, layer_ctx = decoder_layer_forward(c, params, layer, x, rope, doc_ids)
        layer_ctxs.append(layer_ctx if keep_ctx else None)
    h, norm_ctx = rmsnorm_forward(x, params["model.norm.weight"], c.rms_norm_eps)
    head = params["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
    out, head_ctx = linear_forward(h, head)
    ctx = dict(embed=embed_ctx, rope=rope, layers=layer_ctxs, norm=norm_ctx, lm_head=head_ctx)
    return out, (ctx if keep_ctx else None)


def logits(config: Config, params: dict, tokens, doc_ids=None):
    """Public entry: logits [B, T, V] for int tokens [B, T] (a 1-D sequence is treated as B = 1 and returns
    [T, V]). Computed in the params' float dtype; nothing is kept for a backward."""
    tokens = np.asarray(tokens)
    squeeze = tokens.ndim == 1
    if squeeze:
        tokens = tokens[None]
        doc_ids = None if doc_ids is None else np.asarray(doc_ids)[None]
    out, _ = model_forward(config, params, tokens, doc_ids, keep_ctx=False)
    return out[0] if squeeze else out


def check_inputs(config: Config, params: dict, tokens, doc_ids):
    """Validate params against the config and tokens / doc_ids against each other; clear errors, no asserts."""
    check_params(config, params)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an integer array [B, T], got dtype {tokens.dtype} shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), found [{tokens.min()}, {tokens.max()}]")
    if doc_ids is not None:
        doc_ids = np.asarray(doc_ids)
        if doc_ids.shape != tokens.shape or doc_ids.dtype.kind not in "iu":
            raise ValueError(f"doc_ids must be an integer array shaped like tokens {tokens.shape}, "
                             f"got dtype {doc_ids.dtype} shape {doc_ids.shape}")
    return tokens, doc_ids
