"""Communication volume of one training step per layout: the traced bytes beside the plan's schedule, and their ratio.

    python benchmarks/comm_volume.py [--layouts "dp_shard=4;cp=2"] [--json] [--recompute] [--checksums]

For each layout, one step (compute_gradients + apply_update) of `tiny` with every feature on (layers 0-3: dense
sliding, MoE global, MoE sliding, MoE global; doc ids; balance loss; several micro-batches per rank) runs on a
VirtualCluster with the reference backend, every rank's mesh recording its collectives (the trace). Schedule: the
parallel plan's (trinity.distributed.schedule.step_schedule, without the trainer's stop agreement: no trainer runs
here), rank by rank; priced: what the cost model sums (trinity.simulate.planning.traffic_model.analytic). Neither reads the
mesh. The expert-parallel rows come from routing counts taken outside the step: a single-process forward of the
step's global batch with the same params gives every token's chosen experts, cut into each rank's rows, positions and
micro-batches (schedule.routing_counts).

The trace equals the schedule collective by collective on every rank (kind, group, bytes, phase, layer; the table's
last line says so), so every ratio is 1.000: there is nothing for it to be but equal. Float64 by default: in float32
a router score tie broken differently by the single-process forward than by a rank's (other shapes, other rounding)
would move a routed row, and the line would name the rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import numpy as np

from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed.parallel_ops import parallelize
from trinity.distributed.plan import ParallelPlan
from trinity.distributed.schedule import routing_counts, step_schedule
from trinity.reference import Config, init_params
from trinity.reference.model.objective import evaluate_losses
from trinity.reference.model.ops import REFERENCE
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.step import GlobalBatch, apply_update, compute_gradients
from trinity.simulate.planning.traffic_model import analytic
from trinity.simulate.virtual.virtual_comm import VirtualCluster

LAYOUTS = ["dp_shard=4", "dp_replicate=2,dp_shard=2", "dp_shard=2,ep=2", "dp_shard=4,ep=4", "cp=2", "cp=4",
           "dp_replicate=2,cp=2", "dp_shard=2,cp=2,ep=4", "dp_replicate=2,dp_shard=2,cp=2,ep=2"]


def bench_config() -> Config:
    """tiny (4 layers, layer 0 dense, E = 8, K = 2, shared expert) with layers S G S G and a window of 8."""
    return Config.preset("tiny").replace(global_attn_every_n_layers=2, sliding_window=8, intra_document_mask=True,
                                         balance_loss_coeff=1e-2)


def make_batch(config, S, T, seed=0) -> GlobalBatch:
    """Random tokens; two documents per sequence (split at a random position), so the doc ids travel too."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (S, T))
    doc_ids = (np.arange(T)[None, :] >= rng.integers(1, T, (S, 1))).astype(np.int64)
    return GlobalBatch(tokens, doc_ids=doc_ids)


# ---- traced ------------------------------------------------------------------------------------------------------
def _rank_step(comm, layout, config, params0, batch, mbs, recompute, checksums):
    mesh = Mesh(comm, layout, checksums=checksums, config=config)
    ops, params, opt = parallelize(REFERENCE, mesh, config, params0, init_optimizer_state(config, params0))
    bal = init_balancing_state(config, params0)
    mesh.record = True
    mesh.begin_step(1)
    g = compute_gradients(config, params, batch, micro_batch_size=mbs, ops=ops, mesh=mesh, recompute=recompute,
                          check=False)
    apply_update(config, params, opt, bal, g, 1e-2, 1e-3, ops=ops, mesh=mesh)
    return [(e["phase"], e["layer"], e["kind"], e["group"], e["bytes"]) for e in mesh.events]


def trace(layout, config, params0, batch, mbs, recompute=False, checksums=False) -> list:
    """Every rank's collectives of one step, [(phase, layer, kind, group, bytes)] per rank."""
    return VirtualCluster(layout.world_size).run(_rank_step, layout, config, params0, batch, mbs, recompute,
                                                 checksums)


# ---- the plan's schedule -----------------------------------------------------------------------------------------
def single_process_counts(plan, params0, batch, mbs) -> list:
    """counts[rank][mb][layer]: the experts every token chose in a single-process forward of the batch, cut by the
    plan's rows, positions and micro-batches."""
    _, stats = evaluate_losses(plan.config, params0, batch.tokens, batch.labels, batch.doc_ids)
    return routing_counts(plan, {layer: s["chosen_experts"] for layer, s in stats["layers"].items()}, mbs)


def schedule(plan, batch, mbs, itemsize, counts, recompute=False, checksums=False) -> list:
    """Every rank's scheduled collectives, as trace() lists them."""
    S, T = batch.shape
    return [[tuple(s) for s in step_schedule(plan, r, S, T, mbs, itemsize, recompute, batch.doc_ids is not None,
                                             counts, checksums=checksums, control=False)]
            for r in range(plan.world_size)]


def _first_difference(traced: list, scheduled: list) -> str | None:
    for rank, (a, b) in enumerate(zip(traced, scheduled)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"rank {rank}, collective {i}: traced {x}, scheduled {y}"
        if len(a) != len(b):
            return f"rank {rank}: {len(a)} collectives traced, {len(b)} scheduled"
    return None


def _totals(per_rank: list) -> dict:
    out = defaultdict(int)
    for calls in per_rank:
        for _, _, kind, group, nbytes in calls:
            out[(kind, group)] += nbytes
    return out


# ---- the table ---------------------------------------------------------------------------------------------------
def run_layout(text, config, params0, batch, mbs, recompute=False, checksums=False):
    """One layout's rows {kind, group, traced, scheduled, priced, ratio}, total and `difference` (None: every rank's
    trace is its schedule)."""
    layout = Layout.parse(text)
    S, T = batch.shape
    layout.check(world_size=layout.world_size, config=config, seq_len=T, micro_batch_size=mbs, batch_sizes=[S])
    plan = ParallelPlan(config, layout)
    itemsize = params0["model.embed_tokens.weight"].itemsize
    counts = single_process_counts(plan, params0, batch, mbs)
    traced = trace(layout, config, params0, batch, mbs, recompute, checksums)
    scheduled = schedule(plan, batch, mbs, itemsize, counts, recompute, checksums)
    a, b = _totals(traced), _totals(scheduled)
    priced = analytic(config, layout, S, T, mbs, itemsize, counts, recompute, batch.doc_ids is not None,
                      checksums=checksums, control=False)
    rows = [dict(kind=k, group=g, traced=a.get((k, g), 0), scheduled=b.get((k, g), 0), priced=priced.get((k, g), 0))
            for k, g in sorted(set(a) | set(b) | set(priced), key=lambda x: (x[1], x[0]))]
    total = {key: sum(r[key] for r in rows) for key in ("traced", "scheduled", "priced")}
    for r in rows + [total]:
        r["ratio"] = r["traced"] / r["scheduled"] if r["scheduled"] else (1.0 if not r["traced"] else None)
    return dict(layout=str(layout), ranks=layout.world_size, micro_batches=S // (layout.dp * mbs), rows=rows,
                total=total, collectives=sum(map(len, traced)), difference=_first_difference(traced, scheduled))


def exact(res) -> bool:
    """Every rank's trace is its schedule, and the cost model prices the same totals."""
    return res["difference"] is None and all(r["scheduled"] == r["priced"] for r in res["rows"])


def print_table(results, file=sys.stdout):
    """Per layout its (kind, group) rows and total, then one line per layout."""
    head = f"  {'kind':<21} {'group':<13} {'traced B':>12} {'scheduled B':>12} {'priced B':>12} {'ratio':>6}"
    for res in results:
        print(f"{res['layout']}: {res['ranks']} ranks, {res['micro_batches']} micro-batches per rank, "
              f"{res['collectives']} collectives traced", file=file)
        print(head, file=file)
        for r in res["rows"] + [dict(res["total"], kind="total", group="")]:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            print(f"  {r['kind']:<21} {r['group']:<13} {r['traced']:>12,} {r['scheduled']:>12,} {r['priced']:>12,} "
                  f"{ratio:>6}", file=file)
        print(file=file)
    print(f"{'layout':<36} {'ranks':>5} {'traced B':>12} {'scheduled B':>12} {'ratio':>6}  trace = schedule", file=file)
    for res in results:
        t = res["total"]
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
        verdict = "yes" if exact(res) else f"NO: {res['difference'] or 'the priced totals differ'}"
        print(f"{res['layout']:<36} {res['ranks']:>5} {t['traced']:>12,} {t['scheduled']:>12,} {ratio:>6}  {verdict}",
              file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=";".join(LAYOUTS), help="layouts separated by ';' (default: %(default)s)")
    ap.add_argument("--seqs", type=int, default=16, help="sequences per step (S)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (T)")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (B)")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--recompute", action="store_true", help="activation recompute (layers' forwards run twice)")
    ap.add_argument("--checksums", action="store_true", help="a crc32 with every message (counted in the bytes)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    config = bench_config()
    params0 = init_params(config, seed=1, dtype=np.dtype(args.dtype))
    batch = make_batch(config, args.seqs, args.seq_len)
    results = [run_layout(text.strip(), config, params0, batch, args.micro_batch, args.recompute, args.checksums)
               for text in args.layouts.split(";") if text.strip()]
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print_table(results)
    return 0 if all(map(exact, results)) else 1


if __name__ == "__main__":
    sys.exit(main())
