"""The embedding's backward on the GPU: a deterministic scatter-add of the token rows into the table's gradient
(SPEC §5 "Embedding"); reference: operators/embedding.py (embedding_backward, scatter.segment_sum).

    dE[v] = m · Σ_{t : tok_t = v} dx_t

The tokens are sorted stably where they are (CuPy / NumPy: argsort and searchsorted give each id's run
[offsets_v, offsets_{v+1}) of the sorted order); then one thread per table entry (v, j) adds its id's rows left to
right in token order and multiplies by m once. No atomics, so the sums are the reference's to the bit (np.add.at's
order) and the same on every run; adjacent threads read adjacent columns of a row. Every entry of the [V, d]
gradient is written, absent ids with 0. Reads dx once, the ids twice (sort), writes V·d values.
"""

from __future__ import annotations

import math

import numpy as np

from ._common import alloc, cuda, grid_stride, launch, namespace, per_dtype

__all__ = ["embedding_backward", "segment_sum"]


@per_dtype
def _segment_sum_kernel(ft):
    @cuda.jit
    def kernel(rows, order, offsets, scale, out):
        """Thread i ↦ (v, j) = (i // d, i % d), grid-stride:
            out[v, j] = scale · Σ_{r ∈ [offsets_v, offsets_{v+1})} rows[order_r, j], the sum from 0 in the order of r."""
        V, d = out.shape
        for i in range(cuda.grid(1), V * d, cuda.gridsize(1)):
            v = i // d
            j = i % d
            acc = ft(0.0)
            for r in range(offsets[v], offsets[v + 1]):
                acc += rows[order[r], j]
            out[v, j] = acc * scale
    return kernel


def segment_sum(ids, rows, num_segments: int, scale=1.0):
    """out[v] = scale · Σ_{i : ids_i = v} rows[i] for ids [n] in [0, num_segments) and rows [n, d] (CuPy arrays, or
    NumPy ones); each sum in the order of i, as reference scatter.segment_sum. Returns [num_segments, d] of rows'
    kind."""
    xp = namespace(ids)
    if xp is None or namespace(rows) is None:
        raise TypeError("segment_sum takes CuPy or NumPy arrays (the sort runs in their module)")
    n, d = rows.shape
    out = alloc((num_segments, d), rows.dtype, rows)
    if num_segments * d == 0:
        return out
    order = xp.argsort(ids, kind="stable")
    offsets = xp.searchsorted(ids[order], xp.arange(num_segments + 1, dtype=ids.dtype))
    launch(_segment_sum_kernel(rows.dtype), *grid_stride(num_segments * d), rows, order, offsets,
           rows.dtype.type(scale), out)
    return out


def embedding_backward(ctx, dx):
    """dE_emb[v] = m · Σ_{t: tok_t = v} dx⁰_t (SPEC §5 "Embedding"), as reference embedding_backward, whose ctx
    (tokens, V, m) it takes. The sum is rounded once to dx's dtype and multiplied by m rounded to it, as there."""
    tokens, vocab, multiplier = ctx
    d = dx.shape[-1]
    n = math.prod(tuple(tokens.shape))
    ids = tokens.reshape(n)
    if np.dtype(ids.dtype).kind not in "iu":
        raise TypeError(f"token ids must be integers, got {ids.dtype}")
    return segment_sum(ids, dx.reshape(n, d), vocab, float(multiplier))
