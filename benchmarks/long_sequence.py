"""Time and peak memory of one long-sequence forward through the reference (issue: sliding layers are O(T·w)).

    python benchmarks/long_sequence.py --tokens 32768 --window 512 [--preset tiny] [--dtype float32]

Prints wall time of `trinity.reference.logits` on one sequence and the process's peak resident memory (ru_maxrss),
plus the peak of NumPy allocations traced by tracemalloc during the forward.
"""

import argparse
import resource
import time
import tracemalloc

import numpy as np

from trinity.reference import Config, init_params, logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()

    config = Config.preset(args.preset).replace(sliding_window=args.window,
                                                max_position_embeddings=max(args.tokens, 1))
    params = init_params(config, seed=0, dtype=np.dtype(args.dtype))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.tokens))
    logits(config, params, tokens[:, :64])  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    out = logits(config, params, tokens)
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pattern = "".join("G" if w is None else "S" for w in map(config.window_of, range(config.num_hidden_layers)))
    print(f"preset={args.preset} layers={pattern} T={args.tokens} window={args.window} dtype={args.dtype}")
    print(f"forward time: {seconds:.2f} s  ({args.tokens / seconds:,.0f} tokens/s)")
    print(f"peak traced NumPy memory during forward: {traced_peak / 2**20:.1f} MiB "
          f"(logits alone: {out.nbytes / 2**20:.1f} MiB)")
    print(f"peak process RSS: {rss / 1024:.1f} MiB (before forward: {rss_before / 1024:.1f} MiB)")
    assert np.isfinite(out).all()


if __name__ == "__main__":
    main()
