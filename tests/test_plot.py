"""`trinity plot`: PNGs from a real (short) training run's metrics, resumed-run semantics, clean errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trinity.cli.main import main
from trinity.cli.plotting import MetricsError, read_metrics
from trinity.run.run_config import load_run_config
from trinity.run.trainer import Trainer
from trinity.reference.data.store import write_token_file
from trinity.reference.data.synthetic import MarkovSource

RUN = """
[model]
preset = "tiny"
dtype = "float32"
[data]
path = "tokens.bin"
eos_id = 0
seq_len = 32
micro_batch_size = 4
[train]
steps = 3
sequences_per_step = 8
[optimizer]
muon_lr = 0.02
adamw_lr = 0.01
[schedule]
warmup_steps = 2
[checkpoint]
dir = "ckpt"
every = 3
keep_last = 1
[logging]
metrics = "metrics.jsonl"
progress = false
"""

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = {"loss.png", "lr.png", "grad_norm.png", "max_vio.png", "expert_load.png", "logits.png", "throughput.png",
           "batch_het.png"}  # 2 micro-batches per step: BatchHet is logged


@pytest.fixture(scope="module")
def metrics_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    source = MarkovSource(256, eos_id=0, branching=4, mean_doc_len=40, seed=0)
    write_token_file(folder / "tokens.bin", source.documents(5000), eos_id=0)
    (folder / "run.toml").write_text(RUN)
    Trainer(load_run_config(folder / "run.toml"), log=lambda *_: None).train()
    return folder / "metrics.jsonl"


def test_plot_writes_every_figure_from_a_training_run(metrics_file, tmp_path, capsys):
    import matplotlib.image

    rows = read_metrics(metrics_file)
    assert [r["step"] for r in rows] == [1, 2, 3]
    out = tmp_path / "plots"
    assert main(["plot", str(metrics_file), "--out", str(out)]) == 0
    assert "3 steps (1…3)" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == FIGURES
    for png in out.iterdir():
        data = png.read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, png.name
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05, f"{png.name} looks blank"  # not a blank canvas


def _row(step, ce=5.0, layers=(1, 2)):
    return {"step": step, "tokens_seen": 256 * step, "loss": {"total": ce + 0.01, "ce": ce, "z": 1e-5,
                                                              "balance": 1e-3},
            "grad_norm": 1.0 / step, "lr": {"muon": 0.02, "adamw": 0.01},
            "max_vio": {str(l): 0.5 for l in layers}, "expert_load": {str(l): [3, 1, 2, 2] for l in layers},
            "logits_max": 3.0, "logits_mean": 0.0, "tokens_per_s": 1000.0}


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_resumed_runs_later_lines_win(tmp_path):
    path = tmp_path / "m.jsonl"
    # steps 1..5, killed after the step-3 checkpoint, resumed: 4..6 again with other values
    _write(path, [_row(s) for s in range(1, 6)] + [_row(s, ce=4.0) for s in range(4, 7)])
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"]["ce"] for r in rows] == [5.0, 5.0, 5.0, 4.0, 4.0, 4.0]
    # a resumed run that has not yet reached the old lines: those are superseded all the same
    _write(path, [_row(s) for s in range(1, 6)] + [_row(4, ce=4.0)])
    assert [(r["step"], r["loss"]["ce"]) for r in read_metrics(path)] == [(1, 5.0), (2, 5.0), (3, 5.0), (4, 4.0)]
    # a last line cut short by a kill, and blank lines, are skipped; the cut line is reported
    _write(path, [_row(1), _row(2)], tail='\n{"step": 3, "loss": {"to')
    seen = []
    assert [r["step"] for r in read_metrics(path, warn=seen.append)] == [1, 2]
    assert seen == [f"{path}:4: cut short (a run stopped while writing it?); line skipped"]


def test_plot_tolerates_missing_keys_and_many_layers(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    rows = [_row(s, layers=range(1, 14)) for s in range(1, 4)]
    del rows[1]["grad_norm"], rows[2]["expert_load"]["5"]
    _write(path, rows)
    assert main(["plot", str(path), "--out", str(tmp_path / "p")]) == 0
    assert {p.name for p in (tmp_path / "p").iterdir()} == FIGURES - {"batch_het.png"}


@pytest.mark.parametrize("content, message", [
    ("", "no metrics lines"),
    ("\n\n", "no metrics lines"),
    ('not json\n{"loss": 1}\n', r"m.jsonl: no usable metrics line \(2 bad; the first, .*m.jsonl:1: not valid JSON"),
    ('[1, 2]\n{"step": "1"}\n{"step": true}\n', r'no usable metrics line \(3 bad; .*m.jsonl:1: not a JSON object '
                                                  r'with an integer "step"'),
    ('{"step": 1, "loss": {"to', r"no usable metrics line \(1 bad; .*m.jsonl:1: cut short"),
])
def test_metrics_files_without_a_good_line_are_one_line_errors(tmp_path, capsys, content, message):
    import re

    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(MetricsError, match=message):
        read_metrics(path)
    assert main(["plot", str(path), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trinity plot: error:") and re.search(message, err[0]), err
    assert not (tmp_path / "p").exists()


def test_bad_lines_are_warned_by_number_and_the_rest_plotted(tmp_path, capsys):
    """A line cut short by a kill and then appended to by the resumed run, a line that is not JSON, JSON that is not
    an object or has no integer step, a cut-short last line: each is one warning naming its line, and the good
    lines are plotted (exit 0)."""
    path = tmp_path / "m.jsonl"
    good = [json.dumps(_row(s)) for s in range(1, 6)]
    lines = [good[0],
             good[1][:25] + good[2],            # 2: cut short, then the resumed run's line appended to it
             good[3],
             "\x00\xff garbage",                # 4: not JSON
             "[1, 2, 3]",                        # 5: not an object
             '{"step": 2.5}',                    # 6: step not an integer
             "",                                 # 7: blank: silently skipped
             good[4],
             good[4][:40]]                       # 9: the last line, cut short by a kill
    path.write_text("\n".join(lines), encoding="utf-8")
    seen = []
    rows = read_metrics(path, warn=seen.append)
    assert [r["step"] for r in rows] == [1, 4, 5]
    assert [w.split(": ")[0] for w in seen] == [f"{path}:{n}" for n in (2, 4, 5, 6, 9)]
    assert main(["plot", str(path), "--out", str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 5 and all(line.startswith(f"trinity plot: warning: {path}:") for line in err), err
    assert "line skipped" in err[0] and ":2: not valid JSON" in err[0] and ":9: cut short" in err[4]
    assert "3 steps (1…5)" in captured.out
    assert {p.name for p in (tmp_path / "p").iterdir()} == FIGURES - {"batch_het.png"}


def test_plot_tolerates_malformed_values_in_good_lines(tmp_path, capsys):
    """Lines that are objects with an integer step but odd values elsewhere still plot (the odd values are gaps)."""
    path = tmp_path / "m.jsonl"
    rows = [_row(s) for s in range(1, 4)]
    rows[0]["expert_load"] = {"1": "many", "2": [1, "x"], "3": []}
    rows[1]["loss"] = "low"
    rows[2]["max_vio"] = [1, 2]
    rows[2]["lr"] = {"muon": None, "adamw": True}
    _write(path, rows)
    assert main(["plot", str(path), "--out", str(tmp_path / "p")]) == 0, capsys.readouterr().err
    assert {p.name for p in (tmp_path / "p").iterdir()} == FIGURES - {"batch_het.png"}


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"trinity plot: error: no such file: {tmp_path / 'missing.jsonl'}"
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.strip() == f"trinity plot: error: {tmp_path}: is a directory, not a metrics file"
    path = tmp_path / "m.jsonl"
    _write(path, [_row(1)])
    (tmp_path / "file").write_text("x")
    assert main(["plot", str(path), "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_expert_load_heatmap_is_normalised_per_step(tmp_path):
    """The heatmap's values are load / mean load: a balanced layer is all ones."""
    from trinity.cli import plotting

    captured = {}
    import matplotlib.axes

    original = matplotlib.axes.Axes.imshow

    def spy(self, X, *args, **kwargs):
        captured.setdefault(self.get_title() or len(captured), np.asarray(X))
        return original(self, X, *args, **kwargs)

    rows = [_row(s) for s in range(1, 4)]
    for r in rows:
        r["expert_load"] = {"1": [2, 2, 2, 2], "2": [4, 0, 2, 2]}
    try:
        matplotlib.axes.Axes.imshow = spy
        plotting.plot_metrics(rows, tmp_path)
    finally:
        matplotlib.axes.Axes.imshow = original
    first, second = list(captured.values())[:2]
    assert np.allclose(first, 1.0) and first.shape == (4, 3)
    assert np.allclose(second[:, 0], [2.0, 0.0, 1.0, 1.0])


# ---- eval lines ---------------------------------------------------------------------------------------------------
EVAL_FIGURES = FIGURES - {"batch_het.png"}


def _eval(step, ce=4.5, sources=(), bpb=None):
    """An eval line as the trainer writes it (key order of the design); sources: names of a mixture's eval sets."""
    def part(c, i=0):
        out = {"loss": {"total": c + 0.02, "ce": c, "z": 2e-5, "balance": 2e-3}, "perplexity": float(np.exp(c)),
               "tokens": 1000 + i}
        if bpb is not None:
            out["bits_per_byte"] = bpb + 0.1 * i
        return out

    line = {"step": step, "kind": "eval", "tokens_seen": 256 * step, **part(ce)}
    if bpb is not None:
        line["bits_per_byte"] = line.pop("bits_per_byte")
    line.update(sequences=8, batches=2)
    if sources:
        line["sources"] = {name: part(ce + 0.5 * i, i) for i, name in enumerate(sources)}
    line.update(expert_load={"1": [3, 1, 2, 2]}, max_vio={"1": 0.5}, seconds=0.1)
    return line


def _interleaved(steps, every, **kw):
    """Step lines 1..steps with an eval line after every `every`-th step line."""
    out = []
    for s in steps:
        out.append(_row(s, ce=5.0 - 0.1 * s))
        if s % every == 0:
            out.append(_eval(s, ce=4.9 - 0.1 * s, **kw))
    return out


def test_eval_lines_leave_the_step_rows_as_they_were(tmp_path):
    from trinity.cli.plotting import read_run

    path, plain = tmp_path / "m.jsonl", tmp_path / "plain.jsonl"
    lines = _interleaved(range(1, 7), 2)
    _write(path, lines)
    _write(plain, [r for r in lines if "kind" not in r])
    seen = []
    rows, evals = read_run(path, warn=seen.append)
    assert seen == [] and rows == read_metrics(path) == read_metrics(plain)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # an eval line of step N is no restart at N
    assert [e["step"] for e in evals] == [2, 4, 6] and all(e["kind"] == "eval" for e in evals)
    assert [e["loss"]["ce"] for e in evals] == [e["loss"]["ce"] for e in lines if "kind" in e]
    assert read_run(plain)[1] == []


def test_resumed_runs_supersede_eval_lines_too(tmp_path):
    from trinity.cli.plotting import read_run

    path = tmp_path / "m.jsonl"
    # steps 1..6 with evals at 2, 4, 6; killed after the step-3 checkpoint; the resumed run has logged 4..5 only:
    # the interrupted run's evals at 4 and 6 are superseded though the resumed run has not evaluated yet
    first = _interleaved(range(1, 7), 2)
    _write(path, first + [_row(4, ce=3.0), _row(5, ce=3.0)])
    rows, evals = read_run(path)
    assert [(r["step"], r["loss"]["ce"]) for r in rows][-3:] == [(3, 4.7), (4, 3.0), (5, 3.0)]
    assert [e["step"] for e in evals] == [2]
    # the resumed run reaches step 6 and evaluates: the new eval wins
    _write(path, first + [_row(s, ce=3.0) for s in (4, 5, 6)] + [_eval(6, ce=2.5)])
    rows, evals = read_run(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [(e["step"], e["loss"]["ce"]) for e in evals] == [(2, _eval(2, ce=4.7)["loss"]["ce"]), (6, 2.5)]
    # an eval at a step not above the previous eval's (an evaluation on resume) supersedes those at or past it
    _write(path, first + [_eval(3, ce=1.0)])
    rows, evals = read_run(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [(e["step"], e["loss"]["ce"]) for e in evals] == [(2, 4.7), (3, 1.0)]


def test_bad_eval_lines_are_warned_and_skipped(tmp_path, capsys):
    from trinity.cli.plotting import read_run

    path = tmp_path / "m.jsonl"
    good = [json.dumps(r) for r in _interleaved(range(1, 5), 1)]  # step 1, eval 1, step 2, eval 2, ...
    bad_step = dict(_eval(3), step="3")
    lines = [good[0], good[1], good[2],
             good[3][:30],                                # 4: the eval of step 2, cut short mid-file
             json.dumps(bad_step),                        # 5: an eval line whose step is not an integer
             good[4], good[6],                            # steps 3 and 4
             json.dumps(dict(_eval(4), kind="test")),     # 8: a kind that is not "eval"
             good[7][:50]]                                # 9: the last line (the eval of step 4), cut short
    path.write_text("\n".join(lines), encoding="utf-8")
    seen = []
    rows, evals = read_run(path, warn=seen.append)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [e["step"] for e in evals] == [1]
    assert [w.split(": ")[0] for w in seen] == [f"{path}:{n}" for n in (4, 5, 8, 9)]
    assert 'integer "step"' in seen[1] and 'unknown "kind" "test"' in seen[2] and "cut short" in seen[3]
    assert main(["plot", str(path), "--out", str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 4
    assert "4 steps (1…4) and 1 eval points (steps 1…1) from" in captured.out
    # only eval lines: no step to plot against
    _write(path, [_eval(1), _eval(2)])
    with pytest.raises(MetricsError, match=r"no step lines \(only 2 eval lines\)"):
        read_run(path)


def _check_pngs(folder, names):
    import matplotlib.image

    assert {p.name for p in folder.iterdir()} == names
    for png in folder.iterdir():
        data = png.read_bytes()
        assert data[:8] == PNG, png.name
        assert matplotlib.image.imread(png)[..., :3].std() > 0.05, f"{png.name} looks blank"


def test_a_single_eval_set_is_drawn_as_markers_on_the_loss_figure(tmp_path, capsys):
    """Eval losses are markers (no line) at the eval lines' tokens seen and values, over the training lines."""
    import matplotlib.axes

    from trinity.cli import plotting

    path = tmp_path / "m.jsonl"
    lines = _interleaved(range(1, 9), 3)
    _write(path, lines)
    evals = [e for e in lines if "kind" in e]
    drawn = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((self.get_title(), kwargs.get("label"), kwargs.get("linestyle"), list(args[0]), list(args[1])))
        return original(self, *args, **kwargs)

    try:
        matplotlib.axes.Axes.plot = spy
        assert main(["plot", str(path), "--out", str(tmp_path / "p")]) == 0
    finally:
        matplotlib.axes.Axes.plot = original
    assert "8 steps (1…8) and 2 eval points (steps 3…6) from" in capsys.readouterr().out
    _check_pngs(tmp_path / "p", EVAL_FIGURES)  # no sources, no bits per byte: no eval figure of its own
    markers = {}
    for _title, label, style, xs, ys in drawn:
        if label == plotting.EVAL_LABEL:
            assert style == "none"
            markers[len(markers)] = (xs, ys)
    assert len(markers) == 4  # one marker set on each loss panel
    for part, (xs, ys) in zip(plotting.LOSS_PARTS, markers.values()):
        assert xs == [e["tokens_seen"] for e in evals] and ys == [e["loss"][part] for e in evals]
    trains = [d for d in drawn if d[1] == "train"]
    assert len(trains) == 4 and trains[1][4] == [r["loss"]["ce"] for r in lines if "kind" not in r]

    series = plotting.loss_series(read_metrics(path), evals)
    assert series["x_label"] == "tokens seen" and series["sources"] == {}
    assert series["eval"]["ce"] == [e["loss"]["ce"] for e in evals]
    assert series["eval"]["perplexity"] == [e["perplexity"] for e in evals]
    assert series["eval"]["bits_per_byte"] == [None, None]
    assert plotting.eval_points(series) == 2


def test_a_mixture_draws_each_source_and_bits_per_byte(tmp_path, capsys):
    from trinity.cli import plotting

    path = tmp_path / "m.jsonl"
    lines = _interleaved(range(1, 9), 2, sources=("code", "web"), bpb=1.25)
    lines[-1]["sources"].pop("web")  # a source missing at one evaluation is a gap, not an error
    _write(path, lines)
    assert main(["plot", str(path), "--out", str(tmp_path / "p"), "--title", "mix"]) == 0
    out = capsys.readouterr().out
    assert "8 steps (1…8) and 4 eval points (steps 2…8; 2 sources) from" in out
    _check_pngs(tmp_path / "p", EVAL_FIGURES | {"eval_sources.png", "eval.png"})
    assert "eval_sources.png" in out and "eval.png" in out

    rows, evals = plotting.read_run(path)
    series = plotting.loss_series(rows, evals)
    assert list(series["sources"]) == ["code", "web"]
    for name, src in series["sources"].items():
        want = [e["sources"].get(name) for e in evals]
        assert src["x"] == [e["tokens_seen"] for e in evals]
        assert src["ce"] == [w["loss"]["ce"] if w else None for w in want]
        assert src["perplexity"] == [w["perplexity"] if w else None for w in want]
        assert src["bits_per_byte"] == [w["bits_per_byte"] if w else None for w in want]
    assert series["sources"]["web"]["ce"][-1] is None and series["sources"]["code"]["ce"][-1] is not None
    assert series["eval"]["bits_per_byte"] == [e["bits_per_byte"] for e in evals]


def test_eval_points_follow_steps_when_tokens_are_not_logged(tmp_path):
    """Without tokens_seen on every step row the x axis is the step, for eval points too; odd eval values are
    gaps."""
    from trinity.cli import plotting

    rows = [_row(s) for s in range(1, 5)]
    del rows[0]["tokens_seen"]
    evals = [_eval(2), _eval(4)]
    evals[1]["loss"] = "high"
    evals[1]["sources"] = ["not", "a", "dict"]
    series = plotting.loss_series(rows, evals)
    assert series["x_label"] == "step" and series["eval"]["x"] == [2, 4]
    assert series["eval"]["ce"] == [evals[0]["loss"]["ce"], None] and plotting.eval_points(series) == 1
    written = plotting.plot_metrics(rows, tmp_path, evals=evals)
    assert {p.split("/")[-1] for p in written} == EVAL_FIGURES
