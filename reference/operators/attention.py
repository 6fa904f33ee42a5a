"""Scaled dot-product attention with GQA, causal / sliding-window / intra-document masks (SPEC §4.4-§4.6).

The attention core never builds a T×T matrix. Queries are processed in blocks; a block of queries at positions
[p₀, p₁] only looks at the keys whose positions can be allowed, [p₀ − w + 1, p₁] for a window w, so a sliding
layer costs O(T·w) time and memory. Global layers are causal and cost O(T²) time, but their memory stays
O(block·T). Per query we keep lse = log Σ_s exp(S[t,s]), the softmax normaliser, so that the backward can recompute
each block's probabilities P = exp(S − lse) instead of storing them (the flash-attention recipe).
"""

from __future__ import annotations

import math

from .activations import sigmoid
from .array_module import array_namespace

__all__ = ["allowed", "attention_forward", "attention_backward", "query_blocks", "largest_query_block",
           "positions_and_docs",
           "output_gate_forward", "output_gate_backward"]

# Scores held per block: B · h_q · block · keys elements. 2^22 float64 values is 32 MiB.
_BLOCK_ELEMENTS = 1 << 22


def allowed(q_pos, k_pos, window=None, q_doc=None, k_doc=None):
    """The attention mask as booleans [..., Tq, Tk] (SPEC §4.6).

    allowed(t, s) ⇔ s ≤ t  ∧  (window is None ∨ t − s < w)  ∧  (no doc ids ∨ doc(t) = doc(s)),
    where t, s are positions. With a window w each query sees exactly w keys including itself: s ∈ [t−w+1, t].
    q_doc / k_doc, when given, are [..., Tq] / [..., Tk] document ids; the result then has their leading axes.
    """
    xp = array_namespace(q_pos, k_pos)
    t = xp.asarray(q_pos)[:, None]
    s = xp.asarray(k_pos)[None, :]
    ok = s <= t
    if window is not None:
        ok = ok & (t - s < window)
    if q_doc is not None:
        ok = ok & (q_doc[..., :, None] == k_doc[..., None, :])
    return ok


def _by_kv_head(x, t0, t1, hkv):
    """Rows [t0, t1) of x [B, T, h_q, d_h] as [B, h_kv, r, T_b, d_h]: query head i = g·r + j is group g, member j."""
    xp = array_namespace(x)
    B, _, hq, dh = x.shape
    return xp.permute_dims(xp.reshape(x[:, t0:t1, ...], (B, t1 - t0, hkv, hq // hkv, dh)), (0, 2, 3, 1, 4))


def _kv_block(x, s0, s1):
    """Key rows [s0, s1) of x [B, S, h_kv, d_h] as [B, h_kv, 1, S_b, d_h] (broadcast over the r query heads)."""
    xp = array_namespace(x)
    return xp.permute_dims(x[:, s0:s1, ...], (0, 2, 1, 3))[:, :, None, ...]


def _by_query_head(x):
    """The inverse of _by_kv_head: [B, h_kv, r, T_b, d_h] → [B, T_b, h_q, d_h]."""
    xp = array_namespace(x)
    B, hkv, r, Tb, dh = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 3, 1, 2, 4)), (B, Tb, hkv * r, dh))


def attention_forward(q, k, v, window=None, doc_ids=None, q_pos=None, k_pos=None, block_budget=_BLOCK_ELEMENTS):
    """O_i = softmax(Q_i K_{⌊i/r⌋}ᵀ · d_h^{−1/2} + M) V_{⌊i/r⌋} for every query head i (SPEC §4.4 steps 4-6).

    q: [B, Tq, h_q, d_h]; k, v: [B, Tk, h_kv, d_h] with h_q = r·h_kv (query head i uses KV head ⌊i/r⌋: the KV
    heads are repeated in contiguous blocks). M is 0 where `allowed` and −∞ elsewhere. q_pos / k_pos are the
    integer positions of queries and keys (default 0…T−1; k_pos must be increasing); doc_ids is [B, T] document ids
    for the intra-document mask (queries and keys share them when Tq = Tk) or a pair (q_doc, k_doc).

    Returns O [B, Tq, h_q, d_h] (heads still split; the caller concatenates them head-major) and
    ctx = (q, k, v, o, lse, window, q_doc, k_doc, q_pos, k_pos) where lse [B, h_q, Tq] is the log-normaliser of
    each row. A query with no allowed key (only possible with unusual position inputs) gets O = 0.
    block_budget bounds the scores held at once (elements); it changes memory and speed, never the result.
    """
    xp = array_namespace(q)
    B, Tq, hq, dh = q.shape
    hkv = k.shape[2]
    q_pos, k_pos, q_doc, k_doc = positions_and_docs(Tq, k.shape[1], q_pos, k_pos, doc_ids, xp)
    scale = dh ** -0.5  # rounded to q's dtype where it multiplies

    o = xp.empty_like(q)
    lse = xp.empty((B, hq, Tq), dtype=q.dtype)
    for t0, t1, s0, s1 in query_blocks(q_pos, k_pos, window, B * hq, block_budget):
        if s1 == s0:  # no key within any of the block's queries' reach: O = 0 and lse = −∞, as for a masked row
            o[:, t0:t1, ...] = 0.0
            lse[:, :, t0:t1] = -math.inf
            continue
        # Scores for this block, grouped by KV head: [B, h_kv, r, Tb, Sb].
        qb, kb, vb = _by_kv_head(q, t0, t1, hkv), _kv_block(k, s0, s1), _kv_block(v, s0, s1)
        scores = (qb @ xp.matrix_transpose(kb)) * scale
        mask = _block_mask(q_pos, k_pos, window, q_doc, k_doc, t0, t1, s0, s1)
        scores = xp.where(mask, scores, -math.inf)
        # Softmax along keys with the row maximum subtracted; rows with no allowed key get m = 0, l = 0 and
        # lse = −∞ (log 0), without evaluating log 0.
        m = xp.max(scores, axis=-1, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0.0)
        p = xp.exp(scores - m)
        l = xp.sum(p, axis=-1, keepdims=True)
        some = l > 0
        ob = (p @ vb) / xp.where(some, l, 1.0)
        lse_b = xp.where(some, m + xp.log(xp.where(some, l, 1.0)), -math.inf)[..., 0]
        o[:, t0:t1, ...] = _by_query_head(ob)
        lse[:, :, t0:t1] = xp.reshape(lse_b, (B, hq, t1 - t0))
    return o, (q, k, v, o, lse, window, q_doc, k_doc, q_pos, k_pos)


def positions_and_docs(Tq, Tk, q_pos=None, k_pos=None, doc_ids=None, xp=None):
    """The defaults of attention_forward's optional inputs: positions 0…T−1 (in namespace xp, default NumPy), and
    doc ids shared by queries and keys unless given as a (q_doc, k_doc) pair. Returns (q_pos, k_pos, q_doc, k_doc)."""
    xp = xp or array_namespace(q_pos, k_pos)
    q_pos = xp.arange(Tq) if q_pos is None else xp.asarray(q_pos)
    k_pos = xp.arange(Tk) if k_pos is None else xp.asarray(k_pos)
    q_doc, k_doc = doc_ids if isinstance(doc_ids, tuple) else (doc_ids, doc_ids)
    return q_pos, k_pos, q_doc, k_doc


def attention_backward(ctx, do, block_budget=_BLOCK_ELEMENTS):
    """Gradients of attention_forward w.r.t. q, k, v (SPEC §5 "SDPA per head" and "GQA").

    Per block of queries the probabilities are recomputed from the saved log-normaliser, P = exp(S − lse), so no
    T×T matrix is ever stored, then with D_t = Σ_j dO[t,j] O[t,j] (= rowsum(dP ⊙ P)):
        dP = dO Vᵀ,   dS = P ⊙ (dP − D),   dQ = dS K / √d_h,   dK = dSᵀ Q / √d_h,   dV = Pᵀ dO,
    with dK and dV of a KV head summed over the r query heads that share it. Masked entries have P = 0.
    Returns (dq, dk, dv) shaped like q, k, v.
    """
    q, k, v, o, lse, window, q_doc, k_doc, q_pos, k_pos = ctx
    xp = array_namespace(do, q)
    B, Tq, hq, dh = q.shape
    hkv = k.shape[2]
    scale = dh ** -0.5
    dq = xp.empty_like(q)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    lse = xp.reshape(lse, (B, hkv, hq // hkv, Tq))
    for t0, t1, s0, s1 in query_blocks(q_pos, k_pos, window, B * hq, block_budget):
        qb, ob, dob = _by_kv_head(q, t0, t1, hkv), _by_kv_head(o, t0, t1, hkv), _by_kv_head(do, t0, t1, hkv)
        kb, vb = _kv_block(k, s0, s1), _kv_block(v, s0, s1)
        scores = (qb @ xp.matrix_transpose(kb)) * scale
        mask = _block_mask(q_pos, k_pos, window, q_doc, k_doc, t0, t1, s0, s1)
        p = xp.exp(xp.where(mask, scores - lse[..., t0:t1, None], -math.inf))
        dp = dob @ xp.matrix_transpose(vb)
        ds = p * (dp - xp.sum(dob * ob, axis=-1, keepdims=True))
        dq[:, t0:t1, ...] = _by_query_head((ds @ kb) * scale)
        dk_b = xp.sum(xp.matrix_transpose(ds) @ qb, axis=2) * scale  # [B, h_kv, S_b, d_h]
        dk[:, s0:s1, ...] += xp.permute_dims(dk_b, (0, 2, 1, 3))
        dv[:, s0:s1, ...] += xp.permute_dims(xp.sum(xp.matrix_transpose(p) @ dob, axis=2), (0, 2, 1, 3))
    return dq, dk, dv


def _block_size(Tq: int, Tk: int, window, rows_per_query: int, budget: int) -> int:
    """Queries per block: rows_per_query · block · span ≤ budget (but ≥ 16 queries); a window caps it at w."""
    span = Tk if window is None else min(Tk, window + 64)
    block = int(max(16, min(Tq, budget // max(1, rows_per_query * span))))
    return block if window is None else min(block, max(16, window))  # banded span ≈ 2w: O(w) keys per query


def _key_span(first_query: int, last_query: int, window, keys_before) -> tuple[int, int]:
    """[s0, s1): the keys the queries at positions first..last may attend to. `keys_before(p, side)` counts the keys
    before position p ("left") or at it too ("right"); s0 is rounded down to a multiple of 16 keys."""
    s0 = 0 if window is None else keys_before(first_query - window + 1, "left") // 16 * 16
    return s0, max(s0, keys_before(last_query, "right"))


def query_blocks(q_pos, k_pos, window, rows_per_query, budget=_BLOCK_ELEMENTS):
    """Yield (t0, t1, s0, s1): query rows [t0, t1) and the key rows [s0, s1) that any of them may attend to.

    With a window, the key span of a block is at most (block + w − 1), so the total work is O(T·w); without one
    it is the causal prefix. The block size keeps rows_per_query · block · span ≤ budget (but ≥ 16 queries).
    Keys come sorted by position, so each span is found by binary search; its start is rounded down to a multiple
    of 16 keys (the mask excludes the extra ones), which keeps the BLAS calls on aligned sizes: odd spans ran up to
    10× slower in OpenBLAS here.
    """
    xp = array_namespace(q_pos, k_pos)
    Tq, Tk = q_pos.shape[0], k_pos.shape[0]
    if Tq == 0:
        return
    block = _block_size(Tq, Tk, window, rows_per_query, budget)

    def keys_before(position, side):
        return int(xp.searchsorted(k_pos, xp.asarray([position], dtype=k_pos.dtype), side=side)[0])

    for t0 in range(0, Tq, block):
        t1 = min(Tq, t0 + block)
        yield (t0, t1, *_key_span(int(xp.min(q_pos[t0:t1])), int(xp.max(q_pos[t0:t1])), window, keys_before))


def largest_query_block(T: int, window, rows_per_query: int, budget=_BLOCK_ELEMENTS) -> tuple[int, int]:
    """(max over blocks of (t1 − t0)·(s1 − s0), number of blocks) for `query_blocks` of the positions 0..T−1 as
    queries and keys, in O(w/block) instead of O(T) (the memory model asks this for contexts of 10⁵–10⁶ tokens).

    Only some blocks can be the largest. Causal: (t1 − t0)·t1 grows with the block, so one of the last two (the last
    may be short). Sliding: while t0 < w − 1 the span starts at 0 and grows; after that a full block's span is
    block + w − 1 + ((t0 − w + 1) mod 16), periodic in the block index with a period dividing 16. So the blocks with
    t0 < w − 1 + 16·block and the last two hold the largest."""
    if T <= 0:
        return 0, 0
    block = _block_size(T, T, window, rows_per_query, budget)
    count = -(-T // block)

    def keys_before(position, side):  # contiguous keys 0..T−1
        return min(T, max(0, position + (side == "right")))

    head = 0 if window is None else min(count, -(-(window - 1) // block) + 17)
    candidates = set(range(head)) | {max(0, count - 2), count - 1}
    largest = 0
    for i in candidates:
        t0, t1 = i * block, min(T, (i + 1) * block)
        s0, s1 = _key_span(t0, t1 - 1, window, keys_before)
        largest = max(largest, (t1 - t0) * (s1 - s0))
    return largest, count


def _block_mask(q_pos, k_pos, window, q_doc, k_doc, t0, t1, s0, s1):
    """`allowed` for one block, shaped to broadcast against scores [B, h_kv, r, Tb, Sb]."""
    qd = None if q_doc is None else q_doc[:, t0:t1]
    kd = None if k_doc is None else k_doc[:, s0:s1]
    mask = allowed(q_pos[t0:t1], k_pos[s0:s1], window, qd, kd)
    return mask[:, None, None, ...] if mask.ndim == 3 else mask


def output_gate_forward(o, g):
    """Õ = O ⊙ σ(G): an elementwise sigmoid gate on the concatenated heads, G = a W_gᵀ (SPEC §4.4 step 7).
    ctx = (O, σ(G)): dO = dÕ ⊙ σ(G), dG = dÕ ⊙ O ⊙ σ(G)(1 − σ(G)) (SPEC §5)."""
    sig = sigmoid(g)
    return o * sig, (o, sig)


def output_gate_backward(ctx, dy):
    """dO = dÕ ⊙ σ(G), dG = dÕ ⊙ O ⊙ σ(G)(1 − σ(G)) (SPEC §5 "Attention gate")."""
    o, sig = ctx
    return dy * sig, dy * o * sig * (1.0 - sig)
