"""The optimizer on sharded parameters: AdamW on each rank's shard, distributed Muon (SPEC §9.2; docs/distributed.md).

The state is keyed like the parameters ("muon.momentum/shard:3.muon", "adamw.m/shard:embed.adamw", …): one flat
shard per bucket, so it shrinks as 1/(dp_shard·cp) with the parameters.

AdamW is elementwise: each rank updates its shard in place, key segment by key segment (the weight decay is per key),
with the same kernel and so the same bits as the single process.

Muon needs whole matrices (Newton–Schulz orthogonalises a matrix, not an element). As microsoft/dion does, every
matrix of a bucket (each routed expert's matrix too) has an owner among the bucket's group (plan.owners_of, by the
layout's muon_owners: chosen greedily to balance the Newton–Schulz work, ∝ out·in·min(out, in) per matrix, or the
rank holding the largest part of the matrix, so that less travels). Per bucket:

    M ← μM + G ; U = M (or μM + G, nesterov)                       elementwise, on the shard
    Alltoallv #1: each rank sends its pieces of U to each matrix's owner; the owner assembles whole matrices
    O = NS(U) on the owner, once per matrix
    Alltoallv #2: the owner sends the pieces of O back to the ranks holding them
    X ← X(1 − ηλ) − η·s·O                                           elementwise, on the shard

so the update equals single-process Muon (the same kernel on the same whole U). The shards and the pieces are arrays
of the table's module (a device table's: the mesh stages the two Alltoallvs through the host, staging.py).
"""

from __future__ import annotations

import math

import numpy as np

from trinity.reference.operators.array_module import array_namespace, itemsize
from trinity.reference.training.optim import (ADAMW_M, ADAMW_V, MUON_MOMENTUM, muon_update, optimizer_kernels,
                                              weight_decay_for)

from .fsdp import ShardedParams, shards_from_spans, spans_of_full
from .plan import owners_of, shapes_key

__all__ = ["init_sharded_optimizer_state", "shard_optimizer_state", "gather_optimizer_state",
           "sharded_optimizer_step", "matrix_owners", "owners_of", "STATE_PREFIXES"]

STATE_PREFIXES = {"muon": (MUON_MOMENTUM,), "adamw": (ADAMW_M, ADAMW_V)}


def init_sharded_optimizer_state(config, params: ShardedParams) -> dict:
    """Zero state for every bucket (Muon momentum, or AdamW m and v), and the step count."""
    state = {"step": np.zeros((), dtype=np.int64)}
    for b in params.buckets:
        for prefix in STATE_PREFIXES[b.optimizer]:
            state[prefix + b.shard_name] = np.zeros_like(params.shards[b.shard_name])
    return state


def shard_optimizer_state(config, params: ShardedParams, full: dict) -> dict:
    """This rank's state from a whole state dict (init_optimizer_state's keys; the same on every rank)."""
    state = {"step": np.array(full["step"], dtype=np.int64)}
    for b in params.buckets:
        dtype = params.shards[b.shard_name].dtype
        for prefix in STATE_PREFIXES[b.optimizer]:
            state[prefix + b.shard_name] = shards_from_spans([b], spans_of_full([b], full, prefix), dtype,
                                                             prefix)[b.shard_name]
    return state


def gather_optimizer_state(config, params: ShardedParams, state: dict) -> dict:
    """The whole state dict on every rank (collective), keyed as init_optimizer_state keys it."""
    full = {"step": np.array(state["step"], dtype=np.int64)}
    for group, prefixes in STATE_PREFIXES.items():
        if not any(b.optimizer == group for b in params.buckets):
            continue
        for prefix in prefixes:
            whole = params.full(state, prefix=prefix, only=group)
            full.update({prefix + k: v for k, v in whole.items()})
    return full


def matrix_owners(bucket, group_size: int, rule: str = "balanced") -> list[tuple[int, int, int, tuple]]:
    """owners_of the bucket's shapes by `rule` (the buckets lay their keys end to end from offset 0)."""
    return list(owners_of(shapes_key(bucket.shapes), group_size, rule))


def _overlaps(matrices, span, owner=None):
    """(matrix index, a, b) pieces [a, b) of the matrices (those of `owner`, when given) inside the flat span."""
    lo, hi = span
    for i, (m_lo, m_hi, o, _) in enumerate(matrices):
        if owner is not None and o != owner:
            continue
        a, b = max(lo, m_lo), min(hi, m_hi)
        if a < b:
            yield i, a, b


def _squares(x) -> float:
    """Σ x² in float64."""
    if isinstance(x, np.ndarray):
        return float(np.square(x, dtype=np.float64).sum())
    xp = array_namespace(x)
    x = xp.astype(x, xp.float64)
    return float(xp.sum(x * x))


def _orthogonalise(mesh, bucket, U_shard, config, kernels):
    """Newton–Schulz of every matrix of the bucket, each on its owner; returns (O on this rank's shard, Σ‖O‖² of the
    matrices this rank owns, as (matrix shape, ‖O‖²) pairs)."""
    n, me = bucket.n, bucket.index
    xp = array_namespace(U_shard)
    matrices = mesh.plan.muon_owners(bucket)  # by the layout's muon_owners
    spans = [bucket.span(r) for r in range(n)]
    my_lo = spans[me][0]

    def ns(U):
        return kernels.newton_schulz(U, steps=config.muon_ns_steps, coefficients=config.muon_ns_coefficients,
                                     eps=config.muon_eps, dtype=U.dtype)

    if n == 1:  # the whole bucket is here: no exchange
        O = xp.zeros_like(U_shard)
        owned = []
        for lo, hi, _, shape in matrices:
            O[lo:hi] = xp.reshape(ns(xp.reshape(U_shard[lo:hi], tuple(shape))), (-1,))
            owned.append((shape, _squares(O[lo:hi])))
        return O, owned
    # Alltoallv #1: pieces of U to the owners
    send = [xp.concat([U_shard[a - my_lo:b - my_lo] for _, a, b in _overlaps(matrices, spans[me], o)] or
                      [U_shard[:0]]) for o in range(n)]
    recv_counts = [sum(b - a for _, a, b in _overlaps(matrices, spans[s], me)) for s in range(n)]
    recv = _alltoallv(mesh, bucket.group, send, recv_counts, me, U_shard.dtype)
    whole = {i: xp.empty((matrices[i][1] - matrices[i][0],), dtype=U_shard.dtype) for i, m in enumerate(matrices)
             if m[2] == me}
    for s in range(n):
        at = 0
        for i, a, b in _overlaps(matrices, spans[s], me):
            whole[i][a - matrices[i][0]:b - matrices[i][0]] = recv[s][at:at + b - a]
            at += b - a
    owned = []
    for i in whole:
        whole[i] = xp.reshape(ns(xp.reshape(whole[i], tuple(matrices[i][3]))), (-1,))
        owned.append((matrices[i][3], _squares(whole[i])))
    # Alltoallv #2: pieces of O back to the ranks holding them
    back = [xp.concat([whole[i][a - matrices[i][0]:b - matrices[i][0]] for i, a, b in
                       _overlaps(matrices, spans[s], me)] or [U_shard[:0]]) for s in range(n)]
    got = _alltoallv(mesh, bucket.group, back, [x.shape[0] for x in send], me, U_shard.dtype)
    O = xp.zeros_like(U_shard)
    for o in range(n):
        at = 0
        for _, a, b in _overlaps(matrices, spans[me], o):
            O[a - my_lo:b - my_lo] = got[o][at:at + b - a]
            at += b - a
    return O, owned


def _alltoallv(mesh, group, send_pieces, recv_counts, me, dtype):
    """Exchange one array per peer: send_pieces[r] goes to rank r; returns the pieces received, per source."""
    xp = array_namespace(send_pieces[0])
    counts = np.array([x.shape[0] for x in send_pieces], dtype=np.int64)
    send = xp.concat(send_pieces)
    send = np.ascontiguousarray(send).astype(dtype, copy=False) if xp is np else xp.astype(send, dtype, copy=False)
    rcounts = np.array(recv_counts, dtype=np.int64)
    recv = xp.empty((int(rcounts.sum()),), dtype=dtype)
    sdispl = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rdispl = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).astype(np.int64)
    leaving = int(counts.sum() - counts[me]) * itemsize(send)
    mesh.collective("Alltoallv", group, [send, (counts, sdispl)], [recv, (rcounts, rdispl)], sent_bytes=leaving)
    return [recv[rdispl[s]:rdispl[s] + rcounts[s]] for s in range(len(recv_counts))]


def _contiguous(U):
    return np.ascontiguousarray(U) if isinstance(U, np.ndarray) else U


def sharded_optimizer_step(mesh, config, params: ShardedParams, grads: dict, state: dict, muon_lr: float,
                           adamw_lr: float, kernels=None, observe=None) -> dict:
    """One optimizer step on this rank's shards, in place; returns optim.optimizer_step's info (the update norms
    summed over the ranks)."""
    if observe is not None:
        raise ValueError("the step inspector observes single-process updates only")
    held = getattr(kernels, "held_buckets", lambda: [])()
    if held:  # a gathered copy would outlive the shards it was gathered from (the seam's end_gradients drops them)
        raise RuntimeError(f"the update would change buckets {held} that are still gathered (kept across "
                           f"micro-batches): the step must call end_gradients first")
    k = optimizer_kernels(kernels)
    c = config
    t = int(state["step"]) + 1
    norms = {"muon": 0.0, "adamw": 0.0}
    tensors = {"muon": 0, "adamw": 0}
    for b in params.buckets:
        X, G = params.shards[b.shard_name], grads[b.shard_name]
        tensors[b.optimizer] += len(b.keys)
        if b.optimizer == "adamw":
            m, v = state[ADAMW_M + b.shard_name], state[ADAMW_V + b.shard_name]
            for key, sh, _ in b.segments():
                u = k.adamw_update(X[sh], G[sh], m[sh], v[sh], lr=adamw_lr, wd=weight_decay_for(c, key),
                                   beta1=c.adamw_beta1, beta2=c.adamw_beta2, eps=c.adamw_eps, step=t)
                norms["adamw"] += u * u
            continue
        segments = [(sh, key, b.shapes[b.keys.index(key)]) for key, sh, _ in b.segments()]
        norms["muon"] += muon_update(c, X, G, state[MUON_MOMENTUM + b.shard_name], muon_lr, segments,
                                     lambda U, b=b: _orthogonalise(mesh, b, _contiguous(U), c, k))
    state["step"] = np.array(t, dtype=np.int64)
    summed = mesh.sum(np.array([norms["muon"], norms["adamw"]]), "fsdp")
    return {"step": t, "muon_lr": float(muon_lr), "adamw_lr": float(adamw_lr), "muon_tensors": tensors["muon"],
            "adamw_tensors": tensors["adamw"], "muon_update_norm": math.sqrt(summed[0]),
            "adamw_update_norm": math.sqrt(summed[1])}
