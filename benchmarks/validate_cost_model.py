"""The cost model against measured `mpiexec` runs: bench-medium's step time at every layout of the cluster-mode
tests, predicted beside measured, with their ratio (docs/simulation.md, prediction (a)).

    python benchmarks/validate_cost_model.py [--steps 4] [--seq-len 512] [--sequences 4] [--json FILE]

1. Calibrate (this machine, one process, one thread): bench-medium steps of the same run (numba backend,
   float32) with every operator timed (trinity.accel.timing.TimedOps), at the run's sequence length and at half of
   it (the fastest of three steps after two warm-ups each); each operator's time is fitted as a cost per call plus
   a cost per unit of its work in the cost model's own account (trinity.simulate.planning.workload: FLOPs for products and
   attention, bytes for the rest), scaled by the step's wall time over the operators' sum (the model code's own
   time, in proportion); `fit_rates`. Two MPI ranks measure the link: an 8 MiB Allgather's bytes per second and a
   one-element Allreduce's latency. A NumPy copy measures memory bandwidth.
2. Measure: `mpiexec -n N python -m mpi4py -m trinity.cli train run.toml --mesh LAYOUT` at each layout, one thread
   per rank; a step's time is the trainer's own `seconds` (metrics.jsonl), the median over the steps after the first.
   The routing counts the runs record (metrics' expert_load) give the busiest ep rank's share for the prediction
   (trinity.simulate.planning.routing).
3. Predict: trinity.simulate.planning.cost_model.predict with the host as hardware (trinity.simulate.planning.hardware.host_hardware:
   ranks share the cores; nothing overlaps) and print measured, predicted and their ratio; exit status 1 when a
   ratio leaves [0.8, 1.2].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from bench_jobs import job_env, make_run_folder, mpiexec, mpiexec_command, single_command, train

# the layouts of tests/test_mpi_train.py (LAYOUTS), and the single process
LAYOUTS = [(1, "single"), (4, "dp_shard=4"), (4, "dp_replicate=2,dp_shard=2"), (2, "dp_shard=2,ep=2"),
           (4, "dp_shard=4,ep=4"), (2, "cp=2"), (4, "dp_replicate=2,cp=2,ep=2"),
           (8, "dp_replicate=2,dp_shard=2,cp=2,ep=2")]
BAND = (0.8, 1.2)

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


def _config():
    from trinity.reference import Config
    return Config.preset("bench-medium")


# ---- 1. calibration --------------------------------------------------------------------------------------------
def profile_child(seq_len: int, sequences: int) -> dict:
    """In a one-thread child: the fastest of three timed steps after two warm-ups (a shared machine only ever makes a
    step slower): its wall time and {op: [calls, seconds]} (the trainer's step function, every operator timed)."""
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
    steps = []
    for i in range(5):
        ops.reset()
        t = time.perf_counter()
        g = compute_gradients(config, params, GlobalBatch(tokens), micro_batch_size=1, ops=ops, check=False)
        apply_update(config, params, opt, bal, g, config.muon_lr, config.adamw_lr, ops=ops)
        if i >= 2:
            steps.append({"wall": time.perf_counter() - t, "ops": {k: [ops.calls[k], ops.wall[k]] for k in ops.wall}})
    return min(steps, key=lambda s: s["wall"])


def _profile(seq_len: int, sequences: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--profile-child", str(seq_len), str(sequences)], env=job_env(1),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_rates(config, seq_len: int, sequences: int, long: dict, short: dict) -> dict:
    """{op: [seconds per call, seconds per unit of work]} from the step profiled at seq_len and seq_len/2: an
    operator whose work changes between the two and whose calls the cost model counts right gets both from the two
    equations t = a·calls + b·work; the others (the optimizer's, whose work does not depend on the tokens) a = 0 and
    b = t/work. Each profile's operators are scaled by its wall time over their sum (the model code's own time, in
    proportion)."""
    from trinity.simulate.planning.workload import step_work

    def account(T):
        out = {}
        for w in step_work(config, None, T, sequences, 1, q=4):
            calls, work = out.get(w.op, (0, 0.0))
            out[w.op] = (calls + w.calls, work + (w.flops if w.kind != "memory" else w.bytes))
        return out

    a1, a2 = account(seq_len), account(seq_len // 2)
    rates = {}
    for op, (calls, work1) in a1.items():
        if op not in long["ops"] or not work1:
            continue
        t1 = long["ops"][op][1] * long["wall"] / sum(v[1] for v in long["ops"].values())
        t2 = short["ops"].get(op, [0, 0.0])[1] * short["wall"] / sum(v[1] for v in short["ops"].values())
        work2 = a2.get(op, (0, 0.0))[1]
        b = (t1 - t2) / (work1 - work2) if work1 != work2 else 0.0
        a = (t1 - b * work1) / calls if calls == long["ops"][op][0] and calls else -1.0
        rates[op] = [a, b] if a >= 0 and b > 0 else [0.0, t1 / work1]
    return rates


def calibrate(seq_len: int, sequences: int) -> dict:
    """The host's calibration (module docstring, step 1): what trinity.simulate.planning.hardware.host_hardware reads."""
    long, short = _profile(seq_len, sequences), _profile(seq_len // 2, sequences)
    rates = fit_rates(_config(), seq_len, sequences, long, short)
    a = np.ones(1 << 23)
    copies = []
    for _ in range(5):
        t = time.perf_counter()
        b = a.copy()
        copies.append(time.perf_counter() - t)
    del b
    link = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", _LINK], env=job_env(1), capture_output=True,
                          text=True, check=True)
    bw, lat = map(float, link.stdout.split())
    gemm = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    t = time.perf_counter()
    gemm @ gemm
    gemm_rate = 2 * 1024 ** 3 / (time.perf_counter() - t)
    from trinity.reference.training.memory import available_memory_bytes

    return {"cores": len(os.sched_getaffinity(0)), "memory_bytes": available_memory_bytes() or 0, "op_rates": rates,
            "step_wall_s": long["wall"], "profiles": {"long": long, "short": short},
            "copy_bytes_per_s": 2 * a.nbytes / min(copies), "link_bytes_per_s": bw, "link_latency_s": lat,
            "gemm_flops_per_s": gemm_rate}


# ---- 2. measurement --------------------------------------------------------------------------------------------
def measure(folder: str, ranks: int, layout: str) -> tuple[float, list]:
    """(median step seconds after the first, expert_load rows) of one run."""
    cmd = single_command() if layout == "single" else [*mpiexec_command(ranks), "--mesh", layout]
    rows = train(folder, cmd, threads=1)
    return statistics.median(row["seconds"] for row in rows[1:]), [row.get("expert_load", {}) for row in rows]


# ---- 3. prediction -----------------------------------------------------------------------------------------------
def predict_host(calibration, ranks, layout_text, seq_len, sequences, imb):
    from trinity.distributed.layout import Layout
    from trinity.simulate.planning.cost_model import predict
    from trinity.simulate.planning.hardware import host_hardware
    from trinity.simulate.planning.traffic_model import Itemsizes

    layout = Layout.parse("dp_shard=1" if layout_text == "single" else layout_text)
    return predict(_config(), layout, host_hardware(calibration, ranks), seq_len=seq_len, sequences=sequences,
                   micro_batch_size=1, imbalance=imb, items=Itemsizes.of(4), q=4, overlap=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (cp=2 needs 2·2·(window−1) ≤ it)")
    ap.add_argument("--sequences", type=int, default=4, help="sequences per step")
    ap.add_argument("--json", metavar="FILE", help="write calibration, measurements and predictions")
    ap.add_argument("--reuse", metavar="FILE", help="take the calibration and the measured times from an earlier "
                                                     "--json file and predict again (no runs)")
    ap.add_argument("--profile-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.profile_child:
        print(json.dumps(profile_child(*args.profile_child)))
        return 0

    from trinity.distributed.layout import Layout
    from trinity.simulate.planning.routing import busiest_rank_factor

    earlier = None
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)
        args.seq_len, args.sequences = earlier["args"]["seq_len"], earlier["args"]["sequences"]
    print(f"bench-medium float32 numba, {args.sequences} x {args.seq_len} tokens per step, micro-batches of 1, "
          f"one thread per rank", flush=True)
    if earlier:
        cal = earlier["calibration"]
    else:
        folder = make_run_folder(seq_len=args.seq_len, micro=1, steps=args.steps, sequences=args.sequences)
        cal = calibrate(args.seq_len, args.sequences)
    print(f"calibration: one-process step {cal['step_wall_s']:.2f} s; link {cal['link_bytes_per_s'] / 1e9:.2f} GB/s, "
          f"latency {cal['link_latency_s'] * 1e6:.1f} us; copy {cal['copy_bytes_per_s'] / 1e9:.1f} GB/s; "
          f"{cal['cores']} cores", flush=True)
    print(f"{'layout':<38} {'ranks':>5} {'measured s':>10} {'predicted s':>11} {'ratio':>6}  bound by")
    rows = []
    for ranks, text in LAYOUTS:
        if earlier:
            row = next(r for r in earlier["rows"] if r["layout"] == text)
            measured, loads, imb = row["measured_s"], row.get("loads", []), row["imbalance"]
        else:
            measured, loads = measure(folder, ranks, text)
            imb = busiest_rank_factor(loads, 1 if text == "single" else Layout.parse(text).ep)
        p = predict_host(cal, ranks, text, args.seq_len, args.sequences, imb)
        ratio = p.step_seconds / measured
        rows.append({"layout": text, "ranks": ranks, "measured_s": measured, "predicted_s": p.step_seconds,
                     "ratio": ratio, "imbalance": imb, "phases": p.phases, "bound": p.bound, "loads": loads})
        print(f"{text:<38} {ranks:>5} {measured:>10.2f} {p.step_seconds:>11.2f} {ratio:>6.2f}  {p.bound}", flush=True)
    inside = all(BAND[0] <= r["ratio"] <= BAND[1] for r in rows)
    print(f"every ratio in [{BAND[0]}, {BAND[1]}]: {'yes' if inside else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calibration": cal, "rows": rows, "args": vars(args)}, f, indent=1)
    return 0 if inside else 1


if __name__ == "__main__":
    sys.exit(main())
