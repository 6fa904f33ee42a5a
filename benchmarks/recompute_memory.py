"""Peak memory of one reference training step with stored activations vs activation recompute.

    python benchmarks/recompute_memory.py [--preset bench-medium] [--batch 4] [--seq 512] [--dtype float32]

Runs `loss_and_grads` both ways on the same inputs, interleaved, and prints for each the wall time and the peak of
NumPy allocations traced by tracemalloc during the call (params, which both share, are allocated before and so
not counted), and checks that the two sets of gradients are bitwise equal.
"""

import argparse
import time
import tracemalloc

import numpy as np

from trinity.reference import Config, init_params, loss_and_grads


def measure(config, params, tokens, recompute):
    tracemalloc.start()
    t0 = time.perf_counter()
    losses, grads, _ = loss_and_grads(config, params, tokens, tokens, recompute=recompute)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return losses, grads, seconds, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-medium")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    config = Config.preset(args.preset)
    params = init_params(config, seed=0, dtype=np.dtype(args.dtype))
    param_bytes = sum(p.nbytes for p in params.values())
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
    print(f"preset={args.preset} batch={args.batch}x{args.seq} dtype={args.dtype} "
          f"params={param_bytes / 2**20:.1f} MiB (grads add the same again)")
    results = {}
    for recompute in (False, True):
        losses, grads, seconds, peak = measure(config, params, tokens, recompute)
        results[recompute] = grads
        label = "recompute" if recompute else "stored   "
        print(f"{label}: loss {losses['total']:.6f}  time {seconds:.2f} s  peak traced memory {peak / 2**20:.1f} MiB")
    equal = all(np.array_equal(results[False][k], results[True][k]) for k in params)
    print(f"gradients bitwise equal: {equal}")
    if not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
