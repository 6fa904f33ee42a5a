"""Causal-LM cross-entropy with the z-loss fused in, chunked over the vocabulary, in numba (SPEC §4.10, §7, §5).

forward   per predicting row t (position t predicts labels[t+1]) one pass over the vocabulary in chunks of CHUNK
          logits with a running maximum m and sum l (the online log-sum-exp): lse_t = m + log l; the picked logit
          z_{t,y}. Then ce = (1/N) Σ (lse − z_y), z = λ (1/N) Σ lse² over counted rows. No probabilities are stored.
backward  each row of dlogits is written once: (exp(z − lse)·(1 + 2λ lse) − onehot(y)) / N on counted rows, 0
          elsewhere (and on the last position, which predicts nothing).
Sums over the vocabulary and over rows are accumulated in float64. ctx has the reference's layout
(logits, target, valid, lse, N, λ): the objective reads `valid` to count tokens.
"""

from __future__ import annotations

import numpy as np

from trinity.reference.operators.losses import IGNORE_INDEX, CrossEntropyCtx

from ._jit import kernel, run_tasks
from ._math import vexp

__all__ = ["cross_entropy_forward", "cross_entropy_backward", "CHUNK"]

CHUNK = 2048  # logits per step of the online log-sum-exp
ROWS = 16  # rows per task


@kernel
def _sum64(x, n):
    """Σ x[:n] in float64 with 8 interleaved partial sums (independent chains; fixed order, so deterministic)."""
    p = np.zeros(8, dtype=np.float64)
    i = 0
    while i + 8 <= n:
        for u in range(8):
            p[u] += x[i + u]
        i += 8
    total = 0.0
    while i < n:
        total += x[i]
        i += 1
    for u in range(8):
        total += p[u]
    return total


@kernel
def _forward_tasks(first, stride, n, z, target, lse, picked):
    """Rows of z [B·T, V]; target[r] < 0 marks a row that does not count (ignored label or last position).
    Per row, chunks of CHUNK logits: m_c = max of the chunk, exps into a chunk buffer, l ← l·e^{m−m'} + Σ."""
    R, V = z.shape
    buf = np.empty(CHUNK, dtype=z.dtype)
    for task in range(first, n, stride):
        for i in range(task * ROWS, min(R, (task + 1) * ROWS)):
            if target[i] < 0:
                lse[i] = 0.0
                picked[i] = 0.0
                continue
            row = z[i]
            m = -np.inf  # running maximum, float64 (a logit, so exact) …
            mz = row[0]  # … and the same value in z's dtype
            l = 0.0
            for c0 in range(0, V, CHUNK):
                c1 = min(V, c0 + CHUNK)
                cm = row[c0]
                for v in range(c0, c1):
                    cm = max(cm, row[v])
                if cm > m:
                    l *= np.exp(m - np.float64(cm))
                    m = np.float64(cm)
                    mz = cm
                for v in range(c0, c1):
                    buf[v - c0] = vexp(row[v] - mz)
                l += _sum64(buf, c1 - c0)
            lse[i] = m + np.log(l)
            picked[i] = row[target[i]]


@kernel
def _backward_tasks(first, stride, n, z, target, lse, lam, inv_n, dz):
    R, V = z.shape
    cast = np.empty(2, dtype=z.dtype)  # stores round float64 values to z's dtype
    for task in range(first, n, stride):
        for i in range(task * ROWS, min(R, (task + 1) * ROWS)):
            out = dz[i]
            if target[i] < 0:
                for v in range(V):
                    out[v] = 0.0
                continue
            row = z[i]
            # exp(z − lse) in z's dtype: lse is split into a part representable in the dtype and a remainder,
            # folded into the coefficient, so nothing is lost to rounding lse.
            li = lse[i]
            cast[0] = li
            lz = cast[0]
            cast[1] = (1.0 + 2.0 * lam * li) * inv_n * np.exp(np.float64(lz) - li)
            cz = cast[1]
            for v in range(V):
                out[v] = vexp(row[v] - lz) * cz
            out[target[i]] = np.float64(out[target[i]]) - inv_n


def _row_targets(target, valid, T):
    """int64 [B·T]: the label each row of logits predicts, −1 where it does not count (ignored, or t = T − 1 with
    the shift)."""
    B, P = target.shape
    out = np.full((B, T), -1, dtype=np.int64)
    out[:, :P] = np.where(valid, target, -1)
    return out.reshape(-1)


def cross_entropy_forward(logits, labels, z_loss_coeff=0.0, *, shift=True, denom=None):
    """(ce, z, ctx) with the reference's semantics: labels shifted inside (unless shift=False: already aligned),
    −100 ignored, mean over counted tokens (or sums over `denom`); both 0 when no token counts (SPEC §4.10, §7,
    §14 #17). ctx's lse is kept in float64."""
    labels = np.asarray(labels)
    if labels.shape != logits.shape[:-1] or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array shaped like tokens {logits.shape[:-1]}, "
                         f"got dtype {labels.dtype} shape {labels.shape}")
    B, T, V = logits.shape
    target = labels[:, 1:] if shift else labels
    valid = target != IGNORE_INDEX
    if np.any(valid & ((target < 0) | (target >= V))):
        raise ValueError(f"labels must be token ids in [0, {V}) or {IGNORE_INDEX}")
    safe_target = np.where(valid, target, 0)
    logits = np.ascontiguousarray(logits)
    lse = np.empty(B * T, dtype=np.float64)
    picked = np.empty(B * T, dtype=np.float64)
    run_tasks(_forward_tasks, -(-(B * T) // ROWS), logits.reshape(B * T, V), _row_targets(target, valid, T), lse,
              picked)
    n = int(valid.sum())
    denom = max(n, 1) if denom is None else denom
    lse = lse.reshape(B, T)[:, :target.shape[1]]
    ce = float((lse.sum() - picked.sum()) / denom)  # rows that do not count hold 0 in both
    zl = float(z_loss_coeff * np.square(lse).sum() / denom)
    return ce, zl, CrossEntropyCtx(logits, safe_target, valid, lse, denom, z_loss_coeff)


def cross_entropy_backward(ctx, scale=1.0):
    """dlogits = (softmax·(1 + 2λ lse) − onehot(y)) · scale / N on counted positions, 0 elsewhere (SPEC §5)."""
    logits, target, valid, lse, denom, lam = ctx
    B, T, V = logits.shape
    dlogits = np.empty_like(logits)
    lse_rows = np.zeros((B, T), dtype=np.float64)
    lse_rows[:, :lse.shape[1]] = lse
    run_tasks(_backward_tasks, -(-(B * T) // ROWS), logits.reshape(B * T, V), _row_targets(target, valid, T),
              lse_rows.reshape(-1), float(lam), float(scale / denom), dlogits.reshape(B * T, V))
    return dlogits
