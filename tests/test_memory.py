"""reference/training/memory.py: the peak-memory estimate of a training step (exact parts, scaling, against a measured
peak) and the free memory of the machine (MemAvailable, cgroup v1/v2 limits, on fake /proc and cgroup trees)."""

from __future__ import annotations

import tempfile
import tracemalloc

import numpy as np
import pytest

from trinity.run.run_config import load_run_config
from trinity.run.trainer import Trainer
from trinity.reference import Config, init_params
from trinity.reference.data.store import write_token_file
from trinity.reference.data.synthetic import MarkovSource
from trinity.reference.training.memory import available_memory_bytes, estimate_step_bytes
from trinity.reference.training.optim import init_optimizer_state

TINY = Config.preset("tiny")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", [TINY, TINY.replace(tie_word_embeddings=True, router_optimizer="adamw",
                                                       num_shared_experts=0)])
def test_params_grads_and_optimizer_state_are_exact(config, dtype):
    params = init_params(config, seed=0, dtype=np.dtype(dtype))
    est = estimate_step_bytes(config, 2, 16, dtype, False)
    assert est["params"] == est["grads"] == sum(p.nbytes for p in params.values())
    assert est["optimizer"] == sum(v.nbytes for k, v in init_optimizer_state(config, params).items() if k != "step")


def test_estimate_scales_with_batch_sequence_and_recompute():
    c = Config.preset("bench-medium")
    base = estimate_step_bytes(c, 2, 256, "float32", False)
    for B, T in [(1, 64), (8, 1024)]:
        other = estimate_step_bytes(c, B, T, "float32", False)
        assert all(other[k] == base[k] for k in ("params", "grads", "optimizer"))  # independent of B and T
    # activations and logits linear in the micro-batch size (RoPE tables aside, which depend on T only)
    four = estimate_step_bytes(c, 8, 256, "float32", False)
    assert four["logits"] == 4 * base["logits"] == 2 * 8 * 256 * c.vocab_size * 4
    assert four["activations"] == pytest.approx(4 * base["activations"], rel=1e-3)
    assert four["total"] > base["total"]
    # recompute keeps less for the backward; the parameters do not change
    rc = estimate_step_bytes(c, 8, 256, "float32", True)
    assert rc["activations"] < four["activations"] / 2 and rc["total"] < four["total"]
    assert rc["params"] == four["params"]
    # float64 doubles every float array (but expert_bias, float32 in any model)
    f64 = estimate_step_bytes(c, 8, 256, "float64", False)
    assert f64["params"] == pytest.approx(2 * four["params"], rel=1e-3) and f64["logits"] == 2 * four["logits"]
    assert four["activations"] < f64["activations"] < 2 * four["activations"]  # int64 arrays do not double
    # gradient accumulation adds each micro-batch into the running sums as it is handed back: no second set, only
    # the buckets being handed back, however many micro-batches
    acc = [estimate_step_bytes(c, 8, 256, "float32", False, micro_steps=m)["total"] for m in (1, 2, 3, 8)]
    assert acc[0] < acc[1] == acc[2] == acc[3]
    assert acc[1] - acc[0] < estimate_step_bytes(c, 8, 256, "float32", False)["grads"]
    with pytest.raises(ValueError, match="must be >= 1"):
        estimate_step_bytes(c, 0, 256)


def test_longer_sequences_cost_more_in_global_layers():
    """Attention's score blocks: a global layer's span grows with T, a sliding layer's stays near the window."""
    c = TINY
    sliding_only = c.replace(layer_types=("sliding_attention",) * c.num_hidden_layers)
    grow = {cfg: estimate_step_bytes(cfg, 1, 2048, "float32", False)["workspace"]
            - estimate_step_bytes(cfg, 1, 1024, "float32", False)["workspace"] for cfg in (c, sliding_only)}
    assert grow[c] > 2 * grow[sliding_only]


RUN = """
[model]
preset = "{preset}"
[data]
path = "tokens.bin"
eos_id = 0
seq_len = {T}
micro_batch_size = {B}
[train]
steps = 4
sequences_per_step = {S}
recompute = {recompute}
[checkpoint]
dir = "ckpt"
[logging]
metrics = "metrics.jsonl"
progress = false
"""


def measure_step(folder, preset, B, T, micro=1, recompute=False) -> tuple[int, dict]:
    """(measured peak bytes, estimate) of one reference trainer step: the tracemalloc peak of `Trainer.train_step`
    on its second step, plus the params and optimizer state allocated before it."""
    source = MarkovSource(256, eos_id=0, branching=4, mean_doc_len=40, seed=0)
    write_token_file(folder / "tokens.bin", source.documents(max(8000, 3 * B * T * micro)), eos_id=0)
    (folder / "run.toml").write_text(RUN.format(preset=preset, B=B, T=T, S=B * micro,
                                                recompute=str(recompute).lower()))
    trainer = Trainer(load_run_config(folder / "run.toml"), log=lambda *_: None)
    trainer.train_step()
    held = sum(v.nbytes for tree in (trainer.params, trainer.opt_state) for v in tree.values())
    tracemalloc.start()
    try:
        trainer.train_step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return held + peak, estimate_step_bytes(trainer.config, B, T, "float32", recompute, micro_steps=micro)


@pytest.mark.parametrize("B, T, micro, recompute", [(4, 32, 1, False), (16, 64, 1, False), (16, 64, 1, True),
                                                     (4, 32, 3, False)])
def test_estimate_errs_high_but_close_to_a_measured_training_step(tmp_path, B, T, micro, recompute):
    """The measured peak of a real trainer step lies below the estimate and above 1/1.3 of it."""
    measured, estimate = measure_step(tmp_path, "tiny", B, T, micro, recompute)
    assert 1.0 <= estimate["total"] / measured <= 1.3, (estimate["total"] / 2**20, measured / 2**20)


# ---- available memory ------------------------------------------------------------------------------------------
def _tree(tmp_path, meminfo_kb=None, cgroup=None, files=None):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    if meminfo_kb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       99999999 kB\nMemFree:  1 kB\nMemAvailable:   {meminfo_kb} kB\n")
    if cgroup is not None:
        (proc / "self" / "cgroup").write_text(cgroup)
    root = tmp_path / "cgroup"
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return dict(proc=str(proc), cgroup_root=str(root))


def test_available_memory_from_meminfo_and_cgroup_limits(tmp_path):
    GiB = 2**30
    # no cgroup file: MemAvailable
    assert available_memory_bytes(**_tree(tmp_path / "a", meminfo_kb=8 * 2**20)) == 8 * GiB
    # cgroup v2 with a limit on the process's group: limit − (usage − inactive file cache)
    v2 = {"job/memory.max": f"{2 * GiB}\n", "job/memory.current": f"{GiB}\n",
          "job/memory.stat": f"anon 5\ninactive_file {GiB // 2}\nactive_file 7\n"}
    assert available_memory_bytes(**_tree(tmp_path / "b", 8 * 2**20, "0::/job\n", v2)) == GiB + GiB // 2
    # "max" (no limit) on the group, a tighter limit on an ancestor
    nested = {"a/b/memory.max": "max\n", "a/memory.max": f"{GiB}\n", "a/memory.current": f"{GiB // 4}\n"}
    assert available_memory_bytes(**_tree(tmp_path / "c", 8 * 2**20, "0::/a/b\n", nested)) == 3 * GiB // 4
    # MemAvailable lower than the cgroup headroom wins
    assert available_memory_bytes(**_tree(tmp_path / "d", 2**19, "0::/job\n", v2)) == GiB // 2
    # cgroup v1: the memory controller's hierarchy; "unlimited" is a huge number
    v1 = {"memory/memory.limit_in_bytes": f"{3 * GiB}\n", "memory/memory.usage_in_bytes": f"{GiB}\n",
          "memory/memory.stat": f"total_inactive_file {GiB}\n"}
    cg1 = "12:cpu,cpuacct:/\n4:memory:/\n"
    assert available_memory_bytes(**_tree(tmp_path / "e", None, cg1, v1)) == 3 * GiB
    unlimited = {"memory/memory.limit_in_bytes": "9223372036854771712\n"}
    assert available_memory_bytes(**_tree(tmp_path / "f", 2**20, cg1, unlimited)) == GiB
    # nothing readable: unknown
    assert available_memory_bytes(**_tree(tmp_path / "g")) is None
    assert available_memory_bytes(proc=str(tmp_path / "nowhere"), cgroup_root=str(tmp_path / "nowhere")) is None
    # this machine (Linux): a positive number no larger than MemTotal
    here = available_memory_bytes()
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert here is not None and 0 < here <= total


if __name__ == "__main__":
    # python tests/test_memory.py PRESET,B,T[,MICRO[,RECOMPUTE]] ...: estimate against the measured step (the table
    # in trinity/reference/training/memory.py's docstring), e.g. tiny,4,32 bench-medium,4,512 bench-medium,4,512,1,1
    import pathlib
    import sys

    for spec in sys.argv[1:]:
        preset, B, T, *rest = spec.split(",")
        micro, recompute = (int(rest[0]) if rest else 1), (len(rest) > 1 and rest[1] == "1")
        with tempfile.TemporaryDirectory() as folder:
            measured, est = measure_step(pathlib.Path(folder), preset, int(B), int(T), micro, recompute)
        print(f"{preset:13s} {B}x{T} micro {micro} recompute {recompute!s:5s}: estimate {est['total'] / 2**20:8.1f} "
              f"MiB, measured {measured / 2**20:8.1f} MiB, ratio {est['total'] / measured:.3f} ({est['phase']})")
