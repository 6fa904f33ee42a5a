"""The AFMoE model, written once against an op table: config (Config, presets, HF config.json), params (names,
shapes, init, counts), ops (the op table: operators/ plus the optimizer kernels), layers and model (forward and
backward), objective (losses and gradients of one batch), kv_cache (the incremental-decoding seam of model_forward).

Imports: operators/ only.
"""
