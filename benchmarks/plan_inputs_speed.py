"""Wall-clock of `trinity plan` at the edges of its input (issue 18: an answer in under 10 s for any --gpus up to
1,000,000, or a refusal at once). The suite asserts no time (tests/test_plan_inputs.py counts the layouts examined
instead); this script times the commands:

    python benchmarks/plan_inputs_speed.py          # prints one line per case: seconds, exit status, first line
"""

from __future__ import annotations

import subprocess
import sys
import time

CASES = [
    ["--gpus", "1000000"],
    ["--gpus", "720720"],  # 240 divisors
    ["--gpus", "524288"],
    ["--gpus", "999983"],  # prime
    ["--gpus", "720720", "--batch", "720720"],  # refused: too many layouts
    ["--gpus", "2048", "--seq-len", "262144"],  # refused: too many predictions
    ["--gpus", "2048", "--seq-len", "131072", "--fix", "ep=32"],
    ["--gpus", "10000000"],  # refused: beyond the limit
]


def main() -> int:
    base = [sys.executable, "-m", "trinity.cli", "plan", "--model", "trinity-large", "--gpu", "b300", "--tokens",
            "17e12", "--top", "1"]
    for case in CASES:
        t = time.perf_counter()
        r = subprocess.run(base + case, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - t
        first = (r.stdout or r.stderr).splitlines()[0] if (r.stdout or r.stderr) else ""
        print(f"{seconds:6.2f} s  exit {r.returncode}  {' '.join(case):40s} {first[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
