"""No rank ever creates or reads a whole sharded key (issue 19): under a layout every rank builds its state from its
own spans (run/rank_state.py), resumes by the hyperslabs that overlap them and reads its own rows of each
batch; whole keys exist only one at a time, on rank 0, in the Hugging Face export (sharded_export.py)."""

import threading

import numpy as np
import pytest

from trinity.distributed import sharded_checkpoint, sharded_optim
from trinity.reference.training import checkpoint as single_checkpoint
from trinity.run import rank_state, startup
from trinity.distributed.fsdp import ShardedParams
from trinity.distributed.layout import Layout
from trinity.distributed.plan import ParallelPlan
from trinity.run.run_config import load_run_config
from trinity.run.trainer import Trainer
from trinity.reference import Config, init_params
from trinity.reference.interop import hf
from trinity.reference.interop.hf import load_pretrained, save_pretrained
from trinity.reference.model.params import param_shapes
from trinity.simulate.virtual.virtual_comm import VirtualCluster

RUN = """
[model]
{source}
dtype = "float64"
[model.overrides]
num_hidden_layers = 3
[data]
path = "{data}"
eos_id = 0
seq_len = 16
micro_batch_size = 1
[train]
steps = {steps}
sequences_per_step = 4
[checkpoint]
dir = "ckpt"
every = 1
{export}
[logging]
metrics = "metrics.jsonl"
progress = false
"""

WHOLE_MODEL = [  # the entry points that hold a whole model (or a whole key of every bucket) on a rank
    (startup, "init_params"), (startup, "_load_weights"), (ShardedParams, "full"), (ShardedParams, "from_full"),
    (sharded_optim, "gather_optimizer_state"), (sharded_optim, "shard_optimizer_state"),
    (hf, "load_pretrained"), (sharded_checkpoint, "load_sharded"), (single_checkpoint, "load_checkpoint"),
]


def _data(tmp_path):
    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource
    path = tmp_path / "tokens.bin"
    write_token_file(path, MarkovSource(256, eos_id=0, branching=4, mean_doc_len=20, seed=0).documents(20000),
                     eos_id=0)
    return path


def _write_run(folder, data, source='preset = "tiny"', steps=2, export=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.toml").write_text(RUN.format(source=source, data=data, steps=steps, export=export))
    return load_run_config(folder / "run.toml")


def _forbid_whole_model(monkeypatch):
    for owner, name in WHOLE_MODEL:
        if hasattr(owner, name):
            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"{_name} was called under a layout: a rank built a whole model")
            monkeypatch.setattr(owner, name, refuse)


def _record(monkeypatch, owner, name, index):
    """Record the `wanted` argument (positional `index`) of every call of owner.name, with its thread."""
    calls, original = [], getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append((threading.get_ident(), args[index]))
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, recorded)
    return calls


def _train(run, layout, resume=False):
    def rank(comm):
        trainer = Trainer(run, resume=resume, comm=comm, log=lambda *a, **k: None)
        trainer.train()
        return trainer.bytes_read
    return VirtualCluster(layout.world_size).run(rank)


def _check_spans(calls, config, layout):
    """Every rank asked for exactly its plan's spans, and no rank for the whole of a key that is sharded."""
    plan = ParallelPlan(config, layout)
    expected = [plan.wanted(r) for r in range(layout.world_size)]
    asked = [wanted for _, wanted in calls]
    assert len(asked) == layout.world_size
    assert sorted(map(repr, asked)) == sorted(map(repr, expected))
    shapes = param_shapes(config)
    sharded = {k for r in range(layout.world_size) for k, s in plan.spans(r).items()
               if sum(x.hi - x.lo for x in s) < int(np.prod(shapes[k]))}
    assert sharded, "the test's layout shards no key"
    for wanted in asked:
        for key in sharded & set(wanted):
            assert sum(hi - lo for lo, hi in wanted[key]) < int(np.prod(shapes[key])), key


@pytest.mark.parametrize("text", ["dp_shard=2,cp=2,ep=2", "dp_replicate=2,dp_shard=2,ep=2"])
def test_no_rank_creates_or_reads_a_whole_sharded_key(tmp_path, monkeypatch, text):
    layout = Layout.parse(text)
    data = _data(tmp_path)
    config = Config.preset("tiny").replace(num_hidden_layers=3)
    whole = init_params(config, seed=5, dtype=np.float64)  # (before the whole-model entry points are refused)
    save_pretrained(tmp_path / "hf", config, whole)
    expected_hf = load_pretrained(tmp_path / "hf", dtype=np.float64)[1]
    _forbid_whole_model(monkeypatch)
    fresh = _record(monkeypatch, rank_state, "init_param_spans", 1)
    reads = _record(monkeypatch, hf, "read_pretrained_spans", 1)
    resumed = _record(monkeypatch, sharded_checkpoint, "read_spans", 2)

    # a fresh run: each rank draws its spans only, and exports through the documented path
    run = _write_run(tmp_path / "fresh", data, export='hf_export = "export"', steps=2)
    _train(_with_layout(run, layout), layout)
    _check_spans(fresh, config, layout)
    exported = load_pretrained(tmp_path / "fresh" / "export", dtype=np.float64)[1]
    assert set(exported) == set(whole)

    # init_from: each rank reads its spans of the safetensors only
    run = _write_run(tmp_path / "from_hf", data, source=f'init_from = "{tmp_path / "hf"}"', steps=1)
    read = _train(_with_layout(run, layout), layout)
    _check_spans(reads, config, layout)
    file_bytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in expected_hf.values())
    assert all(0 < r < file_bytes for r in read)

    # --resume on another layout from the fresh run's sharded checkpoint: each rank reads its spans' blocks only
    other = Layout.parse("dp_shard=4,ep=4") if layout != Layout.parse("dp_shard=4,ep=4") else Layout(dp_shard=4)
    run = _write_run(tmp_path / "fresh", data, export="", steps=3)
    read = _train(_with_layout(run, other), other, resume=True)
    _check_spans(resumed, config, other)
    assert all(r > 0 for r in read)


def _with_layout(run, layout):
    import dataclasses
    return dataclasses.replace(run, layout=layout)


@pytest.mark.parametrize("text", ["dp_shard=2,cp=2,ep=2", "dp_replicate=2,dp_shard=2,ep=2", "dp_shard=4,ep=2"])
def test_a_fresh_sharded_start_is_the_single_process_init_sliced_bitwise(tmp_path, text):
    """Every rank's params and (zero) optimizer state at step 0, joined, are init_params and init_optimizer_state
    of the single process, bit for bit (the block-seeded init, docs/decisions.md #26)."""
    from trinity.reference.training.optim import init_optimizer_state
    layout = Layout.parse(text)
    run = _with_layout(_write_run(tmp_path / "run", _data(tmp_path), steps=1), layout)

    def rank(comm):
        trainer = Trainer(run, comm=comm, log=lambda *a, **k: None)
        try:
            return trainer.whole_state()
        finally:
            trainer.close()

    config = Config.preset("tiny").replace(num_hidden_layers=3)
    expected = init_params(config, seed=run.init_seed, dtype=np.float64)
    expected_state = init_optimizer_state(config, expected)
    for params, state in VirtualCluster(layout.world_size).run(rank):
        assert set(params) == set(expected)
        for key, value in expected.items():
            assert params[key].dtype == value.dtype and np.array_equal(params[key], value), key
        for key, value in expected_state.items():
            assert np.array_equal(np.asarray(state[key]), np.asarray(value)), key
