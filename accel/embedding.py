"""Embedding backward in numba: the scatter-add dE[v] += m·dx⁰_t (SPEC §5 "Embedding").

One serial pass over the tokens in order (np.add.at does the same sums but is slow); the forward is the
reference's gather (a NumPy fancy index is already one pass).
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel

__all__ = ["embedding_backward"]


@kernel
def _scatter_add(tokens, dx, out):
    for t in range(tokens.shape[0]):
        v = tokens[t]
        for j in range(dx.shape[1]):
            out[v, j] += dx[t, j]


def embedding_backward(ctx, dx):
    """dE_emb[v] = m · Σ_{t: tok_t = v} dx⁰_t; repeated tokens accumulate (SPEC §5)."""
    tokens, vocab, multiplier = ctx
    d = dx.shape[-1]
    dtable = np.zeros((vocab, d), dtype=dx.dtype)
    _scatter_add(np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1), np.ascontiguousarray(dx).reshape(-1, d),
                 dtable)
    if multiplier != 1.0:
        dtable *= np.asarray(multiplier, dtype=dx.dtype)
    return dtable
