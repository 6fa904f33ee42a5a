"""Sharded checkpoints: one sealed HDF5 file per rank plus a manifest written last (docs/architecture.md, "State is
explicit and resumable"; the single-file format is reference/training/checkpoint.py).

Directory layout (sharded format_version 1), beside the single files `step_{N:08d}.h5` of CheckpointManager:

    step_{N:08d}.sharded/rank_{r:05d}.h5   one per rank, sealed (sealed_file.py) and written atomically (atomic_path)
    step_{N:08d}.sharded/manifest.json     written LAST, atomically, by rank 0 once every rank's file is in place: a
                                           directory without it is an interrupted save, never a checkpoint

Rank file r (dataset names escaped as in checkpoint.py):
    /params/<shard key>    this rank's shard of each flat bucket ("shard:3.muon": elements [lo, hi) of the bucket's
                           padded vector, fsdp.FlatBucket)
    /optimizer/<key>       this rank's optimizer-state shards ("muon.momentum/shard:3.muon", ...)
    rank 0 only: the replicated state, the same on every rank, written once:
    /params/<key>          expert_bias (ShardedParams.replicated);  /optimizer/<key>  the state that is no shard: "step"
    /balancing/<key>       the balancing state;  /assets/tokenizer.json  as in checkpoint.py
    attributes             sharded_format_version, rank, step; rank 0 also tokens_seen and checkpoint.py's JSON
                           attributes data_state, rng_state, extra, run_id, tokenizer, data_fingerprint
  The seal's meta is {run_id, sharded_format_version, rank, step}. A rank file has no format_version attribute, so
  load_checkpoint refuses it ("not a trinity checkpoint").

manifest.json: canonical JSON (sorted keys, indent 1, ASCII, a final newline) whose `manifest_sha256` is the SHA-256
of the compact sorted JSON of all its other fields:
    format "trinity-sharded-checkpoint", format_version, step, run_id, layout (str), world_size, num_experts,
    config (Config.to_dict()),
    buckets   {name: {optimizer, group, expert (routed experts: true), keys, shapes (local: [E/ep, ...] for
               experts), offsets, size, padded, state (the optimizer-state prefixes stored for it)}}
    ranks     [{file, sha256 (of the whole file), ep_rank, experts [lo, hi), shards {bucket: [lo, hi)}}]
    replicated {group: [keys rank 0 holds beyond its shards]}
That is all a reader needs, without the saving layout's code: a bucket's vector (one per expert range for an expert
bucket) is its pieces joined, tiling [0, padded); key k is vector[offset:offset + prod(shape)].reshape(shape), placed
at experts [lo, hi) of the whole [E, ...] array for an expert bucket.

A whole load (load_sharded: inspect, generate, export) verifies everything before using it: the manifest must
re-serialise to its exact bytes (so any flipped byte is found); each listed rank file must be a regular file (no
symlink is followed, checkpoint_files.py), hash to the manifest's SHA-256, pass its seal and hold exactly its sealed
datasets, each stored in the file at its sealed range; the manifest's fields must agree with each other, the stored
config, the directory name and every rank file's sealed rank, step and run (checkpoint_manifest.py); the pieces must
tile every vector and the experts. Each failure is a CheckpointCorrupt naming the file (docs/distributed.md, "What a
checkpoint is trusted with").

A resume reads by spans (load_spans, checkpoint_spans.py): each rank reads the manifest, intersects each saved shard
with the spans of its own layout, and reads only those elements from the rank files that hold them (and rank 0's
replicated state), verifying the seal's header, the file's structure and each block it reads, but not the rank
files' whole-file SHA-256 (only a whole read can). Ranks write into one directory: on several hosts, a shared file
system.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil

import h5py
import numpy as np

from trinity.reference.files import atomic_path, fsync_dir
from trinity.reference.model.config import Config
from trinity.reference.model.params import check_params, param_shapes
from trinity.reference.training import checkpoint as _ck
from trinity.reference.training.checkpoint import (Checkpoint, CheckpointCorrupt, CheckpointError, CheckpointManager,
                                                   CheckpointWriteError, load_checkpoint, read_run_id,
                                                   refuse_foreign_entry, restore_rng, save_checkpoint,
                                                   write_sealed_hdf5)
from trinity.reference.training.checkpoint_files import is_plain_dir, is_plain_file, listed, open_plain

from .checkpoint_spans import (CheckpointSpans, WholeFileOnly, read_sharded_spans, read_single_spans,
                               spans_of_checkpoint, state_wanted)
from .checkpoint_manifest import (FORMAT, FORMAT_VERSION, MANIFEST, STEP_DIR, check_bucket_shapes, check_rank_seal,
                                  manifest_config, manifest_text, read_manifest, rank_file, tile)
from .fsdp import SHARD_PREFIX, expert_slice
from .layout import Layout
from .mesh import allgather_json

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "save_sharded", "load_sharded", "read_manifest", "sharded_path",
           "sharded_steps", "ShardedCheckpointManager", "load_spans", "read_spans", "state_wanted", "CheckpointSpans"]

_OURS = re.compile(r"^(?:rank_(\d+)\.h5|manifest\.json)(\.tmp-\d+)?$")
_REQUIRED = {"balancing_state", "tokens_seen", "data_state", "rng_state"}
_COMMON = _REQUIRED | {"extra", "run_id", "tokenizer", "data_fingerprint"}
_manifest_text = manifest_text  # (tests re-serialise crafted manifests with it)


def sharded_path(directory, step: int) -> str:
    return os.path.join(os.fspath(directory), f"step_{_ck._check_int('step', step):08d}.sharded")


# ---- saving (collective) -----------------------------------------------------------------------------------------
def _agree(mesh, payload, error=None) -> list:
    """Every rank's JSON payload (mesh.allgather_json over the world); if any rank had an error, the lowest such
    rank's is raised on every rank, so the ranks stay in step (none waits in a collective the others skipped)."""
    everyone = allgather_json(mesh.comm, {"error": error and [type(error).__name__, str(error)], "payload": payload},
                              lambda kind, send, recv: mesh.collective(kind, "world", send, recv))
    for r, got in enumerate(everyone):
        if got["error"]:
            kind = CheckpointWriteError if got["error"][0] == "CheckpointWriteError" else CheckpointError
            raise kind(f"rank {r}: {got['error'][1]}")
    return [got["payload"] for got in everyone]


def _attempt(fn, *args):
    """(fn's result, None) or (None, the CheckpointError it raised)."""
    try:
        return fn(*args), None
    except CheckpointError as e:
        return None, e


def _prepare(path: str, world_size: int, run_id) -> None:
    """Make the directory; remove its manifest (a save over one of this step is incomplete until done), temporary
    files and rank files beyond the world size."""
    if run_id is not None and not isinstance(run_id, str):
        raise CheckpointError(f"run_id must be a string or None, got {type(run_id).__name__}")
    refuse_foreign_entry(path, directory=True)  # never write through a symlink to another folder
    try:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            m = _OURS.match(name)
            if m and (m.group(1) is None or m.group(2) or int(m.group(1)) >= world_size):
                os.remove(os.path.join(path, name))
        fsync_dir(path)
    except OSError as e:
        raise CheckpointWriteError(f"{path}: cannot prepare the checkpoint directory ({e.strerror or e})") from None


def _split(key: str) -> tuple[str, str]:
    """(prefix, shard name) of an optimizer-state key ("muon.momentum/shard:3.muon"), or (key, "")."""
    at = key.find(SHARD_PREFIX)
    return (key[:at], key[at:]) if at >= 0 else (key, "")


def _write_rank(path, step, mesh, params, state, common, run_id) -> dict:
    """Write this rank's file; return its description for the manifest."""
    rank, names = mesh.rank, {b.shard_name for b in params.buckets}
    if set(common) - _COMMON or (rank == 0 and _REQUIRED - set(common)):
        raise CheckpointError(f"common state: unknown {sorted(set(common) - _COMMON)}, missing "
                              f"{sorted(_REQUIRED - set(common)) if rank == 0 else []}")
    sharded = {k: v for k, v in state.items() if _split(k)[1] in names}
    groups = {"params": dict(params.shards), "optimizer": sharded}
    attrs = {"sharded_format_version": FORMAT_VERSION, "rank": rank, "step": _ck._check_int("step", step)}
    replicated = {}
    if rank == 0:
        rng = common["rng_state"]
        rng = rng.bit_generator.state if isinstance(rng, np.random.Generator) else rng
        if rng is not None:
            restore_rng(rng)
        if not isinstance(common["data_state"], dict):
            raise CheckpointError(f"data_state must be a dict, got {type(common['data_state']).__name__}")
        info, tokenizer_json = common.get("tokenizer") or (None, None)
        attrs["tokens_seen"] = _ck._check_int("tokens_seen", common["tokens_seen"])
        for name, value in [("data_state", common["data_state"]), ("rng_state", rng), ("run_id", run_id),
                            ("extra", dict(common.get("extra") or {})), ("tokenizer", info),
                            ("data_fingerprint", common.get("data_fingerprint"))]:
            attrs[name] = _ck._dumps(name, value)
        replicated = {"params": dict(params.replicated), "optimizer": {k: v for k, v in state.items()
                                                                       if k not in sharded},
                      "balancing": common["balancing_state"],
                      "assets": {} if tokenizer_json is None else
                      {"tokenizer.json": np.frombuffer(bytes(tokenizer_json), dtype=np.uint8)}}
        groups = {g: {**groups.get(g, {}), **arrays} for g, arrays in replicated.items()}
    flat = {g: _ck._flat_arrays(g, arrays, require_finite=g != "assets") for g, arrays in groups.items()}
    meta = {"run_id": run_id, "sharded_format_version": FORMAT_VERSION, "rank": rank, "step": attrs["step"]}
    sha = write_sealed_hdf5(os.path.join(path, rank_file(rank)), attrs, flat, meta)
    experts = expert_slice(mesh, params.config.num_experts)
    buckets = {b.name: {"optimizer": b.optimizer, "group": b.group, "expert": b.group == "efsdp", "keys": b.keys,
                        "shapes": [list(s) for s in b.shapes], "offsets": [int(o) for o in b.offsets],
                        "size": int(b.size), "padded": b.padded,
                        "state": sorted(p for p, s in map(_split, sharded) if s == b.shard_name)}
               for b in params.buckets}
    return {"file": rank_file(rank), "sha256": sha, "ep_rank": mesh.ep_rank, "experts": [experts.start, experts.stop],
            "shards": {b.name: list(b.span()) for b in params.buckets}, "buckets": buckets,
            "replicated": {g: list(arrays) for g, arrays in replicated.items()}}


def _write_manifest(path, step, run_id, mesh, config, ranks) -> None:
    buckets = {}
    for r, described in enumerate(ranks):
        for name, b in described.pop("buckets").items():
            if buckets.setdefault(name, b) != b:
                raise CheckpointError(f"rank {r} describes bucket {name} unlike a lower rank")
    replicated = [d.pop("replicated") for d in ranks][0]
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "run_id": run_id,
            "layout": str(mesh.layout), "world_size": len(ranks), "num_experts": config.num_experts,
            "config": config.to_dict(), "buckets": buckets, "ranks": ranks, "replicated": replicated}
    try:
        with atomic_path(os.path.join(path, MANIFEST)) as tmp:
            _ck._write_bytes(tmp, manifest_text(body).encode("ascii"))
    except OSError as e:
        raise CheckpointWriteError(f"{path}: cannot write {MANIFEST} ({e.strerror or e})") from None


def save_sharded(directory, step: int, mesh, params, optimizer_state: dict, common: dict) -> str:
    """Write `directory/step_{step:08d}.sharded` (module docstring) and return its path. Collective: every rank calls
    it with its ShardedParams and sharded optimizer state. `common`: balancing_state, tokens_seen, data_state,
    rng_state (required on rank 0), extra, run_id, tokenizer ((info, tokenizer.json bytes)), data_fingerprint, as
    save_checkpoint takes them; only rank 0's is written (rank 0's run_id seals every file). A CheckpointError on any
    rank (NaN in a shard, a full disk) is raised on every rank as CheckpointError/CheckpointWriteError "rank r: ..."
    and leaves no manifest; so does a rank that dies (its peers fail in the next collective)."""
    path, n = sharded_path(directory, step), mesh.group_size["world"]
    run_id = common.get("run_id") if mesh.rank == 0 else None
    _, error = _attempt(_prepare, path, n, run_id) if mesh.rank == 0 else (None, None)
    run_id = _agree(mesh, None if error else run_id, error)[0]
    described, error = _attempt(_write_rank, path, step, mesh, params, optimizer_state, common, run_id)
    ranks = _agree(mesh, described, error)
    _, error = _attempt(_write_manifest, path, step, run_id, mesh, params.config, ranks) if mesh.rank == 0 \
        else (None, None)
    _agree(mesh, None, error)
    return path


def _read_rank(path: str, rank: int, described: dict, manifest: dict) -> dict:
    file = os.path.join(path, rank_file(rank))
    if described["file"] != rank_file(rank) or not is_plain_file(file):  # a symlink is never followed
        raise CheckpointCorrupt(f"{file}: missing or not a regular file (the manifest lists {described['file']!r} "
                                f"for rank {rank})")
    try:
        with open_plain(file) as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise CheckpointCorrupt(f"{file}: cannot read ({e.strerror or e})") from None
    if digest != described["sha256"]:
        raise CheckpointCorrupt(f"{file}: its sha256 is not the manifest's: the file is corrupt or from another save")
    header = _ck._verified_header(file)  # CheckpointCorrupt naming the file and the damaged dataset
    check_rank_seal(file, rank, manifest, header)
    sealed = header["ranges"]
    try:
        with h5py.File(file, "r") as f:
            _ck._check_datasets(f, file, sealed)
            for field in ("rank", "step"):
                if _ck._read_int(f, field, file) != (rank if field == "rank" else manifest["step"]):
                    raise CheckpointCorrupt(f"{file}: attribute {field} is not the manifest's: the checkpoint is "
                                            f"corrupt")
            out = {"path": file, "groups": {g: _ck._read_group(f, g, file, sealed) for g in f}}
            if rank == 0:
                out["tokens_seen"] = _ck._read_int(f, "tokens_seen", file)
                out.update({k: _ck._read_json(f, k, file) for k in ("data_state", "rng_state", "extra",
                                                                     "tokenizer", "data_fingerprint")})
                _ck.check_fields(file, out)
    except CheckpointError:
        raise
    except Exception as e:  # h5py on a damaged file
        raise CheckpointCorrupt(f"{file}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    return out


def _piece(files, rank, group, key):
    found = files[rank]["groups"].get(group, {}).get(key)
    if found is None:
        raise CheckpointCorrupt(f"{files[rank]['path']}: no {group}/{key}")
    return found


def _assemble(manifest: dict, files: list, where: str, shapes: dict) -> tuple[dict, dict]:
    """Whole params and optimizer state from the rank files' pieces (module docstring); `shapes`: the stored
    config's param_shapes."""
    E, ranks, params, state = manifest["num_experts"], manifest["ranks"], {}, {}
    ep = Layout.parse(manifest["layout"]).ep
    for name, b in manifest["buckets"].items():
        check_bucket_shapes(name, b, shapes, E, ep, where)
        holders = [(r, tuple(d["shards"][name]), tuple(d["experts"])) for r, d in enumerate(ranks)
                   if name in d["shards"]]
        ranges = tile({e for *_, e in holders}, E, f"{where}: experts of {name}") if b["expert"] else [None]
        for experts in ranges:
            for prefix, group, out in [("", "params", params)] + [(p, "optimizer", state) for p in b["state"]]:
                key, pieces = prefix + SHARD_PREFIX + name, {}
                for r, span, e in holders:
                    if experts is None or e == experts:
                        pieces.setdefault(span, r)  # a replica's copy: the lowest rank's
                spans = tile(pieces, b["padded"], f"{where}: {group}/{key}")
                parts = [_piece(files, pieces[s], group, key) for s in spans]
                if any(p.shape != (hi - lo,) or p.dtype != parts[0].dtype for p, (lo, hi) in zip(parts, spans)):
                    raise CheckpointCorrupt(f"{where}: the pieces of {group}/{key} do not match their spans")
                flat = np.concatenate(parts)
                for k, shape, off in zip(b["keys"], b["shapes"], b["offsets"]):
                    part = flat[off:off + int(np.prod(shape))].reshape(shape)
                    if experts is None:
                        out[prefix + k] = part
                    else:
                        whole = out.setdefault(prefix + k, np.empty([E] + shape[1:], dtype=part.dtype))
                        whole[experts[0]:experts[1]] = part
    for group, out in (("params", params), ("optimizer", state)):
        out.update({k: _piece(files, 0, group, k) for k in manifest["replicated"].get(group, [])})
    return params, state


def load_sharded(path, config: Config | None = None) -> Checkpoint:
    """A sharded checkpoint as a Checkpoint of whole arrays keyed as in one process (the fields load_checkpoint
    fills; `path` is the directory). `config` as in load_checkpoint: the stored model must be the same."""
    path = os.fspath(path)
    manifest = read_manifest(path)
    where = os.path.join(path, MANIFEST)
    stored = manifest_config(manifest, path, config)
    try:
        files = [_read_rank(path, r, d, manifest) for r, d in enumerate(manifest["ranks"])]
        params, state = _assemble(manifest, files, where, param_shapes(stored))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointCorrupt(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
    order = param_shapes(stored)
    params = {**{k: params[k] for k in order if k in params}, **{k: v for k, v in params.items() if k not in order}}
    try:
        check_params(stored, params)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: params do not match the stored config: {e.args[0] if e.args else e}") from None
    r0 = files[0]
    tokenizer_json = r0["groups"].get("assets", {}).get("tokenizer.json")
    return Checkpoint(config=stored, params=params, optimizer_state=state,
                      balancing_state=r0["groups"].get("balancing", {}), step=manifest["step"],
                      tokens_seen=r0["tokens_seen"], data_state=r0["data_state"], rng_state=r0["rng_state"],
                      extra=r0["extra"], run_id=manifest["run_id"], tokenizer=r0["tokenizer"],
                      tokenizer_json=None if tokenizer_json is None else tokenizer_json.tobytes(),
                      data_fingerprint=r0["data_fingerprint"], path=path)


def read_spans(path, config: Config | None, wanted: dict, state: dict) -> CheckpointSpans:
    """The ranges `wanted` {key: [(lo, hi)]} of the params and `state` {prefix + key: [(lo, hi)]} of the optimizer
    state (whole-array flat coordinates) from the checkpoint at `path`, a sharded directory or a single file, with
    the replicated state whole (checkpoint_spans.py: what is read and verified). A checkpoint whose files were sealed
    before block digests is read and verified whole (load_sharded, load_checkpoint), then cut."""
    path = os.fspath(path)
    directory = os.path.isdir(path)
    try:
        return (read_sharded_spans if directory else read_single_spans)(path, config, wanted, state)
    except WholeFileOnly:
        ck = load_sharded(path, config) if directory else load_checkpoint(path, config)
        files = [os.path.join(path, name) for name in os.listdir(path)] if directory else [path]
        return spans_of_checkpoint(ck, wanted, state, sum(os.path.getsize(p) for p in files if is_plain_file(p)))


def load_spans(path, config: Config | None, plan, rank: int) -> CheckpointSpans:
    """Rank `rank`'s part of the checkpoint at `path` under `plan` (a ParallelPlan of the model): params
    {key: [1-D array per span of plan.wanted(rank)]} (every expert_bias whole, one span), optimizer_state
    {prefix + key: [1-D array per span]} for the prefixes of each key's bucket optimizer (checkpoint_spans.
    state_wanted) plus "step", and the rest whole (CheckpointSpans), whatever layout saved it. `config` as in
    load_checkpoint. CheckpointCorrupt for damage in what this rank reads (a resume skips to an older checkpoint)."""
    return read_spans(path, config, plan.wanted(rank), state_wanted(plan, rank))


# ---- a directory of checkpoints ----------------------------------------------------------------------------------
def sharded_steps(directory, complete: bool = True) -> list[tuple[int, str]]:
    """(step, path) of the sharded checkpoint directories holding a manifest (complete=False: those without one,
    interrupted saves), oldest step first. Only real directories count, and only a regular manifest.json: a
    symlink (to another folder or file) is never followed, listed or removed."""
    directory, found = os.fspath(directory), []
    for name in listed(directory):
        m, p = STEP_DIR.match(name), os.path.join(directory, name)
        if m and is_plain_dir(p) and is_plain_file(os.path.join(p, MANIFEST)) == complete:
            found.append((int(m.group(1)), p))
    return sorted(found)


class ShardedCheckpointManager(CheckpointManager):
    """CheckpointManager over both kinds: `step_N.h5` files and complete `step_N.sharded` directories are
    checkpoints of step N (list, latest, load_latest, load_newest_valid, remove_all, retention); a `.sharded`
    directory without a manifest is ignored, and removed by the next save (one writer per directory)."""

    def _steps(self):
        return sorted(super()._steps() + sharded_steps(self.directory))

    @staticmethod
    def load(path, config: Config | None = None) -> Checkpoint:
        return load_sharded(path, config) if os.path.isdir(path) else load_checkpoint(path, config)

    def load_latest(self, config: Config | None = None):
        path = self.latest()
        return None if path is None else self.load(path, config)

    def load_newest_valid(self, config: Config | None = None):
        skipped = []
        for path in reversed(self.list()):
            try:
                return self.load(path, config), skipped
            except CheckpointCorrupt as e:
                skipped.append((path, str(e)))
        return None, skipped

    def resume_candidates(self) -> list[str]:
        """The checkpoints a resume tries, newest first: the order load_newest_valid(_spans) tries them in, the same
        on every rank that lists the same folder."""
        return list(reversed(self.list()))

    @staticmethod
    def load_spans(path, config: Config | None, plan, rank: int) -> CheckpointSpans:
        """load_spans of one checkpoint (a candidate)."""
        return load_spans(path, config, plan, rank)

    def load_newest_valid_spans(self, config: Config | None, plan, rank: int):
        """(rank `rank`'s part of the newest checkpoint whose parts it reads verify, [(path, why)] of each newer one
        skipped as corrupt), as load_newest_valid. A rank verifies only what it reads, so ranks can choose
        different checkpoints (a damaged block that only some ranks read): the job must agree (for example, each
        rank loads resume_candidates()[i] with load_spans, the ranks allgather whether it verified, and all move
        to i + 1 unless every rank's did)."""
        skipped = []
        for path in self.resume_candidates():
            try:
                return load_spans(path, config, plan, rank), skipped
            except CheckpointCorrupt as e:
                skipped.append((path, str(e)))
        return None, skipped

    @staticmethod
    def _remove(path) -> None:
        """Remove a listed checkpoint: a real directory with what it holds (rmtree removes a symlink inside it, not
        its target), or a regular file; anything else is left alone."""
        with contextlib.suppress(FileNotFoundError):
            if is_plain_dir(path):
                shutil.rmtree(path)
            elif is_plain_file(path):
                os.remove(path)

    @staticmethod
    def _run_id(path):
        if not os.path.isdir(path):
            return read_run_id(path)
        with contextlib.suppress(CheckpointError):
            return read_manifest(path)["run_id"]
        return None

    def remove_all(self) -> list[str]:
        removed = self.list()
        for path in removed + [p for _, p in sharded_steps(self.directory, complete=False)]:
            self._remove(path)
        fsync_dir(self.directory)
        return removed

    def _retain(self, path: str, run_id) -> None:
        """Remove interrupted sharded saves, and this run's oldest checkpoints beyond keep_last (never `path`)."""
        same = os.path.abspath(path)
        for _, p in sharded_steps(self.directory, complete=False):
            if os.path.abspath(p) != same:
                self._remove(p)
        if self.keep_last is not None:
            ours = [p for _, p in self._steps() if os.path.abspath(p) != same and self._run_id(p) == run_id]
            for old in ours[: max(0, len(ours) - (self.keep_last - 1))]:
                self._remove(old)
        fsync_dir(self.directory)

    def save(self, step: int, **state) -> str:
        """The single-file save (the state keywords of save_checkpoint), with this manager's retention."""
        self.clean_tmp()
        state.setdefault("run_id", self.run_id)
        refuse_foreign_entry(self.path_for(step), directory=False)
        path = save_checkpoint(self.path_for(step), step=step, **state)
        self._retain(path, state["run_id"])
        return path

    def save_sharded(self, step: int, mesh, params, optimizer_state: dict, **common) -> str:
        """Collective: save_sharded into this directory (run_id defaults to the manager's), then retention on
        rank 0. Returns the checkpoint's path on every rank."""
        if mesh.rank == 0:
            self.clean_tmp()
        common.setdefault("run_id", self.run_id)
        path = save_sharded(self.directory, step, mesh, params, optimizer_state, common)
        if mesh.rank == 0:
            self._retain(path, read_manifest(path)["run_id"])
        return path
