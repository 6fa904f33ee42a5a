"""Trinity Nano's real widths, sharded: every rank's peak resident memory and checkpoint bytes read, under mpiexec.

    python benchmarks/sharded_memory.py            # Nano widths, 4 layers (2 dense + 2 MoE), ~9 GiB of state: run
                                                   # it alone (about 20 GiB at its peak over 4 ranks)
    python benchmarks/sharded_memory.py --small    # the same jobs on bench-medium widths, a minute

The model: trinity-nano with num_hidden_layers = 4 (vocab 200,192, d 1024, 128 experts top-8; float32). Two layouts of
4 ranks (`mpiexec -n 4`): dp_shard=4,ep=4 and dp_shard=2,cp=2,ep=2. Each layout is started three ways, 2 training
steps each: (a) a fresh init; (b) `init_from` a Hugging Face checkpoint written by save_pretrained; (c) `--resume`
from the sharded checkpoint the other layout's fresh run wrote (a copy of its run folder, 2 more steps). For each
start it prints every rank's measured peak resident memory (the trainer's metrics line: VmHWM of each rank), the
whole training state's bytes (params, gradients and optimizer state of the single process) and their ratio, the
per-rank estimate (distributed/rank_memory.py) beside the measurement, and the bytes each rank read from checkpoint
or weight files against the size of what it read from. Bounds the issue sets: peak <= 0.6 x whole state on every
rank; checkpoint bytes read per rank <= 0.35 x the checkpoint. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_jobs import job_env, mpiexec_command  # noqa: E402

GIB = 2.0 ** 30
LAYOUTS = ("dp_shard=4,ep=4", "dp_shard=2,cp=2,ep=2")

RUN = """
[model]
{source}
dtype = "float32"
[model.overrides]
num_hidden_layers = {layers}
{overrides}
[data]
path = "{tokens}"
eos_id = 0
seq_len = {seq_len}
micro_batch_size = 1
[train]
steps = {steps}
sequences_per_step = 4
backend = "numba"
[checkpoint]
dir = "ckpt"
every = 2
keep_last = 1
[logging]
metrics = "metrics.jsonl"
progress = false
[parallel]
watchdog_seconds = 3600
"""


def _config(small: bool):
    from trinity.reference import Config
    if small:  # (a window that fits a cp chunk of the default seq_len)
        return Config.preset("bench-medium").replace(num_hidden_layers=4, num_dense_layers=2, sliding_window=32)
    return Config.preset("trinity-nano").replace(num_hidden_layers=4)


def whole_state_bytes(config, dtype="float32") -> int:
    """Params, gradients (one copy) and optimizer state of the single process, from shapes only."""
    import numpy as np
    from trinity.reference.model.params import is_expert_bias, param_shapes
    from trinity.reference.training.optim import param_group
    item = np.dtype(dtype).itemsize
    total = 0
    for key, shape in param_shapes(config).items():
        n = int(np.prod(shape))
        if is_expert_bias(key):
            total += 4 * n
            continue
        group = param_group(config, key, shape)
        total += item * n * (2 + {"muon": 1, "adamw": 2}.get(group, 0))
    return total


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _write_run(folder, source, layers, seq_len, steps, tokens, overrides=""):
    with open(os.path.join(folder, "run.toml"), "w") as f:
        f.write(RUN.format(source=source, layers=layers, seq_len=seq_len, steps=steps, tokens=tokens,
                           overrides=overrides))


def _job(folder: str, layout: str, resume: bool, timeout: int) -> tuple[list[dict], str]:
    command = [*mpiexec_command(4), "--mesh", layout] + (["--resume"] if resume else [])
    command = [c.replace("{run}", "run.toml") for c in command]
    done = subprocess.run(command, cwd=folder, env=job_env(1), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"job failed in {folder} ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows, done.stdout + done.stderr


def _estimates(config, layout_text: str, seq_len: int, start: str) -> list[int]:
    from trinity.distributed.layout import Layout
    from trinity.distributed.rank_memory import estimate_rank_bytes
    layout = Layout.parse(layout_text)
    return [estimate_rank_bytes(config, layout, rank, seq_len=seq_len, micro_batch_size=1, dtype="float32",
                                micro_steps=4 // layout.dp, backend="numba", start=start)["total"]
            for rank in range(layout.world_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="bench-medium widths (a quick check of the script)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    args = parser.parse_args()
    import numpy as np
    from trinity.reference import init_params
    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource
    from trinity.reference.interop.hf import save_pretrained

    config = _config(args.small)
    layers, seq_len = config.num_hidden_layers, args.seq_len
    preset = "bench-medium" if args.small else "trinity-nano"
    overrides = "num_dense_layers = 2\nsliding_window = 32" if args.small else ""
    root = tempfile.mkdtemp(prefix="trinity-sharded-memory-")
    tokens = os.path.join(root, "tokens.bin")
    write_token_file(tokens, MarkovSource(32000, eos_id=0, branching=8, mean_doc_len=600, seed=0).documents(
        8 * 4 * seq_len * 2), eos_id=0)
    hf = os.path.join(root, "hf")
    print(f"writing the Hugging Face checkpoint of {preset} with {layers} layers (save_pretrained) ...", flush=True)
    params = init_params(config, seed=1, dtype=np.float32)
    save_pretrained(hf, config, params)
    del params
    state = whole_state_bytes(config)
    print(f"{preset}, {layers} layers: whole training state {state / GIB:.2f} GiB "
          f"(params, gradients, optimizer state; float32)\n", flush=True)
    sources = {"fresh": f'preset = "{preset}"', "init_from": f'init_from = "{hf}"'}
    timeout = 3600
    results, fresh_folder = [], {}
    for start in ("fresh", "init_from", "resume"):
        for layout in LAYOUTS:
            folder = os.path.join(root, f"{start}-{layout.replace(',', '_').replace('=', '')}")
            if start == "resume":
                other = LAYOUTS[1 - LAYOUTS.index(layout)]
                shutil.copytree(fresh_folder[other], folder)
                ckpt_bytes = _folder_bytes(os.path.join(folder, "ckpt"))
                _write_run(folder, sources["fresh"], layers, seq_len, 4, tokens, overrides)
                read_from = f"the sharded checkpoint of {other} ({ckpt_bytes / GIB:.2f} GiB)"
            else:
                os.makedirs(folder)
                _write_run(folder, sources[start], layers, seq_len, 2, tokens, overrides if start == "fresh" else "")
                ckpt_bytes = _folder_bytes(hf) if start == "init_from" else 0
                read_from = f"the HF checkpoint ({ckpt_bytes / GIB:.2f} GiB)" if start == "init_from" else "nothing"
            print(f"== {start}, {layout} (mpiexec -n 4) ...", flush=True)
            rows, _ = _job(folder, layout, start == "resume", timeout)
            rows = rows[max(i for i, r in enumerate(rows) if "start" in r):]  # this job's lines
            if start == "fresh":
                fresh_folder[layout] = folder
            peaks = [max(r["peak_rss"]["ranks"][k] for r in rows) for k in range(4)]
            read = rows[0]["start"]["bytes_read"]
            est = _estimates(config, layout, seq_len, start)
            print(f"   steps {rows[0]['step']}-{rows[-1]['step']}, loss {rows[-1]['loss']['total']:.4f}; read from "
                  f"{read_from}")
            print(f"   {'rank':>4} {'peak GiB':>9} {'/ state':>8} {'estimate GiB':>13} {'est/peak':>9} "
                  f"{'read GiB':>9} {'/ ckpt':>7}")
            for k in range(4):
                frac = read[k] / ckpt_bytes if ckpt_bytes else 0.0
                print(f"   {k:>4} {peaks[k] / GIB:9.2f} {peaks[k] / state:8.3f} {est[k] / GIB:13.2f} "
                      f"{est[k] / peaks[k]:9.2f} {read[k] / GIB:9.3f} {frac:7.3f}")
            results.append({"start": start, "layout": layout, "peaks": peaks, "estimates": est, "read": read,
                            "checkpoint_bytes": ckpt_bytes, "state_bytes": state})
            print(flush=True)
    worst_peak = max(max(r["peaks"]) / state for r in results)
    worst_read = max((max(r["read"]) / r["checkpoint_bytes"]) for r in results if r["checkpoint_bytes"])
    ratios = [e / p for r in results for e, p in zip(r["estimates"], r["peaks"])]
    print(f"largest peak / whole state: {worst_peak:.3f} (bound 0.6); largest read / checkpoint: {worst_read:.3f} "
          f"(bound 0.35); estimate / measured: {min(ratios):.2f}–{max(ratios):.2f} (goal 0.8–1.3)")
    if args.keep:
        print(f"run folders kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
