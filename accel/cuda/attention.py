"""Flash attention on the GPU: GQA, causal, sliding window, intra-document masks, explicit positions (SPEC §4.4 steps
4-6, §4.6; backward §5 "SDPA per head" and "GQA"); reference: operators/attention.py.

No T×T (nor block×T) matrix exists anywhere: scores live in registers/local memory one key tile at a time.

forward, grid (query blocks, B·h_q), one thread per query row t of head i (KV head j = ⌊i/r⌋):
    K, V tiles of TILE keys are staged in shared memory by the whole block, for the key span the block can see
    (k_pos sorted: [min q_pos − w + 1, max q_pos] by binary search, so a sliding layer costs O(T·w));
    per tile:  S = (Q/√d_h)·Kᵀ masked to −∞;  m' = max(m, max S);  l ← l e^{m−m'} + Σ e^{S−m'};
               acc ← acc e^{m−m'} + e^{S−m'} V;  m ← m'
    O = acc / l,  lse = m + log l   (no allowed key: O = 0, lse = −∞, as the reference)
backward (FlashAttention-2 split, no atomics, deterministic), P = exp(S − lse) recomputed per tile:
    dQ kernel, as the forward's grid: D_t = Σ_d dO_td O_td (saved for the next kernel);
        dQ_t = Σ_s P_ts (dO_t·V_s − D_t) K_s / √d_h
    dK/dV kernel, grid (key blocks, B·h_kv), one thread per key s, Q and dO tiles in shared memory, looping over
    the r query heads of KV head j and the query tiles that can see the block's keys:
        dV_s = Σ_{i,t} P_ts dO_t,   dK_s = Σ_{i,t} P_ts (dO_t·V_s − D_t) Q_t / √d_h
Memory traffic: the forward reads Q once and K, V once per query block that sees them; it writes O and lse. The
backward reads Q, O, dO once in the dQ kernel and Q, dO, lse, D once per key block in the dK/dV kernel.
"""

from __future__ import annotations

import math

import numpy as np
from numba import int64

from ._common import SIMULATOR, alloc, arange, cuda, launch, namespace, per_dtype, zeros

__all__ = ["attention_forward", "attention_backward", "MAX_HEAD_DIM", "ROWS"]

MAX_HEAD_DIM = 128  # per-thread rows of Q/acc/dK/dV are local arrays of this length
ROWS = 16 if SIMULATOR else 64  # threads per block: query rows (forward, dQ) or key rows (dK/dV)


def _tile(ft):
    """Rows of a shared-memory tile: 2 tiles × TILE × MAX_HEAD_DIM floats stay within 32 KiB."""
    return 16 if ft.bitwidth == 64 or SIMULATOR else 32


@cuda.jit(device=True)
def _lower_bound(a, x):
    """First index with a[i] ≥ x (a sorted)."""
    lo, hi = 0, a.size
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit(device=True)
def _min_max(a, lo, hi):
    amin, amax = a[lo], a[lo]
    for i in range(lo + 1, hi):
        amin = min(amin, a[i])
        amax = max(amax, a[i])
    return amin, amax


@cuda.jit(device=True)
def _allowed(tp, sp, window, q_doc, k_doc, use_doc, b, t, s):
    """SPEC §4.6: s ≤ t ∧ (no window ∨ t − s < w) ∧ (no docs ∨ doc(t) = doc(s)), on positions tp, sp."""
    if sp > tp or (window > 0 and tp - sp >= window):
        return False
    return not use_doc or q_doc[b, t] == k_doc[b, s]


@cuda.jit(device=True)
def _key_span(q_pos, k_pos, window, t0, t1, span):
    """span[0:2] = key rows [lo, hi) that queries [t0, t1) may see: positions in [min q_pos − w + 1, max q_pos]."""
    qmin, qmax = _min_max(q_pos, t0, t1)
    lo = _lower_bound(k_pos, qmin - window + 1) if window > 0 else 0
    hi = _lower_bound(k_pos, qmax + 1)
    span[0] = lo
    span[1] = max(lo, hi)


@per_dtype
def _forward_kernel(ft):
    tile = _tile(ft)

    @cuda.jit
    def kernel(q, k, v, q_pos, k_pos, window, q_doc, k_doc, use_doc, scale, o, lse):
        ks = cuda.shared.array((tile, MAX_HEAD_DIM), ft)
        vs = cuda.shared.array((tile, MAX_HEAD_DIM), ft)
        span = cuda.shared.array(2, int64)
        qr = cuda.local.array(MAX_HEAD_DIM, ft)
        acc = cuda.local.array(MAX_HEAD_DIM, ft)
        sc = cuda.local.array(tile, ft)
        Tq, hq, dh = q.shape[1], q.shape[2], q.shape[3]
        r = hq // k.shape[2]
        tid = cuda.threadIdx.x
        t0 = cuda.blockIdx.x * ROWS
        t = t0 + tid
        b, i = cuda.blockIdx.y // hq, cuda.blockIdx.y % hq
        j = i // r
        active = t < Tq
        if tid == 0:
            _key_span(q_pos, k_pos, window, t0, min(t0 + ROWS, Tq), span)
        m, l = ft(-math.inf), ft(0.0)
        if active:
            for d in range(dh):
                qr[d] = q[b, t, i, d] * scale
                acc[d] = 0
        cuda.syncthreads()
        for s0 in range(span[0], span[1], tile):
            n = min(tile, span[1] - s0)
            for x in range(tid, n * dh, ROWS):  # the block stages K and V rows [s0, s0 + n)
                ks[x // dh, x % dh] = k[b, s0 + x // dh, j, x % dh]
                vs[x // dh, x % dh] = v[b, s0 + x // dh, j, x % dh]
            cuda.syncthreads()
            if active:
                tile_max = ft(-math.inf)
                for c in range(n):  # S_ts = (q_t/√d_h)·k_s, −∞ where masked
                    sc[c] = -math.inf
                    if _allowed(q_pos[t], k_pos[s0 + c], window, q_doc, k_doc, use_doc, b, t, s0 + c):
                        dot = ft(0.0)
                        for d in range(dh):
                            dot += qr[d] * ks[c, d]
                        sc[c] = dot
                        tile_max = max(tile_max, dot)
                if tile_max > -math.inf:  # online softmax: rescale by e^{m − m'}, add e^{S − m'}
                    m_new = max(m, tile_max)
                    corr = math.exp(m - m_new)
                    l *= corr
                    for d in range(dh):
                        acc[d] *= corr
                    for c in range(n):
                        if sc[c] > -math.inf:
                            p = math.exp(sc[c] - m_new)
                            l += p
                            for d in range(dh):
                                acc[d] += p * vs[c, d]
                    m = m_new
            cuda.syncthreads()
        if active:
            for d in range(dh):
                o[b, t, i, d] = acc[d] / l if l > 0 else 0
            lse[b, i, t] = m + math.log(l) if l > 0 else -math.inf
    return kernel


@per_dtype
def _dq_kernel(ft):
    tile = _tile(ft)

    @cuda.jit
    def kernel(q, k, v, o, do, lse, q_pos, k_pos, window, q_doc, k_doc, use_doc, scale, dq, dsum):
        ks = cuda.shared.array((tile, MAX_HEAD_DIM), ft)
        vs = cuda.shared.array((tile, MAX_HEAD_DIM), ft)
        span = cuda.shared.array(2, int64)
        qr = cuda.local.array(MAX_HEAD_DIM, ft)
        acc = cuda.local.array(MAX_HEAD_DIM, ft)
        Tq, hq, dh = q.shape[1], q.shape[2], q.shape[3]
        r = hq // k.shape[2]
        tid = cuda.threadIdx.x
        t0 = cuda.blockIdx.x * ROWS
        t = t0 + tid
        b, i = cuda.blockIdx.y // hq, cuda.blockIdx.y % hq
        j = i // r
        active = t < Tq
        if tid == 0:
            _key_span(q_pos, k_pos, window, t0, min(t0 + ROWS, Tq), span)
        D = ft(0.0)
        if active:
            for d in range(dh):  # D_t = Σ dO_t ⊙ O_t (= rowsum(dP ⊙ P))
                qr[d] = q[b, t, i, d] * scale
                acc[d] = 0
                D += do[b, t, i, d] * o[b, t, i, d]
            dsum[b, i, t] = D
        cuda.syncthreads()
        for s0 in range(span[0], span[1], tile):
            n = min(tile, span[1] - s0)
            for x in range(tid, n * dh, ROWS):
                ks[x // dh, x % dh] = k[b, s0 + x // dh, j, x % dh]
                vs[x // dh, x % dh] = v[b, s0 + x // dh, j, x % dh]
            cuda.syncthreads()
            if active:
                for c in range(n):  # dS_ts = P_ts (dO_t·V_s − D_t);  dQ_t += dS_ts K_s
                    if _allowed(q_pos[t], k_pos[s0 + c], window, q_doc, k_doc, use_doc, b, t, s0 + c):
                        dot = ft(0.0)
                        dp = ft(0.0)
                        for d in range(dh):
                            dot += qr[d] * ks[c, d]
                            dp += do[b, t, i, d] * vs[c, d]
                        ds = math.exp(dot - lse[b, i, t]) * (dp - D)
                        for d in range(dh):
                            acc[d] += ds * ks[c, d]
            cuda.syncthreads()
        if active:
            for d in range(dh):
                dq[b, t, i, d] = acc[d] * scale
    return kernel


@per_dtype
def _dkv_kernel(ft):
    tile = _tile(ft)

    @cuda.jit
    def kernel(q, k, v, do, lse, dsum, q_pos, k_pos, window, q_doc, k_doc, use_doc, scale, dk, dv):
        qs = cuda.shared.array((tile, MAX_HEAD_DIM), ft)  # Q/√d_h rows of a query tile
        dos = cuda.shared.array((tile, MAX_HEAD_DIM), ft)  # dO rows of the same tile
        bounds = cuda.shared.array(2, int64)
        kr = cuda.local.array(MAX_HEAD_DIM, ft)
        vr = cuda.local.array(MAX_HEAD_DIM, ft)
        dkr = cuda.local.array(MAX_HEAD_DIM, ft)
        dvr = cuda.local.array(MAX_HEAD_DIM, ft)
        Tq, hq, dh = q.shape[1], q.shape[2], q.shape[3]
        Tk, hkv = k.shape[1], k.shape[2]
        r = hq // hkv
        tid = cuda.threadIdx.x
        s_first = cuda.blockIdx.x * ROWS
        s = s_first + tid
        s_last = min(s_first + ROWS, Tk) - 1
        b, j = cuda.blockIdx.y // hkv, cuda.blockIdx.y % hkv
        active = s < Tk
        if active:
            for d in range(dh):
                kr[d] = k[b, s, j, d]
                vr[d] = v[b, s, j, d]
                dkr[d] = 0
                dvr[d] = 0
        for h in range(r):
            i = j * r + h
            for t0 in range(0, Tq, tile):
                n = min(tile, Tq - t0)
                if tid == 0:
                    bounds[0], bounds[1] = _min_max(q_pos, t0, t0 + n)
                cuda.syncthreads()
                # skip a query tile that sees none of keys [s_first, s_last]: all too early, or all past the window
                visible = bounds[1] >= k_pos[s_first] and not (window > 0 and bounds[0] - k_pos[s_last] >= window)
                if visible:
                    for x in range(tid, n * dh, ROWS):
                        qs[x // dh, x % dh] = q[b, t0 + x // dh, i, x % dh] * scale
                        dos[x // dh, x % dh] = do[b, t0 + x // dh, i, x % dh]
                    cuda.syncthreads()
                    if active:
                        for c in range(n):
                            t = t0 + c
                            if _allowed(q_pos[t], k_pos[s], window, q_doc, k_doc, use_doc, b, t, s):
                                dot = ft(0.0)
                                dp = ft(0.0)
                                for d in range(dh):
                                    dot += qs[c, d] * kr[d]
                                    dp += dos[c, d] * vr[d]
                                p = math.exp(dot - lse[b, i, t])
                                ds = p * (dp - dsum[b, i, t])
                                for d in range(dh):  # dV_s += P dO_t;  dK_s += dS Q_t/√d_h
                                    dvr[d] += p * dos[c, d]
                                    dkr[d] += ds * qs[c, d]
                cuda.syncthreads()
        if active:
            for d in range(dh):
                dk[b, s, j, d] = dkr[d]
                dv[b, s, j, d] = dvr[d]
    return kernel


def _positions_and_docs(Tq, Tk, q_pos, k_pos, doc_ids, like):
    """(q_pos, k_pos, q_doc, k_doc) with the reference's defaults (positions 0…T−1; doc ids shared by queries and
    keys unless a (q_doc, k_doc) pair; None without documents), as integer arrays of the kind of `like` (q): the
    defaults are made there, given ones are used as they are (host ones copied over for numba device arrays)."""
    q_doc, k_doc = doc_ids if isinstance(doc_ids, tuple) else (doc_ids, doc_ids)
    qp = arange(Tq, like) if q_pos is None else _ids(q_pos, like)
    kp = arange(Tk, like) if k_pos is None else _ids(k_pos, like)
    return qp, kp, _ids(q_doc, like), _ids(k_doc, like)


def _ids(a, like):
    """Integer ids as the kernels read them: arrays of like's kind as they are (CuPy/NumPy: cast to int64 on their
    side when another type); anything else (lists, or host arrays next to device ones) as an int64 NumPy array, which
    a launch copies to the device (kernel tests only)."""
    if a is None:
        return None
    xp = namespace(a)
    if xp is not None and xp is namespace(like):
        return a if np.dtype(a.dtype).kind in "iu" else a.astype(np.int64)
    if hasattr(a, "copy_to_host") or hasattr(a, "__cuda_array_interface__"):
        return a
    return np.asarray(a, dtype=np.int64)


def _mask_args(window, q_doc, k_doc, like):
    """The kernels' mask arguments: window (0 = none), q_doc, k_doc (1×1 dummies without documents), use_doc."""
    if q_doc is None:
        dummy = zeros((1, 1), np.int64, like)
        return 0 if window is None else int(window), dummy, dummy, False
    return 0 if window is None else int(window), q_doc, k_doc, True


def _check(q, k):
    B, Tq, hq, dh = q.shape
    if dh > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {dh} > MAX_HEAD_DIM {MAX_HEAD_DIM} of the CUDA attention kernels")
    if hq % k.shape[2]:
        raise ValueError(f"h_q = {hq} is not a multiple of h_kv = {k.shape[2]}")


def attention_forward(q, k, v, window=None, doc_ids=None, q_pos=None, k_pos=None):
    """O_i = softmax(Q_i K_{⌊i/r⌋}ᵀ d_h^{−1/2} + M) V_{⌊i/r⌋} (SPEC §4.4 steps 4-6), as reference attention_forward
    (q [B, Tq, h_q, d_h]; k, v [B, Tk, h_kv, d_h]; window; doc_ids [B, T] or (q_doc, k_doc); q_pos, k_pos with k_pos
    increasing). Returns (O, ctx) with ctx = (q, k, v, o, lse [B, h_q, Tq], window, q_doc, k_doc, q_pos, k_pos);
    outputs of q's kind (_common.alloc)."""
    _check(q, k)
    B, Tq, hq, dh = q.shape
    qp, kp, q_doc, k_doc = _positions_and_docs(Tq, k.shape[1], q_pos, k_pos, doc_ids, q)
    w, qd, kd, use_doc = _mask_args(window, q_doc, k_doc, q)
    o = alloc(q.shape, q.dtype, q)
    lse = alloc((B, hq, Tq), q.dtype, q)
    if B * Tq * hq * dh:
        grid = (math.ceil(Tq / ROWS), B * hq)
        launch(_forward_kernel(q.dtype), grid, ROWS, q, k, v, qp, kp, w, qd, kd, use_doc, q.dtype.type(dh ** -0.5), o,
               lse)
    return o, (q, k, v, o, lse, window, q_doc, k_doc, qp, kp)


def attention_backward(ctx, do):
    """dQ, dK, dV of attention_forward (SPEC §5 "SDPA per head", "GQA"), with P = exp(S − lse) recomputed and
    D_t = Σ dO_t ⊙ O_t: dS = P ⊙ (dO Vᵀ − D), dQ = dS K/√d_h, dK = dSᵀ Q/√d_h, dV = Pᵀ dO, dK and dV summed over
    the r query heads sharing a KV head. Returns (dq, dk, dv) of q's kind."""
    q, k, v, o, lse, window, q_doc, k_doc, qp, kp = ctx
    w, qd, kd, use_doc = _mask_args(window, q_doc, k_doc, q)
    B, Tq, hq, dh = q.shape
    Tk, hkv = k.shape[1], k.shape[2]
    scale = q.dtype.type(dh ** -0.5)
    dq, dsum = alloc(q.shape, q.dtype, q), alloc((B, hq, Tq), q.dtype, q)
    dk, dv = alloc(k.shape, k.dtype, q), alloc(v.shape, v.dtype, q)
    if B * Tq * hq * dh:
        grid = (math.ceil(Tq / ROWS), B * hq)
        launch(_dq_kernel(q.dtype), grid, ROWS, q, k, v, o, do, lse, qp, kp, w, qd, kd, use_doc, scale, dq, dsum)
    if B * Tk * hkv * dh:
        grid = (math.ceil(Tk / ROWS), B * hkv)
        launch(_dkv_kernel(q.dtype), grid, ROWS, q, k, v, do, lse, dsum, qp, kp, w, qd, kd, use_doc, scale, dk, dv)
    return dq, dk, dv
