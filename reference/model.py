"""The AFMoE model composed from the operators: attention block, decoder layer, whole model (SPEC §4).

Every function here is a forward that returns (output, ctx): ctx holds each operator's own ctx, which is exactly
what the matching backward consumes. `keep_ctx=False` drops them as soon as a layer is done (inference, long
sequences). Shapes: B sequences of T tokens, hidden d.
"""

from __future__ import annotations

import numpy as np

from .attention import attention_backward, attention_forward, output_gate_backward, output_gate_forward
from .config import Config
from .embedding import embedding_backward, embedding_forward
from .linear import linear_backward, linear_forward
from .mlp import swiglu_mlp_backward, swiglu_mlp_forward
from .moe import moe_backward, moe_forward
from .norms import rmsnorm_backward, rmsnorm_forward
from .params import check_params, layer_prefix
from .rope import rope_backward, rope_forward, rope_tables

__all__ = ["attention_block_forward", "attention_block_backward", "decoder_layer_forward", "decoder_layer_backward",
           "model_forward", "model_backward", "logits", "check_inputs"]


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


def model_forward(config: Config, params: dict, tokens, doc_ids=None, keep_ctx=True, recompute=False, check=True,
                  embeds=None):
    """Tokens [B, T] → logits [B, T, V] (SPEC §4.1, §4.2, §4.10):

        x⁰ = m · E_emb[tok]          (m = √d under muP)
        x^l = DecoderLayer_l(x^{l−1})
        logits = RMSNorm(x^L; γ_final) W_lmᵀ   (W_lm = E_emb when tie_word_embeddings)

    Positions are 0…T−1 in every row (SPEC §14 #12). doc_ids [B, T], when given, adds the intra-document mask of
    SPEC §4.6 (see attention.document_ids to derive them from EOS tokens). Returns (logits, ctx) where ctx has
    "embed", "layers" (one ctx per layer), "routing" (per layer: the router's scores and chosen experts, or None
    for dense layers), "norm" and "lm_head"; ctx is None when keep_ctx is False. With recompute, "layers" holds
    only each layer's input, and model_backward runs that layer's forward again (activation recompute).
    embeds [B, T, d], when given, replaces the table lookup E_emb[tok] (HF `inputs_embeds`; the muP multiplier
    still applies); tokens then only give the shape.
    """
    if check:
        tokens, doc_ids = check_inputs(config, params, tokens, doc_ids)
    c = config
    dtype = params["model.embed_tokens.weight"].dtype
    if embeds is None:
        x, embed_ctx = embedding_forward(tokens, params["model.embed_tokens.weight"], c.embedding_multiplier)
    else:
        x, embed_ctx = embeds * np.asarray(c.embedding_multiplier, dtype=dtype), None
    rope = rope_tables(np.arange(tokens.shape[1]), c.head_dim, c.rope_theta, dtype)
    layer_ctxs, routing = [], []
    for layer in range(c.num_hidden_layers):
        x_in = x
        x, layer_ctx = decoder_layer_forward(c, params, layer, x, rope, doc_ids)
        if keep_ctx:
            layer_ctxs.append(x_in if recompute else layer_ctx)
            routing.append(_routing(layer_ctx))
    h, norm_ctx = rmsnorm_forward(x, params["model.norm.weight"], c.rms_norm_eps)
    head = params["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
    out, head_ctx = linear_forward(h, head)
    ctx = dict(embed=embed_ctx, rope=rope, doc_ids=doc_ids, layers=layer_ctxs, routing=routing, norm=norm_ctx,
               lm_head=head_ctx, recompute=recompute)
    return out, (ctx if keep_ctx else None)


def _routing(layer_ctx):
    """(scores s [N, E], chosen experts [N, K], tokens per expert [E]) of a MoE layer; None for a dense layer."""
    mlp = layer_ctx["mlp"]
    if not isinstance(mlp, dict):
        return None
    router = mlp["router"]
    return router[2], router[3], mlp["plan"].counts


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


# ---- backward ---------------------------------------------------------------------------------------------------

def attention_block_backward(config: Config, p: dict, prefix: str, ctx, dout):
    """Backward of attention_block_forward: the operators' backwards in reverse order. Returns (da, grads)."""
    c = config
    B, T, _ = dout.shape
    hq, hkv, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    grads = {}
    do, grads[prefix + "o_proj.weight"] = linear_backward(ctx["o_proj"], dout)
    do, dg = output_gate_backward(ctx["gate"], do)
    dq, dk, dv = attention_backward(ctx["sdpa"], do.reshape(B, T, hq, dh))
    if "q_rope" in ctx:
        dq, dk = rope_backward(ctx["q_rope"], dq), rope_backward(ctx["k_rope"], dk)
    dq, grads[prefix + "q_norm.weight"] = rmsnorm_backward(ctx["q_norm"], dq)
    dk, grads[prefix + "k_norm.weight"] = rmsnorm_backward(ctx["k_norm"], dk)
    da, grads[prefix + "q_proj.weight"] = linear_backward(ctx["q_proj"], dq.reshape(B, T, hq * dh))
    for name, dy in (("k_proj", dk.reshape(B, T, hkv * dh)), ("v_proj", dv.reshape(B, T, hkv * dh)),
                     ("gate_proj", dg)):
        dx, grads[prefix + name + ".weight"] = linear_backward(ctx[name], dy)
        da += dx
    return da, grads


def decoder_layer_backward(config: Config, p: dict, layer: int, ctx, dx, dscores=None):
    """Backward of decoder_layer_forward; the residual passes dx straight through both branches.
    dscores: the balance loss's gradient on this layer's router scores [N, E] (MoE layers only)."""
    c = config
    pre = layer_prefix(layer)
    B, T, d = dx.shape
    grads = {}
    df, grads[pre + "post_mlp_layernorm.weight"] = rmsnorm_backward(ctx["post_mlp_layernorm"], dx)
    m = pre + "mlp."
    if c.is_moe_layer(layer):
        db, mlp_grads = moe_backward(ctx["mlp"], df.reshape(B * T, d), p, m, dscores)
        grads.update(mlp_grads)
    else:
        db, (dwg, dwu, dwd) = swiglu_mlp_backward(ctx["mlp"], df.reshape(B * T, d))
        grads[m + "gate_proj.weight"], grads[m + "up_proj.weight"], grads[m + "down_proj.weight"] = dwg, dwu, dwd
    dres, grads[pre + "pre_mlp_layernorm.weight"] = rmsnorm_backward(ctx["pre_mlp_layernorm"], db.reshape(B, T, d))
    dx = dx + dres
    dattn, grads[pre + "post_attention_layernorm.weight"] = rmsnorm_backward(ctx["post_attention_layernorm"], dx)
    da, attn_grads = attention_block_backward(c, p, pre + "self_attn.", ctx["self_attn"], dattn)
    grads.update(attn_grads)
    dres, grads[pre + "input_layernorm.weight"] = rmsnorm_backward(ctx["input_layernorm"], da)
    return dx + dres, grads


def model_backward(config: Config, params: dict, ctx, dlogits, dscores=None):
    """Gradients of every parameter from dlogits [B, T, V] (and, per MoE layer, the balance loss's gradient on the
    router scores, `dscores[layer]` [N, E]). Returns (grads with exactly the keys of params, dx⁰): dx⁰ is the
    gradient w.r.t. the embedding output x⁰ = m·E_emb[tok] (or m·embeds). Layers kept by recompute run their
    forward again here, one at a time."""
    c = config
    grads = {}
    dh, dhead = linear_backward(ctx["lm_head"], dlogits)
    dx, grads["model.norm.weight"] = rmsnorm_backward(ctx["norm"], dh)
    for layer in reversed(range(c.num_hidden_layers)):
        layer_ctx = ctx["layers"][layer]
        if ctx["recompute"]:
            _, layer_ctx = decoder_layer_forward(c, params, layer, layer_ctx, ctx["rope"], ctx["doc_ids"])
        ds = None if dscores is None else dscores[layer]
        dx, layer_grads = decoder_layer_backward(c, params, layer, layer_ctx, dx, ds)
        grads.update(layer_grads)
    if ctx["embed"] is None:  # the forward took embeds: the table gets no gradient
        dembed = np.zeros_like(params["model.embed_tokens.weight"])
    else:
        dembed = embedding_backward(ctx["embed"], dx)
    if c.tie_word_embeddings:
        grads["model.embed_tokens.weight"] = dembed + dhead
    else:
        grads["model.embed_tokens.weight"], grads["lm_head.weight"] = dembed, dhead
    return {k: grads[k] for k in params}, dx
