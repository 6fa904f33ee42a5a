"""Checkpoints (reference/training/checkpoint.py): bit-exact round trips, atomic writes under real crashes (SIGKILL in a
child process, and exceptions in-process), clear errors for damaged or foreign files, and retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from trinity.reference import Config, init_params
from trinity.reference.files import atomic_path
from trinity.reference.training.checkpoint import (FORMAT_VERSION, CheckpointCorrupt, CheckpointError,
                                                   CheckpointManager, load_checkpoint, read_run_id, restore_rng,
                                                   save_checkpoint)
from trinity.reference.training.sealed_file import read_header, seal

TINY = dict(vocab_size=32, hidden_size=8, intermediate_size=12, moe_intermediate_size=4, num_hidden_layers=2,
            num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=4,
            num_experts_per_tok=2, num_shared_experts=1, sliding_window=8, max_position_embeddings=64)


def tiny_config(**changes) -> Config:
    return Config(**{**TINY, **changes})


def make_state(config: Config, seed: int = 0, dtype=np.float32) -> dict:
    """Every argument of save_checkpoint but path and step, with keys like the real optimizer's."""
    params = init_params(config, seed=seed, dtype=dtype)
    r = np.random.default_rng(seed)
    optimizer = {"step": np.asarray(7 + seed, dtype=np.int64), "lr": np.asarray(3e-4)}
    for key, value in params.items():
        optimizer[f"muon.momentum/{key}"] = r.standard_normal(value.shape).astype(dtype)
    optimizer["adamw.exp_avg_sq/%odd/.key"] = r.random(3)  # keys with "%" and "/" survive the escape
    balancing = {"model.layers.1.mlp.momentum": r.standard_normal(config.num_experts),
                 "updates": np.arange(5, dtype=np.int32), "flags": np.array([True, False])}
    rng = np.random.default_rng(1234 + seed)
    rng.random(3)
    return dict(config=config, params=params, optimizer_state=optimizer, balancing_state=balancing,
                tokens_seen=10**12 + seed, data_state={"epoch": 2, "doc_cursor": 5, "doc_offset": 3, "order": [1, 2]},
                rng_state=rng.bit_generator.state, extra={"note": "ünïcode", "loss": 2.5})


def reseal(path) -> None:
    """Seal a file edited with h5py anew, as a crafted file would be: the checks behind the seal must still hold."""
    with h5py.File(path, "r") as f:
        ranges = {}
        for group in f:
            for name in f[group]:
                obj = f[group].get(name, getlink=True)
                ds = f[group][name] if isinstance(obj, h5py.HardLink) else None
                offset = ds.id.get_offset() if isinstance(ds, h5py.Dataset) else None
                ranges[f"{group}/{name}"] = (offset or 0, ds.id.get_storage_size() if offset is not None else 0)
    meta = read_header(path)["meta"]
    data = bytearray(open(path, "rb").read())
    seal(data, read_header(path)["size"], ranges, meta)
    with open(path, "wb") as f:
        f.write(data)


def assert_same_arrays(a: dict, b: dict):
    assert list(a) == list(b)  # same keys, same order
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key  # bit-exact, NaN payloads included


# ---- round trips --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    config = tiny_config()
    state = make_state(config, dtype=dtype)
    state["params"]["model.norm.weight"][0] = np.nan  # odd values too (a library caller may store them)
    with pytest.raises(CheckpointError, match=r"params\['model.norm.weight'\] holds NaN or infinity"):
        save_checkpoint(tmp_path / "a.h5", step=42, **state)  # but not by default: a training run never does
    assert not os.path.exists(tmp_path / "a.h5")
    path = save_checkpoint(tmp_path / "a.h5", step=42, require_finite=False, **state)
    ck = load_checkpoint(path, config=config)
    assert ck.config == config and ck.step == 42 and ck.tokens_seen == state["tokens_seen"]
    assert ck.format_version == FORMAT_VERSION and ck.path == str(tmp_path / "a.h5")
    assert_same_arrays(ck.params, state["params"])
    assert_same_arrays(ck.optimizer_state, state["optimizer_state"])
    assert_same_arrays(ck.balancing_state, state["balancing_state"])
    assert ck.optimizer_state["step"].shape == () and int(ck.optimizer_state["step"]) == 7
    assert ck.data_state == state["data_state"] and ck.extra == state["extra"]
    assert ck.rng_state == state["rng_state"]
    # Saving what was loaded gives the same checkpoint again.
    save_checkpoint(tmp_path / "b.h5", require_finite=False, **ck.as_kwargs())
    again = load_checkpoint(tmp_path / "b.h5")
    assert_same_arrays(again.params, ck.params) and again.step == 42


@pytest.mark.parametrize("name", ["PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937"])
def test_rng_state_restores_the_same_stream(tmp_path, name):
    config = tiny_config()
    state = make_state(config)
    rng = np.random.Generator(getattr(np.random, name)(99))
    rng.standard_normal(11)
    rng.random()  # leave a cached uint32 / gauss state behind where the generator has one
    state["rng_state"] = rng  # a Generator is accepted too
    save_checkpoint(tmp_path / "r.h5", step=1, **state)
    restored = load_checkpoint(tmp_path / "r.h5").rng()
    assert np.array_equal(restored.random(20), rng.random(20))
    assert np.array_equal(restored.integers(0, 2**62, 10), rng.integers(0, 2**62, 10))
    as_json = lambda g: json.dumps(g.bit_generator.state, default=lambda a: a.tolist(), sort_keys=True)  # noqa
    assert as_json(restored) == as_json(rng)


def test_no_rng_state_and_scalars(tmp_path):
    config = tiny_config()
    state = make_state(config)
    state.update(rng_state=None, extra=None, data_state={"epoch": np.int64(3)})
    ck = load_checkpoint(save_checkpoint(tmp_path / "n.h5", step=0, **state))
    assert ck.rng_state is None and ck.extra == {} and ck.data_state == {"epoch": 3}


# ---- crashes ------------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import h5py
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_state, tiny_config
    from trinity.reference.training.checkpoint import CheckpointManager
    directory, kill_at = sys.argv[1], sys.argv[2]
    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if kill_at == "half_written":
        from trinity.reference.training import checkpoint
        def write_half(out, offset, data):
            out.seek(offset)
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())  # some bytes really are on disk in the temp file
            die()
        checkpoint._write_range = write_half
    elif kill_at == "before_replace":
        os.replace = lambda *a: die()
    CheckpointManager(directory, keep_last=1).save(20, **make_state(tiny_config(), seed=1))
    print("not killed")
""")


@pytest.mark.parametrize("kill_at", ["half_written", "before_replace"])
def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path, kill_at):
    config = tiny_config()
    manager = CheckpointManager(tmp_path, keep_last=1)
    previous = manager.save(10, **make_state(config))
    before = open(previous, "rb").read()
    script = CHILD.format(tests=os.path.dirname(__file__))
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), kill_at], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, output
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert leftovers == [f"step_00000020.h5.tmp-{child.pid}"]  # the dead writer's temp file, nothing else
    assert not os.path.exists(manager.path_for(20))  # no partial file at the final path
    assert manager.latest() == previous and manager.list() == [previous]
    assert open(previous, "rb").read() == before
    ck = load_checkpoint(manager.latest(), config=config)
    assert ck.step == 10 and ck.rng_state == make_state(config)["rng_state"]
    if kill_at == "before_replace":  # the temp file was complete, yet it is not mistaken for a checkpoint
        assert load_checkpoint(os.path.join(tmp_path, leftovers[0])).step == 20
    # The next save cleans up the dead writer's leftover and applies retention.
    newer = manager.save(30, **make_state(config))
    assert sorted(os.listdir(tmp_path)) == ["step_00000030.h5"] and manager.latest() == newer


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_after", [0, 1, 5])
def test_exception_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_after):
    config = tiny_config()
    path = tmp_path / "ck.h5"
    save_checkpoint(path, step=1, **make_state(config))
    before = path.read_bytes()
    from trinity.reference.training import checkpoint
    original, calls = checkpoint._reserve_dataset, []

    def reserve_dataset(*args, **kwargs):
        if len(calls) == fail_after:
            raise Boom("disk on fire")
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_reserve_dataset", reserve_dataset)
    with pytest.raises(Boom):
        save_checkpoint(path, step=2, **make_state(config, seed=1))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ck.h5"]  # temp file removed, nothing partial left
    assert path.read_bytes() == before and load_checkpoint(path, config).step == 1


def test_atomic_path_leaves_target_alone_on_error(tmp_path):
    target = tmp_path / "x"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise Boom()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["x"]


# ---- errors -------------------------------------------------------------------------------------------------------
def test_truncated_file_names_the_path(tmp_path):
    path = save_checkpoint(tmp_path / "t.h5", step=3, **make_state(tiny_config()))
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 100, 0):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(CheckpointError, match="t.h5"):
            load_checkpoint(path)


def test_corrupt_bytes_and_missing_file(tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(CheckpointError, match="c.h5.*truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint file at .*missing.h5"):
        load_checkpoint(tmp_path / "missing.h5")


def test_wrong_model_names_the_field(tmp_path):
    path = save_checkpoint(tmp_path / "m.h5", step=3, **make_state(tiny_config()))
    with pytest.raises(CheckpointError, match=r"another model: hidden_size 8 != 16"):
        load_checkpoint(path, config=tiny_config(hidden_size=16))
    with pytest.raises(CheckpointError, match=r"num_experts 4 != 8.*num_experts_per_tok 2 != 3"):
        load_checkpoint(path, config=tiny_config(num_experts=8, num_experts_per_tok=3))


def test_unknown_version_names_the_version(tmp_path):
    path = save_checkpoint(tmp_path / "v.h5", step=3, **make_state(tiny_config()))
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 6
    with pytest.raises(CheckpointCorrupt, match="structure .* fails the file's sha256 checksum"):
        load_checkpoint(path)  # an edit the seal does not cover
    reseal(path)
    with pytest.raises(CheckpointError, match=f"format_version {FORMAT_VERSION + 6} is not supported"):
        load_checkpoint(path)
    with h5py.File(path, "r+") as f:
        del f.attrs["format_version"]
    reseal(path)
    with pytest.raises(CheckpointError, match="no format_version"):
        load_checkpoint(path)


def test_params_that_do_not_match_the_stored_config(tmp_path):
    config = tiny_config()
    path = save_checkpoint(tmp_path / "p.h5", step=3, **make_state(config))
    with h5py.File(path, "r+") as f:
        del f["params/model.norm.weight"]
    with pytest.raises(CheckpointCorrupt, match="p.h5: its structure .* fails the file's sha256 checksum"):
        load_checkpoint(path)  # any edit breaks the seal
    header = read_header(path)  # a seal that lists a dataset the file does not hold
    data = bytearray(open(path, "rb").read())
    seal(data, header["size"], {**{k: tuple(v[:2]) for k, v in header["ranges"].items()}, "params/ghost": (0, 0)},
         header["meta"])
    open(path, "wb").write(data)
    with pytest.raises(CheckpointCorrupt, match="p.h5: its datasets are not the ones it was sealed with"):
        load_checkpoint(path)
    reseal(path)
    with pytest.raises(CheckpointError, match="p.h5.*model.norm.weight"):
        load_checkpoint(path)
    with h5py.File(path, "r+") as f:  # a well-formed file (valid seal) whose params do not fit the config
        f["params/model.norm.weight"] = np.zeros(5, np.float32)
    reseal(path)
    with pytest.raises(CheckpointError, match=r"model.norm.weight: expected shape \(8,\), found \(5,\)"):
        load_checkpoint(path)
    state = make_state(config)
    state["params"]["model.embed_tokens.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight"):
        save_checkpoint(tmp_path / "q.h5", step=0, **state)
    assert not os.path.exists(tmp_path / "q.h5")


def test_refuses_non_numeric_datasets_links_and_unknown_rng(tmp_path):
    config = tiny_config()
    path = save_checkpoint(tmp_path / "s.h5", step=3, **make_state(config))
    with h5py.File(path, "r+") as f:
        f["balancing/text"] = "a string"
    reseal(path)
    with pytest.raises(CheckpointError, match="balancing/text is not a plain numeric dataset"):
        load_checkpoint(path)
    with h5py.File(path, "r+") as f:
        del f["balancing/text"]
        f["balancing/link"] = h5py.SoftLink("/params/model.norm.weight")
    reseal(path)
    with pytest.raises(CheckpointError, match="balancing/link is a link"):
        load_checkpoint(path)
    with h5py.File(path, "r+") as f:
        del f["balancing/link"]
        f.attrs["rng_state"] = json.dumps({"bit_generator": "os.system", "state": {}})
    reseal(path)  # a crafted file with a valid seal
    with pytest.raises(CheckpointError, match="unknown bit generator 'os.system'"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="unknown bit generator"):
        restore_rng({"bit_generator": "Nope"})
    state = make_state(config)
    state["optimizer_state"]["bad"] = np.array(["x"])
    with pytest.raises(CheckpointError, match=r"optimizer_state\['bad'\]: dtype <U1 is not numeric"):
        save_checkpoint(tmp_path / "u.h5", step=0, **state)
    with pytest.raises(CheckpointError, match="step must be a non-negative integer"):
        save_checkpoint(tmp_path / "u.h5", **{**make_state(config), "step": -1})


# ---- manager ------------------------------------------------------------------------------------------------------
def test_keep_last_retention(tmp_path):
    config = tiny_config()
    state = make_state(config)
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    assert manager.latest() is None and manager.list() == [] and manager.load_latest() is None
    paths = [manager.save(step, **state) for step in (0, 5, 10, 100_000_000)]
    assert os.path.basename(paths[0]) == "step_00000000.h5"
    assert manager.list() == paths[2:] and manager.latest() == paths[3]
    assert manager.load_latest(config).step == 100_000_000
    # Saving an older step (a rollback) never deletes the file just written.
    rollback = manager.save(7, **state)
    assert os.path.exists(rollback) and paths[3] in manager.list() and len(manager.list()) == 2
    keep_all = CheckpointManager(tmp_path / "all", keep_last=None)
    for step in range(4):
        keep_all.save(step, **state)
    assert len(keep_all.list()) == 4
    keep_one = CheckpointManager(tmp_path / "one", keep_last=1)
    for step in range(3):
        written = keep_one.save(step, **state)
        assert keep_one.list() == [written]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_latest_ignores_leftovers_of_live_writers(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    first = manager.save(1, **make_state(tiny_config()))
    live = tmp_path / f"step_00000009.h5.tmp-{os.getpid()}"
    live.write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("other files are left alone")
    assert manager.latest() == first and manager.clean_tmp() == []
    assert live.exists() and (tmp_path / "notes.txt").exists()


# ---- verification, fallback, run ownership, carried tokenizer ---------------------------------------------------
def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


@pytest.mark.parametrize("group,key", [("params", "model.layers.1.mlp.experts.down_proj"),
                                       ("optimizer", "lr"), ("balancing", "updates")])
def test_flipped_bytes_in_a_dataset_are_named(tmp_path, group, key):
    path = save_checkpoint(tmp_path / "f.h5", step=3, **make_state(tiny_config()))
    with h5py.File(path, "r") as f:
        ds = f[f"{group}/{key}"]
        offset = ds.id.get_offset() + ds.id.get_storage_size() // 2
    _flip_byte(path, offset)
    with pytest.raises(CheckpointCorrupt, match=f"f.h5: {group}/{key} fails its sha256 checksum"):
        load_checkpoint(path)


def test_every_flipped_byte_is_refused(tmp_path):
    """Flip bytes all over a checkpoint (its seal header, HDF5 structure, attributes and data), one at a time: every
    load is a CheckpointCorrupt, found from the bytes before HDF5 parses anything (a damaged structure could make
    HDF5 hang), and every run-id lookup returns the true id or None (never another run's)."""
    path = save_checkpoint(tmp_path / "g.h5", step=3, run_id="r1", **make_state(tiny_config()))
    size = os.path.getsize(path)
    pristine = open(path, "rb").read()
    offsets = list(range(0, size, max(1, size // 300)))
    for offset in offsets:
        _flip_byte(path, offset)
        with pytest.raises(CheckpointCorrupt, match="g.h5: "):
            load_checkpoint(path)
        assert read_run_id(path) in ("r1", None)
        with open(path, "wb") as f:
            f.write(pristine)
    assert len(offsets) >= 300 and load_checkpoint(path).step == 3


def test_manager_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    config = tiny_config()
    manager = CheckpointManager(tmp_path, keep_last=None, run_id="a")
    good = manager.save(10, **make_state(config))
    bad1 = manager.save(20, **make_state(config, seed=1))
    bad2 = manager.save(30, **make_state(config, seed=2))
    with h5py.File(bad1, "r") as f:
        ds = f["params/model.norm.weight"]
        offset = ds.id.get_offset()
    _flip_byte(bad1, offset)
    with open(bad2, "r+b") as f:
        f.truncate(os.path.getsize(bad2) // 2)
    ck, skipped = manager.load_newest_valid(config)
    assert ck.step == 10 and ck.path == good
    assert [p for p, _ in skipped] == [bad2, bad1]
    assert "(truncated?)" in skipped[0][1] and "model.norm.weight fails its sha256" in skipped[1][1]
    with pytest.raises(CheckpointError, match="another model"):  # not corruption: no fallback
        manager.load_newest_valid(tiny_config(hidden_size=16))


def test_retention_removes_only_checkpoints_of_its_own_run(tmp_path):
    config = tiny_config()
    other = CheckpointManager(tmp_path, keep_last=1, run_id="other-run")
    foreign = other.save(50, **make_state(config))
    mine = CheckpointManager(tmp_path, keep_last=1, run_id="my-run")
    paths = [mine.save(step, **make_state(config)) for step in (1, 2, 3)]
    assert sorted(mine.list()) == sorted([foreign, paths[-1]])
    assert load_checkpoint(foreign).run_id == "other-run" and load_checkpoint(paths[-1]).run_id == "my-run"
    assert sorted(mine.remove_all()) == sorted([foreign, paths[-1]]) and mine.list() == []


def test_checkpoint_carries_its_tokenizer_and_data_fingerprint(tmp_path):
    from trinity.reference.data.tokenizer import (ByteTokenizer, load_tokenizer, tokenizer_from_record,
                                                  tokenizer_record, train_bpe)
    bpe = train_bpe(["def main():\n    return 42\n"] * 20 + ["print('hello world')\n"] * 20, 300,
                    tmp_path / "tokenizer.json")
    fingerprint = [{"documents": 7, "tokens": 123, "index_sha256": "ab" * 32}]
    path = save_checkpoint(tmp_path / "t.h5", step=1, tokenizer=tokenizer_record(bpe), data_fingerprint=fingerprint,
                           **make_state(tiny_config()))
    os.remove(tmp_path / "tokenizer.json")  # the checkpoint does not need the original file
    ck = load_checkpoint(path)
    assert ck.data_fingerprint == fingerprint
    tok = tokenizer_from_record(ck.tokenizer, ck.tokenizer_json)
    text = "def main():\n    print('hello world')\n"
    assert tok.encode(text) == bpe.encode(text) and tok.decode(tok.encode(text)) == text
    assert (tok.kind, tok.eos_id, tok.vocab_size) == (bpe.kind, bpe.eos_id, bpe.vocab_size)
    byte_path = save_checkpoint(tmp_path / "b.h5", step=1, tokenizer=tokenizer_record(ByteTokenizer()),
                                **make_state(tiny_config()))
    ck = load_checkpoint(byte_path)
    assert isinstance(tokenizer_from_record(ck.tokenizer, ck.tokenizer_json), ByteTokenizer)
    assert load_tokenizer("bytes").encode("é") == [0xC3, 0xA9]


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    """A file-size limit makes the write fail as a full disk would: one CheckpointWriteError naming the file, the
    previous checkpoint byte-identical, no temporary file left (in a child process, where the limit applies)."""
    manager = CheckpointManager(tmp_path, keep_last=1)
    previous = manager.save(10, **make_state(tiny_config()))
    before = open(previous, "rb").read()
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpoint import make_state, tiny_config
        from trinity.reference.training.checkpoint import CheckpointManager, CheckpointWriteError
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            CheckpointManager({str(tmp_path)!r}, keep_last=1).save(20, **make_state(tiny_config(), seed=1))
        except CheckpointWriteError as e:
            print("refused:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("refused: ") and "step_00000020.h5: cannot write checkpoint (File too large)" \
        in out.stdout
    assert os.listdir(tmp_path) == [os.path.basename(previous)] and open(previous, "rb").read() == before


def test_a_file_sealed_as_it_is_written_has_the_seal_of_its_whole_image(tmp_path):
    """save_checkpoint writes the arrays to their reserved places and seals from the arrays and the structure read
    back (sealed_file.seal_file); sealing the finished file's whole image anew gives the same header byte for byte."""
    path = save_checkpoint(tmp_path / "c.h5", step=3, **make_state(tiny_config(), seed=2))
    data = bytearray(open(path, "rb").read())
    header = read_header(path)
    size = int(data[:64].split(b" ")[1])
    again = bytearray(data)
    again[:size] = b"\0" * size
    seal(again, size, {name: (off, n) for name, (off, n, _) in header["ranges"].items()}, header["meta"],
         header.get("block_size", 0))
    assert bytes(again) == bytes(data)


def test_an_empty_array_of_any_shape_is_written_and_read(tmp_path):
    from trinity.reference.training.checkpoint import write_sealed_hdf5
    from trinity.reference.training.sealed_file import verify
    path = str(tmp_path / "e.h5")
    write_sealed_hdf5(path, {}, {"g": {"x": np.zeros((0, 3)), "y": np.arange(4.0)}}, {})
    verify(path)
    with h5py.File(path, "r") as f:
        assert f["g"]["x"].shape == (0, 3) and f["g"]["y"][()].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_planted_link_at_a_temporary_name_is_never_written_through(tmp_path):
    """atomic_path removes whatever is at its temporary name, and open_new creates the file anew: a symlink planted
    there (pointing at a victim file) is replaced, the victim is untouched (checkpoints, HF weights, config.json)."""
    from trinity.reference.interop.hf import save_pretrained
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        os.symlink(victim, folder / f"{name}.tmp-{os.getpid()}")
    config = tiny_config()
    save_pretrained(folder, config, make_state(config)["params"])
    os.symlink(victim, tmp_path / f"c.h5.tmp-{os.getpid()}")
    save_checkpoint(tmp_path / "c.h5", step=1, **make_state(config))
    assert victim.read_bytes() == b"keep me"
    assert not any(os.path.islink(p) for p in folder.iterdir())
