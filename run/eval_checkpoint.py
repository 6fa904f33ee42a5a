"""A checkpoint's params for held-out evaluation (`trinity eval`): the params only, and under a layout only this
rank's spans.

Three kinds of checkpoint are read:

    "checkpoint"   a training checkpoint file step_N.h5 (reference/training/checkpoint.py)
    "sharded"      a sharded checkpoint directory step_N.sharded, holding manifest.json (distributed/
                   sharded_checkpoint.py), written by any layout
    "hf"           a Hugging Face checkpoint directory: config.json and safetensors (reference/interop/hf.py)

`open_checkpoint` reads what a checkpoint says about itself (its kind, model config, step, recorded tokenizer and
`extra`), no weight. `read_params` then reads the weights: in one process every key whole, a dict keyed as
`init_params` gives; under a layout (`plan`, `rank`) only the spans `plan.wanted(rank)` names, as ShardedParams
(its mesh attached by the caller), exactly as the trainer builds a rank's params on a resume or from `init_from`
(run/rank_state.py). The optimizer state is never read (`read_spans(..., state={})`); a checkpoint sealed before
block digests is the one exception, read whole and then cut (sharded_checkpoint.read_spans).

dtype: the params are computed in `dtype` (float32 or float64), by default the checkpoint's own: the dtype its
params were saved in, for an HF directory float64 when its embedding is stored as F64 and float32 otherwise (F32,
BF16, F16). expert_bias stays float32 in every dtype (docs/decisions.md #18).

Every problem a user can cause is a CheckpointError with a one-line message naming the path. No path a checkpoint
names is ever opened.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from trinity.reference.files import CheckpointError
from trinity.reference.model.config import Config, ConfigError
from trinity.reference.model.params import param_dtype, param_shapes

__all__ = ["KINDS", "EvalCheckpoint", "open_checkpoint", "read_params", "run_seq_len", "checkpoint_kind"]

KINDS = ("checkpoint", "sharded", "hf")
DTYPES = ("float32", "float64")


@dataclass
class EvalCheckpoint:
    """What a checkpoint says about itself, before any weight is read."""
    path: str
    kind: str  # one of KINDS
    config: Config
    step: int | None = None  # None for an HF directory
    tokens_seen: int | None = None
    tokenizer: dict | None = None  # tokenizer_record's info of the training data's tokenizer (ours), else None
    extra: dict = field(default_factory=dict)
    stored_dtype: np.dtype | None = None  # HF: the dtype its weights are read in by default; ours: known once read


def checkpoint_kind(path: str) -> str:
    """The kind of checkpoint at `path` (module docstring), or CheckpointError saying why it is none."""
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        from trinity.distributed.checkpoint_manifest import MANIFEST, STEP_DIR
        if os.path.isfile(os.path.join(path, MANIFEST)):
            return "sharded"
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        if os.path.isfile(os.path.join(path, "meta.json")):
            raise CheckpointError(f"{path}: a prepared dataset, not a checkpoint (the data to evaluate on is --data)")
        ranks = [n for n in os.listdir(path) if n.startswith("rank_") and ".h5" in n]
        if STEP_DIR.match(name) or ranks:
            raise CheckpointError(f"{path}: an incomplete sharded checkpoint (an interrupted save: {len(ranks)} rank "
                                  f"file(s), no manifest.json); use an earlier step")
        raise CheckpointError(f"{path}: not a checkpoint (a directory with neither manifest.json, as a sharded "
                              f"checkpoint has, nor config.json, as a Hugging Face checkpoint has)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file")
    folder = os.path.dirname(os.path.abspath(path))
    if name.startswith("rank_") and os.path.isfile(os.path.join(folder, "manifest.json")):
        raise CheckpointError(f"{path} is one rank's part of the sharded checkpoint {folder}: pass that directory")
    if ".tmp-" in name:
        raise CheckpointError(f"{path}: an unfinished checkpoint write (a temporary file of an interrupted save); "
                              f"use the checkpoint without the .tmp-<pid> suffix, or an earlier step")
    import h5py
    if not h5py.is_hdf5(path):
        raise CheckpointError(f"{path}: not a checkpoint (not an HDF5 file; a checkpoint is a training checkpoint "
                              f"step_N.h5, a sharded checkpoint directory or a Hugging Face checkpoint directory)")
    return "checkpoint"


def open_checkpoint(path) -> EvalCheckpoint:
    """The checkpoint at `path`, opened (its header, config and fields verified) but no weight read."""
    path = os.fspath(path)
    kind = checkpoint_kind(path)
    if kind == "hf":
        return _open_hf(path)
    from trinity.distributed.sharded_checkpoint import read_spans
    try:
        ck = read_spans(path, None, {}, {})  # no params, no optimizer state: the config and the fields
    except CheckpointError as e:
        raise CheckpointError(_not_ours(path, e)) from None
    return EvalCheckpoint(path, kind, ck.config, step=int(ck.step), tokens_seen=int(ck.tokens_seen),
                          tokenizer=ck.tokenizer, extra=dict(ck.extra or {}))


def _not_ours(path: str, error: Exception) -> str:
    text = " ".join(str(error).splitlines())
    return text if path in text else f"{path}: {text}"


def _open_hf(path: str) -> EvalCheckpoint:
    from trinity.reference.interop.hf_files import read_header, weight_files
    config_path = os.path.join(path, "config.json")
    try:
        config = Config.from_hf(config_path)
        files, _ = weight_files(path)
        stored = "F32"
        for filename in files:
            entry = read_header(filename)[0].get("model.embed_tokens.weight")
            if entry is not None:
                stored = entry.dtype
    except (ConfigError, OSError, ValueError, TypeError) as e:  # UnicodeDecodeError, JSONDecodeError: ValueError
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint: {' '.join(str(e).splitlines())}") from None
    except CheckpointError as e:
        raise CheckpointError(_not_ours(path, e)) from None
    return EvalCheckpoint(path, "hf", config, stored_dtype=np.dtype(np.float64 if stored == "F64" else np.float32))


def run_seq_len(ck: EvalCheckpoint) -> int | None:
    """The seq_len of the run that wrote `ck`, as the trainer records it (extra.seq_len); else None. Nothing a
    checkpoint names is opened (a crafted checkpoint could name a FIFO or a device)."""
    value = ck.extra.get("seq_len") if isinstance(ck.extra, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _whole_wanted(config: Config) -> dict:
    return {k: [(0, math.prod(s))] for k, s in param_shapes(config).items()}


def read_params(ck: EvalCheckpoint, dtype=None, plan=None, rank: int = 0):
    """(params, dtype): the params of `ck` in `dtype` (None: the checkpoint's own, module docstring). Without
    `plan`: {key: whole array}. With `plan` (a ParallelPlan of ck.config): rank `rank`'s ShardedParams built from
    its spans only (no mesh attached yet)."""
    wanted = _whole_wanted(ck.config) if plan is None else plan.wanted(rank)
    if ck.kind == "hf":
        from trinity.reference.interop.hf import read_pretrained_spans
        dt = np.dtype(dtype) if dtype is not None else ck.stored_dtype
        try:
            _, values, _ = read_pretrained_spans(ck.path, wanted, dtype=dt, config=ck.config)
        except (CheckpointError, ConfigError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot load HF checkpoint {ck.path}: {' '.join(str(e).splitlines())}") \
                from None
    else:
        from trinity.distributed.sharded_checkpoint import read_spans
        try:
            values = read_spans(ck.path, ck.config, wanted, {}).params
        except CheckpointError as e:
            raise CheckpointError(_not_ours(ck.path, e)) from None
        stored = values["model.embed_tokens.weight"][0].dtype
        dt = np.dtype(dtype) if dtype is not None else stored
    if dt.kind != "f" or dt.name not in DTYPES:  # a float16 training checkpoint computes in float32
        dt = np.dtype(np.float32)
    values = {k: [np.asarray(v, dtype=param_dtype(k, dt)) for v in pieces] for k, pieces in values.items()}
    for key, pieces in values.items():
        if not all(np.isfinite(p).all() for p in pieces):
            raise CheckpointError(f"{ck.path}: the weights hold NaN or infinity ({key})")
    if plan is not None:
        from trinity.distributed.fsdp import ShardedParams
        return ShardedParams.from_spans(plan, rank, values, dt), dt
    shapes = param_shapes(ck.config)
    params = {k: values[k][0].reshape(shapes[k]) for k in shapes}
    return params, dt
