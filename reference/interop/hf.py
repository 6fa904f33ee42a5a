"""Hugging Face interop: convert between our stacked-expert params and the HF layouts, load and save checkpoints.

Our params (docs/architecture.md, model/params.py) are a flat dict keyed by the HF names of SPEC §3.1, except that the
routed experts of MoE layer l are stacked:

    model.layers.{l}.mlp.experts.gate_proj  [E, I_m, d]
    model.layers.{l}.mlp.experts.up_proj    [E, I_m, d]
    model.layers.{l}.mlp.experts.down_proj  [E, d, I_m]

Hugging Face uses two other layouts for the same numbers:

- on disk (SPEC §3.1, what released checkpoints and transformers' `save_pretrained` write): one matrix per expert,
  `model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight` of shape [I_m, d] / [I_m, d] / [d, I_m];
- in memory in transformers v5 (SPEC §3.2): `mlp.experts.gate_up_proj` [E, 2·I_m, d] with, per expert, the gate
  rows first and then the up rows, and `mlp.experts.down_proj` [E, d, I_m] (the same key and shape as ours).

Everything else is keyed identically. `to_hf_state_dict` / `from_hf_state_dict` convert any tree keyed like params
(params, gradients, optimizer moments). `load_pretrained` / `save_pretrained` read and write a checkpoint directory
(config.json + safetensors) with strict validation against `param_shapes(config)`.

`model.layers.{l}.mlp.expert_bias` is float32 whatever the model's dtype (docs/decisions.md #18), as transformers keeps
it (`_keep_in_fp32_modules_strict`, 5.24 on) and the released checkpoints store it: every function here writes and
reads it as float32, also for float16 and float64 models (a bias held in float64 is rounded to float32).

Security: weights are read only from safetensors files (never a pickle), and `auto_map` (remote code) in
config.json is ignored by `Config.from_hf`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..files import CheckpointError, atomic_path
from ..model.config import Config
from ..model.params import EXPERT_BIAS_DTYPE, is_expert_bias, layer_prefix, param_dtype, param_shapes

__all__ = ["CheckpointError", "to_hf_state_dict", "from_hf_state_dict", "hf_disk_shapes", "load_pretrained",
           "save_pretrained"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj$")
_SHARED = re.compile(r"^model\.layers\.\d+\.mlp\.shared_experts\.")

# safetensors dtype tag -> (numpy dtype used to read it, bytes per element). BF16 has no numpy dtype: it is read as
# raw little-endian uint16 and widened to float32 exactly (a bf16 number is the high half of a float32).
_DTYPES = {"F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_LISTED = 20  # problems listed in one CheckpointError message


def _bias_f32(value):
    """An expert_bias as a float32 numpy array (no copy when it already is one)."""
    return np.asarray(value, dtype=EXPERT_BIAS_DTYPE)


def _is_ignored(key: str) -> bool:
    """Rotary `inv_freq` buffers (written by old transformers versions) carry no parameter."""
    return key.endswith("inv_freq")


# ---- layout conversion (SPEC §3.1, §3.2) ----------------------------------------------------------------------------
def to_hf_state_dict(config: Config, tree: dict) -> dict:
    """Our stacked layout -> the HF on-disk per-expert layout (SPEC §3.1).

    `tree` is any dict keyed like params (params, gradients, optimizer moments, or a subset of them). Each stacked
    `...experts.{gate_proj,up_proj,down_proj}` [E, a, b] becomes E keys `...experts.{e}.{name}.weight` whose values
    are views `tree[key][e]` (no copy); `...mlp.expert_bias` becomes float32 (HF's dtype for it, a copy only when it is
    not float32 already); every other key is passed through. The order of keys is kept.
    """
    E = config.num_experts
    out = {}
    for key, value in tree.items():
        m = _STACKED.match(key)
        if m is None:
            out[key] = _bias_f32(value) if is_expert_bias(key) else value
            continue
        if value.ndim != 3 or value.shape[0] != E:
            raise CheckpointError(f"{key}: expected a stacked expert tensor with {E} experts, "
                                  f"found shape {tuple(value.shape)}")
        for e in range(E):
            out[f"{m[1]}.{e}.{m[2]}.weight"] = value[e]
    return out


def from_hf_state_dict(config: Config, tree: dict) -> dict:
    """An HF-keyed tree -> our stacked layout. Accepts both HF layouts, even mixed across layers:

    - per-expert `...experts.{e}.{name}.weight` (on disk, SPEC §3.1): stacked into a new [E, …] array, allocated once
      and filled expert by expert (a copy is unavoidable here);
    - v5 fused `...experts.gate_up_proj` [E, 2·I_m, d] (SPEC §3.2): split into views `[:, :I_m]` (gate) and
      `[:, I_m:]` (up); v5 `...experts.down_proj` [E, d, I_m] already has our key and shape.

    `...mlp.expert_bias` becomes float32 (our dtype for it in every model dtype; an HF float64 model of transformers
    < 5.24 holds it in float64). Dropped on the way: rotary `inv_freq` buffers, the 0-width `shared_experts` tensors
    HF keeps when num_shared_experts = 0, and `lm_head.weight` when embeddings are tied (HF's state_dict() lists the
    tied head).
    """
    E, I = config.num_experts, config.moe_intermediate_size
    out: dict = {}
    groups: dict[str, dict[int, object]] = {}
    for key, value in tree.items():
        if _is_ignored(key):
            continue
        if config.num_shared_experts == 0 and _SHARED.match(key) and _size(value) == 0:
            continue
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        m = _PER_EXPERT.match(key)
        if m is not None:
            stacked_key = f"{m[1]}.{m[3]}"
            out.setdefault(stacked_key, None)  # keeps the position of the first expert in the output order
            groups.setdefault(stacked_key, {})[int(m[2])] = value
            continue
        m = _FUSED.match(key)
        if m is not None:
            if value.ndim != 3 or tuple(value.shape[:2]) != (E, 2 * I):
                raise CheckpointError(f"{key}: expected shape {(E, 2 * I, config.hidden_size)}, "
                                      f"found {tuple(value.shape)}")
            out[m[1] + ".gate_proj"] = value[:, :I]
            out[m[1] + ".up_proj"] = value[:, I:]
            continue
        out[key] = _bias_f32(value) if is_expert_bias(key) else value
    for stacked_key, experts in groups.items():
        prefix, name = stacked_key.rsplit(".", 1)
        missing = [e for e in range(E) if e not in experts]
        if missing:
            shape = tuple(next(iter(experts.values())).shape)
            raise CheckpointError(f"missing key {prefix}.{missing[0]}.{name}.weight: expected shape {shape} (as the "
                                  f"other experts), found none ({len(missing)} of {E} experts absent)")
        extra = sorted(e for e in experts if e >= E)
        if extra:
            raise CheckpointError(f"unexpected key {prefix}.{extra[0]}.{name}.weight: the config has "
                                  f"num_experts={E}")
        first = np.asarray(experts[0])
        stacked = np.empty((E, *first.shape), dtype=first.dtype)
        for e in range(E):
            value = experts[e]
            if tuple(value.shape) != first.shape:
                raise CheckpointError(f"{prefix}.{e}.{name}.weight: expected shape {first.shape} "
                                      f"(as expert 0), found {tuple(value.shape)}")
            stacked[e] = value
        out[stacked_key] = stacked
    return out


def _size(value) -> int:
    return int(math.prod(value.shape))


def hf_disk_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every key of an HF on-disk checkpoint for `config` with its shape (SPEC §3.1), in params order. Tied models
    have no lm_head.weight; models without shared experts have none of the 0-width shared-expert tensors (both are
    optional on load and handled by `save_pretrained`)."""
    out = {}
    for key, shape in param_shapes(config).items():
        m = _STACKED.match(key)
        if m is None:
            out[key] = shape
        else:
            for e in range(shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.weight"] = shape[1:]
    return out


# ---- reading safetensors ----------------------------------------------------------------------------------------------
class _Entry(NamedTuple):
    """One tensor of a safetensors file, from its header."""
    key: str
    file: str
    dtype: str  # safetensors tag: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def _read_header(filename: str) -> dict[str, _Entry]:
    """Parse a safetensors header: 8-byte little-endian length N, then N bytes of JSON mapping each key to
    {dtype, shape, data_offsets}, offsets relative to the end of the header. Checked against the file size."""
    size = os.path.getsize(filename)
    with open(filename, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{filename}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{filename}: header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{filename}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{filename}: header is not a JSON object")
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{filename}: malformed header entry for {key}: {info!r}") from None
        if dtype in _DTYPES and end - begin != math.prod(shape) * _DTYPES[dtype][1]:
            raise CheckpointError(f"{filename}: {key} has shape {shape} and dtype {dtype} but {end - begin} bytes")
        if not 0 <= begin <= end or 8 + n + end > size:
            raise CheckpointError(f"{filename}: {key} data_offsets {[begin, end]} lie outside the file")
        entries[key] = _Entry(key, filename, dtype, shape, 8 + n + begin)
    return entries


def _read(entry: _Entry, handle, raw, dtype, expert: int | None = None, rows: tuple[int, int] | None = None):
    """Read `tensor[expert][rows[0]:rows[1]]` (or the whole tensor) and cast it to `dtype`.

    F64/F32/F16 go through the safetensors numpy API (`handle`, a `safe_open(..., framework="np")`); BF16 is read
    from the raw file object `raw`: the slice is one contiguous byte range, widened by putting each uint16 in the high
    half of a uint32 and viewing it as float32 (exact)."""
    if entry.dtype != "BF16":
        if expert is None:
            arr = handle.get_tensor(entry.key)
        elif rows is None:
            arr = handle.get_slice(entry.key)[expert]
        else:
            arr = handle.get_slice(entry.key)[expert, rows[0]:rows[1]]
        return np.asarray(arr).astype(dtype, copy=False)
    shape = entry.shape
    start, count, out_shape = 0, math.prod(shape), shape
    if expert is not None:
        inner = shape[1:]
        start, count, out_shape = expert * math.prod(inner), math.prod(inner), inner
        if rows is not None:
            row = math.prod(inner[1:])
            start += rows[0] * row
            count = (rows[1] - rows[0]) * row
            out_shape = (rows[1] - rows[0], *inner[1:])
    raw.seek(entry.offset + 2 * start)
    buf = raw.read(2 * count)
    if len(buf) != 2 * count:
        raise CheckpointError(f"{entry.file}: {entry.key} is truncated")
    wide = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
    return wide.view(np.float32).reshape(out_shape).astype(dtype, copy=False)


def _weight_files(path: str) -> tuple[list[str], dict | None]:
    """The safetensors files of a checkpoint directory: `model.safetensors`, else the shards named by
    `model.safetensors.index.json` (with its weight_map). Pickle-based files are never read."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
    if os.path.isfile(single):
        return [single], None
    if not os.path.isfile(index):
        pickles = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if
                   os.path.exists(os.path.join(path, f))]
        why = f"; found {pickles[0]}, but pickle-based weights are never loaded" if pickles else ""
        raise CheckpointError(f"missing file: {path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}{why}")
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must map keys to shard file names")
    files = []
    for key, name in weight_map.items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index}: key {key} maps to {name!r}, which is not a file name in {path}")
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"missing file: shard {name} (listed in {INDEX_NAME} for key {key}) "
                                  f"is not in {path}")
        if full not in files:
            files.append(full)
    return files, weight_map


def _plan(config: Config, found: dict[str, _Entry]) -> list[tuple]:
    """Check the keys, shapes and dtypes of a checkpoint against `config` and list the reads that build params.

    A read is (entry, param_key, expert, rows, dest_expert): params[param_key][dest_expert] (or the whole array when
    dest_expert is None) = entry's tensor[expert][rows]. Raises one CheckpointError listing every problem."""
    reads: list[tuple] = []
    E, I, d = config.num_experts, config.moe_intermediate_size, config.hidden_size
    shapes = param_shapes(config)
    expected: dict[str, tuple] = {}  # disk key -> (shape, reads that consume it)
    optional: dict[str, tuple] = {}  # keys that may be absent
    for key, shape in shapes.items():
        m = _STACKED.match(key)
        if m is None:
            expected[key] = (shape, [(key, None, None, None)])
        elif m[1] + ".gate_up_proj" in found:  # v5 fused layout (SPEC §3.2)
            if m[2] == "gate_proj":
                expected[m[1] + ".gate_up_proj"] = ((E, 2 * I, d), [
                    (m[1] + ".gate_proj", e, (0, I), e) for e in range(E)] + [
                    (m[1] + ".up_proj", e, (I, 2 * I), e) for e in range(E)])
            elif m[2] == "down_proj":  # v5 keeps our key and shape [E, d, I_m]
                expected[key] = (shape, [(key, None, None, None)])
        else:
            for e in range(E):
                expected[f"{m[1]}.{e}.{m[2]}.weight"] = (shape[1:], [(key, None, None, e)])
    if config.num_shared_experts == 0:  # HF keeps 0-width shared-expert Linears (written by its save_pretrained)
        for l in range(config.num_dense_layers, config.num_hidden_layers):
            s = layer_prefix(l) + "mlp.shared_experts."
            optional.update({s + "gate_proj.weight": ((0, d), []), s + "up_proj.weight": ((0, d), []),
                             s + "down_proj.weight": ((d, 0), [])})
    if config.tie_word_embeddings:  # may be present; must then equal the embedding (checked after reading)
        optional["lm_head.weight"] = ((config.vocab_size, d), [])

    wrong, missing, unexpected = [], [], []  # listed in this order: the most telling problems first
    for key, (shape, _) in expected.items():
        if key not in found:
            missing.append(f"missing key {key}: expected shape {shape}, found none")
    for key, entry in found.items():
        if _is_ignored(key):
            continue
        want = expected.get(key) or optional.get(key)
        if want is None:
            unexpected.append(f"unexpected key {key}: expected none (not in this config), found shape {entry.shape}")
        elif entry.shape != want[0]:
            wrong.append(f"{key}: expected shape {want[0]}, found {entry.shape}")
        elif entry.dtype not in _DTYPES:
            wrong.append(f"{key}: unsupported dtype {entry.dtype} (supported: {', '.join(_DTYPES)}), "
                         f"shape {entry.shape}")
        else:
            reads += [(entry, *r) for r in want[1]]
    problems = wrong + missing + unexpected
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError("checkpoint does not match its config (num_hidden_layers="
                              f"{config.num_hidden_layers}, hidden_size={d}, num_experts={E}, "
                              f"moe_intermediate_size={I}, vocab_size={config.vocab_size}):\n  "
                              + "\n  ".join(problems[:_MAX_LISTED]) + more)
    return reads


def load_pretrained(path, dtype=np.float32) -> tuple[Config, dict[str, np.ndarray]]:
    """Load an HF AFMoE checkpoint directory: config.json (`Config.from_hf`; `auto_map` ignored) plus
    `model.safetensors` or a sharded set named by `model.safetensors.index.json`.

    Weights may be F64, F32, F16 or BF16 (widened exactly), in the per-expert on-disk layout (SPEC §3.1) or the v5
    fused layout (§3.2); each is cast to `dtype` as it is read, except `...mlp.expert_bias`, which is read as float32
    whatever `dtype` (docs/decisions.md #18; an F64 bias is rounded to float32). Each param array is allocated once
    and filled tensor by tensor (stacked experts expert by expert), reading one file at a time, so the full weights
    are never held twice. Validation is strict (CheckpointError names the key with expected and found shapes): every key of
    `param_shapes(config)` must be present with its shape, no other key may be (rotary `inv_freq` buffers are
    ignored; a tied `lm_head.weight` may be present if it equals the embedding).
    """
    path = os.fspath(path)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"load_pretrained: dtype must be a float dtype, got {dtype}")
    if not os.path.isdir(path):
        raise CheckpointError(f"missing file: checkpoint directory {path} does not exist")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise CheckpointError(f"missing file: {os.path.join(path, CONFIG_NAME)}")
    config = Config.from_hf(os.path.join(path, CONFIG_NAME))
    files, weight_map = _weight_files(path)

    found: dict[str, _Entry] = {}
    for filename in files:
        for key, entry in _read_header(filename).items():
            if key in found:
                raise CheckpointError(f"key {key} appears in both {found[key].file} and {filename}")
            found[key] = entry
    for key, name in (weight_map or {}).items():
        if key not in found or os.path.basename(found[key].file) != name:
            where = f"found in {os.path.basename(found[key].file)}" if key in found else "found in no shard"
            raise CheckpointError(f"missing key {key}: {INDEX_NAME} puts it in {name}, {where}")
    reads = _plan(config, found)

    shapes = param_shapes(config)
    params: dict[str, np.ndarray] = {}
    head = None
    for filename in files:
        mine = [r for r in reads if r[0].file == filename]
        tied_head = found.get("lm_head.weight") if config.tie_word_embeddings else None
        if not mine and not (tied_head and tied_head.file == filename):
            continue
        with safe_open(filename, framework="np") as handle, open(filename, "rb") as raw:
            for entry, key, expert, rows, dest in mine:
                value = _read(entry, handle, raw, param_dtype(key, dtype), expert, rows)
                if dest is None:
                    params[key] = value
                else:
                    if key not in params:
                        params[key] = np.empty(shapes[key], dtype=dtype)
                    params[key][dest] = value
            if tied_head is not None and tied_head.file == filename and tied_head.dtype in _DTYPES:
                head = _read(tied_head, handle, raw, dtype)
    if head is not None and not np.array_equal(head, params["model.embed_tokens.weight"]):
        raise CheckpointError("lm_head.weight: tie_word_embeddings=True, but the checkpoint's lm_head.weight "
                              f"{head.shape} differs from model.embed_tokens.weight")
    return config, {key: params[key] for key in shapes}


# ---- writing -----------------------------------------------------------------------------------------------------
def _check_params(config: Config, params: dict) -> None:
    shapes = param_shapes(config)
    problems = [f"missing key {k}: expected shape {s}, found none" for k, s in shapes.items() if k not in params]
    for key, value in params.items():
        if key not in shapes:
            problems.append(f"unexpected key {key}: expected none (not in this config), "
                            f"found shape {tuple(np.shape(value))}")
        elif tuple(np.shape(value)) != shapes[key]:
            problems.append(f"{key}: expected shape {shapes[key]}, found {tuple(np.shape(value))}")
        elif np.asarray(value).dtype not in (np.float16, np.float32, np.float64):
            problems.append(f"{key}: unsupported dtype {np.asarray(value).dtype} (float16/32/64 only)")
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError("params do not match the config:\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more)


def _atomic_write(directory: str, name: str, write) -> None:
    """Write `directory/name` atomically (files.atomic_path): `write(tmp_path)` into a temp file in the same
    directory, which is then fsynced and renamed over the target. A crash leaves the old file or the new one."""
    with atomic_path(os.path.join(directory, name)) as tmp:
        write(tmp)
        os.chmod(tmp, 0o644)


def save_pretrained(path, config: Config, params: dict) -> None:
    """Write a checkpoint directory that `AfmoeForCausalLM.from_pretrained` loads with no missing or unexpected key:
    config.json (`config.to_hf()` plus the weights' dtype) and model.safetensors in the per-expert on-disk layout of
    SPEC §3.1 (the layout transformers' own save_pretrained writes), each written atomically.

    Like transformers: a tied model has no lm_head.weight in the file, and a model with num_shared_experts = 0 gets
    the 0-width `shared_experts.{gate,up,down}_proj.weight` tensors ([0, d], [0, d], [d, 0]) that HF's module tree
    still holds. Params are written in their own dtype (float16/32/64), except `...mlp.expert_bias`, which is written
    as float32 whatever the model's dtype (docs/decisions.md #18; a float64 bias is rounded); expert matrices are
    views, not copies.
    """
    path = os.fspath(path)
    _check_params(config, params)
    os.makedirs(path, exist_ok=True)
    embed = np.asarray(params["model.embed_tokens.weight"])
    tensors = {}
    for key, value in to_hf_state_dict(config, params).items():
        tensors[key] = np.ascontiguousarray(value)
        if config.num_shared_experts == 0 and key.endswith("mlp.expert_bias"):
            s = key[: -len("expert_bias")] + "shared_experts."
            d = config.hidden_size
            tensors[s + "gate_proj.weight"] = np.zeros((0, d), embed.dtype)
            tensors[s + "up_proj.weight"] = np.zeros((0, d), embed.dtype)
            tensors[s + "down_proj.weight"] = np.zeros((d, 0), embed.dtype)
    _atomic_write(path, WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    hf = config.to_hf()
    hf["dtype"] = embed.dtype.name  # "float32", "float64" or "float16": what from_pretrained(dtype="auto") uses

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, CONFIG_NAME, write_json)

