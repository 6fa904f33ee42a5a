"""One training step per layout, drawn from the real code: which collective runs on which group, in what order, with
how many bytes (docs/distributed.md).

    python benchmarks/draw_layouts.py [--out docs/figures/step_per_layout.png] [--layouts "cp=2;dp_shard=2"]

Each layout runs one step (compute_gradients + apply_update) of comm_volume.py's model (`tiny`, layers 0-3 dense
sliding, MoE global, MoE sliding, MoE global, window 8, doc ids, balance loss), float32, on a VirtualCluster with the
reference backend. The global batch is the same for every layout (8 sequences of 32 tokens); micro_batch_size is
chosen so that every rank runs 2 micro-batches. Nothing is drawn by hand: `Recorder` (a Mesh) records every call of
`Mesh.collective` in order, with the bytes Mesh counts for it (those leaving the rank, ring conventions), the phase
the rank is in and the function that asked for it. The phases come from the seams as the model calls them: a
micro-batch's forward begins with gather_params("embed"), its backward with hand_back_grads("head"); after
hand_back_grads("embed") the rank is in the step's reductions until the next forward; apply_update is "optimizer".
The script checks that every rank calls the same (phase, kind, group) sequence; the figure shows rank 0's bytes.

Printed: per layout, rank 0's collectives in order, consecutive calls of the same (phase, site, kind, group) merged,
and the bytes each rank holds (params, optimizer state) beside the single process's.
"""

from __future__ import annotations

import argparse
import os
import sys
from itertools import groupby

import numpy as np

from trinity.distributed.fsdp import ShardedParams
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import GROUPS, Mesh
from trinity.distributed.parallel_ops import ParallelOps
from trinity.distributed.sharded_optim import shard_optimizer_state
from trinity.reference import init_params
from trinity.reference.model.ops import REFERENCE
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.step import apply_update, compute_gradients
from trinity.simulate.virtual.virtual_comm import VirtualCluster

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comm_volume import bench_config, make_batch  # noqa: E402  (the model and batch of the volume table)

LAYOUTS = ["dp_shard=2", "dp_replicate=2,dp_shard=2", "dp_shard=2,ep=2", "cp=2", "dp_replicate=2,dp_shard=2,cp=2,ep=2"]
GROUP_ROWS = ["fsdp", "efsdp", "ep", "cp", "dp_replicate", "dp", "world"]  # top to bottom
KINDS = ["Iallgather", "Allgather", "Reduce_scatter_block", "Alltoall", "Alltoallv", "Allreduce"]
COLORS = dict(zip(KINDS, ["#4c78a8", "#72b7b2", "#e45756", "#b279a2", "#f58518", "#54a24b"]))
_MESH_FILE = os.path.abspath(sys.modules[Mesh.__module__].__file__)


class Recorder(Mesh):
    """A Mesh that records its collectives: [(phase, kind, group, bytes sent, site)] in call order."""

    def __init__(self, comm, layout):
        super().__init__(comm, layout)
        self.phase, self.calls = "setup", []

    def collective(self, kind, group, *args, op=None, sent_bytes=None):
        before = self.traffic[(kind, group)]
        out = super().collective(kind, group, *args, op=op, sent_bytes=sent_bytes)
        frame = sys._getframe(1)  # the site: the first public function outside mesh.py that asked
        while os.path.abspath(frame.f_code.co_filename) == _MESH_FILE or frame.f_code.co_name[0] in "_<":
            frame = frame.f_back
        site = f"{os.path.basename(frame.f_code.co_filename)[:-3]}.{frame.f_code.co_name}"
        self.calls.append((self.phase, kind, group, self.traffic[(kind, group)] - before, site))
        return out


class PhasedOps(ParallelOps):
    """ParallelOps that tells the Recorder where the step is (module docstring)."""

    def __init__(self, base, mesh, config):
        super().__init__(base, mesh, config)
        self.micro_batch = 0

    def gather_params(self, params, bucket):
        if bucket == "embed" and not self.mesh.phase.startswith("forward"):
            self.micro_batch += 1
            self.mesh.phase = f"forward {self.micro_batch}"
        return super().gather_params(params, bucket)

    def hand_back_grads(self, bucket, grads, into=None):
        if bucket == "head":
            self.mesh.phase = f"backward {self.micro_batch}"
        out = super().hand_back_grads(bucket, grads, into)
        if bucket == "embed":
            self.mesh.phase = "reductions"
        return out


def _rank_step(comm, layout, config, params0, batch, mbs):
    mesh = Recorder(comm, layout)
    ops = PhasedOps(REFERENCE, mesh, config)
    params = ShardedParams.from_full(config, mesh, params0)
    opt = shard_optimizer_state(config, params, init_optimizer_state(config, params0))
    bal = init_balancing_state(config, params0)
    mesh.calls.clear()
    g = compute_gradients(config, params, batch, micro_batch_size=mbs, ops=ops, mesh=mesh, check=False)
    mesh.phase = "optimizer"
    apply_update(config, params, opt, bal, g, 1e-2, 1e-3, ops=ops, mesh=mesh)
    held = {"params": params.nbytes, "optimizer": sum(int(v.nbytes) for k, v in opt.items() if k != "step"),
            "groups": {g: tuple(mesh.groups[g].allgather(mesh.rank)) for g in GROUPS}}  # after the step
    return mesh.calls, held


def run_layout(text, config, params0, batch, micro_batches=2):
    """(layout, rank 0's calls, every rank's held bytes, micro_batch_size): one step on virtual ranks."""
    layout = Layout.parse(text)
    S, T = batch.shape
    mbs = S // (layout.dp * micro_batches)
    layout.check(world_size=layout.world_size, config=config, seq_len=T, micro_batch_size=mbs, batch_sizes=[S])
    out = VirtualCluster(layout.world_size).run(_rank_step, layout, config, params0, batch, mbs)
    shapes = {tuple(c[:3] for c in calls) for calls, _ in out}
    if len(shapes) != 1:
        raise AssertionError(f"{layout}: the ranks called different collective sequences")
    return layout, out[0][0], [held for _, held in out], mbs


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_layout(layout, calls, held, whole, mbs, file=sys.stdout):
    print(f"{layout}: {layout.world_size} ranks, micro_batch_size {mbs}; rank 0 holds params "
          f"{held[0]['params']:,} B, optimizer state {held[0]['optimizer']:,} B (one process: "
          f"{whole['params']:,} B, {whole['optimizer']:,} B)", file=file)
    for g in GROUPS:
        members = sorted({h["groups"][g] for h in held})
        print(f"  {g:<13} {' '.join('(' + ','.join(map(str, m)) + ')' for m in members)}", file=file)
    for (phase, site, kind, group), run in groupby(calls, key=lambda c: (c[0], c[4], c[1], c[2])):
        run = list(run)
        print(f"  {phase:<12} {site:<40} {kind:<21} {group:<13} x{len(run):<3} {human(sum(c[3] for c in run)):>10}",
              file=file)
    print(f"  {'total':<12} {'':<40} {'':<21} {'':<13} x{len(calls):<3} {human(sum(c[3] for c in calls)):>10}\n",
          file=file)


def draw(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    top = max((c[3] for _, calls, _, _ in results for c in calls), default=10)
    scale = np.log10(max(top, 10))
    heights = [len({c[2] for c in calls}) + 1.6 for _, calls, _, _ in results]
    fig, axes = plt.subplots(len(results), 1, figsize=(17, 0.5 + 0.42 * sum(heights)),
                             gridspec_kw={"height_ratios": heights})
    for ax, (layout, calls, held, mbs) in zip(np.atleast_1d(axes), results):
        rows = [g for g in GROUP_ROWS if any(c[2] == g for c in calls)]
        y = {g: len(rows) - 1 - i for i, g in enumerate(rows)}
        phases = [(p, len(list(run))) for p, run in groupby(c[0] for c in calls)]
        x = 0
        for i, (phase, n) in enumerate(phases):
            ax.axvspan(x, x + n, color="#f2f2f2" if i % 2 else "white", zorder=0)
            sent = sum(c[3] for c in calls[x:x + n])
            ax.text(x + n / 2, len(rows) + 0.05, f"{phase.replace('forward', 'fwd').replace('backward', 'bwd')}"
                    f"\n{human(sent)}", ha="center", va="bottom", fontsize=7)
            x += n
        for i, (phase, kind, group, nbytes, site) in enumerate(calls):
            h = max(0.06, 0.9 * np.log10(max(nbytes, 1)) / scale)
            ax.add_patch(Rectangle((i + 0.1, y[group] + 0.05), 0.8, h, color=COLORS[kind], lw=0, zorder=2))
        for g in rows:
            mine = [c for c in calls if c[2] == g]
            ax.text(len(calls) + 1, y[g] + 0.45, f"{len(mine)} calls, {human(sum(c[3] for c in mine))}",
                    va="center", fontsize=7)
        ax.set_xlim(0, len(calls))
        ax.set_ylim(0, len(rows) + 0.75)
        ax.set_yticks([y[g] + 0.45 for g in rows], [f"{g} n={len(held[0]['groups'][g])}" for g in rows],
                      fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{layout}: {layout.world_size} ranks, micro_batch_size {mbs}, 2 micro-batches per rank; rank 0 "
                     f"sends {human(sum(c[3] for c in calls))} in {len(calls)} collectives; holds params "
                     f"{human(held[0]['params'])}, optimizer state {human(held[0]['optimizer'])}",
                     fontsize=9, loc="left", pad=22)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    np.atleast_1d(axes)[-1].set_xlabel("rank 0's collectives in call order (bar height: log10 of the bytes leaving "
                                       f"rank 0, full row = {human(top)})", fontsize=8)
    fig.legend(handles=[Patch(color=COLORS[k], label=k) for k in KINDS], loc="upper center", ncol=len(KINDS),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.93, 0.975))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=";".join(LAYOUTS), help="layouts separated by ';' (default: %(default)s)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "figures",
                                                  "step_per_layout.png"))
    args = ap.parse_args(argv)
    config = bench_config()
    params0 = init_params(config, seed=1, dtype=np.float32)
    batch = make_batch(config, 8, 32)
    whole = {"params": sum(int(v.nbytes) for v in params0.values()),
             "optimizer": sum(int(v.nbytes) for k, v in init_optimizer_state(config, params0).items() if k != "step")}
    results = []
    for text in (t.strip() for t in args.layouts.split(";") if t.strip()):
        results.append(run_layout(text, config, params0, batch))
        print_layout(*results[-1][:3], whole, results[-1][3])
    draw(results, args.out)
    print(f"figure: {os.path.normpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
