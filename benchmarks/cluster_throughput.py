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
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

RUN = """
[model]
preset = "bench-medium"
dtype = "float32"
[data]
path = "tokens.bin"
eos_id = 0
seq_len = {seq_len}
micro_batch_size = {micro}
[train]
steps = {steps}
sequences_per_step = {sequences}
backend = "numba"
[checkpoint]
dir = "ckpt"
every = 1000000
[logging]
metrics = "metrics.jsonl"
progress = false
"""


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    env.update(NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return env


def _tokens_per_s(folder: str) -> float:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    timed = rows[1:] or rows
    seq_len = rows[0]["tokens_seen"] // rows[0]["sequences"]
    return sum(r["sequences"] * seq_len for r in timed) / sum(r["seconds"] for r in timed)


def _train(folder: str, cmd: list[str], threads: int) -> float:
    shutil.rmtree(os.path.join(folder, "ckpt"), ignore_errors=True)
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        os.remove(os.path.join(folder, "metrics.jsonl"))
    r = subprocess.run(cmd, cwd=folder, env=_env(threads), capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return _tokens_per_s(folder)


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

    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.path.exists(mpiexec) else shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("no mpiexec: pip install -e '.[mpi]'")
    folder = tempfile.mkdtemp(prefix="trinity-cluster-bench-")
    tokens = args.steps * args.sequences * args.seq_len * 2
    write_token_file(os.path.join(folder, "tokens.bin"),
                     MarkovSource(32000, eos_id=0, branching=8, mean_doc_len=600, seed=0).documents(tokens), eos_id=0)
    with open(os.path.join(folder, "run.toml"), "w") as f:
        f.write(RUN.format(seq_len=args.seq_len, micro=args.micro, steps=args.steps, sequences=args.sequences))
    single = [sys.executable, "-m", "trinity.cli", "train", "run.toml"]
    cluster = [mpiexec, "-n", str(args.ranks), sys.executable, "-m", "mpi4py", "-m", "trinity.cli", "train",
               "run.toml", "--mesh", args.mesh]
    print(f"bench-medium float32 numba, {args.sequences} x {args.seq_len} tokens per step, micro-batches of "
          f"{args.micro}, {args.steps} steps per run (the first not timed)")
    print(f"{'round':>5}  {'1 rank x ' + str(args.ranks) + ' threads':>22}  "
          f"{str(args.ranks) + ' ranks x 1 thread (' + args.mesh + ')':>36}  ratio")
    ratios = []
    for i in range(args.rounds):
        one = _train(folder, single, args.ranks)
        many = _train(folder, cluster, 1)
        ratios.append(many / one)
        print(f"{i + 1:>5}  {one:>16,.0f} tok/s  {many:>30,.0f} tok/s  {many / one:.2f}")
    print(f"median ratio ({args.ranks} ranks x 1 thread) / (1 rank x {args.ranks} threads): "
          f"{statistics.median(ratios):.2f}")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
