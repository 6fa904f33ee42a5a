"""The cost model against measured `mpiexec` runs: bench-medium's step time at every layout of the cluster-mode
tests, predicted beside measured, with their ratio (docs/simulation.md, prediction (a)).

    python benchmarks/validate_cost_model.py [--steps 4] [--seq-len 256] [--sequences 4] [--json FILE]

1. Calibrate (this machine, one process, one thread): one bench-medium step of the same run (numba backend,
   float32) with every operator timed (trinity.accel.timing.TimedOps) after a warm-up step; each operator's
   seconds over its work in the cost model's own account (trinity.simulate.workload: FLOPs for products and
   attention, bytes for the rest) is its rate, scaled by the step's wall time over the operators' sum (the model
   code's own time, in proportion). Two MPI ranks measure the link: an 8 MiB Allgather's bytes per second and a
   one-element Allreduce's latency. A NumPy copy measures memory bandwidth.
2. Measure: `mpiexec -n N python -m mpi4py -m trinity.cli train run.toml --mesh LAYOUT` at each layout, one thread
   per rank; a step's time is the trainer's own `seconds` (metrics.jsonl), the median over the steps after the first.
   The routing counts the runs record (metrics' expert_load) give the busiest ep rank's share for the prediction.
3. Predict: trinity.simulate.cost_model.predict with the host as hardware (trinity.simulate.hardware.host_hardware:
   ranks share the cores; nothing overlaps) and print measured, predicted and their ratio; exit status 1 when a
   ratio leaves [0.8, 1.2].
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
import time

import numpy as np

# the layouts of tests/test_mpi_train.py (LAYOUTS), and the single process
LAYOUTS = [(1, "single"), (4, "dp_shard=4"), (4, "dp_replicate=2,dp_shard=2"), (2, "dp_shard=2,ep=2"),
           (4, "dp_shard=4,ep=4"), (2, "cp=2"), (4, "dp_replicate=2,cp=2,ep=2"),
           (8, "dp_replicate=2,dp_shard=2,cp=2,ep=2")]
BAND = (0.8, 1.2)

RUN = """
[model]
preset = "bench-medium"
dtype = "float32"
[data]
path = "tokens.bin"
eos_id = 0
seq_len = {seq_len}
micro_batch_size = 1
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

_ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_LINK = """
import time, numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
n = comm.Get_size()
send = np.ones(1 << 20, np.float64); recv = np.empty(n * send.size)
one, out = np.ones(1), np.empty(1)
for _ in range(3): comm.Allgather(send, recv)
t = time.perf_counter()
for _ in range(20): comm.Allgather(send, recv)
bw = 20 * (n - 1) * send.nbytes / (time.perf_counter() - t)
for _ in range(100): comm.Allreduce(one, out)
t = time.perf_counter()
for _ in range(2000): comm.Allreduce(one, out)
lat = (time.perf_counter() - t) / 2000 / 2
if comm.Get_rank() == 0: print(bw, lat)
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    env.update(_ONE_THREAD, **extra)
    return env


def _mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else "mpiexec"


def _config():
    from trinity.reference import Config
    return Config.preset("bench-medium")


# ---- 1. calibration --------------------------------------------------------------------------------------------
def profile_child(seq_len: int, sequences: int) -> dict:
    """In a one-thread child: {op: seconds} of one timed step and its wall time (the trainer's step function)."""
    from trinity.accel import get_backend
    from trinity.accel.timing import TimedOps
    from trinity.reference import init_params
    from trinity.reference.training.balancing import init_balancing_state
    from trinity.reference.training.optim import init_optimizer_state
    from trinity.reference.training.step import GlobalBatch, apply_update, compute_gradients

    config = _config()
    params = init_params(config, 0, np.float32)
    opt, bal = init_optimizer_state(config, params), init_balancing_state(config, params)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (sequences, seq_len))
    ops = TimedOps(get_backend("numba"))

    def step():
        g = compute_gradients(config, params, GlobalBatch(tokens), micro_batch_size=1, ops=ops, check=False)
        apply_update(config, params, opt, bal, g, config.muon_lr, config.adamw_lr, ops=ops)

    step()
    ops.reset()
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t)
    return {"seconds": {k: v / 2 for k, v in ops.wall.items()}, "wall": statistics.mean(walls)}


def calibrate(seq_len: int, sequences: int) -> dict:
    """The host's calibration (module docstring, step 1): what trinity.simulate.hardware.host_hardware reads."""
    from trinity.simulate.workload import step_work

    out = subprocess.run([sys.executable, __file__, "--profile-child", str(seq_len), str(sequences)], env=_env(),
                         capture_output=True, text=True, check=True)
    prof = json.loads(out.stdout.strip().splitlines()[-1])
    works = {}
    for w in step_work(_config(), None, seq_len, sequences, 1, q=4):
        works[w.op] = works.get(w.op, 0.0) + (w.flops if w.kind != "memory" else w.bytes)
    scale = prof["wall"] / sum(prof["seconds"].values())
    rates = {op: prof["seconds"][op] * scale / works[op] for op in works if prof["seconds"].get(op) and works[op]}
    a = np.ones(1 << 23)
    copies = []
    for _ in range(5):
        t = time.perf_counter()
        b = a.copy()
        copies.append(time.perf_counter() - t)
    del b
    link = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _LINK], env=_env(), capture_output=True,
                          text=True, check=True)
    bw, lat = map(float, link.stdout.split())
    gemm = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    t = time.perf_counter()
    gemm @ gemm
    gemm_rate = 2 * 1024 ** 3 / (time.perf_counter() - t)
    return {"cores": len(os.sched_getaffinity(0)), "memory_bytes": 24e9, "op_seconds_per_work": rates,
            "step_wall_s": prof["wall"], "op_seconds": prof["seconds"], "copy_bytes_per_s": 2 * a.nbytes / min(copies),
            "link_bytes_per_s": bw, "link_latency_s": lat, "gemm_flops_per_s": gemm_rate}


# ---- 2. measurement --------------------------------------------------------------------------------------------
def measure(folder: str, ranks: int, layout: str) -> tuple[float, list]:
    """(median step seconds after the first, expert_load rows) of one run."""
    shutil.rmtree(os.path.join(folder, "ckpt"), ignore_errors=True)
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        os.remove(os.path.join(folder, "metrics.jsonl"))
    cmd = [sys.executable, "-m", "trinity.cli", "train", "run.toml"]
    if layout != "single":
        cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "trinity.cli", "train", "run.toml",
               "--mesh", layout]
    r = subprocess.run(cmd, cwd=folder, env=_env(), capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return statistics.median(row["seconds"] for row in rows[1:]), [row.get("expert_load", {}) for row in rows]


def imbalance(loads: list, ep: int) -> float:
    """The busiest ep rank's routed rows over the mean, averaged over MoE layers and steps (from global counts)."""
    if ep == 1:
        return 1.0
    shares = []
    for row in loads:
        for counts in row.values():
            blocks = np.asarray(counts, dtype=np.float64).reshape(ep, -1).sum(axis=1)
            shares.append(blocks.max() / blocks.mean())
    return float(np.mean(shares)) if shares else 1.0


# ---- 3. prediction -----------------------------------------------------------------------------------------------
def predict_host(calibration, ranks, layout_text, seq_len, sequences, imb):
    from trinity.distributed.layout import Layout
    from trinity.simulate.cost_model import predict
    from trinity.simulate.hardware import host_hardware
    from trinity.simulate.traffic_model import Itemsizes

    layout = Layout.parse("dp_shard=1" if layout_text == "single" else layout_text)
    return predict(_config(), layout, host_hardware(calibration, ranks), seq_len=seq_len, sequences=sequences,
                   micro_batch_size=1, imbalance=imb, items=Itemsizes.of(4), q=4, overlap=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=4, help="sequences per step")
    ap.add_argument("--json", metavar="FILE", help="write calibration, measurements and predictions")
    ap.add_argument("--profile-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.profile_child:
        print(json.dumps(profile_child(*args.profile_child)))
        return 0

    from trinity.distributed.layout import Layout
    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource

    folder = tempfile.mkdtemp(prefix="trinity-cost-model-")
    write_token_file(os.path.join(folder, "tokens.bin"), MarkovSource(32000, eos_id=0, branching=8, mean_doc_len=600,
                     seed=0).documents(args.steps * args.sequences * args.seq_len * 2), eos_id=0)
    with open(os.path.join(folder, "run.toml"), "w") as f:
        f.write(RUN.format(seq_len=args.seq_len, steps=args.steps, sequences=args.sequences))
    print(f"bench-medium float32 numba, {args.sequences} x {args.seq_len} tokens per step, micro-batches of 1, "
          f"one thread per rank; calibrating ...", flush=True)
    cal = calibrate(args.seq_len, args.sequences)
    print(f"calibration: one-process step {cal['step_wall_s']:.2f} s; link {cal['link_bytes_per_s'] / 1e9:.2f} GB/s, "
          f"latency {cal['link_latency_s'] * 1e6:.1f} us; copy {cal['copy_bytes_per_s'] / 1e9:.1f} GB/s; "
          f"{cal['cores']} cores", flush=True)
    print(f"{'layout':<38} {'ranks':>5} {'measured s':>10} {'predicted s':>11} {'ratio':>6}  bound by")
    rows = []
    for ranks, text in LAYOUTS:
        measured, loads = measure(folder, ranks, text)
        ep = 1 if text == "single" else Layout.parse(text).ep
        imb = imbalance(loads, ep)
        p = predict_host(cal, ranks, text, args.seq_len, args.sequences, imb)
        ratio = p.step_seconds / measured
        rows.append({"layout": text, "ranks": ranks, "measured_s": measured, "predicted_s": p.step_seconds,
                     "ratio": ratio, "imbalance": imb, "phases": p.phases, "bound": p.bound})
        print(f"{text:<38} {ranks:>5} {measured:>10.2f} {p.step_seconds:>11.2f} {ratio:>6.2f}  {p.bound}", flush=True)
    inside = all(BAND[0] <= r["ratio"] <= BAND[1] for r in rows)
    print(f"every ratio in [{BAND[0]}, {BAND[1]}]: {'yes' if inside else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calibration": cal, "rows": rows, "args": vars(args)}, f, indent=1)
    return 0 if inside else 1


if __name__ == "__main__":
    sys.exit(main())
