"""Context parallel: the key/value gathering seam and the per-sequence sums over `cp` (SPEC §4.4-§4.6, §6.3).

Each sequence of T tokens is cut into 2·cp chunks of c = T/(2·cp); cp rank r holds chunks r and 2·cp−1−r (its
queries, keys and values, in that order: Tl = 2c rows), so every rank does the same causal work. cp = 3:

    position  0 ·········································· T
    chunk     | 0  | 1  | 2  | 3  | 4  | 5  |
    rank      | r0 | r1 | r2 | r2 | r1 | r0 |        rank r: [chunk r | chunk 2cp−1−r]

Global layer (window None; cp_exchange "all", the default): one Allgather over cp of every rank's k and v (packed
[2, B, Tl, h_kv, d_h]; the doc ids in a second, small Allgather), reordered by position: k_all is the whole
sequence, k_pos = 0…T−1. Every rank gets every chunk, also the late chunks its causal queries never see (an
Allgather sends equal blocks; the attention core skips keys past a block's last query, so they cost bytes, not
work). Backward: each rank lays out its dk_all (and dv_all) by owner, [cp, 2, B, Tl, h_kv, d_h], and a
Reduce_scatter_block hands rank r the sum of every rank's gradients of its own rows.

Global layer under cp_exchange "read" (options.py): rank r's last query is in chunk 2·cp−1−r, so it reads only
chunks 0 … 2·cp−1−r (plan.chunks_read; k_pos = 0 … (2·cp−r)·c−1). Rank r sends its first chunk to every other rank
and its second to the ranks before it (plan.chunks_sent), in one Alltoallv of byte blocks, each chunk's k and v
followed by its doc ids (no second call for them: the doc ids, the same in every layer, still travel with each
layer's keys, B·c·8 bytes a chunk beside its 2·B·c·h_kv·d_h·q_a, so each layer's exchange stands alone); backward,
one Alltoallv returns to each rank the gradients of the chunks it sent, and each rank sums its chunks' gradients in
rank order. cp = 3:

    rank  holds  reads         sends forward            sends back (gradients of)
    r0    0, 5   0 1 2 3 4 5   0 → r1, r2               1, 4 → r1; 2, 3 → r2
    r1    1, 4   0 1 2 3 4     1 → r0, r2; 4 → r0       0 → r0; 2, 3 → r2
    r2    2, 3   0 1 2 3       2, 3 → r0, r1            0 → r0; 1 → r1

per rank and layer cp−1+r chunks forward and 2·cp−2−r back: 3·(cp−1) in all on every rank, a quarter less than the
Allgather's and the Reduce_scatter_block's 4·(cp−1) (schedule.py has the bytes).

Sliding layer (window w, halo h = w−1 ≤ c, layout rule 4): a chunk's queries need only the h keys before it, which
lie in the preceding chunk. Chunk r−1 is rank r−1's first chunk; chunk 2cp−r (before 2cp−1−r) is rank r+1's second:

    rank r  sends   tail(first chunk)  → r+1          receives  halo₁ ← r−1  (tail of chunk r−1)
                    tail(second chunk) → r−1                    halo₂ ← r+1  (tail of chunk 2cp−r)
    k_all = [halo₁ | chunk r | halo₂ | chunk 2cp−1−r]          (h + c + h + c rows, positions increasing)

Rank 0 has no halo₁ (chunk 0 starts the sequence); rank cp−1's chunks cp−1, cp are adjacent, so it has no halo₂
(its first chunk is that halo: no position twice). One Alltoallv with neighbours only (k and v packed, h rows per
chunk; doc ids in their own Alltoallv); backward sends the halos' gradients back the same way and adds them to the
tails. w = 1 needs no keys but the queries' own. With cp = 1 every method is the single-process identity.

With a device table the exchange runs on host copies (staging.py: k, v and doc ids copied to the host, the NumPy code
above with its collectives, the keys, values, positions and doc ids a rank attends to copied back; the backward
likewise): the chunks are cut and packed as bytes of NumPy arrays. Counted as staged copies; the queries' positions
are the mesh's copy in the table's module (Mesh.local_positions).
"""

from __future__ import annotations

import numpy as np

from trinity.accel.device import is_host_array
from trinity.reference.model.seams import SingleProcessSeams
from trinity.reference.operators.array_module import array_namespace

from .layout import gathers_whole_sequence, window_problem
from .plan import chunk_positions, chunks_read, chunks_sent
from .staging import device_copy, host_copy

__all__ = ["ContextParallelSeams"]


def _same(a, b) -> bool:
    """Whether two device arrays of positions are equal: the same array (the mesh's copy), else compared there."""
    return a is b or (a.shape == b.shape and bool(array_namespace(a).all(a == b)))


class ContextParallelSeams:
    """The cp seams of an op table: `self.mesh` (mesh.Mesh) holds the cp group."""

    def _cp(self):
        return self.mesh.group_size["cp"], self.mesh.group_rank["cp"]

    # ---- key/value gathering ------------------------------------------------------------------------------------
    def gather_kv(self, k, v, positions, doc_ids, window):
        """(k_all, v_all [B, S, h_kv, d_h], k_pos [S] strictly increasing, k_doc [B, S] or None, ctx) for the
        queries at `positions` (this rank's two chunks, mesh.local_positions): the whole sequence for a global
        layer, the rank's chunks with the w−1 keys before each for a sliding one (module docstring)."""
        n, r = self._cp()
        if n == 1:
            return SingleProcessSeams.gather_kv(self, k, v, positions, doc_ids, window)
        B, Tl = k.shape[:2]
        c = Tl // 2
        xp = array_namespace(k)
        mine = self.mesh.local_positions(2 * n * c) if Tl % 2 == 0 else None
        same = (np.array_equal(positions, mine) if xp is np else
                _same(positions, self.mesh.local_positions(2 * n * c, xp))) if mine is not None else False
        if not same:
            raise ValueError(f"gather_kv: positions must be this cp rank's two chunks (mesh.local_positions), got "
                             f"{positions.shape[0]} positions")
        if not is_host_array(k):  # a device table's: exchanged on host copies (module docstring)
            if window == 1 and not gathers_whole_sequence(window, 2 * n * c):  # no key but the queries' own
                return k, v, positions, doc_ids, ("local",)
            k_all, v_all, k_pos, k_doc, ctx = self._gather_kv(host_copy(k), host_copy(v), mine, None if doc_ids is None
                                                              else host_copy(doc_ids), window, n, r, c)
            return (device_copy(k_all, xp), device_copy(v_all, xp), device_copy(k_pos, xp),
                    None if k_doc is None else device_copy(k_doc, xp), ctx)
        return self._gather_kv(k, v, positions, doc_ids, window, n, r, c)

    def _gather_kv(self, k, v, positions, doc_ids, window, n, r, c):
        """gather_kv on NumPy arrays."""
        if gathers_whole_sequence(window, 2 * n * c):  # a window covering the sequence is causal attention
            if self.mesh.layout.options.cp_exchange == "read":
                return self._exchange_read(k, v, doc_ids, n, r, c)
            return self._gather_all(k, v, doc_ids, n, c)
        problem = window_problem(window, 2 * n * c, n)
        if problem:
            raise ValueError(f"gather_kv: {problem} (layout rule 4)")
        h = window - 1
        if h == 0:
            return k, v, positions, doc_ids, ("local",)
        first, second = r > 0, r < n - 1  # which halos this rank receives
        kv = np.stack([k, v])  # [2, B, Tl, h_kv, d_h]
        halo1, halo2 = self._swap(kv[:, :, 2 * c - h:], kv[:, :, c - h:c], r, n)
        doc1 = doc2 = None
        if doc_ids is not None:
            doc1, doc2 = self._swap(doc_ids[:, 2 * c - h:], doc_ids[:, c - h:c], r, n)
        lo1, lo2 = positions[0] - h, positions[c] - h  # the halos' first positions
        segments = [(halo1, doc1, np.arange(lo1, lo1 + h)) if first else None,
                    (kv[:, :, :c], None if doc_ids is None else doc_ids[:, :c], positions[:c]),
                    (halo2, doc2, np.arange(lo2, lo2 + h)) if second else None,
                    (kv[:, :, c:], None if doc_ids is None else doc_ids[:, c:], positions[c:])]
        segments = [s for s in segments if s is not None]
        kv_all = np.concatenate([s[0] for s in segments], axis=2)
        k_pos = np.concatenate([s[2] for s in segments])
        k_doc = None if doc_ids is None else np.concatenate([s[1] for s in segments], axis=1)
        return kv_all[0], kv_all[1], k_pos, k_doc, ("halo", first, second, c, h)

    def gather_kv_backward(self, ctx, dk_all, dv_all):
        """(dk, dv) of this rank's own rows [B, Tl, h_kv, d_h]: its own gradients of them plus those the other
        ranks computed for them (the transpose of gather_kv)."""
        if ctx is None or ctx[0] == "local":
            return dk_all, dv_all
        if not is_host_array(dk_all):  # a device table's: exchanged on host copies (module docstring)
            xp = array_namespace(dk_all)
            dk, dv = self._gather_kv_backward(ctx, host_copy(dk_all), host_copy(dv_all))
            return device_copy(dk, xp), device_copy(dv, xp)
        return self._gather_kv_backward(ctx, dk_all, dv_all)

    def _gather_kv_backward(self, ctx, dk_all, dv_all):
        """gather_kv_backward on NumPy arrays."""
        n, r = self._cp()
        dkv = np.stack([dk_all, dv_all])  # [2, B, S, h_kv, d_h]
        if ctx[0] == "all":
            _, local_rows, c = ctx  # local_rows [n, Tl]: the positions of each rank's rows
            by_owner = dkv[:, :, local_rows.reshape(-1)].reshape(dkv.shape[:2] + local_rows.shape + dkv.shape[3:])
            send = np.ascontiguousarray(by_owner.transpose(2, 0, 1, 3, 4, 5))  # [n, 2, B, Tl, h_kv, d_h]
            mine = np.empty(send.shape[1:], dtype=send.dtype)
            self.mesh.collective("Reduce_scatter_block", "cp", send, mine)
            return mine[0], mine[1]
        if ctx[0] == "read":
            return self._return_read(dkv, ctx[1], n, r)
        _, first, second, c, h = ctx
        o = h if first else 0  # where the first chunk starts in k_all
        own = np.concatenate([dkv[:, :, o:o + c], dkv[:, :, o + c + (h if second else 0):]], axis=2)
        halo1 = dkv[:, :, :h] if first else None
        halo2 = dkv[:, :, o + c:o + c + h] if second else None
        tail2, tail1 = self._swap(halo1, halo2, r, n)  # ← r−1: my second chunk's tail, ← r+1: my first's
        if tail1 is not None:
            own[:, :, c - h:c] += tail1
        if tail2 is not None:
            own[:, :, 2 * c - h:] += tail2
        return own[0], own[1]

    def _gather_all(self, k, v, doc_ids, n, c):
        """Every rank's chunks, by position (global layers)."""
        kv = np.ascontiguousarray(np.stack([k, v]))  # [2, B, Tl, h_kv, d_h]
        recv = np.empty((n,) + kv.shape, dtype=kv.dtype)
        self.mesh.collective("Allgather", "cp", kv, recv)
        local_rows = np.stack([chunk_positions(j, n, 2 * n * c) for j in range(n)])  # [n, Tl]
        order = np.argsort(local_rows.reshape(-1))  # row of the gathered ranks' rows holding position p
        kv_all = recv.transpose(1, 2, 0, 3, 4, 5).reshape(kv.shape[:2] + (n * 2 * c,) + kv.shape[3:])[:, :, order]
        k_doc = None
        if doc_ids is not None:
            docs = np.ascontiguousarray(doc_ids)
            all_docs = np.empty((n,) + docs.shape, dtype=docs.dtype)
            self.mesh.collective("Allgather", "cp", docs, all_docs)
            k_doc = all_docs.transpose(1, 0, 2).reshape(docs.shape[0], -1)[:, order]
        return kv_all[0], kv_all[1], np.arange(2 * n * c), k_doc, ("all", local_rows, c)

    def _exchange_read(self, k, v, doc_ids, n, r, c):
        """The chunks this rank's queries read (plan.chunks_read, cp_exchange "read"), by position: one Alltoallv of
        byte blocks, to rank j the chunks of this rank that j reads, each chunk's k and v followed by its doc ids."""
        kv = np.stack([k, v])  # [2, B, Tl, h_kv, d_h]
        mine = [[kv[:, :, i * c:(i + 1) * c]] + ([] if doc_ids is None else [doc_ids[:, i * c:(i + 1) * c]])
                for i in (0, 1)]  # this rank's chunk i: its k, v and doc ids
        shapes = [(x.shape, x.dtype) for x in mine[0]]
        sizes = [int(np.prod(shape)) * dtype.itemsize for shape, dtype in shapes]
        blocks = {j: [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for i in chunks_sent(r, j, n, "read")
                      for x in mine[i]] for j in range(n) if j != r}
        got = self._cp_alltoallv(blocks, sum(sizes), [len(chunks_sent(j, r, n, "read")) for j in range(n)], np.uint8)
        read = chunks_read(r, n, "read")
        kv_all = np.empty(kv.shape[:2] + (len(read) * c,) + kv.shape[3:], dtype=kv.dtype)
        k_doc = None if doc_ids is None else np.empty((doc_ids.shape[0], len(read) * c), dtype=doc_ids.dtype)
        for j, i, unit in self._cp_by_owner(mine, got, r, lambda j: chunks_sent(j, r, n, "read")):
            if j != r:
                unit = [b.view(dtype).reshape(shape) for b, (shape, dtype) in
                        zip(np.split(unit, np.cumsum(sizes)[:-1]), shapes)]
            lo = read.index((j, 2 * n - 1 - j)[i]) * c
            kv_all[:, :, lo:lo + c] = unit[0]
            if k_doc is not None:
                k_doc[:, lo:lo + c] = unit[1]
        return kv_all[0], kv_all[1], np.arange(len(read) * c), k_doc, ("read", c)

    def _return_read(self, dkv, c, n, r):
        """gather_kv_backward of `_exchange_read`: to each rank j the gradients of the chunks j sent this rank (one
        Alltoallv), and this rank's chunks summed over the ranks that read them, in rank order."""
        read = chunks_read(r, n, "read")

        def rows(j, i):  # the gradients in dkv of rank j's chunk i (0: chunk j, 1: chunk 2·cp−1−j)
            lo = read.index((j, 2 * n - 1 - j)[i]) * c
            return dkv[:, :, lo:lo + c]

        shape = rows(r, 0).shape
        blocks = {j: [np.ascontiguousarray(rows(j, i)).reshape(-1) for i in chunks_sent(j, r, n, "read")]
                  for j in range(n) if j != r}
        got = self._cp_alltoallv(blocks, int(np.prod(shape)), [len(chunks_sent(r, j, n, "read")) for j in range(n)],
                              dkv.dtype)
        own = np.zeros(shape[:2] + (2 * c,) + shape[3:], dtype=dkv.dtype)
        for j, i, part in self._cp_by_owner([rows(r, 0), rows(r, 1)], got, r, lambda j: chunks_sent(r, j, n, "read")):
            own[:, :, i * c:(i + 1) * c] += part.reshape(shape)
        return own[0], own[1]

    def _cp_alltoallv(self, blocks, unit, units, dtype):
        """One Alltoallv over cp: `blocks[j]` (flat arrays of `dtype`, laid end to end) to rank j; from rank j come
        units[j] units of `unit` elements. Returns {j: [its units]}."""
        n = len(units)
        send_counts = [sum(b.size for b in blocks.get(j, [])) for j in range(n)]
        recv_counts = [units[j] * unit if j in blocks else 0 for j in range(n)]
        send = np.concatenate([b for j in sorted(blocks) for b in blocks[j]])
        recv = np.empty(sum(recv_counts), dtype=dtype)
        send_displs, recv_displs = (np.concatenate([[0], np.cumsum(x)[:-1]]).astype(np.int64).tolist()
                                    for x in (send_counts, recv_counts))
        self.mesh.collective("Alltoallv", "cp", [send, (send_counts, send_displs)], [recv, (recv_counts, recv_displs)],
                             sent_bytes=int(send.nbytes))
        return {j: [recv[recv_displs[j] + u * unit:recv_displs[j] + (u + 1) * unit] for u in range(units[j])]
                for j in blocks}

    @staticmethod
    def _cp_by_owner(mine, got, r, which):
        """(owner j, its chunk i, the unit) over the ranks in order: this rank's own two chunks `mine` at j = r, the
        units `got[j]` of rank j's chunks which(j) otherwise."""
        for j in range(len(got) + 1):
            yield from ((j, i, unit) for i, unit in (enumerate(mine) if j == r else zip(which(j), got[j])))

    def _swap(self, to_prev, to_next, r, n):
        """One Alltoallv with the neighbouring cp ranks: `to_prev` goes to rank r−1, `to_next` to r+1 (None or
        ignored where there is no such rank); returns (from r−1, from r+1), shaped like what was sent (every rank
        sends its neighbours blocks of the same shape)."""
        blocks = {j: np.ascontiguousarray(x) for j, x in ((r - 1, to_prev), (r + 1, to_next)) if 0 <= j < n}
        counts = [blocks[j].size if j in blocks else 0 for j in range(n)]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
        send = np.concatenate([blocks[j].reshape(-1) for j in sorted(blocks)])
        recv = np.empty_like(send)
        self.mesh.collective("Alltoallv", "cp", [send, (counts, displs)], [recv, (counts, displs)],
                             sent_bytes=int(send.nbytes))
        got = {j: recv[displs[j]:displs[j] + counts[j]].reshape(blocks[j].shape) for j in blocks}
        return got.get(r - 1), got.get(r + 1)

    # ---- per-sequence sums --------------------------------------------------------------------------------------
    def sequence_sum(self, x):
        """Σ of x over the cp group (the ranks holding the other chunks of the same sequences), in x's dtype."""
        if self._cp()[0] == 1:
            return x
        if not is_host_array(x):  # a device array: summed through the mesh's staged all-reduce
            summed = self.mesh.sum(x, "cp")
            return summed if summed.dtype == x.dtype else array_namespace(x).astype(summed, x.dtype)
        return np.asarray(self.mesh.sum(x, "cp"), dtype=np.asarray(x).dtype)
