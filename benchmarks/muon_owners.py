"""Distributed Muon's bytes per step with balanced and local owners, side by side (the option muon_owners).

    python benchmarks/muon_owners.py [--preset bench-medium] [--layouts "dp_shard=4;cp=2"] [--trace] [--json]

For each layout (benchmarks/comm_volume.py's), the bytes all ranks send in one step's Muon exchanges (two Alltoallv
per Muon flat bucket over more than one rank, float32 optimizer state: 4 bytes per element) from the plan's
schedule (trinity.distributed.schedule.step_program), with muon_owners=balanced and muon_owners=local; the whole
step's bytes beside them (2 micro-batches of 1 sequence of --seq-len tokens per rank, the routed rows by the planning
assumption: spread evenly over the experts); and the plan's stated balance under each rule
(ParallelPlan.muon_balance): the fraction of the Muon elements that travel, and max / mean over a replica's ranks
of the elements each owns and of its Newton–Schulz work, summed over the step (`work`), and of the busiest owner of
each bucket summed over the buckets (`waits`: each bucket's second exchange waits for its busiest owner).

The schedule is what the step calls (tests/test_muon_owners.py: every rank's trace equals it on virtual ranks; the
Muon bytes depend on the shapes alone, not on the data). With --trace each layout's optimizer step also runs on
virtual ranks (random float32 shards, the reference kernels, one Newton–Schulz iteration: the bytes do not depend on
their number) with every rank's mesh recording, and the line says whether each rank's traced Muon exchanges are its
scheduled ones, byte for byte (bench-medium: about 1.5 GiB and a minute per layout and rule on one core).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from trinity.distributed.layout import Layout
from trinity.distributed.plan import ParallelPlan
from trinity.distributed.schedule import Itemsizes, step_program
from trinity.reference import Config

LAYOUTS = ["dp_shard=4", "dp_replicate=2,dp_shard=2", "dp_shard=2,ep=2", "dp_shard=4,ep=4", "cp=2", "cp=4",
           "dp_replicate=2,cp=2", "dp_shard=2,cp=2,ep=4", "dp_replicate=2,dp_shard=2,cp=2,ep=2"]
ITEMS = Itemsizes(4, 4, 4)  # float32 parameters, gradients and optimizer state, activations


def scheduled(config, layout: Layout, seq_len: int) -> dict:
    """{"muon": bytes of every rank's Muon exchanges, "step": every rank's bytes of the whole step, "per_rank": the
    Muon bytes of each rank's Alltoallv calls in order} from the schedule."""
    plan = ParallelPlan(config, layout)
    program = step_program(plan, 2 * layout.dp, seq_len, 1, ITEMS)
    per_rank = [program.for_rank(r) for r in range(layout.world_size)]
    muon = [[s.bytes for s in calls if s.phase == "optimizer" and s.kind == "Alltoallv"] for calls in per_rank]
    return {"muon": sum(map(sum, muon)), "step": sum(s.bytes for calls in per_rank for s in calls), "per_rank": muon}


def traced(config, layout: Layout) -> list:
    """Each rank's traced Muon exchanges (bytes of its optimizer-phase Alltoallv calls, in order) in one optimizer
    step on virtual ranks: random float32 shards and gradients, zero momentum, one Newton–Schulz iteration."""
    from trinity.distributed.fsdp import ShardedParams
    from trinity.distributed.mesh import Mesh
    from trinity.distributed.sharded_optim import init_sharded_optimizer_state, sharded_optimizer_step
    from trinity.simulate.virtual.virtual_comm import VirtualCluster

    config = config.replace(muon_ns_steps=1)

    def rank(comm):
        mesh = Mesh(comm, layout, config=config)
        rng = np.random.default_rng(comm.Get_rank())
        buckets = mesh.plan.buckets(comm.Get_rank())
        shards = {b.shard_name: rng.standard_normal(b.shard_size).astype(np.float32) for b in buckets}
        params = ShardedParams(config, mesh, buckets, shards, {})
        grads = {k: rng.standard_normal(v.size).astype(np.float32) for k, v in shards.items()}
        state = init_sharded_optimizer_state(config, params)
        mesh.record = True
        mesh.begin_step(1)
        mesh.set_phase("optimizer")
        sharded_optimizer_step(mesh, config, params, grads, state, 1e-3, 1e-3)
        return [e["bytes"] for e in mesh.events if e["kind"] == "Alltoallv"]

    return VirtualCluster(layout.world_size).run(rank)


def run_layout(config, text: str, seq_len: int, trace: bool) -> dict:
    out = {"layout": text}
    for rule in ("balanced", "local"):
        layout = Layout.parse(f"{text},muon_owners={rule}")
        s = scheduled(config, layout, seq_len)
        out[rule] = {"muon_bytes": s["muon"], "step_bytes": s["step"], **ParallelPlan(config, layout).muon_balance()}
        if trace:
            out[rule]["trace_is_schedule"] = traced(config, layout) == s["per_rank"]
    return out


def print_table(preset: str, results: list, file=sys.stdout) -> None:
    print(f"{preset}: bytes of one step's Muon exchanges, all ranks, float32; step = the whole step's bytes", file=file)
    print(f"{'layout':<36} {'balanced B':>12} {'local B':>12} {'local/bal':>9} {'step bal B':>14} {'step local B':>14}"
          f"  {'moved bal/loc':>13}  {'elements':>9}  {'work':>9}  {'waits':>9}", file=file)
    for r in results:
        b, loc = r["balanced"], r["local"]
        ratio = loc["muon_bytes"] / b["muon_bytes"] if b["muon_bytes"] else float("nan")
        line = (f"{r['layout']:<36} {b['muon_bytes']:>12,} {loc['muon_bytes']:>12,} {ratio:>9.3f} "
                f"{b['step_bytes']:>14,.0f} {loc['step_bytes']:>14,.0f}  {b['moved']:>6.1%}/{loc['moved']:<6.1%}"
                + "".join(f"  {b[k]:>4.2f}/{loc[k]:<4.2f}" for k in ("elements", "work", "waits")))
        if "trace_is_schedule" in b:
            same = b["trace_is_schedule"] and loc["trace_is_schedule"]
            line += "  trace = schedule" if same else "  TRACE DIFFERS"
        print(line, file=file)
    print("elements, work, waits: max / mean over a replica's ranks, balanced/local (ParallelPlan.muon_balance)",
          file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-medium")
    ap.add_argument("--layouts", default=";".join(LAYOUTS), help="layouts separated by ';' (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence, for the whole step's bytes")
    ap.add_argument("--trace", action="store_true", help="also run each optimizer step on virtual ranks")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    config = Config.preset(args.preset)
    results = [run_layout(config, text.strip(), args.seq_len, args.trace)
               for text in args.layouts.split(";") if text.strip()]
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print_table(args.preset, results)
    return 0 if all(r[k].get("trace_is_schedule", True) for r in results for k in ("balanced", "local")) else 1


if __name__ == "__main__":
    sys.exit(main())
