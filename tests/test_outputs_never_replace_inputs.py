"""An output path never replaces what the command reads: `simulate --trace` the run file, its data, metrics or
checkpoints; `plan --json/--png` the model's config or the routing metrics; `inspect --dump/--plot` the checkpoint
being inspected. Each is refused in one line, exit 2, before any work, with the input unchanged. And `plan` refuses
what would block or yield nothing: a `--routing` that is not a regular file, a `--fix` no layout has."""

from __future__ import annotations

import json
import os

import pytest

from test_run_safety import error_line, trinity, write_run
from trinity.cli.main import main
from trinity.reference.model.config import Config


def _snapshot(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.mark.parametrize("target", ["run.toml", "tokens.bin", "metrics.jsonl", "ckpt/step_00000001.h5"])
def test_simulate_trace_never_replaces_an_input_of_the_run(tmp_path, target):
    run = write_run(tmp_path, steps=1, every=1)
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "ckpt").mkdir()  # the checkpoint folder: no file may be written into it
    before = _snapshot(tmp_path)
    result = trinity("simulate", run, "--ranks", "2", "--mesh", "dp_shard=2", "--trace", tmp_path / target,
                     timeout=120)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert "--trace" in line and "would overwrite" in line and "an input of this command" in line
    assert _snapshot(tmp_path) == before  # nothing trained, nothing written


def _config_file(tmp_path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(Config.preset("tiny").to_dict()))
    return str(path)


@pytest.mark.parametrize("option", ["--json", "--png"])
def test_plan_output_never_replaces_the_model_config(tmp_path, capsys, option):
    config = _config_file(tmp_path)
    before = open(config).read()
    assert main(["plan", "--model", config, "--gpus", "8", "--gpu", "h100", "--tokens", "1e9", option, config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would overwrite" in err and option in err
    assert open(config).read() == before


def test_plan_refuses_a_routing_file_that_would_block_and_a_fix_no_layout_has(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    base = ["plan", "--model", "tiny", "--gpus", "8", "--gpu", "h100", "--tokens", "1e9"]
    assert main([*base, "--routing", str(fifo)]) == 2  # reading it would wait for a writer forever
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a regular file" in err
    assert main([*base, "--fix", "ep=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no layout of 8 GPUs runs this job with --fix ep=3" in err
    assert main([*base, "--json", str(tmp_path / "a.json"), "--png", str(tmp_path / "a.json")]) == 2
    assert "name the same file" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--dump", "--plot"])
def test_inspect_output_never_replaces_the_checkpoint_it_reads(tmp_path, capsys, option):
    config = _config_file(tmp_path)
    before = open(config).read()
    assert main(["inspect", config, "--tokens", "1,2", option, config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would overwrite" in err
    assert open(config).read() == before


def test_inspect_checks_its_output_before_any_work(tmp_path, capsys):
    """A --dump that cannot be written is refused before the forward runs (nothing printed on stdout)."""
    assert main(["inspect", "tiny", "--tokens", "1,2", "--dump", str(tmp_path / "no" / "t.h5")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "does not exist" in err
