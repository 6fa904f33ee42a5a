"""The cost model against published training runs, held out from calibration (docs/simulation.md, "Validation on
published runs").

    python benchmarks/validate_published.py [--json FILE] [--markdown]

1. Split the in-scope runs of the catalogue (trinity.simulate.planning.published) by the fixed rule of
   trinity.simulate.planning.validation.split: per source, in catalogue order, calibration and held out alternate;
   Arcee's Trinity runs are always held out. Out-of-scope runs (a schedule trinity does not run) are listed with
   their reason and counted in neither half.
2. Fit gemm, attention and link efficiency on the calibration half alone (validation.fit) and print the fit beside
   the points the hardware catalogue uses (hardware.FITTED, GEMM_SPAN, VALIDATED: they must agree; if they do not,
   the catalogue is stale).
3. Predict every in-scope run with the fitted efficiencies: the point (predicted/published ratio) and the range over
   the stated assumption ranges (ranges.py), whether the published figure lies inside, the assumption the answer is
   most sensitive to, and the memory per GPU beside the published one where there is one.
4. Print the held-out coverage (published figures inside their ranges) and the point ratios; exit status 1 when
   fewer than 5 held-out runs or fewer than 80 % of them are inside their ranges.

It takes about 5 s here (one planner search, for Trinity Large's unpublished split).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

from trinity.simulate.planning.cost_model import account
from trinity.simulate.planning.hardware import FITTED, GEMM_SPAN, VALIDATED
from trinity.simulate.planning.published import CATALOGUE
from trinity.simulate.planning.validation import fit, predict_run, split


def memory_text(result) -> str:
    """Predicted memory per GPU (GiB; for a selective-recompute run, whole-layer recompute … none) / published."""
    run = result.run
    text = f"{result.memory_gib:.0f}"
    if run.partial_recompute:
        low = account(run.config(), result_layout(result), seq_len=run.seq_len, sequences=run.global_batch,
                      micro_batch_size=result.micro_batch, recompute=True).memory["total"] / 2 ** 30
        text = f"{low:.0f}-{result.memory_gib:.0f}"
    return text + (f" / {run.memory_gib:g}" if run.memory_gib else "")


def result_layout(result):
    from trinity.distributed.layout import Layout
    return Layout.parse(result.layout)


def fmt(x: float, unit: str) -> str:
    return f"{x:.1f}" if unit == "days" else f"{x:,.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE", help="write every run's prediction")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown (docs/simulation.md)")
    args = ap.parse_args(argv)

    calibration, held_out = split()
    values, constrained, span = fit(calibration)
    print(f"split: {len(calibration)} calibration, {len(held_out)} held out, "
          f"{sum(1 for r in CATALOGUE if r.out_of_scope)} out of scope")
    how = {k: "constrained" if c else "not constrained: its prior" for k, c in constrained.items()}
    print("fit on the calibration half: " + ", ".join(f"{k} {v:.2f} ({how[k]})" for k, v in values.items())
          + f"; gemm_efficiency range x{span[0]:.2f} .. x{span[1]:.2f}")
    stale = any(abs(values[k] - FITTED[k]) > 0.005 for k in FITTED) or any(
        abs(a - b) > 0.005 for a, b in zip(span, GEMM_SPAN)) or any(constrained[k] != VALIDATED[k] for k in constrained)
    print("the hardware catalogue uses " + ("these values" if not stale else
                                              f"OTHER values ({FITTED}, {GEMM_SPAN}): update hardware.py"))
    rows = []
    sep = " | " if args.markdown else "  "
    head = ["run", "half", "GPUs", "layout (trinity)", "published", "predicted", "range", "ratio", "inside",
            "most sensitive to", "memory GiB pred / pub"]
    print(("| " + " | ".join(head) + " |\n|" + "---|" * len(head)) if args.markdown else sep.join(head))
    for run in calibration + held_out:
        r = predict_run(run, values)
        a = r.answer
        half = "calibration" if run in calibration else "held out"
        cells = [run.name, half, f"{run.gpus} {run.gpu.upper()}",
                 f"{r.layout}, micro-batch {r.micro_batch}{', recompute' if r.recompute else ''}",
                 f"{fmt(r.published, r.unit)} {r.unit}", fmt(a.point, r.unit),
                 f"{fmt(a.low, r.unit)}-{fmt(a.high, r.unit)}", f"{r.ratio:.2f}", "yes" if r.inside else "NO",
                 a.most_sensitive, memory_text(r)]
        print(("| " + " | ".join(cells) + " |") if args.markdown else sep.join(cells), flush=True)
        rows.append({"run": run.name, "half": half, "source": run.source, "reference": run.reference,
                     "published": r.published, "unit": r.unit, "point": a.point, "low": a.low, "high": a.high,
                     "ratio": r.ratio, "inside": r.inside, "most_sensitive": a.most_sensitive,
                     "swings": a.swings, "memory_gib": r.memory_gib, "published_memory_gib": run.memory_gib,
                     "layout": r.layout, "micro_batch": r.micro_batch, "recompute": r.recompute})
    print("out of scope (listed, not predicted, not counted):")
    for run in CATALOGUE:
        if run.out_of_scope:
            figure = f"{run.tokens_per_s:,.0f} tokens/s/GPU" if run.tokens_per_s else f"{run.days:.0f} days"
            print(f"  {run.name} ({run.source}, {figure}): {run.out_of_scope}")
    for half in ("calibration", "held out"):
        mine = [r for r in rows if r["half"] == half]
        inside = sum(r["inside"] for r in mine)
        ratios = [r["ratio"] for r in mine]
        err = math.exp(statistics.mean(abs(math.log(x)) for x in ratios)) - 1
        widths = statistics.median(r["high"] / r["low"] for r in mine)
        print(f"{half}: {inside} of {len(mine)} published figures inside their range ({inside / len(mine):.0%}); "
              f"point ratios {min(ratios):.2f} to {max(ratios):.2f}, mean |log ratio| = {err:.1%}; median range "
              f"width high/low {widths:.2f}")
    held = [r for r in rows if r["half"] == "held out"]
    ok = len(held) >= 5 and sum(r["inside"] for r in held) >= 0.8 * len(held)
    print(f"acceptance (>= 5 held out, >= 80 % inside): {'yes' if ok else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fit": values, "constrained": constrained, "gemm_span": span, "rows": rows}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
