"""Sharded checkpoints (distributed/sharded_checkpoint.py) on virtual ranks: saved at 4 ranks under several layouts
and loaded as whole arrays equal bit for bit to the saving job's gathered state; resharded 4 → 2 → 1 → 4; an
interrupted save is refused and ignored; a flipped byte anywhere is a CheckpointCorrupt naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from trinity.distributed.fsdp import ShardedParams
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed import sharded_checkpoint as sc
from trinity.distributed.sharded_checkpoint import (ShardedCheckpointManager, load_sharded, read_manifest,
                                                    save_sharded, sharded_steps)
from trinity.distributed.sharded_optim import gather_optimizer_state, shard_optimizer_state
from trinity.reference import Config, init_params
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.checkpoint import CheckpointCorrupt, CheckpointError, load_checkpoint
from trinity.reference.training.optim import init_optimizer_state
from trinity.simulate.virtual.virtual_comm import RankFailed, VirtualCluster

CONFIG = Config.preset("tiny")
# 4 ranks each (ep borrows its ranks from dp_shard·cp)
LAYOUTS = ["dp_shard=4", "dp_shard=4,ep=2", "dp_replicate=2,dp_shard=2", "cp=2,dp_shard=2",
           "dp_replicate=2,dp_shard=2,ep=2", "dp_shard=2,cp=2,ep=4"]
TOKENIZER = ({"kind": "bytes", "vocab_size": 256, "eos_id": 0, "sha256": "ab"}, b'{"model": {}}')


def whole_state(seed=0):
    """Whole params (float64) and a non-trivial whole optimizer, balancing and common state."""
    rng = np.random.default_rng(seed)
    params = init_params(CONFIG, seed=seed, dtype=np.float64)
    for k in params:
        if k.endswith("expert_bias"):
            params[k] = rng.standard_normal(params[k].shape).astype(np.float32)
    opt = {k: (rng.standard_normal(v.shape).astype(v.dtype) if k != "step" else np.array(7, dtype=np.int64))
           for k, v in init_optimizer_state(CONFIG, params).items()}
    balancing = {k: rng.standard_normal(v.shape).astype(v.dtype)
                 for k, v in init_balancing_state(CONFIG, params).items()}
    common = dict(balancing_state=balancing, tokens_seen=12345, data_state={"position": 17, "epoch": 1},
                  rng_state=np.random.default_rng(3).bit_generator.state, extra={"skipped_steps": 2},
                  run_id="run-a", tokenizer=TOKENIZER, data_fingerprint=[{"documents": 3}])
    return params, opt, common


PARAMS, OPT, COMMON = whole_state()


def shard(mesh, params, opt):
    sharded = ShardedParams.from_full(CONFIG, mesh, params)
    return sharded, shard_optimizer_state(CONFIG, sharded, opt)


def save_job(directory, layout, step, params, opt, common=COMMON, world=None):
    """Shard the whole state over `layout`, save it; every rank returns (path, gathered params, gathered state)."""
    layout = Layout.parse(layout)

    def rank(comm):
        mesh = Mesh(comm, layout)
        sharded, state = shard(mesh, params, opt)
        path = save_sharded(directory, step, mesh, sharded, state, common)
        return path, sharded.full(), gather_optimizer_state(CONFIG, sharded, state)
    return VirtualCluster(world or layout.world_size, timeout=30.0).run(rank)


def same(got: dict, want: dict):
    assert list(got) == list(want) or set(got) == set(want), sorted(set(got) ^ set(want))
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for layout in LAYOUTS:
        directory = tmp_path_factory.mktemp(layout.replace(",", "_").replace("=", ""))
        out[layout] = directory, save_job(directory, layout, 5, PARAMS, OPT)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_is_the_saving_jobs_whole_state(saved, layout):
    directory, results = saved[layout]
    path, full, state = results[0]
    for p, f, s in results[1:]:  # every rank gathered the same whole state
        assert p == path
        same(f, full), same(s, state)
    assert sorted(os.listdir(path)) == ["manifest.json"] + [f"rank_{r:05d}.h5" for r in range(4)]
    ck = load_sharded(path, CONFIG)
    same(ck.params, full), same(ck.optimizer_state, state)
    same(ck.params, PARAMS), same(ck.optimizer_state, OPT)
    same(ck.balancing_state, COMMON["balancing_state"])
    assert (ck.step, ck.tokens_seen, ck.run_id, ck.extra) == (5, 12345, "run-a", {"skipped_steps": 2})
    assert ck.data_state == COMMON["data_state"] and ck.rng_state == COMMON["rng_state"]
    assert (ck.tokenizer, ck.tokenizer_json, ck.data_fingerprint) == (TOKENIZER[0], TOKENIZER[1], [{"documents": 3}])
    assert ck.rng().random() == np.random.default_rng(3).random()
    manifest = read_manifest(path)
    assert (manifest["layout"], manifest["world_size"], manifest["step"]) == (str(Layout.parse(layout)), 4, 5)
    with pytest.raises(CheckpointError, match="not a trinity checkpoint"):  # a rank file is no single-file checkpoint
        load_checkpoint(os.path.join(path, "rank_00000.h5"))


def test_load_on_every_rank_of_another_layout_reshards(saved):
    path = saved["dp_shard=4,ep=2"][1][0][0]

    def rank(comm):
        mesh = Mesh(comm, Layout.parse("dp_replicate=2,dp_shard=2"))
        ck = load_sharded(path, CONFIG)
        sharded, state = shard(mesh, ck.params, ck.optimizer_state)
        return sharded.full(), gather_optimizer_state(CONFIG, sharded, state)
    for full, state in VirtualCluster(4, timeout=30.0).run(rank):
        same(full, PARAMS), same(state, OPT)


@pytest.mark.parametrize("start", ["dp_shard=4,ep=2", "cp=2,dp_shard=2"])
def test_reshard_round_trip_4_2_1_4(saved, tmp_path, start):
    path = saved[start][1][0][0]
    for i, layout in enumerate(["dp_shard=2,ep=2", "single", "dp_replicate=2,dp_shard=2", "dp_shard=4,ep=4"]):
        ck = load_sharded(path)
        results = save_job(tmp_path / str(i), layout, ck.step + 1, ck.params, ck.optimizer_state,
                           world=Layout.parse(layout).world_size)
        path = results[0][0]
        assert read_manifest(path)["world_size"] == Layout.parse(layout).world_size
    ck = load_sharded(path, CONFIG)
    same(ck.params, PARAMS), same(ck.optimizer_state, OPT)
    assert ck.step == 9


def test_reverse_1_to_4(tmp_path):
    path = save_job(tmp_path, "single", 1, PARAMS, OPT)[0][0]
    assert sorted(os.listdir(path)) == ["manifest.json", "rank_00000.h5"]
    ck = load_sharded(path)
    path = save_job(tmp_path, "dp_shard=2,cp=2,ep=2", 2, ck.params, ck.optimizer_state)[0][0]
    same(load_sharded(path).params, PARAMS), same(load_sharded(path).optimizer_state, OPT)


def test_interrupted_save_is_refused_and_ignored(tmp_path, monkeypatch):
    manager = ShardedCheckpointManager(tmp_path, keep_last=2, run_id="run-a")
    good = save_job(tmp_path, "dp_shard=4", 3, PARAMS, OPT)[0][0]
    real = sc._agree

    def dies_after_writing(mesh, payload, error=None):
        if isinstance(payload, dict) and "sha256" in payload and mesh.rank == 2:
            raise RuntimeError("killed")
        return real(mesh, payload, error)
    monkeypatch.setattr(sc, "_agree", dies_after_writing)
    with pytest.raises(RankFailed, match="rank 2 failed: RuntimeError: killed"):
        save_job(tmp_path, "dp_shard=4", 4, PARAMS, OPT)
    monkeypatch.setattr(sc, "_agree", real)
    broken = sc.sharded_path(tmp_path, 4)
    assert "rank_00000.h5" in os.listdir(broken) and "manifest.json" not in os.listdir(broken)
    with pytest.raises(CheckpointCorrupt, match="manifest.json: no readable manifest"):
        load_sharded(broken)
    assert manager.list() == [good] and manager.latest() == good
    assert sharded_steps(tmp_path, complete=False) == [(4, broken)]
    ck, skipped = manager.load_newest_valid(CONFIG)
    assert ck.step == 3 and skipped == []
    same(ck.params, PARAMS)
    # the next save removes the interrupted one; retention keeps the newest 2 of this run, files and directories
    manager.save(5, config=CONFIG, params=PARAMS, optimizer_state=OPT, **{k: v for k, v in COMMON.items()
                                                                           if k != "run_id"})
    assert not os.path.exists(broken)

    def rank(comm):
        mesh = Mesh(comm, Layout(dp_shard=2))
        sharded, state = shard(mesh, PARAMS, OPT)
        return ShardedCheckpointManager(tmp_path, keep_last=2, run_id="run-a").save_sharded(
            6, mesh, sharded, state, **{k: v for k, v in COMMON.items() if k != "run_id"})
    VirtualCluster(2, timeout=30.0).run(rank)
    assert [os.path.basename(p) for p in manager.list()] == ["step_00000005.h5", "step_00000006.sharded"]
    assert manager.load_latest().step == 6 and read_manifest(manager.latest())["run_id"] == "run-a"
    assert len(manager.remove_all()) == 2 and os.listdir(tmp_path) == []


def test_a_rank_refusing_to_save_fails_every_rank_and_writes_no_manifest(tmp_path):
    def rank(comm):
        mesh = Mesh(comm, Layout(dp_shard=4))
        sharded, state = shard(mesh, PARAMS, OPT)
        if mesh.rank == 3:
            state[next(k for k in state if k != "step")][0] = np.nan
        with pytest.raises(CheckpointError, match="rank 3: .*NaN"):
            save_sharded(tmp_path, 1, mesh, sharded, state, COMMON)
        return True
    assert VirtualCluster(4, timeout=30.0).run(rank) == [True] * 4
    assert "manifest.json" not in os.listdir(sc.sharded_path(tmp_path, 1))


@pytest.mark.parametrize("name", ["rank_00002.h5", "rank_00000.h5", "manifest.json"])
def test_a_flipped_byte_is_corrupt_naming_the_file(saved, tmp_path, name):
    source = saved["dp_shard=4,ep=2"][1][0][0]
    size = os.path.getsize(os.path.join(source, name))
    for i, at in enumerate(np.random.default_rng(1).choice(size, 6, replace=False).tolist() + [0, size - 1]):
        copy = shutil.copytree(source, tmp_path / f"{i}.sharded")
        with open(os.path.join(copy, name), "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0x10]))
        with pytest.raises(CheckpointCorrupt, match=name.replace(".", r"\.")):
            load_sharded(copy)


def test_a_missing_rank_file_or_a_rank_file_from_another_save_is_corrupt(saved, tmp_path):
    source = saved["dp_shard=4"][1][0][0]
    copy = shutil.copytree(source, tmp_path / "a.sharded")
    os.remove(os.path.join(copy, "rank_00001.h5"))
    with pytest.raises(CheckpointCorrupt, match=r"rank_00001\.h5: missing"):
        load_sharded(copy)
    copy = shutil.copytree(source, tmp_path / "b.sharded")
    other = saved["dp_replicate=2,dp_shard=2"][1][0][0]
    shutil.copy(os.path.join(other, "rank_00001.h5"), os.path.join(copy, "rank_00001.h5"))
    with pytest.raises(CheckpointCorrupt, match=r"rank_00001\.h5: its sha256 is not the manifest's"):
        load_sharded(copy)


def test_a_rank_file_is_checked_against_its_seal_too(saved, tmp_path):
    """A damaged rank file whose manifest entry was forged to its new SHA-256 still fails its seal, by dataset."""
    copy = shutil.copytree(saved["dp_shard=4"][1][0][0], tmp_path / "c.sharded")
    file = os.path.join(copy, "rank_00001.h5")
    with open(file, "r+b") as f:
        data = bytearray(f.read())
        at = len(data) // 2  # inside a shard's raw data
        data[at] ^= 0x01
        f.seek(0)
        f.write(data)
    manifest = read_manifest(copy)
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    body["ranks"][1]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    with open(os.path.join(copy, "manifest.json"), "w") as f:
        f.write(sc._manifest_text(body))
    with pytest.raises(CheckpointCorrupt, match=r"rank_00001\.h5: .*(fails its sha256|structure)"):
        load_sharded(copy)


def test_manifest_describes_the_pieces(saved):
    manifest = read_manifest(saved["dp_shard=4,ep=2"][1][0][0])
    assert manifest["replicated"]["optimizer"] == ["step"]
    assert [r["experts"] for r in manifest["ranks"]] == [[0, 4], [4, 8], [0, 4], [4, 8]]
    experts = manifest["buckets"]["1.experts"]
    assert experts["expert"] and experts["shapes"][0][0] == 4 and experts["state"] == ["muon.momentum/"]
    half = experts["padded"] // 2  # efsdp: ranks 0 and 2 hold experts 0-3, ranks 1 and 3 experts 4-7
    assert [r["shards"]["1.experts"] for r in manifest["ranks"]] == [[0, half], [0, half], [half, 2 * half],
                                                                     [half, 2 * half]]
    with pytest.raises(CheckpointError, match="another model"):
        load_sharded(saved["dp_shard=4"][1][0][0], Config.preset("bench-medium"))
    assert json.loads(open(os.path.join(saved["dp_shard=4"][1][0][0], "manifest.json")).read())["format"] == sc.FORMAT
