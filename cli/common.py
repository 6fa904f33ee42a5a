"""Helpers shared by the `trinity` subcommands: the user-facing error, model-source loading (a config; a model to
run with its tokenizer, EOS id and operator backend), number formatting.

Only the standard library and trinity.reference.model.config are imported at the top (numpy, h5py, the tokenizer and
the accel backends inside the functions), so that `trinity -h` and every subcommand start fast.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings

from trinity.reference.model.config import PRESETS, Config, ConfigError

__all__ = ["CLIError", "ModelSource", "load_config", "LoadedModel", "load_model", "load_model_tokenizer",
           "resolve_eos_id", "load_backend", "add_precision_argument", "human_count", "human_bytes"]


class CLIError(Exception):
    """A problem the user can fix (bad argument, missing file, invalid config), or a run that had to stop.

    `trinity` prints its message as one line on stderr and exits with `status` (2 unless said otherwise); no
    traceback. `every_rank`: under MPI, every rank of the job raised it at the same point (the job then ends once,
    cleanly, instead of being aborted).
    """

    def __init__(self, message, status: int = 2, every_rank: bool = False):
        super().__init__(" ".join(str(message).splitlines()))
        self.status = status
        self.every_rank = every_rank


class ModelSource:
    """Where a Config came from: `kind` is "preset", "config.json" or "checkpoint"; `name` what the user typed."""

    def __init__(self, kind: str, name: str, path: str | None = None):
        self.kind, self.name, self.path = kind, name, path

    def describe(self) -> str:
        if self.kind == "preset":
            return f"{self.name} (preset)"
        if self.kind == "checkpoint":
            return f"{self.name} (HF checkpoint directory)"
        return f"{self.name} (HF config.json)"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "path": self.path}


def load_config(spec: str) -> tuple[Config, ModelSource]:
    """Resolve PRESET_OR_PATH: a preset name, a config.json file, or an HF checkpoint directory holding one.

    Raises CLIError with a one-line message for every problem a user can cause. Warnings from Config.from_hf
    (unknown keys it ignores) are printed to stderr as one line each.
    """
    if spec in PRESETS:
        try:
            return Config.preset(spec), ModelSource("preset", spec)
        except ConfigError as e:  # a broken preset is a bug, but still report it in one line
            raise CLIError(f"preset {spec!r}: {e}") from None

    if not os.path.exists(spec):
        looks_like_path = os.sep in spec or "/" in spec or spec.endswith(".json") or spec.startswith(".")
        if looks_like_path:
            raise CLIError(f"no such file or directory: {spec}")
        raise CLIError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                       f"nor an existing config.json or checkpoint directory")

    if os.path.isdir(spec):
        path = os.path.join(spec, "config.json")
        if not os.path.isfile(path):
            raise CLIError(f"no config.json in directory {spec}")
        kind = "checkpoint"
    else:
        path, kind = spec, "config.json"

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CLIError(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a JSON object, got {type(data).__name__}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = Config.from_hf(data)
        except ConfigError as e:
            raise CLIError(f"bad config in {path}: {e}") from None
        except (TypeError, ValueError) as e:  # e.g. a list where a number belongs
            raise CLIError(f"bad config in {path}: {type(e).__name__}: {e}") from None
    for w in caught:
        print(f"trinity: warning: {path}: {w.message}", file=sys.stderr)
    return config, ModelSource(kind, spec, path)


# ---- a model to run: our checkpoint (.h5), an HF checkpoint directory, or a preset ------------------------------
class LoadedModel:
    """A model loaded by `load_model`: config and params (in the asked dtype), and where it came from.

    `kind` is "checkpoint" (ours), "hf" or "preset". For our checkpoints `optimizer_state` and `balancing_state`
    (None when empty), `step`, `tokens_seen` and `extra` are set; otherwise they are None / {}. `description` is
    one line for the user. `tokenizer_source` is the tokenizer when the model itself holds it: the copy our
    checkpoint carries (a Tokenizer) or the HF directory's tokenizer.json; else None and `why_no_tokenizer` says
    why. A path a checkpoint names (its run file in `extra`) is never opened: a checkpoint may come from anyone.
    `eos_id` is the tokenizer's, else the config's eos_token_id.
    """

    def __init__(self, kind: str, spec: str, config, params, description: str, optimizer_state=None,
                 balancing_state=None, step=None, tokens_seen=None, extra=None, tokenizer_source=None, eos_id=None,
                 why_no_tokenizer: str = ""):
        self.kind, self.spec, self.config, self.params = kind, spec, config, params
        self.description = description
        self.optimizer_state, self.balancing_state = optimizer_state, balancing_state
        self.step, self.tokens_seen, self.extra = step, tokens_seen, extra if extra is not None else {}
        self.tokenizer_source, self.eos_id, self.why_no_tokenizer = tokenizer_source, eos_id, why_no_tokenizer


def load_model(spec: str, dtype=None, *, presets: bool = False, seed: int = 0, state: bool = True) -> LoadedModel:
    """Load MODEL: our checkpoint file (.h5) or sharded checkpoint directory (step_N.sharded, from a layout), an HF
    checkpoint directory, or (with `presets`) a preset name, which is randomly initialised with `seed` (an existing
    file or directory of that name wins).

    `dtype` (None, "float32" or "float64") casts the floating arrays; None keeps our checkpoint's own dtype and
    gives float32 for HF directories and presets. `state=False` drops our checkpoint's optimizer and balancing
    state (not needed to run the model). Raises CLIError with one line for every problem a user can cause.
    """
    import numpy as np

    if presets and spec in PRESETS and not os.path.exists(spec):
        from trinity.reference.model.params import init_params

        config = Config.preset(spec)
        params = init_params(config, seed=seed, dtype=np.dtype(dtype or "float32"))
        return LoadedModel("preset", spec, config, params, f"{spec} (preset, random init, seed {seed})",
                           eos_id=config.eos_token_id,
                           why_no_tokenizer=f"{spec} is a preset (random init), which has no tokenizer")
    if not os.path.exists(spec):
        if presets:
            raise CLIError(f"no such checkpoint file or directory: {spec} (nor a preset: "
                           f"{', '.join(sorted(PRESETS))})")
        raise CLIError(f"no such file or directory: {spec}")

    sharded = os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "manifest.json"))  # step_N.sharded/
    folder = os.path.dirname(os.path.abspath(spec))
    if os.path.isfile(spec) and os.path.isfile(os.path.join(folder, "manifest.json")):
        raise CLIError(f"{spec} is one rank's part of the sharded checkpoint {folder}: pass that directory")
    _refuse_unfinished_save(spec, sharded)
    if os.path.isdir(spec) and not sharded:
        from trinity.reference.interop.hf import CheckpointError, load_pretrained

        try:
            config, params = load_pretrained(spec, dtype=np.dtype(dtype or "float32"))
        except (CheckpointError, ConfigError, OSError, ValueError) as e:
            raise CLIError(f"cannot load HF checkpoint {spec}: {e}") from None
        has_tok = os.path.isfile(os.path.join(spec, "tokenizer.json"))
        return LoadedModel("hf", spec, config, params, f"{spec} (HF checkpoint)",
                           tokenizer_source=spec if has_tok else None, eos_id=config.eos_token_id,
                           why_no_tokenizer="" if has_tok else f"the HF directory {spec} has no tokenizer.json")

    from trinity.reference.training.checkpoint import CheckpointError, load_checkpoint

    try:
        if sharded:  # written by a layout: reassembled into whole arrays
            from trinity.distributed.sharded_checkpoint import load_sharded
            ck = load_sharded(spec)
        else:
            ck = load_checkpoint(spec)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    params = ck.params
    opt, bal = (ck.optimizer_state, ck.balancing_state) if state else ({}, {})
    if dtype is not None:
        dt = np.dtype(dtype)

        def cast(tree):
            return {k: (np.ascontiguousarray(v, dtype=dt) if v.dtype.kind == "f" else v) for k, v in tree.items()}

        params, opt, bal = cast(params), cast(opt), cast(bal)
    if ck.tokenizer is not None:  # the tokenizer the model was trained with, carried by the checkpoint
        from trinity.reference.data.tokenizer import TokenizerError, tokenizer_from_record

        try:
            source = tokenizer_from_record(ck.tokenizer, ck.tokenizer_json, where=spec)
        except TokenizerError as e:
            raise CLIError(str(e)) from None
        eos_id, why = source.eos_id, ""
    else:  # older checkpoints, and runs on raw token ids: no path the checkpoint names is opened
        source, eos_id = None, None
        why = (f"checkpoint {spec} carries no tokenizer (its run trained on raw token ids, or it predates "
               f"checkpoints carrying one)")
    return LoadedModel("checkpoint", spec, ck.config, params,
                       f"{spec} (checkpoint at step {ck.step}, {ck.tokens_seen:,} tokens seen)",
                       optimizer_state=opt if state else None, balancing_state=bal or None, step=ck.step,
                       tokens_seen=ck.tokens_seen, extra=dict(ck.extra), tokenizer_source=source,
                       eos_id=eos_id if eos_id is not None else ck.config.eos_token_id, why_no_tokenizer=why)


_SHARDED_DIR = re.compile(r"^step_\d+\.sharded$")
_UNFINISHED_FILE = re.compile(r"\.tmp-\d+$")


def _refuse_unfinished_save(spec: str, sharded: bool) -> None:
    """A CLIError naming what `spec` is when it is the leftover of an interrupted save: a `step_N.sharded` directory
    (or one holding rank files) without its manifest, or a `*.tmp-<pid>` file, so that it is not reported as a
    broken HF checkpoint or a corrupt file."""
    name = os.path.basename(os.path.normpath(spec))
    if os.path.isdir(spec) and not sharded:
        ranks = [n for n in os.listdir(spec) if re.fullmatch(r"rank_\d+\.h5(\.tmp-\d+)?|manifest\.json\.tmp-\d+", n)]
        if _SHARDED_DIR.match(name) or ranks:
            raise CLIError(f"{spec} is an incomplete sharded checkpoint (an interrupted save: {len(ranks)} rank "
                           f"file(s), no manifest.json): not a checkpoint; use an earlier step")
    elif os.path.isfile(spec) and _UNFINISHED_FILE.search(name):
        raise CLIError(f"{spec} is an unfinished checkpoint write (a temporary file of an interrupted save): not a "
                       f"checkpoint; use the checkpoint without the .tmp-<pid> suffix, or an earlier step")


def load_model_tokenizer(explicit: str | None, model: LoadedModel):
    """The tokenizer for MODEL, or None: `explicit` (--tokenizer SOURCE: 'bytes', a prepared dataset dir, an HF
    dir or a tokenizer.json) if given, else the model's own (`model.tokenizer_source`). A source that cannot be
    loaded is a CLIError."""
    from trinity.reference.data.tokenizer import TokenizerError, load_tokenizer

    source = explicit if explicit is not None else model.tokenizer_source
    if source is None:
        return None
    try:
        return load_tokenizer(source)
    except (TokenizerError, OSError, ValueError) as e:
        raise CLIError(f"tokenizer {source}: {e}") from None


def resolve_eos_id(explicit: int | None, tokenizer, model: LoadedModel) -> int | None:
    """The EOS id: `explicit` (--eos-id), else the tokenizer's, else the model's (the config's eos_token_id),
    else None."""
    if explicit is not None:
        return explicit
    if tokenizer is not None:
        return tokenizer.eos_id
    return model.eos_id


def load_backend(name: str, precision: str = "full"):
    """The operator table for --backend NAME at --precision: None for "reference" in full precision (the default
    path), else trinity.accel.get_backend(NAME) wrapped by with_precision (reference/model/precision.py); an
    unavailable backend is a CLIError."""
    from trinity.reference.model.precision import with_precision

    if name == "reference":
        return with_precision(None, precision)
    from trinity.accel import BackendUnavailable, get_backend

    try:
        return with_precision(get_backend(name), precision)
    except (BackendUnavailable, ValueError) as e:
        raise CLIError(f"--backend {name}: {e}") from None


def add_precision_argument(p, default="full", what="the operators' arithmetic") -> None:
    """--precision full|bf16 (reference/model/precision.py)."""
    from trinity.reference.model.precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=default,
                   help=f"{what}: full (the params' dtype) or bf16 (operators on bf16 values, float32 accumulation; "
                        "reference/model/precision.py)" + ("" if default else "; default: the run file's"))


def _scaled(value: float, units: list[str], base: float) -> str:
    """Pick the unit, then 2 decimals below 10, 1 below 1000 (checked after rounding, so 9.996 -> '10.0')."""
    for i, unit in enumerate(units):
        last = i == len(units) - 1
        for decimals in (2, 1, 0) if i else (0,):
            text = f"{value:.{decimals}f}"
            shown = float(text)
            limit = {2: 10, 1: 1000, 0: base}[decimals]
            if shown < limit or (decimals == 0 and last):
                return f"{text}{unit}"
        value /= base
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    """398635286016 -> '398.6B', 1023923968 -> '1.02B', 291544 -> '291.5K', 512 -> '512'."""
    return _scaled(float(n), ["", "K", "M", "B", "T"], 1000.0)


def human_bytes(n: int) -> str:
    """Binary units: 797270572032 -> '742.5 GiB'."""
    return _scaled(float(n), [" B", " KiB", " MiB", " GiB", " TiB", " PiB"], 1024.0)
