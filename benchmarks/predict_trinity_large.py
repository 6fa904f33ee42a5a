"""Prediction (b): Trinity Large's pretraining wall time from the cost model, beside the published 33 days, as a
point and a range over the stated assumptions.

    python benchmarks/predict_trinity_large.py

Published (seeds/: Arcee's announcement and a write-up of the technical report; the model card's pretraining
context of 8,192 tokens): 2,048 NVIDIA B300 GPUs; HSDP with expert parallel 8 ("2048 data-parallel ranks", so no
context parallel); 17T tokens; 12,288 sequences per step, raised to 16,384 after 4.9T tokens; pretraining finished
in 33 days. It is the catalogue's held-out run "Trinity Large, 2048 B300" (trinity.simulate.planning.published; its
range is computed as for every held-out run, validation.predict_run). Not published, so this project's assumptions:
the dp_shard / dp_replicate split, the micro-batch size and recompute (the planner's fastest choice with ep = 8 that
fits in memory is taken), the efficiencies fitted on the calibration runs (hardware.FITTED), a balanced router
(MaxVio 0), 8 GPUs per node, and that the run had no downtime (33 days of wall time is all training).

Prints the point, the range, the ratio to 33 days, the implied MFU of the published figure and the predicted one,
and how the answer moves across each assumption's range (ranges.py).
"""

from __future__ import annotations

from trinity.simulate.planning.published import CATALOGUE
from trinity.simulate.planning.ranges import gpu_assumptions
from trinity.simulate.planning.validation import predict_run, run_hardware
from trinity.simulate.planning.workload import training_flops

PUBLISHED_DAYS = 33.0


def main():
    run = next(r for r in CATALOGUE if r.name == "Trinity Large, 2048 B300")
    config, hw = run.config(), run_hardware(run)
    result = predict_run(run)
    a = result.answer
    flops_per_token = training_flops(config, 1, run.seq_len) / run.seq_len
    print(f"Trinity Large, {run.gpus} x {hw.name}, {run.tokens / 1e12:g}T tokens of {run.seq_len}, batch 12,288 "
          f"then 16,384 sequences after 4.9T; training FLOPs per token {flops_per_token / 1e9:.1f} G")
    print(f"planner's fastest layout with ep=8: {result.layout}, micro-batch {result.micro_batch}, recompute "
          f"{'on' if result.recompute else 'off'}; memory {result.memory_gib * 2 ** 30 / 1e9:.0f} GB per GPU")
    print(f"predicted: {a.point:.1f} days, range {a.low:.1f} to {a.high:.1f}; published: {PUBLISHED_DAYS:g} days "
          f"({'inside' if a.holds(PUBLISHED_DAYS) else 'outside'} the range); ratio predicted/published "
          f"{a.point / PUBLISHED_DAYS:.2f}")
    published_tps = run.tokens / (PUBLISHED_DAYS * 86400 * run.gpus)
    predicted_tps = run.tokens / (a.point * 86400 * run.gpus)
    print(f"published throughput {published_tps:,.0f} tokens/s per GPU = MFU "
          f"{published_tps * flops_per_token / hw.peak_flops:.1%} of the dense bf16 peak; predicted "
          f"{predicted_tps:,.0f} tokens/s per GPU = MFU {predicted_tps * flops_per_token / hw.peak_flops:.1%} "
          f"(over the whole schedule)")
    print(f"most sensitive to {a.most_sensitive}; days at each end of each assumption's range (the others at "
          f"their points):")
    for assumption in gpu_assumptions(hw, expert_parallel=True):
        fast, slow = a.swings[assumption.name]
        print(f"  {assumption.name:<22} {assumption.point:.2f} ({assumption.fast:.2f} .. {assumption.slow:.2f}): "
              f"{fast:5.1f} .. {slow:5.1f} days  [{'validated' if assumption.validated else 'not validated'}: "
              f"{assumption.why}]")


if __name__ == "__main__":
    main()
