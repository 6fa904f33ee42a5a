"""Helpers shared by the `trinity` subcommands: the user-facing error, model-source loading, number formatting.

Only the standard library and trinity.reference are imported here, so that `trinity -h` and every subcommand
start fast.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

from trinity.reference.config import PRESETS, Config, ConfigError

__all__ = ["CLIError", "ModelSource", "load_config", "human_count", "human_bytes"]


class CLIError(Exception):
    """A problem the user can fix (bad argument, missing file, invalid config).

    `trinity` prints its message as one line on stderr and exits with status 2; no traceback.
    """


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
