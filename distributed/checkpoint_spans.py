"""A rank's part of a checkpoint: the elements of its spans, read from the saved files with each block it reads
verified, whatever layout saved them (a sharded directory of any layout, or a single file).

What is wanted (the plan's rule, plan.py): `wanted` = {key: [(lo, hi)]}, flat ranges of each parameter's whole
(single-process) array in C order, and `state` = {prefix + key: [(lo, hi)]} for the optimizer state of those keys
(`state_wanted`: the prefixes of the key's bucket optimizer, sharded_optim.STATE_PREFIXES). The answer is
{key: [1-D array per range, in order]} for each, plus the replicated state read whole: the optimizer's "step", the
balancing state, the tokenizer and the scalar and JSON fields of a Checkpoint.

Where the elements are:
- a single file (checkpoint.py): /params/<key> and /optimizer/<prefix><key> hold whole arrays; range [lo, hi) of a
  key is the bytes [lo·itemsize, hi·itemsize) of its dataset (stored contiguously: checkpoint_files.check_storage).
- a sharded directory (sharded_checkpoint.py): saved rank r holds [s_lo, s_hi) of each bucket's padded vector
  (manifest: ranks[r].shards[bucket]); key k lies at vector[o, o + n_k) (o: its offset, n_k: its local size); for a
  routed-expert bucket there is one vector per expert range [e0, e1) of the saving layout, and the key's local array
  is experts [e0, e1) of the whole one, so vector position p holds whole element e0·(n_k/(e1−e0)) + p − o. A range
  is cut where the saved shards are cut; each piece is read from the lowest saved rank holding it, the pieces of one
  file's dataset merged into one read. expert_bias, "step", balancing and assets are rank 0's.

What is verified (docs/distributed.md, "What a checkpoint is trusted with"), before anything read is used: the
manifest whole (its exact bytes, its fields against each other, the stored config, the directory name) and, of each
file a rank opens, the seal's header (self-checked), the sealed rank, step and run against the manifest, every byte
outside the datasets (HDF5's metadata and attributes, sealed_file.PartialReader.image: h5py parses only those
verified bytes), the datasets against the seal (the names, each stored in the file at its sealed range) and every
block of every dataset the rank reads. A block it does not read is not verified: a damaged one is found by the rank
that reads it, or by a whole load (load_sharded, load_checkpoint: every byte, and each rank file's SHA-256 in the
manifest, which only a whole read can check). A rank opens rank 0's file (the replicated state) and those whose
shards overlap its spans, nothing else. Files sealed before block digests (`WholeFileOnly`) are read whole by the
caller (sharded_checkpoint.read_spans).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
from dataclasses import dataclass

import h5py
import numpy as np

from trinity.reference.model.config import Config
from trinity.reference.model.params import check_params, is_expert_bias, param_shapes
from trinity.reference.training import checkpoint as _ck
from trinity.reference.training.checkpoint import Checkpoint, CheckpointCorrupt, CheckpointError
from trinity.reference.training.checkpoint_files import is_plain_file, open_plain
from trinity.reference.training.sealed_file import MAGIC, PartialReader, SealError

from .checkpoint_manifest import (MANIFEST, check_bucket_shapes, check_rank_seal, manifest_config,
                                  read_manifest_sized, rank_file, tile)
from .layout import Layout
from .plan import SHARD_PREFIX
from .sharded_optim import STATE_PREFIXES

__all__ = ["CheckpointSpans", "WholeFileOnly", "state_wanted", "read_single_spans", "read_sharded_spans",
           "spans_of_checkpoint"]


class WholeFileOnly(Exception):
    """A file sealed before block digests (or not sealed: format_version 1): only a whole read can verify it."""


class RangeError(ValueError):
    """A wanted range that is not a non-empty part of its key (a caller's mistake, not the checkpoint's)."""


@dataclass
class CheckpointSpans(Checkpoint):
    """A checkpoint as one rank reads it: `params` {key: [1-D array per wanted range]}, `optimizer_state`
    {prefix + key: [1-D array per range]} and "step" (a 0-d array), the rest as in Checkpoint (whole), and
    `bytes_read`: the bytes read from the checkpoint's files (manifest, seal headers, structures, blocks)."""
    bytes_read: int = 0


def state_wanted(plan, rank: int) -> dict:
    """{prefix + key: [(lo, hi)]}: the optimizer state `rank` holds under `plan` (each bucket's optimizer's
    prefixes, the bucket's spans), in the order of plan.spans(rank)."""
    out: dict = {}
    for b in plan.buckets(rank):
        for prefix in STATE_PREFIXES[b.optimizer]:
            for s in b.spans():
                out.setdefault(prefix + s.key, []).append((s.lo, s.hi))
    return out


def _split_state_key(key: str) -> tuple[str, str]:
    """(prefix, param key) of "muon.momentum/model.norm.weight"."""
    at = key.find("/")
    return (key[:at + 1], key[at + 1:]) if at >= 0 else ("", key)


def _check_wanted(path: str, stored: Config, wanted: dict, state: dict) -> None:
    """Every wanted key is a parameter of the stored model (CheckpointError) and every range a non-empty part of it
    (RangeError: a caller's mistake)."""
    shapes = param_shapes(stored)
    for key, spans in [*wanted.items(), *state.items()]:
        prefix, param = _split_state_key(key) if key in state else ("", key)
        if param not in shapes or (key in state and prefix not in (p for ps in STATE_PREFIXES.values() for p in ps)):
            raise CheckpointError(f"{path}: the checkpoint's model has no {'state' if prefix else 'parameter'} "
                                  f"{key!r}")
        size = math.prod(shapes[param])
        for lo, hi in spans:
            if not 0 <= lo < hi <= size:
                raise RangeError(f"{key}: range [{lo}, {hi}) is not a non-empty part of its {size} elements")


def _check_dtypes(path: str, stored: Config, dtypes: dict, shapes: dict | None = None) -> None:
    """check_params on stand-ins (zero-stride arrays) of the keys' `shapes` (default the stored config's) and their
    `dtypes` read (a key not read takes the model's dtype): missing or extra keys, shapes, and one float dtype."""
    shapes = param_shapes(stored) if shapes is None else shapes
    model = next((d for k, d in dtypes.items() if not is_expert_bias(k)), np.dtype(np.float32))
    stand_ins = {k: np.lib.stride_tricks.as_strided(np.zeros(1, dtypes.get(k, model)), shape=s, strides=(0,) * len(s))
                 for k, s in shapes.items()}
    try:
        check_params(stored, stand_ins)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: params do not match the stored config: {e.args[0] if e.args else e}") \
            from None


class _SealedFile:
    """One sealed HDF5 file opened for partial reads: the header and the structure verified on opening (h5py parses
    the verified image, never the file), then `array` reads elements through verified blocks."""

    def __init__(self, path: str, stack: contextlib.ExitStack):
        self.path = path
        try:
            f = stack.enter_context(open_plain(path))  # a symlink is not followed
            if f.read(len(MAGIC)) != MAGIC:
                raise WholeFileOnly(path)
            self.reader = PartialReader(f)
            if not self.reader.has_blocks:
                raise WholeFileOnly(path)
            image = self.reader.image()
        except SealError as e:
            raise CheckpointCorrupt(f"{path}: {_ck._unescape(str(e))}: the file is corrupt") from None
        except OSError as e:
            raise CheckpointCorrupt(f"{path}: cannot read ({e.strerror or e})") from None
        self.sealed = dict(self.reader.ranges)
        self.h5 = stack.enter_context(h5py.File(image, "r"))
        _ck._check_datasets(self.h5, path, self.sealed)
        self._members: dict = {}

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def names(self, group: str) -> list:
        """The keys (unescaped) of `group`."""
        if group not in self._members:
            self._members[group] = {_ck._unescape(n): n for n in _ck.checked_group(self.h5, group, self.path)}
        return list(self._members[group])

    def dataset(self, group: str, key: str, shape=None):
        """The checked dataset of `key` (CheckpointCorrupt when missing, or not of `shape` when given)."""
        if key not in self.names(group):
            raise CheckpointCorrupt(f"{self.path}: no {group}/{key}: the checkpoint is corrupt")
        ds = _ck.checked_dataset(self.h5, group, self._members[group][key], self.path, self.sealed)
        if shape is not None and tuple(ds.shape) != tuple(shape):
            raise CheckpointCorrupt(f"{self.path}: {group}/{key} has shape {ds.shape}, not {tuple(shape)}: the "
                                    f"checkpoint is corrupt")
        return ds

    def array(self, group: str, key: str, lo: int | None = None, hi: int | None = None, shape=None) -> np.ndarray:
        """Elements [lo, hi) of the flattened dataset (default all of it, in its shape), each block read verified."""
        ds = self.dataset(group, key, shape)
        whole = lo is None
        lo, hi = (0, ds.size) if whole else (lo, hi)
        try:
            raw = self.reader.read(f"{group}/{self._members[group][key]}", lo * ds.dtype.itemsize,
                                   hi * ds.dtype.itemsize)
        except SealError as e:
            raise CheckpointCorrupt(f"{self.path}: {_ck._unescape(str(e))}: the file is corrupt") from None
        out = np.frombuffer(raw, dtype=ds.dtype)
        return out.reshape(ds.shape) if whole else out


def _guarded(path: str, read):
    """read(), with an h5py failure on a verified structure reported as CheckpointCorrupt naming `path`."""
    try:
        return read()
    except (CheckpointError, WholeFileOnly, RangeError):
        raise
    except Exception as e:  # h5py on a damaged structure: OSError, KeyError, TypeError, RuntimeError, ...
        raise CheckpointCorrupt(f"{path}: cannot read checkpoint (corrupt file?): "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ---- a single file -----------------------------------------------------------------------------------------------
def read_single_spans(path, config: Config | None, wanted: dict, state: dict) -> CheckpointSpans:
    """The `wanted` and `state` ranges of the single-file checkpoint `path` (module docstring); `config` as in
    load_checkpoint. WholeFileOnly for a file sealed before block digests."""
    path = os.fspath(path)
    if not is_plain_file(path):
        raise CheckpointCorrupt(f"no checkpoint file at {path}")
    with contextlib.ExitStack() as stack:
        return _guarded(path, lambda: _single(path, config, wanted, state, stack))


def _single(path, config, wanted, state, stack) -> CheckpointSpans:
    sf = _SealedFile(path, stack)
    f = sf.h5
    version = _ck.file_version(f, path, sf.sealed)
    stored = _ck.stored_config(f, path, config)
    fields = _ck.read_fields(f, path, version)
    _ck.check_step_name(path, fields["step"])
    found = {k: sf.dataset("params", k) for k in sf.names("params")}
    _check_dtypes(path, stored, {k: ds.dtype for k, ds in found.items()}, {k: ds.shape for k, ds in found.items()})
    _check_wanted(path, stored, wanted, state)
    shapes = param_shapes(stored)
    params = {k: [sf.array("params", k, lo, hi) for lo, hi in spans] for k, spans in wanted.items()}
    optimizer = {k: [sf.array("optimizer", k, lo, hi, shape=shapes[_split_state_key(k)[1]]) for lo, hi in spans]
                 for k, spans in state.items()}
    optimizer["step"] = sf.array("optimizer", "step")
    balancing = {k: sf.array("balancing", k) for k in sf.names("balancing")}
    assets = sf.names("assets")
    tokenizer_json = sf.array("assets", "tokenizer.json").tobytes() if "tokenizer.json" in assets else None
    return CheckpointSpans(config=stored, params=params, optimizer_state=optimizer, balancing_state=balancing,
                           tokenizer_json=tokenizer_json, path=path, bytes_read=sf.bytes_read, **fields)


# ---- a sharded directory -----------------------------------------------------------------------------------------
class _SavedVectors:
    """Where each key lies in a sharded checkpoint's saved vectors (module docstring), from its verified manifest."""

    def __init__(self, manifest: dict, stored: Config, where: str):
        shapes, ranks = param_shapes(stored), manifest["ranks"]
        E, ep = manifest["num_experts"], Layout.parse(manifest["layout"]).ep
        self.key_at: dict = {}  # key → (bucket, offset, local shape, expert)
        self.vectors: dict = {}  # bucket → [(first expert or None, [(s_lo, s_hi, rank)] tiling [0, padded))]
        self.state: dict = {}  # bucket → its stored optimizer-state prefixes
        for name, b in manifest["buckets"].items():
            check_bucket_shapes(name, b, shapes, E, ep, where)
            size, padded = b["size"], b["padded"]
            if not (isinstance(size, int) and isinstance(padded, int) and 0 <= size <= padded
                    and len(b["keys"]) == len(b["shapes"]) == len(b["offsets"])):
                raise CheckpointCorrupt(f"{where}: bucket {name} is malformed: the checkpoint is corrupt")
            for key, shape, offset in zip(b["keys"], b["shapes"], b["offsets"]):
                if not (isinstance(offset, int) and 0 <= offset and offset + math.prod(shape) <= size) \
                        or key in self.key_at:
                    raise CheckpointCorrupt(f"{where}: bucket {name}: {key} at {offset!r} is outside the bucket or "
                                            f"repeated: the checkpoint is corrupt")
                self.key_at[key] = (name, offset, tuple(shape), bool(b["expert"]))
            holders = [(r, tuple(d["shards"][name]), tuple(d["experts"])) for r, d in enumerate(ranks)
                       if name in d["shards"]]
            experts = tile({e for *_, e in holders}, E, f"{where}: experts of {name}") if b["expert"] else [None]
            self.vectors[name] = []
            for e in experts:
                pieces: dict = {}
                for r, span, held in holders:
                    if e is None or held == e:
                        pieces.setdefault(span, r)  # a replica's copy: the lowest rank's
                spans = tile(pieces, padded, f"{where}: params/{SHARD_PREFIX}{name}")
                self.vectors[name].append((None if e is None else e[0], [(lo, hi, pieces[lo, hi]) for lo, hi in spans]))
            self.state[name] = list(b["state"])
        replicated = set(manifest["replicated"].get("params", []))
        missing = [k for k in shapes if k not in (replicated if is_expert_bias(k) else self.key_at)]
        if missing or replicated - {k for k in shapes if is_expert_bias(k)}:
            raise CheckpointCorrupt(f"{where}: the buckets do not hold every parameter of the stored config "
                                    f"(e.g. {(missing or sorted(replicated))[0]!r}): the checkpoint is corrupt")

    def pieces(self, key: str, lo: int, hi: int, where: str) -> list:
        """[(whole start, saved rank, bucket, element lo, element hi within that rank's shard)] covering [lo, hi)
        of `key`, in order."""
        name, offset, shape, expert = self.key_at[key]
        n = math.prod(shape)
        per = n // shape[0] if expert else 0
        out = []
        for e0, shards in self.vectors[name]:
            w0 = e0 * per if expert else 0
            a, z = max(lo, w0), min(hi, w0 + n)
            if a >= z:
                continue
            p0, p1 = offset + a - w0, offset + z - w0
            for s_lo, s_hi, r in shards:
                x, y = max(p0, s_lo), min(p1, s_hi)
                if x < y:
                    out.append((w0 + x - offset, r, name, x - s_lo, y - s_lo))
        out.sort()
        at = lo
        for start, _, _, x, y in out:
            if start != at:
                break
            at += y - x
        if at != hi:
            raise CheckpointCorrupt(f"{where}: the saved shards do not cover [{lo}, {hi}) of {key}: the checkpoint "
                                    f"is corrupt")
        return out


def read_sharded_spans(path, config: Config | None, wanted: dict, state: dict) -> CheckpointSpans:
    """The `wanted` and `state` ranges of the sharded checkpoint directory `path` (module docstring); `config` as
    in load_sharded. WholeFileOnly when a rank file it opens was sealed before block digests."""
    path = os.fspath(path)
    manifest, manifest_bytes = read_manifest_sized(path)
    where = os.path.join(path, MANIFEST)
    stored = manifest_config(manifest, path, config)
    _check_wanted(path, stored, wanted, state)
    try:
        vectors = _SavedVectors(manifest, stored, where)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointCorrupt(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
    with contextlib.ExitStack() as stack:
        files: dict = {}

        def rank(r: int) -> _SealedFile:
            if r not in files:
                file = os.path.join(path, rank_file(r))
                listed = manifest["ranks"][r]["file"]
                if listed != rank_file(r) or not is_plain_file(file):  # a symlink is never followed
                    raise CheckpointCorrupt(f"{file}: missing or not a regular file (the manifest lists {listed!r} "
                                            f"for rank {r})")
                sf = files[r] = _guarded(file, lambda: _SealedFile(file, stack))
                check_rank_seal(file, r, manifest, sf.reader.header)
                for name, want in (("rank", r), ("step", manifest["step"])):
                    if _guarded(file, lambda: _ck._read_int(sf.h5, name, file)) != want:
                        raise CheckpointCorrupt(f"{file}: attribute {name} is not the manifest's: the checkpoint "
                                                f"is corrupt")
            return files[r]
        out = _sharded(manifest, stored, vectors, wanted, state, rank, where)
        out.path, out.bytes_read = path, manifest_bytes + sum(sf.bytes_read for sf in files.values())
        return out


def _read_pieces(requests: list, rank) -> list:
    """The arrays of `requests` [(rank, group, dataset key, its shape, lo, hi)], the requests of one dataset merged
    into one read of each contiguous run."""
    runs: dict = {}
    for r, group, key, shape, lo, hi in requests:
        runs.setdefault((r, group, key, shape), []).append((lo, hi))
    merged: dict = {}
    for (r, group, key, shape), spans in runs.items():
        spans.sort()
        joined = [list(spans[0])]
        for lo, hi in spans[1:]:
            if lo <= joined[-1][1]:
                joined[-1][1] = max(joined[-1][1], hi)
            else:
                joined.append([lo, hi])
        sf = rank(r)
        merged[r, group, key, shape] = ([lo for lo, _ in joined],
                                 [(lo, _guarded(sf.path, lambda: sf.array(group, key, lo, hi, shape=shape)))
                                  for lo, hi in joined])
    out = []
    for r, group, key, shape, lo, hi in requests:
        starts, arrays = merged[r, group, key, shape]
        at, array = arrays[bisect.bisect_right(starts, lo) - 1]
        out.append(array[lo - at:hi - at])
    return out


def _sharded(manifest, stored, vectors, wanted, state, rank, where) -> CheckpointSpans:
    shapes, ranks = param_shapes(stored), manifest["ranks"]
    r0 = rank(0)  # the replicated state and the fields
    requests, layout = [], []  # layout: (out dict key, [number of pieces per range])
    for group, asked in (("params", wanted), ("optimizer", state)):
        for key, spans in asked.items():
            prefix, param = _split_state_key(key) if group == "optimizer" else ("", key)
            counts = []
            for lo, hi in spans:
                if is_expert_bias(param):
                    found = [(lo, 0, None, lo, hi)]
                else:
                    found = vectors.pieces(param, lo, hi, where)
                    bucket = vectors.key_at[param][0]
                    if group == "optimizer" and prefix not in vectors.state[bucket]:
                        raise CheckpointCorrupt(f"{where}: bucket {bucket} stores no {prefix} state: the checkpoint "
                                                f"is corrupt")
                for _, r, bucket, x, y in found:
                    if bucket is None:  # rank 0's whole expert_bias
                        requests.append((r, group, key, shapes[param], x, y))
                    else:
                        s_lo, s_hi = ranks[r]["shards"][bucket]
                        requests.append((r, group, prefix + SHARD_PREFIX + bucket, (s_hi - s_lo,), x, y))
                counts.append(len(found))
            layout.append((group, key, counts))
    arrays = iter(_read_pieces(requests, rank))
    out = {"params": {}, "optimizer": {}}
    for group, key, counts in layout:
        ranges = []
        for n in counts:
            parts = [next(arrays) for _ in range(n)]
            if any(p.dtype != parts[0].dtype for p in parts):
                raise CheckpointCorrupt(f"{where}: the saved pieces of {key} differ in dtype: the checkpoint is "
                                        f"corrupt")
            ranges.append(parts[0] if n == 1 else np.concatenate(parts))
        out[group][key] = ranges
    _check_dtypes(where, stored, {k: v[0].dtype for k, v in out["params"].items() if v})
    fields = _guarded(r0.path, lambda: _rank0_fields(r0))
    out["optimizer"]["step"] = r0.array("optimizer", "step")
    balancing = {k: r0.array("balancing", k) for k in r0.names("balancing")}
    tokenizer_json = r0.array("assets", "tokenizer.json").tobytes() if "tokenizer.json" in r0.names("assets") \
        else None
    return CheckpointSpans(config=stored, params=out["params"], optimizer_state=out["optimizer"],
                           balancing_state=balancing, step=manifest["step"], run_id=manifest["run_id"],
                           tokenizer_json=tokenizer_json, **fields)


def _rank0_fields(r0: _SealedFile) -> dict:
    f, file = r0.h5, r0.path
    fields = {k: _ck._read_json(f, k, file) for k in ("data_state", "rng_state", "extra", "tokenizer",
                                                       "data_fingerprint")}
    _ck.check_fields(file, fields)
    return {"tokens_seen": _ck._read_int(f, "tokens_seen", file), **fields}


# ---- from a whole checkpoint -------------------------------------------------------------------------------------
def spans_of_checkpoint(ck, wanted: dict, state: dict, bytes_read: int) -> CheckpointSpans:
    """The ranges of a whole Checkpoint (the reader of files sealed before block digests: every byte read)."""
    _check_wanted(ck.path, ck.config, wanted, state)

    def cut(source: dict, asked: dict) -> dict:
        missing = [k for k in asked if k not in source]
        if missing:
            raise CheckpointCorrupt(f"{ck.path}: no {missing[0]}: the checkpoint is corrupt")
        return {k: [np.asarray(source[k]).reshape(-1)[lo:hi].copy() for lo, hi in spans] for k, spans in asked.items()}
    optimizer = cut(ck.optimizer_state, state)
    optimizer["step"] = np.asarray(ck.optimizer_state["step"])
    return CheckpointSpans(config=ck.config, params=cut(ck.params, wanted), optimizer_state=optimizer,
                           balancing_state=ck.balancing_state, step=ck.step, tokens_seen=ck.tokens_seen,
                           data_state=ck.data_state, rng_state=ck.rng_state, extra=ck.extra, run_id=ck.run_id,
                           tokenizer=ck.tokenizer, tokenizer_json=ck.tokenizer_json,
                           data_fingerprint=ck.data_fingerprint, path=ck.path, bytes_read=bytes_read)
