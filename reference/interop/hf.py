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
(config.json + safetensors) with strict validation against `param_shapes(config)`. `read_pretrained_spans` reads only
flat ranges of our keys (a rank's spans, issue 19), by exact byte ranges, through the same checks (`_locate`: where
each of our keys lives); `HFCheckpointWriter` / `save_pretrained_streaming` write a checkpoint one of our keys at a
time, and save_pretrained is written by it. The file-level work (headers, byte-range reads, the header-first writer)
is in hf_files.py.

`model.layers.{l}.mlp.expert_bias` is float32 whatever the model's dtype (docs/decisions.md #18), as transformers keeps
it (`_keep_in_fp32_modules_strict`, 5.24 on) and the released checkpoints store it: every function here writes and
reads it as float32, also for float16 and float64 models (a bias held in float64 is rounded to float32).

Security: weights are read only from safetensors files (never a pickle), and `auto_map` (remote code) in
config.json is ignored by `Config.from_hf`.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import operator
import os
import re
from typing import NamedTuple

import numpy as np

from ..files import CheckpointError, CloseOrAbort, atomic_path, open_new
from ..model.config import Config
from ..model.params import EXPERT_BIAS_DTYPE, is_expert_bias, layer_prefix, param_dtype, param_shapes
from .hf_files import DTYPES, INDEX_NAME, WEIGHTS_NAME, WRITE_TAGS, Entry, SafetensorsWriter, read_elements, \
    read_header, weight_files

__all__ = ["CheckpointError", "to_hf_state_dict", "from_hf_state_dict", "hf_disk_shapes", "load_pretrained",
           "read_pretrained_spans", "save_pretrained", "save_pretrained_streaming", "HFCheckpointWriter"]

CONFIG_NAME = "config.json"

_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj$")
_SHARED = re.compile(r"^model\.layers\.\d+\.mlp\.shared_experts\.")
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


# ---- where each of our keys lives in a checkpoint ----------------------------------------------------------------
class Piece(NamedTuple):
    """Our key's flat (C-order) elements [start, start + count) are `entry`'s flat elements [first, first + count).
    Every layout hf.py reads maps our keys to such contiguous runs: a whole tensor (one piece), one expert's matrix of
    the per-expert layout (one piece per expert), or one expert's gate or up rows of a fused gate_up_proj [E, 2·I, d]
    (expert e's gate rows are its elements [2e·I·d, (2e+1)·I·d), its up rows the next I·d)."""
    start: int
    count: int
    entry: Entry
    first: int


def _locate(config: Config, found: dict[str, Entry]) -> tuple[dict[str, list[Piece]], Entry | None]:
    """Check the keys, shapes and dtypes of a checkpoint's tensors `found` against `config` and say where each of our
    keys lives: {our key: its pieces, by start, covering [0, size)}, and the tied `lm_head.weight` entry when a tied
    model's checkpoint has one (it must then equal the embedding). Raises one CheckpointError listing every problem.
    load_pretrained and read_pretrained_spans both read through this one plan."""
    E, I, d = config.num_experts, config.moe_intermediate_size, config.hidden_size
    shapes = param_shapes(config)
    expected: dict[str, tuple] = {}  # disk key -> (shape, [(our key, start, count, first)] it supplies)
    optional: dict[str, tuple] = {}  # keys that may be absent
    for key, shape in shapes.items():
        size = math.prod(shape)
        m = _STACKED.match(key)
        if m is None:
            expected[key] = (shape, [(key, 0, size, 0)])
        elif m[1] + ".gate_up_proj" in found:  # v5 fused layout (SPEC §3.2)
            block = I * d  # one expert's gate (or up) rows
            if m[2] == "gate_proj":
                expected[m[1] + ".gate_up_proj"] = ((E, 2 * I, d), [
                    (m[1] + ".gate_proj", e * block, block, 2 * e * block) for e in range(E)] + [
                    (m[1] + ".up_proj", e * block, block, (2 * e + 1) * block) for e in range(E)])
            elif m[2] == "down_proj":  # v5 keeps our key and shape [E, d, I_m]
                expected[key] = (shape, [(key, 0, size, 0)])
        else:
            block = math.prod(shape[1:])
            for e in range(E):
                expected[f"{m[1]}.{e}.{m[2]}.weight"] = (shape[1:], [(key, e * block, block, 0)])
    if config.num_shared_experts == 0:  # HF keeps 0-width shared-expert Linears (written by its save_pretrained)
        for l in range(config.num_dense_layers, config.num_hidden_layers):
            s = layer_prefix(l) + "mlp.shared_experts."
            optional.update({s + "gate_proj.weight": ((0, d), []), s + "up_proj.weight": ((0, d), []),
                             s + "down_proj.weight": ((d, 0), [])})
    if config.tie_word_embeddings:  # may be present; must then equal the embedding (checked after reading)
        optional["lm_head.weight"] = ((config.vocab_size, d), [])

    pieces: dict[str, list[Piece]] = {key: [] for key in shapes}
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
        elif entry.dtype not in DTYPES:
            wrong.append(f"{key}: unsupported dtype {entry.dtype} (supported: {', '.join(DTYPES)}), "
                         f"shape {entry.shape}")
        else:
            for ours, start, count, first in want[1]:
                pieces[ours].append(Piece(start, count, entry, first))
    problems = wrong + missing + unexpected
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError("checkpoint does not match its config (num_hidden_layers="
                              f"{config.num_hidden_layers}, hidden_size={d}, num_experts={E}, "
                              f"moe_intermediate_size={I}, vocab_size={config.vocab_size}):\n  "
                              + "\n  ".join(problems[:_MAX_LISTED]) + more)
    for runs in pieces.values():
        runs.sort(key=lambda piece: piece.start)
    return pieces, (found.get("lm_head.weight") if config.tie_word_embeddings else None)


def _open_checkpoint(path, config: Config | None, wanted, caller: str):
    """config.json and every safetensors header of checkpoint directory `path`, checked (`_locate`). `config`, when
    given, must describe the same model as config.json (equal `to_hf()`; the training recipe is not in config.json)
    and is the one returned. `wanted` ({our key: [(lo, hi)]}, or None for every key whole) is checked before
    any weight file is opened. Returns (config, wanted, pieces, tied head entry)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"missing file: checkpoint directory {path} does not exist")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise CheckpointError(f"missing file: {os.path.join(path, CONFIG_NAME)}")
    on_disk = Config.from_hf(os.path.join(path, CONFIG_NAME))
    if config is None:
        config = on_disk
    elif on_disk.to_hf() != config.to_hf():
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)}: differs from the config given to {caller}")
    shapes = param_shapes(config)
    wanted = {k: [(0, math.prod(s))] for k, s in shapes.items()} if wanted is None else _check_wanted(
        shapes, wanted, caller)
    files, weight_map = weight_files(path)
    found: dict[str, Entry] = {}
    for filename in files:
        for key, entry in read_header(filename)[0].items():
            if key in found:
                raise CheckpointError(f"key {key} appears in both {found[key].file} and {filename}")
            found[key] = entry
    for key, name in (weight_map or {}).items():
        if key not in found or os.path.basename(found[key].file) != name:
            where = f"found in {os.path.basename(found[key].file)}" if key in found else "found in no shard"
            raise CheckpointError(f"missing key {key}: {INDEX_NAME} puts it in {name}, {where}")
    pieces, tied = _locate(config, found)
    return config, wanted, pieces, tied


def _check_wanted(shapes: dict, wanted: dict, caller: str) -> dict[str, list[tuple[int, int]]]:
    """`wanted` as {key: [(lo, hi)] of Python ints}; an unknown key or a span outside its key is a one-line
    ValueError."""
    if not isinstance(wanted, dict):
        raise ValueError(f"{caller}: wanted must be a dict {{key: [(lo, hi), ...]}}, got {type(wanted).__name__}")
    out = {}
    for key, spans in wanted.items():
        if key not in shapes:
            raise ValueError(f"{caller}: unknown key {key!r} (not a parameter of this config)")
        size, out[key] = math.prod(shapes[key]), []
        for span in spans:
            try:
                lo, hi = (operator.index(v) for v in span)
            except (TypeError, ValueError):
                raise ValueError(f"{caller}: {key}: a span is a pair of ints (lo, hi), got {span!r}") from None
            if not 0 <= lo <= hi <= size:
                raise ValueError(f"{caller}: {key}: span [{lo}, {hi}) lies outside its {size} elements "
                                 f"(shape {shapes[key]})")
            out[key].append((lo, hi))
    return out


def _read_spans(path, wanted, dtype, config, caller: str):
    """The one reader behind load_pretrained and read_pretrained_spans: (config, {key: [1-D array per span]},
    tensor bytes read). The reads are sorted by file and offset and done one file at a time."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"{caller}: dtype must be a float dtype, got {dtype}")
    config, wanted, pieces, tied = _open_checkpoint(path, config, wanted, caller)
    out = {key: [np.empty(hi - lo, dtype=param_dtype(key, dtype)) for lo, hi in spans] for key, spans in
           wanted.items()}
    reads: list[tuple[Entry, int, np.ndarray]] = []  # (entry, its first element, destination)
    for key, spans in wanted.items():
        runs = pieces[key]
        starts = [piece.start for piece in runs]
        for (lo, hi), dest in zip(spans, out[key]):
            for piece in runs[max(0, bisect.bisect_right(starts, lo) - 1):]:
                if piece.start >= hi:
                    break
                a, b = max(lo, piece.start), min(hi, piece.start + piece.count)
                if a < b:
                    reads.append((piece.entry, piece.first + a - piece.start, dest[a - lo:b - lo]))
    heads = []  # a tied lm_head present in the file must equal the embedding: compared on the elements read
    embed = "model.embed_tokens.weight"
    if tied is not None and embed in wanted:
        for (lo, hi), dest in zip(wanted[embed], out[embed]):
            heads.append((np.empty(hi - lo, dtype=dtype), dest))
            reads.append((tied, lo, heads[-1][0]))
    reads.sort(key=lambda r: (r[0].file, r[0].offset + r[1] * DTYPES[r[0].dtype][1]))
    bytes_read = 0
    for filename, group in itertools.groupby(reads, key=lambda r: r[0].file):
        with open(filename, "rb", buffering=0) as raw:
            for entry, first, dest in group:
                bytes_read += read_elements(raw, entry, first, dest)
    for head_values, embed_values in heads:
        if not np.array_equal(head_values, embed_values):
            raise CheckpointError("lm_head.weight: tie_word_embeddings=True, but the checkpoint's lm_head.weight "
                                  f"{tied.shape} differs from model.embed_tokens.weight")
    return config, out, bytes_read


# ---- reading -----------------------------------------------------------------------------------------------------
def read_pretrained_spans(path, wanted: dict, dtype=np.float32, config: Config | None = None
                          ) -> tuple[Config, dict[str, list[np.ndarray]], int]:
    """Read only the spans `wanted` = {our key: [(lo, hi), ...]} of an HF checkpoint directory: (config,
    {key: [1-D array per span, in order]}, bytes_read).

    A span is a flat range [lo, hi) of our WHOLE array (`param_shapes`: stacked experts [E, I, d] / [E, d, I])
    flattened in C order; array i of a key = whole.ravel()[lo_i:hi_i] of what load_pretrained gives, in the same
    dtype (`dtype`, expert_bias float32). The checkpoint is checked exactly as load_pretrained checks it (config.json,
    every header, every key and shape, the index) before any weight is read; `config`, when given (the config a job
    already agreed on), must describe the same model as config.json (equal `to_hf()`) and is the config returned.
    Then only the elements a span covers are read, each as one exact byte range of a file (seek + read): in every
    layout read here (whole tensors, per-expert matrices, the fused gate_up_proj's per-expert gate and up rows) a run
    of our flat elements is a contiguous run of the file's, so nothing outside the spans is read.
    bytes_read = Σ over spans of (hi − lo) × the file's bytes per element (headers, config.json and the index not
    counted), plus the same again for the embedding's spans when a tied model's file also holds lm_head.weight (read
    to check it equals the embedding, on these elements). An unknown key or a span outside its key is a one-line
    ValueError."""
    return _read_spans(path, wanted, dtype, config, "read_pretrained_spans")


def load_pretrained(path, dtype=np.float32) -> tuple[Config, dict[str, np.ndarray]]:
    """Load an HF AFMoE checkpoint directory: config.json (`Config.from_hf`; `auto_map` ignored) plus
    `model.safetensors` or a sharded set named by `model.safetensors.index.json`.

    Weights may be F64, F32, F16 or BF16 (widened exactly), in the per-expert on-disk layout (SPEC §3.1) or the v5
    fused layout (§3.2); each is cast to `dtype` as it is read, except `...mlp.expert_bias`, which is read as float32
    whatever `dtype` (docs/decisions.md #18; an F64 bias is rounded to float32). Each param array is allocated once
    and filled piece by piece (stacked experts expert by expert, in chunks of at most hf_files.CHUNK_BYTES), one file
    at a time, so the full weights are never held twice. Validation is strict (CheckpointError names the key with
    expected and found shapes): every key of `param_shapes(config)` must be present with its shape, no other key may
    be (rotary `inv_freq` buffers are ignored; a tied `lm_head.weight` may be present if it equals the embedding).
    This is read_pretrained_spans with every key's whole span.
    """
    config, spans, _ = _read_spans(path, None, dtype, None, "load_pretrained")
    return config, {key: spans[key][0].reshape(shape) for key, shape in param_shapes(config).items()}


# ---- writing -----------------------------------------------------------------------------------------------------
class HFCheckpointWriter(CloseOrAbort):
    """Write an HF checkpoint directory one of our keys at a time: `write(key, whole array)` for every key of
    `param_shapes(config)`, in any order, then `close()` (or use it as a context manager).

    Every tensor's name, dtype and shape is known from (config, dtype) before any weight arrives, so model.safetensors
    gets its header first (hf_files.SafetensorsWriter) and each key's bytes as it comes: the caller holds one whole key
    at a time. A stacked expert key is written as its E per-expert matrices (SPEC §3.1). The files are what
    save_pretrained writes, byte for byte: `dtype` is the model's dtype (float16/32/64; each array is cast to it as it
    is written), or a dict giving each of our keys its own dtype; `...mlp.expert_bias` is F32 whatever the dtype
    (docs/decisions.md #18); a tied model has no lm_head.weight; a model with num_shared_experts = 0 gets the 0-width
    `shared_experts.{gate,up,down}_proj.weight` tensors HF's module tree holds. model.safetensors is written to a
    temporary file, fsynced and renamed by `close()`, then config.json (`config.to_hf()` plus the embedding's dtype)
    likewise; an exception in the `with` block, or `abort()`, leaves the directory's files as they were."""

    def __init__(self, path, config: Config, dtype=np.float32):
        self.path, self.config = os.fspath(path), config
        self._shapes = param_shapes(config)
        if isinstance(dtype, dict) and not set(self._shapes) <= set(dtype):
            raise ValueError(f"HFCheckpointWriter: dtype gives no dtype for {min(set(self._shapes) - set(dtype))}")
        self._dtypes = {k: param_dtype(k, dtype[k] if isinstance(dtype, dict) else dtype) for k in self._shapes}
        for key, dt in self._dtypes.items():
            if dt not in WRITE_TAGS:
                raise ValueError(f"HFCheckpointWriter: {key}: dtype must be float16, float32 or float64, got {dt}")
        self.model_dtype = self._dtypes["model.embed_tokens.weight"]
        d, model_tag = config.hidden_size, WRITE_TAGS[self.model_dtype]
        tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        for key, shape in self._shapes.items():
            tag = WRITE_TAGS[self._dtypes[key]]
            m = _STACKED.match(key)
            if m is None:
                tensors[key] = (tag, shape)
            else:
                tensors.update({f"{m[1]}.{e}.{m[2]}.weight": (tag, shape[1:]) for e in range(shape[0])})
            if config.num_shared_experts == 0 and is_expert_bias(key):
                s = key[: -len("expert_bias")] + "shared_experts."
                tensors.update({s + "gate_proj.weight": (model_tag, (0, d)), s + "up_proj.weight": (model_tag, (0, d)),
                                s + "down_proj.weight": (model_tag, (d, 0))})
        os.makedirs(self.path, exist_ok=True)
        self._file = SafetensorsWriter(os.path.join(self.path, WEIGHTS_NAME), tensors, {"format": "pt"})
        self._written: set[str] = set()

    def write(self, key: str, value) -> None:
        """Write our key `key` (its whole array, shape `param_shapes(config)[key]`), cast to its dtype."""
        value = np.asarray(value)
        if key not in self._shapes:
            raise CheckpointError(f"unexpected key {key}: expected none (not in this config), found shape "
                                  f"{value.shape}")
        if value.shape != self._shapes[key]:
            raise CheckpointError(f"{key}: expected shape {self._shapes[key]}, found {value.shape}")
        if value.dtype.kind != "f":
            raise CheckpointError(f"{key}: unsupported dtype {value.dtype} (float16/32/64 only)")
        if key in self._written:
            raise CheckpointError(f"{key}: written twice")
        m = _STACKED.match(key)
        if m is None:
            self._file.write(key, value)
        else:
            for e in range(value.shape[0]):
                self._file.write(f"{m[1]}.{e}.{m[2]}.weight", value[e])
        self._written.add(key)

    def close(self) -> None:
        """Check every key was written, then put model.safetensors and config.json in place (each atomically)."""
        missing = [k for k in self._shapes if k not in self._written]
        if missing:
            self.abort()
            raise CheckpointError(f"missing key {missing[0]}: expected shape {self._shapes[missing[0]]}, never "
                                  f"written ({len(missing)} of {len(self._shapes)} keys missing)")
        self._file.close()
        hf = self.config.to_hf()
        hf["dtype"] = self.model_dtype.name  # float32, float64 or float16: what from_pretrained(dtype="auto") uses

        def write_json(tmp):
            with open_new(tmp, "w", encoding="utf-8") as f:
                json.dump(hf, f, indent=2, sort_keys=True)
                f.write("\n")

        _atomic_write(self.path, CONFIG_NAME, write_json)

    def abort(self) -> None:
        """Remove the temporary weights file; the directory's files are left as they were."""
        self._file.abort()


def save_pretrained_streaming(path, config: Config, key_values, dtype=np.float32) -> None:
    """Write an HF checkpoint directory from an iterator of (our key, whole array), one key held at a time
    (HFCheckpointWriter: every key of `param_shapes(config)` exactly once, in any order; `dtype` as there)."""
    with HFCheckpointWriter(path, config, dtype) as writer:
        for key, value in key_values:
            writer.write(key, value)


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
    SPEC §3.1 (the layout transformers' own save_pretrained writes), each written atomically. The params are checked
    first (nothing is written when they do not match the config), then written by HFCheckpointWriter, the one writer.

    Like transformers: a tied model has no lm_head.weight in the file, and a model with num_shared_experts = 0 gets
    the 0-width `shared_experts.{gate,up,down}_proj.weight` tensors ([0, d], [0, d], [d, 0]) that HF's module tree
    still holds. Params are written in their own dtype (float16/32/64), except `...mlp.expert_bias`, which is written
    as float32 whatever the model's dtype (docs/decisions.md #18; a float64 bias is rounded).
    """
    _check_params(config, params)
    save_pretrained_streaming(path, config, params.items(), {k: np.asarray(v).dtype for k, v in params.items()})
