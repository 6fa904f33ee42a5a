"""One full training step (forward, backward, optimizer) of `bench-medium` at 4×512 tokens: the NumPy reference,
the numba backend, and PyTorch running transformers' AfmoeForCausalLM with torch.optim.AdamW, interleaved.

    python benchmarks/train_step.py [--rounds 3] [--steps 2] [--threads 2] [--batch 4] [--seq 512]
    python benchmarks/train_step.py --profile numba      # one step, operator by operator (TimedOps)

Each (round, implementation) runs in its own subprocess pinned to --threads threads, so peak memory (ru_maxrss of
that child) is per implementation; rounds interleave the implementations so machine noise hits them alike. A child
does one warm-up step (numba compilation, allocator warm-up), then times --steps steps. Printed: median tokens/s,
its ratio to PyTorch, peak RSS, and achieved FLOP/s as a fraction of this machine's float32 matrix-product peak
(numpy, same threads, measured before the first round and after every round; the best of those is the peak, since
a shared machine only ever makes a measurement slower). FLOPs per step are counted analytically (flops()).

PyTorch runs in its default implementations (sdpa attention, grouped_mm experts) in float32 with torch.optim.AdamW.
Like for like, "reference" and "numba" run the same step: AdamW on every parameter (Config.matrix_optimizer =
"adamw"), global-norm clipping, and SMEBU balancing. "numba-muon" runs Trinity's recipe optimizer (Muon on the
hidden matrices): its Newton–Schulz iterations add matrix products that the AdamW step does not have, so its FLOPs
per step are counted with them (muon_flops()). "numba-bf16" is the numba step at `[train] precision = "bf16"`
(reference/model/precision.py): float32 master weights, every operator's inputs and outputs rounded to bf16 values
(held in float32 arrays: the arithmetic of bf16, at float32 speed plus the rounding passes). The models get the same
config and random weights of the same scale; every other implementation runs in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLEMENTATIONS = ("reference", "numba", "numba-muon", "numba-bf16", "pytorch")


def flops(config, batch: int, seq: int) -> float:
    """Matrix-product FLOPs of one training step: 3× the forward (trinity.simulate.planning.workload.training_flops: every
    weight a token multiplies, attention 2·2·h_q·d_h per visible key under the causal mask and window)."""
    from trinity.simulate.planning.workload import training_flops
    return training_flops(config, batch, seq)


def muon_flops(config) -> float:
    """Newton–Schulz FLOPs of one optimizer step on one process (trinity.simulate.planning.workload.muon_flops: per
    iteration on a matrix [m, n], m ≤ n, 4m²n + 2m³; routed experts one matrix per expert). The textbook count: BLAS
    may form a product with its own transpose (syrk) in about half of that."""
    from trinity.simulate.planning.workload import muon_flops as count
    return count(config)


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GEMM rate numpy reaches here (FLOP/s), in a child pinned to `threads`."""
    code = f"""
import time, numpy as np
a = np.random.default_rng(0).standard_normal(({n}, {n})).astype(np.float32); b = a.T.copy(); a @ b
best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range({repeats}))
print(2 * {n}**3 / best)
"""
    out = subprocess.run([sys.executable, "-c", code], env=_env(threads), capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def _env(threads: int, impl: str | None = None) -> dict:
    """The child's environment: every thread pool at `threads`; trinity's implementations also get the BLAS settings
    the `trinity` command applies (trinity.accel.blas_threads; PyTorch uses MKL and ignores them)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    if impl is not None and impl != "pytorch":
        from trinity.accel.blas_threads import BLAS_ENV
        env = {**BLAS_ENV, **env}  # a value the user set wins, as in the command
    return env


# ---- one implementation in a child process -------------------------------------------------------------------------
def child(impl: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import resource

    import numpy as np

    from trinity.reference import init_params

    config = bench_config(impl)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq))
    if impl == "pytorch":
        step = _torch_step(config, tokens, threads)
    else:
        step = _trinity_step(config, init_params(config, 0, np.float32), tokens, impl)
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "seconds": times, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def bench_config(impl: str):
    """bench-medium; every parameter on AdamW unless impl runs the Muon recipe."""
    from trinity.reference import Config
    config = Config.preset("bench-medium")
    return config if impl.endswith("-muon") else config.replace(matrix_optimizer="adamw")


def op_table(impl: str):
    """The op table of a trinity implementation: "numba-muon" is the numba table (Muon is the config's), "numba-bf16"
    the numba table at precision "bf16"."""
    from trinity.accel import get_backend
    from trinity.reference.model.precision import with_precision

    backend, _, variant = impl.partition("-")
    return with_precision(get_backend(backend), "bf16" if variant == "bf16" else "full")


def _trinity_step(config, params, tokens, impl, ops=None):
    """The trainer's step (trinity.reference.training.step: compute_gradients, then apply_update: clip, balancing,
    optimizer). `ops` replaces the backend's table (the profile passes a TimedOps around it)."""
    from trinity.reference.training.balancing import init_balancing_state
    from trinity.reference.training.optim import init_optimizer_state
    from trinity.reference.training.step import GlobalBatch, apply_update, compute_gradients

    ops = ops or op_table(impl)
    opt, bal = init_optimizer_state(config, params), init_balancing_state(config, params)

    def step():
        result = compute_gradients(config, params, GlobalBatch(tokens), ops=ops, check=False)
        apply_update(config, params, opt, bal, result, config.muon_lr, config.adamw_lr, ops=ops)
        return result
    return step


def profile(impl: str, batch: int, seq: int) -> str:
    """Where one trinity step's time goes: a warm-up step, then one step with every operator and optimizer kernel
    timed (trinity.accel.timing.TimedOps); the table is sorted by wall time, shares of the whole step."""
    import numpy as np

    from trinity.accel.timing import TimedOps
    from trinity.reference import init_params

    config = bench_config(impl)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq))
    timed = TimedOps(op_table(impl))
    step = _trinity_step(config, init_params(config, 0, np.float32), tokens, None, ops=timed)
    step()
    timed.reset()
    t0 = time.perf_counter()
    step()
    total = time.perf_counter() - t0
    return f"{impl}: one step {total:.2f} s\n" + timed.report(total)


def torch_model(config):
    """transformers' AfmoeForCausalLM for `config` in float32, train mode, in its default implementations (sdpa
    attention, grouped_mm experts), every matrix random N(0, base_std²) (HF zero-initialises the router gate)."""
    import torch
    from transformers import AfmoeConfig, AfmoeForCausalLM

    hf = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type")}
    model = AfmoeForCausalLM(AfmoeConfig(**hf)).float().train()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, config.base_std)
    return model


def torch_step(model, ids, config, autocast=None):
    """One step of `model` (an AfmoeForCausalLM, or torch.compile of one) on the token tensor `ids`: forward with
    labels = ids, backward, global-norm clipping at 1, torch.optim.AdamW. autocast: a torch dtype to run the forward
    under torch.autocast on ids' device (float32 parameters and optimizer state), or None. The step returns the loss
    tensor (not read, so no sync)."""
    import contextlib

    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.adamw_lr, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with (torch.autocast(ids.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()
    return step


def _torch_step(config, tokens, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch_step(torch_model(config), torch.as_tensor(tokens), config)


# ---- driver ----------------------------------------------------------------------------------------------------
def available(impl: str) -> str | None:
    """None when the implementation can run here, else why not."""
    try:
        if impl.startswith("numba"):
            from trinity.accel import get_backend
            get_backend("numba")
        if impl == "pytorch":
            import torch  # noqa: F401
            from transformers import AfmoeForCausalLM  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report any reason it cannot run
        return f"{type(e).__name__}: {e}"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per child")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--only", nargs="*", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    ap.add_argument("--profile", choices=[i for i in IMPLEMENTATIONS if i != "pytorch"],
                    help="instead of timing: one step of this implementation, operator by operator")
    ap.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.profile:
            print(profile(args.child, args.batch, args.seq))
        else:
            print(json.dumps(child(args.child, args.steps, args.batch, args.seq, args.threads)))
        return
    if args.profile:  # in a child, so the thread settings take effect before numpy starts
        cmd = [sys.executable, __file__, "--child", args.profile, "--profile", args.profile, "--threads",
               str(args.threads), "--batch", str(args.batch), "--seq", str(args.seq)]
        raise SystemExit(subprocess.run(cmd, env=_env(args.threads, args.profile)).returncode)

    step_flops = {impl: flops(bench_config(impl), args.batch, args.seq) for impl in IMPLEMENTATIONS}
    step_flops["numba-muon"] += muon_flops(bench_config("numba-muon"))
    peak = matmul_peak(args.threads)
    impls = []
    for impl in args.only:
        why = available(impl)
        if why:
            print(f"skipping {impl}: {why}")
        else:
            impls.append(impl)
    print(f"bench-medium, {args.batch}x{args.seq} tokens, {args.threads} threads; "
          f"{step_flops['numba']:.3e} FLOPs per step ({step_flops['numba-muon']:.3e} with Muon's Newton–Schulz); float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    results = {impl: {"seconds": [], "peak_rss": 0} for impl in impls}
    for r in range(args.rounds):
        for impl in impls:
            out = subprocess.run([sys.executable, __file__, "--child", impl, "--steps", str(args.steps),
                                  "--threads", str(args.threads), "--batch", str(args.batch), "--seq", str(args.seq)],
                                 env=_env(args.threads, impl), capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{impl} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl]["seconds"] += res["seconds"]
            results[impl]["peak_rss"] = max(results[impl]["peak_rss"], res["peak_rss"])
            print(f"  round {r + 1} {impl:10s} step {statistics.median(res['seconds']):6.2f} s", flush=True)
        peak = max(peak, matmul_peak(args.threads))
    tokens = args.batch * args.seq
    base = statistics.median(results["pytorch"]["seconds"]) if "pytorch" in results else None
    print(f"\nfloat32 matmul peak (best of {args.rounds + 1} measurements): {peak / 1e9:.0f} GFLOP/s")
    print(f"{'impl':11s} {'step s':>7s} {'tokens/s':>10s} {'vs torch':>9s} {'peak RSS':>10s} {'of peak':>8s}")
    for impl in impls:
        sec = statistics.median(results[impl]["seconds"])
        ratio = f"{base / sec:8.2f}x" if base else "       -"
        print(f"{impl:11s} {sec:7.2f} {tokens / sec:10.0f} {ratio:>9s} {results[impl]['peak_rss'] / 2**20:6.0f} MiB "
              f"{step_flops[impl] / sec / peak:7.0%}")


if __name__ == "__main__":
    main()
