"""Prediction (b): Trinity Large's pretraining wall time from the cost model, beside the published 33 days.

    python benchmarks/predict_trinity_large.py

Published (seeds/: Arcee's announcement and a write-up of the technical report): 2,048 NVIDIA B300 GPUs; HSDP with
expert parallel 8 ("2048 data-parallel ranks", so no context parallel); 17T tokens; 12,288 sequences per step,
raised to 16,384 after 4.9T tokens; pretraining finished in 33 days. The sequence length of 8,192 tokens is the
issue's statement of the run. Not published, so this project's assumptions: the dp_shard / dp_replicate split, the
micro-batch size and recompute (the planner's fastest choice with ep = 8 that fits in memory is taken), the
efficiencies of trinity.simulate.planning.hardware, a balanced router (MaxVio 0), 8 GPUs per node, and that the run had no
downtime (33 days of wall time is all training).

Prints the prediction, its ratio to 33 days, the implied MFU of the published figure and the predicted one, and how
the prediction moves when each assumed efficiency is halved or raised by half.
"""

from __future__ import annotations

import dataclasses

from trinity.reference import Config
from trinity.simulate.planning.hardware import get_hardware
from trinity.simulate.planning.planner import search
from trinity.simulate.planning.workload import training_flops

PUBLISHED_DAYS = 33.0
GPUS, TOKENS, SEQ_LEN = 2048, 17e12, 8192
BATCHES = [(0.0, 12288), (4.9e12, 16384)]


def best_ep8(config, hw):
    plan = search(config, gpus=GPUS, hardware=hw, seq_len=SEQ_LEN, batches=BATCHES, tokens=TOKENS,
                  micro_batches=(1, 2, 3, 4, 6, 8), fixed={"ep": 8})
    return plan.best


def main():
    config, hw = Config.preset("trinity-large"), get_hardware("b300")
    best = best_ep8(config, hw)
    p = best.first
    flops_per_token = training_flops(config, 1, SEQ_LEN) / SEQ_LEN
    published_tps = TOKENS / (PUBLISHED_DAYS * 86400 * GPUS)
    print(f"Trinity Large, {GPUS} x {hw.name}, {TOKENS / 1e12:g}T tokens of {SEQ_LEN}, batch 12,288 then 16,384 "
          f"sequences after 4.9T; training FLOPs per token {flops_per_token / 1e9:.1f} G")
    print(f"planner's fastest layout with ep=8: {p.layout}, micro-batch {p.micro_batch_size}, recompute "
          f"{'on' if p.recompute else 'off'}; step {p.step_seconds:.2f} s at 12,288 sequences, "
          f"{best.predictions[1].step_seconds:.2f} s at 16,384; memory {best.peak_memory / 1e9:.0f} GB per GPU")
    print("phases at 12,288 sequences: " + ", ".join(f"{k} {v:.2f} s" for k, v in p.phases.items()))
    print(f"predicted: {best.days:.1f} days; published: {PUBLISHED_DAYS:g} days; ratio predicted/published "
          f"{best.days / PUBLISHED_DAYS:.2f}")
    published_mfu = published_tps * flops_per_token / hw.peak_flops
    predicted_tps = TOKENS / (best.days * 86400 * GPUS)
    print(f"published throughput {published_tps:,.0f} tokens/s per GPU = MFU {published_mfu:.1%} of the dense bf16 "
          f"peak; predicted {predicted_tps:,.0f} tokens/s per GPU = MFU {p.mfu:.1%} (first batch)")
    print("sensitivity (days, fastest ep=8 layout re-planned):")
    for field in ("gemm_efficiency", "attention_efficiency", "memory_efficiency", "link_efficiency"):
        value = getattr(hw, field)
        low = best_ep8(config, dataclasses.replace(hw, **{field: value / 2})).days
        high = best_ep8(config, dataclasses.replace(hw, **{field: min(1.0, value * 1.5)})).days
        print(f"  {field:<22} {value:.2f}: x0.5 -> {low:5.1f} days, x1.5 -> {high:5.1f} days")
    for field, scale in (("inter_node_latency", 4.0), ("inter_node_bandwidth", 0.5)):
        value = getattr(hw, field)
        days = best_ep8(config, dataclasses.replace(hw, **{field: value * scale})).days
        print(f"  {field:<22} x{scale:g}: {days:5.1f} days")


if __name__ == "__main__":
    main()
