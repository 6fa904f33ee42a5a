"""`trinity plot METRICS.jsonl --out DIR`: PNG figures of a training run's metrics.

Writes loss.png (total, ce, z and balance loss against tokens seen: training as lines, held-out evaluation as
markers), lr.png, grad_norm.png, max_vio.png (MaxVio per MoE layer), expert_load.png (per MoE layer a heatmap of
expert × step, load / mean load), logits.png, throughput.png and, when logged, batch_het.png; with eval lines that
hold sources (a mixture) eval_sources.png (per-source eval CE and perplexity), with bits per byte eval.png. A
resumed run's re-logged steps are handled: later lines win. A bad line (cut short, not JSON, not an object with an
integer step, an unknown kind) is named by line number in a warning on stderr and skipped; a file with no good step
line is an error.
"""

from __future__ import annotations

import os
import sys

from .common import CLIError

NAME = "plot"
HELP = "draw PNGs of a training run's metrics (train and eval loss, lr, grad norm, MaxVio, expert load)"


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__.split("\n\n")[0],
                              epilog="example: trinity plot runs/tiny/metrics.jsonl --out runs/tiny/plots")
    p.add_argument("metrics", metavar="METRICS.jsonl", help="the metrics file written by `trinity train`")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for the PNGs (created if missing)")
    p.add_argument("--title", default=None, help="text added to every figure title (default: the file name)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from .plotting import MetricsError, eval_points, loss_series, plot_metrics, read_run

    def warn(message):
        print(f"trinity plot: warning: {message}", file=sys.stderr)

    try:
        rows, evals = read_run(args.metrics, warn=warn)
    except MetricsError as e:
        raise CLIError(str(e)) from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} exists and is not a directory")
    title = args.title if args.title is not None else os.path.basename(os.path.dirname(os.path.abspath(args.metrics)))
    try:
        written = plot_metrics(rows, args.out, title=title, evals=evals)
    except OSError as e:
        raise CLIError(f"cannot write into {args.out}: {e}") from None
    drew = ""
    if evals:
        series = loss_series(rows, evals)
        sources = f"; {len(series['sources'])} sources" if series["sources"] else ""
        drew = f" and {eval_points(series)} eval points (steps {evals[0]['step']}…{evals[-1]['step']}{sources})"
    print(f"{len(rows)} steps ({rows[0]['step']}…{rows[-1]['step']}){drew} from {args.metrics}; wrote "
          f"{len(written)} figures to {args.out}: {', '.join(os.path.basename(w) for w in written)}")
    return 0
