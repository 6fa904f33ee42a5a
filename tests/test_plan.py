"""`trinity plan`: the layouts of a job ranked by predicted throughput (its speed is a benchmark:
benchmarks/plan_speed.py)."""

from __future__ import annotations

import json
import struct

import pytest

from test_trainer import trinity
from trinity.distributed.layout import Layout
from trinity.reference import Config
from trinity.simulate.planning.hardware import get_hardware
from trinity.simulate.planning.planner import search


def test_trinity_large_on_2048_b300(tmp_path):
    """The README's plan: what it says, not how long it takes (benchmarks/plan_speed.py times it)."""
    png, out = tmp_path / "plan.png", tmp_path / "plan.json"
    r = trinity("plan", "--model", "trinity-large", "--gpus", "2048", "--gpu", "b300", "--tokens", "17e12",
                "--png", str(png), "--json", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "tok/s/GPU" in lines[1] and "mem GB" in lines[1] and "bound by" in lines[1]
    assert any(line.startswith("- the best step (") and "is bound by" in line for line in lines)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png.read_bytes()[16:24])[0] > 300
    rows = json.loads(out.read_text())
    fitting = [row for row in rows if row["fits"]]
    assert fitting and all(row["memory_gb"] <= 0.9 * 288 for row in fitting)
    assert [row["days"] for row in fitting] == sorted(row["days"] for row in fitting)
    for row in rows:  # every listed layout is one the cluster mode accepts for both batch sizes
        layout = Layout(row["dp_replicate"], row["dp_shard"], row["cp"], row["ep"])
        assert not layout.problems(world_size=2048, config=Config.preset("trinity-large"), seq_len=8192,
                                   micro_batch_size=row["micro_batch"], batch_sizes=[12288, 16384])
    top = fitting[0]
    assert f"{top['dp_shard']:>8} {top['ep']:>4}" in lines[2]


def test_fixing_a_dimension_and_the_schedule():
    config = Config.preset("bench-medium")
    hw = get_hardware("h100")
    plan = search(config, gpus=16, hardware=hw, seq_len=1024, batches=[(0, 64), (1e9, 128)], tokens=2e9,
                  fixed={"ep": 4})
    assert plan.ranked and all(c.first.layout.ep == 4 for c in plan.ranked + plan.rejected)
    best = plan.best
    # days: 1e9 tokens at each batch's throughput
    want = (1e9 / best.predictions[0].tokens_per_s + 1e9 / best.predictions[1].tokens_per_s) / 86400
    assert best.days == pytest.approx(want)


@pytest.mark.parametrize("args,message", [
    (["--gpu", "a100"], "unknown GPU 'a100'"),
    (["--batch", "12288@1e12"], "--batch '12288@1e12': sizes must be positive, the first without @"),
    (["--fix", "tp=2"], "--fix 'tp=2': 'tp=2' is not DIM=SIZE"),
    (["--gpus", "0"], "--gpus: '0': must be from 1 to 1,000,000"),
])
def test_bad_input_is_one_line(args, message):
    base = {"--model": "tiny", "--gpus": "8", "--gpu": "h100", "--tokens": "1e9"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    r = trinity("plan", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_nothing_fits_says_so():
    r = trinity("plan", "--model", "trinity-large", "--gpus", "8", "--gpu", "h100", "--tokens", "1e9",
                "--batch", "64")
    assert r.returncode == 1 and "0 fit in memory" in r.stdout and "- no layout fits in memory" in r.stdout


def test_recorded_routing_slows_the_expert_parallel_layouts(tmp_path):
    """A run whose router sent every token to expert 0 makes each ep > 1 layout's busiest rank take all the rows."""
    metrics = tmp_path / "metrics.jsonl"
    skewed = [1000] + [0] * 15
    metrics.write_text("".join(json.dumps({"step": s, "expert_load": {str(l): skewed for l in range(1, 8)}}) + "\n"
                               for s in (1, 2)))
    common = ["plan", "--model", "bench-medium", "--gpus", "8", "--gpu", "h100", "--tokens", "1e9", "--seq-len",
              "1024", "--batch", "64", "--fix", "dp_shard=8,ep=4", "--top", "1"]
    out = {}
    for name, extra in (("balanced", []), ("recorded", ["--routing", str(metrics)])):
        r = trinity(*common, *extra, "--json", str(tmp_path / f"{name}.json"))
        assert r.returncode == 0, r.stderr
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())[0]
    assert out["recorded"]["step_s"][0] > out["balanced"]["step_s"][0]
    bad = tmp_path / "empty.jsonl"
    bad.write_text(json.dumps({"step": 1}) + "\n")
    r = trinity(*common, "--routing", str(bad))
    assert r.returncode == 2 and "--routing: " in r.stderr and "no step with expert_load" in r.stderr
