"""The model's blocks, written once against an op table (ops.py): SwiGLU MLP, MoE, gated attention and the
decoder layer, each a forward returning (output, ctx) and a backward consuming that ctx (SPEC §4, §5).

ctx holds each operator's own ctx under the name of the operator's role ("q_proj", "sdpa", …), which is exactly
what the matching backward consumes. Shapes: B sequences of T tokens, hidden d, N = B·T tokens.
"""

from __future__ import annotations

from ..operators.array_module import array_namespace
from .config import Config
from .params import layer_prefix

__all__ = ["swiglu_mlp_forward", "swiglu_mlp_backward", "moe_forward", "moe_backward", "attention_block_forward",
           "attention_block_backward", "decoder_layer_forward", "decoder_layer_backward"]


# ---- SwiGLU MLP: the dense FFN of layers l < L_d and the shared expert (SPEC §4.7) -----------------------------
def swiglu_mlp_forward(ops, x, w_gate, w_up, w_down):
    """FFN(x) = W_down (silu(W_gate x) ⊙ W_up x)."""
    ctx = {}
    a, ctx["gate_proj"] = ops.linear_forward(x, w_gate)
    c, ctx["up_proj"] = ops.linear_forward(x, w_up)
    h, ctx["act"] = ops.swiglu_forward(a, c)
    y, ctx["down_proj"] = ops.linear_forward(h, w_down)
    return y, ctx


def swiglu_mlp_backward(ops, ctx, dy):
    """Returns dx and (dW_gate, dW_up, dW_down)."""
    dh, dw_down = ops.linear_backward(ctx["down_proj"], dy)
    da, dc = ops.swiglu_backward(ctx["act"], dh)
    dx_gate, dw_gate = ops.linear_backward(ctx["gate_proj"], da)
    dx_up, dw_up = ops.linear_backward(ctx["up_proj"], dc)
    return dx_gate + dx_up, (dw_gate, dw_up, dw_down)


def _swiglu_keys(prefix):
    return prefix + "gate_proj.weight", prefix + "up_proj.weight", prefix + "down_proj.weight"


# ---- MoE: router, routed experts, shared expert (SPEC §4.8, §4.9) ---------------------------------------------
def moe_forward(ops, x, p, prefix, top_k, route_scale):
    """y_MoE(x) = FFN_shared(x) + Σ_k g_k · FFN_{e_k}(x) for tokens x [N, d], the layer's params under `prefix`
    (…mlp.). The routed rows reach the experts through the table's dispatch seam and come back through its combine
    seam (seams.py: x[plan.token] in one process, all-to-alls under expert parallel, where `p` holds only this
    rank's experts). ctx: router, plan, exchange, experts, y_grouped, weights, shared — what the backward and the
    balancing statistics need."""
    ctx = {}
    w_router = p[prefix + "router.gate.weight"]
    weights, chosen, ctx["router"] = ops.router_forward(x, w_router, p[prefix + "expert_bias"], top_k, route_scale)
    plan = ops.dispatch(chosen, w_router.shape[0])
    x_rows, offsets, ctx["exchange"] = ops.expert_dispatch(x, plan)
    y_rows, ctx["experts"] = ops.experts_forward(x_rows, offsets, p[prefix + "experts.gate_proj"],
                                                 p[prefix + "experts.up_proj"], p[prefix + "experts.down_proj"])
    y_grouped = ops.expert_combine(ctx["exchange"], y_rows)
    y = ops.combine(y_grouped, weights, plan, x.shape[0])
    ctx.update(plan=plan, y_grouped=y_grouped, weights=weights, shared=None)
    if prefix + "shared_experts.gate_proj.weight" in p:
        with ops.scope("shared_experts"):
            y_shared, ctx["shared"] = swiglu_mlp_forward(ops, x, *(p[k] for k in _swiglu_keys(
                prefix + "shared_experts.")))
        y = y + y_shared
    return y, ctx


def moe_backward(ops, ctx, dy, p, prefix, dscores=None):
    """The input gradient sums the shared expert, the K routed experts and the router (SPEC §5). `dscores` [N, E]
    is the balance loss's gradient on the router scores (SPEC §6.3). Returns (dx, grads keyed like params)."""
    plan, weights = ctx["plan"], ctx["weights"]
    N, K = weights.shape
    grads = {}
    dy_grouped, dweights = ops.combine_backward(dy, ctx["y_grouped"], weights, plan)
    dy_rows = ops.expert_combine_backward(ctx["exchange"], dy_grouped)
    dx_rows, dw1, dw3, dw2 = ops.experts_backward(ctx["experts"], dy_rows, p[prefix + "experts.gate_proj"],
                                                  p[prefix + "experts.up_proj"], p[prefix + "experts.down_proj"])
    grads[prefix + "experts.gate_proj"], grads[prefix + "experts.up_proj"] = dw1, dw3
    grads[prefix + "experts.down_proj"] = dw2
    dx = ops.scatter_to_tokens(ops.expert_dispatch_backward(ctx["exchange"], dx_rows), plan, N, K)
    dx_router, grads[prefix + "router.gate.weight"] = ops.router_backward(ctx["router"], dweights, dscores)
    dx += dx_router
    bias = p[prefix + "expert_bias"]
    grads[prefix + "expert_bias"] = array_namespace(bias).zeros_like(bias)  # selection only: no gradient
    if ctx["shared"] is not None:
        dx_shared, shared_grads = swiglu_mlp_backward(ops, ctx["shared"], dy)
        grads.update(zip(_swiglu_keys(prefix + "shared_experts."), shared_grads))
        dx += dx_shared
    return dx, grads


# ---- gated GQA attention with QK-norm (SPEC §4.4) ---------------------------------------------------------------
def attention_block_forward(ops, config: Config, p: dict, prefix: str, a, layer: int, rope, positions, doc_ids,
                            kv_cache=None):
    """On the normed input a [B, T, d]:

        Q, K, V, G = a W_qᵀ, a W_kᵀ, a W_vᵀ, a W_gᵀ         (heads split: [B, T, h, d_h])
        Q, K = RMSNorm_{d_h}(Q; γ_q), RMSNorm_{d_h}(K; γ_k)  (per token and head)
        Q, K = RoPE(Q), RoPE(K)                               (sliding layers only; global layers are NoPE)
        O = concat_i softmax(Q_i K_{⌊i/r⌋}ᵀ/√d_h + M) V_{⌊i/r⌋}
        out = (O ⊙ σ(G)) W_oᵀ

    positions [T] are the tokens' positions in their sequences (increasing; `rope` holds their tables) and doc_ids
    [B, T] their document ids (or None). The queries attend to the keys the table's gather_kv seam returns
    (seams.py: their own keys in one process; under context parallel also other ranks' chunks or the halo).
    kv_cache (a kv_cache.LayerCache), when given, is the gather instead: an incremental step whose new keys and
    values (after QK-norm and RoPE) are stored in it, the queries attending to the cached keys plus the new ones.
    """
    c = config
    xp = array_namespace(a)
    B, T, _ = a.shape
    hq, hkv, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    ctx = {}
    q, ctx["q_proj"] = ops.linear_forward(a, p[prefix + "q_proj.weight"])
    k, ctx["k_proj"] = ops.linear_forward(a, p[prefix + "k_proj.weight"])
    v, ctx["v_proj"] = ops.linear_forward(a, p[prefix + "v_proj.weight"])
    g, ctx["gate_proj"] = ops.linear_forward(a, p[prefix + "gate_proj.weight"])
    q, ctx["q_norm"] = ops.rmsnorm_forward(xp.reshape(q, (B, T, hq, dh)), p[prefix + "q_norm.weight"], c.rms_norm_eps)
    k, ctx["k_norm"] = ops.rmsnorm_forward(xp.reshape(k, (B, T, hkv, dh)), p[prefix + "k_norm.weight"], c.rms_norm_eps)
    v = xp.reshape(v, (B, T, hkv, dh))
    window = c.window_of(layer)
    if window is not None:
        cos, sin = rope
        q, ctx["q_rope"] = ops.rope_forward(q, cos, sin)
        k, ctx["k_rope"] = ops.rope_forward(k, cos, sin)
    gather = ops if kv_cache is None else kv_cache
    k, v, k_pos, k_doc, ctx["kv"] = gather.gather_kv(k, v, positions, doc_ids, window)
    docs = doc_ids if k_doc is doc_ids else (doc_ids, k_doc)  # a pair when the keys are not the queries' own
    o, ctx["sdpa"] = ops.attention_forward(q, k, v, window=window, doc_ids=docs, q_pos=positions, k_pos=k_pos)
    o, ctx["gate"] = ops.output_gate_forward(xp.reshape(o, (B, T, hq * dh)), g)
    out, ctx["o_proj"] = ops.linear_forward(o, p[prefix + "o_proj.weight"])
    return out, ctx


def attention_block_backward(ops, config: Config, p: dict, prefix: str, ctx, dout):
    """The operators' backwards in reverse order. Returns (da, grads)."""
    c = config
    xp = array_namespace(dout)
    B, T, _ = dout.shape
    hq, hkv, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    grads = {}
    do, grads[prefix + "o_proj.weight"] = ops.linear_backward(ctx["o_proj"], dout)
    do, dg = ops.output_gate_backward(ctx["gate"], do)
    dq, dk, dv = ops.attention_backward(ctx["sdpa"], xp.reshape(do, (B, T, hq, dh)))
    dk, dv = ops.gather_kv_backward(ctx["kv"], dk, dv)
    if "q_rope" in ctx:
        dq, dk = ops.rope_backward(ctx["q_rope"], dq), ops.rope_backward(ctx["k_rope"], dk)
    dq, grads[prefix + "q_norm.weight"] = ops.rmsnorm_backward(ctx["q_norm"], dq)
    dk, grads[prefix + "k_norm.weight"] = ops.rmsnorm_backward(ctx["k_norm"], dk)
    da, grads[prefix + "q_proj.weight"] = ops.linear_backward(ctx["q_proj"], xp.reshape(dq, (B, T, hq * dh)))
    for name, dy in (("k_proj", xp.reshape(dk, (B, T, hkv * dh))), ("v_proj", xp.reshape(dv, (B, T, hkv * dh))),
                     ("gate_proj", dg)):
        dx, grads[prefix + name + ".weight"] = ops.linear_backward(ctx[name], dy)
        da += dx
    return da, grads


# ---- decoder layer: depth-scaled sandwich norm (SPEC §4.2) -----------------------------------------------------
def decoder_layer_forward(ops, config: Config, p: dict, layer: int, x, rope, positions, doc_ids, kv_cache=None):
    """The residual sits outside the post-norm:

        x ← x + RMSNorm(Attn(RMSNorm(x; γ_in)); γ_post_attn)
        x ← x + RMSNorm(F(RMSNorm(x; γ_pre_mlp)); γ_post_mlp),   F = dense SwiGLU if l < L_d, else MoE

    positions, doc_ids, kv_cache: see attention_block_forward.
    """
    c = config
    pre = layer_prefix(layer)
    xp = array_namespace(x)
    B, T, d = x.shape
    ctx = {}
    with ops.scope(pre[:-1]):
        a, ctx["input_layernorm"] = ops.rmsnorm_forward(x, p[pre + "input_layernorm.weight"], c.rms_norm_eps)
        with ops.scope("self_attn"):
            attn, ctx["self_attn"] = attention_block_forward(ops, c, p, pre + "self_attn.", a, layer, rope,
                                                             positions, doc_ids, kv_cache)
        attn, ctx["post_attention_layernorm"] = ops.rmsnorm_forward(
            attn, p[pre + "post_attention_layernorm.weight"], c.post_eps)
        x = x + attn
        b, ctx["pre_mlp_layernorm"] = ops.rmsnorm_forward(x, p[pre + "pre_mlp_layernorm.weight"], c.rms_norm_eps)
        m = pre + "mlp."
        with ops.scope("mlp"):
            if c.is_moe_layer(layer):
                f, ctx["mlp"] = moe_forward(ops, xp.reshape(b, (B * T, d)), p, m, c.num_experts_per_tok, c.route_scale)
            else:
                f, ctx["mlp"] = swiglu_mlp_forward(ops, xp.reshape(b, (B * T, d)), *(p[k] for k in _swiglu_keys(m)))
        f, ctx["post_mlp_layernorm"] = ops.rmsnorm_forward(xp.reshape(f, (B, T, d)),
                                                           p[pre + "post_mlp_layernorm.weight"], c.post_eps)
    return x + f, ctx


def decoder_layer_backward(ops, config: Config, p: dict, layer: int, ctx, dx, dscores=None):
    """The residual passes dx straight through both branches. dscores: the balance loss's gradient on this layer's
    router scores [N, E] (MoE layers only)."""
    c = config
    pre = layer_prefix(layer)
    xp = array_namespace(dx)
    B, T, d = dx.shape
    grads = {}
    with ops.scope(pre[:-1]):
        df, grads[pre + "post_mlp_layernorm.weight"] = ops.rmsnorm_backward(ctx["post_mlp_layernorm"], dx)
        m = pre + "mlp."
        with ops.scope("mlp"):
            if c.is_moe_layer(layer):
                db, mlp_grads = moe_backward(ops, ctx["mlp"], xp.reshape(df, (B * T, d)), p, m, dscores)
                grads.update(mlp_grads)
            else:
                db, mlp_grads = swiglu_mlp_backward(ops, ctx["mlp"], xp.reshape(df, (B * T, d)))
                grads.update(zip(_swiglu_keys(m), mlp_grads))
        dres, grads[pre + "pre_mlp_layernorm.weight"] = ops.rmsnorm_backward(ctx["pre_mlp_layernorm"],
                                                                             xp.reshape(db, (B, T, d)))
        dx = dx + dres
        dattn, grads[pre + "post_attention_layernorm.weight"] = ops.rmsnorm_backward(
            ctx["post_attention_layernorm"], dx)
        with ops.scope("self_attn"):
            da, attn_grads = attention_block_backward(ops, c, p, pre + "self_attn.", ctx["self_attn"], dattn)
        grads.update(attn_grads)
        dres, grads[pre + "input_layernorm.weight"] = ops.rmsnorm_backward(ctx["input_layernorm"], da)
    return dx + dres, grads
