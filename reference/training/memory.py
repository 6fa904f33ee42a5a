"""Peak memory of one training step, estimated from the shapes alone, and the memory this machine has free.

`estimate_step_bytes(config, micro_batch_size, seq_len, dtype, recompute)` counts what the NumPy reference holds
at once during an optimizer step (trainer: loss_and_grads per micro-batch, clipping, the optimizer step):

  params       every parameter (expert_bias in float32 whatever the dtype, params.EXPERT_BIAS_DTYPE)
  grads        one set of gradients (the same shapes); clipping and the update hold up to three such sets
  optimizer    Muon momentum for the matrices in the Muon group, AdamW m and v for the rest (optim.param_group,
               exactly the arrays of optim.init_optimizer_state); nothing for expert_bias
  activations  what the forward keeps for the backward of one micro-batch (model/model.py, model/layers.py: every
               operator's ctx), or with recompute only each layer's input and its routing, plus one layer's ctx
               rebuilt in the backward; per layer with N = B·T tokens:
                 norms: x̂ [N, d] (and 1/rms [N]) for each of the 4 sandwich norms, the per-head x̂ of the QK norms;
                 attention: the normed input, q, k, v (after QK norm and RoPE), o, the log-normaliser [B, h, T]
                   (never a T×T matrix: scores are recomputed per query block in the backward), σ(gate), the
                   gated output; sliding and global layers keep the same arrays (the window only bounds the
                   per-block score workspace);
                 MoE: router logits and scores [N, E], the argsort behind the choices (int64 [N, E]: the
                   choices are a view of it), the dispatch (int64 [N·K] ×2), the token copies and outputs per expert
                   slot [N·K, d] ×2, the expert pre-activations [N·K, I_m] ×3, the shared expert's [N, I_s] ×4, and
                   with a balance loss its normalised scores and score gradient [N, E] ×2; a dense layer [N, I] ×4;
               plus the final norm, the head input and its gradient [N, d]
  logits       the logits [B, T, V] and their gradient, both alive through the whole backward; the loss briefly
               holds a third [B, T, V] array (usually the largest single item for real vocabularies)
  workspace    the largest transient on top: one layer's backward (activation gradients, the attention's per-block
               score arrays, bounded by attention._BLOCK_ELEMENTS) or the optimizer step's temporaries
  total        the estimated peak: params + optimizer + 1.05 × the largest of three moments of the step:
               backward (grads × the gradient sets alive: 1, 2 with accumulation, 3 from the third micro-batch on,
               + activations + logits + workspace), loss (the same before the micro-batch's own gradients exist,
               with the loss's [B, T, V] temporary) and update (three gradient sets: the running sum, the averaged
               and the clipped copies, + clipping's temporaries); "phase" says which

Not counted: the Python interpreter, NumPy/BLAS buffers, the memory-mapped token data (page cache), the data
loader's batches and the balancing state (E floats per layer). Peak RSS adds the interpreter and libraries (~100-200
MiB), which the trainer's check against `available_memory_bytes()` should leave room for.

Measured: the tracemalloc peak of `Trainer.train_step` on its second step, plus the params and optimizer state
allocated before it (reference backend, float32, 2 cores; `python tests/test_memory.py tiny,4,32 tiny,16,64 ...`,
spec PRESET,B,T[,MICRO_STEPS[,RECOMPUTE]]; tests/test_memory.py checks the first four rows each run):

    preset        B×T      micro-batches  recompute   estimate    measured   estimate/measured
    tiny          4×32     1              no           7.5 MiB     7.2 MiB   1.04
    tiny          16×64    1              no          37.6 MiB    34.5 MiB   1.09
    tiny          16×64    1              yes         21.7 MiB    19.7 MiB   1.10
    tiny          4×32     3              no           9.8 MiB     9.5 MiB   1.03
    tiny          1×1024   1              no           116 MiB    95.7 MiB   1.22
    tiny          2×2048   1              yes          156 MiB     144 MiB   1.09
    bench-medium  2×256    1              no          2098 MiB    1976 MiB   1.06   (update phase)
    bench-medium  4×512    1              no          2807 MiB    2580 MiB   1.09
    bench-medium  4×512    1              yes         2098 MiB    1980 MiB   1.06   (update phase)

so the estimate errs high, by 3-22 % (the most where attention's score blocks dominate a model as narrow as `tiny`).
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..model.config import Config
from ..model.params import EXPERT_BIAS_DTYPE, param_shapes
from ..operators.attention import _BLOCK_ELEMENTS, largest_query_block
from .optim import param_group

__all__ = ["estimate_step_bytes", "step_working_set", "gradient_sets", "accumulation_bytes", "available_memory_bytes", "AVAILABLE_MEMORY_ENV",
           "MARGIN"]

AVAILABLE_MEMORY_ENV = "TRINITY_AVAILABLE_MEMORY"  # bytes: replaces the measured available memory

_INT = 8  # int64: token ids, expert choices, dispatch indexes
# On the step's working set (not params and optimizer state, which are exact): NumPy temporaries and small arrays
# not modelled one by one; without it the estimate measured 0.99-1.16× the tracemalloc peak.
MARGIN = 1.05


def estimate_step_bytes(config: Config, micro_batch_size: int, seq_len: int, dtype="float32", recompute=False,
                        *, micro_steps: int = 1) -> dict:
    """Estimated bytes of one optimizer step of the reference trainer (module docstring): a dict with "params",
    "grads", "optimizer", "activations", "logits", "workspace", "total" (the peak) and "phase" ("backward" or
    "update": where the peak falls). `micro_steps` is the number of micro-batches per optimizer step
    (sequences_per_step / micro_batch_size); with more than one, the trainer keeps a running sum of the gradients
    next to each micro-batch's own. Pure: it reads nothing but its arguments."""
    if micro_steps < 1:
        raise ValueError(f"micro_steps must be >= 1, got {micro_steps}")
    w = step_working_set(config, micro_batch_size, seq_len, dtype, recompute)
    grads, activations, logits = w["grads"], w["activations"], w["logits"]
    backward_ws, loss_ws, largest = w["backward_workspace"], w["loss_workspace"], w["largest"]
    # One gradient set in a micro-batch's backward (gradient_sets): the first micro-batch's own, or the running
    # sums the later ones add into bucket by bucket; then beyond the sums, the bucket being handed back and the one
    # still bound (two buckets' fresh gradients). From the second micro-batch on the sums exist during the loss too.
    sets, later = gradient_sets(micro_steps), micro_steps > 1
    fresh = accumulation_bytes(config, dtype, micro_steps)
    moments = [("backward", sets * grads + fresh + activations + logits + backward_ws, backward_ws),
               ("loss", later * grads + activations + logits + loss_ws, loss_ws),
               # the update: the running sum, the averaged and the clipped copies, and clipping's float64 temporaries
               # (or the optimizer's) of the largest tensor
               ("update", 3 * grads + 3 * largest, 3 * largest)]
    phase, peak, workspace = max(moments, key=lambda m: m[1])
    total = w["params"] + w["optimizer"] + int(peak * MARGIN)
    return {"params": w["params"], "grads": grads, "optimizer": w["optimizer"], "activations": activations,
            "logits": logits, "workspace": workspace, "total": total, "phase": phase}


def accumulation_bytes(config: Config, dtype, micro_steps: int) -> int:
    """Beyond the running sums, what a later micro-batch's backward holds of its own gradients in one process: the
    bucket being handed back and the one still bound, at most twice the largest model bucket's gradients
    (params.param_buckets: embed, a layer, head); 0 with one micro-batch per step."""
    if micro_steps <= 1:
        return 0
    from ..model.params import param_buckets, param_shapes
    shapes, s = param_shapes(config), np.dtype(dtype).itemsize
    return 2 * max(sum(int(np.prod(shapes[k])) for k in keys) for keys in param_buckets(config).values()) * s


def gradient_sets(micro_steps: int) -> int:
    """Whole gradient sets alive in a micro-batch's backward: one, however many micro-batches a step has. Each
    micro-batch's gradients are added into the running sums bucket by bucket as its backward hands them back
    (training/step.py, model_backward's `into`), so beyond the sums only the bucket being handed back exists (the
    backward's moments count it)."""
    if int(micro_steps) < 1:
        raise ValueError(f"micro_steps must be >= 1, got {micro_steps}")
    return 1


def step_working_set(config: Config, micro_batch_size: int, seq_len: int, dtype="float32", recompute=False) -> dict:
    """The shapes-only counts behind estimate_step_bytes (module docstring), for micro-batches of B sequences of T
    tokens: "params", "grads" and "optimizer" of the whole model; "activations" and "logits" kept for one
    micro-batch's backward; "backward_workspace" (the largest transient of a layer's backward, with the gradient
    flowing through), "loss_workspace" (the loss's third [B, T, V] array) and "largest" (the largest tensor, in
    `dtype`). distributed/rank_memory.py counts a rank's activations with it at the rank's T/cp positions."""
    c = config
    s = np.dtype(dtype).itemsize
    B, T = int(micro_batch_size), int(seq_len)
    if B < 1 or T < 1:
        raise ValueError(f"micro_batch_size and seq_len must be >= 1, got {B}, {T}")
    N = B * T
    d, V, E, K = c.hidden_size, c.vocab_size, c.num_experts, c.num_experts_per_tok
    hq, hkv = c.num_attention_heads, c.num_key_value_heads
    qw, kvw = c.q_width, c.kv_width
    Im, Is = c.moe_intermediate_size, c.shared_intermediate_size

    # ---- params, grads, optimizer state ----
    params = grads = optimizer = 0
    largest = 0
    for key, shape in param_shapes(c).items():
        n = math.prod(shape)
        size = n * (EXPERT_BIAS_DTYPE.itemsize if key.endswith("expert_bias") else s)
        params += size
        grads += size
        largest = max(largest, n * s)
        group = param_group(c, key, shape)
        optimizer += size * {"muon": 1, "adamw": 2}.get(group, 0)

    # ---- activations: one layer's ctx (floats, then int64 arrays) ----
    norm = N * d + N  # x̂ and 1/rms of a sandwich norm
    attention = (N * d  # normed input (q/k/v/gate projections' ctx)
                 + N * qw + N * hq + N * kvw + N * hkv  # QK-norm x̂ and 1/rms
                 + N * qw + 2 * N * kvw + N * qw + N * hq  # sdpa: q, k, v, o, lse
                 + N * qw + N * qw)  # σ(gate), gated output (o_proj's input)
    dense = N * d + 4 * N * c.intermediate_size  # MLP input, gate/up pre-activations, σ, h
    moe = (N * d + 2 * N * E + N + N * K  # MLP input, router logits and scores, Σ chosen scores, gate weights
           + 2 * N * K * d + 3 * N * K * Im  # token copies and outputs per slot, expert pre-activations and h
           + (4 * N * Is if c.num_shared_experts > 0 else 0))
    # The choices are a [:, :K] view of the whole argsort [N, E]; the dispatch adds token and slot [N·K].
    moe_ints = N * E + 2 * N * K
    layer_float = {False: 4 * norm + attention + dense, True: 4 * norm + attention + moe}
    layer_bytes = {m: layer_float[m] * s + (moe_ints * _INT if m else 0) for m in (False, True)}
    # What every MoE layer keeps whatever recompute says: the routing (scores, the argsort behind the choices) and,
    # with a balance loss, its normalised scores and the gradient on the scores, [N, E] each.
    routing = N * E * s + N * E * _INT + (2 * N * E * s if c.balance_loss_coeff > 0 else 0)
    moe_layers = sum(c.is_moe_layer(layer) for layer in range(c.num_hidden_layers))
    dense_layers = c.num_hidden_layers - moe_layers
    # final norm x̂ and 1/rms, the head's input, the head's input gradient (held through the backward), RoPE tables,
    # tokens and labels
    model_level = (3 * N * d + N) * s + 2 * T * c.head_dim * s + 2 * N * _INT
    if recompute:
        activations = (c.num_hidden_layers * N * d * s + moe_layers * routing + model_level
                       + max(layer_bytes[c.is_moe_layer(layer)] for layer in range(c.num_hidden_layers)))
    else:
        activations = (moe_layers * (layer_bytes[True] + routing - N * E * (s + _INT))  # scores, argsort: in ctx
                       + dense_layers * layer_bytes[False] + model_level)
    logits = 2 * N * V * s  # logits and dlogits

    # ---- workspace: the largest transient ----
    # Score arrays of the attention backward: five of a query block at once (S, P, dP, dP − D, dS), six when the
    # next block's scores are formed while the last block's arrays are still bound; sliding and global layers.
    scores = 0
    for window in {c.window_of(layer) for layer in range(c.num_hidden_layers)}:
        block, blocks = largest_query_block(T, window, B * hq, _BLOCK_ELEMENTS)
        scores = max(scores, B * hq * block * (6 if blocks > 1 else 5))
    # A layer's backward keeps the gradients of its residual stream alive until it returns (dx in and out, the
    # post-norm, MLP and pre-norm gradients, the head's dh): about six [N, d] arrays when the attention backward runs.
    # The attention backward adds dÕ, dG, dQ, dK, dV and the score arrays.
    attention_ws = (4 * N * d + N * (3 * qw + 2 * kvw) + scores) * s
    moe_ws = (3 * N * K * d + 2 * N * E + N * d) * s  # dy per slot ×3, router ds/dz, scattered dx
    dense_ws = 3 * N * c.intermediate_size * s  # dh, da, dc
    mlp_ws = max(moe_ws if moe_layers else 0, dense_ws if dense_layers else 0)
    backward_ws = max(attention_ws, mlp_ws) + 2 * N * d * s  # + the residual gradient dx flowing through
    loss_ws = N * V * s  # the loss's third [B, T, V] array (softmax temporaries), before any gradient exists
    return {"params": params, "grads": grads, "optimizer": optimizer, "activations": activations, "logits": logits,
            "backward_workspace": backward_ws, "loss_workspace": loss_ws, "largest": largest}


# ---- free memory -------------------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _number(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None  # "max" (no limit) and garbage → None


def _stat(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


def _meminfo_available(proc: str) -> int | None:
    for line in (_read(os.path.join(proc, "meminfo")) or "").splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    return None


def _cgroup_headroom(proc: str, cgroup_root: str) -> int | None:
    """Limit − (usage − inactive file cache) of the tightest memory limit on this process's cgroup path (v2 and
    v1); None when no limit is set or none can be read."""
    lines = (_read(os.path.join(proc, "self", "cgroup")) or "").splitlines()
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if controllers == "":  # cgroup v2: 0::/path
            base, files = cgroup_root, ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1: N:memory:/path
            base, files = os.path.join(cgroup_root, "memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                                "memory.stat", "total_inactive_file")
        else:
            continue
        # The process's own cgroup and every ancestor up to the root of the hierarchy (a limit may sit higher up;
        # inside a container the path is often "/" already).
        folder = os.path.join(base, rel) if rel else base
        while True:
            limit = _number(_read(os.path.join(folder, files[0])))
            if limit is not None and limit < 1 << 60:  # v1 writes "no limit" as a huge number
                usage = _number(_read(os.path.join(folder, files[1]))) or 0
                cache = _stat(_read(os.path.join(folder, files[2])), files[3])
                headroom = max(0, limit - max(0, usage - cache))
                best = headroom if best is None else min(best, headroom)
            if os.path.normpath(folder) == os.path.normpath(base):
                break
            folder = os.path.dirname(folder)
    return best


def available_memory_bytes(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup", environ=None) -> int | None:
    """Bytes this process can still allocate without swapping, or None when unknown (not Linux): the kernel's
    MemAvailable (/proc/meminfo), lowered to the headroom under a cgroup memory limit (v2 memory.max, v1
    memory.limit_in_bytes; usage minus the reclaimable inactive file cache) when one is set on this process's
    cgroup or an ancestor. `proc` and `cgroup_root` are the mount points (tests point them at fake trees).

    $TRINITY_AVAILABLE_MEMORY (AVAILABLE_MEMORY_ENV: a number of bytes) replaces the measurement: a test shows a
    refusal without a huge model, and a site can reserve memory for something the check cannot see. A value that is
    not a non-negative integer raises ValueError naming the variable."""
    env = os.environ if environ is None else environ
    given = env.get(AVAILABLE_MEMORY_ENV)
    if given is not None:
        if not given.strip().isdigit():
            raise ValueError(f"${AVAILABLE_MEMORY_ENV} = {given!r}: must be a number of bytes")
        return int(given)
    values = [v for v in (_meminfo_available(proc), _cgroup_headroom(proc, cgroup_root)) if v is not None]
    return min(values) if values else None
