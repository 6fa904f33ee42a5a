"""Attention as tiles with an online softmax (flash-attention recipe) in numba; SPEC §4.4-§4.6, §5 "SDPA".

Same operator as trinity.reference.operators.attention (GQA, causal, sliding window, intra-document mask, arbitrary
sorted key positions), computed tile by tile so no T×T (nor block×T) score matrix ever exists. A tile holds the r query
heads that share KV head j (rows = r × TILE_Q queries) against TILE_K keys.

forward, one task per (sequence b, KV head j, query tile):
    for each key tile the query tile can see (causal / window / document ranges skip the rest):
        S = (Q/√d_h) Kᵀ, masked to −∞;   m' = max(m, rowmax S);   P = exp(S − m')
        l ← l·e^{m−m'} + rowsum P;   acc ← acc·e^{m−m'} + P V;   m ← m'
    O = acc / l,  lse = m + log l        (a query with no allowed key: O = 0, lse = −∞, as in the reference)

backward, with P = exp(S − lse) recomputed per tile and D_t = Σ_j dO[t,j] O[t,j], in one pass over key tiles:
    dP = dO Vᵀ,  dS = P ⊙ (dP − D),  dV += Pᵀ dO,  dK += dSᵀ Q/√d_h,  dQ += dS K/√d_h
One task per (b, j, group g of key tiles): dK and dV of a key tile are finished inside the task; dQ of (b, j) is
written only by the G tasks of that (b, j), each into its own partial, summed afterwards in order g = 0 … G−1.
G depends on the shapes only (enough tasks to fill 16 threads, at most 16 partials), never on the thread count,
so results are bitwise the same for any NUMBA_NUM_THREADS.

Tile products are tiles.mm / mm_tn (vectorised axpy loops) and exp is _math.vexp (vectorisable), so the whole
inner loop runs in SIMD without reassociating any sum (fastmath stays off).
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel, run_tasks
from ._math import vexp
from .tiles import mm, mm_tn

__all__ = ["attention_forward", "attention_backward", "TILE_Q", "TILE_K"]

TILE_Q = 64  # queries per tile (× r heads sharing the KV head = rows of a tile)
TILE_K = 64  # keys per tile
_TASKS = 16  # backward: aim for at least this many tasks (B · h_kv · G)


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
def _tile_visible(q_pos, k_pos, window, q_doc, k_doc, use_doc, b, t0, t1, s0, s1):
    """False when no query of [t0, t1) may see any key of [s0, s1) (then the tile is skipped): by position range
    (causal, window) and, with document ids, by disjoint document ranges."""
    qmin = q_pos[t0]
    qmax = q_pos[t0]
    for t in range(t0, t1):
        qmin = min(qmin, q_pos[t])
        qmax = max(qmax, q_pos[t])
    if qmax < k_pos[s0] or (window > 0 and qmin - k_pos[s1 - 1] >= window):
        return False
    if not use_doc:
        return True
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
def _load_rows(x, b, j, r, t0, nt, scale, out):
    """out[gl·nt + tt, :] = x[b, t0 + tt, j·r + gl, :] · scale: the r heads of KV head j, query-major per head."""
    dh = x.shape[3]
    for gl in range(r):
        for tt in range(nt):
            src = x[b, t0 + tt, j * r + gl]
            dst = out[gl * nt + tt]
            for d in range(dh):
                dst[d] = src[d] * scale


@kernel
def _load_keys(x, b, j, s0, ns, rows_out, cols_out):
    """rows_out[s, :] = x[b, s0 + s, j, :] and cols_out[:, s] = the same (a key or value tile, both layouts)."""
    dh = x.shape[3]
    for s in range(ns):
        src = x[b, s0 + s, j]
        for d in range(dh):
            rows_out[s, d] = src[d]
            cols_out[d, s] = src[d]


@kernel
def _mask_tile(sc, r, nt, t0, s0, ns, b, q_pos, k_pos, window, q_doc, k_doc, use_doc):
    """sc[gl·nt + tt, s] = −∞ where query t0 + tt may not see key s0 + s (SPEC §4.6)."""
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
                    sc[gl * nt + tt, s] = -np.inf


# ---- forward ------------------------------------------------------------------------------------------------------
@kernel
def _forward_task(task, q, k, v, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, o, lse):
    """One (b, j, query tile): the online softmax over its key tiles."""
    B, Tq, hq, dh = q.shape
    hkv = k.shape[2]
    r = hq // hkv
    n_qt = (Tq + TILE_Q - 1) // TILE_Q
    b = task // (hkv * n_qt)
    j = (task // n_qt) % hkv
    t0 = (task % n_qt) * TILE_Q
    t1 = min(Tq, t0 + TILE_Q)
    nt = t1 - t0
    rows = r * nt
    qs = np.empty((rows, dh), dtype=q.dtype)
    kt = np.empty((dh, TILE_K), dtype=q.dtype)
    kr = np.empty((TILE_K, dh), dtype=q.dtype)
    vt = np.empty((dh, TILE_K), dtype=q.dtype)
    vr = np.empty((TILE_K, dh), dtype=q.dtype)
    sc = np.empty((rows, TILE_K), dtype=q.dtype)
    acc = np.zeros((rows, dh), dtype=q.dtype)
    m = np.full(rows, -np.inf, dtype=q.dtype)
    l = np.zeros(rows, dtype=q.dtype)
    _load_rows(q, b, j, r, t0, nt, scale, qs)
    lo, hi = _key_span(q_pos, k_pos, t0, t1, window)
    for s0 in range(lo, hi, TILE_K):
        s1 = min(hi, s0 + TILE_K)
        ns = s1 - s0
        if not _tile_visible(q_pos, k_pos, window, q_doc, k_doc, use_doc, b, t0, t1, s0, s1):
            continue
        _load_keys(k, b, j, s0, ns, kr, kt)
        _load_keys(v, b, j, s0, ns, vr, vt)
        mm(qs, kt, rows, dh, ns, sc, False)
        _mask_tile(sc, r, nt, t0, s0, ns, b, q_pos, k_pos, window, q_doc, k_doc, use_doc)
        for i in range(rows):
            row = sc[i]
            m_new = m[i]
            for s in range(ns):
                m_new = max(m_new, row[s])
            if m_new == -np.inf:  # nothing allowed in this row so far: P = 0
                for s in range(ns):
                    row[s] = 0.0
                continue
            alpha = vexp(m[i] - m_new)
            m[i] = m_new
            arow = acc[i]
            for d in range(dh):
                arow[d] *= alpha
            total = l[i] * alpha
            for s in range(ns):
                row[s] = vexp(row[s] - m_new)
            for s in range(ns):
                total += row[s]
            l[i] = total
        mm(sc, vr, rows, ns, dh, acc, True)
    for gl in range(r):
        g = j * r + gl
        for tt in range(nt):
            i = gl * nt + tt
            dst = o[b, t0 + tt, g]
            if l[i] > 0.0:
                inv = 1.0 / l[i]
                for d in range(dh):
                    dst[d] = acc[i, d] * inv
                lse[b, g, t0 + tt] = m[i] + np.log(l[i])
            else:
                for d in range(dh):
                    dst[d] = 0.0
                lse[b, g, t0 + tt] = -np.inf


@kernel
def _forward_tasks(first, stride, n, q, k, v, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, o, lse):
    for task in range(first, n, stride):
        _forward_task(task, q, k, v, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc, o, lse)


# ---- backward -----------------------------------------------------------------------------------------------------
@kernel
def _backward_task(task, groups, q, k, v, do, lse, dsum, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc,
                   dq_parts, dk, dv):
    """One (b, j, group g): for the key tiles kt ≡ g (mod G), dK and dV in full and their dQ share into part g."""
    B, Tq, hq, dh = q.shape
    Tk, hkv = k.shape[1], k.shape[2]
    r = hq // hkv
    n_kt = (Tk + TILE_K - 1) // TILE_K
    n_qt = (Tq + TILE_Q - 1) // TILE_Q
    b = task // (hkv * groups)
    j = (task // groups) % hkv
    g = task % groups
    dq_part = dq_parts[g]
    kt = np.empty((dh, TILE_K), dtype=q.dtype)
    kr = np.empty((TILE_K, dh), dtype=q.dtype)
    vt = np.empty((dh, TILE_K), dtype=q.dtype)
    vr = np.empty((TILE_K, dh), dtype=q.dtype)
    qs = np.empty((r * TILE_Q, dh), dtype=q.dtype)
    dos = np.empty((r * TILE_Q, dh), dtype=q.dtype)
    sc = np.empty((r * TILE_Q, TILE_K), dtype=q.dtype)
    dp = np.empty((r * TILE_Q, TILE_K), dtype=q.dtype)
    dqt = np.empty((r * TILE_Q, dh), dtype=q.dtype)
    dk_acc = np.empty((TILE_K, dh), dtype=q.dtype)
    dv_acc = np.empty((TILE_K, dh), dtype=q.dtype)
    for kti in range(g, n_kt, groups):
        s0 = kti * TILE_K
        s1 = min(Tk, s0 + TILE_K)
        ns = s1 - s0
        _load_keys(k, b, j, s0, ns, kr, kt)
        _load_keys(v, b, j, s0, ns, vr, vt)
        dk_acc[:] = 0.0
        dv_acc[:] = 0.0
        for qt in range(n_qt):
            t0 = qt * TILE_Q
            t1 = min(Tq, t0 + TILE_Q)
            nt = t1 - t0
            rows = r * nt
            if not _tile_visible(q_pos, k_pos, window, q_doc, k_doc, use_doc, b, t0, t1, s0, s1):
                continue
            _load_rows(q, b, j, r, t0, nt, scale, qs)
            _load_rows(do, b, j, r, t0, nt, 1.0, dos)
            mm(qs, kt, rows, dh, ns, sc, False)
            _mask_tile(sc, r, nt, t0, s0, ns, b, q_pos, k_pos, window, q_doc, k_doc, use_doc)
            mm(dos, vt, rows, dh, ns, dp, False)
            for gl in range(r):
                for tt in range(nt):
                    i = gl * nt + tt
                    row_lse = lse[b, j * r + gl, t0 + tt]
                    d_i = dsum[b, j * r + gl, t0 + tt]
                    prow = sc[i]
                    dprow = dp[i]
                    if row_lse == -np.inf:  # the query sees no key at all: P = 0
                        for s in range(ns):
                            prow[s] = 0.0
                    else:
                        for s in range(ns):
                            prow[s] = vexp(prow[s] - row_lse)
                    for s in range(ns):
                        dprow[s] = prow[s] * (dprow[s] - d_i)
            mm_tn(sc, dos, ns, rows, dh, dv_acc)
            mm_tn(dp, qs, ns, rows, dh, dk_acc)
            mm(dp, kr, rows, ns, dh, dqt, False)
            for gl in range(r):
                for tt in range(nt):
                    dst = dq_part[b, t0 + tt, j * r + gl]
                    src = dqt[gl * nt + tt]
                    for d in range(dh):
                        dst[d] += src[d] * scale
        for s in range(ns):
            for d in range(dh):
                dk[b, s0 + s, j, d] = dk_acc[s, d]
                dv[b, s0 + s, j, d] = dv_acc[s, d]


@kernel
def _backward_tasks(first, stride, n, groups, q, k, v, do, lse, dsum, scale, window, q_pos, k_pos, q_doc, k_doc,
                    use_doc, dq_parts, dk, dv):
    for task in range(first, n, stride):
        _backward_task(task, groups, q, k, v, do, lse, dsum, scale, window, q_pos, k_pos, q_doc, k_doc, use_doc,
                       dq_parts, dk, dv)


# ---- the operators ------------------------------------------------------------------------------------------------
def _kernel_docs(q_doc, k_doc):
    """(q_doc, k_doc, use_doc) as the kernels take them: int64 [B, T] arrays, or 1×1 placeholders when unused."""
    if q_doc is None:
        none = np.zeros((1, 1), dtype=np.int64)
        return none, none, False
    return np.ascontiguousarray(q_doc, dtype=np.int64), np.ascontiguousarray(k_doc, dtype=np.int64), True


def attention_forward(q, k, v, window=None, doc_ids=None, q_pos=None, k_pos=None, block_budget=None):
    """The reference's attention_forward (same arguments, outputs and ctx layout) as flash-style tiles.
    block_budget is accepted for signature compatibility; the tiles have a fixed size."""
    B, Tq, hq, dh = q.shape
    Tk, hkv = k.shape[1], k.shape[2]
    q_pos = np.arange(Tq, dtype=np.int64) if q_pos is None else np.ascontiguousarray(q_pos, dtype=np.int64)
    k_pos = np.arange(Tk, dtype=np.int64) if k_pos is None else np.ascontiguousarray(k_pos, dtype=np.int64)
    q_doc, k_doc = doc_ids if isinstance(doc_ids, tuple) else (doc_ids, doc_ids)
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    o = np.zeros_like(q)
    lse = np.full((B, hq, Tq), -np.inf, dtype=q.dtype)
    if B * Tq * Tk:
        qd, kd, use_doc = _kernel_docs(q_doc, k_doc)
        w = -1 if window is None else int(window)
        run_tasks(_forward_tasks, B * hkv * (-(-Tq // TILE_Q)), q, k, v, q.dtype.type(dh ** -0.5), w, q_pos, k_pos,
                  qd, kd, use_doc, o, lse)
    return o, (q, k, v, o, lse, window, q_doc, k_doc, q_pos, k_pos)


def attention_backward(ctx, do, block_budget=None):
    """(dq, dk, dv) from the forward's ctx: one tiled pass recomputing P = exp(S − lse) (module docstring)."""
    q, k, v, o, lse, window, q_doc, k_doc, q_pos, k_pos = ctx
    B, Tq, hq, dh = q.shape
    Tk, hkv = k.shape[1], k.shape[2]
    do = np.ascontiguousarray(do, dtype=q.dtype)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    n_kt = -(-Tk // TILE_K)
    groups = max(1, min(n_kt, 16, -(-_TASKS // max(1, B * hkv))))
    dq_parts = np.zeros((groups,) + q.shape, dtype=q.dtype)
    if B * Tq * Tk:
        dsum = np.ascontiguousarray(np.einsum("bthd,bthd->bht", do, o))  # D_t = Σ_j dO O, [B, h_q, Tq]
        qd, kd, use_doc = _kernel_docs(q_doc, k_doc)
        w = -1 if window is None else int(window)
        run_tasks(_backward_tasks, B * hkv * groups, groups, q, k, v, do, lse, dsum, q.dtype.type(dh ** -0.5), w,
                  q_pos, k_pos, qd, kd, use_doc, dq_parts, dk, dv)
    dq = dq_parts[0] if groups == 1 else dq_parts.sum(axis=0)
    return dq, dk, dv
