"""Counts and scatter-adds from functions of the Array API standard, which has neither `bincount` nor `add.at`.

Both are formulated by sorting: a stable sort puts the entries of each id together, in their original order, and
a binary search of the sorted ids for every id v gives where its run starts, so

    offsets_v = #{i : ids_i < v} = searchsorted(sort(ids), v),      n_v = offsets_{v+1} − offsets_v.

`segment_sum` then adds each id's rows left to right, in their original order: the additions np.add.at makes, so
the sums are the same to the bit.
"""

from __future__ import annotations

from .array_module import array_namespace

__all__ = ["bincount", "run_offsets", "segment_sum"]


def run_offsets(sorted_ids, length: int):
    """offsets [length + 1]: the run of id v in the sorted 1-D `sorted_ids` is [offsets_v, offsets_{v+1})."""
    xp = array_namespace(sorted_ids)
    return xp.searchsorted(sorted_ids, xp.arange(length + 1, dtype=sorted_ids.dtype))


def bincount(ids, length: int):
    """n_v = #{i : ids_i = v} for v in [0, length), ids an integer array of any shape with values in that range."""
    xp = array_namespace(ids)
    offsets = run_offsets(xp.sort(xp.reshape(ids, (-1,))), length)
    return offsets[1:] - offsets[:-1]


def segment_sum(ids, rows, num_segments: int):
    """out[v] = Σ_{i : ids_i = v} rows[i] for ids [n] in [0, num_segments) and rows [n, d]; out [num_segments, d],
    zero for an id that does not occur. Each sum runs left to right in the order of i.

    With the rows sorted stably by id, id v's rows are rows_sorted[o_v + r] for r < n_v (o, n: see the module
    docstring). Ordering the ids by n_v, largest first, the ids with more than r rows are a prefix of that order,
    so step r of a loop over r < max_v n_v adds the r-th row of each of them in one gather: total work O(n·d), in
    max_v n_v steps. The sums are finally gathered into id order, absent ids reading a zero row.
    """
    xp = array_namespace(rows)
    d = rows.shape[-1]
    order = xp.argsort(ids, stable=True)
    rows_sorted = xp.take(rows, order, axis=0)
    offsets = run_offsets(xp.take(ids, order), num_segments)
    counts = offsets[1:] - offsets[:-1]
    by_count = xp.argsort(-counts, stable=True)  # ids, most rows first
    starts = xp.take(offsets[:-1], by_count)
    counts_desc = xp.take(counts, by_count)
    # more[r] = #{v : n_v > r}: how many ids take part in step r
    depth = int(xp.max(counts)) if num_segments else 0
    more = num_segments - xp.searchsorted(xp.flip(counts_desc), xp.arange(depth, dtype=counts.dtype), side="right")
    present = int(more[0]) if depth else 0
    sums = xp.zeros((present, d), dtype=rows.dtype)
    for r in range(depth):
        k = int(more[r])
        sums[:k, ...] = sums[:k, ...] + xp.take(rows_sorted, starts[:k] + r, axis=0)
    # id v sits at rank[v] in by_count; ids ranked past the present ones read the zero row appended at `present`
    rank = xp.argsort(by_count)
    padded = xp.concat([sums, xp.zeros((1, d), dtype=rows.dtype)], axis=0)
    return xp.take(padded, xp.where(rank < present, rank, present), axis=0)
