"""Analysis of recorded values: summary statistics of a tensor and the entropy of attention distributions."""

from __future__ import annotations

import numpy as np

__all__ = ["tensor_stats", "attention_entropy"]


# ---- analysis -----------------------------------------------------------------------------------------------------
def tensor_stats(x) -> dict:
    """shape, dtype, rms, min, max (float64) and the count of non-finite entries of an array."""
    a = np.asarray(x)
    out = {"shape": tuple(a.shape), "dtype": str(a.dtype)}
    if a.size == 0 or a.dtype.kind not in "biuf":
        return {**out, "rms": float("nan"), "min": float("nan"), "max": float("nan"), "nonfinite": 0}
    a64 = a.astype(np.float64, copy=False)
    finite = np.isfinite(a64)
    bad = int(a64.size - finite.sum())
    v = a64[finite] if bad else a64
    if v.size == 0:
        return {**out, "rms": float("nan"), "min": float("nan"), "max": float("nan"), "nonfinite": bad}
    return {**out, "rms": float(np.sqrt(np.mean(v * v))), "min": float(v.min()), "max": float(v.max()),
            "nonfinite": bad}


def attention_entropy(q, k, window=None, doc_ids=None, q_pos=None, k_pos=None) -> np.ndarray:
    """Entropy (nats) of each query's attention distribution, [B, h_q, Tq], from the sdpa inputs q [B, Tq, h_q, d_h]
    and k [B, Tk, h_kv, d_h] (after QK-norm and RoPE): the full masked softmax of SPEC §4.4 step 5 with the mask of
    §4.6, one head at a time (global layers need every earlier key; fine at inspection lengths)."""
    from ..operators.attention import allowed, positions_and_docs

    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, Tq, hq, dh = q.shape
    Tk, hkv = k.shape[1], k.shape[2]
    r = hq // hkv
    q_pos, k_pos, q_doc, k_doc = positions_and_docs(Tq, Tk, q_pos, k_pos, doc_ids)
    mask = allowed(q_pos, k_pos, window, None if q_doc is None else np.asarray(q_doc),
                   None if k_doc is None else np.asarray(k_doc))
    if mask.ndim == 2:
        mask = np.broadcast_to(mask, (B, Tq, Tk))
    out = np.zeros((B, hq, Tq))
    for h in range(hq):
        s = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // r]) * dh ** -0.5
        s = np.where(mask, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        p = np.exp(s - m)
        z = p.sum(axis=-1, keepdims=True)
        p = p / np.where(z > 0, z, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, h] = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    return out
