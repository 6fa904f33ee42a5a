"""The run file of `trinity train`: a TOML file naming the model, data, recipe, checkpoints and logging.

Every key is checked before any work starts; an unknown key or a bad value raises RunConfigError naming the
section and key, always in one line: "[optimizer] muon_lr = -1: must be a non-negative number" (a recipe value the
Config rejects is named by its run-file key, not its Config field), and a file that cannot be used at all (missing,
a directory, unreadable, not UTF-8, not TOML) names the file. What needs the built model is checked by
`RunConfig.build_config` (`check_against`: [data] seq_len against max_position_embeddings), and the output paths by
`check_output_paths` (the trainer calls it before any work). Relative paths are taken relative to the run file's
folder. Example (configs/tiny-synthetic.toml):

    [model]                      # exactly one of preset / config / init_from
    preset = "tiny"              # a Config preset; or config = "config.json"; or init_from = "hf_checkpoint_dir"
    dtype = "float32"            # float32 | float64
    seed = 0                     # init seed (ignored with init_from)
    [model.overrides]            # any Config field, e.g. sliding_window = 16
    [data]
    path = "tokens.bin"          # flat uint32 tokens, documents separated by eos_id; or a prepared dataset
                                 # directory (`trinity data prepare`), whose meta.json gives eos_id
    eos_id = 0                   # required for a flat file; must agree with meta.json for a directory
    seq_len = 64
    micro_batch_size = 8
    seed = 0
    loader = "sequential"        # sequential packing | "rsdb" (random sequential document buffer, SPEC §10)
    rsdb_buffer = 1024           # RSDB user-specified size in documents (internal size 2x); only with "rsdb"
    # A phase mix instead of one path (SPEC §10): sources in order, weights per phase.
    #   [[data.sources]]
    #   path = "web"             # file or prepared directory
    #   weight = 3               # a fixed weight, when there is no `phases`
    #   [[data.sources]]
    #   path = "code"
    #   [data] phases = [[0, [0.7, 0.3]], [1_000_000, [0.2, 0.8]]]   # [start tokens_seen, weights]
    [train]
    steps = 300
    sequences_per_step = 16      # a multiple of micro_batch_size: gradient accumulation over the rest
    batch_schedule = [[1_000_000, 32]]   # [tokens_seen threshold, sequences_per_step] pairs
    recompute = false
    backend = "reference"        # reference | numba | cupy: the op table (trinity.accel.get_backend)
    precision = "full"           # or "bf16": float32 master weights, bf16 compute (reference/model/precision.py)
    on_nonfinite = "stop"        # a non-finite loss or gradient norm stops the run before the update; or "skip"
    max_skipped_steps = 10       # with "skip": the run stops when more steps than this were skipped
    [optimizer]   muon_lr, adamw_lr, muon_momentum, … (Config fields, SPEC §9)
    [schedule]    warmup_steps, lr_schedule, decay_start_fraction, lr_floor_ratio
    [balancing]   method = "smebu" | "sign" | "none", sign_update_rate, smebu_lambda, smebu_beta, smebu_kappa
    [loss]        z_loss_coeff, balance_loss_coeff, intra_document_mask
    [checkpoint]  dir, every (steps), keep_last, format = "sharded" (under a [parallel] layout: a file per rank and a
                  manifest; "single": one file written by rank 0), hf_export = "folder" (the final params as a
                  Hugging Face checkpoint, written at the end of the run)
    [logging]     metrics (JSONL path), progress (bool)
    [eval]                       # optional: held-out evaluation during training (run/eval_data.py)
    every = 50                   # after every 50th step and the last: an eval line in the metrics
    batches = 10                 # batches per evaluation (default 10); or tokens = 200_000 (rounded up to batches)
    sequences_per_batch = 16     # default: [train] sequences_per_step; a multiple of micro_batch_size
    path = "heldout"             # any prepared dataset or token file; default: each [data] source's held-out set
                                 # (`trinity data prepare --holdout`, the folder <source>/holdout)
    seed = 0                     # the eval set's document order (the same batches at every evaluation)
    [parallel]                   # optional: the layout (trinity.distributed.layout); `--mesh` overrides it
    dp_replicate = 1             # positive integers, default 1; the job has dp_replicate·dp_shard·cp ranks,
    dp_shard = 1                 # e.g. dp_shard = 2 and ep = 2 for `mpiexec -n 2 ...`
    cp = 1
    ep = 1                       # expert parallel: borrows its ranks from dp_shard·cp
    keep_gathered = "none"       # schedule options (trinity.distributed.options): keep_gathered, keep_gathered_gib,
                                 # reshard_after_forward, reduce_gradients, muon_owners, cp_exchange, gather_dtype,
                                 # reduce_dtype, async_reduce
    checksums = false            # a crc32 with every message, checked on receipt (trinity.distributed.checksums)
    watchdog_seconds = 600       # under mpiexec: a rank waiting this long in one collective ends the job
                                 # (trinity.distributed.watchdog; 0: off; default 600, off in a single process)

The layout's checks that need the job's world size or the built model (`Layout.check`) are the trainer's; the loader
refuses only what needs neither (a size that is not a positive integer).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field, fields

from trinity.accel import BACKENDS
from trinity.distributed.layout import DIMS as _LAYOUT_KEYS
from trinity.distributed.layout import Layout
from trinity.distributed.options import OPTION_NAMES, OptionError, ParallelOptions
from trinity.reference.model.precision import PRECISIONS, check_precision
from trinity.reference.model.config import PRESETS, Config, ConfigError

__all__ = ["RunConfig", "RunConfigError", "EvalSettings", "load_run_config", "check_output_paths"]


class RunConfigError(ValueError):
    """A run file that cannot be used; the message names the section and key (or the file, when the file itself
    cannot be read). The message is always one line: `trinity` prints it as `trinity train: error: <message>`."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


# Sections whose keys are Config fields (the recipe), with the run-file name → Config field where they differ.
_CONFIG_SECTIONS = {
    "optimizer": {f: f for f in ("muon_lr", "adamw_lr", "muon_momentum", "muon_nesterov", "muon_ns_coefficients",
                                 "muon_ns_steps", "muon_eps", "muon_lr_adjust", "router_optimizer", "matrix_optimizer",
                                 "weight_decay", "norm_weight_decay", "adamw_beta1", "adamw_beta2", "adamw_eps", "grad_clip_norm")},
    "schedule": {f: f for f in ("warmup_steps", "lr_schedule", "decay_start_fraction", "lr_floor_ratio")},
    "balancing": {"method": "load_balancing", "sign_update_rate": "sign_update_rate", "smebu_lambda": "smebu_lambda",
                  "smebu_beta": "smebu_beta", "smebu_kappa": "smebu_kappa"},
    "loss": {f: f for f in ("z_loss_coeff", "balance_loss_coeff", "intra_document_mask")},
}


@dataclass(frozen=True)
class EvalSettings:
    """The run file's [eval] section: evaluate after every `every` steps (and after the last) on `batches` batches
    of `sequences_per_batch` sequences of the eval set(s), the same batches every time."""
    every: int
    batches: int
    sequences_per_batch: int
    path: str | None = None  # None: each training source's held-out set (<source>/holdout)
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    path: str  # the run file
    model_source: tuple  # ("preset", name) | ("config", path) | ("init_from", path)
    dtype: str
    init_seed: int
    config_overrides: dict
    data_path: str | None  # a token file or prepared directory; None with data_sources
    eos_id: int | None  # None: from the prepared directory's meta.json
    seq_len: int
    micro_batch_size: int
    data_seed: int
    steps: int
    sequences_per_step: int
    batch_schedule: tuple
    recompute: bool
    backend: str
    precision: str
    checkpoint_dir: str
    checkpoint_every: int
    keep_last: int
    metrics_path: str
    progress: bool
    data_loader: str = "sequential"  # "sequential" | "rsdb"
    rsdb_buffer: int = 1024
    on_nonfinite: str = "stop"  # a step with a non-finite loss or gradient norm: "stop" the run | "skip" the step
    max_skipped_steps: int = 10  # with "skip": more skipped steps than this stop the run
    data_sources: tuple = ()  # paths of a phase mix ([[data.sources]]); data_path is None then
    data_phases: tuple = ()  # ((start_tokens, (w1, w2, ...)), ...) for data_sources
    layout: Layout = Layout()  # [parallel]; checked against the job and the model by the trainer (Layout.check)
    checkpoint_format: str = "sharded"  # under a layout: a file per rank + manifest | "single": one file by rank 0
    hf_export: str | None = None  # a folder: the final params as a Hugging Face checkpoint (save_pretrained)
    checksums: bool = False  # [parallel] checksums: every message checked by crc32 (trinity.distributed.checksums)
    # [parallel] watchdog_seconds: the longest wait in one collective under mpiexec before the job ends (0: off);
    # None: the default (WATCHDOG_DEFAULT under a launcher; never in a single process or on virtual ranks)
    watchdog_seconds: float | None = None
    evaluation: "EvalSettings | None" = None  # [eval]; None: no evaluation during training
    extra: dict = field(default_factory=dict)
    # Config field → (section, key, value as written) for every config_overrides entry, so that a value the Config
    # rejects is reported under the name the run file gave it ("[optimizer] muon_lr = -1").
    override_origins: dict = field(default_factory=dict)

    @property
    def eval_sequences(self) -> list[int]:
        """The evaluation's sequences per batch, when the run evaluates ([] otherwise): a batch size the layout
        must split like the training steps' (Layout.check)."""
        return [] if self.evaluation is None else [self.evaluation.sequences_per_batch]

    @property
    def batch_sizes(self) -> list[int]:
        """Every sequences-per-step value the run uses: the base value, then each batch_schedule value."""
        return [self.sequences_per_step, *(n for _, n in self.batch_schedule)]

    def build_config(self, base: Config) -> Config:
        """Apply the run's Config overrides (model.overrides and the recipe sections) to `base`, then
        `check_against` the result. A value the Config rejects is named by its section and key."""
        try:
            config = base.replace(**self.config_overrides)
        except (ConfigError, TypeError, ValueError) as e:
            raise self._config_error(e) from None
        self.check_against(config)
        return config

    def check_against(self, config: Config) -> None:
        """Check the run against the model it trains (the built Config): `[data] seq_len` must not exceed the
        model's `max_position_embeddings`. Raises RunConfigError naming the key. `build_config` calls it."""
        if self.seq_len > config.max_position_embeddings:
            raise RunConfigError(f"[data] seq_len = {self.seq_len}: exceeds max_position_embeddings "
                                 f"{config.max_position_embeddings} of the model")

    def _config_error(self, e: Exception) -> RunConfigError:
        """A Config validation error as a RunConfigError naming the run-file key that set the field."""
        return _config_error(e, self.override_origins, self.config_overrides,
                             f"[model] {self.model_source[0]} = {_show(self.model_source[1])}")


# ---- helpers ---------------------------------------------------------------------------------------------------
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(name) -> str:
    """A key as the user wrote it: bare keys as they are, anything else quoted (so that no key can spill a newline
    or hide in spaces)."""
    name = str(name)
    return name if _BARE_KEY.fullmatch(name) else repr(name)


def _keys(names) -> str:
    return ", ".join(_key(n) for n in sorted(names, key=str))


def _show(value, limit: int = 60) -> str:
    """repr(value), shortened to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _take(section: dict, name: str, key: str, kind, default=..., check=None, what=""):
    if key not in section:
        if default is ...:
            raise RunConfigError(f"[{name}] {key} is required")
        return default
    value = section.pop(key)
    ok_type = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok_type = float(value), True
    if not ok_type or (check is not None and not check(value)):
        raise RunConfigError(f"[{name}] {key} = {_show(value)}: must be {what or kind.__name__}")
    return value


def _no_leftovers(section: dict, name: str):
    if section:
        raise RunConfigError(f"[{name}] unknown key(s): {_keys(section)}")


def _field_kinds() -> dict[str, str]:
    """Config field → "int" | "float" | "bool" | "str" | "strings" (a tuple of str), from the annotations; None
    is never a value a TOML file can write, so `X | None` counts as X."""
    kinds = {}
    for f in fields(Config):
        parts = {p.strip() for p in str(f.type).split("|")} - {"None"}
        part = parts.pop() if len(parts) == 1 else ""
        kinds[f.name] = "strings" if part.startswith("tuple[str") else part
    return kinds


_FIELD_KINDS = _field_kinds()
_KIND_TEXT = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
              "strings": "a list of strings"}


def _field_value(where: str, name: str, value):
    """A run-file value for Config field `name`, type-checked against the field (integers are accepted for
    float fields, lists become tuples); `where` ("[optimizer] muon_lr") names it in the error."""
    kind = _FIELD_KINDS.get(name, "")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"int": isinstance(value, int) and not isinstance(value, bool), "float": number,
          "bool": isinstance(value, bool), "str": isinstance(value, str),
          "strings": isinstance(value, list) and all(isinstance(v, str) for v in value)}.get(kind, True)
    if not ok:
        raise RunConfigError(f"{where} = {_show(value)}: must be {_KIND_TEXT[kind]}")
    if kind == "float":
        return float(value)
    if kind == "strings":
        return tuple(value)
    return value


def _config_error(e: Exception, origins: dict, overrides: dict, base: str) -> RunConfigError:
    """Config's "field=value: constraint" message → "[section] key = value: constraint" for the run-file key that
    set the field; a constraint on a field the run did not set names the first set field the message mentions,
    else the model source `base`."""
    message = str(e)
    match = re.match(r"([a-z_0-9]+)\b", message)
    name = match.group(1) if match else None
    if name in origins:
        section, key, written = origins[name]
        prefix = f"{name}={overrides[name]!r}: "
        rest = message[len(prefix):] if message.startswith(prefix) else message
        return RunConfigError(f"[{section}] {key} = {_show(written)}: {rest}")
    for field_name, (section, key, written) in origins.items():
        if re.search(rf"\b{re.escape(field_name)}\b", message):
            return RunConfigError(f"[{section}] {key} = {_show(written)}: {message}")
    return RunConfigError(f"{base}: {message}")


def _read_run_file(path: str) -> dict:
    """The TOML document of the run file; every way the file itself can be unusable is one RunConfigError that
    names the file."""
    if os.path.isdir(path):
        raise RunConfigError(f"{path}: is a directory, not a run file")
    if not os.path.exists(path):
        raise RunConfigError(f"run file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RunConfigError(f"{path}: cannot read the run file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunConfigError(f"{path}: not a run file: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                             f"{e.start}); a run file is TOML") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RunConfigError(f"{path} is not valid TOML: {e}") from None


def load_run_config(path) -> RunConfig:
    """Parse and check a run file; nothing is loaded or created."""
    path = os.fspath(path)
    doc = _read_run_file(path)
    here = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(here, p))  # noqa: E731
    sections = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    known = {"model", "data", "train", "checkpoint", "logging", "parallel", "eval", *_CONFIG_SECTIONS}
    unknown = sorted(set(sections) - known)
    if unknown:
        raise RunConfigError(f"unknown section(s): {_keys(unknown)}; expected {sorted(known)}")
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise RunConfigError(f"[{name}] must be a table")

    model = sections.get("model", {})
    sources = [k for k in ("preset", "config", "init_from") if k in model]
    if len(sources) != 1:
        raise RunConfigError("[model] needs exactly one of preset, config, init_from")
    kind = sources[0]
    value = _take(model, "model", kind, str, what="a string")
    if kind == "preset":
        if value not in PRESETS:
            raise RunConfigError(f"[model] preset = {_show(value)}: unknown; choose one of "
                                 f"{', '.join(sorted(PRESETS))}")
        model_source = (kind, value)
    else:
        model_source = (kind, resolve(value))
        if kind == "config" and not os.path.isfile(model_source[1]):
            raise RunConfigError(f"[model] config = {_show(value)}: no such file {model_source[1]}")
        if kind == "init_from" and not os.path.isdir(model_source[1]):
            raise RunConfigError(f"[model] init_from = {_show(value)}: no such directory {model_source[1]} "
                                 f"(an HF checkpoint directory)")
    dtype = _take(model, "model", "dtype", str, "float32", lambda v: v in ("float32", "float64"), "float32|float64")
    init_seed = _take(model, "model", "seed", int, 0, lambda v: v >= 0, "a non-negative integer")
    raw_overrides = model.pop("overrides", {})
    if not isinstance(raw_overrides, dict):
        raise RunConfigError("[model.overrides] must be a table")
    config_fields = {f.name for f in fields(Config)}
    bad = sorted(set(raw_overrides) - config_fields)
    if bad:
        raise RunConfigError(f"[model.overrides] unknown Config field(s): {_keys(bad)}")
    _no_leftovers(model, "model")
    overrides, origins = {}, {}
    for name, written in raw_overrides.items():
        overrides[name] = _field_value(f"[model.overrides] {name}", name, written)
        origins[name] = ("model.overrides", name, written)
    for section_name, mapping in _CONFIG_SECTIONS.items():
        section = sections.get(section_name, {})
        for key in list(section):
            if key not in mapping:
                raise RunConfigError(f"[{section_name}] unknown key: {_key(key)}; expected one of {sorted(mapping)}")
            name, written = mapping[key], section.pop(key)
            if name in origins:
                other = origins[name]
                raise RunConfigError(f"[{section_name}] {key}: also set as [{other[0]}] {other[1]}; set it once")
            overrides[name] = _field_value(f"[{section_name}] {key}", name, written)
            origins[name] = (section_name, key, written)
    try:  # check the recipe values now, on a preset, so errors come before any work
        Config.preset("tiny").replace(**{k: v for k, v in overrides.items() if k not in _SHAPE_FIELDS})
    except (ConfigError, TypeError, ValueError) as e:
        raise _config_error(e, origins, overrides, f"[model] {kind} = {_show(value)}") from None

    data = sections.get("data", {})
    positive = lambda v: v > 0  # noqa: E731
    raw_sources = data.pop("sources", None)
    if raw_sources is not None and "path" in data:
        raise RunConfigError("[data] path and [[data.sources]] exclude each other: give one path or a mix")
    data_path = resolve(_take(data, "data", "path", str, what="a string")) if raw_sources is None else None
    eos_id = _take(data, "data", "eos_id", int, None, lambda v: v >= 0, "a token id >= 0")
    seq_len = _take(data, "data", "seq_len", int, check=positive, what="a positive integer")
    micro = _take(data, "data", "micro_batch_size", int, check=positive, what="a positive integer")
    data_seed = _take(data, "data", "seed", int, 0, lambda v: v >= 0, "a non-negative integer")
    data_loader = _take(data, "data", "loader", str, "sequential", lambda v: v in ("sequential", "rsdb"),
                        '"sequential" or "rsdb"')
    if "rsdb_buffer" in data and data_loader != "rsdb":
        raise RunConfigError('[data] rsdb_buffer needs loader = "rsdb"')
    rsdb_buffer = _take(data, "data", "rsdb_buffer", int, 1024, positive, "a positive integer (documents)")
    raw_phases = _take(data, "data", "phases", list, None, what="a list of [start_tokens, [weights]] pairs")
    data_sources, data_phases = _parse_sources(raw_sources, raw_phases, resolve)
    _no_leftovers(data, "data")

    train = sections.get("train", {})
    steps = _take(train, "train", "steps", int, check=positive, what="a positive integer")
    seqs = _take(train, "train", "sequences_per_step", int, micro, positive, "a positive integer")
    if seqs % micro:
        raise RunConfigError(f"[train] sequences_per_step = {seqs}: must be a positive multiple of [data] "
                             f"micro_batch_size {micro}")
    schedule = _take(train, "train", "batch_schedule", list, [], what="a list of [tokens, sequences] pairs")
    changes = []
    for item in schedule:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 and float(x).is_integer()
                        for x in item)):
            raise RunConfigError(f"[train] batch_schedule = {_show(schedule)}: entries must be [tokens, sequences] "
                                 f"pairs of whole numbers >= 0, got {_show(item)}")
        changes.append((int(item[0]), int(item[1])))
    for _, n in changes:
        if n <= 0 or n % micro:
            raise RunConfigError(f"[train] batch_schedule = {_show(schedule)}: sequences per step {n} must be a "
                                 f"positive multiple of [data] micro_batch_size {micro}")
    if any(b[0] <= a[0] for a, b in zip(changes, changes[1:])):
        raise RunConfigError(f"[train] batch_schedule = {_show(schedule)}: token thresholds must increase")
    recompute = _take(train, "train", "recompute", bool, False, what="true or false")
    backend = _take(train, "train", "backend", str, "reference", lambda v: v in BACKENDS,
                    "|".join(BACKENDS))
    precision = _take(train, "train", "precision", str, "full", lambda v: v in PRECISIONS, "|".join(PRECISIONS))
    try:
        check_precision(precision, dtype)  # bf16 keeps float32 master weights
    except ValueError as e:
        raise RunConfigError(f"[train] {e}") from None
    on_nonfinite = _take(train, "train", "on_nonfinite", str, "stop", lambda v: v in ("stop", "skip"),
                         '"stop" or "skip"')
    max_skipped = _take(train, "train", "max_skipped_steps", int, 10, lambda v: v >= 0, "a non-negative integer")
    _no_leftovers(train, "train")

    ckpt = sections.get("checkpoint", {})
    ckpt_dir = resolve(_take(ckpt, "checkpoint", "dir", str, "checkpoints", lambda v: v.strip() != "",
                             "a folder name"))
    every = _take(ckpt, "checkpoint", "every", int, max(1, steps // 10), positive, "a positive integer")
    keep_last = _take(ckpt, "checkpoint", "keep_last", int, 3, positive, "a positive integer")
    ckpt_format = _take(ckpt, "checkpoint", "format", str, "sharded", lambda v: v in ("sharded", "single"),
                        '"sharded" or "single"')
    hf_export = _take(ckpt, "checkpoint", "hf_export", str, None, lambda v: v.strip() != "", "a folder name")
    hf_export = None if hf_export is None else resolve(hf_export)
    _no_leftovers(ckpt, "checkpoint")

    logging = sections.get("logging", {})
    metrics = resolve(_take(logging, "logging", "metrics", str, "metrics.jsonl", lambda v: v.strip() != "",
                            "a file name"))
    progress = _take(logging, "logging", "progress", bool, True, what="true or false")
    _no_leftovers(logging, "logging")

    parallel = sections.get("parallel", {})
    sizes = {name: _take(parallel, "parallel", name, int, 1, positive, "a positive integer") for name in _LAYOUT_KEYS}
    checksums = _take(parallel, "parallel", "checksums", bool, False, what="true or false")
    watchdog = _take(parallel, "parallel", "watchdog_seconds", float, None, valid_watchdog_seconds,
                     "a number of seconds >= 0 (0: off)")
    options = _parse_options(parallel)
    if parallel:
        raise RunConfigError(f"[parallel] unknown key(s): {_keys(parallel)}; expected "
                             f"{', '.join(_LAYOUT_KEYS)}, checksums, watchdog_seconds, {', '.join(OPTION_NAMES)}")

    evaluation = _parse_eval(sections.get("eval"), seqs, micro, seq_len, resolve)

    return RunConfig(path=path, model_source=model_source, dtype=dtype, init_seed=init_seed,
                     config_overrides=overrides, data_path=data_path, eos_id=eos_id, seq_len=seq_len,
                     micro_batch_size=micro, data_seed=data_seed, steps=steps, sequences_per_step=seqs,
                     batch_schedule=tuple(changes), recompute=recompute, backend=backend, precision=precision,
                     checkpoint_dir=ckpt_dir,
                     checkpoint_every=every, keep_last=keep_last, metrics_path=metrics, progress=progress,
                     data_loader=data_loader, rsdb_buffer=rsdb_buffer, data_sources=data_sources,
                     data_phases=data_phases, override_origins=origins, on_nonfinite=on_nonfinite,
                     max_skipped_steps=max_skipped, layout=Layout(**sizes, options=options), checkpoint_format=ckpt_format,
                     hf_export=hf_export, checksums=checksums, watchdog_seconds=watchdog, evaluation=evaluation)


def _parse_eval(section, sequences_per_step: int, micro: int, seq_len: int, resolve) -> EvalSettings | None:
    """The [eval] section (None when absent); errors name the key."""
    if section is None:
        return None
    section = dict(section)
    positive = lambda v: v > 0  # noqa: E731
    every = _take(section, "eval", "every", int, check=positive, what="a positive integer (steps)")
    sequences = _take(section, "eval", "sequences_per_batch", int, sequences_per_step, positive, "a positive integer")
    if sequences % micro:
        raise RunConfigError(f"[eval] sequences_per_batch = {sequences}: must be a positive multiple of [data] "
                             f"micro_batch_size {micro}")
    if "batches" in section and "tokens" in section:
        raise RunConfigError("[eval] batches and tokens exclude each other: give one")
    tokens = _take(section, "eval", "tokens", int, None, positive, "a positive integer")
    batches = _take(section, "eval", "batches", int, 10, positive, "a positive integer")
    if tokens is not None:
        batches = -(-tokens // (sequences * seq_len))
    path = _take(section, "eval", "path", str, None, lambda v: v.strip() != "", "a dataset path")
    seed = _take(section, "eval", "seed", int, 0, lambda v: v >= 0, "a non-negative integer")
    _no_leftovers(section, "eval")
    return EvalSettings(every=every, batches=batches, sequences_per_batch=sequences,
                        path=None if path is None else resolve(path), seed=seed)


def _parse_options(parallel: dict) -> ParallelOptions:
    """The schedule options among the [parallel] keys (distributed/options.py); errors name the key."""
    given = {}
    for f in fields(ParallelOptions):
        if f.name not in parallel:
            continue
        value = parallel.pop(f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        ok = {"bool": isinstance(value, bool), "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "str": isinstance(value, str)}[kind]
        if not ok:
            raise RunConfigError(f"[parallel] {f.name} = {_show(value)}: must be "
                                 f"{ {'bool': 'true or false', 'float': 'a number', 'str': 'a string'}[kind]}")
        given[f.name] = float(value) if kind == "float" else value
    try:
        return ParallelOptions(**given)
    except OptionError as e:
        raise RunConfigError(f"[parallel] {e}") from None


def valid_watchdog_seconds(value: float) -> bool:
    """A watchdog deadline a job can use: a finite number of seconds >= 0 (0 turns it off), at most a year."""
    return math.isfinite(value) and 0 <= value <= 365 * 86400


def _parse_sources(raw_sources, raw_phases, resolve) -> tuple[tuple, tuple]:
    """([[data.sources]], [data] phases) → (paths, ((start_tokens, weights), ...)); errors name the key."""
    if raw_sources is None:
        if raw_phases is not None:
            raise RunConfigError("[data] phases needs [[data.sources]]")
        return (), ()
    if not isinstance(raw_sources, list) or not raw_sources or not all(isinstance(x, dict) for x in raw_sources):
        raise RunConfigError("[data] sources must be one or more [[data.sources]] tables")
    paths, weights = [], []
    for i, table in enumerate(raw_sources):
        table, name = dict(table), f"data.sources.{i}"
        paths.append(resolve(_take(table, name, "path", str, what="a string")))
        weights.append(_take(table, name, "weight", float, None, lambda v: v >= 0, "a number >= 0"))
        _no_leftovers(table, name)
    n = len(paths)
    if raw_phases is None:
        w = tuple(1.0 if x is None else x for x in weights)
        if sum(w) <= 0:
            raise RunConfigError("[[data.sources]] weights must not all be 0")
        return tuple(paths), ((0, w),)
    given = [i for i, x in enumerate(weights) if x is not None]
    if given:
        raise RunConfigError(f"[data.sources.{given[0]}] weight: give weights either per source or in [data] "
                             f"phases, not both")
    phases = []
    for item in raw_phases:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and not isinstance(item[0], bool) and item[0] >= 0 and isinstance(item[1], list)
                and len(item[1]) == n and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                                              for w in item[1]) and sum(item[1]) > 0):
            raise RunConfigError(f"[data] phases entries must be [start_tokens, [{n} weight(s) >= 0, not all 0]], "
                                 f"got {_show(item)}")
        phases.append((item[0], tuple(float(w) for w in item[1])))
    if not phases or phases[0][0] != 0:
        raise RunConfigError("[data] phases must start with a phase at 0 tokens")
    if any(b[0] <= a[0] for a, b in zip(phases, phases[1:])):
        raise RunConfigError("[data] phases start tokens must increase")
    return tuple(paths), tuple(phases)


# ---- output paths ------------------------------------------------------------------------------------------------
def check_output_paths(run: RunConfig) -> None:
    """Check, before any work, that the run can write its outputs: `[checkpoint] dir` is a directory or can be
    created as one, `[logging] metrics` is a file or can be created as one, and both places are writable.

    Raises RunConfigError naming the key: "[checkpoint] dir = '…': is a file", "[logging] metrics = '…': is a
    directory", "…: not writable (Permission denied)". Nothing is created or changed: writability is probed with an
    unnamed temporary file (O_TMPFILE where the file system has it, else a temporary file removed at once) in the
    nearest existing folder, and an existing metrics file is opened for appending and closed without a write.
    """
    _check_output(run.checkpoint_dir, "[checkpoint] dir", directory=True)
    _check_output(run.metrics_path, "[logging] metrics", directory=False)
    if run.hf_export is not None:
        _check_output(run.hf_export, "[checkpoint] hf_export", directory=True)


def _probe_writable(folder: str) -> None:
    """Raise OSError unless a file can be created in `folder`; leaves nothing behind."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def _check_output(path: str, where: str, directory: bool) -> None:
    shown = f"{where} = {_show(path, 200)}"
    if os.path.lexists(path) and not os.path.exists(path):
        raise RunConfigError(f"{shown}: is a broken symbolic link")
    if os.path.exists(path):
        if directory and not os.path.isdir(path):
            raise RunConfigError(f"{shown}: is a file" if os.path.isfile(path) else f"{shown}: not a directory")
        if not directory and os.path.isdir(path):
            raise RunConfigError(f"{shown}: is a directory")
        try:
            if directory:
                _probe_writable(path)
            else:
                with open(path, "ab"):
                    pass
        except OSError as e:
            raise RunConfigError(f"{shown}: not writable ({e.strerror or e})") from None
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunConfigError(f"{shown}: cannot be created: {parent} is a file")
    try:
        _probe_writable(parent)
    except OSError as e:
        raise RunConfigError(f"{shown}: cannot be created: {parent} is not writable ({e.strerror or e})") from None


# Fields that shape the model; checked against the real base config later, not against the `tiny` stand-in.
_SHAPE_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_dense_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                 "num_experts_per_tok", "num_shared_experts", "layer_types", "global_attn_every_n_layers",
                 "sliding_window", "eos_token_id", "pad_token_id", "bos_token_id", "max_position_embeddings"}
