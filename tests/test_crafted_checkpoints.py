"""Crafted checkpoints (issue 18: defects 1, 2, 3 and the inspect/generate part of 9; Deliver 7): a checkpoint
folder's entries are never followed through a symlink, a checkpoint file holds its own data only, and a manifest's
fields are checked against the rank files and the directory name. Every refusal is one line (a CheckpointError), and
nothing outside the run folder is read, written or removed: a sentinel folder beside it is compared, byte for byte
and mtime for mtime, before and after listing, loading (whole, and by each rank's spans), saving onto the crafted
folder, retention and remove_all.

The crafted files start from a real checkpoint of a tiny model (tests/crafted_checkpoints.py), sealed again by the
crafter with correct digests, so each case is refused for what it is, not for a checksum."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crafted_checkpoints import (CONFIG, RUN_ID, SECRET_BYTES, SHARDED_STEP, SINGLE_STEP, craft_dataset,
                                 craftable_datasets, rewrite_manifest, save_sharded_job, save_single, snapshot)
from trinity.cli.main import main
from trinity.distributed import sharded_checkpoint as sc
from trinity.distributed.layout import Layout
from trinity.distributed.plan import ParallelPlan
from trinity.distributed.sharded_checkpoint import ShardedCheckpointManager, load_sharded, load_spans
from trinity.reference.training.checkpoint import (CheckpointCorrupt, CheckpointError, CheckpointManager,
                                                   CheckpointWriteError, load_checkpoint)

LAYOUT = "dp_shard=2,ep=2"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A checkpoint folder holding step_00000002.h5 and step_00000004.sharded (2 ranks) of run-a."""
    folder = tmp_path_factory.mktemp("pristine") / "ckpt"
    save_single(ShardedCheckpointManager(folder, keep_last=None, run_id=RUN_ID), SINGLE_STEP)
    assert all(isinstance(p, str) for p in save_sharded_job(folder, SHARDED_STEP, LAYOUT))
    return str(folder)


def make_world(root, pristine) -> tuple[str, str]:
    """(run/ckpt, outside): a copy of the pristine checkpoints in root/run/ckpt, and a sentinel folder root/outside
    holding what a symlink could reach: a copy of every checkpoint file, spare rank files, a secret file."""
    ckpt, outside = os.path.join(root, "run", "ckpt"), os.path.join(root, "outside")
    shutil.copytree(pristine, ckpt)
    shutil.copytree(os.path.join(pristine, f"step_{SHARDED_STEP:08d}.sharded"), outside)
    shutil.copy(os.path.join(pristine, f"step_{SINGLE_STEP:08d}.h5"), outside)
    shutil.copy(os.path.join(outside, "rank_00000.h5"), os.path.join(outside, "rank_00005.h5"))
    with open(os.path.join(outside, "secret.bin"), "wb") as f:
        f.write(bytes(range(256)) * (SECRET_BYTES // 256))
    os.makedirs(os.path.join(outside, "nested"))
    with open(os.path.join(outside, "nested", "keep.txt"), "w") as f:
        f.write("keep")
    return ckpt, outside


def sharded_dir(ckpt, step=SHARDED_STEP) -> str:
    return os.path.join(ckpt, f"step_{step:08d}.sharded")


def single_file(ckpt, step=SINGLE_STEP) -> str:
    return os.path.join(ckpt, f"step_{step:08d}.h5")


def assert_one_line(error: Exception) -> None:
    assert isinstance(error, CheckpointError), repr(error)
    assert "\n" not in str(error) and str(error), repr(error)


def refused(fn, *args, kind=CheckpointError) -> CheckpointError:
    with pytest.raises(kind) as caught:
        fn(*args)
    assert_one_line(caught.value)
    return caught.value


# ---- defect 1: symlinks are never followed -----------------------------------------------------------------------
def test_a_save_onto_a_symlinked_sharded_step_is_refused_and_the_target_untouched(tmp_path, pristine):
    ckpt, outside = make_world(tmp_path, pristine)
    os.symlink(outside, sharded_dir(ckpt, 6))
    before = snapshot(outside)
    results = save_sharded_job(ckpt, 6, LAYOUT)
    for error in results:  # every rank: one line, naming the link
        assert isinstance(error, CheckpointWriteError) and "symbolic link" in str(error), error
        assert_one_line(error)
    assert snapshot(outside) == before  # manifest.json and the spare rank_00005.h5 are still there, unwritten
    assert os.path.islink(sharded_dir(ckpt, 6))


def test_listing_retention_and_remove_all_skip_symlinked_steps(tmp_path, pristine):
    """Links to a valid sharded checkpoint, to a valid single file and to nothing are not checkpoints: not listed,
    not loaded, not removed by retention or remove_all (which before this crashed in shutil.rmtree on the link)."""
    ckpt, outside = make_world(tmp_path, pristine)
    os.symlink(outside, sharded_dir(ckpt, 7))
    os.symlink(os.path.join(outside, f"step_{SINGLE_STEP:08d}.h5"), single_file(ckpt, 8))
    os.symlink(os.path.join(tmp_path, "nowhere"), sharded_dir(ckpt, 9))
    before = snapshot(outside)
    manager = ShardedCheckpointManager(ckpt, keep_last=1, run_id=RUN_ID)
    assert manager.list() == [single_file(ckpt), sharded_dir(ckpt)]
    ck, skipped = manager.load_newest_valid(CONFIG)
    assert ck.step == SHARDED_STEP and skipped == []
    save_single(manager, 5)  # retention: keeps step 5 only
    assert manager.list() == [single_file(ckpt, 5)]
    assert manager.remove_all() == [single_file(ckpt, 5)]
    assert sorted(os.listdir(ckpt)) == ["step_00000007.sharded", "step_00000008.h5", "step_00000009.sharded"]
    assert snapshot(outside) == before


def test_symlinked_files_inside_a_sharded_step_are_not_followed(tmp_path, pristine):
    """A manifest.json or rank file that is a link (here to a byte-identical copy outside) is not read."""
    ckpt, outside = make_world(tmp_path, pristine)
    step = sharded_dir(ckpt)
    os.remove(os.path.join(step, "rank_00001.h5"))
    os.symlink(os.path.join(outside, "rank_00001.h5"), os.path.join(step, "rank_00001.h5"))
    error = refused(load_sharded, step, kind=CheckpointCorrupt)
    assert "rank_00001.h5" in str(error) and "not a regular file" in str(error)
    os.remove(os.path.join(step, "manifest.json"))
    os.symlink(os.path.join(outside, "manifest.json"), os.path.join(step, "manifest.json"))
    assert "manifest.json" in str(refused(load_sharded, step, kind=CheckpointCorrupt))
    manager = ShardedCheckpointManager(ckpt, keep_last=None, run_id=RUN_ID)
    before = snapshot(outside)
    assert manager.list() == [single_file(ckpt)]  # without a regular manifest: an interrupted save
    save_single(manager, 5)  # removes the interrupted save: the links inside, not their targets
    assert not os.path.exists(step) and snapshot(outside) == before


def test_a_planted_temporary_symlink_is_not_written_through(tmp_path, pristine):
    ckpt, outside = make_world(tmp_path, pristine)
    secret = os.path.join(outside, "secret.bin")
    os.symlink(secret, single_file(ckpt, 6) + f".tmp-{os.getpid()}")
    before = snapshot(outside)
    path = save_single(CheckpointManager(ckpt, keep_last=None, run_id=RUN_ID), 6)
    assert snapshot(outside) == before
    assert not os.path.islink(path) and load_checkpoint(path).step == 6


@pytest.mark.parametrize("manager_class", [CheckpointManager, ShardedCheckpointManager])
def test_a_single_file_save_onto_a_symlink_is_refused(tmp_path, pristine, manager_class):
    ckpt, outside = make_world(tmp_path, pristine)
    os.symlink(os.path.join(outside, "secret.bin"), single_file(ckpt, 6))
    before = snapshot(outside)
    manager = manager_class(ckpt, keep_last=1, run_id=RUN_ID)
    error = refused(save_single, manager, 6, kind=CheckpointWriteError)
    assert "symbolic link" in str(error)
    assert snapshot(outside) == before and os.path.islink(single_file(ckpt, 6))


# ---- defect 2: a checkpoint file holds its own data only ---------------------------------------------------------
KINDS = ["external", "virtual", "chunked", "compact", "unsealed_range"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_single_file_with_data_stored_elsewhere_is_corrupt_naming_the_dataset(tmp_path, pristine, kind):
    ckpt, outside = make_world(tmp_path, pristine)
    path = single_file(ckpt)
    target = "params/model.embed_tokens.weight"
    craft_dataset(path, target, kind, outside)
    error = refused(load_checkpoint, path, kind=CheckpointCorrupt)
    assert path in str(error) and target in str(error)
    spans = [attempt(load_spans, path, CONFIG, ParallelPlan(CONFIG, Layout.parse(LAYOUT)), r) for r in range(2)]
    assert all(isinstance(e, CheckpointCorrupt) and path in str(e) and target in str(e) for e in spans)
    ck, skipped = ShardedCheckpointManager(ckpt, keep_last=None).load_newest_valid(CONFIG)
    assert ck.step == SHARDED_STEP and skipped == []  # the newest is fine; a direct load of step 2 is refused


@pytest.mark.parametrize("kind", KINDS)
def test_a_rank_file_with_data_stored_elsewhere_is_corrupt_naming_the_dataset(tmp_path, pristine, kind):
    ckpt, outside = make_world(tmp_path, pristine)
    rank_file = os.path.join(sharded_dir(ckpt), "rank_00001.h5")
    target = craftable_datasets(rank_file)[0]
    craft_dataset(rank_file, target, kind, outside)
    rewrite_manifest(sharded_dir(ckpt), lambda body: None)  # the manifest lists the crafted file's sha256
    error = refused(load_sharded, sharded_dir(ckpt), kind=CheckpointCorrupt)
    assert rank_file in str(error) and target.split("/")[1] in str(error)
    spans = [attempt(load_spans, sharded_dir(ckpt), CONFIG, ParallelPlan(CONFIG, Layout.parse(LAYOUT)), r)
             for r in range(2)]  # rank 1 reads its own shards: the crafted one among them
    assert isinstance(spans[1], CheckpointCorrupt) and rank_file in str(spans[1]), spans[1]
    assert target.split("/")[1] in str(spans[1])
    ck, skipped = ShardedCheckpointManager(ckpt, keep_last=None).load_newest_valid(CONFIG)
    assert ck.step == SINGLE_STEP and [p for p, _ in skipped] == [sharded_dir(ckpt)]


# ---- defect 3: the manifest's fields are checked -----------------------------------------------------------------
def _set(field, value):
    return lambda body: body.__setitem__(field, value)


MANIFEST_EDITS = {
    "step of another step": (_set("step", 2), "step"),
    "negative step": (_set("step", -5), "step"),
    "text step": (_set("step", "x"), "step"),
    "boolean step": (_set("step", True), "step"),
    "huge num_experts": (_set("num_experts", 10**12), "num_experts"),
    "world_size": (_set("world_size", 3), "world_size"),
    "layout of another world": (_set("layout", "dp_shard=4"), "layout"),
    "not a layout": (_set("layout", "nonsense"), "layout"),
    "another run": (_set("run_id", "run-b"), "run_id"),
    "experts": (lambda body: body["ranks"][1].__setitem__("experts", [0, 10**12]), "ranks[1]"),
    "ranks swapped": (lambda body: body["ranks"].reverse(), "rank"),
    "a layout ep cannot split": (_set("layout", "dp_replicate=2,ep=2"), "layout"),
    "a layout not as saved": (_set("layout", "dp_shard=2, ep=2"), "layout"),
    "an unknown field": (_set("extra", 1), "extra"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_manifest_fields_are_checked_against_rank_files_and_directory_name(tmp_path, pristine, case):
    edit, field = MANIFEST_EDITS[case]
    ckpt, _ = make_world(tmp_path, pristine)
    rewrite_manifest(sharded_dir(ckpt), edit)
    error = refused(load_sharded, sharded_dir(ckpt), kind=CheckpointCorrupt)
    assert field in str(error)
    ck, skipped = ShardedCheckpointManager(ckpt, keep_last=None).load_newest_valid(CONFIG)
    assert ck.step == SINGLE_STEP and [p for p, _ in skipped] == [sharded_dir(ckpt)]


def test_a_renamed_checkpoint_is_corrupt(tmp_path, pristine):
    """The step in a name is the step a resume continues at: a file or directory renamed to another step is not it."""
    ckpt, _ = make_world(tmp_path, pristine)
    os.rename(single_file(ckpt), single_file(ckpt, 3))
    assert "step 2, not the step 3" in str(refused(load_checkpoint, single_file(ckpt, 3), kind=CheckpointCorrupt))
    os.rename(sharded_dir(ckpt), sharded_dir(ckpt, 5))
    assert "step" in str(refused(load_sharded, sharded_dir(ckpt, 5), kind=CheckpointCorrupt))
    ck, skipped = ShardedCheckpointManager(ckpt, keep_last=None).load_newest_valid(CONFIG)
    assert ck is None and len(skipped) == 2


# ---- the inspect/generate part of defect 9 -----------------------------------------------------------------------
@pytest.mark.parametrize("command", [["inspect", "--tokens", "1,2"], ["generate", "--prompt-tokens", "1",
                                                                     "--max-new-tokens", "1"]])
def test_inspect_and_generate_name_an_interrupted_save(tmp_path, pristine, capsys, command):
    ckpt, _ = make_world(tmp_path, pristine)
    os.remove(os.path.join(sharded_dir(ckpt), "manifest.json"))
    tmp_file = single_file(ckpt) + ".tmp-12345"
    os.rename(single_file(ckpt), tmp_file)
    for spec, what in ((sharded_dir(ckpt), "incomplete sharded checkpoint"), (tmp_file, "unfinished checkpoint")):
        assert main([command[0], spec, *command[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0] and "HF" not in err[0], err


_OPENED: list | None = None  # the paths opened while a test records them (an audit hook sees every open)
_HOOKED = []


def _record_opens(event, args):
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


def _start_recording() -> None:
    global _OPENED
    if not _HOOKED:  # an audit hook cannot be removed: one per process, idle while _OPENED is None
        sys.addaudithook(_record_opens)
        _HOOKED.append(True)
    _OPENED = []


@pytest.mark.parametrize("command", [["inspect", "--tokens", "1,2"], ["generate", "--prompt-tokens", "1",
                                                                     "--max-new-tokens", "1"]])
def test_inspect_and_generate_never_open_a_path_the_checkpoint_names(tmp_path, capsys, command):
    """The checkpoint records a run file (as `trinity train` writes it) whose data is a prepared dataset: neither the
    run file nor the dataset is opened; the tokenizer is the one the checkpoint carries, else none."""
    global _OPENED
    named = tmp_path / "named"
    (named / "data").mkdir(parents=True)
    (named / "data" / "meta.json").write_text('{"tokenizer": {"kind": "bytes"}}')
    (named / "run.toml").write_text('[model]\npreset = "tiny"\n[data]\npath = "data"\n')
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=None)
    path = save_single(manager, 1)
    ck = load_checkpoint(path)
    ck.extra["run_file"] = str(named / "run.toml")
    path = CheckpointManager(tmp_path / "ckpt2", keep_last=None).save(1, **{k: v for k, v in ck.as_kwargs().items()
                                                                            if k != "step"})
    _start_recording()
    try:
        assert main([command[0], path, *command[1:]]) == 0
    finally:
        opened, _OPENED = _OPENED, None
    capsys.readouterr()
    assert not [p for p in opened if p.startswith(str(named))], opened
    assert main(["inspect", path, "--text", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "carries no tokenizer" in err[0], err


# ---- Deliver 7: any crafted checkpoint: a one-line error or a skip, and nothing outside the run folder changes ----
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**13), st.text(max_size=6),
                        st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(-2, 9), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
                        st.sampled_from(["dp_shard=2,ep=2", "dp_shard=2", "dp_shard=4", "single", "run-a", "run-b"]))
LINKS = st.tuples(st.just("link"), st.sampled_from(["sharded_dir", "h5_file", "manifest", "rank", "tmp"]),
                  st.sampled_from(["outside_dir", "outside_file", "dangling"]))
DATASETS = st.tuples(st.just("dataset"), st.sampled_from(["single", "rank_00000.h5", "rank_00001.h5"]),
                     st.sampled_from(KINDS), st.integers(0, 10**6))
MANIFEST_FIELDS = st.tuples(st.just("manifest"), st.sampled_from(["step", "world_size", "layout", "num_experts",
                                                                  "run_id", "ranks", "buckets", "replicated",
                                                                  "format_version", "config"]),
                            JSON_VALUES, st.booleans())
RANK_FIELDS = st.tuples(st.just("rank_field"), st.integers(0, 1),
                        st.sampled_from(["ep_rank", "experts", "shards", "file", "sha256"]), JSON_VALUES)
BUCKET_FIELDS = st.tuples(st.just("bucket_field"), st.integers(0, 10**6),
                          st.sampled_from(["padded", "shapes", "offsets", "expert", "keys", "state", "size"]),
                          JSON_VALUES)
CRAFTS = st.one_of(LINKS, DATASETS, MANIFEST_FIELDS, RANK_FIELDS, BUCKET_FIELDS)


def craft(craft_case, root, ckpt, outside) -> tuple[int, int]:
    """Apply one crafted change to the checkpoint folder; return the (single-file, sharded) steps a save then
    writes onto: the crafted entry's own step where it has one."""
    kind = craft_case[0]
    if kind == "link":
        _, where, target = craft_case
        if where in ("sharded_dir", "h5_file", "tmp"):
            name = {"sharded_dir": sharded_dir(ckpt, 6), "h5_file": single_file(ckpt, 6),
                    "tmp": single_file(ckpt, 6) + f".tmp-{os.getpid()}"}[where]
            file = os.path.join(outside, "secret.bin" if where == "tmp" else f"step_{SINGLE_STEP:08d}.h5")
        else:
            name = os.path.join(sharded_dir(ckpt), "manifest.json" if where == "manifest" else "rank_00001.h5")
            file = os.path.join(outside, os.path.basename(name))
            os.remove(name)
        os.symlink({"outside_dir": outside, "outside_file": file, "dangling": os.path.join(root, "nowhere")}[target],
                   name)
        return (6, 6) if where != "manifest" and where != "rank" else (SINGLE_STEP, SHARDED_STEP)
    if kind == "dataset":
        _, which, storage, index = craft_case
        path = single_file(ckpt) if which == "single" else os.path.join(sharded_dir(ckpt), which)
        names = craftable_datasets(path)
        craft_dataset(path, names[index % len(names)], storage, outside)
        if which != "single":
            rewrite_manifest(sharded_dir(ckpt), lambda body: None)
    elif kind == "manifest":
        _, field, value, delete = craft_case
        rewrite_manifest(sharded_dir(ckpt), lambda body: body.pop(field) if delete else body.__setitem__(field, value))
    elif kind == "rank_field":
        _, rank, field, value = craft_case
        rewrite_manifest(sharded_dir(ckpt), lambda body: body["ranks"][rank].__setitem__(field, value))
    else:
        _, index, field, value = craft_case

        def edit(body):
            name = sorted(body["buckets"])[index % len(body["buckets"])]
            body["buckets"][name][field] = value
        rewrite_manifest(sharded_dir(ckpt), edit)
    return SINGLE_STEP, SHARDED_STEP


def attempt(fn, *args):
    """fn's result, or the CheckpointError it raised, checked to be one line."""
    try:
        return fn(*args)
    except CheckpointError as e:
        assert_one_line(e)
        return e


def step_of(path) -> int:
    return int(os.path.basename(path).split("_")[1].split(".")[0])


@given(craft_case=CRAFTS)
def test_any_crafted_checkpoint_is_a_one_line_error_or_a_skip_and_nothing_outside_changes(pristine, craft_case):
    with tempfile.TemporaryDirectory() as root:
        ckpt, outside = make_world(root, pristine)
        single_step, sharded_step = craft(craft_case, root, ckpt, outside)
        links = {os.path.join(here, n) for here, dirs, files in os.walk(ckpt) for n in dirs + files
                 if os.path.islink(os.path.join(here, n))}
        before = snapshot(outside)
        manager = ShardedCheckpointManager(ckpt, keep_last=1, run_id=RUN_ID)
        for path in manager.list():
            assert not os.path.islink(path)
            loaded = attempt(manager.load, path, CONFIG)
            assert isinstance(loaded, CheckpointError) or loaded.step == step_of(path)
        newest = attempt(manager.load_newest_valid, CONFIG)
        assert isinstance(newest, CheckpointError) or newest[0] is None or newest[0].step in (SINGLE_STEP,
                                                                                              SHARDED_STEP)
        if craft_case[0] == "dataset" or craft_case[:2] in (("link", "manifest"), ("link", "rank")):
            crafted = single_file(ckpt) if craft_case[1] == "single" else sharded_dir(ckpt)
            assert isinstance(attempt(manager.load, crafted, CONFIG), CheckpointCorrupt)
        plan = ParallelPlan(CONFIG, Layout.parse(LAYOUT))  # span reads (a resume under a layout), rank by rank
        for path in manager.list():
            for rank in range(2):
                loaded = attempt(manager.load_spans, path, CONFIG, plan, rank)
                assert isinstance(loaded, CheckpointError) or loaded.step == step_of(path)
        newest = [attempt(manager.load_newest_valid_spans, CONFIG, plan, rank) for rank in range(2)]
        assert all(isinstance(n, CheckpointError) or n[0] is None or n[0].step in (SINGLE_STEP, SHARDED_STEP)
                   for n in newest)
        if craft_case[:2] == ("dataset", "single"):  # every dataset of a single file is read by some rank
            assert any(isinstance(attempt(manager.load_spans, single_file(ckpt), CONFIG, plan, rank), CheckpointCorrupt)
                       for rank in range(2))
        assert snapshot(outside) == before
        attempt(save_single, manager, single_step)  # a save onto the crafted entry, with retention
        for result in save_sharded_job(ckpt, sharded_step, "single", keep_last=1):
            assert isinstance(result, str) or (assert_one_line(result) is None)
        assert snapshot(outside) == before
        manager.remove_all()
        assert manager.list() == [] and snapshot(outside) == before
        kept = [link for link in links if ".tmp-" not in link and os.path.exists(os.path.dirname(link))]
        assert all(os.path.islink(link) for link in kept)  # a step entry that is a link is never removed
