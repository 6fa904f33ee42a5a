"""Figures for `trinity plot` (training metrics) and `trinity inspect --plot` (router choices), drawn with matplotlib's
Agg backend (no display needed). matplotlib is imported inside each function: `trinity -h` never loads it.

Metrics JSONL (written by trinity.run.trainer, one line per optimizer step): step, tokens_seen,
loss{total, ce, z, balance}, grad_norm, lr{muon, adamw}, max_vio{layer: v}, expert_load{layer: [counts]},
logits_max, logits_mean, tokens_per_s, seconds, optional batch_het.
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["MetricsError", "read_metrics", "plot_metrics", "plot_router"]


class MetricsError(ValueError):
    """A metrics file that cannot be plotted; the message names the file and line."""


def read_metrics(path, warn=None) -> list[dict]:
    """The rows of a metrics JSONL file in step order, as a resumed run means them.

    A run resumed from a checkpoint appends lines again from the checkpoint's step on, so a line whose step is not
    above the previous line's starts a new segment: every stored row at or past that step is dropped (the
    interrupted run's lines past its checkpoint are superseded even where the resumed run has not reached them yet),
    and later lines win. Blank lines are skipped. A bad line (cut short by a kill, not JSON, not a JSON object with
    an integer "step") is skipped and reported: `warn(message)` is called once per bad line with a message naming
    the file and line number, when at least one line is good. MetricsError (naming the first bad line) when the
    file cannot be read or holds no good line.
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
    last_step = None
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
        if problem is not None:
            problems.append(f"{path}:{lineno}: {problem}")
            continue
        step = row["step"]
        if last_step is not None and step <= last_step:
            rows = {s: r for s, r in rows.items() if s < step}
        rows[step] = row
        last_step = step
    if not rows:
        if problems:
            raise MetricsError(f"{path}: no usable metrics line ({len(problems)} bad; the first, {problems[0]})")
        raise MetricsError(f"{path}: no metrics lines")
    if warn is not None:
        for problem in problems:
            warn(f"{problem}; line skipped")
    return [rows[s] for s in sorted(rows)]


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


def _plot_line(ax, x, y, label=None, **kw):
    pts = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(b)]
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


def plot_metrics(rows: list[dict], out_dir, title: str = "") -> list[str]:
    """Write PNGs of a run's metrics into out_dir (created if missing); returns their paths.

    loss.png (total, ce, z, balance against tokens seen), lr.png, grad_norm.png, max_vio.png (one line per MoE
    layer), expert_load.png (per MoE layer a heatmap of expert × step, load / mean load), logits.png,
    throughput.png and, when logged, batch_het.png.
    """
    import numpy as np

    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    steps = [r["step"] for r in rows]
    tokens = _series(rows, "tokens_seen")
    if any(t is None for t in tokens):
        tokens = steps
        token_label = "step"
    else:
        token_label = "tokens seen"
    suffix = f" — {title}" if title else ""

    # losses
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, part in zip(axes.flat, ("total", "ce", "z", "balance")):
        ys = _series(rows, "loss", part)
        if not _plot_line(ax, tokens, ys, color="C0"):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        positive = [y for y in ys if y is not None and y > 0]
        if part in ("z", "balance") and positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")
        ax.set_title(f"loss: {part}")
        ax.set_xlabel(token_label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"loss parts{suffix}")
    _save(fig, out_dir, "loss.png", written)

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
