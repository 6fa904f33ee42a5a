"""float32 matrix-product speed at the shapes of a bench-medium step (4×512 tokens), NumPy (OpenBLAS) beside PyTorch
(MKL), on the same threads: how fast the step's products can run here at all.

    python benchmarks/gemm_shapes.py [--threads 2] [--repeats 5]

Each shape (m×k×n: an [m, k] by [k, n] product) is timed best-of-repeats for both libraries in one process,
alternating, and printed in GFLOP/s. PyTorch is skipped when it is not installed.
"""

from __future__ import annotations

import argparse
import os
import time

SHAPES = [  # (what, m, k, n)
    ("head forward", 2048, 512, 32000),
    ("head dx", 2048, 32000, 512),
    ("head dW", 32000, 2048, 512),
    ("q_proj forward", 2048, 512, 512),
    ("q_proj dW", 512, 2048, 512),
    ("expert [a|c] = x W13ᵀ", 512, 512, 512),
    ("expert h W2ᵀ", 512, 256, 512),
    ("expert dW2", 512, 512, 256),
    ("Newton–Schulz X Xᵀ", 256, 512, 256),
    ("Newton–Schulz B X", 256, 256, 512),
    ("square 2048", 2048, 2048, 2048),
]


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np  # after the thread variables, so OpenBLAS starts with them
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"{'product':24s} {'m×k×n':>20s} {'numpy GFLOP/s':>14s} {'torch GFLOP/s':>14s}")
    for what, m, k, n in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        flops = 2.0 * m * k * n
        rate_np = flops / best_seconds(lambda: a @ b, args.repeats) / 1e9
        rate_torch = "-"
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            rate_torch = f"{flops / best_seconds(lambda: ta @ tb, args.repeats) / 1e9:.0f}"
        print(f"{what:24s} {f'{m}×{k}×{n}':>20s} {rate_np:14.0f} {rate_torch:>14s}")


if __name__ == "__main__":
    main()
