"""How long `trinity plan` takes, as a user runs it (a fresh process: interpreter start and imports included).

    python benchmarks/plan_speed.py [--gpus 2048 ...] [--repeats 3] [--limit 10]

Each --gpus value is planned for Trinity Large on B300s with 17T tokens (the README's example is --gpus 2048), timed
best-of-repeats, and printed beside the limit the docs promise (docs/simulation.md: "plan answers in under 10 s").
The test suite checks what the plan says (tests/test_plan.py), never how long it takes: wall-clock time depends on
the machine and its load, so the claim is measured here. The exit status is 1 when a best time is over the limit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def plan_seconds(gpus: int, out_dir: str) -> float:
    """The wall-clock seconds of one `trinity plan` run for `gpus` B300s (a failed run stops the benchmark)."""
    cmd = [sys.executable, "-m", "trinity.cli", "plan", "--model", "trinity-large", "--gpus", str(gpus), "--gpu",
           "b300", "--tokens", "17e12", "--json", os.path.join(out_dir, f"plan_{gpus}.json")]
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode not in (0, 1):  # 1: nothing fits in memory, still an answer
        sys.exit(f"plan_speed: {' '.join(cmd[1:])} exited {r.returncode}: {r.stderr.strip()}")
    return seconds


def main() -> int:
    """Time each --gpus value and print one line each; 1 when any best time is over --limit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=float, default=10.0, help="seconds the docs promise (default 10)")
    args = parser.parse_args()
    over = False
    with tempfile.TemporaryDirectory() as out_dir:
        for gpus in args.gpus:
            best = min(plan_seconds(gpus, out_dir) for _ in range(max(1, args.repeats)))
            verdict = "within" if best <= args.limit else "OVER"
            over |= best > args.limit
            print(f"trinity plan --model trinity-large --gpus {gpus} --gpu b300: best of {args.repeats} "
                  f"{best:.2f} s ({verdict} the {args.limit:g} s limit; {os.cpu_count()} CPUs here)", flush=True)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
