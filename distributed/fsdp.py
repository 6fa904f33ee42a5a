"""Sharded parameters (HSDP): flat buckets sharded over the fsdp group, gathered per layer just before use.

Every parameter but expert_bias lives in a flat bucket: the parameters of one model bucket (reference/model/params.py
param_buckets: "embed", each layer, "head") that share an optimizer group, concatenated in key order and padded to a
multiple of the group's size n. A rank holds one contiguous 1/n of it (its shard):

    bucket "3.muon"  = [q_proj | k_proj | v_proj | gate_proj | o_proj | router | shared experts … | pad]
                        ├─ rank 0 ─┤├─ rank 1 ─┤├─ rank 2 ─┤├─ rank 3 ─┤

Dense buckets are sharded over "fsdp" (the dp_shard·cp ranks of a replica); a MoE layer's routed experts form their
own bucket "3.experts" holding only this ep rank's experts [E/ep, …], sharded over "efsdp" (the ranks holding the
same experts). expert_bias is replicated: every rank moves it identically from the all-reduced counts.

The seams (reference/model/seams.py), for the model code (what they gather, keep and drop: gathers.py's rules under
the layout's schedule options, options.py):
    gather_params(params, b)   Iallgather of b's flat buckets not held → views of the full arrays; the next bucket's
                               gathers are posted before returning, so they travel while this one computes
    release_params(b)          the gathered arrays are dropped (kept ones, and those reshard_after_forward leaves for
                               the backward, stay)
    hand_back_grads(b, grads)  Reduce_scatter_block of b's flat gradient within the bucket's group (the sum over
                               every rank holding different tokens or experts' rows; Ireduce_scatter_block under
                               async_reduce); returns {shard name: this rank's summed shard}. With
                               reduce_gradients="step" the whole local flat gradient is kept and summed over the
                               micro-batches instead
    end_gradients(grads)       after the micro-batches: the kept buckets dropped, the accumulated gradients
                               reduce-scattered (reduce_gradients="step"), then the sum over dp_replicate, an
                               Allreduce per shard
A group of one rank calls nothing: with dp_shard·cp = 1 the shard is the whole bucket and only dp_replicate reduces.

The shards, gathered buffers and gradients are arrays of the table's module (a device table's: the seams allocate and
cut them there; the mesh stages each collective's buffers through the host, staging.py). `map_arrays` gives a copy
of the params with every array moved (to the device once, to the host for a checkpoint: run/placement.py).
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import numpy as np

from trinity.reference.model.params import bucket_of, is_expert_bias, param_shapes
from trinity.reference.model.seams import LINEAR_CTX, linear_ctx_weight
from trinity.reference.operators.array_module import array_bytes, array_namespace, itemsize

from .gathers import Holding, flat_refs
from .mesh import movable as _movable
from .options import OptionError, wire_dtype
from .plan import SHARD_PREFIX, FlatBucket, ParallelPlan, expert_range, is_routed_expert

__all__ = ["FlatBucket", "ShardedParams", "ShardedParamSeams", "SHARD_PREFIX", "plan_buckets", "expert_slice",
           "shards_from_spans"]

_LINEAR_WEIGHTS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight")


def _is_linear_weight(key: str) -> bool:
    """A weight the model passes to linear_forward: attention and dense/shared FFN projections, the head, the tied
    embedding (which is also the head)."""
    return key.endswith(_LINEAR_WEIGHTS) or key in ("lm_head.weight", "model.embed_tokens.weight")


class GatheredWeight(NamedTuple):
    """What a linear ctx holds under FSDP in place of its weight: where to find it again."""
    bucket: object
    key: str


def _wire(choice: str, a):
    """The dtype a dtype option (gather_dtype, reduce_dtype) moves array `a`'s values in: options.wire_dtype for a
    NumPy array; for a device array its own dtype ("param") or its module's float32 (bfloat16 is an ml_dtypes NumPy
    dtype: host arrays only, refused at a run's start: run/placement.py)."""
    if isinstance(a, np.ndarray):
        return wire_dtype(choice, a.dtype)
    if choice == "param":
        return a.dtype
    if choice == "float32":
        return array_namespace(a).float32
    raise OptionError(f"{choice} gathers or reductions need NumPy arrays (ml_dtypes): not with an op table on a device")


def _as(a, dtype):
    """`a` in `dtype` (itself when it is already), C-contiguous for MPI when it is a NumPy array."""
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a if dtype == a.dtype else a.astype(dtype))
    return a if dtype == a.dtype else array_namespace(a).astype(a, dtype)


def plan_buckets(config, mesh) -> list[FlatBucket]:
    """The flat buckets of `config` on this rank of `mesh` (the plan's)."""
    return ParallelPlan(config, mesh.layout).buckets(mesh.rank)


def expert_slice(mesh, num_experts: int) -> slice:
    """The experts this ep rank holds (the plan's expert_range)."""
    return expert_range(mesh.ep_rank, mesh.sizes["ep"], num_experts)


def shards_from_spans(buckets: list[FlatBucket], values: dict, dtype, prefix: str = "") -> dict:
    """{shard name: this rank's flat shard} from `values[prefix + key]` = [1-D array per span of the key, in the
    order the buckets list them] (what the plan's spans ask a reader for); padding is zero."""
    shards, taken = {}, {}
    for b in buckets:
        shard = np.zeros(b.shard_size, dtype=dtype)
        for span in b.spans():
            at = taken.get(span.key, 0)
            taken[span.key] = at + 1
            piece = values[prefix + span.key][at]
            if piece.shape != (span.hi - span.lo,):
                raise ValueError(f"{span.key}: span [{span.lo}, {span.hi}) needs {span.hi - span.lo} values, got "
                                 f"shape {piece.shape}")
            shard[span.shard_lo:span.shard_hi] = piece
        shards[b.shard_name] = shard
    return shards


def spans_of_full(buckets: list[FlatBucket], full: dict, prefix: str = "") -> dict:
    """{prefix + key: [its values in each span]} cut from whole arrays (the same on every rank)."""
    out: dict = {}
    for b in buckets:
        for span in b.spans():
            out.setdefault(prefix + span.key, []).append(np.asarray(full[prefix + span.key]).reshape(-1)[span.lo:span.hi])
    return out


class ShardedParams:
    """This rank's parameters: a shard of every flat bucket (keys "shard:<bucket>") and the replicated expert_bias
    arrays (their own keys). Iterating gives the shard keys, then the bias keys; gradients and optimizer state use
    the same keys."""

    def __init__(self, config, mesh, buckets: list[FlatBucket], shards: dict, replicated: dict):
        self.config, self.mesh, self.buckets = config, mesh, buckets
        self.shards, self.replicated = shards, replicated

    @classmethod
    def from_full(cls, config, mesh, full: dict) -> "ShardedParams":
        """Shard a whole parameter dict (the same on every rank); no communication."""
        buckets = plan_buckets(config, mesh)
        dtype = full["model.embed_tokens.weight"].dtype
        shards = shards_from_spans(buckets, spans_of_full(buckets, full), dtype)
        return cls(config, mesh, buckets, shards, {k: v.copy() for k, v in full.items() if is_expert_bias(k)})

    @classmethod
    def from_spans(cls, plan, rank: int, values: dict, dtype) -> "ShardedParams":
        """Rank `rank`'s params from `values` = {key: [1-D array per span]}, what plan.wanted(rank) names (every
        expert_bias whole, as one span); no communication. The mesh that gathers them is attached later
        (`mesh = …`): a rank builds its state before the job builds its mesh."""
        buckets = plan.buckets(rank)
        shapes = param_shapes(plan.config)
        biases = {k: np.asarray(values[k][0]).reshape(shapes[k]).copy() for k in shapes if is_expert_bias(k)}
        return cls(plan.config, None, buckets, shards_from_spans(buckets, values, dtype), biases)

    # -- a dict's reading and writing, by key
    def __iter__(self):
        yield from self.shards
        yield from self.replicated

    def keys(self):
        return list(self)

    def items(self):
        return [(k, self[k]) for k in self]

    def __len__(self):
        return len(self.shards) + len(self.replicated)

    def __contains__(self, key):
        return key in self.shards or key in self.replicated

    def __getitem__(self, key):
        return self.shards[key] if key in self.shards else self.replicated[key]

    def __setitem__(self, key, value):
        (self.shards if key in self.shards else self.replicated)[key] = value

    @property
    def nbytes(self) -> int:
        return sum(array_bytes(v) for v in self.shards.values()) + sum(array_bytes(v) for v in self.replicated.values())

    def map_arrays(self, fn) -> "ShardedParams":
        """These params with fn(array) in place of every shard and bias (the same buckets and mesh): a copy on the
        device or the host (accel/device.py)."""
        return ShardedParams(self.config, self.mesh, self.buckets, {k: fn(v) for k, v in self.shards.items()},
                             {k: fn(v) for k, v in self.replicated.items()})

    # -- whole arrays (collective: every rank calls it)
    def gather_bucket(self, bucket: FlatBucket, shard=None) -> np.ndarray:
        """The whole flat vector of `bucket` from every rank's shard (of params, or of `shard` e.g. a state)."""
        shard = self.shards[bucket.shard_name] if shard is None else shard
        if bucket.n == 1:
            return shard
        flat = np.empty(bucket.padded, dtype=shard.dtype)
        self.mesh.collective("Allgather", bucket.group, np.ascontiguousarray(shard), flat)
        return flat

    def full(self, sharded: dict | None = None, prefix: str = "", only: str | None = None) -> dict:
        """The whole arrays of every key, on every rank: all-gathered within the shard groups, experts across ep.
        `sharded` (default these params) may be another dict keyed by prefix + shard name (an optimizer state);
        `only` keeps the buckets of one optimizer group."""
        out = {}
        for b in self.buckets:
            if only is not None and b.optimizer != only:
                continue
            shard = None if sharded is None else sharded[prefix + b.shard_name]
            local = b.views(self.gather_bucket(b, shard))
            for key, value in local.items():
                out[key] = self._gather_experts(value) if is_routed_expert(key) else value.copy()
        if sharded is None:
            out.update({k: v.copy() for k, v in self.replicated.items()})
        order = param_shapes(self.config)
        return {k: out[k] for k in order if k in out}

    def _gather_experts(self, local: np.ndarray) -> np.ndarray:
        ep = self.mesh.sizes["ep"]
        if ep == 1:
            return local.copy()
        whole = np.empty((ep,) + local.shape, dtype=local.dtype)
        self.mesh.collective("Allgather", "ep", np.ascontiguousarray(local), whole)
        return whole.reshape((ep * local.shape[0],) + local.shape[1:])


def _flat_gradient(b: FlatBucket, grads: dict) -> np.ndarray:
    """The bucket's padded flat gradient: a view of the key's own array when the bucket is one unpadded key (the
    embedding, the head: no copy of a [V, d] array), else the keys laid end to end (FlatBucket.flatten)."""
    if len(b.keys) == 1 and b.padded == b.size:
        g = grads[b.keys[0]]
        if isinstance(g, np.ndarray):
            g = np.ascontiguousarray(g)
        if math.prod(g.shape) == b.size:
            return array_namespace(g).reshape(g, (-1,))
    return b.flatten(grads, grads[b.keys[0]].dtype)


class ShardedParamSeams:
    """The parameter-gather seam over ShardedParams (a mixin of ParallelOps: needs self.mesh and self.config).

    What is gathered, prefetched, kept and dropped is gathers.Holding's rule (the schedule options of the mesh's
    layout); this class moves the data: Iallgathers into buffers of gather_dtype, each whole bucket brought back to
    the parameters' dtype on arrival (`_flats`: flat bucket name → its gathered padded vector), and the gradients'
    reduce-scatters (per micro-batch at each hand-back, or once per step in end_gradients; blocking, or posted with
    one hand-back in flight under async_reduce)."""

    def _init_sharding(self):
        self._gathered: dict = {}  # model bucket → {key: full array}, from its gather until its release
        self._weight_key: dict = {}  # id of a gathered linear weight → (bucket, key)
        self._buffers: list = []  # weak references to the gathered flat buffers
        self._flats: dict = {}  # flat bucket name → its gathered padded vector (in the parameters' dtype)
        self._in_flight: dict = {}  # flat bucket name → (request or None, receive buffer, send buffer)
        self._reducing: list = []  # the posted reduce-scatters of the last hand-back (async_reduce)
        self._buckets = plan_buckets(self.config, self.mesh)
        self._by_name = {b.name: b for b in self._buckets}
        self._by_model_bucket: dict = {}
        for b in self._buckets:
            self._by_model_bucket.setdefault(b.model_bucket, []).append(b)
        self._options = self.mesh.layout.options
        self._holding = None  # gathers.Holding, made at the first gather (its budget counts the params' itemsize)

    def _hold(self, params) -> Holding:
        if self._holding is None:
            first = params.shards[self._buckets[0].shard_name]
            self._dtype = first.dtype
            self._holding = Holding(self.config, flat_refs(self.config, self.mesh.layout), self._options,
                                    itemsize(first))
        return self._holding

    def held_buckets(self) -> list:
        """The flat buckets gathered now (nothing between steps: the update changes their shards)."""
        return sorted(self._flats)

    def gather_params(self, params, bucket):
        if not isinstance(params, ShardedParams):
            return params
        phase, now, missing, prefetch = self._hold(params).gather(bucket)
        if phase is not None:  # for traces: the forward's gathers come first in the order, then the backward's
            self.mesh.set_phase(phase, bucket)
        for f in now:
            self._post(params, self._by_name[f.name])
        for f in missing:
            self._arrive(f.name)
        if bucket not in self._gathered:
            self._gathered[bucket] = self._arrays(params, bucket)
        for f in prefetch:
            self._post(params, self._by_name[f.name])
        return self._gathered[bucket]

    def release_params(self, bucket) -> None:
        for key, array in self._gathered.pop(bucket, {}).items():
            if self._weight_key.get(id(array)) == (bucket, key):
                del self._weight_key[id(array)]
        if self._holding is not None:
            for f in self._holding.release(bucket):
                self._flats.pop(f.name, None)

    def end_forward(self) -> None:
        """A forward that no backward follows ended (evaluation): what it holds is dropped and the order restarts
        at the next micro-batch's first gather. The forward's last gather (the head) posts only buckets it holds
        itself, so nothing is in flight."""
        if self._in_flight:
            raise RuntimeError(f"end_forward: buckets {sorted(self._in_flight)} are still in flight")
        if self._holding is not None:
            self._holding.end_forward()
        self._flats.clear()

    def _post(self, params, b: FlatBucket) -> None:
        shard = params.shards[b.shard_name]
        if b.n == 1:
            self._in_flight[b.name] = (None, shard, None)
            return
        send = _as(shard, _wire(self._options.gather_dtype, shard))
        flat = array_namespace(shard).empty((b.padded,), dtype=send.dtype)
        request = self.mesh.collective("Iallgather", b.group, _movable(send), _movable(flat))
        self._in_flight[b.name] = (request, flat, send)

    def _arrive(self, name: str) -> None:
        """The flat bucket's gathered vector once its gather arrived, in the parameters' dtype."""
        request, flat, _ = self._in_flight.pop(name)
        if request is not None:
            request.Wait()
            flat = _as(flat, self._param_dtype())
            self._buffers = [r for r in self._buffers if r() is not None] + [weakref.ref(flat)]
        self._flats[name] = flat

    def _param_dtype(self):
        return self._dtype

    def gathered_bytes(self) -> int:
        """Bytes of gathered flat buffers still alive (in flight, in use, or kept by something: the FSDP memory
        beyond this rank's shards)."""
        return sum(array_bytes(buf) for buf in (r() for r in self._buffers) if buf is not None)

    def _arrays(self, params, bucket) -> dict:
        """The bucket's arrays from its gathered flat buckets. The linear layers' weights (and the routed experts,
        which no ctx keeps) are views of the gathered flat buffers; every other array (norm gains, the router) is
        copied out, so that what a ctx keeps until the backward never holds a flat buffer: dropping the bucket
        frees it."""
        arrays = {}
        for b in self._by_model_bucket.get(bucket, []):
            for key, view in b.views(self._flats[b.name]).items():
                if _is_linear_weight(key):
                    arrays[key] = view
                    self._weight_key[id(view)] = (bucket, key)
                else:
                    arrays[key] = view if is_routed_expert(key) else array_namespace(view).asarray(view, copy=True)
        arrays.update({k: v for k, v in params.replicated.items() if bucket_of(k) == bucket})
        return arrays

    # ---- linear layers keep a reference to their gathered weight, not the weight --------------------------------
    def linear_forward(self, x, w):
        """The backend's linear; when w is a gathered weight, its ctx names the weight (bucket, key) instead of
        holding it, and the backward takes it from that bucket's gather in the backward (seams.py: the model gathers
        each bucket again before its backward; the linear ctx contract LINEAR_CTX)."""
        y, ctx = self.base.linear_forward(x, w)
        ref = self._weight_key.get(id(w))
        if ref is None or self._gathered.get(ref[0], {}).get(ref[1]) is not w:
            return y, ctx
        if not linear_ctx_weight(ctx, w):
            raise TypeError(f"op table {getattr(self.base, 'name', type(self.base).__name__)}: linear_forward's ctx "
                            f"is not {LINEAR_CTX} (reference/model/seams.py), which FSDP relies on")
        return y, (ctx[0], GatheredWeight(*ref))

    def linear_backward(self, ctx, dy):
        if isinstance(ctx, tuple) and len(ctx) == 2 and isinstance(ctx[1], GatheredWeight):
            bucket, key = ctx[1]
            if bucket not in self._gathered:
                raise RuntimeError(f"linear_backward: bucket {bucket!r} is not gathered (gather it before its "
                                   f"backward)")
            ctx = (ctx[0], self._gathered[bucket][key])
        return self.base.linear_backward(ctx, dy)

    # ---- gradients ----------------------------------------------------------------------------------------------
    def hand_back_grads(self, bucket, grads: dict, into: dict | None = None) -> dict:
        """What the step keeps of the bucket's gradients (seams.py): each flat bucket's reduce-scattered shard, or
        with reduce_gradients="step" its whole local flat gradient (reduce-scattered in end_gradients); with
        `into`, added into the earlier sum there (in place, the step's micro-batch order) and that array is
        returned. Under async_reduce a returned shard is filled when its reduce-scatter is waited for: at the
        next hand-back, and at the micro-batch's last (the embedding's) for its own."""
        self.mesh.set_phase("backward", bucket)  # (for traces)
        if self._holding is not None:
            self._holding.hand_back(bucket)
        whole = self._options.reduce_gradients == "step"
        if not whole:
            self._wait_reductions()
        out = {}
        for b in self._by_model_bucket.get(bucket, []):
            flat = _flat_gradient(b, grads)
            if whole or b.n == 1:
                if into is not None:
                    into[b.shard_name] += flat
                    flat = into[b.shard_name]
                out[b.shard_name] = flat
            else:
                out[b.shard_name] = self._reduce_scatter(b, flat, into)
            del flat
        for k, v in grads.items():
            if is_expert_bias(k):
                if into is not None:
                    into[k] += v
                    v = into[k]
                out[k] = v
        if bucket == "embed":
            self._wait_reductions()
        return out

    def end_gradients(self, grads: dict, mesh=None) -> dict:
        """The step's micro-batches ended (seams.py): the kept buckets are dropped, with reduce_gradients="step"
        each flat bucket's accumulated gradient is reduce-scattered (phase "reductions", in plan order), then
        every shard is summed over dp_replicate (in reduce_dtype)."""
        self._wait_reductions()
        if self._holding is not None:
            self._holding.end_step()
        self._flats.clear()
        grads = dict(grads)
        if self._options.reduce_gradients == "step":
            for b in self._buckets:
                if b.n > 1:
                    self.mesh.set_phase("reductions", b.model_bucket)
                    grads[b.shard_name] = self._reduce_scatter(b, grads[b.shard_name], None)
            self._wait_reductions()
            self.mesh.set_phase("reductions")
        if self.mesh.sizes["dp_replicate"] > 1:
            for k, g in grads.items():
                if not is_expert_bias(k):
                    summed = self.mesh.sum(_as(g, _wire(self._options.reduce_dtype, g)), "dp_replicate")
                    grads[k] = summed if summed.dtype == g.dtype else array_namespace(g).astype(summed, g.dtype)
        return grads

    def _reduce_scatter(self, b: FlatBucket, flat: np.ndarray, into: dict | None) -> np.ndarray:
        """This rank's shard of the sum of `flat` over b's group, added into `into[b.shard_name]` when given:
        blocking, or posted (async_reduce) into an array filled at _wait_reductions."""
        xp = array_namespace(flat)
        send = _as(flat, _wire(self._options.reduce_dtype, flat))
        shard = xp.empty((b.shard_size,), dtype=send.dtype)
        target = into[b.shard_name] if into is not None else None
        if not self._options.async_reduce:
            self.mesh.collective("Reduce_scatter_block", b.group, send, shard)
            return _land(shard, target, flat.dtype)
        if self._reducing and self._options.reduce_gradients == "step":
            self._wait_reductions()  # one in flight at a time
        if target is None:
            target = xp.empty((b.shard_size,), dtype=flat.dtype)
            fill = True
        else:
            fill = False
        request = self.mesh.collective("Ireduce_scatter_block", b.group, send, shard)
        self._reducing.append((request, send, shard, target, fill))
        return target

    def _wait_reductions(self) -> None:
        for request, _, shard, target, fill in self._reducing:
            request.Wait()
            if fill:
                target[...] = shard
            else:
                target += _cast(shard, target.dtype)
        self._reducing = []


def _cast(a, dtype):
    """`a` in `dtype` (itself when it is already)."""
    return a if a.dtype == dtype else array_namespace(a).astype(a, dtype)


def _land(shard, target, dtype):
    """A reduce-scatter's result in the parameters' dtype, added into `target` when given (and returned)."""
    if target is None:
        return _cast(shard, dtype)
    target += _cast(shard, dtype)
    return target
