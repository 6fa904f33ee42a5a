"""`trinity plan --model M --gpus N --gpu G --tokens T`: every layout of a training job on N GPUs, predicted by the
cost model (trinity.simulate.planning.cost_model) and ranked by throughput among those that fit in memory.

Lists the top layouts (dp_replicate, dp_shard, ep, cp, micro-batch, recompute) with their step time, tokens/s per
GPU, MFU, memory per GPU, the phase that bounds the step and the days the token budget takes, tokens/s and days each
as a point and a range over the stated assumptions (efficiencies, link efficiency, overlap on/off, the router's
imbalance: trinity.simulate.planning.ranges), then states the best answer's range and the assumption it is most
sensitive to, marks what it rests on that no published run validates (a GPU without a validated run, an unfitted
assumption, the network being the bottleneck), compares it with a published run of the same job where the run
catalogue has one, and explains why the best one wins. --png draws the ranked layouts' step time by phase. The batch schedule is --batch: sequences per
step, a later size after a token count (default "12288,16384@4.9e12": Trinity Large's published schedule, 12,288
sequences raised to 16,384 after 4.9T tokens). --max-vio sets the busiest expert-parallel rank's load over the
mean minus one (a what-if for the router's imbalance; default 0: balanced); --routing takes it, per ep, from the
expert loads a run of the model recorded. Figures are predictions: docs/simulation.md
states the sources, assumptions and how far the model was validated.
"""

from __future__ import annotations

import json

import math
import os

from trinity.simulate.planning.limits import MAX_GPUS, MAX_SEQ_LEN

from .common import CLIError, load_config
from .inputs import check_output_file, number, one_line_errors, whole

NAME = "plan"
HELP = "rank the layouts of a training job on N GPUs by predicted throughput (the cost model)"
MAX_TOKENS = 1e18  # a token budget (and a schedule's change point): a million times Trinity Large's 17T
MAX_VIO = 1e6  # the busiest ep rank's load over the mean, minus 1


def add_parser(subparsers):
    p = one_line_errors(subparsers.add_parser(
        NAME, help=HELP, description=__doc__.split("\n\n")[0],
        epilog="example: trinity plan --model trinity-large --gpus 2048 --gpu b300 --tokens 17e12 --png plan.png"))
    p.add_argument("--model", required=True, metavar="PRESET_OR_PATH", help="a preset name or a config.json")
    p.add_argument("--gpus", type=whole(1, MAX_GPUS), required=True,
                   help=f"number of GPUs (ranks), at most {MAX_GPUS:,}")
    p.add_argument("--gpu", required=True, help="GPU kind: h100, h200, b200 or b300")
    p.add_argument("--tokens", type=number(0, MAX_TOKENS, above=True), required=True,
                   help="the token budget (e.g. 17e12)")
    p.add_argument("--seq-len", type=whole(1, MAX_SEQ_LEN), default=8192,
                   help=f"tokens per sequence (default 8192, at most {MAX_SEQ_LEN:,} and the model's "
                        f"max_position_embeddings)")
    p.add_argument("--batch", default="12288,16384@4.9e12", metavar="SCHEDULE",
                   help="sequences per step, then SIZE@TOKENS for a change (default %(default)s)")
    p.add_argument("--max-vio", type=number(0, MAX_VIO), default=0.0, metavar="V",
                   help="the busiest ep rank's routed rows over the mean, minus 1 (default 0)")
    p.add_argument("--fix", default="", metavar="DIMS",
                   help="only layouts with these sizes, e.g. ep=8 or dp_shard=64,ep=8 (the --mesh syntax)")
    p.add_argument("--routing", metavar="METRICS",
                   help="a metrics.jsonl of a run of this model: its recorded expert loads give each ep's busiest "
                        "rank (instead of --max-vio)")
    p.add_argument("--options", default="", metavar="OPTIONS",
                   help="schedule options of every layout, e.g. reduce_gradients=step,async_reduce=true "
                        "(trinity.distributed.options; default none)")
    p.add_argument("--ranks-per-node", type=whole(1, MAX_GPUS), default=8, metavar="K",
                   help="GPUs per node (default 8)")
    p.add_argument("--top", type=whole(1), default=10, help="rows of the table (default 10)")
    p.add_argument("--png", metavar="FILE", help="draw the ranked layouts' step time by phase")
    p.add_argument("--json", metavar="FILE", help="write every candidate's prediction as JSON")
    p.set_defaults(run=run)
    return p


def parse_schedule(text: str) -> list[tuple[float, int]]:
    """"12288,16384@4.9e12" → [(0, 12288), (4.9e12, 16384)] (CLIError in one line)."""
    out = []
    for i, part in enumerate(filter(None, (p.strip() for p in text.split(",")))):
        size, _, start = part.partition("@")
        try:
            entry = (float(start) if start else 0.0, int(size))
        except ValueError:
            raise CLIError(f"--batch {text!r}: {part!r} is not SIZE or SIZE@TOKENS") from None
        if not (math.isfinite(entry[0]) and 0 <= entry[0] <= MAX_TOKENS):
            raise CLIError(f"--batch {text!r}: {part!r}: the token count must be a finite number from 0 to "
                           f"{MAX_TOKENS:g}")
        if entry[1] < 1 or (i == 0) != (entry[0] == 0) or (out and entry[0] <= out[-1][0]):
            raise CLIError(f"--batch {text!r}: sizes must be positive, the first without @, later ones at "
                           f"increasing token counts")
        out.append(entry)
    if not out:
        raise CLIError(f"--batch {text!r}: no batch size")
    return out


def parse_fixed(text: str) -> dict:
    """"ep=8,dp_shard=64" → {"ep": 8, "dp_shard": 64} (CLIError in one line)."""
    from trinity.distributed.layout import DIMS

    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in DIMS or not value.isdigit() or int(value) < 1:
            raise CLIError(f"--fix {text!r}: {part!r} is not DIM=SIZE with DIM among {', '.join(DIMS)}")
        out[name] = int(value)
    return out


def parse_options(text: str):
    """"reduce_gradients=step,async_reduce=true" → ParallelOptions (CLIError in one line); "" → None (defaults)."""
    from trinity.distributed.layout import Layout, LayoutError

    if not text.strip():
        return None
    try:
        return Layout.parse("single," + text).options
    except LayoutError as e:
        raise CLIError(f"--options {text!r}: {e}") from None


def run(args) -> int:
    import dataclasses

    from trinity.simulate.planning.hardware import get_hardware
    from trinity.simulate.planning.planner import (SearchTooLarge, add_ranges, check_size, explain, fastest_with,
                                                   search)

    if args.routing and not os.path.isfile(args.routing):  # a FIFO or a device would block the read
        raise CLIError(f"--routing {args.routing}: " + ("is not a regular file" if os.path.exists(args.routing)
                                                        else "no such file"))
    for path, option in ((args.png, "--png"), (args.json, "--json")):
        if path is not None:
            check_output_file(path, option, inputs=[args.model if os.path.exists(args.model) else None,
                                                    args.routing])
    if args.png is not None and args.json is not None and os.path.realpath(args.png) == os.path.realpath(args.json):
        raise CLIError(f"--png and --json name the same file {args.json}")
    config, _ = load_config(args.model)
    try:
        hw = get_hardware(args.gpu)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.seq_len > config.max_position_embeddings:
        raise CLIError(f"--seq-len {args.seq_len:,}: exceeds max_position_embeddings "
                       f"{config.max_position_embeddings:,} of {args.model}")
    hw = dataclasses.replace(hw, ranks_per_node=args.ranks_per_node)
    batches = parse_schedule(args.batch)
    fixed = parse_fixed(args.fix)
    options = parse_options(args.options)
    try:
        check_size(gpus=args.gpus, seq_len=args.seq_len, batches=batches)
    except SearchTooLarge as e:
        raise CLIError(str(e)) from None
    imbalance = 1.0 + args.max_vio
    if args.routing:
        from trinity.simulate.planning.routing import busiest_rank_factor, read_expert_loads
        try:
            loads = read_expert_loads(args.routing)
            if any(len(c) != config.num_experts for row in loads for c in row.values()):
                raise ValueError(f"{args.routing}: its expert counts are not of {config.num_experts} experts")
        except (OSError, ValueError) as e:
            raise CLIError(f"--routing: {e}") from None
        imbalance = lambda ep: busiest_rank_factor(loads, ep)  # noqa: E731
    try:
        plan = search(config, gpus=args.gpus, hardware=hw, seq_len=args.seq_len, batches=batches,
                      tokens=args.tokens, micro_batches=(1, 2, 3, 4, 6, 8, 12, 16), imbalance=imbalance, fixed=fixed,
                      options=options)
    except SearchTooLarge as e:
        raise CLIError(str(e)) from None
    if plan.considered == 0:
        raise CLIError(f"no layout of {args.gpus:,} GPUs runs this job" + (f" with --fix {args.fix}" if fixed else "")
                       + " (the layout rules: docs/distributed.md)")
    published = published_run(args)
    also = [c for c in [fastest_with(plan, dict(published.fixed))] if c is not None] if published else []
    add_ranges(plan, config, hw, seq_len=args.seq_len, top=args.top, also=also)
    schedule = ", then ".join(f"{s:,} x {args.seq_len:,} tokens" + (f" from {_tokens(t)}" if t else "")
                              for t, s in batches)
    print(f"{args.model} on {args.gpus:,} {hw.name} ({hw.hbm_bytes / 1e9:.0f} GB), {_tokens(args.tokens)} tokens, "
          f"batch {schedule}" + (f"; schedule options {options.text()}" if options else "")
          + f"; {plan.considered} choices, {len(plan.ranked)} fit in memory")
    print(table(plan, args.gpus, args.top))
    for line in answer_lines(plan, args, hw, published):
        print(line)
    for line in explain(plan, hw):
        print("- " + line)
    if args.png:
        try:
            draw(plan, args.png, args.top, title=f"{args.model}, {args.gpus} x {hw.name}")
        except OSError as e:
            raise CLIError(f"--png {args.png}: cannot write ({e.strerror or e})") from None
        print(f"wrote {args.png}")
    if args.json:
        from trinity.reference.files import atomic_path
        try:
            with atomic_path(args.json) as tmp, open(tmp, "w") as f:
                json.dump([row(c, args.gpus) for c in plan.ranked + plan.rejected], f, indent=1)
        except OSError as e:
            raise CLIError(f"--json {args.json}: cannot write ({e.strerror or e})") from None
    return 0 if plan.best else 1


def published_run(args):
    """The in-scope published run of this job in the run catalogue (the same preset, GPU, GPU count and token
    budget), or None."""
    from trinity.simulate.planning.published import in_scope

    gpu = args.gpu.lower().removesuffix("-sxm")
    return next((r for r in in_scope() if r.preset == args.model and r.gpus == args.gpus and r.gpu == gpu
                 and r.days is not None and r.tokens == args.tokens), None)


def answer_lines(plan, args, hw, published=None) -> list[str]:
    """The best answer as a range, its most sensitive assumption, what it rests on unvalidated, and the published
    run of the same job where the catalogue has one."""
    from trinity.simulate.planning.hardware import VALIDATED
    from trinity.simulate.planning.planner import caveats, fastest_with

    best = plan.best
    if best is None or best.days_range is None:
        return []
    r, t = best.days_range, best.tps_range
    lines = [f"answer: {r.point:.3g} days, range {r.low:.3g} to {r.high:.3g} days ({t.low:,.0f} to {t.high:,.0f} "
             f"tokens/s per GPU at the first batch); most sensitive to {r.most_sensitive} "
             f"({min(r.swings[r.most_sensitive]):.3g} to {max(r.swings[r.most_sensitive]):.3g} days across its range)"]
    for line in caveats(plan, hw, args.gpu.lower().removesuffix("-sxm")):
        lines.append("! unvalidated: " + line)
    if published is not None:
        fixed = ",".join(f"{k}={v}" for k, v in published.fixed.items())
        same = fastest_with(plan, dict(published.fixed))
        line = f"published: {published.name} took {published.days:g} days ({published.source}, {fixed or 'its layout'})"
        if same is not None and same.days_range is not None:
            q = same.days_range
            line += (f"; the fastest {fixed} choice here ({same.first.layout}, micro-batch "
                     f"{same.first.micro_batch_size}, recompute {'on' if same.first.recompute else 'off'}) predicts "
                     f"{q.point:.3g} days, range {q.low:.3g} to {q.high:.3g}: the published {published.days:g} days are "
                     f"{'inside' if q.holds(published.days) else 'outside'} it (predicted/published "
                     f"{q.point / published.days:.2f}; most sensitive to {q.most_sensitive}"
                     f"{'' if VALIDATED.get(q.most_sensitive, False) else ', not validated'})")
        line += (f"; the best choice above would take {r.point / published.days:.2f} of the published figure, which "
                 f"lies {'inside' if r.holds(published.days) else 'outside'} its range")
        lines.append(line)
    return lines


def _tokens(n: float) -> str:
    """17e12 → "17T", 4.9e12 → "4.9T", 2e9 → "2B", 5e5 → "500K"."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


def row(cand, gpus: int) -> dict:
    p = cand.first
    L = p.layout
    out = {"dp_replicate": L.dp_replicate, "dp_shard": L.dp_shard, "ep": L.ep, "cp": L.cp,
           "micro_batch": p.micro_batch_size, "recompute": p.recompute, "fits": cand.fits,
           "step_s": [q.step_seconds for q in cand.predictions], "tokens_per_s_per_gpu": p.tokens_per_s / gpus,
           "mfu": p.mfu, "memory_gb": cand.peak_memory / 1e9, "days": cand.days, "bound": p.bound,
           "phases_s": p.phases, "memory_bytes": p.memory}
    if cand.days_range is not None:
        out["days_range"] = [cand.days_range.low, cand.days_range.high]
        out["tokens_per_s_per_gpu_range"] = [cand.tps_range.low, cand.tps_range.high]
        out["most_sensitive"] = cand.days_range.most_sensitive
        out["days_swings"] = cand.days_range.swings
    return out


def table(plan, gpus: int, top: int) -> str:
    from trinity.simulate.planning.hardware import VALIDATED

    head = (f"{'#':>3} {'dp_rep':>6} {'dp_shard':>8} {'ep':>4} {'cp':>3} {'micro':>5} {'recomp':>6} {'step s':>8} "
            f"{'tok/s/GPU (range)':>23} {'MFU':>5} {'mem GB':>8} {'days (range)':>21}  bound by; most sensitive to")
    lines = [head]
    for i, cand in enumerate(plan.ranked[:top], 1):
        r = row(cand, gpus)
        tps, days, sens = f"{r['tokens_per_s_per_gpu']:,.0f}", f"{r['days']:.3g}", ""
        if "days_range" in r:
            lo, hi = r["tokens_per_s_per_gpu_range"]
            tps += f" ({lo:,.0f}-{hi:,.0f})"
            days += f" ({r['days_range'][0]:.3g}-{r['days_range'][1]:.3g})"
            sens = "; " + r["most_sensitive"] + ("" if VALIDATED.get(r["most_sensitive"], False) else "*")
        lines.append(f"{i:>3} {r['dp_replicate']:>6} {r['dp_shard']:>8} {r['ep']:>4} {r['cp']:>3} "
                     f"{r['micro_batch']:>5} {'yes' if r['recompute'] else 'no':>6} {r['step_s'][0]:>8.3g} "
                     f"{tps:>23} {r['mfu']:>5.1%} {r['memory_gb']:>8.4g} {days:>21}  {r['bound']}{sens}")
    if any(line.endswith("*") for line in lines):
        lines.append("  * an assumption no published run validates (docs/simulation.md, \"Answers as ranges\")")
    return "\n".join(lines)


def draw(plan, path: str, top: int, title: str) -> None:
    """Stacked bars: the top layouts' step time by phase, memory per GPU above each bar."""
    from trinity.reference.files import atomic_path
    from trinity.simulate.planning.cost_model import PHASES

    from .plotting import _pyplot

    plt = _pyplot()
    cands = plan.ranked[:top]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(cands) + 3.5), 4.5))
    bottoms = [0.0] * len(cands)
    for phase in PHASES:
        values = [c.first.phases[phase] for c in cands]
        ax.bar(range(len(cands)), values, bottom=bottoms, label=phase)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, c in enumerate(cands):
        ax.text(i, bottoms[i], f"{c.peak_memory / 1e9:.0f} GB", ha="center", va="bottom", fontsize=7)
    labels = [f"r{c.first.layout.dp_replicate} s{c.first.layout.dp_shard}\nep{c.first.layout.ep} cp{c.first.layout.cp}"
              f"\nmb{c.first.micro_batch_size}{' rc' if c.first.recompute else ''}" for c in cands]
    ax.set_xticks(range(len(cands)), labels, fontsize=7)
    ax.set_ylabel("predicted step time (s), first batch")
    ax.set_title(f"{title}: fastest layouts that fit, memory per GPU on top", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
