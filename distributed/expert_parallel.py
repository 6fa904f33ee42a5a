"""Expert parallel: the routed experts of a MoE layer partitioned over the `ep` ranks, entered through the token
dispatch/combine seams (reference/model/seams.py, SPEC §4.9).

E experts, ep ranks, E_l = E/ep local experts: ep rank r owns experts [r·E_l, (r+1)·E_l) and holds only their
weights (params' experts.* are [E_l, …]). Every rank routes its own N tokens; the dispatch plan groups its N·K rows
by expert, so the rows bound for ep rank j are one contiguous block of x[plan.token]:

    rank r's rows (plan order):  | experts of rank 0 | experts of rank 1 | … | experts of rank ep−1 |
                                   c_r[0·E_l : 1·E_l]  c_r[1·E_l : 2·E_l]       c_r[e] = plan.counts[e] on rank r

Dispatch is two exchanges over the ep group:

    Alltoall   send[j, e] = c_r[j·E_l + e]           → recv[s, e] = rows rank s sends for local expert e  (int64)
    Alltoallv  send block j = rows for rank j's experts (Σ_e send[j, e] rows) → recv block s = rows from rank s
               (counts and displacements in elements: rows·d)

Rank r then receives (source, local expert, source's order) and regroups to (local expert, source, source's
order), so that each local expert's rows are one contiguous block, as experts_forward wants:

    received:  | s=0: e0 e1 … | s=1: e0 e1 … | …        x_local[pos[i]] = received[i]
    x_local:   | e0: s=0 s=1 … | e1: s=0 s=1 … | …      offsets_local = [0, cumsum_e Σ_s recv[s, e]]

The other three seams reuse the counts and `pos` of the dispatch (no second Alltoall):

    expert_combine            y_local[pos] → Alltoallv with the counts swapped → y rows in plan order [N·K, d]
    expert_combine_backward   dy rows in plan order → the dispatch's Alltoallv → dy_local = regroup (x_local order)
    expert_dispatch_backward  dx_local[pos] → the combine's Alltoallv → dx rows in plan order (then
                              scatter_to_tokens sums each token's K rows)

Each rank sends its rows for its own experts to itself through the same Alltoallv; only rows leaving the rank are
counted (`sent_bytes`). A rank with no tokens, or whose experts get none, takes part with empty blocks. With ep = 1
every seam is the single-process identity and no collective is called.

With a device table the rows stay on the device (the mesh stages the Alltoallv's buffers through the host); the
counts are control data: they come to the host (staging.host_copy) to size the exchange, and the regrouping order
and the local offsets derived from them go back (staging.device_copy), once per dispatch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from trinity.reference.model.seams import SingleProcessSeams
from trinity.reference.operators.array_module import array_namespace, itemsize

from .staging import device_copy, host_copy

__all__ = ["ExpertParallelSeams", "ExchangeCtx"]


class ExchangeCtx(NamedTuple):
    """What the combine and both backwards need from a dispatch under expert parallel."""
    plan: object  # the Dispatch plan of this rank's tokens
    num_tokens: int  # N (the single-process ctx carries it too)
    send_rows: np.ndarray  # [ep] rows this rank sends to each ep rank (its plan's blocks)
    recv_rows: np.ndarray  # [ep] rows this rank receives from each ep rank
    pos: np.ndarray  # [M] received row i (source-major order) is x_local[pos[i]] (local-expert-major order)
    ep_rank: int
    to_plan: object  # pos in the rows' module: x_local rows in received order = take(x_local, to_plan)
    to_experts: object  # its inverse: x_local = take(received, to_experts)


def _starts(counts):
    """Exclusive prefix sums: where each block begins when blocks of `counts` lie end to end."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


class ExpertParallelSeams:
    """The token dispatch/combine seams over the mesh's ep group. Mixed into an op table that has `self.mesh`
    (distributed.mesh.Mesh) and `self.base` (the backend's table)."""

    # ---- the four seams -----------------------------------------------------------------------------------------
    def expert_dispatch(self, x, plan):
        """(x_local [M, d] grouped by local expert, offsets_local [E_l+1], ctx): this rank's rows x[plan.token]
        sent to the ranks owning their experts, the rows of this rank's experts received from every ep rank."""
        ep = self.mesh.sizes["ep"]
        if ep == 1:
            return SingleProcessSeams.expert_dispatch(self, x, plan)
        E = plan.counts.size
        if E % ep:
            raise ValueError(f"{E} experts do not split over ep = {ep} ranks")
        El, d = E // ep, x.shape[1]
        xp = array_namespace(x)
        counts = np.ascontiguousarray(host_copy(plan.counts), dtype=np.int64).reshape(ep, El)  # [dest, local expert]
        recv_counts = np.empty_like(counts)  # [source, local expert]
        self.mesh.collective("Alltoall", "ep", counts, recv_counts)
        send_rows, recv_rows = counts.sum(axis=1), recv_counts.sum(axis=1)
        # regroup (source, expert) blocks into (expert, source) blocks: block b = s·E_l + e of the received rows
        # starts at src[b] and moves to dst[b]
        src = _starts(recv_counts.reshape(-1))
        dst = _starts(recv_counts.T.reshape(-1)).reshape(El, ep).T.reshape(-1)
        block = np.repeat(np.arange(ep * El), recv_counts.reshape(-1))
        pos = np.arange(block.size, dtype=np.int64) - src[block] + dst[block]
        inverse = np.empty_like(pos)
        inverse[pos] = np.arange(pos.size, dtype=np.int64)
        ctx = ExchangeCtx(plan, x.shape[0], send_rows, recv_rows, pos, self.mesh.ep_rank, device_copy(pos, xp),
                          device_copy(inverse, xp))
        x_local = self._to_experts(ctx, xp.take(x, plan.token, axis=0), d)
        offsets_local = np.concatenate([[0], np.cumsum(recv_counts.sum(axis=0))])
        if xp is np:
            return x_local, offsets_local.astype(plan.offsets.dtype), ctx
        return x_local, xp.astype(device_copy(offsets_local, xp), plan.offsets.dtype), ctx

    def expert_combine(self, ctx, y_local):
        """The experts' outputs y_local [M, d] (x_local's order) back on the ranks that sent the rows, in this
        rank's plan order [N·K, d]."""
        if self.mesh.sizes["ep"] == 1:
            return SingleProcessSeams.expert_combine(self, ctx, y_local)
        return self._to_plan(ctx, y_local)

    def expert_combine_backward(self, ctx, dy_rows):
        """dy of this rank's rows in plan order [N·K, d] → dy of the rows at the experts' ranks (x_local's order)."""
        if self.mesh.sizes["ep"] == 1:
            return SingleProcessSeams.expert_combine_backward(self, ctx, dy_rows)
        return self._to_experts(ctx, dy_rows, dy_rows.shape[1])

    def expert_dispatch_backward(self, ctx, dx_local):
        """dx of the rows at the experts' ranks (x_local's order) → dx of this rank's rows in plan order [N·K, d]."""
        if self.mesh.sizes["ep"] == 1:
            return SingleProcessSeams.expert_dispatch_backward(self, ctx, dx_local)
        return self._to_plan(ctx, dx_local)

    # ---- the two exchanges --------------------------------------------------------------------------------------
    def _to_experts(self, ctx, rows, d):
        """Rows in plan order (block j → ep rank j) → the rows of this rank's experts, local-expert-major."""
        received = self._alltoallv(rows, ctx.send_rows, ctx.recv_rows, d, ctx.ep_rank)
        return array_namespace(received).take(received, ctx.to_experts, axis=0)

    def _to_plan(self, ctx, rows_local):
        """Rows in x_local's order → back to the ranks they came from, in each rank's plan order."""
        d = rows_local.shape[1]
        rows = array_namespace(rows_local).take(rows_local, ctx.to_plan, axis=0)
        return self._alltoallv(rows, ctx.recv_rows, ctx.send_rows, d, ctx.ep_rank)

    def _alltoallv(self, rows, send_rows, recv_rows, d, me):
        """Alltoallv of row blocks: block j of `rows` (send_rows[j] rows of d) to ep rank j; returns the received
        blocks end to end [Σ recv_rows, d]. Counts and displacements in elements; the dtype is the rows'."""
        xp = array_namespace(rows)
        send = xp.reshape(np.ascontiguousarray(rows) if xp is np else rows, (-1, d))
        recv = xp.empty((int(recv_rows.sum()), d), dtype=send.dtype)
        sc, rc = send_rows * d, recv_rows * d
        leaving = int(send_rows.sum() - send_rows[me]) * d * itemsize(send)
        self.mesh.collective("Alltoallv", "ep", [send, (sc, _starts(sc))], [recv, (rc, _starts(rc))],
                             sent_bytes=leaving)
        return recv
