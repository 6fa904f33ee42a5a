"""Figures for `trinity plot` (training metrics) and `trinity inspect --plot` (router choices), drawn with matplotlib's
Agg backend (no display needed). matplotlib is imported inside each function: `trinity -h` never loads it.

Metrics JSONL (written by trinity.run.trainer). A step line per optimizer step: step, tokens_seen,
loss{total, ce, z, balance}, grad_norm, lr{muon, adamw}, max_vio{layer: v}, expert_load{layer: [counts]},
logits_max, logits_mean, tokens_per_s, seconds, optional batch_het. An eval line per held-out evaluation, after the
step line of its step: step, "kind": "eval", tokens_seen, loss{...}, perplexity, optional bits_per_byte, tokens,
sequences, batches, optional sources{name: {loss, perplexity, tokens, optional bits_per_byte}} (a mixture),
expert_load, max_vio, seconds.

Eval figures: loss.png draws the eval losses as markers over the training lines (each loss part on its panel);
eval_sources.png (when eval lines hold sources) draws per source the eval CE, with the training CE for reference,
and the perplexity; eval.png (when eval lines hold bits_per_byte) draws the bits per byte of the whole eval set and
of each source. `loss_series` returns the data these figures draw. A file without eval lines gives the same figures
as before eval lines existed.
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["MetricsError", "read_metrics", "read_run", "loss_series", "eval_points", "plot_metrics",
           "plot_router"]


class MetricsError(ValueError):
    """A metrics file that cannot be plotted; the message names the file and line."""


def read_metrics(path, warn=None) -> list[dict]:
    """The step rows of a metrics JSONL file in step order, as a resumed run means them (`read_run`'s first part;
    eval lines are read, checked and left out)."""
    return read_run(path, warn)[0]


def read_run(path, warn=None) -> tuple[list[dict], list[dict]]:
    """(step rows, eval rows) of a metrics JSONL file, each in step order, as a resumed run means them.

    A run resumed from a checkpoint appends lines again from the checkpoint's step on, so a step line whose step is
    not above the previous step line's starts a new segment: every stored step row at or past that step is dropped
    (the interrupted run's lines past its checkpoint are superseded even where the resumed run has not reached them
    yet), and later lines win. Eval lines ("kind": "eval", written after the step line of their step) follow the
    same rule among themselves; a step line that starts a new segment at step s also drops the eval rows at or past
    s (they belong to the interrupted run). Blank lines are skipped. A bad line (cut short by a kill, not JSON, not
    a JSON object with an integer "step", a "kind" other than "eval") is skipped and reported: `warn(message)` is
    called once per bad line with a message naming the file and line number, when at least one step line is good.
    MetricsError (naming the first bad line) when the file cannot be read or holds no good step line.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MetricsError(f"{path}: is a directory, not a metrics file")
    if not os.path.isfile(path):
        raise MetricsError(f"no such file: {path}")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise MetricsError(f"{path}: cannot read ({e.strerror or e})") from None
    rows: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    last = {"step": None, "eval": None}
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    problems = []
    for n, (lineno, line) in enumerate(numbered):
        problem = None
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if n == len(numbered) - 1 and not line.rstrip().endswith("}"):
                problem = "cut short (a run stopped while writing it?)"
            elif isinstance(e, RecursionError):
                problem = "not valid JSON (nested too deeply)"
            else:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
        else:
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
                problem = 'not a JSON object with an integer "step"'
            elif "kind" in row and row["kind"] != "eval":
                problem = f'unknown "kind" {json.dumps(row["kind"])[:40]} (expected "eval" or none)'
        if problem is not None:
            problems.append(f"{path}:{lineno}: {problem}")
            continue
        step = row["step"]
        kind = "eval" if "kind" in row else "step"
        if last[kind] is not None and step <= last[kind]:
            evals = {s: r for s, r in evals.items() if s < step}
            if kind == "step":
                rows = {s: r for s, r in rows.items() if s < step}
        (evals if kind == "eval" else rows)[step] = row
        last[kind] = step
    if not rows:
        if problems:
            raise MetricsError(f"{path}: no usable metrics line ({len(problems)} bad; the first, {problems[0]})")
        if evals:
            raise MetricsError(f"{path}: no step lines (only {len(evals)} eval lines)")
        raise MetricsError(f"{path}: no metrics lines")
    if warn is not None:
        for problem in problems:
            warn(f"{problem}; line skipped")
    return [rows[s] for s in sorted(rows)], [evals[s] for s in sorted(evals)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rows, *keys):
    """(x-less) list of values rows[k1][k2]…, None where missing."""
    out = []
    for r in rows:
        v = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        out.append(v if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
    return out


def _points(x, y) -> list[tuple]:
    """The (x, y) pairs that can be drawn: both given, y finite."""
    return [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(b)]


def _plot_line(ax, x, y, label=None, **kw):
    pts = _points(x, y)
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 50 else None, **kw)
    return bool(pts)


def _counts(row, layer):
    """The expert load list of one layer in one row; None when missing or not a non-empty list of numbers."""
    loads = row.get("expert_load")
    counts = loads.get(layer) if isinstance(loads, dict) else None
    if not (isinstance(counts, list) and counts and all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                         for c in counts)):
        return None
    return counts


def _layers(rows, key):
    layers = set()
    for r in rows:
        if isinstance(r.get(key), dict):
            layers.update(r[key])
    return sorted(layers, key=lambda s: (not str(s).isdigit(), int(s) if str(s).isdigit() else s))


def _save(fig, out_dir, name, written):
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    written.append(path)


def _step_figure(out_dir, written, name, steps, lines, ylabel, title, log=False):
    """One figure of lines against the step: lines = [(values, _plot_line keywords)], a legend when a line has a
    label; log: logarithmic y axis (grid on minor ticks too)."""
    fig, ax = _pyplot().subplots(figsize=(8, 4.5), constrained_layout=True)
    for values, kw in lines:
        _plot_line(ax, steps, values, **kw)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if any("label" in kw for _, kw in lines):
        ax.legend()
    ax.grid(alpha=0.3, which="both" if log else "major")
    _save(fig, out_dir, name, written)


LOSS_PARTS = ("total", "ce", "z", "balance")
EVAL_LABEL = "eval (held-out)"


def _number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def loss_series(rows: list[dict], evals: list[dict]) -> dict:
    """The data the loss and eval figures draw, as lists (None: missing, not drawn):

      x_label  "tokens seen", or "step" when a step row has no tokens_seen (every x below is then a step)
      train    {"x", "total", "ce", "z", "balance"} over the step rows
      eval     {"x", "step", "total", "ce", "z", "balance", "perplexity", "bits_per_byte"} over the eval rows; x is
               the eval line's tokens_seen (else the step row's of that step)
      sources  {name: {"x", "total", "ce", "z", "balance", "perplexity", "bits_per_byte"}}, one per source named
               in any eval row's "sources" (first seen first), aligned with eval's rows
    """
    tokens = _series(rows, "tokens_seen")
    by_tokens = not any(t is None for t in tokens)
    seen = {r["step"]: t for r, t in zip(rows, tokens)}
    train = {"x": tokens if by_tokens else [r["step"] for r in rows]}
    train.update({part: _series(rows, "loss", part) for part in LOSS_PARTS})

    def values(items):
        out = {part: _series(items, "loss", part) for part in LOSS_PARTS}
        out.update(perplexity=_series(items, "perplexity"), bits_per_byte=_series(items, "bits_per_byte"))
        return out

    ev_x = [(_number(e.get("tokens_seen")) if _number(e.get("tokens_seen")) is not None else seen.get(e["step"]))
            if by_tokens else e["step"] for e in evals]
    ev = dict(x=ev_x, step=[e["step"] for e in evals], **values(evals))
    names: list[str] = []
    for e in evals:
        if isinstance(e.get("sources"), dict):
            names += [n for n in e["sources"] if n not in names]
    sources = {}
    for name in names:
        items = [e["sources"].get(name) if isinstance(e.get("sources"), dict) else None for e in evals]
        sources[name] = dict(x=ev_x, **values([i if isinstance(i, dict) else {} for i in items]))
    return {"x_label": "tokens seen" if by_tokens else "step", "train": train, "eval": ev, "sources": sources}


def eval_points(series: dict) -> int:
    """How many eval rows loss.png draws: those with an x and at least one finite loss part."""
    ev = series["eval"]
    return sum(1 for i, x in enumerate(ev["x"]) if x is not None and any(
        ev[p][i] is not None and math.isfinite(ev[p][i]) for p in LOSS_PARTS))


def _plot_markers(ax, x, y, label=EVAL_LABEL, **kw):
    """Eval points as markers (no line); False when there is none to draw."""
    pts = _points(x, y)
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, **{"linestyle": "none", "marker": "o", "markersize": 5, "label": label, **kw})
    return bool(pts)


def _source_panels(axes, series, key):
    """One line with markers per source of series[sources][*][key] on `axes`, and the whole eval set's as hollow
    black markers; True when anything was drawn."""
    drawn = False
    for i, (name, src) in enumerate(series["sources"].items()):
        pts = _points(src["x"], src[key])
        if pts:
            xs, ys = zip(*pts)
            axes.plot(xs, ys, marker="o", markersize=4, label=name, color=f"C{(i + 1) % 10}")
            drawn = True
    label = "all eval sets" if series["sources"] else EVAL_LABEL
    return _plot_markers(axes, series["eval"]["x"], series["eval"][key], label=label, color="k",
                         markerfacecolor="none", markersize=7) or drawn


def _eval_sources_figure(out_dir, written, series, suffix):
    """eval_sources.png: per-source eval CE (training CE for reference) and perplexity against tokens seen."""
    plt = _pyplot()
    fig, (ce_ax, ppl_ax) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    _plot_line(ce_ax, series["train"]["x"], series["train"]["ce"], label="train (mixture)", color="0.6",
               linewidth=1)
    _source_panels(ce_ax, series, "ce")
    ce_ax.set_title("cross-entropy per source")
    ce_ax.set_ylabel("CE (nats / token)")
    _source_panels(ppl_ax, series, "perplexity")
    ppl = [v for src in series["sources"].values() for v in src["perplexity"] if v is not None and v > 0]
    if ppl and max(ppl) / min(ppl) > 50:
        ppl_ax.set_yscale("log")
    ppl_ax.set_title("perplexity per source")
    ppl_ax.set_ylabel("perplexity = exp(CE)")
    for ax in (ce_ax, ppl_ax):
        ax.set_xlabel(series["x_label"])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"held-out evaluation per source{suffix}")
    _save(fig, out_dir, "eval_sources.png", written)


def _bits_per_byte_figure(out_dir, written, series, suffix):
    """eval.png: held-out bits per byte against tokens seen (the whole eval set, and each source of a mixture)."""
    fig, ax = _pyplot().subplots(figsize=(8, 4.5), constrained_layout=True)
    _source_panels(ax, series, "bits_per_byte")
    ax.set_xlabel(series["x_label"])
    ax.set_ylabel("bits per UTF-8 byte")
    ax.set_title(f"held-out bits per byte{suffix}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, out_dir, "eval.png", written)


def plot_metrics(rows: list[dict], out_dir, title: str = "", evals: list[dict] | None = None) -> list[str]:
    """Write PNGs of a run's metrics into out_dir (created if missing); returns their paths. rows, evals: the step
    and eval rows of `read_run`.

    loss.png (total, ce, z, balance against tokens seen; eval losses as markers), with eval rows that hold sources
    eval_sources.png, with bits per byte eval.png (see the module docstring), lr.png, grad_norm.png, max_vio.png (one line per MoE
    layer), expert_load.png (per MoE layer a heatmap of expert × step, load / mean load), logits.png,
    throughput.png and, when logged, batch_het.png.
    """
    import numpy as np

    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    steps = [r["step"] for r in rows]
    series = loss_series(rows, evals or [])
    train, ev = series["train"], series["eval"]
    tokens, token_label = train["x"], series["x_label"]
    suffix = f" — {title}" if title else ""

    # losses: training as lines, held-out evaluation as markers on the same axes
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, part in zip(axes.flat, LOSS_PARTS):
        ys = train[part]
        with_eval = bool(_points(ev["x"], ev[part]))
        drawn = _plot_line(ax, tokens, ys, label="train" if with_eval else None, color="C0")
        if with_eval:
            _plot_markers(ax, ev["x"], ev[part], color="C1")
            ax.legend(fontsize="small")
        elif not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        positive = [y for y in ys + ev[part] if y is not None and y > 0]
        if part in ("z", "balance") and positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")
        ax.set_title(f"loss: {part}")
        ax.set_xlabel(token_label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"loss parts{suffix}")
    _save(fig, out_dir, "loss.png", written)
    if series["sources"]:
        _eval_sources_figure(out_dir, written, series, suffix)
    if any(v is not None for v in ev["bits_per_byte"]) or any(
            v is not None for src in series["sources"].values() for v in src["bits_per_byte"]):
        _bits_per_byte_figure(out_dir, written, series, suffix)

    _step_figure(out_dir, written, "lr.png", steps,
                 [(_series(rows, "lr", group), dict(label=group)) for group in ("muon", "adamw")],
                 "learning rate", f"learning rate{suffix}")
    gn = _series(rows, "grad_norm")
    _step_figure(out_dir, written, "grad_norm.png", steps, [(gn, dict(color="C3"))],
                 "global gradient norm (before clipping)", f"gradient norm{suffix}",
                 log=any(g is not None and g > 0 for g in gn))

    # MaxVio per layer
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    layers = _layers(rows, "max_vio")
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        _plot_line(ax, steps, _series(rows, "max_vio", layer), label=f"layer {layer}",
                   color=cmap(i / max(1, len(layers) - 1)))
    if not layers:
        ax.text(0.5, 0.5, "no MoE layers logged", ha="center", va="center", transform=ax.transAxes)
    elif len(layers) <= 12:
        ax.legend(fontsize="small", ncol=2)
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio = (max load − mean) / mean")
    ax.set_title(f"expert load violation per MoE layer{suffix}")
    ax.grid(alpha=0.3)
    _save(fig, out_dir, "max_vio.png", written)

    # expert load heatmaps: one per MoE layer, expert × step, normalised by the step's mean load
    layers = [layer for layer in _layers(rows, "expert_load") if any(_counts(r, layer) for r in rows)]
    n = max(1, len(layers))
    cols = min(n, 4)
    grid_rows = math.ceil(n / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(min(4.2 * cols, 40), min(3.2 * grid_rows, 60)),
                             squeeze=False, constrained_layout=True)
    loads = []
    for layer in layers:
        cols_ = []
        width = max([len(c) for c in (_counts(r, layer) for r in rows) if c is not None] or [0])
        for r in rows:
            counts = _counts(r, layer)
            if counts is None or len(counts) != width:
                cols_.append(np.full(width, np.nan))
                continue
            c = np.asarray(counts, dtype=np.float64)
            mean = c.mean()
            cols_.append(c / mean if mean > 0 else np.full(width, np.nan))
        loads.append(np.stack(cols_, axis=1))  # [E, steps]
    finite = [float(np.nanmax(x)) for x in loads if np.isfinite(x).any()]
    vmax = max([2.0] + finite)  # one colour scale for every layer
    image = None
    for ax, layer, load in zip(axes.flat, layers, loads):
        width = load.shape[0]
        image = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=vmax,
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, width - 0.5, -0.5))
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, label="load / mean load", shrink=0.8)
    else:
        axes.flat[0].text(0.5, 0.5, "no expert load logged", ha="center", va="center")
    fig.suptitle(f"expert load per MoE layer (1 = balanced){suffix}")
    _save(fig, out_dir, "expert_load.png", written)

    _step_figure(out_dir, written, "logits.png", steps,
                 [(_series(rows, "logits_max"), dict(label="max")), (_series(rows, "logits_mean"), dict(label="mean"))],
                 "logit", f"logits{suffix}")
    _step_figure(out_dir, written, "throughput.png", steps, [(_series(rows, "tokens_per_s"), dict(color="C2"))],
                 "tokens / s", f"throughput{suffix}")
    het = _series(rows, "batch_het")
    if any(h is not None for h in het):
        _step_figure(out_dir, written, "batch_het.png", steps, [(het, dict(color="C4"))],
                     "max − mean micro-batch loss", f"BatchHet{suffix}")
    return written


def plot_router(routers: dict, token_labels: list[str], path, title: str = "") -> str:
    """Token × expert heatmaps of the router's choices, one panel per MoE layer: the gate weight g of each chosen
    expert (0 where not chosen). routers: {layer: RouterInfo} (trinity.reference.inspection) of a B = 1 run."""
    import numpy as np

    plt = _pyplot()
    layers = sorted(routers)
    if not layers:
        raise ValueError("no MoE layer to plot")
    N = routers[layers[0]].experts.shape[0]
    E = max(len(routers[l].counts) for l in layers)
    n = len(layers)
    cols = min(n, 4)
    grid_rows = math.ceil(n / cols)
    panel_h = min(0.22 * N + 1.2, 12)
    panel_w = min(0.22 * E + 2.0, 12)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(min(panel_w * cols + 1, 48), min(panel_h * grid_rows + 1, 80)),
                             squeeze=False, constrained_layout=True)
    vmax = max(float(np.max(routers[l].weights)) for l in layers)
    image = None
    step = max(1, math.ceil(N / 64))
    for ax, layer in zip(axes.flat, layers):
        r = routers[layer]
        grid = np.zeros((N, len(r.counts)))
        np.put_along_axis(grid, np.asarray(r.experts), np.asarray(r.weights, dtype=np.float64), axis=1)
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0.0, vmax=vmax)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_ylabel("token")
        ax.set_xticks(range(0, len(r.counts), max(1, math.ceil(len(r.counts) / 32))))
        ticks = list(range(0, N, step))
        ax.set_yticks(ticks)
        ax.set_yticklabels([token_labels[i] if i < len(token_labels) else str(i) for i in ticks], fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label="gate weight g (0: not chosen)", shrink=0.8)
    fig.suptitle(title or "router choices per token")
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
