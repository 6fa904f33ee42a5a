"""A whole training step on the GPU: trinity's cupy op table in bf16 against the float64 NumPy reference step
(accuracy), and against PyTorch running transformers' AfmoeForCausalLM with AdamW (speed). Run by
benchmarks/gpu_session.sh (docs/gpu.md "The device session"), one process per subcommand:

    python benchmarks/gpu_step.py compare --runs bench-medium:2x256,nano:1x256 --out OUT
    python benchmarks/gpu_step.py time --impl trinity --runs bench-medium:8x1024,nano:4x2048 --out OUT
    python benchmarks/gpu_step.py time --impl torch-compile --runs ... --out OUT
    ... --simulate     on any CPU: the cupy table's simulated form (NumPy, kernels under Numba's CUDA simulator) and
                       PyTorch on the CPU; use it with sim-tiny runs (the simulator runs every GPU thread as a
                       Python thread)

Runs go in order in one process (the kernels compile once), each writing OUT/compare-CONFIG.json or
OUT/time-IMPL-CONFIG.json as it ends, so a run cut short by the session's timeout keeps the ones before it. A run
that fails writes its error there instead and the next one still goes; the exit status is 1 if any failed.

Configs: bench-medium (benchmarks/train_step.py's, every parameter on AdamW), nano (Trinity Nano's widths, vocabulary,
experts and two dense layers, --layers deep, AdamW), sim-tiny (a model small enough for the simulator). Parameters
are init_params (SPEC §8, seed 0) drawn once in float32; the reference step gets them as float64, so both start from
the same values. The batch is random tokens, labels = tokens.

compare: one step (compute_gradients + apply_update) on the device table at --precision
(trinity.reference.model.precision.with_precision), the same step on the NumPy reference table at the same
precision (float32 master weights: the definition the device must meet), and in float64 on the reference table (how
far the precision itself is from exact). Pass/fail, against the reference at the same precision: every loss part and
the gradient norm within one rounding of the precision, relative (eps_bf16 = 2⁻⁷ for bf16, eps_float32 for full: the
two tables' float32 results may straddle a rounding boundary of an operator's output, as in
tests/test_cupy_backend.py). The distance to float64 is reported, not judged (it is the precision's, not the
device's). The per-parameter errors of the gradients and of the updated parameters, and the fraction of routed
assignments that moved between experts, are reported too: rounding legitimately flips near-tied top-k choices, and
AdamW's first step is sign-like (an element whose gradient is near 0 may move by 2·lr either way).

time: warm-up steps (JIT compilation, allocator growth), then steps timed one by one with the device synchronised
after each, until --steps or --seconds. Reported: median step time, tokens/s, FLOPs per step (training_flops) and
MFU against the device's dense bf16 tensor peak from a datasheet table keyed by device name (with --simulate: a
measured float32 NumPy matrix-product rate of this CPU, said so), and peak memory (GPU: the cupy memory pool's held
bytes, which only grow, or torch.cuda.max_memory_allocated; CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
from typing import NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import _trinity_step, bench_config, matmul_peak, torch_model, torch_step  # noqa: E402

EPS = {"bf16": 2.0 ** -7, "full": float(np.finfo(np.float32).eps)}  # one rounding of the precision (machine eps)
# Dense bf16 tensor-core peak, FLOP/s, from NVIDIA's datasheets (the sparsity figures halved); the first row whose
# words are all in the device's name wins.
DEVICE_PEAKS = [(("H100", "PCIe"), 756e12), (("H100", "NVL"), 835e12), (("H200", "NVL"), 835e12),
                (("H100",), 989e12), (("H200",), 989e12)]
CONFIGS = ("bench-medium", "nano", "sim-tiny")
IMPLS = ("trinity", "torch-eager", "torch-compile")
STAGE = ["starting"]  # what the current run is doing: said in its result when the session's time cap cuts it


def stage(what: str) -> None:
    STAGE[0] = what
    print(f"-- {what}", flush=True)


def make_config(name: str, layers: int = 4):
    """The trinity Config of a session config name (module docstring)."""
    from trinity.reference import Config

    if name == "bench-medium":
        return bench_config("cupy")
    if name == "nano":
        return Config.preset("trinity-nano").replace(num_hidden_layers=layers, matrix_optimizer="adamw")
    if name == "sim-tiny":
        return Config.preset("tiny").replace(
            num_hidden_layers=3, num_dense_layers=1, vocab_size=48, hidden_size=16, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, intermediate_size=24, moe_intermediate_size=8, num_experts=4,
            num_experts_per_tok=2, sliding_window=4, matrix_optimizer="adamw")
    raise ValueError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")


# ---- the op table, its precision, the device ------------------------------------------------------------------
def device_table(simulate: bool):
    """(ops, description): get_backend("cupy") on a GPU, the simulated cupy table with --simulate."""
    if simulate:
        from trinity.accel.cupy_backend import simulated
        return simulated(), "cupy (simulated: NumPy, kernels under Numba's CUDA simulator)"
    from trinity.accel import get_backend
    return get_backend("cupy"), "cupy (GPU)"


def synchronize(xp) -> None:
    """Wait for the device (every kernel, CuPy's and numba's, is on the default stream); nothing on NumPy."""
    if xp is not np:
        xp.cuda.Device().synchronize()


def cupy_memory(xp) -> dict:
    """The cupy memory pool's held bytes (the step's high-water: the pool keeps what it grew to), its bytes in use,
    and the whole device's used bytes (cudaMemGetInfo: also the CUDA context and anything outside the pool)."""
    pool = xp.get_default_memory_pool()
    free, total = xp.cuda.runtime.memGetInfo()
    return {"peak_memory_bytes": int(pool.total_bytes()), "pool_used_bytes": int(pool.used_bytes()),
            "device_used_bytes": int(total - free), "memory_kind": "cupy default pool total_bytes (held)"}


def host_memory() -> dict:
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "memory_kind": "host peak RSS (ru_maxrss)"}


@functools.lru_cache(maxsize=None)
def device_peak(simulate: bool) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s, where it comes from) of device 0 (None for a device not in DEVICE_PEAKS); with --simulate
    a measured CPU matmul rate."""
    if simulate:
        return matmul_peak(threads=os.cpu_count() or 1, n=512, repeats=3), "measured float32 NumPy matmul, this CPU"
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    for words, peak in DEVICE_PEAKS:
        if all(w in name for w in words):
            return peak, f"{name}: {' '.join(words)} dense bf16 datasheet peak"
    return None, f"{name}: no dense bf16 peak known (add it to DEVICE_PEAKS); no MFU"


# ---- compare -------------------------------------------------------------------------------------------------
def _one_step(config, params, tokens, ops, xp):
    """compute_gradients + apply_update on `ops` (params updated in place, arrays of `xp`); (Gradients, seconds)."""
    step = _trinity_step(config, params, tokens, None, ops=ops)
    t0 = time.perf_counter()
    result = step()
    synchronize(xp)
    return result, time.perf_counter() - t0


def _rel(got: float, want: float) -> float:
    """|got − want| / |want|; 0 when they are equal (both 0 included), inf when only want is 0."""
    if got == want:
        return 0.0
    return abs(got - want) / abs(want) if want != 0 else math.inf


def compare(args, run) -> dict:
    """One step of `run` on the device table at args.precision against the reference's (module docstring)."""
    from trinity.accel import get_backend
    from trinity.accel.device import to_device, to_host
    from trinity.reference import init_params
    from trinity.reference.model.precision import with_precision

    config = make_config(run.config, args.layers)
    base, table_name = device_table(args.simulate)
    stage("init_params")
    p32 = init_params(config, 0, np.float32)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (run.batch, run.seq))

    stage("the device step (the first also compiles the kernels)")
    xp = base.xp
    params = to_device(p32, xp)  # the device step first: its memory is measured before the host's grows
    got, t_dev = _one_step(config, params, to_device(tokens, xp), with_precision(base, args.precision), xp)
    memory = cupy_memory(xp) if xp is not np else host_memory()
    got_params, got_grads, got_counts = to_host(params), to_host(got.grads), to_host(got.counts)
    got_losses, got_norm = dict(got.losses), float(got.grad_norm)
    del params, got

    stage(f"the reference step at {args.precision}")
    reference = get_backend("reference")
    ref_params = {k: v.copy() for k, v in p32.items()}
    want, t_ref = _one_step(config, ref_params, tokens, with_precision(reference, args.precision), np)
    stage("the float64 reference step")
    exact, _ = _one_step(config, {k: v.astype(np.float64) for k, v in p32.items()}, tokens, reference, np)

    loss_err = {k: _rel(got_losses[k], v) for k, v in want.losses.items()}
    norm_err = _rel(got_norm, want.grad_norm)
    grad_err = {k: _norm_rel(got_grads[k], v) for k, v in want.grads.items()}
    diff = math.sqrt(sum(_sq(got_grads[k], v) for k, v in want.grads.items()))
    param_err = {k: float(np.max(np.abs(got_params[k] - v)) / max(float(np.max(np.abs(v))), 1e-30))
                 for k, v in ref_params.items()}
    moved = [float(np.abs(np.asarray(got_counts[k], np.float64) - want.counts[k]).sum() / (2 * want.counts[k].sum()))
             for k in want.counts]  # assignments that went to another expert, as a fraction of all
    tol = EPS[args.precision]
    worst_grad, worst_param = max(grad_err, key=grad_err.get), max(param_err, key=param_err.get)
    return {
        "kind": "compare", "config": run.config, "layers": config.num_hidden_layers, "batch": run.batch,
        "seq": run.seq, "table": table_name, "precision": args.precision, "loss_ref": want.losses,
        "loss": got_losses, "loss_rel_err": loss_err, "loss_rel_err_max": max(loss_err.values()),
        "grad_norm_ref": want.grad_norm, "grad_norm": got_norm, "grad_norm_rel_err": norm_err,
        "grads_rel_err_global": diff / want.grad_norm if want.grad_norm else 0.0,
        "grads_rel_err_max": grad_err[worst_grad], "grads_rel_err_worst": worst_grad,
        "params_rel_err_max": param_err[worst_param], "params_rel_err_worst": worst_param,
        "routing_moved_max": max(moved, default=0.0), "tolerance": tol,
        "tolerance_rule": f"one rounding of {args.precision} (eps {tol:.3g}), relative, on every loss part and the "
                          "grad norm, against the reference table at the same precision",
        "passed": bool(max(loss_err.values()) <= tol and norm_err <= tol),
        "loss_f64": exact.losses, "precision_loss_rel_err_vs_f64": {k: _rel(want.losses[k], v)
                                                                    for k, v in exact.losses.items()},
        "seconds_device_step": t_dev, "seconds_reference_step": t_ref, **memory,
    }


def _sq(got, want) -> float:
    """‖got − want‖² in float64."""
    return float(np.sum((np.asarray(got, np.float64) - want) ** 2))


def _norm_rel(got, want) -> float:
    """‖got − want‖ / ‖want‖ in float64 (0 when both are 0)."""
    d, w = math.sqrt(_sq(got, want)), float(np.linalg.norm(want.ravel()))
    return d / w if w else (0.0 if d == 0 else math.inf)


# ---- time ------------------------------------------------------------------------------------------------------
def timed(step, sync, warmup: int, steps: int, seconds: float) -> dict:
    """Run `warmup` steps, then time steps one by one (sync after each) until `steps` or `seconds` (at least one);
    the last step's loss tensor is returned under "last" (read after the timing)."""
    t0 = time.perf_counter()
    for i in range(warmup):
        stage(f"warm-up step {i + 1} of {warmup}")
        step()
        sync()
    warm = time.perf_counter() - t0
    stage("timed steps")
    times, start, last = [], time.perf_counter(), None
    while not times or (len(times) < steps and time.perf_counter() - start < seconds):
        t = time.perf_counter()
        last = step()
        sync()
        times.append(time.perf_counter() - t)
    return {"warmup_steps": warmup, "warmup_seconds": warm, "steps_timed": len(times), "step_seconds": times,
            "step_seconds_median": statistics.median(times), "step_seconds_min": min(times), "last": last}


def time_trinity(args, config, tokens) -> dict:
    """The trainer's step (benchmarks/train_step.py _trinity_step) on the device table in args.precision."""
    from trinity.accel.device import to_device
    from trinity.reference import init_params

    from trinity.reference.model.precision import with_precision

    base, table_name = device_table(args.simulate)
    ops = with_precision(base, args.precision)
    xp = base.xp
    stage("init_params")
    params = to_device(init_params(config, 0, np.float32), xp)
    step = _trinity_step(config, params, to_device(tokens, xp), None, ops=ops)
    out = timed(step, lambda: synchronize(xp), args.warmup, args.steps, args.seconds)
    out["final_loss"] = out.pop("last").losses["total"]
    memory = cupy_memory(xp) if xp is not np else host_memory()
    return {**out, **memory, "table": table_name, "precision": args.precision}


def time_torch(args, config, tokens, compiled: bool) -> dict:
    """transformers' AfmoeForCausalLM + AdamW (benchmarks/train_step.py torch_model / torch_step) on cuda (CPU with
    --simulate): float32 parameters and optimizer state under torch.autocast(bfloat16); where that fails, the model
    in bfloat16 throughout (both tries recorded). compiled: torch.compile of the model (args.compile_backend)."""
    import torch
    try:
        from transformers import AfmoeForCausalLM  # noqa: F401
    except ImportError as e:
        import transformers
        raise RuntimeError(f"transformers {transformers.__version__} has no AfmoeForCausalLM ({e}): no torch "
                           "comparison") from None

    device = "cpu" if args.simulate else "cuda"
    sync = (lambda: None) if device == "cpu" else torch.cuda.synchronize
    ids = torch.as_tensor(tokens, device=device)
    tries = []
    for mode in ("autocast-bf16", "bf16-params"):
        torch.manual_seed(0)
        stage(f"{mode}: building the model")
        with torch.device(device):  # made and randomised where it runs
            model = torch_model(config)
        if mode == "bf16-params":
            model = model.to(torch.bfloat16)
        runner = torch.compile(model, backend=args.compile_backend) if compiled else model
        step = torch_step(runner, ids, config, autocast=torch.bfloat16 if mode == "autocast-bf16" else None)
        try:
            stage(f"{mode}: first step{' (torch.compile compiles here)' if compiled else ''}")
            t0 = time.perf_counter()
            step()  # the first warm-up step
            sync()
            first = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - recorded (the traceback in the log), then the next mode is tried
            traceback.print_exc()
            tries.append(f"{mode}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            model = runner = step = None  # the failed try's memory can go before the next is built
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            continue
        out = timed(step, sync, max(args.warmup - 1, 0), args.steps, args.seconds)
        out["warmup_steps"] += 1
        out["warmup_seconds"] += first
        out["final_loss"] = float(out.pop("last").float())
        if device == "cuda":
            memory = {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
                      "memory_kind": "torch.cuda.max_memory_allocated",
                      "reserved_bytes": int(torch.cuda.max_memory_reserved())}
        else:
            memory = host_memory()
        return {**out, **memory, "precision": mode, "failed_tries": tries,
                "compile_backend": args.compile_backend if compiled else None}
    raise RuntimeError("the torch step failed in every mode: " + " | ".join(tries))


def time_step(args, run) -> dict:
    """args.impl on `run`: timed() plus tokens/s, FLOPs and MFU."""
    from trinity.simulate.planning.workload import training_flops

    config = make_config(run.config, args.layers)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (run.batch, run.seq))
    if args.impl == "trinity":
        out = time_trinity(args, config, tokens)
    else:
        out = time_torch(args, config, tokens, compiled=args.impl == "torch-compile")
    flops = training_flops(config, run.batch, run.seq)
    peak, source = device_peak(args.simulate)
    sec = out["step_seconds_median"]
    tokens_per_step = run.batch * run.seq
    return {"kind": "time", "impl": args.impl, "config": run.config, "layers": config.num_hidden_layers,
            "batch": run.batch, "seq": run.seq, "tokens_per_step": tokens_per_step, **out,
            "tokens_per_second": tokens_per_step / sec, "flops_per_step": flops,
            "achieved_flops": flops / sec, "peak_flops": peak, "peak_flops_source": source,
            "mfu": flops / sec / peak if peak else None}


# ---- driver ----------------------------------------------------------------------------------------------------
class Run(NamedTuple):
    config: str
    batch: int
    seq: int


def parse_runs(text: str) -> list[Run]:
    """"bench-medium:2x256,nano:1x256" → [Run("bench-medium", 2, 256), Run("nano", 1, 256)]."""
    runs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, size = item.partition(":")
        batch, _, seq = size.partition("x")
        if name not in CONFIGS or not batch.isdigit() or not seq.isdigit():
            raise SystemExit(f"bad run {item!r}: want CONFIG:BATCHxSEQ with CONFIG one of {', '.join(CONFIGS)}")
        runs.append(Run(name, int(batch), int(seq)))
    return runs


def release_memory() -> None:
    """Give the device memory of a finished run back (cupy's pool, torch's cache) and restart torch's peak count,
    so the next run's peak memory is its own."""
    if "cupy" in sys.modules:
        sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        sys.modules["torch"].cuda.empty_cache()
        sys.modules["torch"].cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("compare", "time"))
    ap.add_argument("--runs", type=parse_runs, required=True, help="CONFIG:BATCHxSEQ[,CONFIG:BATCHxSEQ...], in order")
    ap.add_argument("--out", required=True, help="folder for the results: compare-CONFIG.json, time-IMPL-CONFIG.json")
    ap.add_argument("--layers", type=int, default=4, help="nano: decoder layers (two of them dense)")
    ap.add_argument("--precision", choices=("bf16", "full"), default="bf16", help="the trinity table's")
    ap.add_argument("--impl", choices=IMPLS, default="trinity", help="time: which step")
    ap.add_argument("--warmup", type=int, default=2, help="time: untimed steps first")
    ap.add_argument("--steps", type=int, default=10, help="time: at most this many timed steps")
    ap.add_argument("--seconds", type=float, default=20.0, help="time: stop timing after this long (≥ 1 step)")
    ap.add_argument("--compile-backend", default="inductor", help="torch-compile: torch.compile's backend")
    ap.add_argument("--simulate", action="store_true", help="on the CPU (module docstring)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    failed = 0
    for run in args.runs:
        name = f"compare-{run.config}" if args.what == "compare" else f"time-{args.impl}-{run.config}"
        t0, cut = time.perf_counter(), False
        stage(f"{name}: starting")
        try:
            result = compare(args, run) if args.what == "compare" else time_step(args, run)
        except (Exception, KeyboardInterrupt) as e:  # recorded in the result file; the next run still goes
            traceback.print_exc()
            failed += 1
            cut = isinstance(e, KeyboardInterrupt)  # the session's timeout: no time left for the next runs
            why = f"cut by the session's time cap during: {STAGE[0]}" if cut else f"{type(e).__name__}: {e}"
            result = {"kind": args.what, "config": run.config, "batch": run.batch, "seq": run.seq, "error": why}
            if args.what == "time":
                result["impl"] = args.impl
        result.update(simulate=args.simulate, seconds_total=time.perf_counter() - t0)
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"== {name}\n" + json.dumps({k: v for k, v in result.items() if k != "step_seconds"}, indent=1),
              flush=True)
        if cut:
            break
        release_memory()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
