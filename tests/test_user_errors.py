"""No tracebacks for user errors: every malformed input a user can hand `trinity` ends, through
`trinity.cli.main.main`, in exit status 2 and exactly one line on stderr, `trinity <cmd>: error: ...`, naming the file,
section and key — and nothing the run already had is touched (the checkpoint in the run's checkpoint folder stays
byte-identical, no metrics are written).

Hypothesis draws malformed run files (bytes that are not UTF-8, invalid TOML, unknown keys and sections, values of the
wrong type and bad values in every section, missing keys, a seq_len over the model's max_position_embeddings),
malformed prepared token folders (a cut token shard or index, meta.json missing / not JSON / wrong, token ids over
the vocabulary) and malformed checkpoints (cut short, bytes flipped, not HDF5) for `generate`, `inspect` and
`train --resume`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trinity.cli.main import main
from trinity.run import run_config
from trinity.run.run_config import RunConfigError, check_output_paths, load_run_config
from trinity.reference.data.prepare import prepare
from trinity.reference.data.store import write_token_file
from trinity.reference.data.synthetic import MarkovSource
from trinity.reference.model.config import Config

# The good run file, section by section: (key, TOML value, kind). Kinds pick wrong-typed values below.
SECTIONS = {
    "model": [("preset", '"tiny"', "str"), ("dtype", '"float32"', "str"), ("seed", "0", "int")],
    "model.overrides": [("num_hidden_layers", "2", "int")],
    "data": [("path", '"tokens.bin"', "str"), ("eos_id", "0", "int"), ("seq_len", "16", "int"),
             ("micro_batch_size", "2", "int"), ("seed", "0", "int")],
    "train": [("steps", "1", "int"), ("sequences_per_step", "2", "int"), ("recompute", "false", "bool"),
              ("backend", '"reference"', "str")],
    "optimizer": [("muon_lr", "0.02", "float"), ("adamw_lr", "0.01", "float"), ("weight_decay", "0.0", "float")],
    "schedule": [("warmup_steps", "1", "int"), ("lr_schedule", '"wsd"', "str"),
                 ("decay_start_fraction", "0.6", "float")],
    "balancing": [("method", '"smebu"', "str"), ("smebu_lambda", "0.0005", "float")],
    "loss": [("z_loss_coeff", "1e-6", "float"), ("balance_loss_coeff", "1e-4", "float")],
    "checkpoint": [("dir", '"ckpt"', "str"), ("every", "1", "int"), ("keep_last", "2", "int")],
    "logging": [("metrics", '"metrics.jsonl"', "str"), ("progress", "false", "bool")],
    "parallel": [("dp_replicate", "1", "int"), ("dp_shard", "1", "int"), ("cp", "1", "int"), ("ep", "1", "int")],
}
KEYS = [(section, key, kind) for section, items in SECTIONS.items() for key, _, kind in items]


def render(changes=None, extra=None) -> str:
    """The run file with `changes` {(section, key): TOML value, or None to drop the key} and `extra`
    {section: [lines]} added at the top of a section."""
    changes, extra = changes or {}, extra or {}
    out = []
    for section, items in SECTIONS.items():
        out.append(f"[{section}]")
        out += extra.get(section, [])
        for key, value, _ in items:
            value = changes.get((section, key), value)
            if value is not None:
                out.append(f"{key} = {value}")
    return "\n".join(out) + "\n"


# ---- the run folder: data, and a checkpoint from a real 1-step run ---------------------------------------------
class RunFolder:
    def __init__(self, root):
        self.root = root
        source = MarkovSource(256, eos_id=0, branching=4, mean_doc_len=20, seed=0)
        write_token_file(os.path.join(root, "tokens.bin"), source.documents(3000), eos_id=0)
        texts = os.path.join(root, "texts")
        os.makedirs(texts)
        for i in range(12):
            with open(os.path.join(texts, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
                f.write(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 2))
        prepare([texts], os.path.join(root, "prepared"), use_bytes=True, workers=1, progress=False,
                log=lambda *_: None)
        self.run_file = self.write("run.toml", render())
        assert main(["train", self.run_file]) == 0
        self.ckpt = os.path.join(root, "ckpt")
        self.metrics = os.path.join(root, "metrics.jsonl")
        self.state = self.snapshot()
        assert any(name.endswith(".h5") for name in self.state[0]), self.state[0]
        self.counter = 0

    def write(self, name, content) -> str:
        path = os.path.join(self.root, name)
        with open(path, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def new_name(self, stem, suffix=""):
        self.counter += 1
        return f"{stem}-{self.counter}{suffix}"

    def snapshot(self):
        files = {}
        for name in sorted(os.listdir(os.path.join(self.root, "ckpt"))):
            with open(os.path.join(self.root, "ckpt", name), "rb") as f:
                files[name] = f.read()
        with open(os.path.join(self.root, "metrics.jsonl"), "rb") as f:
            return files, f.read()

    @property
    def checkpoint(self) -> str:
        names = [n for n in self.state[0] if n.endswith(".h5")]
        return os.path.join(self.ckpt, names[-1])


@pytest.fixture(scope="module")
def folder():
    root = tempfile.mkdtemp(prefix="trinity-user-errors-")
    try:
        yield RunFolder(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"trinity {command}: error: "), err
    return err[0]


def check_train_fails(folder, capsys, content, expect, args=()):
    capsys.readouterr()
    path = folder.write(folder.new_name("run", ".toml"), content)
    assert main(["train", path, *args]) == 2
    line = one_error_line(capsys, "train")
    assert re.search(expect, line), (expect, line)
    assert folder.snapshot() == folder.state, "the failed run touched the checkpoint folder or the metrics"
    return line


# ---- run files ---------------------------------------------------------------------------------------------------
WRONG_TYPES = {"int": ['"3"', "1.5", "true", "[1]", "{ a = 1 }", "1979-05-27"],
               "float": ['"x"', "true", "[1.0]", "{ a = 1 }", "1979-05-27T07:32:00"],
               "bool": ["1", '"yes"', "[true]"],
               "str": ["3", "true", '["a"]', '{ a = "b" }']}

# (section, key, bad value, what the error line must contain)
BAD_VALUES = [
    ("model", "preset", '"nope"', r"\[model\] preset = 'nope': unknown"),
    ("model", "dtype", '"float16"', r"\[model\] dtype = 'float16'"),
    ("model", "seed", "-1", r"\[model\] seed = -1"),
    ("model.overrides", "num_hidden_layers", "0", r"\[model.overrides\] num_hidden_layers = 0"),
    ("data", "path", '"missing.bin"', r"\[data\] path"),
    ("data", "eos_id", "5", r"\[data\] .*eos_id 5"),
    ("data", "eos_id", "-1", r"\[data\] eos_id = -1"),
    ("data", "seq_len", "0", r"\[data\] seq_len = 0"),
    ("data", "micro_batch_size", "-2", r"\[data\] micro_batch_size = -2"),
    ("data", "micro_batch_size", "3", r"\[train\] sequences_per_step = 2: must be a positive multiple"),
    ("train", "steps", "0", r"\[train\] steps = 0"),
    ("train", "sequences_per_step", "3", r"\[train\] sequences_per_step = 3"),
    ("train", "backend", '"tpu"', r"\[train\] backend = 'tpu'"),
    ("optimizer", "muon_lr", "-1", r"\[optimizer\] muon_lr = -1: must be a non-negative number"),
    ("optimizer", "adamw_lr", "nan", r"\[optimizer\] adamw_lr = nan"),
    ("optimizer", "weight_decay", "inf", r"\[optimizer\] weight_decay = inf"),
    ("schedule", "warmup_steps", "-1", r"\[schedule\] warmup_steps = -1"),
    ("schedule", "lr_schedule", '"linear"', r"\[schedule\] lr_schedule = 'linear'"),
    ("schedule", "decay_start_fraction", "1.5", r"\[schedule\] decay_start_fraction = 1.5: must lie in"),
    ("balancing", "method", '"aux"', r"\[balancing\] method = 'aux'"),
    ("balancing", "smebu_lambda", "-0.1", r"\[balancing\] smebu_lambda = -0.1"),
    ("loss", "z_loss_coeff", "-1e-3", r"\[loss\] z_loss_coeff = -0.001"),
    ("loss", "balance_loss_coeff", "inf", r"\[loss\] balance_loss_coeff = inf"),
    ("checkpoint", "every", "0", r"\[checkpoint\] every = 0"),
    ("checkpoint", "keep_last", "0", r"\[checkpoint\] keep_last = 0"),
    ("checkpoint", "dir", '""', r"\[checkpoint\] dir = ''"),
    ("logging", "metrics", '" "', r"\[logging\] metrics = ' '"),
    ("parallel", "cp", "0", r"\[parallel\] cp = 0: must be a positive integer"),
    ("parallel", "ep", "-2", r"\[parallel\] ep = -2: must be a positive integer"),
    ("parallel", "dp_shard", "2.0", r"\[parallel\] dp_shard = 2.0: must be a positive integer"),
]
MORE_BAD = [  # extra keys of a section, with a bad value
    ("model.overrides", "head_dim = 15", r"\[model.overrides\] head_dim = 15: must be even"),
    ("model.overrides", "num_experts = 1", r"\[model.overrides\] num_experts = 1: .*top-k"),
    ("model.overrides", "max_position_embeddings = 8",
     r"\[data\] seq_len = 16: exceeds max_position_embeddings 8 of the model"),
    ("model.overrides", 'layer_types = ["full_attention", "dense"]', r"\[model.overrides\] layer_types = "),
    ("data", 'loader = "random"', r"\[data\] loader = 'random'"),
    ("data", "rsdb_buffer = 4", r"\[data\] rsdb_buffer needs loader"),
    ("train", "batch_schedule = [[0, 3]]", r"\[train\] batch_schedule = \[\[0, 3\]\]: sequences per step 3"),
    ("train", 'batch_schedule = "soon"', r"\[train\] batch_schedule = 'soon'"),
    ("optimizer", "adamw_beta1 = 1.0", r"\[optimizer\] adamw_beta1 = 1.0: must lie in \[0, 1\)"),
    ("optimizer", 'matrix_optimizer = "sgd"', r"\[optimizer\] matrix_optimizer = 'sgd'"),
    ("optimizer", "muon_ns_steps = 0", r"\[optimizer\] muon_ns_steps = 0"),
    ("balancing", "smebu_beta = 1.0", r"\[balancing\] smebu_beta = 1.0"),
    ("model", 'config = "c.json"', r"\[model\] needs exactly one of"),
]
KNOWN = {"model": {"preset", "config", "init_from", "dtype", "seed", "overrides"},
         "model.overrides": {f for f in Config.__dataclass_fields__},
         "data": {"path", "eos_id", "seq_len", "micro_batch_size", "seed", "loader", "rsdb_buffer", "phases",
                  "sources"},
         "train": {"steps", "sequences_per_step", "batch_schedule", "recompute", "backend", "on_nonfinite",
                   "max_skipped_steps"},
         "checkpoint": {"dir", "every", "keep_last"}, "logging": {"metrics", "progress"},
         "parallel": {"dp_replicate", "dp_shard", "cp", "ep"},
         **{name: set(mapping) for name, mapping in run_config._CONFIG_SECTIONS.items()}}
BAD_TOML = ["[", "x =", "= 1", "a = 'b", "[data]", "x = 1 2", "a = \x00", "[[model]]", 'k = "\\q"']


@st.composite
def bad_run_files(draw):
    """(file content, regex the error line must match)."""
    good = render().encode("utf-8")
    kind = draw(st.sampled_from(["utf8", "binary", "toml", "unknown", "section", "type", "value", "more", "missing"]))
    if kind == "utf8":
        at = draw(st.integers(0, len(good)))
        junk = draw(st.sampled_from([b"\xff", b"\xe9", b"\xc3(", b"\x80abc", b"\xed\xa0\x80"]))
        return good[:at] + junk + good[at:], r": not a run file: not UTF-8 text \(byte 0x"
    if kind == "binary":
        data = draw(st.binary(min_size=1, max_size=300).filter(lambda b: not _utf8(b)))
        return data, r"not UTF-8 text"
    lines = render().split("\n")
    if kind == "toml":
        at = draw(st.integers(0, len(lines)))
        return "\n".join(lines[:at] + [draw(st.sampled_from(BAD_TOML))] + lines[at:]), r"is not valid TOML: "
    if kind == "unknown":
        section = draw(st.sampled_from(sorted(KNOWN)))
        # names no key has, now or later ("x" then a digit or "_"), besides the known keys filtered out
        name = draw(st.from_regex(r"x[0-9_][a-z0-9_]{0,10}", fullmatch=True).filter(lambda n: n not in KNOWN[section]))
        expect = (r"\[model.overrides\] unknown Config field\(s\): " if section == "model.overrides"
                  else rf"\[{re.escape(section)}\] unknown key(\(s\))?: {name}")
        return render(extra={section: [f"{name} = 1"]}), expect
    if kind == "section":
        name = draw(st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True).filter(lambda n: n not in KNOWN
                                                                                   and n != "model"))
        return render() + f"[{name}]\nx = 1\n", rf"unknown section\(s\): {name}"
    if kind == "type":
        section, key, vkind = draw(st.sampled_from(KEYS))
        value = draw(st.sampled_from(WRONG_TYPES[vkind]))
        return render({(section, key): value}), rf"\[{re.escape(section)}\] {key} = .*: must be "
    if kind == "value":
        section, key, value, expect = draw(st.sampled_from(BAD_VALUES))
        return render({(section, key): value}), expect
    if kind == "more":
        section, line, expect = draw(st.sampled_from(MORE_BAD))
        return render(extra={section: [line]}), expect
    section, key = draw(st.sampled_from([("data", "seq_len"), ("data", "micro_batch_size"), ("data", "path"),
                                         ("train", "steps"), ("model", "preset")]))
    expect = r"\[model\] needs exactly one of" if key == "preset" else rf"\[{section}\] {key} is required"
    return render({(section, key): None}), expect


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(case=bad_run_files())
def test_malformed_run_files_fail_in_one_line(folder, capsys, case):
    content, expect = case
    check_train_fails(folder, capsys, content, expect)


@pytest.mark.parametrize("section, key, value, expect", BAD_VALUES)
def test_every_bad_value_names_its_section_and_key(folder, capsys, section, key, value, expect):
    """Each listed bad value once (hypothesis samples them; this pins every one)."""
    check_train_fails(folder, capsys, render({(section, key): value}), expect)


def test_run_file_that_cannot_be_read(folder, capsys, monkeypatch):
    check_train_fails(folder, capsys, "", r"\[model\] needs exactly one of")  # empty: valid TOML, no model
    capsys.readouterr()
    assert main(["train", folder.root]) == 2  # a directory
    assert one_error_line(capsys, "train").endswith(f"{folder.root}: is a directory, not a run file")
    assert main(["train", os.path.join(folder.root, "nope.toml")]) == 2
    assert "run file not found" in one_error_line(capsys, "train")
    real_open = open

    def denied(path, *args, **kwargs):
        if str(path).endswith("unreadable.toml"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    path = folder.write("unreadable.toml", render())
    monkeypatch.setattr("builtins.open", denied)  # as root, chmod cannot make a file unreadable
    assert main(["train", path]) == 2
    monkeypatch.undo()
    assert one_error_line(capsys, "train").endswith(f"{path}: cannot read the run file (Permission denied)")


def test_config_errors_name_the_run_file_key_not_the_config_field(tmp_path):
    """A recipe value Config rejects is reported under its run-file name ([balancing] method, not
    load_balancing), and a message can never span two lines."""
    path = tmp_path / "run.toml"
    path.write_text(render({("balancing", "method"): '"aux"'}))
    with pytest.raises(RunConfigError) as e:
        load_run_config(path)
    assert str(e.value) == "[balancing] method = 'aux': must be 'smebu', 'sign' or 'none'"
    path.write_text(render(extra={"optimizer": ['"two\\nlines" = 1']}))
    with pytest.raises(RunConfigError) as e:
        load_run_config(path)
    assert str(e.value).startswith("[optimizer] unknown key: 'two\\nlines'") and "\n" not in str(e.value)
    assert "\n" not in str(RunConfigError("a\nb\r\nc"))
    # the same field set twice, once as a recipe key and once as an override
    path.write_text(render(extra={"model.overrides": ["muon_lr = 0.1"]}))
    with pytest.raises(RunConfigError, match=r"\[optimizer\] muon_lr: also set as \[model.overrides\] muon_lr"):
        load_run_config(path)


@pytest.mark.parametrize("line, expect", [
    ('config = "missing.json"', r"\[model\] config = 'missing.json': no such file .*missing.json$"),
    ('init_from = "nowhere"', r"\[model\] init_from = 'nowhere': no such directory .*nowhere \(an HF checkpoint"),
    ('init_from = "tokens.bin"', r"\[model\] init_from = 'tokens.bin': no such directory"),
])
def test_model_source_paths_are_checked_with_the_run_file(folder, capsys, line, expect):
    check_train_fails(folder, capsys, render({("model", "preset"): None}, extra={"model": [line]}), expect)


@pytest.mark.parametrize("mesh, expect", [
    ("dp_shard=0", r"--mesh: layout 'dp_shard=0': dp_shard=0: the size must be a positive integer; .*dp_replicate, "
                   r"dp_shard, cp, ep"),
    ("dp_shrd=2", r"--mesh: layout 'dp_shrd=2': unknown dimension 'dp_shrd'"),
    ("ep=2,ep=2", r"--mesh: layout 'ep=2,ep=2': ep given twice"),
    ("ep=two", r"--mesh: layout 'ep=two': ep=two: the size must be a positive integer"),
    ("dp_shard 2", r"--mesh: layout 'dp_shard 2': 'dp_shard 2' is not name=size"),
    ("", r"--mesh: layout '': '' is not name=size"),
])
def test_bad_mesh_option_fails_in_one_line(folder, capsys, mesh, expect):
    """A bad `--mesh` is refused in one line naming the option, before the run file is read or anything is touched."""
    check_train_fails(folder, capsys, render(), expect, args=("--mesh", mesh))


# ---- output paths --------------------------------------------------------------------------------------------------
def test_check_output_paths(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()

    def run(**paths):
        text = render({("checkpoint", "dir"): f'"{paths.get("ckpt", "ckpt")}"',
                       ("logging", "metrics"): f'"{paths.get("metrics", "m.jsonl")}"'})
        (tmp_path / "run.toml").write_text(text)
        return load_run_config(tmp_path / "run.toml")

    check_output_paths(run())  # neither exists yet: fine, and nothing is created
    check_output_paths(run(ckpt="folder", metrics="file"))  # existing folder and file: fine, untouched
    assert sorted(os.listdir(tmp_path)) == ["file", "folder", "run.toml"]
    assert (tmp_path / "file").read_text() == "x"
    for paths, message in [
        (dict(ckpt="file"), rf"^\[checkpoint\] dir = '{tmp_path}/file': is a file$"),
        (dict(metrics="folder"), rf"^\[logging\] metrics = '{tmp_path}/folder': is a directory$"),
        (dict(ckpt="file/sub/ckpt"), rf"^\[checkpoint\] dir = '{tmp_path}/file/sub/ckpt': cannot be created: "
                                     rf"{tmp_path}/file is a file$"),
        (dict(metrics="file/m.jsonl"), r"^\[logging\] metrics = .*: cannot be created: .*/file is a file$"),
    ]:
        with pytest.raises(RunConfigError, match=message):
            check_output_paths(run(**paths))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(RunConfigError, match=r"\[logging\] metrics = .*: is a broken symbolic link"):
        check_output_paths(run(metrics="dangling"))

    # Writability: the probe is real (no file left behind) ...
    run_config._probe_writable(str(tmp_path / "folder"))
    assert os.listdir(tmp_path / "folder") == []

    # ... and a folder that refuses files is named (root ignores permissions, so the probe is made to refuse).
    (tmp_path / "ro").mkdir()
    probe = run_config._probe_writable

    def refuse(folder):
        if os.path.basename(folder) == "ro":
            raise PermissionError(13, "Permission denied")
        probe(folder)

    monkeypatch.setattr(run_config, "_probe_writable", refuse)
    with pytest.raises(RunConfigError, match=r"^\[checkpoint\] dir = '.*/ro': not writable \(Permission denied\)$"):
        check_output_paths(run(ckpt="ro"))
    with pytest.raises(RunConfigError, match=r"^\[checkpoint\] dir = '.*/ro/new/ckpt': cannot be created: "
                                             rf"{tmp_path}/ro is not writable \(Permission denied\)$"):
        check_output_paths(run(ckpt="ro/new/ckpt"))
    with pytest.raises(RunConfigError, match=r"^\[logging\] metrics = '.*/ro/new.jsonl': cannot be created: .*/ro "
                                             r"is not writable \(Permission denied\)$"):
        check_output_paths(run(ckpt="folder", metrics="ro/new.jsonl"))
    monkeypatch.undo()
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).endswith("/file") and "a" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(RunConfigError, match=r"^\[logging\] metrics = '.*/file': not writable \(Permission denied\)$"):
        check_output_paths(run(ckpt="folder", metrics="file"))


@pytest.mark.parametrize("change, expect", [
    (("checkpoint", "dir", '"tokens.bin"'), r"\[checkpoint\] dir = '.*tokens.bin': is a file"),
    (("logging", "metrics", '"ckpt"'), r"\[logging\] metrics = '.*ckpt': is a directory"),
])
def test_output_paths_through_the_cli(folder, capsys, change, expect):
    section, key, value = change
    check_train_fails(folder, capsys, render({(section, key): value}), expect)


# ---- prepared token folders ------------------------------------------------------------------------------------
def _damage(folder: str, how: str, data) -> None:
    shard, index, meta = (os.path.join(folder, n) for n in ("shard_00000.bin", "shard_00000.idx.npy", "meta.json"))
    if how == "cut shard":
        size = os.path.getsize(shard)
        with open(shard, "r+b") as f:
            f.truncate(data.draw(st.integers(0, size - 1)))
    elif how == "cut index":
        size = os.path.getsize(index)
        with open(index, "r+b") as f:
            f.truncate(data.draw(st.integers(0, size - 1)))
    elif how == "no meta":
        os.remove(meta)
    elif how == "meta not json":
        with open(meta, "wb") as f:
            f.write(data.draw(st.binary(max_size=50).filter(lambda b: not _json(b))))
    elif how == "meta wrong":
        import json

        with open(meta, encoding="utf-8") as f:
            good = json.load(f)
        bad = data.draw(st.sampled_from([
            [1, 2], "meta", {**good, "shards": []}, {**good, "shards": "shard_00000.bin"},
            {**good, "shards": [{"tokens": "../tokens.bin", "index": "shard_00000.idx.npy"}]},
            {**good, "shards": [{"tokens": "nope.bin", "index": "shard_00000.idx.npy"}]},
            {**good, "shards": [{"tokens": "shard_00000.bin", "index": "nope.npy"}]},
            {**good, "shards": [{"tokens": 3, "index": None}]}, {**good, "eos_id": None, "tokenizer": {}},
        ]))
        with open(meta, "w", encoding="utf-8") as f:
            json.dump(bad, f)
    elif how == "meta eos wrong":
        import json

        with open(meta, encoding="utf-8") as f:
            good = json.load(f)
        with open(meta, "w", encoding="utf-8") as f:
            json.dump({**good, "eos_id": data.draw(st.sampled_from(["x", -3, 2**40, 1.5])), "tokenizer": {}}, f)
    elif how == "ids over vocab":
        tokens = np.fromfile(shard, "<u4")
        at = data.draw(st.sampled_from([int(i) for i in np.flatnonzero(tokens != 256)]))
        tokens[at] = data.draw(st.sampled_from([300, 1000, 2**32 - 1]))
        tokens.tofile(shard)
    else:
        raise AssertionError(how)


def _json(data: bytes) -> bool:
    import json

    try:
        json.loads(data.decode("utf-8"))
        return True
    except (UnicodeDecodeError, ValueError):
        return False


@pytest.mark.parametrize("how", [
    "cut shard", "no meta", "meta not json", "meta wrong", "cut index", "meta eos wrong", "ids over vocab",
])
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
def test_malformed_token_folders_fail_in_one_line(folder, capsys, how, data):
    name = folder.new_name("prepared")
    target = os.path.join(folder.root, name)
    shutil.copytree(os.path.join(folder.root, "prepared"), target)
    _damage(target, how, data)
    content = render({("data", "path"): f'"{name}"', ("data", "eos_id"): None},
                     extra={"model.overrides": ["vocab_size = 300"]})
    check_train_fails(folder, capsys, content, rf"{re.escape(target)}")


def test_the_undamaged_token_folder_is_usable(folder):
    """The damage above is what fails: the same folder undamaged builds a trainer."""
    from trinity.run.trainer import build_loader

    path = folder.write("prepared-ok.toml", render({("data", "path"): '"prepared"', ("data", "eos_id"): None},
                                                   extra={"model.overrides": ["vocab_size = 300"]}))
    loader, stores = build_loader(load_run_config(path))
    assert stores[0].max_token() == 256 and loader.next_batch()[0].shape == (2, 16)


# ---- checkpoints (the lead's part: reference/training/checkpoint.py, cli/common.py) ----------------------------------
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(how=st.sampled_from(["cut", "flip", "not hdf5"]), command=st.sampled_from(["generate", "inspect"]),
       data=st.data())
def test_malformed_checkpoints_fail_in_one_line(folder, capsys, how, command, data):
    with open(folder.checkpoint, "rb") as f:
        good = f.read()
    if how == "cut":
        damaged = good[:data.draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        start, stride = data.draw(st.integers(0, 4095)), data.draw(st.integers(500, 20000))
        damaged = bytearray(good)
        for i in range(start, len(damaged), stride):
            damaged[i] ^= 0xFF
        damaged = bytes(damaged)
    else:
        damaged = data.draw(st.binary(max_size=2000))
    path = folder.write(folder.new_name("damaged", ".h5"), damaged)
    args = {"generate": ["generate", path, "--prompt-tokens", "1,2", "--max-new-tokens", "2"],
            "inspect": ["inspect", path, "--tokens", "1,2"]}[command]
    capsys.readouterr()
    assert main(args) == 2
    line = one_error_line(capsys, command)
    assert path in line, line


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=15)
@given(how=st.sampled_from(["cut", "flip", "not hdf5"]), data=st.data())
def test_resume_onto_only_damaged_checkpoints_fails_in_one_line(folder, capsys, how, data):
    """`train --resume` in a folder whose only checkpoint is damaged: one line naming [checkpoint] dir and the
    skipped file, status 2, the damaged file and the run's real checkpoint folder untouched."""
    with open(folder.checkpoint, "rb") as f:
        good = f.read()
    if how == "cut":
        damaged = good[:data.draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        damaged = bytearray(good)
        damaged[data.draw(st.integers(0, len(good) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        damaged = bytes(damaged)
    else:
        damaged = data.draw(st.binary(max_size=2000))
    name = folder.new_name("ckpt")
    os.makedirs(os.path.join(folder.root, name))
    with open(os.path.join(folder.root, name, "step_00000001.h5"), "wb") as f:
        f.write(damaged)
    content = render({("checkpoint", "dir"): f'"{name}"', ("logging", "metrics"): f'"{name}.jsonl"'})
    line = check_train_fails(folder, capsys, content, r"\[checkpoint\] dir = .*: none of its 1 checkpoint\(s\) "
                                                      r"verifies \(corrupt\)", args=("--resume",))
    assert name in line
    with open(os.path.join(folder.root, name, "step_00000001.h5"), "rb") as f:
        assert f.read() == damaged
