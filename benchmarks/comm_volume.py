"""Communication volume of one training step per layout: measured bytes beside the analytic volume, and their ratio.

    python benchmarks/comm_volume.py [--layouts "dp_shard=4;cp=2"] [--json] [--recompute]

For each layout, one step (compute_gradients + apply_update) of `tiny` with every feature on (layers 0-3: dense
sliding, MoE global, MoE sliding, MoE global; doc ids; balance loss; several micro-batches per rank) runs on a
VirtualCluster with the reference backend. Measured: every rank's `mesh.take_traffic()` after the step, summed over
ranks, per (kind, group). Analytic: `analytic()` (trinity.simulate.traffic_model), from the config, layout, batch shape and the routing counts
only (it never reads mesh.traffic). Routing counts: each rank's expert counts [E] per MoE layer and micro-batch, as
its router chose them, recorded from the step's own statistics (Gradients.stats[mb]["layers"][l]["expert_counts"],
the counts of the dispatch plan of that rank's tokens).

The formulas of every collective (notation, ring conventions, FSDP, distributed Muon, EP, CP and the step's
reductions) are in trinity.simulate.traffic_model, which the cost model (trinity.simulate.cost_model) times.
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
from trinity.reference import Config, init_params
from trinity.reference.model.ops import REFERENCE
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.step import GlobalBatch, apply_update, compute_gradients
from trinity.simulate.traffic_model import analytic
from trinity.simulate.virtual_comm import VirtualCluster

LAYOUTS = ["dp_shard=4", "dp_replicate=2,dp_shard=2", "dp_shard=2,ep=2", "dp_shard=4,ep=4", "cp=2", "cp=4",
           "dp_replicate=2,cp=2", "dp_shard=2,cp=2,ep=4", "dp_replicate=2,dp_shard=2,cp=2,ep=2"]
BAND = (1.00, 1.05)


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


# ---- measured ----------------------------------------------------------------------------------------------------
def _rank_step(comm, layout, config, params0, batch, mbs, recompute):
    mesh = Mesh(comm, layout)
    ops, params, opt = parallelize(REFERENCE, mesh, config, params0, init_optimizer_state(config, params0))
    bal = init_balancing_state(config, params0)
    mesh.take_traffic()  # nothing before the step counts
    g = compute_gradients(config, params, batch, micro_batch_size=mbs, ops=ops, mesh=mesh, recompute=recompute,
                          check=False)
    apply_update(config, params, opt, bal, g, 1e-2, 1e-3, ops=ops, mesh=mesh)
    counts = [{layer: np.asarray(s["expert_counts"]).copy() for layer, s in st["layers"].items()} for st in g.stats]
    return mesh.take_traffic(), counts


def measure(layout, config, params0, batch, mbs, recompute=False):
    """({(kind, group): bytes summed over ranks}, routing counts [rank][micro-batch]{layer: [E]})."""
    out = VirtualCluster(layout.world_size).run(_rank_step, layout, config, params0, batch, mbs, recompute)
    total = defaultdict(int)
    for traffic, _ in out:
        for key, nbytes in traffic.items():
            total[key] += int(nbytes)
    return dict(total), [counts for _, counts in out]


# ---- analytic: trinity.simulate.traffic_model (its docstring has every formula) --------------------------------


# ---- the table -----------------------------------------------------------------------------------------------
def run_layout(text, config, params0, batch, mbs, recompute=False):
    """One layout's rows {kind, group, measured, analytic, ratio} and total."""
    layout = Layout.parse(text)
    S, T = batch.shape
    layout.check(world_size=layout.world_size, config=config, seq_len=T, micro_batch_size=mbs, batch_sizes=[S])
    measured, counts = measure(layout, config, params0, batch, mbs, recompute)
    expected = analytic(config, layout, S, T, mbs, params0["model.embed_tokens.weight"].itemsize, counts,
                        recompute, batch.doc_ids is not None)
    rows = [dict(kind=k, group=g, measured=measured.get((k, g), 0), analytic=expected.get((k, g), 0))
            for k, g in sorted(set(measured) | set(expected), key=lambda x: (x[1], x[0]))]
    total = dict(measured=sum(r["measured"] for r in rows), analytic=sum(r["analytic"] for r in rows))
    for r in rows + [total]:
        r["ratio"] = r["measured"] / r["analytic"] if r["analytic"] else (1.0 if not r["measured"] else None)
    return dict(layout=str(layout), ranks=layout.world_size, micro_batches=S // (layout.dp * mbs), rows=rows,
                total=total)


def in_band(ratio) -> bool:
    return ratio is not None and BAND[0] <= round(ratio, 4) <= BAND[1]


def print_table(results, file=sys.stdout):
    """Per layout its (kind, group) rows and total, then one line per layout."""
    head = f"  {'kind':<21} {'group':<13} {'measured B':>12} {'analytic B':>12} {'ratio':>6}"
    for res in results:
        print(f"{res['layout']}: {res['ranks']} ranks, {res['micro_batches']} micro-batches per rank", file=file)
        print(head, file=file)
        for r in res["rows"] + [dict(res["total"], kind="total", group="")]:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            print(f"  {r['kind']:<21} {r['group']:<13} {r['measured']:>12,} {r['analytic']:>12,} {ratio:>6}",
                  file=file)
        print(file=file)
    print(f"{'layout':<36} {'ranks':>5} {'measured B':>12} {'analytic B':>12} {'ratio':>6}", file=file)
    for res in results:
        t = res["total"]
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
        print(f"{res['layout']:<36} {res['ranks']:>5} {t['measured']:>12,} {t['analytic']:>12,} {ratio:>6}",
              file=file)
    bad = [res["layout"] for res in results if not all(in_band(r["ratio"]) for r in res["rows"] + [res["total"]])]
    print(f"every ratio in [{BAND[0]:.2f}, {BAND[1]:.2f}]: " + ("yes" if not bad else f"NO ({'; '.join(bad)})"),
          file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=";".join(LAYOUTS), help="layouts separated by ';' (default: %(default)s)")
    ap.add_argument("--seqs", type=int, default=16, help="sequences per step (S)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (T)")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (B)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--recompute", action="store_true", help="activation recompute (layers' forwards run twice)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    config = bench_config()
    params0 = init_params(config, seed=1, dtype=np.dtype(args.dtype))
    batch = make_batch(config, args.seqs, args.seq_len)
    results = [run_layout(text.strip(), config, params0, batch, args.micro_batch, args.recompute)
               for text in args.layouts.split(";") if text.strip()]
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print_table(results)
    return 0 if all(in_band(r["ratio"]) for res in results for r in res["rows"] + [res["total"]]) else 1


if __name__ == "__main__":
    sys.exit(main())
