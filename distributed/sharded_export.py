"""A Hugging Face checkpoint written from sharded params with no rank holding more than one whole key at a time.

Key by key, in the model's order, rank 0 receives every part of the key straight into the key's whole array: one
Alltoallv over the world in which each rank of replica 0 sends its span of the key (plan.py: at most one span per
key, a contiguous flat range of the whole array) and rank 0 receives each at its place (the receive displacement is
the span's start). Ranks of other replicas hold copies and send nothing; expert_bias is replicated and rank 0 has it.
Rank 0 hands the key to the streaming writer (reference/interop/hf.HFCheckpointWriter: the safetensors header first,
then each key's bytes) and drops it. A write that fails on rank 0 (a full disk) stops the writing, not the gathers,
and the ranks agree on the failure at the end, so every rank raises the same error and none waits forever.
"""

from __future__ import annotations

import numpy as np

from trinity.reference.model.params import is_expert_bias, param_shapes

from .mesh import allgather_json

__all__ = ["export_sharded_hf", "gather_key"]


def gather_key(mesh, params, key: str, spans_by_rank: dict | None = None):
    """The whole array of `key` on rank 0 (None on the other ranks); collective over the world. `spans_by_rank`
    ({rank: plan.spans(rank)}, for the ranks of replica 0) may be passed to spare recomputing it per key."""
    plan, config = mesh.plan, params.config
    shape = param_shapes(config)[key]
    if is_expert_bias(key):
        return params.replicated[key].copy() if mesh.rank == 0 else None
    senders = plan.group_size["fsdp"]  # replica 0's ranks: 0 … dp_shard·cp − 1
    spans_by_rank = spans_by_rank or {r: plan.spans(r) for r in range(senders)}
    W = mesh.world_size
    mine = spans_by_rank.get(mesh.rank, {}).get(key, []) if mesh.replica == 0 else []
    send = (np.ascontiguousarray(np.concatenate([params.shards[s.bucket][s.shard_lo:s.shard_hi] for s in mine]))
            if mine else np.empty(0, dtype=_dtype(params)))
    send_counts = np.zeros(W, dtype=np.int64)
    send_counts[0] = send.size
    recv_counts, recv_displs = np.zeros(W, dtype=np.int64), np.zeros(W, dtype=np.int64)
    whole = None
    if mesh.rank == 0:
        whole = np.empty(shape, dtype=send.dtype)
        for r in range(senders):
            found = spans_by_rank[r].get(key, [])
            if len(found) > 1:
                raise RuntimeError(f"{key}: rank {r} holds {len(found)} spans of it; the export expects one")
            if found:
                recv_counts[r], recv_displs[r] = found[0].hi - found[0].lo, found[0].lo
    recv = whole.reshape(-1) if whole is not None else np.empty(0, dtype=send.dtype)
    zeros = np.zeros(W, dtype=np.int64)
    leaving = 0 if mesh.rank == 0 else int(send.nbytes)
    mesh.collective("Alltoallv", "world", [send, (send_counts, zeros)], [recv, (recv_counts, recv_displs)],
                    sent_bytes=leaving)
    return whole


def _dtype(params):
    return next(iter(params.shards.values())).dtype


def export_sharded_hf(mesh, params, folder: str, log=None) -> None:
    """Write `params` (ShardedParams on every rank of `mesh`) as a Hugging Face checkpoint in `folder` (collective;
    rank 0 writes). Raises the same error on every rank when rank 0's write failed."""
    from trinity.reference.interop.hf import HFCheckpointWriter
    config = params.config
    mesh.set_phase("export")
    plan = mesh.plan
    spans_by_rank = {r: plan.spans(r) for r in range(plan.group_size["fsdp"])} if mesh.rank == 0 else \
        ({mesh.rank: plan.spans(mesh.rank)} if mesh.rank < plan.group_size["fsdp"] else {})
    writer, error = None, None
    if mesh.rank == 0:
        try:
            writer = HFCheckpointWriter(folder, config, _dtype(params))
        except Exception as e:  # noqa: BLE001 - carried to every rank below
            error = e
    for key in param_shapes(config):
        whole = gather_key(mesh, params, key, spans_by_rank)
        if writer is not None and error is None:
            try:
                writer.write(key, whole)
            except Exception as e:  # noqa: BLE001
                error = e
                writer.abort()
        del whole
    if writer is not None and error is None:
        try:
            writer.close()
        except Exception as e:  # noqa: BLE001
            error = e
    said = allgather_json(mesh.comm, None if error is None else f"{type(error).__name__}: {error}",
                          lambda kind, send, recv: mesh.collective(kind, "world", send, recv))[0]
    if said is not None:
        raise RuntimeError(f"the Hugging Face export to {folder} failed on rank 0: {said}")
