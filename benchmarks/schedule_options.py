"""The cluster mode's step before and after the schedule options: bytes per step and step time, side by side in one run.

    python benchmarks/schedule_options.py [--layouts "dp_shard=4,ep=4;…"] [--options "A;B"] [--rounds 1] [--steps 3]
                                          [--seq-len 512] [--sequences 8]

Every job is `mpiexec -n ranks python -m mpi4py -m trinity.cli train run.toml --mesh LAYOUT[,OPTIONS]` of
`bench-medium` (float32, numba backend, one thread per rank: NUMBA_NUM_THREADS=1) on the same synthetic data and
run file (benchmarks/bench_jobs.py): 8 sequences per step in micro-batches of 1, so each data-parallel rank runs
8/dp ≥ 2 micro-batches. The layouts are benchmarks/comm_volume.py's (each at its own number of ranks; by default the
two the issue's acceptance names, --layouts any of them; cp = 4 needs --seq-len 1024 for bench-medium's window of
128); for each, the plain schedule and each options set run one after the other, round after round, so the machine's
noise falls on all.

bytes/step: what rank 0 sent in a step, counted by its mesh (metrics.jsonl's comm_bytes summed over its collectives
and groups; every rank's schedule is
the plan's, tests/test_plan_schedule.py), the median over the timed steps; s/step: the trainer's wall time of a step
(the first step of each job left out: compilation, first touch), the median. Ratios are options / plain.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys

from bench_jobs import make_run_folder, mpiexec_command, train

from trinity.distributed.layout import Layout

LAYOUTS = ["dp_shard=4,ep=4", "dp_replicate=2,dp_shard=2,cp=2,ep=2"]  # of benchmarks/comm_volume.py's
OPTIONS = ["keep_gathered=all,reshard_after_forward=none,reduce_gradients=step",
           "keep_gathered=all,reshard_after_forward=none,reduce_gradients=step,async_reduce=true",
           "async_reduce=true"]


def measure(folder: str, layout: Layout, steps: int) -> tuple[float, float]:
    """(rank 0's bytes per step, seconds per step): medians over the steps after the first."""
    rows = train(folder, [*mpiexec_command(layout.world_size), "--mesh", str(layout)], threads=1)
    timed = rows[1:] or rows
    return (statistics.median(sum(r["comm_bytes"].values()) for r in timed),
            statistics.median(r["seconds"] for r in timed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=";".join(LAYOUTS), help="layouts separated by ';' (default: %(default)s)")
    ap.add_argument("--options", default=";".join(OPTIONS), help="options sets separated by ';' (default: "
                                                                  "%(default)s)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="steps per job (the first not timed)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=8, help="sequences per step (the global batch)")
    args = ap.parse_args(argv)
    layouts = [Layout.parse(t.strip()) for t in args.layouts.split(";") if t.strip()]
    sets = [o.strip() for o in args.options.split(";") if o.strip()]
    folder = make_run_folder(seq_len=args.seq_len, micro=1, steps=args.steps, sequences=args.sequences)
    print(f"bench-medium float32 numba, {args.sequences} x {args.seq_len} tokens per step, micro-batches of 1, "
          f"{args.steps} steps per job (the first not timed), one thread per rank, {args.rounds} round(s)")
    for i, options in enumerate(sets, start=1):
        print(f"  options {i}: {options}")
    head = f"{'layout':<38} {'ranks':>5} {'mb/rank':>7} {'plain B/step':>13} {'plain s/step':>12}"
    for i in range(1, len(sets) + 1):
        head += f" | {f'opt{i} B/step':>13} {'B ratio':>7} {f'opt{i} s/step':>11} {'s ratio':>7}"
    print(head)
    try:
        for layout in layouts:
            got = {None: [], **{o: [] for o in sets}}
            for _ in range(args.rounds):
                for options in [None, *sets]:
                    with_options = layout if options is None else Layout.parse(f"{layout},{options}")
                    got[options].append(measure(folder, with_options, args.steps))
            plain_b, plain_s = (statistics.median(x[k] for x in got[None]) for k in (0, 1))
            line = (f"{str(layout):<38} {layout.world_size:>5} {args.sequences // layout.dp:>7} {plain_b:>13,.0f} "
                    f"{plain_s:>12.2f}")
            for options in sets:
                b, s = (statistics.median(x[k] for x in got[options]) for k in (0, 1))
                line += f" | {b:>13,.0f} {b / plain_b:>7.3f} {s:>11.2f} {s / plain_s:>7.3f}"
            print(line, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
