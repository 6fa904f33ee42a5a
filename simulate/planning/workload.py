"""The compute of one training step on one rank, operator by operator: FLOPs and memory bytes from the model config
and the layout, named as the op table names them (reference/model/ops.py), so that a measured operator time can
calibrate each (the host's cost model) and a GPU's peak figures can time them.

Per micro-batch a rank holds N = B·T/cp tokens (B sequences of T tokens, its 1/cp of positions); per layer:

  linear_forward        2·N·d·(3·h_q·d_h + 2·h_kv·d_h) attention projections (q, gate, o: h_q·d_h; k, v: h_kv·d_h);
                        MoE shared expert 3·2·N·d·I_s; a dense layer 3·2·N·d·I. The head 2·N·d·V.
  attention_forward     4·N·h_q·d_h·keys: QKᵀ and PV over the visible keys, keys = the mean over positions t < T of
                        min(t+1, w) for a sliding layer of window w, t+1 for a global one (causal mask; a document
                        mask is not counted as saved work). Context parallel gives each rank 1/cp of the pairs.
  router_forward        2·N·d·E.
  experts_forward       3·2·R·d·I_m for the R routed rows this rank's experts receive: N·K on average (every rank
                        of an ep group sends and receives alike), × `imbalance` on the busiest rank (EP waits for it).
  memory-bound ops      rmsnorm (4 sandwich norms and the q/k norms), rope (sliding layers), output_gate, swiglu,
                        dispatch/combine/scatter_to_tokens, embedding, cross-entropy (logits [N, V]), balance loss:
                        the bytes they read and write (q bytes per element).
  backward              2× the forward's FLOPs for products (dx and dW), 2.5× for attention (the scores recomputed
                        per block, as flash-style kernels do), 1.5× the bytes of memory-bound ops; recompute adds
                        each layer's forward again.

Per step (the optimizer on this rank's shards): newton_schulz ns_steps·(4m²n + 2m³) per matrix [m ≤ n] the rank
owns (distributed Muon's owner rule, trinity.distributed.plan.owners_of; all of them in one process);
adamw_update 28 bytes per AdamW element (p, g, m, v read; p, m, v written, float32); the clip's sum_of_squares 4 and
scaled 8 bytes per element of every shard (one call each per tensor, as a profiled step counts them); under FSDP,
bucket_copies: each gathered bucket written once into its flat buffer and read into the model's views, the
gradients flattened for the reduce-scatter.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from trinity.distributed.plan import owners_of

from .traffic_model import flat_buckets, shapes_key

__all__ = ["Work", "step_work", "optimizer_work", "mean_keys", "forward_flops_per_token", "training_flops",
           "muon_flops"]

# Which op names count FLOPs (timed against a compute rate) and which count bytes (timed against memory bandwidth).
GEMM_OPS = ("linear_forward", "linear_backward", "router_forward", "router_backward", "experts_forward",
            "experts_backward", "newton_schulz")
ATTENTION_OPS = ("attention_forward", "attention_backward")


@dataclass
class Work:
    """One operator's work in a step on one rank: FLOPs, memory bytes, calls; `phase` forward | backward |
    optimizer."""
    op: str
    phase: str
    flops: float = 0.0
    bytes: float = 0.0
    calls: int = 0

    @property
    def kind(self) -> str:
        return "gemm" if self.op in GEMM_OPS else "attention" if self.op in ATTENTION_OPS else "memory"


def mean_keys(T: int, window: int | None) -> float:
    """Mean number of keys a query sees under the causal mask: Σ_{t<T} min(t+1, w) / T (w = T for global)."""
    w = T if window is None or window >= T else window
    return (w * (w + 1) / 2 + (T - w) * w) / T


def forward_flops_per_token(config, seq_len: int) -> float:
    """Matrix-product FLOPs of the forward per token (the MFU convention: products only, attention with its mask)."""
    c = config
    d, total = c.hidden_size, 2.0 * c.vocab_size * c.hidden_size
    for layer in range(c.num_hidden_layers):
        total += 2 * d * (3 * c.q_width + 2 * c.kv_width)
        total += 4 * c.q_width * mean_keys(seq_len, c.window_of(layer))
        if c.is_moe_layer(layer):
            total += 2 * d * c.num_experts + 6 * d * (c.num_experts_per_tok * c.moe_intermediate_size
                                                      + c.shared_intermediate_size)
        else:
            total += 6 * d * c.intermediate_size
    return total


def training_flops(config, sequences: int, seq_len: int) -> float:
    """FLOPs of a step's forward and backward (3× the forward), the numerator of MFU."""
    return 3.0 * forward_flops_per_token(config, seq_len) * sequences * seq_len


@functools.lru_cache(maxsize=4096)
def _owner_loads(shapes: tuple, n: int, steps: int, rule: str = "balanced") -> np.ndarray:
    """Newton–Schulz FLOPs per owner rank [n] of a Muon bucket (owners by `rule`, the layout's muon_owners):
    steps·(4m²n' + 2m³) per matrix [m ≤ n']."""
    owned = np.array([(rows, cols, owner) for _, _, owner, (rows, cols) in owners_of(shapes, n, rule)],
                     dtype=np.float64)
    small, large = owned[:, :2].min(axis=1), owned[:, :2].max(axis=1)
    flops = steps * (4.0 * small * small * large + 2.0 * small ** 3)
    return np.bincount(owned[:, 2].astype(np.int64), weights=flops, minlength=n)


def muon_flops(config, layout=None) -> float:
    """Newton–Schulz FLOPs of one optimizer step on the busiest rank (every Muon matrix in one process)."""
    return optimizer_work(config, layout)["newton_schulz"]


def optimizer_work(config, layout) -> dict:
    """The optimizer's work on the busiest rank of `layout` (None: one process): _optimizer_work."""
    return _optimizer_work(config, layout.ep if layout else 1, layout.dp_shard * layout.cp if layout else 1,
                           layout.options.muon_owners if layout else "balanced")


@functools.lru_cache(maxsize=1024)
def _optimizer_work(config, ep: int, fsdp: int, rule: str = "balanced") -> dict:
    """{newton_schulz: FLOPs on the busiest rank, adamw: its AdamW shard elements, elements: all its shard elements,
    whole: the elements of every bucket} under expert parallel `ep`, an fsdp group of `fsdp` ranks and the Muon
    owner rule `rule`."""
    size = {"fsdp": fsdp, "efsdp": fsdp // ep}
    load = {"fsdp": np.zeros(fsdp), "efsdp": np.zeros(fsdp // ep)}
    adamw = elements = whole = 0
    for parts in flat_buckets(config, ep).values():
        for group, opt, shapes in parts:
            n = size[group]
            count = sum(math.prod(s) for s in shapes)
            whole += count
            elements += -(-count // n)
            if opt == "adamw":
                adamw += -(-count // n)
            else:
                load[group] += _owner_loads(shapes_key(shapes), n, config.muon_ns_steps, rule)
    # a rank is owner index f in its fsdp group and f // ep... in its efsdp group: the busiest fsdp index's sum
    f = np.arange(fsdp)
    busiest = float((load["fsdp"] + load["efsdp"][f // ep]).max())
    return {"newton_schulz": busiest, "adamw": adamw, "elements": elements, "whole": whole}


def step_work(config, layout, seq_len: int, sequences: int, micro_batch_size: int, *, q: int = 4,
              recompute: bool = False, imbalance: float = 1.0) -> list[Work]:
    """Every operator's work in one step on the busiest rank of `layout` (None: one process), q bytes per
    activation element (module docstring)."""
    c = config
    cp, dp, ep = (layout.cp, layout.dp, layout.ep) if layout else (1, 1, 1)
    B, T = micro_batch_size, seq_len
    m = sequences // (dp * B)
    N = B * T / cp
    d, V, E, K = c.hidden_size, c.vocab_size, c.num_experts, c.num_experts_per_tok
    qw, kvw = c.q_width, c.kv_width
    rows = N * K * (imbalance if ep > 1 else 1.0)
    work: dict = {}

    times = 1  # layers of one kind share their work: added once, times their count

    def add(op, phase, flops=0.0, nbytes=0.0, calls=1):
        w = work.setdefault((op, phase), Work(op, phase))
        w.flops += times * flops
        w.bytes += times * nbytes
        w.calls += times * calls

    def layer_forward(layer, phase):
        add("rmsnorm_forward", phase, nbytes=2 * q * N * (4 * d + qw + kvw), calls=6)
        add("linear_forward", phase, 2 * N * d * (3 * qw + 2 * kvw), 2 * q * N * (d + 2 * qw + kvw), calls=5)
        if c.window_of(layer) is not None:
            add("rope_forward", phase, nbytes=2 * q * N * (qw + kvw), calls=2)
        add("attention_forward", phase, 4 * N * qw * mean_keys(T, c.window_of(layer)), q * N * (2 * qw + 2 * kvw))
        add("output_gate_forward", phase, nbytes=3 * q * N * qw)
        if c.is_moe_layer(layer):
            Is, Im = c.shared_intermediate_size, c.moe_intermediate_size
            add("router_forward", phase, 2 * N * d * E, q * N * (d + 2 * E))
            add("dispatch", phase, nbytes=8 * 2 * N * K)
            add("experts_forward", phase, 6 * rows * d * Im, q * rows * (2 * d + 3 * Im))
            add("combine", phase, nbytes=q * (2 * N * K * d + N * d))
            add("balance_loss_forward", phase, nbytes=q * 2 * N * E)
            if Is:
                add("linear_forward", phase, 6 * N * d * Is, 2 * q * N * (2 * d + 3 * Is), calls=3)
                add("swiglu_forward", phase, nbytes=3 * q * N * Is)
        else:
            add("linear_forward", phase, 6 * N * d * c.intermediate_size,
                2 * q * N * (2 * d + 3 * c.intermediate_size), calls=3)
            add("swiglu_forward", phase, nbytes=3 * q * N * c.intermediate_size)

    # one micro-batch, then m of them
    add("embedding_forward", "forward", nbytes=q * N * d)
    kinds: dict = {}  # (MoE?, window) → [a layer of that kind, count]
    for layer in range(c.num_hidden_layers):
        kinds.setdefault((c.is_moe_layer(layer), c.window_of(layer)), [layer, 0])[1] += 1
    for layer, count in kinds.values():
        times = count
        layer_forward(layer, "forward")
        if recompute:
            layer_forward(layer, "backward")
    times = 1
    add("rmsnorm_forward", "forward", nbytes=2 * q * N * d)
    add("linear_forward", "forward", 2 * N * d * V, q * (N * d + N * V))
    add("cross_entropy_forward", "forward", nbytes=2 * q * N * V)
    add("cross_entropy_backward", "backward", nbytes=2 * q * N * V)
    add("embedding_backward", "backward", nbytes=q * N * d)
    for w in work.values():
        w.flops, w.bytes, w.calls = m * w.flops, m * w.bytes, m * w.calls
    # the backward of every forward operator of the micro-batches (recompute's repeats excluded)
    for (op, phase), w in list(work.items()):
        if phase != "forward" or not op.endswith("_forward") or op in ("embedding_forward",
                                                                          "cross_entropy_forward"):
            continue
        name = op.replace("_forward", "_backward")
        factor = 2.5 if op == "attention_forward" else 2.0
        add(name, "backward", factor * w.flops, 1.5 * w.bytes, w.calls)
    for op in ("dispatch", "combine"):
        if (op, "forward") in work:
            f = work[(op, "forward")]
            add("scatter_to_tokens" if op == "dispatch" else "combine_backward", "backward", 0, 1.5 * f.bytes,
                f.calls)

    opt = optimizer_work(c, layout)
    add("newton_schulz", "optimizer", opt["newton_schulz"], 0, 0)
    add("adamw_update", "optimizer", nbytes=28 * opt["adamw"])
    add("sum_of_squares", "optimizer", nbytes=4 * opt["elements"])
    add("scaled", "optimizer", nbytes=8 * opt["elements"])
    if layout is not None and layout.dp_shard * layout.cp > 1:
        # per micro-batch: gathers (2 per bucket: forward, backward) write and read the whole bucket, gradients
        # are flattened once
        add("bucket_copies", "backward", nbytes=m * q * opt["whole"] * 5, calls=m)
    return [w for w in work.values() if w.flops or w.bytes]
