"""The cost model: step time by phase, MFU, memory per rank and days for a token budget, for a model, a layout and
a piece of hardware (docs/simulation.md).

Inputs are the two analytic accounts of a step: the compute of the busiest rank, operator by operator
(trinity.simulate.planning.workload), and every collective with the bytes that leave the busiest rank
(trinity.simulate.planning.traffic_model, whose byte counts equal what the simulator's traces record). Each is timed:

  operator      on a GPU max(FLOPs / (peak · efficiency of its kind), bytes / (HBM bandwidth · memory efficiency));
                on the host (a calibrated Hardware) the measured seconds per call plus per FLOP or byte of that
                operator.
  collective    bytes / (link bandwidth · link efficiency) + calls · latency steps · latency. A group within one node
                (`ranks_per_node` consecutive ranks) moves its bytes over NVLink. A group across nodes with k members
                on each: a ring or tree collective runs k rings at once (NCCL's channels), each crossing the node
                boundary through another GPU's network card, so its bytes go at min(NVLink, k × network card); an
                all-to-all sends the share of its bytes bound for peers off the node ((n−k)/(n−1)) through the
                rank's own card, the rest over NVLink, the slower of the two. The latency steps of a call are its
                rule's (overlap.py: n−1 for a ring, 2⌈log₂n⌉ for an all-reduce's tree, 1 for an Alltoallv whose
                messages to every peer are posted at once), at the network's latency once the group spans nodes.

Overlap rules, per collective (overlap.py states the table; stated, not measured):
  host          nothing overlaps: MPI on one machine progresses only inside MPI calls, and ranks share the cores,
                so every second of compute or communication is multiplied by ranks/cores when ranks exceed cores.
  GPU           a collective whose rule hides it under a pass (the prefetched FSDP gathers; a reduce-scatter the
                schedule posts non-blocking; a replica all-reduce bucketed into the backward) is exposed only by what
                the pass's hidden traffic exceeds of that pass's compute, max(0, hidden − compute) per pass; every
                other collective (a blocking reduce-scatter, the expert-parallel all-to-alls, the context-parallel
                exchanges, the once-per-step reductions and distributed Muon's exchanges) is on the critical path,
                as is the optimizer.

Memory per rank (GPU, mixed precision: bf16 compute copies, fp32 master weights, gradients and optimizer state): the
busiest rank's peak from distributed/rank_memory.py, the same function the trainer's pre-flight check calls: fp32
shards of params and gradients (one set per micro-batch alive, up to three with accumulation), Muon momentum (4 B) or
AdamW moments (8 B) per shard element, the gathered bf16 buckets alive at once (the current and the prefetched one)
with one bucket's whole gradient and its reduce-scatter buffers, activations of one micro-batch from
reference/training/memory.py's operator-by-operator count at T/cp tokens (with or without recompute), the keys and
values context parallel gathers, and the optimizer step's transient; the peak of the backward, the loss and the
update. A layout fits when that total is at most `usable` (0.9) of the HBM: the rest is the allocator's and the
communication library's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from trinity.distributed.mesh import group_members
from trinity.distributed.rank_memory import busiest_rank, estimate_rank_bytes
from trinity.reference.training.memory import estimate_step_bytes

from .hardware import Hardware
from .traffic_model import Itemsizes, step_collectives
from .workload import step_work, training_flops

__all__ = ["Prediction", "Account", "predict", "account", "time_account", "USABLE_MEMORY", "PHASES"]

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


@functools.lru_cache(maxsize=4096)
def link_shape(layout, group: str, ranks_per_node: int) -> tuple[int, int]:
    """(members of rank 0's group `group` on rank 0's node, nodes the group spans), nodes of `ranks_per_node`
    consecutive ranks."""
    members = group_members(layout, group)
    nodes: dict = {}
    for r in members:
        nodes[r // ranks_per_node] = nodes.get(r // ranks_per_node, 0) + 1
    return nodes[members[0] // ranks_per_node], len(nodes)


def _collective_seconds(col, layout, hw: Hardware) -> float:
    """A collective's seconds (module docstring): within a node, its bytes over NVLink; across nodes, a ring or a
    tree of k members per node runs k rings at once (NCCL's channels), each crossing a node boundary through another
    GPU's network card, so its bytes go at min(NVLink, k × the card); an all-to-all's messages to the peers off the
    node (n−k of n−1) leave through the rank's own card while the rest take NVLink."""
    k, nodes = link_shape(layout, col.group, hw.ranks_per_node)
    nvlink, near = hw.link("intra-node")
    if nodes <= 1:
        return col.rank_bytes / nvlink + col.latency_steps * near
    network, far = hw.link("inter-node")
    if col.latency in ("direct", "bruck"):
        off = (col.n - k) / (col.n - 1)
        seconds = max(col.rank_bytes * (1.0 - off) / nvlink, col.rank_bytes * off / network)
    else:
        seconds = col.rank_bytes / min(nvlink, k * network)
    return seconds + col.latency_steps * far


_Q_DTYPES = {2: np.float16, 4: np.float32, 8: np.float64}  # bytes per activation element → a dtype of that size


def memory_per_rank(config, layout, seq_len: int, micro_batch_size: int, recompute: bool, q: int = 2,
                    micro_steps: int = 1) -> dict:
    """Bytes on the busiest GPU of `layout` (module docstring): distributed/rank_memory.estimate_rank_bytes of
    rank_memory.busiest_rank, fp32 state, `q`-byte activations and gathered weights, on a GPU (no host baseline,
    save or startup). Its parts ("params", "grads", "optimizer", "gathered", "context", "update"), "activations" (one
    micro-batch's activations, logits and workspace at T/cp tokens, as estimate_step_bytes counts them), "total" (the
    peak, which counts them at its phase), "phase" and "rank"."""
    kw = dict(compute_dtype=_Q_DTYPES[q], device="gpu")
    rank = _busiest(config, layout, seq_len, micro_batch_size, recompute, micro_steps, q)
    e = estimate_rank_bytes(config, layout, rank, seq_len, micro_batch_size, np.float32, recompute, micro_steps, **kw)
    out = {k: e[k] for k in ("params", "grads", "optimizer", "gathered", "context", "update")}
    one = _step_bytes(config, micro_batch_size, seq_len // layout.cp, _Q_DTYPES[q], recompute)
    out["activations"] = one["activations"] + one["logits"] + one["workspace"]
    out.update(total=e["total"], phase=e["phase"], rank=rank)
    return out


_step_bytes = functools.lru_cache(maxsize=1024)(estimate_step_bytes)


@functools.lru_cache(maxsize=4096)
def _busiest(config, layout, seq_len, micro_batch_size, recompute, micro_steps, q) -> int:
    return busiest_rank(config, layout, seq_len, micro_batch_size, np.float32, recompute, micro_steps,
                        compute_dtype=_Q_DTYPES[q], device="gpu")


@dataclass
class Account:
    """What a step does, independent of the hardware: the busiest rank's operators (workload.Work), its collectives
    (traffic_model.Collective), its memory (memory_per_rank) and the step's training FLOPs and tokens. time_account
    times it on a Hardware; re-timing one account under other efficiencies costs no new account."""
    layout: object
    micro_batch_size: int
    recompute: bool
    works: list
    collectives: list
    memory: dict
    flops: float
    tokens: int


def account(config, layout, *, seq_len: int, sequences: int, micro_batch_size: int, recompute: bool = False,
            imbalance: float = 1.0, counts=None, items: Itemsizes | None = None, q: int = 2,
            memory: bool = True) -> Account:
    """The hardware-free account of a step (predict's arguments); `memory=False` leaves the memory out (a total of
    0: for re-timing only)."""
    items = items or Itemsizes(gather=2, reduce=4, act=2)
    works = step_work(config, layout, seq_len, sequences, micro_batch_size, q=q, recompute=recompute,
                      imbalance=imbalance)
    cols = step_collectives(config, layout, sequences, seq_len, micro_batch_size, items, counts, recompute,
                            imbalance=imbalance)
    memory = memory_per_rank(config, layout, seq_len, micro_batch_size, recompute, q,
                             micro_steps=max(1, sequences // (layout.dp * micro_batch_size))) if memory else {"total": 0}
    return Account(layout, micro_batch_size, recompute, works, cols, memory, training_flops(config, sequences, seq_len),
                   sequences * seq_len)


def time_account(acc: Account, hw: Hardware, overlap: bool = True) -> Prediction:
    """The predicted step of an account on `hw` (module docstring): compute by pass, each collective under its
    overlap rule (overlap.py), exposed what its pass's compute does not hide; `overlap=False`: the host's rule,
    every collective on the critical path."""
    compute = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for w in acc.works:
        compute[w.phase] += _op_seconds(w, hw) * hw.ranks_per_compute
    comm = {"fsdp": 0.0, "exchange": 0.0, "step": 0.0}
    hidable = {"forward": 0.0, "backward": 0.0}
    for col in acc.collectives:
        seconds = _collective_seconds(col, acc.layout, hw) * hw.ranks_per_compute
        if overlap and col.hides_under in hidable:
            hidable[col.hides_under] += seconds
        else:
            comm[col.phase] += seconds
    exposed = {p: max(0.0, hidable[p] - compute[p]) for p in hidable}
    phases = {"forward": compute["forward"], "backward": compute["backward"],
              "fsdp exposed": comm["fsdp"] + sum(exposed.values()), "ep/cp exchange": comm["exchange"],
              "optimizer": compute["optimizer"], "step collectives": comm["step"]}
    step = sum(phases.values())
    layout = acc.layout
    return Prediction(layout, acc.micro_batch_size, acc.recompute, phases, step, acc.tokens,
                      acc.flops / (step * layout.world_size * hw.peak_flops), acc.memory,
                      acc.memory["total"] <= USABLE_MEMORY * hw.hbm_bytes,
                      {"comm": comm, "hidable": hidable, "hidden": {p: hidable[p] - exposed[p] for p in hidable}})


def predict(config, layout, hw: Hardware, *, seq_len: int, sequences: int, micro_batch_size: int,
            recompute: bool = False, imbalance: float = 1.0, counts=None, items: Itemsizes | None = None,
            q: int = 2, overlap: bool = True) -> Prediction:
    """The predicted step of `layout` on `hw` (module docstring). `q`: bytes per activation element; `items`: bytes
    per element moved (default bf16 gathers and activations, fp32 reductions); `imbalance`: the busiest ep rank's
    routed rows over the mean (1 + its MaxVio); `counts`: recorded routing counts [rank][mb][layer] instead;
    `overlap`: the GPU overlap rules (False: the host's, nothing overlaps)."""
    acc = account(config, layout, seq_len=seq_len, sequences=sequences, micro_batch_size=micro_batch_size,
                  recompute=recompute, imbalance=imbalance, counts=counts, items=items, q=q)
    return time_account(acc, hw, overlap)
