"""The cost model: step time by phase, MFU, memory per rank and days for a token budget, for a model, a layout and
a piece of hardware (docs/simulation.md).

Inputs are the two analytic accounts of a step: the compute of the busiest rank, operator by operator
(trinity.simulate.workload), and every collective with the bytes that leave the busiest rank
(trinity.simulate.traffic_model, whose byte counts equal what the simulator's traces record). Each is timed:

  operator      on a GPU max(FLOPs / (peak · efficiency of its kind), bytes / (HBM bandwidth · memory efficiency));
                on the host (a calibrated Hardware) the measured seconds per call plus per FLOP or byte of that
                operator.
  collective    bytes / (link bandwidth · link efficiency) + calls · ring steps · latency, the link being NVLink
                when the group's ranks are on one node (`ranks_per_node` consecutive ranks) and the network else.

Overlap rules (stated, not measured):
  host          nothing overlaps: MPI on one machine progresses only inside MPI calls, and ranks share the cores,
                so every second of compute or communication is multiplied by ranks/cores when ranks exceed cores.
  GPU           FSDP parameter gathers (prefetched one bucket ahead) and gradient reduce-scatters run on their own
                stream under the forward and backward compute: only what exceeds that compute is exposed. The
                expert-parallel all-to-alls and context-parallel exchanges sit on the critical path (each layer waits
                for its tokens or keys), as do the once-per-step collectives (replica all-reduce, distributed Muon's
                exchanges, scalar reductions) and the optimizer.

Memory per rank (GPU, mixed precision: bf16 compute copies, fp32 master weights, gradients and optimizer state):
fp32 shards of params and gradients, Muon momentum (4 B) or AdamW moments (8 B) per shard element, the gathered bf16
buckets alive at once (the current and the prefetched one) and one bucket's full gradient, activations of one
micro-batch from reference/training/memory.py's operator-by-operator count at T/cp tokens, with or without
recompute. A layout fits when that total is at most `usable` (0.9) of the HBM: the rest is the allocator's and the
communication library's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from trinity.distributed.mesh import group_members
from trinity.reference.training.memory import estimate_step_bytes

from .hardware import Hardware
from .traffic_model import Itemsizes, flat_buckets, ring_steps, step_collectives
from .workload import optimizer_work, step_work, training_flops

__all__ = ["Prediction", "predict", "USABLE_MEMORY", "PHASES"]

USABLE_MEMORY = 0.9
PHASES = ("forward", "backward", "fsdp exposed", "ep/cp exchange", "optimizer", "step collectives")


@dataclass
class Prediction:
    """One layout's predicted step: seconds by phase, the step, throughput, MFU, memory per rank in bytes."""
    layout: object
    micro_batch_size: int
    recompute: bool
    phases: dict
    step_seconds: float
    tokens_per_step: int
    mfu: float
    memory: dict
    fits: bool
    detail: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_seconds

    @property
    def bound(self) -> str:
        """The phase that takes the most of the step."""
        return max(self.phases, key=self.phases.get)

    def days(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / 86400.0


def _op_seconds(work, hw: Hardware) -> float:
    rate = hw.op_rates.get(work.op)
    if rate is not None:  # calibrated: seconds per call and per unit of the operator's own measure
        per_call, per_unit = rate
        return per_call * work.calls + per_unit * (work.flops if work.kind != "memory" else work.bytes)
    efficiency = {"gemm": hw.gemm_efficiency, "attention": hw.attention_efficiency}.get(work.kind)
    compute = work.flops / (hw.peak_flops * efficiency) if efficiency else 0.0
    return max(compute, work.bytes / (hw.hbm_bandwidth * hw.memory_efficiency))


@functools.lru_cache(maxsize=4096)
def link_tier(layout, group: str, ranks_per_node: int) -> str:
    """"intra-node" when rank 0's group `group` lies within one node of `ranks_per_node` ranks, else "inter-node"."""
    members = group_members(layout, group)
    return "intra-node" if len({r // ranks_per_node for r in members}) <= 1 else "inter-node"


def _collective_seconds(col, layout, hw: Hardware) -> float:
    bandwidth, latency = hw.link(link_tier(layout, col.group, hw.ranks_per_node))
    return col.rank_bytes / bandwidth + col.calls * ring_steps(col.kind, col.n) * latency


_activation_bytes = functools.lru_cache(maxsize=1024)(estimate_step_bytes)


def memory_per_rank(config, layout, seq_len: int, micro_batch_size: int, recompute: bool, q: int = 2) -> dict:
    """Bytes per rank (module docstring): params, grads, optimizer, gathered, activations, total."""
    opt = optimizer_work(config, layout)
    elements, adamw = opt["elements"], opt["adamw"]
    bias = 4 * config.num_experts * sum(config.is_moe_layer(l) for l in range(config.num_hidden_layers))
    buckets = [sum(math.prod(s) for _, _, shapes in parts for s in shapes)
               for parts in flat_buckets(config, layout.ep).values()]
    largest = sorted(buckets)[-2:]
    act_dtype = {2: np.float16, 4: np.float32, 8: np.float64}[q]
    activation = _activation_bytes(config, micro_batch_size, seq_len // layout.cp, act_dtype, recompute)
    out = {"params": 4 * elements + bias, "grads": 4 * elements, "optimizer": 4 * (elements - adamw) + 8 * adamw,
           "gathered": (q * sum(largest) + 4 * largest[-1]) if layout.dp_shard * layout.cp > 1 else 0,
           "activations": activation["activations"] + activation["logits"] + activation["workspace"]}
    out["total"] = sum(out.values())
    return out


def predict(config, layout, hw: Hardware, *, seq_len: int, sequences: int, micro_batch_size: int,
            recompute: bool = False, imbalance: float = 1.0, counts=None, items: Itemsizes | None = None,
            q: int = 2, overlap: bool = True) -> Prediction:
    """The predicted step of `layout` on `hw` (module docstring). `q`: bytes per activation element; `items`: bytes
    per element moved (default bf16 gathers and activations, fp32 reductions); `imbalance`: the busiest ep rank's
    routed rows over the mean (1 + its MaxVio); `counts`: recorded routing counts [rank][mb][layer] instead;
    `overlap`: the GPU overlap rules (False: the host's, nothing overlaps)."""
    items = items or Itemsizes(gather=2, reduce=4, act=2)
    works = step_work(config, layout, seq_len, sequences, micro_batch_size, q=q, recompute=recompute,
                      imbalance=imbalance)
    compute = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for w in works:
        compute[w.phase] += _op_seconds(w, hw) * hw.ranks_per_compute
    comm = {"gather": 0.0, "scatter": 0.0, "exchange": 0.0, "step": 0.0}
    for col in step_collectives(config, layout, sequences, seq_len, micro_batch_size, items, counts, recompute,
                                imbalance=imbalance):
        comm[col.phase] += _collective_seconds(col, layout, hw) * hw.ranks_per_compute
    fsdp = comm["gather"] + comm["scatter"]
    if overlap:
        fsdp = max(0.0, fsdp - compute["forward"] - compute["backward"])
    phases = {"forward": compute["forward"], "backward": compute["backward"], "fsdp exposed": fsdp,
              "ep/cp exchange": comm["exchange"], "optimizer": compute["optimizer"], "step collectives": comm["step"]}
    step = sum(phases.values())
    memory = memory_per_rank(config, layout, seq_len, micro_batch_size, recompute, q)
    flops = training_flops(config, sequences, seq_len)
    return Prediction(layout, micro_batch_size, recompute, phases, step, sequences * seq_len,
                      flops / (step * layout.world_size * hw.peak_flops), memory,
                      memory["total"] <= USABLE_MEMORY * hw.hbm_bytes,
                      {"comm": comm})
