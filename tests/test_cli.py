"""`trinity info`: every preset through the installed script and in process, the published counts, the errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from trinity.cli.common import human_bytes, human_count
from trinity.cli.main import main
from trinity.reference.model.config import PRESETS, Config
from trinity.reference.model.params import param_count

PRESET_NAMES = sorted(PRESETS)

# SPEC §2 parameter-count check, "with embeddings": (total, active) as `trinity info` prints them.
PUBLISHED = {
    "trinity-nano": ("6.12B", "1.02B"),
    "trinity-mini": ("26.1B", "3.47B"),
    "trinity-large": ("398.6B", "13.4B"),
}


def _script() -> list[str]:
    """The installed console script, next to this interpreter; else `python -m trinity.cli` (same main)."""
    exe = os.path.join(os.path.dirname(sys.executable), "trinity")
    if os.path.isfile(exe) and os.access(exe, os.X_OK):
        return [exe]
    found = shutil.which("trinity")
    return [found] if found else [sys.executable, "-m", "trinity.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_script() + list(args), capture_output=True, text=True, timeout=120)


def run_inproc(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---- every preset -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_info_subprocess_every_preset(name):
    r = run_cli("info", name)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    config = Config.preset(name)
    count = param_count(config)
    assert r.stdout.startswith(f"{name} (preset)")
    assert f"{human_count(count.total)} total, {human_count(count.active)} active" in r.stdout
    for dtype in ("float32", "bfloat16", "float64"):
        assert dtype in r.stdout
    assert f"{config.num_hidden_layers}: {config.num_dense_layers} dense" in r.stdout


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_info_inprocess_every_preset_text_and_json(capsys, name):
    code, text, err = run_inproc(capsys, "info", name)
    assert code == 0 and err == ""
    code, out, err = run_inproc(capsys, "info", name, "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    config = Config.preset(name)
    count = param_count(config)
    assert info["params"]["total"] == count.total
    assert info["params"]["active"] == count.active
    assert info["params"]["total_human"] in text and info["params"]["active_human"] in text
    assert info["source"] == {"kind": "preset", "name": name, "path": None}
    s = info["shapes"]
    assert (s["hidden_size"], s["num_hidden_layers"], s["num_experts"], s["num_experts_per_tok"],
            s["sliding_window"], s["vocab_size"]) == (
        config.hidden_size, config.num_hidden_layers, config.num_experts, config.num_experts_per_tok,
        config.sliding_window, config.vocab_size)
    for dtype, size in {"float32": 4, "bfloat16": 2, "float64": 8}.items():
        assert info["memory_bytes"][dtype] == {"total": count.total * size, "active": count.active * size}
        assert human_bytes(count.total * size) in text


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_layer_pattern_matches_config(capsys, name):
    code, out, _ = run_inproc(capsys, "info", name, "--json")
    lay = json.loads(out)["layers"]
    config = Config.preset(name)
    n = config.num_hidden_layers
    assert lay["mlp"] == "D" * config.num_dense_layers + "M" * (n - config.num_dense_layers)
    assert lay["attention"] == "".join("S" if config.is_sliding_layer(i) else "G" for i in range(n))
    assert lay["dense"] + lay["moe"] == n == lay["sliding"] + lay["global"]
    # the text view shows the same characters, in order, on its mlp/attn rows
    code, text, _ = run_inproc(capsys, "info", name)
    rows = {"mlp": "", "attn": ""}
    for line in text.splitlines():
        key = line.split()[0] if line.startswith("  ") and line.split() else ""
        if key in rows:
            rows[key] += "".join(line.split()[1:])
    assert rows == {"mlp": lay["mlp"], "attn": lay["attention"]}


# ---- published counts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts(name):
    total, active = PUBLISHED[name]
    r = run_cli("info", name)
    assert r.returncode == 0, r.stderr
    assert f"{total} total, {active} active" in r.stdout


def test_trinity_large_exact(capsys):
    code, out, _ = run_inproc(capsys, "info", "trinity-large")
    assert code == 0
    assert "398.6B" in out and "13.4B" in out
    assert "SSSG SSSG" in out and "DDDD DDMM" in out


# ---- HF config.json and checkpoint directories --------------------------------------------------------------------
def test_info_from_config_json_and_checkpoint_dir(tmp_path, capsys):
    config = Config.preset("trinity-nano")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_hf()))
    for arg, kind in [(str(path), "config.json"), (str(tmp_path), "checkpoint")]:
        code, out, err = run_inproc(capsys, "info", arg, "--json")
        assert code == 0, err
        info = json.loads(out)
        assert info["source"]["kind"] == kind
        assert (info["params"]["total_human"], info["params"]["active_human"]) == PUBLISHED["trinity-nano"]


def test_released_style_config_with_extra_keys(tmp_path, capsys):
    """Released config.json files carry routing extras and v5 rope_parameters (SPEC §1, §3.4)."""
    d = Config.preset("tiny").to_hf()
    d.pop("rope_theta")
    d.update(score_func="sigmoid", route_norm=True, n_group=1, topk_group=1, use_grouped_mm=True,
             auto_map={"AutoConfig": "x"}, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(d))
    code, out, err = run_inproc(capsys, "info", str(tmp_path))
    assert code == 0 and err == ""
    assert "rope_theta 10000" in out


def test_unknown_keys_warn_on_one_line(tmp_path, capsys):
    d = Config.preset("tiny").to_hf()
    d["some_new_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(d))
    code, out, err = run_inproc(capsys, "info", str(tmp_path))
    assert code == 0
    assert err.count("\n") == 1 and "some_new_field" in err and "warning" in err


# ---- errors: one line on stderr, exit 2, no traceback -----------------------------------------------------------
def _bad_config(tmp_path, **changes) -> str:
    d = Config.preset("tiny").to_hf()
    d.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


ERROR_CASES = {
    "unknown preset": (lambda tmp: "trinity-huge", "trinity-huge"),
    "missing file": (lambda tmp: str(tmp / "nope" / "config.json"), "no such file"),
    "dir without config": (lambda tmp: str(tmp), "no config.json"),
    "top-k > experts": (lambda tmp: _bad_config(tmp, num_experts_per_tok=99), "num_experts_per_tok"),
    "kv heads": (lambda tmp: _bad_config(tmp, num_key_value_heads=3), "num_key_value_heads"),
    "hidden_size type": (lambda tmp: _bad_config(tmp, hidden_size="wide"), "hidden_size"),
    "model_type": (lambda tmp: _bad_config(tmp, model_type="llama"), "model_type"),
    "score_func": (lambda tmp: _bad_config(tmp, score_func="softmax"), "score_func"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_exit_2_one_line(case, tmp_path, capsys):
    make, needle = ERROR_CASES[case]
    arg = make(tmp_path)
    code, out, err = run_inproc(capsys, "info", arg)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("trinity info: error: "), err
    assert needle in err


@pytest.mark.parametrize("case", ["unknown preset", "top-k > experts", "missing file"])
def test_errors_subprocess(case, tmp_path):
    make, needle = ERROR_CASES[case]
    r = run_cli("info", make(tmp_path), "--json")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr


def test_invalid_json_and_non_object(tmp_path, capsys):
    (tmp_path / "a.json").write_text("{")
    (tmp_path / "b.json").write_text("[1, 2]")
    for name, needle in [("a.json", "not valid JSON"), ("b.json", "expected a JSON object")]:
        code, out, err = run_inproc(capsys, "info", str(tmp_path / name))
        assert code == 2 and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [[], ["info"], ["nosuchcommand"], ["train"], ["train", "run.toml", "--watchdog", "x"],
                                  ["data", "prepare"], ["generate", "tiny", "--max-new-tokens", "many"],
                                  ["plot"], ["inspect", "tiny", "--nosuchflag"], ["train", "a.toml", "b.toml"]])
def test_usage_errors_are_one_line_exit_2_and_printed_by_rank_zero_only(capsys, monkeypatch, argv):
    """Every subcommand's argparse errors are one line without the usage text, exit 2; under an MPI launcher every
    rank parses the same command line, so only rank 0 prints the refusal."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and ": error: " in err and "usage:" not in err
    if len(argv) > 1:  # named by the subcommand
        assert err.startswith(f"trinity {argv[0]}"), err
    monkeypatch.setenv("PMI_RANK", "1")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == ""


# ---- formatting ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, text", [
    (0, "0"), (999, "999"), (1000, "1.00K"), (291_544, "291.5K"), (999_960, "1.00M"), (9_996_000, "10.0M"),
    (90_383_984, "90.4M"), (1_023_923_968, "1.02B"), (6_120_003_328, "6.12B"), (13_371_686_400, "13.4B"),
    (398_635_286_016, "398.6B"), (2_500_000_000_000, "2.50T"), (12_345_000_000_000_000, "12345T"),
])
def test_human_count(n, text):
    assert human_count(n) == text


@pytest.mark.parametrize("n, text", [
    (512, "512 B"), (1024, "1.00 KiB"), (797_270_572_032, "742.5 GiB"), (398_635_286_016 * 4, "1.45 TiB"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "trinity.cli", "info", "tiny", "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"]["name"] == "tiny"
