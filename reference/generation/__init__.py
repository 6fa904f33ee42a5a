"""Autoregressive generation: sampling (generate, generate_stream, sample_next) over the model's KV cache
(model/kv_cache.py).

Imports: model/.
"""
