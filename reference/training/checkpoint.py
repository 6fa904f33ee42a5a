"""Training checkpoints: one HDF5 file holding everything a run needs to continue bit for bit (docs/architecture.md,
"State is explicit and resumable").

File layout (format_version 2)
------------------------------
    /params/<key>      one dataset per parameter, in its own dtype (keys are the HF names of SPEC §3.1)
    /optimizer/<key>   the optimizer state, a flat dict of arrays (a scalar "step" is a 0-d dataset)
    /balancing/<key>   the load-balancing state (expert bias, momentum; SPEC §6), a flat dict of arrays
    /assets/<name>     files the checkpoint carries as uint8 bytes (the training tokenizer's tokenizer.json)
    attributes of /:   format_version (int), step (int), tokens_seen (int), and JSON strings config
                       (`Config.to_dict()`), data_state (the loader position, data/), rng_state
                       (`Generator.bit_generator.state`; PCG64's 128-bit ints are plain JSON ints), extra
                       (free-form), run_id (the run that wrote it, for retention), tokenizer (kind, vocab_size,
                       eos_id, sha256 of /assets/tokenizer.json, or null), data_fingerprint (per data source:
                       documents, tokens, sha256 of the document index)

Verification. A version 2 file is sealed (sealed_file.py): its HDF5 user block holds the SHA-256 of every byte after
it and of each dataset's raw bytes, block by block (1 MiB blocks, since block digests were added; older files have
one digest per dataset and still load), plus the run_id. `load_checkpoint` checks the seal from the bytes alone before
HDF5 parses anything (a damaged HDF5 structure can make the parser hang or crash), then that the file holds exactly
the sealed datasets, each keeping its bytes in the file at its sealed range (no external storage, no virtual
dataset: checkpoint_files.py), and that a `step_N.h5` holds step N; any mismatch is a CheckpointCorrupt naming the
file and the damaged dataset (or the structure), as is a truncated or unreadable file. Version 1 files (no seal)
still load, unverified (but their datasets must hold their own bytes too). A reader of part of a file (a rank's
spans: distributed/checkpoint_spans.py) verifies the header, the structure and each block it reads, with the same
checks of the datasets and attributes (checked_dataset, file_version, stored_config, read_fields, check_step_name).
`save_checkpoint` refuses params,
optimizer or balancing state holding NaN or infinity (`require_finite`), so a diverged run can never rotate its good
checkpoints away.

Dataset names are the dict keys with "%" written as "%25", "/" as "%2F" and a leading "." as "%2E" (HDF5 reads
"/" as a path separator and "." as the group itself), so "muon.momentum/model.layers.0.self_attn.q_proj.weight" is
stored as "muon.momentum%2Fmodel.layers.0.self_attn.q_proj.weight". Groups keep insertion order. Only plain numeric
datasets (bool, int, uint, float, complex) are read back; links, subgroups and other types are refused, and nothing
is ever unpickled or evaluated.

Writes are atomic: the file is written to `path + ".tmp-<pid>"` in the same directory, fsynced, renamed over `path`
with os.replace, and the directory is fsynced. A crash at any point leaves the previous file at `path` (and every
other checkpoint) untouched; at worst a `*.tmp-<pid>` file is left behind, which `CheckpointManager` ignores and
removes once its writer is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..files import CheckpointError, atomic_path, fsync_dir, open_new  # one CheckpointError for the whole package
from ..model.config import RESUMABLE_FIELDS, Config, ConfigError
from ..model.params import check_params
from .checkpoint_files import StorageError, check_storage, dataset_names, is_plain_dir, is_plain_file, listed
from .sealed_file import SealError, header_size, is_sealed, read_header, seal_file, verify

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "CheckpointCorrupt", "CheckpointWriteError",
           "CheckpointManager", "save_checkpoint", "load_checkpoint", "restore_rng", "read_run_id",
           "config_changes", "write_sealed_hdf5"]

FORMAT_VERSION = 2


class CheckpointCorrupt(CheckpointError):
    """The file is missing, truncated or damaged (a checksum does not match): another checkpoint may still load."""


class CheckpointWriteError(CheckpointError):
    """The file could not be written (disk full, read-only, ...); the previous checkpoints are untouched."""

_NUMERIC_KINDS = "biufc"
# Bit generators a stored rng_state may name (looked up in this table, never by getattr on a stored string).
_BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM, "Philox": np.random.Philox,
                   "SFC64": np.random.SFC64, "MT19937": np.random.MT19937}


@dataclass
class Checkpoint:
    """Everything one checkpoint file holds, arrays in memory with their stored dtype."""
    config: Config
    params: dict
    optimizer_state: dict
    balancing_state: dict
    step: int
    tokens_seen: int
    data_state: dict
    rng_state: dict | None
    extra: dict = field(default_factory=dict)
    run_id: str | None = None
    tokenizer: dict | None = None  # tokenizer_record's info; its tokenizer.json bytes are tokenizer_json
    tokenizer_json: bytes | None = None
    data_fingerprint: list | None = None
    path: str | None = None
    format_version: int = FORMAT_VERSION

    def rng(self) -> np.random.Generator:
        """A Generator in the stored state: it draws the numbers the saved one would have drawn next."""
        return restore_rng(self.rng_state)

    def as_kwargs(self) -> dict:
        """The keyword arguments of `save_checkpoint` that write this checkpoint again."""
        return dict(config=self.config, params=self.params, optimizer_state=self.optimizer_state,
                    balancing_state=self.balancing_state, step=self.step, tokens_seen=self.tokens_seen,
                    data_state=self.data_state, rng_state=self.rng_state, extra=self.extra, run_id=self.run_id,
                    tokenizer=None if self.tokenizer is None else (self.tokenizer, self.tokenizer_json),
                    data_fingerprint=self.data_fingerprint)


def restore_rng(state) -> np.random.Generator:
    """A np.random.Generator from a `bit_generator.state` dict (as stored in a checkpoint)."""
    if not isinstance(state, dict) or state.get("bit_generator") not in _BIT_GENERATORS:
        name = state.get("bit_generator") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"rng_state names an unknown bit generator {name!r}; "
                              f"known: {sorted(_BIT_GENERATORS)}")
    bit_generator = _BIT_GENERATORS[state["bit_generator"]]()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


# ---- names and JSON ----------------------------------------------------------------------------------------------
def _escape(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise CheckpointError(f"state keys must be non-empty strings, got {key!r}")
    name = key.replace("%", "%25").replace("/", "%2F")
    return "%2E" + name[1:] if name.startswith(".") else name


def _unescape(name: str) -> str:
    return re.sub(r"%(25|2F|2E)", lambda m: {"25": "%", "2F": "/", "2E": "."}[m.group(1)], name)


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _dumps(name: str, value) -> str:
    try:
        return json.dumps(value, default=_json_default, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name} cannot be stored as JSON: {e}") from None


# ---- atomic files ------------------------------------------------------------------------------------------------
# ---- save / load -------------------------------------------------------------------------------------------------
def _check_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise CheckpointError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _flat_arrays(name: str, tree, require_finite: bool = False) -> dict:
    if not isinstance(tree, dict):
        raise CheckpointError(f"{name} must be a flat dict of arrays, got {type(tree).__name__}")
    out = {}
    for key, value in tree.items():
        array = np.asarray(value)
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise CheckpointError(f"{name}[{key!r}]: dtype {array.dtype} is not numeric")
        if require_finite and array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise CheckpointError(f"{name}[{key!r}] holds NaN or infinity: refusing to write a checkpoint that "
                                  f"could not be trained on")
        out[_escape(key)] = np.require(array, requirements="C")  # (ascontiguousarray makes 0-d 1-d)
    return out


def _write_bytes(path: str, data: bytes) -> None:
    """Write a new file at `path` (a temporary name), never through a link (files.open_new)."""
    with open_new(path) as out:
        out.write(data)


def save_checkpoint(path, *, config: Config, params: dict, optimizer_state: dict, balancing_state: dict, step: int,
                    tokens_seen: int, data_state: dict, rng_state, extra: dict | None = None,
                    run_id: str | None = None, tokenizer: tuple[dict, bytes | None] | None = None,
                    data_fingerprint: list | None = None, require_finite: bool = True) -> str:
    """Write one checkpoint file atomically (see the module docstring) and return its path. `params` must match
    `config` (check_params); `rng_state` is a `bit_generator.state` dict, a np.random.Generator, or None;
    `tokenizer` is (info, tokenizer.json bytes or None) from `tokenizer.tokenizer_record`. With `require_finite`
    (the default) params, optimizer and balancing state holding NaN or infinity are refused. An OSError while
    writing (disk full, read-only) raises CheckpointWriteError and leaves `path` as it was."""
    path = os.fspath(path)
    if not isinstance(config, Config):
        raise CheckpointError(f"config must be a Config, got {type(config).__name__}")
    try:
        check_params(config, params)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"params do not match the config: {e.args[0] if e.args else e}") from None
    if isinstance(rng_state, np.random.Generator):
        rng_state = rng_state.bit_generator.state
    if rng_state is not None:
        restore_rng(rng_state)  # refuse a state that could not be restored later
    if not isinstance(data_state, dict):
        raise CheckpointError(f"data_state must be a dict, got {type(data_state).__name__}")
    tokenizer_info, tokenizer_json = tokenizer if tokenizer is not None else (None, None)
    attrs = {"format_version": FORMAT_VERSION, "step": _check_int("step", step),
             "tokens_seen": _check_int("tokens_seen", tokens_seen),
             "config": _dumps("config", config.to_dict()), "data_state": _dumps("data_state", data_state),
             "rng_state": _dumps("rng_state", rng_state), "extra": _dumps("extra", dict(extra or {})),
             "run_id": _dumps("run_id", run_id), "tokenizer": _dumps("tokenizer", tokenizer_info),
             "data_fingerprint": _dumps("data_fingerprint", data_fingerprint)}
    groups = {"params": _flat_arrays("params", params, require_finite),
              "optimizer": _flat_arrays("optimizer_state", optimizer_state, require_finite),
              "balancing": _flat_arrays("balancing_state", balancing_state, require_finite),
              "assets": {} if tokenizer_json is None else
              {"tokenizer.json": np.frombuffer(bytes(tokenizer_json), dtype=np.uint8)}}
    write_sealed_hdf5(path, attrs, groups, {"run_id": run_id, "format_version": FORMAT_VERSION})
    return path


def write_sealed_hdf5(path, attrs: dict, groups: dict, meta: dict) -> str:
    """Write an HDF5 file of `attrs` and {group: {name: array}}, sealed with `meta` (sealed_file.py), atomically;
    returns the SHA-256 of its bytes. HDF5 writes only the file's structure: each dataset's space is reserved at
    creation (early allocation, never filled), then its bytes are written from the array with plain file I/O and
    the seal is made from the arrays and the structure read back, so no copy of the file is held in memory (a
    rank's shards can be most of its memory) and a failed data write (a full disk) is one OSError
    (CheckpointWriteError here): HDF5 itself writes only the small structure. The temporary file is created new (never through a
    planted link) and HDF5 writes through its descriptor."""
    arrays = {f"{group}/{name}": np.asarray(array, order="C") for group, named in groups.items()
              for name, array in named.items()}
    userblock = header_size({key: a.nbytes for key, a in arrays.items()}, meta)
    try:
        with atomic_path(path) as tmp:
            with open_new(tmp, "w+b") as out:
                ranges = _write_structure(out, userblock, attrs, groups, arrays)
                for key, (offset, nbytes) in ranges.items():
                    if nbytes:
                        _write_range(out, offset, memoryview(arrays[key]).cast("B"))
                out.flush()
                length = out.seek(0, os.SEEK_END)
                seal_file(out, userblock, length, ranges,
                          {key: [memoryview(arrays[key]).cast("B")] if arrays[key].nbytes else [] for key in ranges},
                          meta)
                out.flush()
                return _file_sha256(out)
    except OSError as e:  # a full disk, a read-only or vanished directory
        reason = e.strerror or str(e).split("\n")[0]
        raise CheckpointWriteError(f"{path}: cannot write checkpoint ({reason}); the file was not changed") \
            from None


def _write_structure(out, userblock: int, attrs: dict, groups: dict, arrays: dict) -> dict:
    """HDF5's part of the file, through the open file `out`: the attributes, the groups and every dataset with its
    space reserved and unfilled; returns {"group/name": (offset, nbytes)}."""
    ranges = {}
    with h5py.File(out, "w", userblock_size=userblock, track_order=True) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for group, named in groups.items():
            g = f.create_group(group, track_order=True)
            for name in named:
                array = arrays[f"{group}/{name}"]
                offset = _reserve_dataset(g, name, array).get_offset()
                ranges[f"{group}/{name}"] = (offset or 0, array.nbytes if offset is not None else 0)
    return ranges


def _reserve_dataset(group, name: str, array):
    """A contiguous dataset of the array's shape and dtype in `group`, its space allocated now and never filled
    (HDF5 writes none of its bytes): the low-level dataset id."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple(array.shape) if array.ndim else h5py.h5s.create(h5py.h5s.SCALAR)
    return h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(array.dtype), space, dcpl=dcpl)


def _write_range(out, offset: int, data) -> None:
    """A dataset's bytes at its reserved place in the file."""
    out.seek(offset)
    out.write(data)


def _file_sha256(f) -> str:
    f.seek(0)
    return hashlib.file_digest(f, "sha256").hexdigest()


def checked_dataset(f, group: str, name: str, path: str, sealed: dict | None = None):
    """The dataset `group/name` (an escaped name) of the open file `f`, checked to be a hard link to a plain numeric
    dataset keeping its bytes in the file at its range in `sealed` ({"group/name": (offset, nbytes)}, None for an
    unsealed file: checkpoint_files.check_storage); CheckpointError/CheckpointCorrupt naming it otherwise."""
    where = f"{path}: {group}/{name}"
    if not isinstance(f[group].get(name, getlink=True), h5py.HardLink):
        raise CheckpointError(f"{where} is a link, not a dataset")
    ds = f[group][name]
    if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in _NUMERIC_KINDS or ds.dtype.fields:
        raise CheckpointError(f"{where} is not a plain numeric dataset")
    try:
        check_storage(ds, None if sealed is None else sealed[f"{group}/{name}"])
    except StorageError as e:
        raise CheckpointCorrupt(f"{where} {e}: the file is corrupt") from None
    return ds


def checked_group(f, name: str, path: str) -> list:
    """The member names of group `name` (CheckpointError unless it is a hard-linked group)."""
    group = f.get(name, getlink=True)
    if not isinstance(group, h5py.HardLink) or not isinstance(f[name], h5py.Group):
        raise CheckpointError(f"{path}: no {name}/ group")
    return list(f[name].keys())


def _read_group(f, name: str, path: str, sealed: dict | None = None) -> dict:
    """{key: array} of group `name`, each dataset checked (checked_dataset)."""
    return {_unescape(key): np.asarray(checked_dataset(f, name, key, path, sealed)[()])
            for key in checked_group(f, name, path)}


def _read_json(f, name: str, path: str):
    value = f.attrs.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise CheckpointError(f"{path}: attribute {name} missing or not a JSON string")
    try:
        return json.loads(value)
    except ValueError as e:
        raise CheckpointError(f"{path}: attribute {name} is not valid JSON: {e}") from None


def _read_int(f, name: str, path: str) -> int:
    value = f.attrs.get(name)
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise CheckpointError(f"{path}: attribute {name} missing or not an integer (found {value!r})")
    return int(value)


def config_changes(found: Config, expected: Config, recipe: bool) -> list[str]:
    """The fields that differ, as "name stored != expected": the recipe fields a resume may change
    (config.RESUMABLE_FIELDS) with recipe=True, the others (the model) with recipe=False."""
    a, b = found.to_dict(), expected.to_dict()
    return [f"{k} {a.get(k)!r} != {b[k]!r}" for k in b if a.get(k) != b[k] and (k in RESUMABLE_FIELDS) == recipe]


def read_run_id(path) -> str | None:
    """The run_id a checkpoint file records in its seal (None for version 1 files or damaged ones); reads only the
    header, so retention never parses a damaged file."""
    try:
        run_id = read_header(path)["meta"].get("run_id")
    except (OSError, SealError):
        return None
    return run_id if isinstance(run_id, str) else None


def _verified_header(path: str) -> dict | None:
    """Check a sealed file's bytes against its seal (CheckpointCorrupt naming the damaged dataset) and return its
    header, with "ranges" as {dataset name: (offset, nbytes)} (the datasets it must hold); None for an unsealed
    (version 1) file."""
    try:
        if not is_sealed(path):
            return None
        header = verify(path)
        header["ranges"] = {name: (off, n) for name, (off, n, _) in header["ranges"].items()}
        return header
    except SealError as e:
        raise CheckpointCorrupt(f"{path}: {_unescape(str(e))}: the file is corrupt") from None
    except OSError as e:
        raise CheckpointCorrupt(f"{path}: cannot read checkpoint ({e.strerror or e})") from None


def _check_datasets(f, path: str, sealed: dict | None) -> None:
    """The file holds groups of datasets only, no links (checkpoint_files.dataset_names), and, when sealed, exactly
    the datasets of its seal; CheckpointCorrupt otherwise."""
    try:
        names = dataset_names(f)
    except StorageError as e:
        raise CheckpointCorrupt(f"{path}: {e}: the file is corrupt") from None
    if sealed is not None and names != set(sealed):
        raise CheckpointCorrupt(f"{path}: its datasets are not the ones it was sealed with: "
                                f"{sorted(set(sealed) ^ names)[:3]}")


def check_step_name(path: str, step: int) -> None:
    """A `step_N.h5` file must hold step N (a renamed file would resume at the wrong step)."""
    m = _STEP_FILE.match(os.path.basename(path))
    if m and int(m.group(1)) != step:
        raise CheckpointCorrupt(f"{path}: holds step {step}, not the step {int(m.group(1))} of its name: the "
                                f"checkpoint is corrupt")


def file_version(f, path: str, sealed: dict | None) -> int:
    """The file's format_version: present, supported, and sealed exactly when it is 2 or more."""
    version = _read_int(f, "format_version", path) if "format_version" in f.attrs else None
    if version is None:
        raise CheckpointError(f"{path}: not a trinity checkpoint (no format_version attribute)")
    if not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {version} is not supported "
                              f"(this trinity reads versions 1..{FORMAT_VERSION})")
    if (version >= 2) != (sealed is not None):
        raise CheckpointCorrupt(f"{path}: format_version {version} does not match its seal: the file is corrupt")
    return version


def stored_config(f, path: str, config: Config | None) -> Config:
    """The file's stored config; with `config`, it must be the same model (config_changes, recipe=False)."""
    try:
        stored = Config.from_dict(_read_json(f, "config", path))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: stored config is not valid: {e}") from None
    diff = [] if config is None else config_changes(stored, config, recipe=False)
    if diff:
        raise CheckpointError(f"{path}: checkpoint is from another model: {'; '.join(diff)} (checkpoint != expected)")
    return stored


def read_fields(f, path: str, version: int) -> dict:
    """The scalar and JSON fields of a Checkpoint from the file's attributes (version 2 adds run_id, tokenizer,
    data_fingerprint), checked (check_fields)."""
    fields = dict(step=_read_int(f, "step", path), tokens_seen=_read_int(f, "tokens_seen", path),
                  data_state=_read_json(f, "data_state", path), rng_state=_read_json(f, "rng_state", path),
                  extra=_read_json(f, "extra", path))
    if version >= 2:
        fields.update({k: _read_json(f, k, path) for k in ("run_id", "tokenizer", "data_fingerprint")})
    check_fields(path, fields)
    return fields


def check_fields(path: str, fields: dict) -> None:
    """CheckpointError naming the field unless data_state and extra are JSON objects, tokenizer an object or null,
    run_id a string or null, data_fingerprint a list or null, and rng_state null or restorable."""
    for name in ("data_state", "extra"):
        if not isinstance(fields[name], dict):
            raise CheckpointError(f"{path}: {name} is not a JSON object")
    if fields.get("tokenizer") is not None and not isinstance(fields["tokenizer"], dict):
        raise CheckpointError(f"{path}: tokenizer is not a JSON object")
    if fields.get("run_id") is not None and not isinstance(fields["run_id"], str):
        raise CheckpointError(f"{path}: run_id is not a string")
    if fields.get("data_fingerprint") is not None and not isinstance(fields["data_fingerprint"], list):
        raise CheckpointError(f"{path}: data_fingerprint is not a JSON list")
    if fields["rng_state"] is not None:
        try:
            restore_rng(fields["rng_state"])
        except (CheckpointError, TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: rng_state cannot be restored: {e}") from None


def load_checkpoint(path, config: Config | None = None) -> Checkpoint:
    """Read and verify a checkpoint written by `save_checkpoint`. With `config`, the stored config must be the same
    model: equal in every field but the recipe fields a resume may change (config.RESUMABLE_FIELDS; the error lists
    each differing field as `name stored != expected`). Raises CheckpointCorrupt, naming the path
    (and the dataset), for a missing, truncated or damaged file, and CheckpointError for an unknown format_version
    or params that do not match the stored config. Every byte is read and verified (a rank's part of a checkpoint:
    distributed/checkpoint_spans.py)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointCorrupt(f"no checkpoint file at {path}")
    header = _verified_header(path)
    sealed = None if header is None else header["ranges"]
    try:
        with h5py.File(path, "r") as f:
            version = file_version(f, path, sealed)
            _check_datasets(f, path, sealed)
            stored = stored_config(f, path, config)
            ck = Checkpoint(config=stored, params=_read_group(f, "params", path, sealed),
                            optimizer_state=_read_group(f, "optimizer", path, sealed),
                            balancing_state=_read_group(f, "balancing", path, sealed),
                            path=path, format_version=version, **read_fields(f, path, version))
            if version >= 2:
                assets = _read_group(f, "assets", path, sealed)
                if "tokenizer.json" in assets:
                    ck.tokenizer_json = assets["tokenizer.json"].tobytes()
    except CheckpointError:
        raise
    except Exception as e:  # h5py on a truncated or damaged file: OSError, KeyError, TypeError, RuntimeError, ...
        raise CheckpointCorrupt(f"{path}: cannot read checkpoint (truncated or corrupt file?): "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    check_step_name(path, ck.step)
    try:
        check_params(stored, ck.params)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: params do not match the stored config: "
                              f"{e.args[0] if e.args else e}") from None
    return ck


# ---- a directory of checkpoints ----------------------------------------------------------------------------------
_STEP_FILE = re.compile(r"^step_(\d+)\.h5$")
_TMP_FILE = re.compile(r"^step_\d+\.h5\.tmp-(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def refuse_foreign_entry(path: str, directory: bool) -> None:
    """CheckpointWriteError when `path` exists as something a save must not replace or write through: a symbolic
    link, a special file, or a directory where a file belongs (`directory` False) or a file where a directory does."""
    if os.path.lexists(path) and not (is_plain_dir(path) if directory else is_plain_file(path)):
        what = "a symbolic link" if os.path.islink(path) else f"not a plain {'directory' if directory else 'file'}"
        raise CheckpointWriteError(f"{path} is {what}: refusing to save a checkpoint onto it (remove it, or give "
                                   f"the run another [checkpoint] dir)")


class CheckpointManager:
    """`directory/step_{step:08d}.h5`, one file per saved step, keeping the newest `keep_last` (None: all) of the
    run `run_id`.

    The newest checkpoint is found by scanning file names (no pointer file that could go stale); only complete
    files carry the `step_N.h5` name, because each is renamed into place after it is fully written. Leftover
    `*.tmp-<pid>` files from crashed writers are ignored, and removed by `save`/`clean_tmp` once that pid is no
    longer running on this host. Retention deletes only checkpoints that record this manager's `run_id`, never the
    one just written, and every checkpoint is finite (`save_checkpoint` refuses NaN), so the newest finite
    checkpoint always survives. One manager (one writer) per directory is assumed. Only regular files are
    checkpoints (checkpoint_files.py): a symlink or special file under a checkpoint's name is skipped by every
    listing, never removed, and a save onto one is refused (CheckpointWriteError)."""

    def __init__(self, directory, keep_last: int | None = 3, run_id: str | None = None, create: bool = True):
        """`create`: make the directory now (False: a job's other ranks, which leave it to the rank that holds the
        run folder's lock, so that a refused start can remove what it made; a missing directory lists empty)."""
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
        self.directory = os.fspath(directory)
        self.keep_last = keep_last
        self.run_id = run_id
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} is a file")
        if not create:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise CheckpointWriteError(f"cannot create checkpoint directory {self.directory}: "
                                       f"{e.strerror or e}") from None

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{_check_int('step', step):08d}.h5")

    def _steps(self) -> list[tuple[int, str]]:
        found = []
        for name in listed(self.directory):
            m = _STEP_FILE.match(name)
            if m and is_plain_file(os.path.join(self.directory, name)):  # a symlink is never followed
                found.append((int(m.group(1)), os.path.join(self.directory, name)))
        return sorted(found)

    def list(self) -> list[str]:
        """Paths of the complete checkpoints, oldest step first."""
        return [p for _, p in self._steps()]

    def latest(self) -> str | None:
        """Path of the checkpoint with the highest step, or None when there is none."""
        steps = self._steps()
        return steps[-1][1] if steps else None

    def load_latest(self, config: Config | None = None) -> Checkpoint | None:
        path = self.latest()
        return None if path is None else load_checkpoint(path, config)

    def load_newest_valid(self, config: Config | None = None) -> tuple[Checkpoint | None, list[tuple[str, str]]]:
        """(the newest checkpoint that verifies, [(path, why) for each newer one skipped as corrupt]). A checkpoint
        of another model (or any error other than corruption) is raised, not skipped: an older file would not
        mend it."""
        skipped = []
        for path in reversed(self.list()):
            try:
                return load_checkpoint(path, config), skipped
            except CheckpointCorrupt as e:
                skipped.append((path, str(e)))
        return None, skipped

    def remove_all(self) -> list[str]:
        """Delete every complete checkpoint in the directory (a run started over); return their paths."""
        removed = self.list()
        for path in removed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        fsync_dir(self.directory)
        return removed

    def clean_tmp(self) -> list[str]:
        """Remove `*.tmp-<pid>` leftovers whose writer is gone (not this process, not alive here); return them."""
        removed = []
        for name in listed(self.directory):
            m = _TMP_FILE.match(name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.directory, name))
                    removed.append(os.path.join(self.directory, name))
        return removed

    def save(self, step: int, **state) -> str:
        """Write `step_{step:08d}.h5` atomically (state: the other keyword arguments of `save_checkpoint`; run_id
        defaults to the manager's), then delete the oldest checkpoints of this run beyond keep_last, never the one
        just written. Returns its path."""
        self.clean_tmp()
        state.setdefault("run_id", self.run_id)
        refuse_foreign_entry(self.path_for(step), directory=False)
        path = save_checkpoint(self.path_for(step), step=step, **state)
        if self.keep_last is not None:
            ours = [p for _, p in self._steps()
                    if os.path.abspath(p) != os.path.abspath(path) and read_run_id(p) == state["run_id"]]
            for old in ours[: max(0, len(ours) - (self.keep_last - 1))]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)
            fsync_dir(self.directory)
        return path
