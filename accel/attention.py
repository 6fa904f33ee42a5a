"""Attention as tiles with an online softmax (flash-attention recipe) in numba; SPEC §4.4-§4.6, §5 "SDPA".

Same operator as trinity.reference.attention (GQA, causal, sliding window, intra-document mask, arbitrary sorted key
positions), computed tile by tile so no T×T (nor block×T) score matrix ever exists:

forward, one task per (sequence b, KV head j, tile of `tq` queries), the r query heads sharing head j together:
    for each tile of `tk` keys that the query tile can see (causal / window / document ranges skip the rest):
        S = (Q/√d_h) Kᵀ, masked to −∞;   m' = max(m, rowmax S);   P = exp(S − m')
        l ← l·e^{m−m'} + rowsum P;   acc ← acc·e^{m−m'} + P V;   m ← m'
    O = acc / l,  lse = m + log l        (a query with no allowed key: O = 0, lse = −∞, as in the reference)

backward, with P = exp(S − lse) recomputed per tile and D_t = Σ_j dO[t,j] O[t,j]:
    dP = dO Vᵀ,  dS = P ⊙ (dP − D),  dV = Pᵀ dO,  dK = dSᵀ Q/√d_h,  dQ = dS K/√d_h
in two passes so that every task owns what it writes (no atomics, results independent of the thread count):
    pass 1, one task per (b, j, key tile): dK and dV of those keys, summed over the r heads and all query tiles;
    pass 2, one task per (b, j, query tile): dQ   (both passes share one task list).

Tile products are loops whose innermost axis is a contiguous row of the output (never a reduction), so LLVM
vectorises them without reassociating any sum (fastmath stays off).
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel, run_tasks

__all__ = ["attention_forward", "attention_backward", "TILE_Q", "TILE_K"]

TILE_Q = 64  # queries per task (× r heads sharing the KV head = rows of a tile)
TILE_K = 64  # keys per tile


# ---- small helpers shared by the kernels ------------------------------------------------------------------------
@kernel
def _key_span(q_pos, k_pos, t0, t1, window):
    """Key rows [lo, hi) any query of [t0, t1) may see: positions in [min q_pos − w + 1, max q_pos] (k_pos sorted)."""
    qmin = q_pos[t0]
    qmax = q_pos[t0]
    for t in range(t0, t1):
        qmin = min(qmin, q_pos[t])
        qmax = max(qmax, q_pos[t])
    lo = 0
    if window > 0:
        lo = np.searchsorted(k_pos, qmin - window + 1, side="left")
    hi = np.searchsorted(k_pos, qmax, side="right")
    return lo, max(lo, hi)


@kernel
def _docs_overlap(q_doc, k_doc, b, t0, t1, s0, s1):
    """False when no query of [t0, t1) shares a document with any key of [s0, s1) (the tile is fully masked)."""
    qlo = q_doc[b, t0]
    qhi = q_doc[b, t0]
    for t in range(t0, t1):
        qlo = min(qlo, q_doc[b, t])
        qhi = max(qhi, q_doc[b, t])
    klo = k_doc[b, s0]
    khi = k_doc[b, s0]
    for s in range(s0, s1):
        klo = min(klo, k_doc[b, s])
        khi = max(khi, k_doc[b, s])
    return qlo <= khi and klo <= qhi


@kernel
def _load_queries(x, b, j, r, t0, nt, scale, out):
    """out[gl·nt + tt, :] = x[b, t0 + tt, j·r + gl, :] · scale: the r heads of KV head j, query-major per head."""
    dh = x.shape[3]
    for gl in range(r):
        for tt in range(nt):
            for d in range(dh):
                out[gl * nt + tt, d] = x[b, t0 + tt, j * r + gl, d] * scale


@kernel
def _load_transposed(x, b, j, s0, ns, out):
    """out[d, s] = x[b, s0 + s, j, d] for s < ns (a key or value tile, transposed so rows of products are contiguous)."""
    dh = x.shape[3]
    for s in range(ns):
        for d in range(dh):
            out[d, s] = x[b, s0 + s, j, d]


@kernel
def _tile_product(a, bt, rows, ns, out):
    """out[i, :ns] = a[i, :] @ bt[:, :ns] for i < rows (bt is the transposed right factor): axpy form, no reductions."""
    inner = a.shape[1]
    for i in range(rows):
        for s in range(ns):
            out[i, s] = 0.0
        for d in range(inner):
            x = a[i, d]
            for s in range(ns):
                out[i, s] += x * bt[d, s]


@kernel
def _mask_tile(sc, r, nt, t0, s0, ns, b, q_pos, k_pos, window, q_doc, k_doc, use_doc):
    """sc[i, s] = −∞ where query t0 + i mod nt may not see key s0 + s (SPEC §4.6)."""
    ninf = -np.inf
    for tt in range(nt):
        t = t0 + tt
        tp = q_pos[t]
        for s in range(ns):
            kp = k_pos[s0 + s]
            ok = kp <= tp
            if window > 0 and tp - kp >= window:
                ok = False
            if use_doc and q_doc[b, t] != k_doc[b, s0 + s]:
                ok = False
            if not ok:
                for gl in range(r):
                    sc[gl * nt + tt, s] = ninf


# ---- forward ------------------------------------------------------------------------------------------------------
@kernel
def _forward_task(task, q, k, v, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, tq, tk, o, lse):
    """One (b, j, query tile): the online softmax over its key tiles."""
    B, Tq, hq, dh = q.shape
    hkv = k.shape[2]
    r = hq // hkv
    n_qt = (Tq + tq - 1) // tq
    b = task // (hkv * n_qt)
    j = (task // n_qt) % hkv
    t0 = (task % n_qt) * tq
    t1 = min(Tq, t0 + tq)
    nt = t1 - t0
    rows = r * nt
    qs = np.empty((rows, dh), dtype=q.dtype)
    kt = np.empty((dh, tk), dtype=q.dtype)
    sc = np.empty((rows, tk), dtype=q.dtype)
    acc = np.zeros((rows, dh), dtype=q.dtype)
    m = np.full(rows, -np.inf, dtype=q.dtype)
    l = np.zeros(rows, dtype=q.dtype)
    _load_queries(q, b, j, r, t0, nt, scale, qs)
    lo, hi = _key_span(q_pos, k_pos, t0, t1, window)
    for s0 in range(lo, hi, tk):
        s1 = min(hi, s0 + tk)
        ns = s1 - s0
        if use_doc and not _docs_overlap(q_doc, k_doc, b, t0, t1, s0, s1):
            continue
        _load_transposed(k, b, j, s0, ns, kt)
        _tile_product(qs, kt, rows, ns, sc)
        _mask_tile(sc, r, nt, t0, s0, ns, b, q_pos, k_pos, window, q_doc, k_doc, use_doc)
        for i in range(rows):
            m_new = m[i]
            for s in range(ns):
                m_new = max(m_new, sc[i, s])
            if m_new == -np.inf:
                continue  # nothing allowed yet in this row
            alpha = np.exp(m[i] - m_new)
            l[i] *= alpha
            for d in range(dh):
                acc[i, d] *= alpha
            m[i] = m_new
            for s in range(ns):
                p = np.exp(sc[i, s] - m_new)
                l[i] += p
                if p != 0.0:
                    for d in range(dh):
                        acc[i, d] += p * v[b, s0 + s, j, d]
    for gl in range(r):
        g = j * r + gl
        for tt in range(nt):
            i = gl * nt + tt
            if l[i] > 0.0:
                inv = 1.0 / l[i]
                for d in range(dh):
                    o[b, t0 + tt, g, d] = acc[i, d] * inv
                lse[b, g, t0 + tt] = m[i] + np.log(l[i])
            else:
                for d in range(dh):
                    o[b, t0 + tt, g, d] = 0.0
                lse[b, g, t0 + tt] = -np.inf


# ---- backward -----------------------------------------------------------------------------------------------------
@kernel
def _probabilities(sc, lse, b, j, r, t0, nt, ns):
    """sc ← exp(sc − lse) in place (masked entries hold −∞ and become 0)."""
    for gl in range(r):
        for tt in range(nt):
            i = gl * nt + tt
            row_lse = lse[b, j * r + gl, t0 + tt]
            for s in range(ns):
                sc[i, s] = np.exp(sc[i, s] - row_lse)


@kernel
def _load_rows(x, b, j, r, t0, nt, out):
    """out[gl·nt + tt] = x[b, gl·? …]: x is [B, h_q, T] (lse, D); rows of the r heads of KV head j."""
    for gl in range(r):
        for tt in range(nt):
            out[gl * nt + tt] = x[b, j * r + gl, t0 + tt]


@kernel
def _score_gradients(p, dp, dsum, rows, ns):
    """dp ← P ⊙ (dP − D) in place: dS."""
    for i in range(rows):
        for s in range(ns):
            dp[i, s] = p[i, s] * (dp[i, s] - dsum[i])


@kernel
def _dkdv_task(task, q, k, v, do, lse, dsum, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, tq, tk, dk, dv):
    """One (b, j, key tile): dK and dV of those keys over every query tile that can see them."""
    B, Tq, hq, dh = q.shape
    Tk, hkv = k.shape[1], k.shape[2]
    r = hq // hkv
    n_kt = (Tk + tk - 1) // tk
    n_qt = (Tq + tq - 1) // tq
    b = task // (hkv * n_kt)
    j = (task // n_kt) % hkv
    s0 = (task % n_kt) * tk
    s1 = min(Tk, s0 + tk)
    ns = s1 - s0
    kt = np.empty((dh, tk), dtype=q.dtype)
    vt = np.empty((dh, tk), dtype=q.dtype)
    qs = np.empty((r * tq, dh), dtype=q.dtype)
    dos = np.empty((r * tq, dh), dtype=q.dtype)
    sc = np.empty((r * tq, tk), dtype=q.dtype)
    dp = np.empty((r * tq, tk), dtype=q.dtype)
    drow = np.empty(r * tq, dtype=q.dtype)
    dk_acc = np.zeros((tk, dh), dtype=q.dtype)
    dv_acc = np.zeros((tk, dh), dtype=q.dtype)
    _load_transposed(k, b, j, s0, ns, kt)
    _load_transposed(v, b, j, s0, ns, vt)
    kmin = k_pos[s0]
    kmax = k_pos[s1 - 1]
    for qt in range(n_qt):
        t0 = qt * tq
        t1 = min(Tq, t0 + tq)
        nt = t1 - t0
        rows = r * nt
        qmin = q_pos[t0]
        qmax = q_pos[t0]
        for t in range(t0, t1):
            qmin = min(qmin, q_pos[t])
            qmax = max(qmax, q_pos[t])
        if qmax < kmin or (window > 0 and qmin - kmax >= window):
            continue
        if use_doc and not _docs_overlap(q_doc, k_doc, b, t0, t1, s0, s1):
            continue
        _load_queries(q, b, j, r, t0, nt, scale, qs)
        _load_queries(do, b, j, r, t0, nt, 1.0, dos)
        _load_rows(dsum, b, j, r, t0, nt, drow)
        _tile_product(qs, kt, rows, ns, sc)
        _mask_tile(sc, r, nt, t0, s0, ns, b, q_pos, k_pos, window, q_doc, k_doc, use_doc)
        _probabilities(sc, lse, b, j, r, t0, nt, ns)
        _tile_product(dos, vt, rows, ns, dp)
        _score_gradients(sc, dp, drow, rows, ns)
        for i in range(rows):
            for s in range(ns):
                p = sc[i, s]
                if p != 0.0:
                    g = dp[i, s]
                    for d in range(dh):
                        dv_acc[s, d] += p * dos[i, d]
                        dk_acc[s, d] += g * qs[i, d]
    for s in range(ns):
        for d in range(dh):
            dk[b, s0 + s, j, d] = dk_acc[s, d]
            dv[b, s0 + s, j, d] = dv_acc[s, d]


@kernel
def _dq_task(task, q, k, v, do, lse, dsum, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, tq, tk, dq):
    """One (b, j, query tile): dQ of those queries."""
    B, Tq, hq, dh = q.shape
    hkv = k.shape[2]
    r = hq // hkv
    n_qt = (Tq + tq - 1) // tq
    b = task // (hkv * n_qt)
    j = (task // n_qt) % hkv
    t0 = (task % n_qt) * tq
    t1 = min(Tq, t0 + tq)
    nt = t1 - t0
    rows = r * nt
    qs = np.empty((rows, dh), dtype=q.dtype)
    dos = np.empty((rows, dh), dtype=q.dtype)
    kt = np.empty((dh, tk), dtype=q.dtype)
    vt = np.empty((dh, tk), dtype=q.dtype)
    sc = np.empty((rows, tk), dtype=q.dtype)
    dp = np.empty((rows, tk), dtype=q.dtype)
    drow = np.empty(rows, dtype=q.dtype)
    dq_acc = np.zeros((rows, dh), dtype=q.dtype)
    _load_queries(q, b, j, r, t0, nt, scale, qs)
    _load_queries(do, b, j, r, t0, nt, 1.0, dos)
    _load_rows(dsum, b, j, r, t0, nt, drow)
    lo, hi = _key_span(q_pos, k_pos, t0, t1, window)
    for s0 in range(lo, hi, tk):
        s1 = min(hi, s0 + tk)
        ns = s1 - s0
        if use_doc and not _docs_overlap(q_doc, k_doc, b, t0, t1, s0, s1):
            continue
        _load_transposed(k, b, j, s0, ns, kt)
        _load_transposed(v, b, j, s0, ns, vt)
        _tile_product(qs, kt, rows, ns, sc)
        _mask_tile(sc, r, nt, t0, s0, ns, b, q_pos, k_pos, window, q_doc, k_doc, use_doc)
        _probabilities(sc, lse, b, j, r, t0, nt, ns)
        _tile_product(dos, vt, rows, ns, dp)
        _score_gradients(sc, dp, drow, rows, ns)
        for i in range(rows):
            for s in range(ns):
                g = dp[i, s]
                if g != 0.0:
                    for d in range(dh):
                        dq_acc[i, d] += g * k[b, s0 + s, j, d]
    for gl in range(r):
        for tt in range(nt):
            for d in range(dh):
                dq[b, t0 + tt, j * r + gl, d] = dq_acc[gl * nt + tt, d] * scale


# ---- task loops (run on the worker threads by run_tasks) ----------------------------------------------------------
@kernel
def _forward_tasks(first, stride, n, q, k, v, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, tq, tk, o, lse):
    for task in range(first, n, stride):
        _forward_task(task, q, k, v, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, tq, tk, o, lse)


@kernel
def _backward_tasks(first, stride, n, n_kv, q, k, v, do, lse, dsum, scale, window, q_pos, k_pos, q_doc, k_doc,
                    use_doc, tq, tk, dq, dk, dv):
    """Tasks [0, n_kv) are key tiles (dK, dV); tasks [n_kv, n) are query tiles (dQ)."""
    for task in range(first, n, stride):
        if task < n_kv:
            _dkdv_task(task, q, k, v, do, lse, dsum, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, tq, tk,
                       dk, dv)
        else:
            _dq_task(task - n_kv, q, k, v, do, lse, dsum, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, tq,
                     tk, dq)


# ---- the operators ------------------------------------------------------------------------------------------------
def _positions(q_pos, k_pos, doc_ids, B, Tq, Tk):
    q_pos = np.arange(Tq, dtype=np.int64) if q_pos is None else np.ascontiguousarray(q_pos, dtype=np.int64)
    k_pos = np.arange(Tk, dtype=np.int64) if k_pos is None else np.ascontiguousarray(k_pos, dtype=np.int64)
    if isinstance(doc_ids, tuple):
        q_doc, k_doc = doc_ids
    else:
        q_doc = k_doc = doc_ids
    return q_pos, k_pos, q_doc, k_doc


def _kernel_docs(q_doc, k_doc):
    """(q_doc, k_doc, use_doc) as the kernels take them: int64 [B, T] arrays, or 1×1 placeholders when unused."""
    if q_doc is None:
        none = np.zeros((1, 1), dtype=np.int64)
        return none, none, False
    return (np.ascontiguousarray(q_doc, dtype=np.int64), np.ascontiguousarray(k_doc, dtype=np.int64), True)


def attention_forward(q, k, v, window=None, doc_ids=None, q_pos=None, k_pos=None, block_budget=None):
    """The reference's attention_forward (same arguments, outputs and ctx layout), as flash-style tiles.
    block_budget is accepted for signature compatibility; tiles are TILE_Q queries × TILE_K keys."""
    B, Tq, hq, dh = q.shape
    Tk = k.shape[1]
    q_pos, k_pos, q_doc, k_doc = _positions(q_pos, k_pos, doc_ids, B, Tq, Tk)
    qc, kc, vc = (np.ascontiguousarray(a) for a in (q, k, v))
    o = np.empty_like(qc)
    lse = np.empty((B, hq, Tq), dtype=q.dtype)
    qd, kd, use_doc = _kernel_docs(q_doc, k_doc)
    scale = q.dtype.type(dh ** -0.5)
    w = -1 if window is None else int(window)
    if B * Tq and Tk:
        n = B * k.shape[2] * (-(-Tq // TILE_Q))
        run_tasks(_forward_tasks, n, qc, kc, vc, scale, w, q_pos, k_pos, qd, kd, use_doc, TILE_Q, TILE_K, o, lse)
    elif B * Tq:
        o[...] = 0
        lse[...] = -np.inf
    return o, (qc, kc, vc, o, lse, window, q_doc, k_doc, q_pos, k_pos)


def attention_backward(ctx, do, block_budget=None):
    """(dq, dk, dv) from the forward's ctx: two tiled passes recomputing P = exp(S − lse) (module docstring)."""
    q, k, v, o, lse, window, q_doc, k_doc, q_pos, k_pos = ctx
    B, Tq, hq, dh = q.shape
    do = np.ascontiguousarray(do, dtype=q.dtype)
    dsum = np.einsum("bthd,bthd->bht", do, o)  # D_t = Σ_j dO O, [B, h_q, Tq]
    dsum = np.ascontiguousarray(dsum)
    dq = np.empty_like(q)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    qd, kd, use_doc = _kernel_docs(q_doc, k_doc)
    scale = q.dtype.type(dh ** -0.5)
    w = -1 if window is None else int(window)
    if k.shape[1] and B * Tq:
        hkv = k.shape[2]
        n_kv, n_q = B * hkv * (-(-k.shape[1] // TILE_K)), B * hkv * (-(-Tq // TILE_Q))
        run_tasks(_backward_tasks, n_kv + n_q, n_kv, q, k, v, do, lse, dsum, scale, w, q_pos, k_pos, qd, kd, use_doc,
                  TILE_Q, TILE_K, dq, dk, dv)
    else:
        dq[...] = 0
        dk[...] = 0
        dv[...] = 0
    return dq, dk, dv
