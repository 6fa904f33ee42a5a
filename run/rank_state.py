"""A rank's own state under a layout, built from its spans only: no rank ever creates or reads a whole sharded key.

The parallel plan (plan.py) names what rank r holds of every key: `plan.wanted(r)` = {key: [(lo, hi)]}, flat ranges
of the key's whole array (every expert_bias whole: it is replicated and small). The state is then built from those
ranges alone, by the source of the run:

    fresh init      reference/model/params.init_param_spans: each key is drawn in fixed blocks, each with its own
                    seed, so the spans of any layout are slices of the one single-process init (docs/decisions.md)
    init_from       reference/interop/hf.read_pretrained_spans: the safetensors bytes of the spans only
    resume          sharded_checkpoint's span reader: the hyperslabs of the saved files (any saved layout, or a
                    single file) that overlap the spans, each block it reads verified

The optimizer state is created sharded (zeros) or read by the same spans; the balancing state (one bias and one
momentum per MoE layer, [E] each) is whole on every rank. What a rank read from files is counted (`bytes_read`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trinity.distributed.fsdp import ShardedParams, shards_from_spans
from trinity.distributed.sharded_optim import STATE_PREFIXES, init_sharded_optimizer_state
from trinity.reference.model.config import ConfigError
from trinity.reference.model.params import init_param_spans
from trinity.reference.training.balancing import init_balancing_state

from .run_config import RunConfigError

__all__ = ["RankState", "fresh_rank_state", "pretrained_rank_state", "resumed_rank_state"]


@dataclass
class RankState:
    """This rank's params (ShardedParams, its mesh attached later), optimizer and balancing state."""
    params: ShardedParams
    optimizer_state: dict
    balancing_state: dict
    bytes_read: int = 0


def fresh_rank_state(run, config, plan, rank: int) -> RankState:
    """The run's fresh init, this rank's spans only (the same values as init_params, sliced)."""
    dtype = np.dtype(run.dtype)
    values = init_param_spans(config, plan.wanted(rank), seed=run.init_seed, dtype=dtype)
    params = ShardedParams.from_spans(plan, rank, values, dtype)
    del values  # (the shards hold their copy: the spans go before the optimizer state is made)
    return _with_new_optimizer(params, config)


def pretrained_rank_state(run, base, plan, rank: int) -> RankState:
    """This rank's spans of the run's `init_from` Hugging Face checkpoint, whose config must still be `base` (the
    one the job agreed on), holding no NaN or infinity in what this rank read. Errors name the [model] key."""
    from trinity.reference.interop.hf import CheckpointError as HFError, read_pretrained_spans
    value, dtype = run.model_source[1], np.dtype(run.dtype)
    try:
        config, values, nbytes = read_pretrained_spans(value, plan.wanted(rank), dtype=dtype)
    except (ConfigError, HFError, OSError, ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise RunConfigError(f"[model] init_from = {value!r}: {e}") from None
    if config != base:
        raise RunConfigError(f"[model] init_from = {value!r}: its config.json changed while the job started")
    for key, pieces in values.items():
        if not all(np.isfinite(p).all() for p in pieces):
            raise RunConfigError(f"[model] init_from = {value!r}: the weights hold NaN or infinity ({key})")
    params = ShardedParams.from_spans(plan, rank, values, dtype)
    del values
    state = _with_new_optimizer(params, plan.config)
    state.bytes_read = nbytes
    return state


def resumed_rank_state(ckpt, plan, rank: int) -> RankState:
    """This rank's state from a checkpoint read by its spans (`ckpt`: the span reader's result, whatever layout
    saved it)."""
    dtype = ckpt.params["model.embed_tokens.weight"][0].dtype
    params = ShardedParams.from_spans(plan, rank, ckpt.params, dtype)
    ckpt.params = None  # what was read goes as soon as the shards hold it
    state = {"step": np.array(ckpt.optimizer_state["step"], dtype=np.int64)}
    for b in params.buckets:
        for prefix in STATE_PREFIXES[b.optimizer]:
            state[prefix + b.shard_name] = shards_from_spans([b], ckpt.optimizer_state, dtype, prefix)[b.shard_name]
    ckpt.optimizer_state = None
    return RankState(params, state, dict(ckpt.balancing_state), ckpt.bytes_read)


def _with_new_optimizer(params: ShardedParams, config) -> RankState:
    return RankState(params, init_sharded_optimizer_state(config, params),
                     init_balancing_state(config, params.replicated))
