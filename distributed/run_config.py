"""The run file of `trinity train`: a TOML file naming the model, data, recipe, checkpoints and logging.

Every key is checked before any work starts; an unknown key or a bad value raises RunConfigError naming the
section and key. Relative paths are taken relative to the run file's folder. Example (configs/tiny-synthetic.toml):

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
    [optimizer]   muon_lr, adamw_lr, muon_momentum, … (Config fields, SPEC §9)
    [schedule]    warmup_steps, lr_schedule, decay_start_fraction, lr_floor_ratio
    [balancing]   method = "smebu" | "sign" | "none", sign_update_rate, smebu_lambda, smebu_beta, smebu_kappa
    [loss]        z_loss_coeff, balance_loss_coeff, intra_document_mask
    [checkpoint]  dir, every (steps), keep_last
    [logging]     metrics (JSONL path), progress (bool)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields

from trinity.accel import BACKENDS
from trinity.reference.config import Config, ConfigError

__all__ = ["RunConfig", "RunConfigError", "load_run_config"]


class RunConfigError(ValueError):
    """A run file that cannot be used; the message names the section and key."""


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
    checkpoint_dir: str
    checkpoint_every: int
    keep_last: int
    metrics_path: str
    progress: bool
    data_loader: str = "sequential"  # "sequential" | "rsdb"
    rsdb_buffer: int = 1024
    data_sources: tuple = ()  # paths of a phase mix ([[data.sources]]); data_path is None then
    data_phases: tuple = ()  # ((start_tokens, (w1, w2, ...)), ...) for data_sources
    extra: dict = field(default_factory=dict)

    def build_config(self, base: Config) -> Config:
        """Apply the run's Config overrides (model.overrides and the recipe sections) to `base`."""
        try:
            return base.replace(**self.config_overrides)
        except ConfigError as e:
            raise RunConfigError(f"{self.path}: {e}") from None
        except TypeError as e:
            raise RunConfigError(f"{self.path}: {e}") from None


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
        raise RunConfigError(f"[{name}] {key} = {value!r}: must be {what or kind.__name__}")
    return value


def _no_leftovers(section: dict, name: str):
    if section:
        raise RunConfigError(f"[{name}] unknown key(s): {', '.join(sorted(section))}")


def load_run_config(path) -> RunConfig:
    """Parse and check a run file; nothing is loaded or created."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RunConfigError(f"run file not found: {path}")
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise RunConfigError(f"{path} is not valid TOML: {e}") from None
    here = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(here, p))  # noqa: E731
    sections = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    known = {"model", "data", "train", "checkpoint", "logging", *_CONFIG_SECTIONS}
    unknown = sorted(set(sections) - known)
    if unknown:
        raise RunConfigError(f"unknown section(s): {', '.join(unknown)}; expected {sorted(known)}")
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise RunConfigError(f"[{name}] must be a table")

    model = sections.get("model", {})
    sources = [k for k in ("preset", "config", "init_from") if k in model]
    if len(sources) != 1:
        raise RunConfigError("[model] needs exactly one of preset, config, init_from")
    kind = sources[0]
    value = _take(model, "model", kind, str)
    model_source = (kind, value if kind == "preset" else resolve(value))
    dtype = _take(model, "model", "dtype", str, "float32", lambda v: v in ("float32", "float64"), "float32|float64")
    init_seed = _take(model, "model", "seed", int, 0, lambda v: v >= 0, "a non-negative integer")
    overrides = model.pop("overrides", {})
    if not isinstance(overrides, dict):
        raise RunConfigError("[model.overrides] must be a table")
    config_fields = {f.name for f in fields(Config)}
    bad = sorted(set(overrides) - config_fields)
    if bad:
        raise RunConfigError(f"[model.overrides] unknown Config field(s): {', '.join(bad)}")
    _no_leftovers(model, "model")
    overrides = dict(overrides)
    for name, mapping in _CONFIG_SECTIONS.items():
        section = sections.get(name, {})
        for key in list(section):
            if key not in mapping:
                raise RunConfigError(f"[{name}] unknown key: {key}; expected one of {sorted(mapping)}")
            overrides[mapping[key]] = section.pop(key)
    if "layer_types" in overrides and isinstance(overrides["layer_types"], list):
        overrides["layer_types"] = tuple(overrides["layer_types"])
    try:  # check the recipe values now, on a preset, so errors come before any work
        Config.preset("tiny").replace(**{k: v for k, v in overrides.items() if k not in _SHAPE_FIELDS})
    except ConfigError as e:
        raise RunConfigError(f"{path}: {e}") from None

    data = sections.get("data", {})
    positive = lambda v: v > 0  # noqa: E731
    raw_sources = data.pop("sources", None)
    if raw_sources is not None and "path" in data:
        raise RunConfigError("[data] path and [[data.sources]] exclude each other: give one path or a mix")
    data_path = resolve(_take(data, "data", "path", str)) if raw_sources is None else None
    eos_id = _take(data, "data", "eos_id", int, None, lambda v: v >= 0, "a token id >= 0")
    seq_len = _take(data, "data", "seq_len", int, check=positive, what="a positive integer")
    micro = _take(data, "data", "micro_batch_size", int, check=positive, what="a positive integer")
    data_seed = _take(data, "data", "seed", int, 0, lambda v: v >= 0, "a non-negative integer")
    data_loader = _take(data, "data", "loader", str, "sequential", lambda v: v in ("sequential", "rsdb"),
                        '"sequential" or "rsdb"')
    if "rsdb_buffer" in data and data_loader != "rsdb":
        raise RunConfigError('[data] rsdb_buffer needs loader = "rsdb"')
    rsdb_buffer = _take(data, "data", "rsdb_buffer", int, 1024, positive, "a positive integer (documents)")
    raw_phases = _take(data, "data", "phases", list, None)
    data_sources, data_phases = _parse_sources(raw_sources, raw_phases, resolve)
    _no_leftovers(data, "data")

    train = sections.get("train", {})
    steps = _take(train, "train", "steps", int, check=positive, what="a positive integer")
    seqs = _take(train, "train", "sequences_per_step", int, micro, positive, "a positive integer")
    schedule = _take(train, "train", "batch_schedule", list, [])
    changes = []
    for item in schedule:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, (int, float)) for x in item)):
            raise RunConfigError(f"[train] batch_schedule entries must be [tokens, sequences] pairs, got {item!r}")
        changes.append((int(item[0]), int(item[1])))
    for n in [seqs] + [s for _, s in changes]:
        if n <= 0 or n % micro:
            raise RunConfigError(f"[train] sequences per step {n} must be a positive multiple of "
                                 f"[data] micro_batch_size {micro}")
    if [t for t, _ in changes] != sorted(t for t, _ in changes):
        raise RunConfigError("[train] batch_schedule thresholds must increase")
    recompute = _take(train, "train", "recompute", bool, False)
    backend = _take(train, "train", "backend", str, "reference", lambda v: v in BACKENDS,
                    "|".join(BACKENDS))
    _no_leftovers(train, "train")

    ckpt = sections.get("checkpoint", {})
    ckpt_dir = resolve(_take(ckpt, "checkpoint", "dir", str, "checkpoints"))
    every = _take(ckpt, "checkpoint", "every", int, max(1, steps // 10), positive, "a positive integer")
    keep_last = _take(ckpt, "checkpoint", "keep_last", int, 3, positive, "a positive integer")
    _no_leftovers(ckpt, "checkpoint")

    logging = sections.get("logging", {})
    metrics = resolve(_take(logging, "logging", "metrics", str, "metrics.jsonl"))
    progress = _take(logging, "logging", "progress", bool, True)
    _no_leftovers(logging, "logging")

    return RunConfig(path=path, model_source=model_source, dtype=dtype, init_seed=init_seed,
                     config_overrides=overrides, data_path=data_path, eos_id=eos_id, seq_len=seq_len,
                     micro_batch_size=micro, data_seed=data_seed, steps=steps, sequences_per_step=seqs,
                     batch_schedule=tuple(changes), recompute=recompute, backend=backend, checkpoint_dir=ckpt_dir,
                     checkpoint_every=every, keep_last=keep_last, metrics_path=metrics, progress=progress,
                     data_loader=data_loader, rsdb_buffer=rsdb_buffer, data_sources=data_sources,
                     data_phases=data_phases)


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
        paths.append(resolve(_take(table, name, "path", str)))
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
                                 f"got {item!r}")
        phases.append((item[0], tuple(float(w) for w in item[1])))
    if not phases or phases[0][0] != 0:
        raise RunConfigError("[data] phases must start with a phase at 0 tokens")
    if any(b[0] <= a[0] for a, b in zip(phases, phases[1:])):
        raise RunConfigError("[data] phases start tokens must increase")
    return tuple(paths), tuple(phases)


# Fields that shape the model; checked against the real base config later, not against the `tiny` stand-in.
_SHAPE_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_dense_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                 "num_experts_per_tok", "num_shared_experts", "layer_types", "global_attn_every_n_layers",
                 "sliding_window", "eos_token_id", "pad_token_id", "bos_token_id", "max_position_embeddings"}
