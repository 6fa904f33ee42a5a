"""Cluster mode against the single process on one machine: tokens/s of `trinity train`, side by side in one run.

    python benchmarks/cluster_throughput.py [--rounds 3] [--steps 6] [--mesh dp_shard=2] [--ranks 2]

Both runs train `bench-medium` (float32, numba backend) on the same synthetic data and run file; they alternate
round by round so that the machine's noise falls on both. The single process gets all the threads
(NUMBA_NUM_THREADS = ranks), each MPI rank one thread (`mpiexec -n ranks python -m mpi4py -m trinity.cli train
run.toml --mesh …`). tokens/s are the trainer's own (metrics.jsonl: the whole job's tokens of a step over its wall
time), the first step of each run left out (compilation, first touch). Prints each round and the median ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics

from bench_jobs import make_run_folder, mpiexec_command, single_command, train


def _tokens_per_s(rows: list[dict]) -> float:
    timed = rows[1:] or rows
    seq_len = rows[0]["tokens_seen"] // rows[0]["sequences"]
    return sum(r["sequences"] * seq_len for r in timed) / sum(r["seconds"] for r in timed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--mesh", default="dp_shard=2")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=8, help="sequences per step (the global batch)")
    ap.add_argument("--micro", type=int, default=2, help="micro_batch_size")
    args = ap.parse_args()

    folder = make_run_folder(seq_len=args.seq_len, micro=args.micro, steps=args.steps, sequences=args.sequences)
    single = single_command()
    cluster = [*mpiexec_command(args.ranks), "--mesh", args.mesh]
    print(f"bench-medium float32 numba, {args.sequences} x {args.seq_len} tokens per step, micro-batches of "
          f"{args.micro}, {args.steps} steps per run (the first not timed)")
    print(f"{'round':>5}  {'1 rank x ' + str(args.ranks) + ' threads':>22}  "
          f"{str(args.ranks) + ' ranks x 1 thread (' + args.mesh + ')':>36}  ratio")
    ratios = []
    for i in range(args.rounds):
        one = _tokens_per_s(train(folder, single, args.ranks))
        many = _tokens_per_s(train(folder, cluster, 1))
        ratios.append(many / one)
        print(f"{i + 1:>5}  {one:>16,.0f} tok/s  {many:>30,.0f} tok/s  {many / one:.2f}")
    print(f"median ratio ({args.ranks} ranks x 1 thread) / (1 rank x {args.ranks} threads): "
          f"{statistics.median(ratios):.2f}")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
