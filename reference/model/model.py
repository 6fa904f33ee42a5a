"""The whole AFMoE model: embedding, the decoder layers, final norm and head, forward and backward (SPEC §4, §5).

Written once against an op table (ops.py; `ops=None` means the NumPy reference), so every backend runs this same
code. The forward returns (logits, ctx); ctx holds what the backward consumes. `keep_ctx=False` keeps nothing
(inference, long sequences); `recompute=True` keeps only each layer's input and runs the layer again in the backward.
"""

from __future__ import annotations

import math

from ..operators.array_module import array_namespace
from .config import Config
from .layers import decoder_layer_backward, decoder_layer_forward
from .ops import REFERENCE
from .params import check_params

__all__ = ["model_forward", "model_backward", "logits", "check_inputs"]


def model_forward(config: Config, params: dict, tokens, doc_ids=None, keep_ctx=True, recompute=False, check=True,
                  embeds=None, ops=None, kv_cache=None, positions=None):
    """Tokens [B, T] → logits [B, T, V] (SPEC §4.1, §4.2, §4.10):

        x⁰ = m · E_emb[tok]          (m = √d under muP)
        x^l = DecoderLayer_l(x^{l−1})
        logits = RMSNorm(x^L; γ_final) W_lmᵀ   (W_lm = E_emb when tie_word_embeddings)

    positions [T] are the tokens' positions in their sequences, the same in every row (default 0…T−1, SPEC §14 #12;
    a context-parallel rank holds two chunks of each sequence and passes their positions). doc_ids [B, T], when
    given, adds the intra-document mask of SPEC §4.6 (see data.packing.document_ids to derive them from EOS tokens).
    Returns (logits, ctx) where ctx has "embed", "layers" (one ctx per layer), "routing" (per layer: the router's
    scores and chosen experts, or None for dense layers), "norm" and "lm_head"; ctx is None when keep_ctx is False.
    With recompute, "layers" holds only each layer's input, and model_backward runs that layer's forward again
    (activation recompute). embeds [B, T, d], when given, replaces the table lookup E_emb[tok] (HF `inputs_embeds`;
    the muP multiplier still applies); tokens then only give the shape.

    Parameters are read bucket by bucket through the op table's gather_params seam (seams.py; under FSDP `params`
    holds this rank's shards and each layer is gathered just before use). `check=False` skips check_inputs (the
    training step checks once).

    kv_cache (a kv_cache.KVCache), when given, makes this an incremental forward: the T tokens take the absolute
    positions cache.length … cache.length+T−1 (RoPE at those positions), attend to every earlier token through the
    cached keys and values, and are added to the cache. Prefill a prompt with one call, then feed one token at a
    time. doc_ids are not allowed with a cache, and the ctx it returns serves inspection only: model_backward
    refuses it.
    """
    if check:
        tokens, doc_ids = check_inputs(config, params, tokens, doc_ids)
    ops = ops or REFERENCE
    c = config
    xp = array_namespace(tokens)
    T = tokens.shape[1]
    if kv_cache is not None:
        if doc_ids is not None:
            raise ValueError("model_forward: doc_ids cannot be combined with kv_cache")
        if len(kv_cache.layers) != c.num_hidden_layers:
            raise ValueError(f"kv_cache has {len(kv_cache.layers)} layers, the model {c.num_hidden_layers}")
        positions = kv_cache.length + xp.arange(T)
    elif positions is None:
        positions = xp.arange(T)
    elif xp.asarray(positions).shape[0] != T:
        raise ValueError(f"positions has {xp.asarray(positions).shape[0]} entries for {T} tokens per row")
    emb = ops.gather_params(params, "embed")["model.embed_tokens.weight"]
    dtype = emb.dtype
    if embeds is None:
        x, embed_ctx = ops.embedding_forward(tokens, emb, c.embedding_multiplier)
    else:
        m = array_namespace(embeds).asarray(float(c.embedding_multiplier), dtype=dtype)  # m rounded to E_emb's dtype
        x, embed_ctx = embeds * m, None
    ops.release_params("embed")
    rope = ops.rope_tables(positions, c.head_dim, c.rope_theta, dtype)
    layer_ctxs, routing = [], []
    for layer in range(c.num_hidden_layers):
        x_in = x
        layer_cache = None if kv_cache is None else kv_cache.layers[layer]
        x, layer_ctx = decoder_layer_forward(ops, c, ops.gather_params(params, layer), layer, x, rope, positions,
                                             doc_ids, layer_cache)
        ops.release_params(layer)
        if keep_ctx:
            layer_ctxs.append(x_in if recompute else layer_ctx)
            routing.append(_routing(layer_ctx))
    head_params = ops.gather_params(params, "head")
    with ops.scope("model"):
        h, norm_ctx = ops.rmsnorm_forward(x, head_params["model.norm.weight"], c.rms_norm_eps)
    head = (ops.gather_params(params, "embed")["model.embed_tokens.weight"] if c.tie_word_embeddings
            else head_params["lm_head.weight"])
    out, head_ctx = ops.linear_forward(h, head)
    ops.release_params("head")
    if c.tie_word_embeddings:
        ops.release_params("embed")
    ctx = dict(embed=embed_ctx, rope=rope, positions=positions, doc_ids=doc_ids, layers=layer_ctxs, routing=routing,
               norm=norm_ctx, lm_head=head_ctx, recompute=recompute, ops=ops)
    if kv_cache is not None:
        ctx["kv_cache"] = kv_cache
    return out, (ctx if keep_ctx else None)


def _routing(layer_ctx):
    """(scores s [N, E], chosen experts [N, K], tokens per expert [E]) of a MoE layer; None for a dense layer."""
    mlp = layer_ctx["mlp"]
    if "router" not in mlp:
        return None
    return mlp["router"].scores, mlp["router"].experts, mlp["plan"].counts


def logits(config: Config, params: dict, tokens, doc_ids=None, ops=None, kv_cache=None):
    """Public entry: logits [B, T, V] for int tokens [B, T] (a 1-D sequence is treated as B = 1 and returns
    [T, V]). Computed in the params' float dtype; nothing is kept for a backward. With kv_cache (kv_cache.KVCache)
    the tokens continue the cached sequence (see model_forward)."""
    xp = array_namespace(tokens)
    tokens = xp.asarray(tokens)
    squeeze = tokens.ndim == 1
    if squeeze:
        tokens = tokens[None, :]
        doc_ids = None if doc_ids is None else xp.asarray(doc_ids)[None, :]
    out, _ = model_forward(config, params, tokens, doc_ids, keep_ctx=False, ops=ops, kv_cache=kv_cache)
    return out[0] if squeeze else out


def check_inputs(config: Config, params: dict, tokens, doc_ids):
    """Validate params against the config and tokens / doc_ids against each other; clear errors, no asserts."""
    check_params(config, params)
    xp = array_namespace(tokens)
    tokens = xp.asarray(tokens)
    if tokens.ndim != 2 or not xp.isdtype(tokens.dtype, "integral"):
        raise ValueError(f"tokens must be an integer array [B, T], got dtype {tokens.dtype} shape {tokens.shape}")
    if math.prod(tokens.shape) and (int(xp.min(tokens)) < 0 or int(xp.max(tokens)) >= config.vocab_size):
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), "
                         f"found [{int(xp.min(tokens))}, {int(xp.max(tokens))}]")
    if doc_ids is not None:
        doc_ids = array_namespace(doc_ids, tokens).asarray(doc_ids)
        if doc_ids.shape != tokens.shape or not xp.isdtype(doc_ids.dtype, "integral"):
            raise ValueError(f"doc_ids must be an integer array shaped like tokens {tokens.shape}, "
                             f"got dtype {doc_ids.dtype} shape {doc_ids.shape}")
    return tokens, doc_ids


def model_backward(config: Config, params: dict, ctx, dlogits, dscores=None, into: dict | None = None):
    """Gradients of every parameter from dlogits [B, T, V] (and, per MoE layer, the balance loss's gradient on the
    router scores, `dscores[layer]` [N, E]). Returns (grads with exactly the keys of params, dx⁰): dx⁰ is the
    gradient w.r.t. the embedding output x⁰ = m·E_emb[tok] (or m·embeds). Layers kept by recompute run their
    forward again here, one at a time. Each bucket is gathered again for its backward (the head first, the layers in
    reverse), and its gradients pass through the op table's hand_back_grads seam as soon as they are complete (head
    first, embedding last). `into`: earlier sums of what the seam returns, which each bucket's gradients are added
    into in place (a step's micro-batches: one set of gradients at a time, not two)."""
    if ctx.get("kv_cache") is not None:
        raise ValueError("model_backward: a forward run with kv_cache has no backward (use a full forward)")
    c, ops = config, ctx["ops"]
    grads = {}
    ops.gather_params(params, "head")
    if c.tie_word_embeddings:
        ops.gather_params(params, "embed")
    dh, dhead = ops.linear_backward(ctx["lm_head"], dlogits)
    with ops.scope("model"):
        dx, dnorm = ops.rmsnorm_backward(ctx["norm"], dh)
    ops.release_params("head")
    if c.tie_word_embeddings:
        ops.release_params("embed")
    head_grads = {"model.norm.weight": dnorm}
    if not c.tie_word_embeddings:
        head_grads["lm_head.weight"] = dhead
    grads.update(ops.hand_back_grads("head", head_grads, into))
    del head_grads  # under FSDP the seam kept a shard: the whole head gradient goes now, not after the layers
    if not c.tie_word_embeddings:
        dhead = None
    for layer in reversed(range(c.num_hidden_layers)):
        layer_ctx = ctx["layers"][layer]
        p = ops.gather_params(params, layer)
        if ctx["recompute"]:
            _, layer_ctx = decoder_layer_forward(ops, c, p, layer, layer_ctx, ctx["rope"], ctx["positions"],
                                                 ctx["doc_ids"])
        ds = None if dscores is None else dscores[layer]
        dx, layer_grads = decoder_layer_backward(ops, c, p, layer, layer_ctx, dx, ds)
        ops.release_params(layer)
        grads.update(ops.hand_back_grads(layer, layer_grads, into))
    if ctx["embed"] is None:  # the forward took embeds: the table gets no gradient
        emb = ops.gather_params(params, "embed")["model.embed_tokens.weight"]
        dembed = array_namespace(emb).zeros_like(emb)
        ops.release_params("embed")
    else:
        dembed = ops.embedding_backward(ctx["embed"], dx)
    if c.tie_word_embeddings:
        dembed = dembed + dhead
    grads.update(ops.hand_back_grads("embed", {"model.embed_tokens.weight": dembed}, into))
    return {k: grads[k] for k in params}, dx
