"""Commands the docs tell users to run keep working: the per-layout figure of docs/distributed.md."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_draw_layouts_runs_a_layout(tmp_path):
    out = tmp_path / "layouts.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "draw_layouts.py"), "--layouts",
                        "dp_shard=2,ep=2", "--out", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_file() and out.stat().st_size > 0
