"""The device session's first and last phases (benchmarks/gpu_session.sh, docs/gpu.md "The device session"):

    python benchmarks/gpu_report.py versions OUT    what the machine has: OUT/versions.txt (readable, with nvidia-smi)
                                                    and OUT/versions.json
    python benchmarks/gpu_report.py summary OUT     everything the session wrote under OUT collected into
                                                    OUT/summary.json, and a short summary printed

The summary reads OUT/phases.tsv (each phase's exit status, seconds and time cap, written by the script),
OUT/install.txt, OUT/versions.json, OUT/junit-*.xml and the JSON results of benchmarks/gpu_step.py
(compare-*.json, time-*.json). It prints only what those files hold: a figure no phase measured is shown as missing.
"""

from __future__ import annotations

import glob
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

# Numbers every compare / time result has when its run succeeded (tests/test_gpu_session.py checks them finite).
REQUIRED_COMPARE = ("loss_rel_err_max", "grad_norm_rel_err", "grads_rel_err_global", "grads_rel_err_max",
                    "params_rel_err_max", "routing_moved_max", "tolerance", "seconds_device_step",
                    "seconds_reference_step", "peak_memory_bytes")
IMPLS = ("trinity", "torch-eager", "torch-compile")  # benchmarks/gpu_step.py's, in the order the summary shows them
REQUIRED_TIME = ("step_seconds_median", "step_seconds_min", "steps_timed", "warmup_seconds", "tokens_per_second",
                 "flops_per_step", "achieved_flops", "peak_flops", "mfu", "peak_memory_bytes", "final_loss")
DISTRIBUTIONS = {"numpy": ["numpy"], "cupy": ["cupy-cuda13x", "cupy-cuda12x", "cupy"], "numba": ["numba"],
                 "numba-cuda": ["numba-cuda"], "torch": ["torch"], "transformers": ["transformers"],
                 "pytest": ["pytest"], "pytest-xdist": ["pytest-xdist"], "pytest-timeout": ["pytest-timeout"],
                 "hypothesis": ["hypothesis"], "ml-dtypes": ["ml-dtypes", "ml_dtypes"],
                 "cuda-bindings": ["cuda-bindings", "cuda-python"]}


# ---- versions --------------------------------------------------------------------------------------------------
def _try(fn):
    """fn()'s value, or the error it raised as a string (a missing piece is information here, not a failure)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _version(names):
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _cupy_device():
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"device_count": cupy.cuda.runtime.getDeviceCount(), "device_name": name,
            "sm_count": props["multiProcessorCount"], "memory_bytes": props["totalGlobalMem"],
            "compute_capability": f"{props['major']}.{props['minor']}",
            "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver_version": cupy.cuda.runtime.driverGetVersion()}


def _torch_cuda():
    import torch

    return {"torch_cuda": torch.version.cuda, "torch_cuda_available": torch.cuda.is_available(),
            "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _numba_cuda():
    from trinity.accel.cuda import select_simulator

    simulator = select_simulator()
    cuda = importlib.import_module("numba.cuda")
    return {"numba_cuda_simulator": simulator, "numba_cuda_available": bool(cuda.is_available())}


def _cupy_table():
    from trinity.accel import get_backend

    return repr(get_backend("cupy"))


def _afmoe():
    from transformers import AfmoeForCausalLM

    return AfmoeForCausalLM.__module__


def _run(cmd):
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]}: not found"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    return (r.stdout + r.stderr).strip()


def versions(out: str) -> dict:
    """Write OUT/versions.json and OUT/versions.txt; return the dict."""
    info = {"python": sys.version.split()[0], "python_executable": sys.executable, "platform": platform.platform()}
    info.update({f"{k}_version": _version(v) for k, v in DISTRIBUTIONS.items()})
    info["trinity_path"] = _try(lambda: os.path.dirname(os.path.dirname(os.path.realpath(
        importlib.import_module("trinity.reference").__file__))))
    for part in (_cupy_device, _torch_cuda, _numba_cuda):
        got = _try(part)
        info.update(got if isinstance(got, dict) else {part.__name__.strip("_"): got})
    info["cupy_table"] = _try(_cupy_table)
    info["transformers_afmoe"] = _try(_afmoe)
    smi = _run(["nvidia-smi"])
    query = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                  "--format=csv"])
    info["nvidia_smi_query"] = query
    with open(os.path.join(out, "versions.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    with open(os.path.join(out, "versions.txt"), "w") as f:
        f.writelines(f"{k}: {v}\n" for k, v in info.items())
        f.write("\n$ nvidia-smi\n" + smi + "\n")
    print(open(os.path.join(out, "versions.txt")).read())
    return info


# ---- summary ---------------------------------------------------------------------------------------------------
def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"cannot read {os.path.basename(path)}: {e}"}


def _phases(out):
    """{phase: {"rc", "seconds", "cap"}} from OUT/phases.tsv (rc "skipped" where the budget was spent)."""
    phases = {}
    path = os.path.join(out, "phases.tsv")
    if os.path.exists(path):
        for line in open(path):
            name, rc, seconds, cap = line.rstrip("\n").split("\t")
            phases[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds),
                            "cap": int(cap), "timed_out": rc in ("124", "137")}
    return phases


def _junit(path):
    """Test counts of a junit xml (pytest's, with or without xdist)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None][:20]
    return counts


def problems(summary: dict) -> list[str]:
    """Every required figure of a successful compare / time result that is missing or not finite, and every run
    that failed: what the summary cannot vouch for."""
    bad = []
    for config, result in summary["compare"].items():
        bad += _missing(f"compare {config}", result, REQUIRED_COMPARE)
    for config, impls in summary["timing"].items():
        for impl, result in impls.items():
            bad += _missing(f"time {impl} {config}", result, REQUIRED_TIME)
    return bad


def _missing(what, result, keys):
    if "error" in result:
        return [f"{what}: {result['error']}"]
    return [f"{what}: {k} = {result.get(k)!r}" for k in keys
            if not isinstance(result.get(k), (int, float)) or not math.isfinite(result[k])]


def summarize(out: str) -> dict:
    """Collect OUT into OUT/summary.json (module docstring); return it."""
    summary = {"phases": _phases(out), "install": None, "versions": None, "tests": {}, "compare": {}, "timing": {},
               "ratios": {}}
    if os.path.exists(os.path.join(out, "install.txt")):
        summary["install"] = open(os.path.join(out, "install.txt")).read().strip()
    if os.path.exists(os.path.join(out, "versions.json")):
        summary["versions"] = _load(os.path.join(out, "versions.json"))
    for path in sorted(glob.glob(os.path.join(out, "junit-*.xml"))):
        summary["tests"][os.path.basename(path)[6:-4]] = _junit(path)
    for path in sorted(glob.glob(os.path.join(out, "compare-*.json"))):
        result = _load(path)
        summary["compare"][result.get("config", os.path.basename(path))] = result
    order = {impl: i for i, impl in enumerate(IMPLS)}
    results = [_load(path) for path in glob.glob(os.path.join(out, "time-*.json"))]
    for result in sorted(results, key=lambda r: (r.get("config", "?"), order.get(r.get("impl"), len(order)))):
        result.pop("step_seconds", None)
        summary["timing"].setdefault(result.get("config", "?"), {})[result.get("impl", "?")] = result
    for config, impls in summary["timing"].items():
        trinity = impls.get("trinity", {}).get("tokens_per_second")
        for impl in ("torch-eager", "torch-compile"):
            other = impls.get(impl, {}).get("tokens_per_second")
            if trinity and other:
                summary["ratios"].setdefault(config, {})[f"trinity_over_{impl.replace('-', '_')}"] = trinity / other
    summary["simulate"] = any(r.get("simulate") for r in summary["compare"].values()) or any(
        r.get("simulate") for impls in summary["timing"].values() for r in impls.values())
    summary["problems"] = problems(summary)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(human(summary))
    return summary


def _num(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def human(s: dict) -> str:
    """The summary in a few lines: device, phases, tests, accuracy, speed."""
    v = s.get("versions") or {}
    lines = [f"== device session{' (SIMULATED on the CPU: no GPU figures)' if s['simulate'] else ''}",
             f"device: {v.get('device_name', v.get('cupy_device', '?'))}, {v.get('sm_count', '?')} SMs, "
             f"{_num(v.get('memory_bytes'), '.3e')} B; CUDA runtime {v.get('cuda_runtime_version', '?')}, driver "
             f"{v.get('cuda_driver_version', '?')}; cupy {v.get('cupy_version')}, numba-cuda "
             f"{v.get('numba-cuda_version')}, torch {v.get('torch_version')}, transformers "
             f"{v.get('transformers_version')}",
             f"install: {s.get('install')}",
             "phases: " + ", ".join(f"{k} rc={p['rc']} {p['seconds']}s/{p['cap']}s"
                                    + (" TIMED OUT" if p["timed_out"] else "") for k, p in s["phases"].items())]
    for name, t in s["tests"].items():
        lines.append(f"tests {name}: " + (t["error"] if "error" in t else
                     f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
                     + (f"; failing: {', '.join(t['failed_names'][:5])}" if t["failed_names"] else "")))
    for config, c in s["compare"].items():
        if "error" in c:
            lines.append(f"compare {config}: ERROR {c['error']}")
            continue
        lines.append(f"compare {config} {c['batch']}x{c['seq']}, {c['precision']} vs the reference at {c['precision']}: loss "
                     f"rel err {_num(c['loss_rel_err_max'], '.2e')}, grad norm {_num(c['grad_norm_rel_err'], '.2e')}"
                     f" (tolerance {_num(c['tolerance'], '.3g')} = {c['tolerance_rule']}) → "
                     f"{'PASS' if c['passed'] else 'FAIL'}; grads {_num(c['grads_rel_err_global'], '.2e')} "
                     f"(worst {_num(c['grads_rel_err_max'], '.2e')} {c['grads_rel_err_worst']}), params "
                     f"{_num(c['params_rel_err_max'], '.2e')}, routing moved {_num(c['routing_moved_max'], '.2%')}; "
                     f"the precision's own loss error vs float64 "
                     f"{_num(c['precision_loss_rel_err_vs_f64'].get('total'), '.2e')}")
    if s["timing"]:
        lines.append(f"{'config':13s} {'impl':14s} {'tokens':>7s} {'step ms':>9s} {'tokens/s':>10s} {'MFU':>7s} "
                     f"{'peak mem GiB':>12s}  precision")
    for config, impls in s["timing"].items():
        for impl, t in impls.items():
            if "error" in t:
                lines.append(f"{config:13s} {impl:14s} ERROR {t['error'][:200]}")
                continue
            mem = t["peak_memory_bytes"] / 2**30 if isinstance(t.get("peak_memory_bytes"), int) else None
            lines.append(f"{config:13s} {impl:14s} {t['tokens_per_step']:7d} "
                         f"{_num(t['step_seconds_median'] * 1e3, '9.1f')} {_num(t['tokens_per_second'], '10.0f')} "
                         f"{_num(t['mfu'], '7.2%')} {_num(mem, '12.2f')}  {t['precision']}")
        for name, r in s["ratios"].get(config, {}).items():
            lines.append(f"{config:13s} {name}: {r:.3f} (tokens/s ratio)")
    peaks = {t.get("peak_flops_source") for impls in s["timing"].values() for t in impls.values()} - {None}
    lines += [f"MFU peak: {p}" for p in sorted(peaks)]
    lines += [f"PROBLEM: {p}" for p in s["problems"]] or ["every required figure measured and finite"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("versions", "summary"):
        raise SystemExit("usage: python benchmarks/gpu_report.py {versions|summary} OUT")
    os.makedirs(args[1], exist_ok=True)
    if args[0] == "versions":
        versions(args[1])
        return 0
    return 1 if summarize(args[1])["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
