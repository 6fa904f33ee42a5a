"""Communication volume of one training step per layout: measured bytes beside the analytic volume, and their ratio.

    python benchmarks/comm_volume.py [--layouts "dp_shard=4;cp=2"] [--json] [--recompute]

For each layout, one step (compute_gradients + apply_update) of `tiny` with every feature on (layers 0-3: dense
sliding, MoE global, MoE sliding, MoE global; doc ids; balance loss; several micro-batches per rank) runs on a
VirtualCluster with the reference backend. Measured: every rank's `mesh.take_traffic()` after the step, summed over
ranks, per (kind, group). Analytic: `analytic()` below, from the config, layout, batch shape and the routing counts
only (it never reads mesh.traffic). Routing counts: each rank's expert counts [E] per MoE layer and micro-batch, as
its router chose them, recorded from the step's own statistics (Gradients.stats[mb]["layers"][l]["expert_counts"],
the counts of the dispatch plan of that rank's tokens).

Notation: W ranks, R = dp_replicate, F = dp_shard·cp (fsdp group), ep, cp, dp = R·dp_shard; S sequences of T tokens,
micro-batches of B sequences, m = S/(dp·B) per rank; d hidden, E experts (E_l = E/ep per rank), h_kv, d_h; q the
model's bytes per element; 8 bytes for int64 / float64 scalars. Ring conventions, bytes leaving one rank for a
send buffer of s bytes over n ranks: Allreduce ⌊2(n−1)s/n⌋, Reduce_scatter_block and Alltoall (n−1)s/n,
Allgather and Iallgather (n−1)s; Alltoallv: the bytes sent to other ranks. Every group of a given name has the same
size and every rank is in one of them, so for the symmetric collectives the total is W × the per-rank bytes.

FSDP (fsdp.py). Flat buckets: per model bucket (embed, each layer, head) one per optimizer group ("muon" |
"adamw", sharded over fsdp, n = F) plus the routed experts of a MoE layer (E_l experts' w1, w3, w2, over
efsdp, n = F/ep); expert_bias is not in any. Size z = Σ elements, padded to P = ⌈z/n⌉·n, shard P/n.
  Iallgather  [group]          per gather of a model bucket, per flat bucket: (n−1)·(P/n)·q per rank. Gathers per
                               micro-batch: embed 1 (+2 tied: the head's forward and backward), each layer 2
                               (forward, backward; recompute reuses the backward's), head 2 (forward, backward).
  Reduce_scatter_block [group] per micro-batch, per flat bucket: (n−1)·(P/n)·q per rank.
  Allreduce dp_replicate       once per step (after the micro-batches), per flat bucket: ⌊2(R−1)·(P/n)·q/R⌋ per rank.
Distributed Muon (sharded_optim.py), per Muon flat bucket with n > 1: each matrix (a stacked [E_l, o, i] is E_l)
has an owner, largest o·i·min(o, i) first, each to the least-loaded rank (ties: lowest); every element held by a
rank other than its matrix's owner goes to the owner (Alltoallv #1) and comes back orthogonalised (#2):
  Alltoallv [group]            2·q·Σ_matrices |matrix outside the owner's shard|, per group (R groups of fsdp,
                               R·ep of efsdp).
EP (expert_parallel.py), per MoE layer per micro-batch (×2 forward exchanges with recompute), per ep group g:
  Alltoall ep                  counts [ep, E_l] int64: ep·(ep−1)·E_l·8 per group.
  Alltoallv ep                 dispatch, combine, combine backward, dispatch backward each move the X_g routed rows
                               that leave their rank: X_g = Σ_{r∈g} Σ_{e not on r} c_r[e] (c_r: rank r's counts),
                               4·X_g·d·q per group (+2·X_g·d·q with recompute).
CP (context_parallel.py), per micro-batch, T_l = T/cp tokens per rank, kv = 2·B·h_kv·d_h·q bytes per position:
  Allgather cp                 global layer: k,v (cp−1)·T_l·kv and doc ids (cp−1)·B·T_l·8 per rank (×2 with
                               recompute).
  Reduce_scatter_block cp      global layer backward: dk,dv laid out by owner [cp, …]: (cp−1)·T_l·kv per rank.
  Alltoallv cp                 sliding layer, halo h = w−1 > 0: 2(cp−1) halos per cp group (each rank but the
                               first gets one from r−1, each but the last one from r+1): 2(cp−1)·h·(kv + B·8) forward
                               (k,v and doc ids; ×2 recompute), 2(cp−1)·h·kv backward (the halos' gradients).
  Allreduce cp                 balance loss sequence_sum, per MoE layer: counts [B, E]·q; and once per step the
                               micro-batch losses, m·8 (BatchHet).
Step reductions (reference/training/step.py, sharded_optim.py), once per step, each a separate Allreduce:
  world                        expert counts per MoE layer E·8; the four loss parts 4·8; logits max 8; logits mean 8.
  dp                           BatchHet max 8 and sum 8 (when m·dp ≥ 2).
  fsdp ("shards")              gradient norm² 8; the optimizer's update norms² 2·8.
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
from trinity.reference.model.params import is_expert_bias, param_buckets, param_shapes
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.optim import init_optimizer_state, param_group
from trinity.reference.training.step import GlobalBatch, apply_update, compute_gradients
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


# ---- analytic ----------------------------------------------------------------------------------------------------
def ring(kind, n, s):
    """Bytes leaving one rank for a send buffer of s bytes over n ranks (the ring conventions above)."""
    if n == 1:
        return 0
    return {"Allreduce": 2 * (n - 1) * s // n, "Reduce_scatter_block": (n - 1) * s // n,
            "Alltoall": (n - 1) * s // n}.get(kind, (n - 1) * s)


def flat_buckets(config, ep):
    """{model bucket: [(group, optimizer, [local shapes])]}: the FSDP flat buckets, from the parameter shapes."""
    shapes, out = param_shapes(config), {}
    for model_bucket, keys in param_buckets(config).items():
        parts = {}
        for key in keys:
            if is_expert_bias(key):
                continue
            shape, routed = tuple(shapes[key]), ".mlp.experts." in key
            if routed:
                shape = (shape[0] // ep,) + shape[1:]
            opt = param_group(config, key, shape)
            parts.setdefault("experts" if routed else opt, ("efsdp" if routed else "fsdp", opt, []))[2].append(shape)
        out[model_bucket] = list(parts.values())
    return out


def muon_moved(shapes, n):
    """Elements of a Muon bucket over n ranks that are not on their matrix's owner (documented owner rule)."""
    matrices, at = [], 0
    for shape in shapes:
        rows, cols = shape[-2:]
        for _ in range(int(np.prod(shape[:-2], dtype=np.int64))):
            matrices.append((at, at + rows * cols, rows, cols))
            at += rows * cols
    shard, load, moved = -(-at // n), [0] * n, 0
    for lo, hi, rows, cols in sorted(matrices, key=lambda m: (-m[2] * m[3] * min(m[2], m[3]), m[0])):
        owner = min(range(n), key=lambda q: (load[q], q))
        load[owner] += rows * cols * min(rows, cols)
        moved += (hi - lo) - max(0, min(hi, (owner + 1) * shard) - max(lo, owner * shard))
    return moved


def analytic(config, layout, S, T, mbs, itemsize, counts, recompute=False, doc_ids=True):
    """{(kind, group): bytes summed over ranks} of one step (module docstring). counts[rank][mb][layer] = the
    rank's routing counts [E] (only read under ep > 1)."""
    c, L = config, layout
    W, R, F, cp, ep, q = L.world_size, L.dp_replicate, L.dp_shard * L.cp, L.cp, L.ep, itemsize
    size = {"world": W, "dp": L.dp, "cp": cp, "fsdp": F, "efsdp": F // ep, "dp_replicate": R, "ep": ep}
    m, B, E, d = S // (L.dp * mbs), mbs, c.num_experts, c.hidden_size
    fwd = 2 if recompute else 1  # forward exchanges of a layer (again in the backward under recompute)
    moe = [l for l in range(c.num_hidden_layers) if c.is_moe_layer(l)]
    out = defaultdict(int)

    def per_rank(kind, group, s, times=1):  # a symmetric collective, every rank s bytes: W × per-rank bytes
        out[(kind, group)] += times * W * ring(kind, size[group], s)

    # FSDP: gathers, reduce-scatters, dp_replicate all-reduces; distributed Muon
    gathers = {"embed": 1 + 2 * bool(c.tie_word_embeddings), "head": 2, **{l: 2 for l in range(c.num_hidden_layers)}}
    for model_bucket, parts in flat_buckets(c, ep).items():
        for group, opt, shapes in parts:
            n = size[group]
            shard = -(-sum(int(np.prod(s)) for s in shapes) // n) * q
            per_rank("Iallgather", group, shard, m * gathers[model_bucket])
            per_rank("Reduce_scatter_block", group, shard * n, m)
            per_rank("Allreduce", "dp_replicate", shard, 1)
            if opt == "muon" and n > 1:
                out[("Alltoallv", group)] += 2 * q * muon_moved(shapes, n) * (W // n)
    # EP: counts and four row exchanges per MoE layer per micro-batch, per ep group
    if ep > 1:
        El = E // ep
        for layer in moe:
            per_rank("Alltoall", "ep", E * 8, m * fwd)
            for rank in range(W):
                f = rank % F
                local = slice(f % ep * El, (f % ep + 1) * El)
                for mb in range(m):
                    c_r = np.asarray(counts[rank][mb][layer])
                    leaving = int(c_r.sum() - c_r[local].sum())
                    out[("Alltoallv", "ep")] += (2 * fwd + 2) * leaving * d * q
    # CP: k,v gathering / halos, their gradients, the balance loss's per-sequence counts, the micro-batch losses
    if cp > 1:
        Tl, kv = T // cp, 2 * B * c.num_key_value_heads * c.head_dim * q
        for layer in range(c.num_hidden_layers):
            w = c.window_of(layer)
            if w is None:
                per_rank("Allgather", "cp", Tl * kv, m * fwd)
                if doc_ids:
                    per_rank("Allgather", "cp", B * Tl * 8, m * fwd)
                per_rank("Reduce_scatter_block", "cp", cp * Tl * kv, m)
            elif w > 1:
                halos = 2 * (cp - 1) * (w - 1) * (W // cp)  # halos of every cp group
                out[("Alltoallv", "cp")] += m * halos * (fwd * (kv + (B * 8 if doc_ids else 0)) + kv)
        if c.balance_loss_coeff > 0:
            per_rank("Allreduce", "cp", B * E * q, m * len(moe))
        per_rank("Allreduce", "cp", m * 8)
    # step reductions
    for s in [E * 8] * len(moe) + [4 * 8, 8, 8]:
        per_rank("Allreduce", "world", s)
    if m * L.dp >= 2:
        per_rank("Allreduce", "dp", 8, 2)
    per_rank("Allreduce", "fsdp", 8)
    per_rank("Allreduce", "fsdp", 2 * 8)
    return {k: v for k, v in out.items() if v}


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
