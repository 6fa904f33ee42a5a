"""cp_exchange=read against the default Allgather: bytes per step of the cp group and step time, side by side.

    python benchmarks/cp_exchange.py [--parts bytes,seam,steps] [--layouts "cp=2;dp_shard=2,cp=2,ep=2"]
                                     [--rounds 3] [--steps 4] [--reps 50] [--seq-len 512] [--sequences 4]
                                     [--micro 1] [--doc-mask]

Bytes: every rank's collectives of one step of `bench-medium` (float32) from the parallel plan's schedule
(schedule.step_program, the planning assumption for the routed rows, which the cp group does not depend on), summed
over the ranks: the cp group's (the global layers' keys and values, which cp_exchange changes; the sliding layers'
halos; the per-sequence sums) and the whole step's. Every rank's trace equals this schedule collective by
collective (tests/test_plan_schedule.py runs the cp layouts with cp_exchange=read), and each timed job below checks
it again for rank 0: the cp group's bytes its metrics line reports equal the schedule's.

Seam: one global layer's exchange alone (gather_kv and gather_kv_backward on bench-medium's shapes) under mpiexec
at cp = 2 and 4, each exchange `--reps` times, alternating, the slowest rank's time of each: min and median ms.

Steps: `trinity train` jobs under mpiexec (bench_jobs: numba, one thread per rank, synthetic data), the two
exchanges alternating round by round so that the machine's noise falls on both; a job's step time is the median of
its steps' wall seconds (metrics.jsonl), the first step left out (compilation, first touch). Prints each round,
the median ratio read / all per layout and the fastest step of each exchange over all rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from collections import defaultdict

from bench_jobs import make_run_folder, mpiexec_command, train

from trinity.distributed.layout import Layout, gathers_whole_sequence
from trinity.distributed.plan import ParallelPlan
from trinity.distributed.schedule import step_program
from trinity.reference import Config

EXCHANGES = ("all", "read")


def step_bytes(config, layout: Layout, sequences: int, seq_len: int, micro: int, doc_ids: bool,
               itemsize: int = 4) -> tuple[dict, float, list]:
    """({part: bytes of the cp group summed over the ranks}, the whole step's bytes over the ranks, [each rank's cp
    group bytes]) of one step, from the plan's schedule. Parts: "global" (the global layers' keys and values and
    their gradients), "sliding" (the sliding layers' halos), "sums" (the Allreduces over cp)."""
    program = step_program(ParallelPlan(config, layout), sequences, seq_len, micro, itemsize, doc_ids=doc_ids)
    parts, total, per_rank = defaultdict(float), 0.0, []
    for rank in range(layout.world_size):
        mine = 0.0
        for s in program.for_rank(rank):
            total += s.bytes
            if s.group == "cp":
                part = "sums" if s.kind == "Allreduce" else \
                    "global" if gathers_whole_sequence(config.window_of(s.layer), seq_len) else "sliding"
                parts[part] += s.bytes
                mine += s.bytes
        per_rank.append(mine)
    return dict(parts), total, per_rank


def _with(text: str, exchange: str) -> Layout:
    return Layout.parse(f"{text},cp_exchange={exchange}")


def print_bytes(config, texts, args) -> None:
    print(f"bench-medium float32, {args.sequences} x {args.seq_len} tokens per step, micro-batches of {args.micro}, "
          f"doc ids {'on' if args.doc_mask else 'off'}: bytes per step, summed over the ranks (the plan's schedule)")
    columns = ("global", "sliding", "sums")
    print(f"{'layout':<24} {'cp_exchange':<11} {'global layers':>14} {'sliding halos':>14} {'cp sums':>9} "
          f"{'cp group':>12} {'step, all groups':>17}")
    for text in texts:
        rows = {x: step_bytes(config, _with(text, x), args.sequences, args.seq_len, args.micro, args.doc_mask)
                for x in EXCHANGES}
        for x, (parts, total, _) in rows.items():
            print(f"{text:<24} {x:<11} " + " ".join(f"{parts.get(c, 0):>{w},.0f}" for c, w in zip(columns, (14, 14, 9)))
                  + f" {sum(parts.values()):>12,.0f} {total:>17,.0f}")
        (a, ta, _), (r, tr, _) = rows["all"], rows["read"]
        ratio = [r.get(c, 0) / a[c] if a.get(c) else 1.0 for c in columns]
        print(f"{'':<24} {'read / all':<11} " + " ".join(f"{q:>{w}.3f}" for q, w in zip(ratio, (14, 14, 9)))
              + f" {sum(r.values()) / sum(a.values()):>12.3f} {tr / ta:>17.3f}")


def _seconds(rows: list[dict]) -> float:
    timed = rows[1:] or rows
    return statistics.median(r["seconds"] for r in timed)


def _cp_bytes(row: dict) -> float:
    return sum(n for key, n in row["comm_bytes"].items() if key.endswith("/cp"))


def time_jobs(config, texts, args) -> None:
    folder = make_run_folder(seq_len=args.seq_len, micro=args.micro, steps=args.steps, sequences=args.sequences)
    if args.doc_mask:
        with open(os.path.join(folder, "run.toml"), "a") as f:
            f.write("[loss]\nintra_document_mask = true\n")
    print(f"\nstep time, mpiexec, numba, one thread per rank, {args.steps} steps per job (the first not timed), "
          f"median step seconds; rank 0's cp bytes per step = the schedule's")
    print(f"{'round':>5}  {'layout':<24} {'all s':>8} {'read s':>8} {'read / all':>10}  rank 0 cp bytes all / read")
    ratios, fastest = defaultdict(list), defaultdict(lambda: float("inf"))
    for i in range(args.rounds):
        for text in texts:
            seconds, measured = {}, {}
            order = EXCHANGES if i % 2 == 0 else EXCHANGES[::-1]
            for x in order:
                layout = _with(text, x)
                rows = train(folder, [*mpiexec_command(layout.world_size), "--mesh", str(layout)], 1)
                seconds[x] = _seconds(rows)
                fastest[(text, x)] = min(fastest[(text, x)], min(r["seconds"] for r in rows[1:] or rows))
                measured[x] = {_cp_bytes(r) for r in rows}
                want = step_bytes(config, layout, args.sequences, args.seq_len, args.micro, args.doc_mask)[2][0]
                if measured[x] != {want}:
                    sys.exit(f"{layout}: rank 0 sent {sorted(measured[x])} bytes over cp per step, the schedule "
                             f"says {want:,.0f}")
            ratios[text].append(seconds["read"] / seconds["all"])
            print(f"{i + 1:>5}  {text:<24} {seconds['all']:>8.2f} {seconds['read']:>8.2f} {ratios[text][-1]:>10.3f}  "
                  f"{measured['all'].pop():,.0f} / {measured['read'].pop():,.0f}")
    for text, r in ratios.items():
        print(f"{text}: median step time read / all {statistics.median(r):.3f} ({len(r)} rounds); fastest step all "
              f"{fastest[(text, 'all')]:.2f} s, read {fastest[(text, 'read')]:.2f} s")
    shutil.rmtree(folder, ignore_errors=True)


def seam_worker(args) -> None:
    """Under mpiexec: one global layer's gather_kv and gather_kv_backward of bench-medium's shapes (B × T/cp keys of
    h_kv·d_h, float32, doc ids by --doc-mask) on a cp group of all the ranks, `--reps` times each exchange,
    alternating; rank 0 prints each exchange's min and median milliseconds."""
    import json
    import time

    import numpy as np
    from mpi4py import MPI

    from trinity.distributed.context_parallel import ContextParallelSeams
    from trinity.distributed.mesh import Mesh

    class Seams(ContextParallelSeams):
        def __init__(self, mesh):
            self.mesh = mesh

    comm = MPI.COMM_WORLD
    cp, config, T, B = comm.Get_size(), Config.preset("bench-medium"), args.seq_len, args.micro
    seams = {x: Seams(Mesh(comm, _with(f"cp={cp}", x))) for x in EXCHANGES}
    pos = seams["all"].mesh.local_positions(T)
    rng = np.random.default_rng(comm.Get_rank())
    k, v = rng.standard_normal((2, B, len(pos), config.num_key_value_heads, config.head_dim)).astype(np.float32)
    docs = np.zeros((B, len(pos)), dtype=np.int64) if args.doc_mask else None
    times = {x: [] for x in EXCHANGES}
    for rep in range(args.reps + 1):
        for x in EXCHANGES:
            comm.Barrier()
            t0 = time.perf_counter()
            k_all, v_all, _, _, ctx = seams[x].gather_kv(k, v, pos, docs, None)
            seams[x].gather_kv_backward(ctx, k_all, v_all)
            seconds = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if rep:  # the first is a warm-up
                times[x].append(seconds)
    if comm.Get_rank() == 0:
        print(json.dumps({x: [min(t) * 1e3, statistics.median(t) * 1e3] for x, t in times.items()}))


def time_seam(args) -> None:
    import json
    import subprocess

    from bench_jobs import job_env, mpiexec
    print(f"\none global layer's exchange (gather_kv + gather_kv_backward), bench-medium shapes, B = {args.micro}, "
          f"T = {args.seq_len}, float32, mpiexec, {args.reps} repetitions each, alternating; slowest rank's ms")
    print(f"{'cp':>3} {'all min':>9} {'read min':>9} {'read / all':>10} {'all median':>11} {'read median':>12}")
    for cp in (2, 4):
        cmd = [mpiexec(), "-n", str(cp), sys.executable, "-m", "mpi4py", os.path.abspath(__file__), "--seam-worker",
               "--seq-len", str(args.seq_len), "--micro", str(args.micro), "--reps", str(args.reps)] + \
            (["--doc-mask"] if args.doc_mask else [])
        r = subprocess.run(cmd, env=job_env(1), capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        (a_min, a_med), (r_min, r_med) = got["all"], got["read"]
        print(f"{cp:>3} {a_min:>9.2f} {r_min:>9.2f} {r_min / a_min:>10.3f} {a_med:>11.2f} {r_med:>12.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="cp=2;dp_shard=2,cp=2,ep=2", help="layouts with cp > 1, ';' between")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=4, help="sequences per step (the global batch)")
    ap.add_argument("--micro", type=int, default=1, help="micro_batch_size")
    ap.add_argument("--doc-mask", action="store_true", help="intra-document mask: the doc ids travel too")
    ap.add_argument("--parts", default="bytes,seam,steps", help="what to print, of bytes, seam, steps")
    ap.add_argument("--reps", type=int, default=50, help="repetitions of the exchange alone (cp = 2 and 4)")
    ap.add_argument("--seam-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seam_worker:
        return seam_worker(args)
    config = Config.preset("bench-medium").replace(intra_document_mask=args.doc_mask)
    texts = [t.strip() for t in args.layouts.split(";") if t.strip()]
    for text in texts:
        layout = Layout.parse(text)
        layout.check(world_size=layout.world_size, config=config, seq_len=args.seq_len, micro_batch_size=args.micro,
                     batch_sizes=[args.sequences])
        if layout.cp == 1:
            sys.exit(f"layout {text}: cp_exchange changes nothing without cp > 1")
    parts = {p.strip() for p in args.parts.split(",")}
    if parts - {"bytes", "seam", "steps"}:
        sys.exit(f"--parts {args.parts}: name some of bytes, seam, steps")
    if "bytes" in parts:
        print_bytes(config, texts, args)
    if "seam" in parts:
        time_seam(args)
    if "steps" in parts:
        time_jobs(config, texts, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
