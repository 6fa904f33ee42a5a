"""The device session's plumbing (benchmarks/gpu_session.sh, docs/gpu.md "The device session"), checked on the CPU:
benchmarks/gpu_step.py in --simulate mode (the cupy table under Numba's CUDA simulator, PyTorch on the CPU) on a tiny
model, then benchmarks/gpu_report.py's summary, must give every figure the session reports, finite, and a bf16 step
that agrees with the float64 reference within its tolerance. No wall-clock assertion: the simulator's times mean
nothing, only that they were measured.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_report  # noqa: E402

if importlib.util.find_spec("numba_cuda") is None:
    pytest.skip("numba-cuda is not installed (the simulated cupy table needs it)", allow_module_level=True)


def _torch_afmoe() -> bool:
    try:
        from transformers import AfmoeForCausalLM  # noqa: F401
    except Exception:  # noqa: BLE001 - torch or transformers absent or too old
        return False
    return True


TORCH = _torch_afmoe()
ENV = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--runs", "sim-tiny:1x8", "--simulate"]


def _run(args, out, expect=0):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == expect, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The simulated session's results: compare, the three timings (torch's where transformers has afmoe), summary."""
    out = tmp_path_factory.mktemp("gpu_session")
    step = BENCH / "gpu_step.py"
    _run([step, "compare", *TINY, "--out", out], out)
    _run([step, "time", "--impl", "trinity", "--warmup", "0", "--steps", "1", *TINY, "--out", out], out)
    if TORCH:
        _run([step, "time", "--impl", "torch-eager", "--warmup", "1", "--steps", "2", *TINY, "--out", out], out)
        _run([step, "time", "--impl", "torch-compile", "--compile-backend", "eager", "--warmup", "1", "--steps", "1",
              *TINY, "--out", out], out)
    _run([BENCH / "gpu_report.py", "summary", out], out)
    return json.loads((out / "summary.json").read_text())


def _finite(result, keys):
    assert "error" not in result, result["error"]
    for k in keys:
        assert isinstance(result.get(k), (int, float)) and math.isfinite(result[k]), (k, result.get(k))


def test_the_bf16_step_agrees_with_the_reference_bf16_step(session):
    c = session["compare"]["sim-tiny"]
    _finite(c, gpu_report.REQUIRED_COMPARE)
    assert {"loss_rel_err_max", "grad_norm_rel_err", "params_rel_err_max"} <= set(gpu_report.REQUIRED_COMPARE)
    assert c["passed"] and c["loss_rel_err_max"] <= c["tolerance"] and c["grad_norm_rel_err"] <= c["tolerance"]
    assert c["tolerance"] == 2.0 ** -7 and c["precision"] == "bf16"
    f64 = c["precision_loss_rel_err_vs_f64"]["total"]
    assert 0 < f64 < 0.1  # bf16 is not float64, and not far from it
    assert set(c["loss_rel_err"]) == {"total", "ce", "z", "balance"}


def test_every_timing_figure_is_measured(session):
    impls = ["trinity"] + (["torch-eager", "torch-compile"] if TORCH else [])
    assert list(session["timing"]["sim-tiny"]) == impls
    assert {"tokens_per_second", "mfu", "peak_memory_bytes"} <= set(gpu_report.REQUIRED_TIME)
    for impl in impls:
        t = session["timing"]["sim-tiny"][impl]
        _finite(t, gpu_report.REQUIRED_TIME)
        assert t["simulate"] and t["tokens_per_step"] == 8 and t["steps_timed"] >= 1
        assert t["tokens_per_second"] == pytest.approx(8 / t["step_seconds_median"])
        assert t["mfu"] == pytest.approx(t["flops_per_step"] / t["step_seconds_median"] / t["peak_flops"])
    if TORCH:
        assert session["timing"]["sim-tiny"]["torch-eager"]["precision"] in ("autocast-bf16", "bf16-params")
        ratios = session["ratios"]["sim-tiny"]
        assert set(ratios) == {"trinity_over_torch_eager", "trinity_over_torch_compile"}
        assert all(math.isfinite(r) and r > 0 for r in ratios.values())


def test_the_summary_vouches_for_everything(session):
    assert session["simulate"] is True
    assert session["problems"] == []


def test_a_failing_run_is_recorded_and_the_summary_says_so(tmp_path):
    """nano needs its two dense layers: one layer fails at once, in the result file, with exit status 1."""
    _run([BENCH / "gpu_step.py", "compare", "--runs", "nano:1x4", "--layers", "1", "--simulate", "--out", tmp_path],
         tmp_path, expect=1)
    result = json.loads((tmp_path / "compare-nano.json").read_text())
    assert "num_dense_layers" in result["error"]
    r = _run([BENCH / "gpu_report.py", "summary", tmp_path], tmp_path, expect=1)
    assert "PROBLEM: compare nano: ConfigError" in r.stdout


def test_the_session_script_parses():
    script = str(BENCH / "gpu_session.sh")
    subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
