"""The peak memory of one rank under a layout, estimated from the shapes alone: one function for the pre-flight check
(startup: each rank's need, summed over the ranks of a host) and for the cost model's memory per GPU.

`estimate_rank_bytes(config, layout, rank, seq_len, micro_batch_size, dtype, recompute, micro_steps)` counts what
rank `rank` holds at the peak of each phase of a run (the parallel plan, plan.py, names its buckets and spans):

  baseline     the process itself: Python, NumPy, h5py, mpi4py and trinity imported, MPI's buffers, the backend's
               compiled kernels (BASELINE_BYTES, measured, less while starting: no kernel is compiled yet); none
               on a GPU
  params       this rank's shard of every flat bucket (shard_size elements, padding included) and every expert_bias
               (float32, replicated)
  grads        one set of gradient shards (what hand_back_grads returns, the same shapes)
  optimizer    per bucket, Muon momentum (one shard) or AdamW m and v (two)
  gathered     what FSDP and the model's gradient arrays hold at the backward's fullest moment (fsdp.py,
               model.model_backward), over the order head, layers L−1 … 0, embedding: with G a bucket's gathered
               padded vectors (only groups of more than one rank gather), W its whole local gradient arrays, F the
               flat padded gradient hand_back_grads builds for the reduce-scatter plus, in a group of several ranks,
               the n blocks the reduce-scatter receives (mesh._ordered_reduce's Alltoall; the MPI library's own
               buffer for two ranks): at layer l's backward G(l) + G(l−1) (posted when l's gather arrived) + W(l) +
               W(l+1) (still bound until l's backward returns) + a layer's backward workspace; at its hand-back
               W(l) + F(l) + G(l−1); at the head G(head) or F(head), + G(L−1) + W(head); at the embedding W(0) +
               W(embed) + F(embed); a tied head's gradient at every one (an untied head's goes after its hand-back).
               F(b) is the flat gradient and, over more than two ranks, one column chunk's buffers of the ordered
               reduce-scatter (mesh.REDUCE_CHUNK_BYTES). Measured with tracemalloc on bench-medium at 4 ranks: 1-2 %
               below this count. The schedule options (gathers.py's rules) change it: buckets reshard_after_forward
               leaves gathered stay from their forward to their backward (below layer l at l's backward, every one
               at the loss: `left_gathered`); a posted reduce-scatter (async_reduce) keeps the previous hand-back's F
               during a layer's backward, its received blocks whole (mesh._OrderedReduceScatter) instead of a chunk;
               with reduce_gradients="step" F is only the flat gradient added into the sums; a wire dtype other
               than the parameters' adds its buffers (G: the received vector; F: the cast gradient)
  kept_gathered
               the buckets keep_gathered holds across the step's micro-batches (gathers.kept_gathered), held in the
               backward and the loss; with reduce_gradients="step" the step's gradients are whole local flat
               buckets ("grads_whole") there, and at the update beside the shards end_gradients makes of them
  activations, logits, workspace
               one micro-batch at this rank's positions: B sequences of T/cp tokens, counted by
               reference/training/memory.step_working_set (routed rows under EP: the mean, N·K, arrive at a rank)
  context      under context parallel, the keys and values gathered from the other cp ranks that each attention
               ctx keeps (global layers: the whole sequence, or under cp_exchange=read the chunks the rank reads,
               plan.chunks_read: T − r·T/(2·cp) keys on cp rank r; sliding ones: the w−1-token halos), plus one
               layer's backward exchange buffers
  update       the optimizer step's transient: the largest of clipping's float64 copy of the largest shard, AdamW's
               three temporaries of its largest key segment, and distributed Muon's on this rank (sharded_optim:
               the pieces sent to owners, the whole matrices this rank owns assembled, their Newton–Schulz
               temporaries, the pieces returned; it differs from rank to rank: `busiest_rank`)
  checkpoint   a save of this rank's file (sharded_checkpoint._write_rank): the HDF5 image is built in memory,
               about the bytes it holds (params and optimizer shards; rank 0 also the replicated arrays)
  startup      building this rank's state from its spans (rank_state.py): the spans' values beside the shards made
               from them (fresh init and init_from: one params set, plus a read buffer of READ_BYTES for init_from),
               and for a resume the checkpoint's params and optimizer spans beside the state made from them

The phases and what each holds at its peak (W = the working set, counted × MARGIN like the step's estimate):

  backward   baseline + params + optimizer + W(sets · grads + activations + logits + workspace + context + gathered)
  loss       … + W([m > 1] · grads + activations + logits + the loss's [B, T/cp, V] temporary + context kept)
  update     … + W(2 · grads + update): the step's gradients and their clipped copy, with the optimizer transient
  save       … + W(checkpoint)                                                              (host only)
  startup    … + W(startup)                                                                 (host only)

where sets = 1 gradient set alive in a micro-batch's backward (memory.gradient_sets: later micro-batches add into the
running sums as each bucket is handed back), and from the second micro-batch on the sums during the loss too. With one
rank (layout single) the step is the single-process trainer's and its three moments are estimate_step_bytes's
exactly (no gathered, no flat gradients, the update as it counts it). On a GPU (device="gpu", the cost model)
params, gradients and optimizer state are in `dtype` (fp32 master weights) and gathered weights, activations and
logits in `compute_dtype` (bf16); there is no baseline, save or startup (they are host memory).

"total" is the largest phase; "phase" names it; "phases" gives each phase's total; "counted" the parts of the
largest, which sum to "total" exactly ("margin" is what MARGIN adds).

Measured (`python tests/test_rank_memory.py [--seq-len T] [--set vocab_size=V] LAYOUT …`: 4 ranks under mpiexec,
fresh init, 2 steps of 4 sequences of micro-batch 1 and a save, float32, numba unless said; VmHWM of every rank):

    model                        T    backend    layout                 measured MiB  estimated MiB  est./meas.
    bench-medium                 512  numba      dp_shard=4             1248-1249     1138           0.91
    bench-medium                 512  numba      dp_shard=4,ep=4        1185-1201     1138           0.95-0.96
    bench-medium                 512  numba      dp_shard=2,cp=2,ep=2   1130-1157     1049           0.91-0.93
    bench-medium                 512  reference  dp_shard=4             1081-1125     1026           0.91-0.95
    bench-medium                 512  reference  dp_shard=2,cp=2,ep=2   1006-1019      937           0.92-0.93
    bench-medium, vocab 200,192  512  numba      dp_shard=4             4042-4140     3873           0.94-0.96
    bench-medium, vocab 200,192  512  numba      dp_shard=4,ep=4        3982-4035     3873           0.96-0.97
    bench-medium, vocab 200,192  512  numba      dp_shard=2,cp=2,ep=2   3779-3820     3611           0.95-0.96
    every run above, its start (fresh init, VmHWM before the first step)                              1.01-1.02

The step's peak errs low by 3-9 %: tracemalloc finds the step's arrays within 2 % of the count (tests/
test_rank_memory.py checks it on 4 ranks), and the rest is the allocator's: memory freed after the start (the spans'
values) stays resident and the step reuses only part of it.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from trinity.reference.model.params import EXPERT_BIAS_DTYPE, param_shapes
from trinity.reference.training.memory import MARGIN, accumulation_bytes, gradient_sets, step_working_set

from .gathers import bucket_kind, flat_refs, kept_gathered
from .layout import Layout, gathers_whole_sequence
from .mesh import REDUCE_CHUNK_BYTES
from .options import wire_itemsize
from .plan import ParallelPlan, chunks_read, owners_of

__all__ = ["estimate_rank_bytes", "busiest_rank", "BASELINE_BYTES", "READ_BYTES", "STARTS", "DEVICES"]

MiB = 1 << 20
# The resident set of a rank beside its arrays, (while it starts, once it trains): the interpreter and imported
# libraries (Python, NumPy, h5py, mpi4py, trinity: ~66 MiB), MPI's shared-memory buffers, the backend (numba: LLVM),
# and once it trains the kernels compiled on the first step. Measured as the peak resident set of each phase of a
# 4-rank `tiny` job less its estimated arrays (a few MiB; `python tests/test_rank_memory.py baseline`), in MiB:
# reference 79 and 84, numba 136 and 196.
BASELINE_BYTES = {"reference": (79 * MiB, 84 * MiB), "numba": (136 * MiB, 196 * MiB)}
READ_BYTES = 16 * MiB  # the most a reader moves at once (reference/interop/hf_files.CHUNK_BYTES)
STARTS = ("fresh", "init_from", "resume")
DEVICES = ("host", "gpu")
_STEP = ("backward", "loss", "update")


def estimate_rank_bytes(config, layout: Layout, rank: int, seq_len: int, micro_batch_size: int, dtype="float32",
                        recompute: bool = False, micro_steps: int = 1, *, compute_dtype=None, device: str = "host",
                        backend: str = "reference", start: str = "fresh") -> dict:
    """Estimated peak bytes of rank `rank` of `layout` (module docstring): a dict of the parts ("baseline",
    "params", "grads", "optimizer", "gathered", "activations", "logits", "workspace", "context", "update",
    "checkpoint", "startup": the size of each), "total" (the peak), "phase" (where it falls), "phases" ({phase:
    total}) and "counted" ({part: bytes} of the peak phase, summing to total). `dtype`: params, gradients and
    optimizer state; `compute_dtype` (default `dtype`): gathered weights and activations; `micro_steps`: micro-batches
    per optimizer step on this rank; `backend`: BASELINE_BYTES's key; `start`: "fresh", "init_from" or "resume" (the
    startup transient). Pure: it reads nothing but its arguments."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    B, T, m = int(micro_batch_size), int(seq_len), int(micro_steps)
    if B < 1 or T < 1 or m < 1:
        raise ValueError(f"micro_batch_size, seq_len and micro_steps must be >= 1, got {B}, {T}, {m}")
    if T % layout.cp:
        raise ValueError(f"seq_len {T} does not split over cp = {layout.cp} ranks")
    chunk = ParallelPlan(config, layout).coords(rank).chunk  # a rank outside the layout is a ValueError naming it
    s = np.dtype(dtype).itemsize
    cs = np.dtype(dtype if compute_dtype is None else compute_dtype).itemsize
    host = device == "host"
    single = layout.world_size == 1
    state = _state_parts(config, layout, rank, s, cs)
    params, grads, optimizer = state["params"], state["grads"], state["optimizer"]
    act_dtype = np.dtype(dtype if compute_dtype is None else compute_dtype)
    work = _working_set(config, B, T // layout.cp, act_dtype, recompute)
    kept, exchange = _context_bytes(config, layout, B, T, cs, recompute, chunk)
    starting, running = BASELINE_BYTES.get(backend, BASELINE_BYTES["numba"]) if host else (0, 0)
    gathered, workspace, kept_gathered, at_loss = (accumulation_bytes(config, act_dtype, m),
                                                   work["backward_workspace"], 0, 0) if single else \
        _gathered(config, layout, rank, s, cs, work["backward_workspace"])
    # reduce_gradients="step": the step's gradients are whole local flat buckets until its end (end_gradients), where
    # each bucket's shard is made beside them
    summed = state["grads_whole"] if layout.options.reduce_gradients == "step" and not single else grads
    parts = {"baseline": running, "params": params, "grads": grads, "optimizer": optimizer,
             "gathered": gathered, "kept_gathered": kept_gathered, "left_gathered": at_loss,
             "activations": work["activations"],
             "logits": work["logits"],
             "workspace": workspace, "context": kept + exchange,
             "update": 3 * work["largest"] if single else state["update"], "checkpoint": state["checkpoint"],
             "startup": _startup_bytes(params, optimizer, start, single)}
    sets = gradient_sets(m)
    held = {"baseline": parts["baseline"], "params": params, "optimizer": optimizer}
    step = {"activations": work["activations"], "logits": work["logits"]}
    moments = {
        "backward": {"grads": sets * summed, **step, "workspace": workspace, "context": kept + exchange,
                     "gathered": gathered, "kept_gathered": kept_gathered},
        "loss": {"grads": (m > 1) * summed, **step, "workspace": work["loss_workspace"], "context": kept,
                 "left_gathered": at_loss, "kept_gathered": kept_gathered},
        "update": {"grads": (3 if single else 2) * grads if summed is grads else max(2 * grads, grads + summed),
                   "update": parts["update"]},
    }
    if host:
        moments["save"] = {"checkpoint": parts["checkpoint"]}
        moments["startup"] = {"startup": parts["startup"]}
    phases = {}
    for name, working in moments.items():
        counted = {**held, **working}
        if name == "startup":
            counted["baseline"] = starting
        counted["margin"] = int(sum(working.values()) * MARGIN) - sum(working.values())
        phases[name] = counted
    phase = max(phases, key=lambda p: (sum(phases[p].values()), -list(phases).index(p)))
    counted = phases[phase]
    total = sum(counted.values())
    return {**parts, "total": total, "phase": phase,
            "phases": {p: sum(c.values()) for p, c in phases.items()}, "counted": counted}


EVERY_RANK_UP_TO = 64  # busiest_rank estimates every rank of a replica up to this many


def busiest_rank(config, layout: Layout, seq_len: int, micro_batch_size: int, dtype="float32",
                 recompute: bool = False, micro_steps: int = 1, **kw) -> int:
    """The rank of `layout` whose estimated peak (estimate_rank_bytes, same arguments) is the largest, the lowest such
    rank on a tie. Ranks differ only in distributed Muon's transient (which matrices they own) and in rank 0's save
    (the replicated arrays), so the candidates are the first replica's ranks: each of them up to EVERY_RANK_UP_TO
    (a near tie of phases can favour any), beyond that rank 0 and the rank with the largest Muon transient, found
    from the owner rule without estimating every rank."""
    plan = ParallelPlan(config, layout)
    fsdp = plan.group_size["fsdp"]
    if fsdp <= EVERY_RANK_UP_TO:
        candidates = plan.members("fsdp", 0)
    else:
        s = np.dtype(dtype).itemsize
        load = np.zeros(fsdp, dtype=np.int64)
        for b in plan.buckets(0):  # every fsdp rank holds buckets of these shapes; its index in each group differs
            if b.optimizer != "muon" or b.n == 1:
                continue
            per_index = np.array(_muon_bytes(tuple(tuple(int(x) for x in sh) for sh in b.shapes), b.n, b.shard_size,
                                             s, bool(config.muon_nesterov), layout.options.muon_owners),
                                 dtype=np.int64)
            f = np.arange(fsdp)
            load = np.maximum(load, per_index[f if b.group == "fsdp" else f // layout.ep])
        candidates = sorted({0, int(plan.members("fsdp", 0)[int(np.argmax(load))])})
    totals = [estimate_rank_bytes(config, layout, r, seq_len, micro_batch_size, dtype, recompute, micro_steps,
                                  **kw)["total"] for r in candidates]
    return candidates[int(np.argmax(totals))]


# ---- the parts ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _state_parts(config, layout: Layout, rank: int, s: int, cs: int) -> dict:
    """What depends on the rank's buckets only (cached: the cost model asks for every batch shape): its params
    (shards and expert_bias), gradients, optimizer state, optimizer transient and checkpoint."""
    buckets = _buckets(config, layout, rank)
    single = layout.world_size == 1
    bias = sum(math.prod(shape) for key, shape in param_shapes(config).items()
               if key.endswith("expert_bias")) * EXPERT_BIAS_DTYPE.itemsize
    shards = sum(b.shard_size for b in buckets) * s
    whole = sum((b.padded if b.n > 1 else b.shard_size) for b in buckets) * s
    return {"params": shards + bias, "grads": shards + bias, "grads_whole": whole + bias,
            "optimizer": sum(b.shard_size * (2 if b.optimizer == "adamw" else 1) for b in buckets) * s,
            "update": 0 if single else _update_bytes(config, buckets, s, layout.options.muon_owners),
            "checkpoint": _checkpoint_bytes(buckets, s, rank, bias, single)}


@functools.lru_cache(maxsize=1024)
def _working_set(config, B: int, T: int, dtype, recompute: bool) -> dict:
    return step_working_set(config, B, T, dtype, recompute)


@functools.lru_cache(maxsize=4096)
def _buckets(config, layout: Layout, rank: int) -> tuple:
    return tuple(ParallelPlan(config, layout).buckets(rank))


@functools.lru_cache(maxsize=4096)
def _gathered(config, layout: Layout, rank: int, s: int, cs: int, layer_workspace: int) -> tuple:
    return _in_flight(config, layout, _buckets(config, layout, rank), s, cs, layer_workspace)


def _in_flight(config, layout: Layout, buckets, s: int, cs: int, layer_workspace: int) -> tuple:
    """(gathered, workspace, kept, at_loss): at the backward's fullest moment (module docstring, "gathered"), the
    largest over the backward's order of what FSDP and the model's gradient arrays hold, with a layer's backward
    workspace where a layer's backward runs; `kept` the buckets held across the step's micro-batches
    (keep_gathered), `at_loss` what the forward left gathered for the backward (reshard_after_forward) while the
    loss runs. The forward's G(b) + G(next) (with what it left gathered so far) is never more."""
    options = layout.options
    kept = kept_gathered(flat_refs(config, layout), options, cs)
    q_g = wire_itemsize(options.gather_dtype, cs)
    q_r = wire_itemsize(options.reduce_dtype, s)
    whole = options.reduce_gradients == "step"
    by_model: dict = {}
    for b in buckets:
        by_model.setdefault(b.model_bucket, []).append(b)

    def gathered(b) -> int:  # a gathered padded vector, and its receive buffer while a wire dtype differs
        return b.padded * cs + (b.padded * q_g if q_g != cs else 0)

    def G(mb):  # gathered padded vectors (groups of one rank use their shard in place; kept ones counted apart)
        return sum(gathered(b) for b in by_model.get(mb, []) if b.n > 1 and b.name not in kept)

    def R(mb):  # what stays gathered from the forward to the backward (reshard_after_forward)
        return sum(gathered(b) for b in by_model.get(mb, []) if b.n > 1 and b.name not in kept
                   and not options.reshards(bucket_kind(b.group)))

    def W(mb):  # the bucket's whole local gradient arrays
        return sum(b.size * cs for b in by_model.get(mb, []))

    def flat(b):  # the flat gradient built for the reduce-scatter (one unpadded key: a view), and its cast
        return (0 if len(b.keys) == 1 and b.padded == b.size else b.padded * s) + (b.padded * q_r if q_r != s else 0)

    def F(mb):  # the flat gradient and, over more than two ranks, the ordered reduce-scatter's buffers: one column
        # chunk's (blocking: mesh's chunked reduce-scatter, REDUCE_CHUNK_BYTES each way) or the whole received
        # blocks (posted: mesh._OrderedReduceScatter); nothing reduced per micro-batch with reduce_gradients="step"
        if whole:
            return sum(0 if len(b.keys) == 1 and b.padded == b.size else b.padded * s for b in by_model.get(mb, []))
        return sum(flat(b) + ((b.padded * q_r if options.async_reduce else _chunk_buffers(b.padded * q_r))
                              if b.n > 2 else 0) for b in by_model.get(mb, []) if b.n > 1)

    def posted(mb):  # a hand-back's reduce-scatters still in flight during the next layer's backward
        return F(mb) if options.async_reduce and not whole else 0

    L = config.num_hidden_layers
    tied = config.tie_word_embeddings
    # the buckets left gathered for their backward, below layer l (they go as the backward reaches them)
    below = [0] * (L + 1)
    for layer in range(L):
        below[layer + 1] = below[layer] + R(layer)
    # The head's gradient goes once its hand-back returned (model_backward drops it), except a tied head's, which
    # stays until it is added to the embedding's; a layer's gradients stay until the next layer's backward returns.
    dhead = config.vocab_size * config.hidden_size * cs if tied else 0
    head_gathers = G("head") + (G("embed") if tied else 0)
    after_head = (G(L - 1) + below[L - 1]) if L else 0
    moments = [(after_head + (dhead if tied else W("head")) + max(head_gathers, F("head")), 0)]
    for layer in reversed(range(L)):
        previous = W(layer + 1) if layer + 1 < L else 0
        nxt = (G(layer - 1) + below[layer - 1]) if layer else 0
        in_flight = posted(layer + 1 if layer + 1 < L else "head")
        moments.append((dhead + previous + G(layer) + nxt + W(layer) + in_flight, layer_workspace))  # its backward
        moments.append((dhead + W(layer) + F(layer) + nxt, 0))  # its hand-back
    moments.append((dhead + (W(0) if L else 0) + W("embed") + F("embed") + posted(0 if L else "head"), 0))
    forward = ["embed", *range(L), "head"]
    held = [0] + [below[min(i, L)] for i in range(1, len(forward))]  # left gathered by the forward so far
    moments += [(G(a) + G(b) + h, 0) for a, b, h in zip(forward, forward[1:], held)]
    top = max(moments, key=lambda m: (m[0] + m[1], m[1]))
    at_loss = below[L] + R("head") + (R("embed") if tied else 0)
    return top[0], top[1], sum(b.padded * cs for b in buckets if b.name in kept), at_loss


def _chunk_buffers(nbytes: int) -> int:
    """The buffers of mesh's chunked ordered reduce-scatter of `nbytes`: one chunk covering it all sends the flat
    gradient itself and receives a copy; several chunks each copy their columns out and receive as many."""
    return nbytes if nbytes <= REDUCE_CHUNK_BYTES else 2 * REDUCE_CHUNK_BYTES


def _context_bytes(config, layout: Layout, B: int, T: int, cs: int, recompute: bool, chunk: int) -> tuple[int, int]:
    """(kept, exchange): the keys and values from other cp ranks that attention ctxs keep (every layer's, or one
    layer's with recompute) on cp rank `chunk`, and one layer's backward exchange buffers (module docstring,
    "context")."""
    cp = layout.cp
    if cp == 1:
        return 0, 0
    local, kvw = T // cp, config.kv_width
    whole = len(chunks_read(chunk, cp, layout.options.cp_exchange)) * T // (2 * cp)  # a global layer's keys
    extra, exchange = [], 0
    for layer in range(config.num_hidden_layers):
        window = config.window_of(layer)
        keys = whole if gathers_whole_sequence(window, T) else min(T, local + 2 * (window - 1))
        extra.append(2 * B * (keys - local) * kvw * cs)
        exchange = max(exchange, 2 * 2 * B * keys * kvw * cs)  # dk, dv of the gathered keys and the send buffer
    kept = max(extra) if recompute else sum(extra)
    return kept, exchange


def _ns_bytes(rows: int, cols: int, s: int) -> int:
    """Newton–Schulz's temporaries for one matrix (optimizer_kernels.newton_schulz): its float64 copy and square for
    the norm, then per iteration the Gram matrix A, A², B and three matrix-sized arrays."""
    mn, k = rows * cols, min(rows, cols)
    return max(16 * mn + s * mn, 3 * s * mn + 3 * s * k * k) + s * mn


@functools.lru_cache(maxsize=4096)
def _muon_bytes(shapes: tuple, n: int, shard: int, s: int, nesterov: bool, rule: str = "balanced") -> tuple:
    """Distributed Muon's transient on each group rank of a bucket of `shapes` over n ranks (sharded_optim
    _orthogonalise): with sh the shard, own the elements of the matrices the rank owns and U (nesterov) a shard,
    the largest of U + sh + 2·own + NS(its largest matrix), U + 2·sh + 4·own and U + 3·sh + 3·own, in bytes; the
    owners by `rule` (plan.owners_of)."""
    matrices = owners_of(shapes, n, rule)
    own = [0] * n
    big = [0] * n
    for lo, hi, owner, (rows, cols) in matrices:
        own[owner] += hi - lo
        big[owner] = max(big[owner], _ns_bytes(rows, cols, s))
    u = shard if nesterov else 0
    return tuple(max((u + shard + 2 * own[r]) * s + big[r], (u + 2 * shard + 4 * own[r]) * s,
                     (u + 3 * shard + 3 * own[r]) * s) for r in range(n))


def _update_bytes(config, buckets, s: int, rule: str = "balanced") -> int:
    """The optimizer step's largest transient on this rank (module docstring, "update")."""
    clip = 8 * max((b.shard_size for b in buckets), default=0)  # clipping's float64 product of the largest shard
    adamw = muon = 0
    nesterov = bool(config.muon_nesterov)
    for b in buckets:
        if b.optimizer == "adamw":
            adamw = max(adamw, 3 * s * max((sh.stop - sh.start for _, sh, _ in b.segments()), default=0))
        elif b.n > 1:
            muon = max(muon, _muon_bytes(tuple(tuple(int(x) for x in sh) for sh in b.shapes), b.n, b.shard_size, s,
                                         nesterov, rule)[b.index])
        else:  # the whole bucket here: O and each matrix's Newton–Schulz in turn
            largest = max(_ns_bytes(sh[-2], sh[-1], s) for sh in b.shapes)
            muon = max(muon, ((b.shard_size if nesterov else 0) + b.shard_size) * s + largest)
    return max(clip, adamw, muon)


def _checkpoint_bytes(buckets, s: int, rank: int, bias: int, single: bool) -> int:
    """The in-memory image of this rank's checkpoint file: its params and optimizer shards (rank 0, or the single
    file, also the replicated expert_bias)."""
    shards = sum(b.shard_size * (3 if b.optimizer == "adamw" else 2) for b in buckets) * s
    return shards + (bias if rank == 0 or single else 0)


def _startup_bytes(params: int, optimizer: int, start: str, single: bool) -> int:
    """What building the state holds beside it (module docstring, "startup")."""
    read = READ_BYTES if start != "fresh" else 0
    if single:  # one process builds each whole key in place
        return read
    return params + read + (optimizer if start == "resume" else 0)
