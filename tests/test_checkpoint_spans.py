"""Sharded resume (distributed/checkpoint_spans.py, sharded_checkpoint.load_spans): each rank of any layout reads only
the parts of a checkpoint saved under any layout (or as a single file) that overlap its spans, bit for bit the whole
load's arrays cut by the plan, reading little more than its spans, and verifying each block it reads: a flipped byte
in a block it reads is a CheckpointCorrupt naming the file and dataset, one in a block it does not read is not seen
(and the values it reads are the saved ones)."""

from __future__ import annotations

import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from strategies import small_configs
from trinity.distributed.checkpoint_spans import state_wanted
from trinity.distributed.fsdp import ShardedParams, shards_from_spans
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed.plan import ParallelPlan
from trinity.distributed.sharded_checkpoint import (ShardedCheckpointManager, load_sharded, load_spans, read_manifest,
                                                    read_spans, save_sharded)
from trinity.distributed.sharded_optim import STATE_PREFIXES, shard_optimizer_state
from trinity.reference import Config, init_params
from trinity.reference.model.params import is_expert_bias
from trinity.reference.training import sealed_file
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.checkpoint import (CheckpointCorrupt, CheckpointError, load_checkpoint,
                                                   save_checkpoint)
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.sealed_file import read_header
from trinity.simulate.virtual.virtual_comm import VirtualCluster

FILE = "file"  # a saved "layout": the single-file checkpoint
STEP = 5


def whole_state(config: Config, seed: int, dtype) -> tuple[dict, dict, dict]:
    """Whole params, a non-trivial optimizer state (every moment differs from the params) and the common state."""
    rng = np.random.default_rng(seed)
    params = init_params(config, seed=seed, dtype=dtype)
    for k in params:
        if is_expert_bias(k):
            params[k] = rng.standard_normal(params[k].shape).astype(np.float32)
    opt = {k: (rng.standard_normal(v.shape).astype(v.dtype) if k != "step" else np.array(7, dtype=np.int64))
           for k, v in init_optimizer_state(config, params).items()}
    common = dict(balancing_state={k: rng.standard_normal(v.shape).astype(v.dtype)
                                   for k, v in init_balancing_state(config, params).items()},
                  tokens_seen=12345, data_state={"position": 17},
                  rng_state=np.random.default_rng(3).bit_generator.state, extra={"skipped_steps": 2}, run_id="run-a",
                  tokenizer=({"kind": "bytes", "vocab_size": 256, "eos_id": 0, "sha256": "ab"}, b'{"model": {}}'),
                  data_fingerprint=[{"documents": 3}])
    return params, opt, common


def save(directory, saved: str, config, params, opt, common, step=STEP) -> str:
    """Save the whole state as a single file (`saved` == FILE) or sharded over the layout `saved` on virtual
    ranks; the checkpoint's path."""
    if saved == FILE:
        os.makedirs(directory, exist_ok=True)
        return save_checkpoint(os.path.join(directory, f"step_{step:08d}.h5"), config=config, params=params,
                               optimizer_state=opt, step=step, **common)
    layout = Layout.parse(saved)

    def rank(comm):
        mesh = Mesh(comm, layout)
        sharded = ShardedParams.from_full(config, mesh, params)
        return save_sharded(directory, step, mesh, sharded, shard_optimizer_state(config, sharded, opt), common)
    return VirtualCluster(layout.world_size, timeout=60.0).run(rank)[0]


def load_whole(path, config):
    return load_sharded(path, config) if os.path.isdir(path) else load_checkpoint(path, config)


def cut(whole: dict, wanted: dict) -> dict:
    return {k: [np.asarray(whole[k]).reshape(-1)[lo:hi] for lo, hi in spans] for k, spans in wanted.items()}


def assert_same(got: dict, want: dict, what: str):
    assert list(got) == list(want), (what, sorted(set(got) ^ set(want)))
    for k in want:
        g, w = got[k], want[k]
        if isinstance(w, list):
            assert len(g) == len(w), (what, k)
            pairs = zip(g, w)
        else:
            pairs = [(g, w)]
        for a, b in pairs:
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (what, k)


def assert_rank_reads_its_spans(got, whole, plan, rank):
    """load_spans of `rank` == the whole checkpoint cut by the plan's spans, bitwise, and the same other fields."""
    assert_same(got.params, cut(whole.params, plan.wanted(rank)), f"params of rank {rank}")
    state = cut(whole.optimizer_state, state_wanted(plan, rank))
    state["step"] = whole.optimizer_state["step"]
    assert_same(got.optimizer_state, state, f"optimizer state of rank {rank}")
    assert_same(got.balancing_state, whole.balancing_state, "balancing")
    for name in ("step", "tokens_seen", "data_state", "rng_state", "extra", "run_id", "tokenizer", "tokenizer_json",
                 "data_fingerprint", "config"):
        assert getattr(got, name) == getattr(whole, name), name


def file_overheads(path) -> int:
    """Bytes of a checkpoint that are no dataset: the manifest, and each file's seal header and structure."""
    files = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [path]
    total = 0
    for file in files:
        if file.endswith(".json"):
            total += os.path.getsize(file)
            continue
        header = read_header(file)
        total += header["length"] - sum(n for _, n, _ in header["ranges"].values())
    return total


def checkpoint_bytes(path) -> int:
    files = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [path]
    return sum(os.path.getsize(f) for f in files)


@st.composite
def layouts(draw, num_experts: int, max_world: int = 8):
    """A layout of at most `max_world` ranks whose ep divides dp_shard·cp and the experts."""
    dp_replicate = draw(st.sampled_from([1, 1, 2]))
    cp = draw(st.sampled_from([1, 1, 2]))
    dp_shard = draw(st.integers(1, max(1, max_world // (dp_replicate * cp))))
    eps = [e for e in range(1, dp_shard * cp + 1) if (dp_shard * cp) % e == 0 and num_experts % e == 0]
    return Layout(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, ep=draw(st.sampled_from(eps)))


# ---- equality: any saved layout, any reading layout ---------------------------------------------------------------
@settings(max_examples=30)
@given(config=small_configs(max_layers=3, max_hidden=24, max_vocab=40), data=st.data())
def test_every_rank_of_any_layout_reads_its_spans_of_any_saved_layout(config, data):
    """Saved as a single file or under a layout A (1-8 ranks), read by every rank of a layout B (1-8 ranks): each
    rank's params and optimizer state are the whole load's arrays cut by B's spans, bitwise; it reads at most its
    spans' bytes, the files' headers and structures, and two blocks per piece (a piece: a range within one saved
    shard)."""
    saved = data.draw(st.one_of(st.just(FILE), layouts(config.num_experts).map(str)), label="saved")
    target = data.draw(layouts(config.num_experts), label="target")
    block = data.draw(st.sampled_from([512, 1024, 1 << 20]), label="block size")
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    params, opt, common = whole_state(config, seed=data.draw(st.integers(0, 3)), dtype=dtype)
    with tempfile.TemporaryDirectory() as directory, mock.patch.object(sealed_file, "BLOCK_SIZE", block):
        path = save(directory, saved, config, params, opt, common)
        whole = load_whole(path, config)
        plan = ParallelPlan(config, target)
        saved_ranks = 1 if saved == FILE else Layout.parse(saved).world_size
        for rank in range(target.world_size):
            got = load_spans(path, config, plan, rank)
            assert_rank_reads_its_spans(got, whole, plan, rank)
            ranges = [(k, lo, hi) for k, spans in [*plan.wanted(rank).items(), *state_wanted(plan, rank).items()]
                      for lo, hi in spans]
            itemsize = np.dtype(dtype).itemsize
            replicated = sum(v.nbytes for v in whole.balancing_state.values()) + 8 + len(whole.tokenizer_json or b"")
            bound = (sum(hi - lo for _, lo, hi in ranges) * itemsize + replicated + file_overheads(path)
                     + 2 * block * (len(ranges) * saved_ranks + len(whole.balancing_state) + 2))
            assert got.bytes_read <= bound, (rank, got.bytes_read, bound)


def test_a_big_enough_model_is_read_in_parts(tmp_path):
    """Trinity-like proportions at a small width (8 experts): under 8 ranks each rank reads about 1/8 of a
    checkpoint saved by 4 ranks or as one file, far below the whole (the issue's bound is 0.35)."""
    config = Config(vocab_size=2048, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                    num_hidden_layers=3, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, sliding_window=8,
                    max_position_embeddings=64)
    params, opt, common = whole_state(config, seed=0, dtype=np.float32)
    with mock.patch.object(sealed_file, "BLOCK_SIZE", 4096):
        for i, saved in enumerate([FILE, "dp_shard=4,ep=2"]):
            path = save(tmp_path / str(i), saved, config, params, opt, common)
            whole, total = load_whole(path, config), checkpoint_bytes(path)
            for target in ["dp_shard=8,ep=8", "dp_replicate=2,dp_shard=2,cp=2,ep=4"]:
                plan = ParallelPlan(config, Layout.parse(target))
                for rank in range(8):
                    got = load_spans(path, config, plan, rank)
                    assert_rank_reads_its_spans(got, whole, plan, rank)
                    share = 0.2 if target.startswith("dp_shard=8") else 0.3  # 1/8 and 1/4 of the state
                    assert got.bytes_read <= share * total, (saved, target, rank, got.bytes_read / total)


def test_resharding_through_span_reads_round_trips(tmp_path):
    """file → layout (spans) → saved sharded → another layout (spans) → saved → one process (spans) → file: the
    whole state at the end is the state at the start, bitwise."""
    config = Config.preset("tiny")
    params, opt, common = whole_state(config, seed=1, dtype=np.float64)
    path = save(tmp_path / "0", FILE, config, params, opt, common)
    for i, layout in enumerate(["dp_shard=2,cp=2,ep=4", "dp_replicate=2,dp_shard=3", "single"]):
        layout = Layout.parse(layout)
        plan = ParallelPlan(config, layout)

        def rank(comm):
            mesh = Mesh(comm, layout)
            got = load_spans(path, config, plan, mesh.rank)
            buckets = plan.buckets(mesh.rank)
            sharded = ShardedParams(config, mesh, buckets, shards_from_spans(buckets, got.params, np.float64),
                                    {k: v[0].reshape(params[k].shape) for k, v in got.params.items()
                                     if is_expert_bias(k)})
            state = {"step": got.optimizer_state["step"]}
            for b in buckets:
                for prefix in STATE_PREFIXES[b.optimizer]:
                    state[prefix + b.shard_name] = shards_from_spans([b], got.optimizer_state, np.float64,
                                                                     prefix)[b.shard_name]
            return save_sharded(tmp_path / str(i + 1), STEP + i + 1, mesh, sharded, state, common)
        path = VirtualCluster(layout.world_size, timeout=60.0).run(rank)[0]
    got = read_spans(path, config, {k: [(0, v.size)] for k, v in params.items()},
                     {k: [(0, v.size)] for k, v in opt.items() if k != "step"})
    assert_same({k: v[0].reshape(params[k].shape) for k, v in got.params.items()}, params, "params")
    assert_same({**{k: v[0].reshape(opt[k].shape) for k, v in got.optimizer_state.items() if k != "step"},
                 "step": got.optimizer_state["step"]}, {k: opt[k] for k in got.optimizer_state}, "state")
    assert got.step == STEP + 3


# ---- verification: what a rank reads ------------------------------------------------------------------------------
def _small_saves(tmp_path):
    config = Config.preset("tiny")
    params, opt, common = whole_state(config, seed=2, dtype=np.float32)
    with mock.patch.object(sealed_file, "BLOCK_SIZE", 512):
        return config, {saved: save(tmp_path / saved.replace(",", "_").replace("=", ""), saved, config, params, opt,
                                    common) for saved in [FILE, "dp_shard=4,ep=2", "dp_replicate=2,dp_shard=2"]}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _small_saves(tmp_path_factory.mktemp("small"))


def _flip(file, at):
    with open(file, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x20]))


def _data_bytes(file) -> list:
    """(dataset name, file offset) of a byte in every block of every non-empty dataset of a sealed file."""
    header = read_header(file)
    block = header["block_size"]
    return [(name, off + b * block + (min(block, n - b * block) // 2))
            for name, (off, n, _) in sorted(header["ranges"].items()) for b in range(-(-n // block))]


def _read_by_someone(source, file, name, at) -> bool:
    """Whether the byte at `at` of dataset `name` of `file` holds a value some rank reads: every value of a single
    file's params and optimizer state, balancing, step and assets; of a sharded save, a value of a key (not the
    padding) in a shard no lower rank holds too (replicas are never read)."""
    if name.startswith(("balancing/", "assets/")) or name == "optimizer/step" or not os.path.isdir(source):
        return True
    manifest = read_manifest(source)
    r = int(os.path.basename(file)[5:10])
    if "shard:" not in name:  # rank 0's expert_bias
        return True
    bucket = name.split("shard:")[1]
    described = manifest["ranks"][r]
    header = read_header(file)
    off = header["ranges"][name][0]
    itemsize = 4
    element = described["shards"][bucket][0] + (at - off) // itemsize
    lower = any(d["shards"].get(bucket) == described["shards"][bucket] and d["experts"] == described["experts"]
                for d in manifest["ranks"][:r])
    return element < manifest["buckets"][bucket]["size"] and not lower


@pytest.mark.parametrize("saved", [FILE, "dp_shard=4,ep=2", "dp_replicate=2,dp_shard=2"])
def test_a_flipped_byte_is_found_by_the_ranks_that_read_its_block_and_unseen_by_the_others(small, tmp_path, saved):
    """For a byte flipped in (a sample of) every block of every dataset: each rank of a 4-rank layout either raises
    CheckpointCorrupt naming the file and the dataset, or reads exactly the saved values (the block was not one it
    read); a block of a key's values is read by some rank; the whole load always fails."""
    config, paths = small
    source = paths[saved]
    whole = load_whole(source, config)
    plan = ParallelPlan(config, Layout.parse("dp_shard=2,cp=2,ep=4"))
    files = [os.path.join(source, n) for n in sorted(os.listdir(source)) if n.endswith(".h5")] \
        if os.path.isdir(source) else [source]
    rng = np.random.default_rng(0)
    for file in files:
        targets = _data_bytes(file)
        for name, at in [targets[i] for i in sorted(rng.choice(len(targets), min(8, len(targets)), replace=False))]:
            copy = tmp_path / f"c{len(os.listdir(tmp_path))}"
            os.makedirs(copy)
            path = shutil.copytree(source, copy / os.path.basename(source)) if os.path.isdir(source) else \
                shutil.copy(source, copy / os.path.basename(source))
            _flip(os.path.join(path, os.path.basename(file)) if os.path.isdir(path) else path, at)
            found = 0
            for rank in range(plan.world_size):
                try:
                    got = load_spans(path, config, plan, rank)
                except CheckpointCorrupt as e:
                    shown = name.replace("%2F", "/")
                    assert os.path.basename(file) in str(e) and shown in str(e), (str(e), shown)
                    found += 1
                    continue
                assert_rank_reads_its_spans(got, whole, plan, rank)
            with pytest.raises(CheckpointCorrupt):
                load_whole(path, config)
            if _read_by_someone(source, file, name, at):
                assert found, name
            shutil.rmtree(copy)


@pytest.mark.parametrize("saved", [FILE, "dp_shard=4,ep=2"])
def test_damage_to_a_header_or_structure_of_a_file_a_rank_opens_is_corrupt(small, tmp_path, saved):
    config, paths = small
    source = paths[saved]
    file_name = "rank_00000.h5" if os.path.isdir(source) else os.path.basename(source)
    header = read_header(os.path.join(source, file_name) if os.path.isdir(source) else source)
    ranges = sorted((off, off + n) for off, n, _ in header["ranges"].values() if n)
    structure_byte = next(at for at in range(header["size"], header["length"])
                          if not any(lo <= at < hi for lo, hi in ranges))
    for i, (at, why) in enumerate([(40, "seal header"), (structure_byte, "structure"),
                                   (header["length"] - 1, "")]):
        copy = tmp_path / str(i)
        os.makedirs(copy)
        path = shutil.copytree(source, copy / os.path.basename(source)) if os.path.isdir(source) else \
            shutil.copy(source, copy / os.path.basename(source))
        _flip(os.path.join(path, file_name) if os.path.isdir(path) else path, at)
        for rank in range(4):  # every rank opens rank 0's file (the replicated state)
            with pytest.raises(CheckpointCorrupt, match=file_name.replace(".", r"\.") + ".*" + why):
                load_spans(path, config, ParallelPlan(config, Layout(dp_shard=4)), rank)


def test_a_rank_opens_only_the_files_it_needs(small, tmp_path):
    """A missing rank file is seen only by the ranks whose spans it holds (rank 0's by every rank)."""
    config, paths = small
    path = shutil.copytree(paths["dp_replicate=2,dp_shard=2"], tmp_path / "step_00000005.sharded")
    os.remove(os.path.join(path, "rank_00003.h5"))  # a replica of rank 1: every piece is read from rank 1
    plan = ParallelPlan(config, Layout(dp_shard=4))
    whole = load_whole(paths["dp_replicate=2,dp_shard=2"], config)
    for rank in range(4):
        assert_rank_reads_its_spans(load_spans(path, config, plan, rank), whole, plan, rank)
    os.remove(os.path.join(path, "rank_00001.h5"))
    failed = []
    for rank in range(4):
        try:
            load_spans(path, config, plan, rank)
        except CheckpointCorrupt as e:
            assert "rank_00001.h5: missing" in str(e)
            failed.append(rank)
    assert failed == [2, 3]  # the second half of every bucket was rank 1's


def test_files_sealed_before_block_digests_load_by_the_whole_file_path(tmp_path):
    config = Config.preset("tiny")
    params, opt, common = whole_state(config, seed=3, dtype=np.float32)
    plan = ParallelPlan(config, Layout(dp_shard=2, ep=2))
    with mock.patch.object(sealed_file, "BLOCK_SIZE", 0):
        for i, saved in enumerate([FILE, "dp_shard=2"]):
            path = save(tmp_path / str(i), saved, config, params, opt, common)
            assert "block_size" not in read_header(path if saved == FILE else os.path.join(path, "rank_00000.h5"))
            whole = load_whole(path, config)
            for rank in range(2):
                got = load_spans(path, config, plan, rank)
                assert_rank_reads_its_spans(got, whole, plan, rank)
                assert got.bytes_read == checkpoint_bytes(path)


def test_wanted_ranges_are_checked(small):
    config, paths = small
    d = config.hidden_size
    for saved in (FILE, "dp_shard=4,ep=2"):
        with pytest.raises(ValueError, match=rf"model.norm.weight: range \[0, {d + 1}\) is not a non-empty part of "
                                             rf"its {d} elements"):
            read_spans(paths[saved], config, {"model.norm.weight": [(0, d + 1)]}, {})
        with pytest.raises(ValueError, match=r"range \[3, 3\)"):
            read_spans(paths[saved], config, {}, {"adamw.m/model.norm.weight": [(3, 3)]})
    with pytest.raises(CheckpointError, match="no parameter 'nope'"):
        read_spans(paths["dp_shard=4,ep=2"], config, {"nope": [(0, 1)]}, {})
    with pytest.raises(CheckpointError, match="another model"):
        load_spans(paths[FILE], Config.preset("bench-medium"), ParallelPlan(config, Layout()), 0)


def test_manager_lists_candidates_and_skips_what_this_rank_finds_corrupt(tmp_path):
    """load_newest_valid_spans skips a newer checkpoint only on the ranks that read its damage: the ranks then
    disagree, which the job's agreement (allgather over resume_candidates) must settle."""
    config = Config.preset("tiny")
    params, opt, common = whole_state(config, seed=4, dtype=np.float32)
    with mock.patch.object(sealed_file, "BLOCK_SIZE", 512):
        older = save(tmp_path, "dp_shard=2", config, params, opt, common, step=3)
        newer = save(tmp_path, FILE, config, params, opt, common, step=4)
    manager = ShardedCheckpointManager(tmp_path, keep_last=None)
    assert manager.resume_candidates() == [newer, older]
    header = read_header(newer)
    off, n, _ = header["ranges"]["params/model.embed_tokens.weight"]
    _flip(newer, off + n - 1)  # the embedding's last row: the last rank's span
    plan = ParallelPlan(config, Layout(dp_shard=2))
    chosen = [manager.load_newest_valid_spans(config, plan, r) for r in range(2)]
    assert chosen[0][0].path == newer and chosen[0][1] == []
    assert chosen[1][0].path == older and [p for p, _ in chosen[1][1]] == [newer]
    assert "params/model.embed_tokens.weight fails its sha256 checksum (block" in chosen[1][1][0][1]
    for rank in range(2):
        assert_rank_reads_its_spans(manager.load_spans(older, config, plan, rank), load_whole(older, config), plan,
                                    rank)
