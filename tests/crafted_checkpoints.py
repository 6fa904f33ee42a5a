"""Helpers for tests/test_crafted_checkpoints.py: a real small checkpoint folder (a single file and a 2-rank sharded
directory of a tiny model), a sentinel folder outside it, snapshots of a folder that never follow a link, and crafted
files as an attacker would write them: HDF5 datasets stored elsewhere (external storage, virtual datasets) or laid out
otherwise (chunked, compact), sealed again with correct digests, and manifests edited and re-serialised with a correct
manifest_sha256 (the digests are checksums, not signatures: whoever writes a file can recompute them)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat

import h5py
import numpy as np

from trinity.distributed import sharded_checkpoint as sc
from trinity.distributed.fsdp import ShardedParams
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed.sharded_optim import shard_optimizer_state
from trinity.reference import Config, init_params
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.sealed_file import read_header, seal
from trinity.simulate.virtual.virtual_comm import VirtualCluster

CONFIG = Config(vocab_size=32, hidden_size=8, intermediate_size=12, moe_intermediate_size=4, num_hidden_layers=2,
                num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=4,
                num_experts_per_tok=2, num_shared_experts=1, sliding_window=8, max_position_embeddings=64)
RUN_ID = "run-a"
SINGLE_STEP, SHARDED_STEP = 2, 4
SECRET_BYTES = 1 << 16


def whole_state() -> tuple[dict, dict, dict]:
    """(params, optimizer state, common state) of the tiny model, as save_sharded and save_checkpoint take them."""
    params = init_params(CONFIG, seed=0, dtype=np.float32)
    opt = init_optimizer_state(CONFIG, params)
    common = dict(balancing_state=init_balancing_state(CONFIG, params), tokens_seen=100, data_state={"position": 3},
                  rng_state=np.random.default_rng(0).bit_generator.state, extra={"run_file": "/nonexistent/run.toml"})
    return params, opt, common


def save_sharded_job(directory, step: int, layout: str, manager_run_id=RUN_ID, keep_last=None) -> list:
    """Save `step` as a sharded checkpoint over `layout` on virtual ranks through a ShardedCheckpointManager; each
    rank returns its path, or the CheckpointError it raised (str)."""
    params, opt, common = whole_state()
    parsed = Layout.parse(layout)

    def rank(comm):
        mesh = Mesh(comm, parsed)
        sharded = ShardedParams.from_full(CONFIG, mesh, params)
        state = shard_optimizer_state(CONFIG, sharded, opt)
        manager = sc.ShardedCheckpointManager(directory, keep_last=keep_last, run_id=manager_run_id)
        try:
            return manager.save_sharded(step, mesh, sharded, state, **common)
        except sc.CheckpointError as e:
            return e
    return VirtualCluster(parsed.world_size, timeout=60.0).run(rank)


def save_single(manager, step: int):
    """manager.save of the tiny model's state at `step`."""
    params, opt, common = whole_state()
    return manager.save(step, config=CONFIG, params=params, optimizer_state=opt, **common)


# ---- snapshots ---------------------------------------------------------------------------------------------------
def snapshot(folder) -> dict:
    """{relative path: (kind, size, mtime_ns, sha256 or link target)} of everything under `folder`, links not
    followed: any change to a file, a link or a directory's entries shows."""
    out = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(here, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", 0, st.st_mtime_ns, os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    what = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
            else:
                what = ("dir", 0, st.st_mtime_ns, "")
            out[os.path.relpath(path, folder)] = what
    return out


# ---- crafted HDF5 datasets ---------------------------------------------------------------------------------------
def _read_all(path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        attrs = {k: f.attrs[k] for k in f.attrs}
        groups = {g: {n: f[g][n][()] for n in f[g]} for g in f}
    return attrs, groups


def _crafted_dataset(group, name: str, array, kind: str, outside: str) -> None:
    """Create dataset `name` holding `array`'s shape and dtype in the `kind` of storage a crafted file would use."""
    if kind == "external":  # the bytes of another local file
        group.create_dataset(name, shape=array.shape, dtype=array.dtype,
                             external=[(os.path.join(outside, "secret.bin"), 0, array.nbytes)])
    elif kind == "virtual":  # a dataset of another local file
        source = os.path.join(outside, f"source_{hashlib.sha256(name.encode()).hexdigest()[:12]}.h5")
        with h5py.File(source, "w") as s:
            s.create_dataset("x", data=np.ones_like(array))
        layout = h5py.VirtualLayout(shape=array.shape, dtype=array.dtype)
        layout[...] = h5py.VirtualSource(source, "x", shape=array.shape)
        group.create_virtual_dataset(name, layout)
    elif kind == "chunked":
        group.create_dataset(name, data=array, chunks=array.shape)
    elif kind == "compact":
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        ds = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(array.dtype),
                             h5py.h5s.create_simple(array.shape), dcpl=dcpl)
        ds.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(array))
    elif kind == "unsealed_range":  # its own bytes, in place, but sealed as an empty range
        group.create_dataset(name, data=array)
    else:
        raise ValueError(kind)


def craft_dataset(path, target: str, kind: str, outside: str) -> None:
    """Rewrite the sealed HDF5 file `path` with dataset `target` ("group/name") stored as `kind`, every other dataset
    and attribute as it was, and seal it again with correct digests (sealing as tests/test_checkpoint.reseal does:
    a dataset's range is its reported offset and storage size, (0, 0) without an offset)."""
    header = read_header(path)
    attrs, groups = _read_all(path)
    memory, ranges = io.BytesIO(), {}
    with h5py.File(memory, "w", userblock_size=header["size"], track_order=True) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for group, arrays in groups.items():
            g = f.create_group(group, track_order=True)
            for name, array in arrays.items():
                if f"{group}/{name}" == target:
                    _crafted_dataset(g, name, np.asarray(array), kind, outside)
                else:
                    g.create_dataset(name, data=array)
        for group in f:
            for name in f[group]:
                ds = f[group][name]
                offset = ds.id.get_offset()
                ranges[f"{group}/{name}"] = (offset or 0, ds.id.get_storage_size() if offset is not None else 0)
                if kind == "unsealed_range" and f"{group}/{name}" == target:
                    ranges[f"{group}/{name}"] = (0, 0)
    image = bytearray(memory.getvalue())
    seal(image, header["size"], ranges, header["meta"])
    with open(path, "wb") as out:
        out.write(image)


def craftable_datasets(path) -> list[str]:
    """The non-empty, at least 1-d datasets of a file (those every kind of craft_dataset can stand in for)."""
    with h5py.File(path, "r") as f:
        return sorted(f"{g}/{n}" for g in f for n in f[g] if f[g][n].ndim >= 1 and f[g][n].size > 0)


# ---- crafted manifests -------------------------------------------------------------------------------------------
def rewrite_manifest(directory, edit) -> None:
    """Apply `edit(body)` to a sharded checkpoint's manifest (without its manifest_sha256) and write it back with a
    correct checksum; rank files' sha256 entries are refreshed from the files first."""
    where = os.path.join(directory, sc.MANIFEST)
    with open(where, "rb") as f:
        body = json.loads(f.read())
    body.pop("manifest_sha256")
    for described in body["ranks"]:
        with open(os.path.join(directory, described["file"]), "rb") as f:
            described["sha256"] = hashlib.sha256(f.read()).hexdigest()
    edit(body)
    with open(where, "w") as f:
        f.write(sc._manifest_text(body))
