"""The manifest of a sharded checkpoint (format in sharded_checkpoint.py's docstring): its exact text, reading it back
verified, and the checks of its fields against each other, the stored config and the directory name, shared by the
whole reader (sharded_checkpoint.load_sharded) and the span reader (checkpoint_spans.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re

from trinity.reference.model.config import Config, ConfigError
from trinity.reference.training import checkpoint as _ck
from trinity.reference.training.checkpoint import CheckpointCorrupt, CheckpointError
from trinity.reference.training.checkpoint_files import open_plain

from .layout import Layout, LayoutError
from .plan import ParallelPlan

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "STEP_DIR", "rank_file", "manifest_text", "read_manifest",
           "read_manifest_sized", "check_rank_seal", "tile", "check_bucket_shapes", "check_manifest",
           "manifest_config"]

FORMAT, FORMAT_VERSION, MANIFEST = "trinity-sharded-checkpoint", 1, "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)\.sharded$")
_FIELDS = {"format", "format_version", "step", "run_id", "layout", "world_size", "num_experts", "config", "buckets",
           "ranks", "replicated", "manifest_sha256"}  # every field of a manifest


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.h5"


def manifest_text(body: dict) -> str:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()
    return json.dumps({**body, "manifest_sha256": digest}, sort_keys=True, indent=1) + "\n"


def read_manifest(path) -> dict:
    """The verified manifest of a sharded checkpoint directory (CheckpointCorrupt naming manifest.json if it is
    missing or any byte differs from what was written; CheckpointError for an unknown format version)."""
    return read_manifest_sized(path)[0]


def read_manifest_sized(path) -> tuple[dict, int]:
    """(read_manifest(path), the manifest's size in bytes)."""
    where = os.path.join(os.fspath(path), MANIFEST)
    try:
        with open_plain(where) as f:  # a symlink is not followed
            raw = f.read()
    except OSError as e:
        raise CheckpointCorrupt(f"{where}: no readable manifest ({e.strerror or e}): an interrupted save is not a "
                                f"checkpoint") from None
    try:
        body = json.loads(raw.decode("ascii"))
        ok = isinstance(body, dict) and manifest_text({k: v for k, v in body.items() if k != "manifest_sha256"}) \
            .encode("ascii") == raw and body.get("format") == FORMAT
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise CheckpointCorrupt(f"{where}: fails its sha256 checksum (or is not a manifest): the checkpoint is corrupt")
    if body.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: sharded format_version {body.get('format_version')!r} is not supported "
                              f"(this trinity reads {FORMAT_VERSION})")
    missing = sorted(_FIELDS - set(body))
    if missing:
        raise CheckpointCorrupt(f"{where}: no {', '.join(missing)}: the checkpoint is corrupt")
    return body, len(raw)


def check_rank_seal(file: str, rank: int, manifest: dict, header: dict | None) -> None:
    """A rank file's sealed meta must be the manifest's: this rank, the step, the run, the format."""
    if header is None:
        raise CheckpointCorrupt(f"{file}: not sealed: the checkpoint is corrupt")
    want = {"rank": rank, "step": manifest["step"], "run_id": manifest["run_id"],
            "sharded_format_version": FORMAT_VERSION}
    for field, value in want.items():
        found = header["meta"].get(field)
        if found != value or type(found) is not type(value):
            raise CheckpointCorrupt(f"{file}: its sealed {field} {found!r} is not the manifest's {value!r}: the "
                                    f"checkpoint is corrupt")

def tile(spans, end: int, what: str) -> list:
    spans, at = sorted(spans), 0
    for lo, hi in spans:
        if lo != at or hi <= lo:
            break
        at = hi
    if at != end or not spans:
        raise CheckpointCorrupt(f"{what}: the pieces {spans} do not tile [0, {end})")
    return spans


def check_bucket_shapes(name: str, b: dict, shapes: dict, num_experts: int, ep: int, where: str) -> None:
    """Each key of bucket `name` is a parameter of the stored config, of its shape (an expert bucket: the local
    [E/ep, ...] of it), so that no array is made bigger than the model the config describes."""
    for key, shape in zip(b["keys"], b["shapes"]):
        whole = shapes.get(key)
        local = None if whole is None or not b["expert"] else [num_experts // ep] + list(whole[1:])
        if whole is None or list(shape) != (local or list(whole)):
            raise CheckpointCorrupt(f"{where}: bucket {name}: {key!r} of shape {shape!r} is not a parameter of the "
                                    f"stored config: the checkpoint is corrupt")

def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_manifest(manifest: dict, path: str, stored: Config) -> None:
    """The manifest's fields a reader uses, checked for type and against each other, the stored config and the
    directory name `step_N.sharded`; CheckpointCorrupt naming the field otherwise. (Each rank file's sealed rank,
    step and run are checked against them as it is read, check_rank_seal.)"""
    where = os.path.join(path, MANIFEST)

    def bad(field, why):
        return CheckpointCorrupt(f"{where}: {field} {why}: the checkpoint is corrupt")

    step, ranks, world = manifest.get("step"), manifest.get("ranks"), manifest.get("world_size")
    if not is_count(step):
        raise bad("step", f"{step!r} is not a non-negative integer")
    named = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != step:
        raise bad("step", f"{step} is not the step {int(named.group(1))} of the directory name")
    if not isinstance(manifest.get("run_id"), (str, type(None))):
        raise bad("run_id", "is not a string")
    if not isinstance(ranks, list) or not ranks or not all(isinstance(d, dict) for d in ranks):
        raise bad("ranks", "is not a list of rank descriptions")
    if not is_count(world) or world != len(ranks):
        raise bad("world_size", f"{world!r} is not the {len(ranks)} ranks it lists")
    unknown = sorted(set(manifest) - _FIELDS)
    if unknown:
        raise bad(unknown[0], "is not a field of a manifest")
    try:
        layout = Layout.parse(manifest.get("layout"))
    except (LayoutError, AttributeError, TypeError) as e:
        raise bad("layout", f"is not a layout ({e})") from None
    if str(layout) != manifest.get("layout"):
        raise bad("layout", f"{manifest.get('layout')!r} is not as a save writes it ({str(layout)!r})")
    if layout.world_size != world:
        raise bad("layout", f"{layout} has {layout.world_size} ranks, not the world size {world}")
    if (layout.dp_shard * layout.cp) % layout.ep:
        raise bad("layout", f"{layout}: ep does not divide dp_shard·cp")
    experts = manifest.get("num_experts")
    if not is_count(experts) or experts != stored.num_experts:
        raise bad("num_experts", f"{experts!r} is not the stored config's {stored.num_experts}")
    if experts % layout.ep:
        raise bad("layout", f"ep = {layout.ep} does not divide the {experts} experts")
    plan = ParallelPlan(stored, layout)
    for r, d in enumerate(ranks):
        ep_rank = d.get("ep_rank")  # the plan's rule
        expected, range_ = plan.coords(r).ep_rank, plan.experts(r)
        if not is_count(ep_rank) or ep_rank != expected or d.get("experts") != [range_.start, range_.stop]:
            raise bad(f"ranks[{r}]", f"ep_rank {ep_rank!r} and experts {d.get('experts')!r} do not fit {layout}")
    if not isinstance(manifest.get("buckets"), dict) or not isinstance(manifest.get("replicated"), dict):
        raise bad("buckets", "or replicated is not a JSON object")


def manifest_config(manifest: dict, path: str, config: Config | None) -> Config:
    """The manifest's stored config, checked (check_manifest); with `config` it must be the same model."""
    where = os.path.join(path, MANIFEST)
    try:
        stored = Config.from_dict(manifest["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: stored config is not valid: {e}") from None
    diff = [] if config is None else _ck.config_changes(stored, config, recipe=False)
    if diff:
        raise CheckpointError(f"{path}: checkpoint is from another model: {'; '.join(diff)} (checkpoint != expected)")
    check_manifest(manifest, path, stored)
    return stored
