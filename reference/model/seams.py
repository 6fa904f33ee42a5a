"""The three seams where parallelism enters the model, as they are in one process: identities (SPEC §4.4, §4.9).

The model (layers.py, model.py) calls these through its op table, like the leaf operators. Every op table inherits
these single-process versions; trinity.distributed replaces them with collectives around the same model code:

  parameter gather (FSDP)       gather_params(params, bucket) → the bucket's full arrays, just before use;
                                release_params(bucket) after use; end_forward() after a forward that no backward
                                follows (evaluation); hand_back_grads(bucket, grads[, into]) → what the step
                                keeps of the bucket's gradients (under FSDP: this rank's reduce-scattered shard);
                                end_gradients(grads, mesh) after a step's micro-batches → its summed gradients
                                (the sum over dp_replicate; FSDP finishes its deferred reductions there).
                                Buckets (params.param_buckets): "embed", each layer number, "head".
  token dispatch (EP)           expert_dispatch(x, plan) → (rows for this rank's experts, their offsets, ctx):
                                x[plan.token] here, an all-to-all under expert parallel; expert_combine(y, ctx)
                                brings the expert outputs back in plan order; both have backwards (the reverse
                                exchanges).
  key/value gathering (CP)      gather_kv(k, v, positions, doc_ids, window) → (keys, values, their positions, their
                                document ids, ctx): the local keys here, the other ranks' chunks (global layers) or
                                the w − 1 preceding tokens (sliding layers) under context parallel; gather_kv_backward
                                hands the keys' gradients back to the ranks that own them. kv_cache.LayerCache is
                                another implementation of gather_kv (incremental decoding).

The linear layer's ctx is a contract of every op table, not a seam it overrides: `linear_forward(x, w)` returns
`(y, (x, w))`, the weight itself as the ctx's second item (LINEAR_CTX). FSDP relies on it: it swaps a gathered
weight in a ctx for the name of its bucket and key, so that a ctx kept until the backward does not keep the gathered
bucket alive, and swaps it back before `linear_backward` (distributed/fsdp.py). An op table whose linear ctx is
another shape is refused there by name (tests/test_seam_contracts.py holds every backend to it).

sequence_sum(x) sums per-sequence statistics over the ranks holding parts of each sequence (the balance loss,
SPEC §6.3): the identity here, an all-reduce over `cp` under context parallel.
"""

from __future__ import annotations

from ..operators.array_module import array_namespace

__all__ = ["SingleProcessSeams", "LINEAR_CTX", "linear_ctx_weight"]

LINEAR_CTX = "(x, w)"  # what every op table's linear_forward returns as its ctx (module docstring)


def linear_ctx_weight(ctx, w) -> bool:
    """Whether `ctx` (of linear_forward(x, w)) meets the contract: a pair whose second item is `w` itself."""
    return isinstance(ctx, tuple) and len(ctx) == 2 and ctx[1] is w


class SingleProcessSeams:
    """The seams of an op table in one process: nothing moves, nothing is sharded."""

    # ---- parameter gather (FSDP) --------------------------------------------------------------------------------
    def gather_params(self, params, bucket):
        """The full arrays of `bucket`'s parameters, keyed like params (here: params itself)."""
        return params

    def release_params(self, bucket) -> None:
        """The bucket's gathered arrays are no longer needed (FSDP frees them)."""

    def end_forward(self) -> None:
        """A forward ended that no backward follows (evaluation): the next gather starts a new micro-batch (FSDP's
        prefetch order restarts; nothing stays gathered or posted)."""

    def end_gradients(self, grads: dict, mesh) -> dict:
        """The step's micro-batches ended: its gradients summed over the ranks that hold the same part of them
        (`mesh`'s "dp_replicate"; expert_bias aside, which every rank moves alike from the summed counts). In one
        process the identity. FSDP also finishes here what it deferred (distributed/fsdp.py)."""
        return {k: g if k.endswith("expert_bias") else mesh.sum(g, "dp_replicate") for k, g in grads.items()}

    def hand_back_grads(self, bucket, grads: dict, into: dict | None = None) -> dict:
        """The bucket's gradients as the step keeps them (here: unchanged); with `into` (earlier sums of what this
        seam returned, keyed alike), added into those arrays in place, which are returned."""
        if into is None:
            return grads
        for key, g in grads.items():
            into[key] += g
        return {key: into[key] for key in grads}

    # ---- token dispatch (EP) ------------------------------------------------------------------------------------
    def expert_dispatch(self, x, plan):
        """Rows x[plan.token] grouped by expert [N·K, d], the offsets of this rank's experts' blocks, and the ctx of
        the backward and the combine."""
        return array_namespace(x).take(x, plan.token, axis=0), plan.offsets, (plan, x.shape[0])

    def expert_dispatch_backward(self, ctx, dx_rows):
        """The gradients of the dispatched rows back in the plan's row order [N·K, d] (the model then sums each
        token's K rows with the scatter_to_tokens operator, the transpose of the gather x[plan.token])."""
        return dx_rows

    def expert_combine(self, ctx, y_rows):
        """The experts' outputs back in the plan's row order (here: unchanged)."""
        return y_rows

    def expert_combine_backward(self, ctx, dy_rows):
        return dy_rows

    # ---- key/value gathering (CP) -------------------------------------------------------------------------------
    def gather_kv(self, k, v, positions, doc_ids, window):
        """(keys, values [B, S, h_kv, d_h], key positions [S] increasing, key document ids [B, S] or None, ctx)
        for the queries at `positions` [T]; here the queries' own keys."""
        return k, v, positions, doc_ids, None

    def gather_kv_backward(self, ctx, dk, dv):
        """The gradients of this rank's own keys and values from those of the gathered ones."""
        return dk, dv

    # ---- per-sequence sums (CP) ---------------------------------------------------------------------------------
    def sequence_sum(self, x):
        """Σ over the ranks holding parts of the same sequences (here: x)."""
        return x
