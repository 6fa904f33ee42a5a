"""FSDP frees what it gathers: a layer's gathered weights live from just before its use to just after, in the forward
and again in the backward, and no ctx keeps them in between (distributed/fsdp.py)."""

import numpy as np
import pytest

from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed.parallel_ops import parallelize
from trinity.reference import Config, init_params
from trinity.reference.model.model import model_backward, model_forward
from trinity.reference.model.ops import REFERENCE
from trinity.reference.training.optim import init_optimizer_state
from trinity.simulate.virtual.virtual_comm import VirtualCluster


def _bucket_bytes(ops, bucket):
    return sum(b.padded * 8 for b in ops._by_model_bucket.get(bucket, []))


def _rank(comm, config, recompute):
    mesh = Mesh(comm, Layout(dp_shard=2))
    params0 = init_params(config, seed=0, dtype=np.float64)
    ops, params, _ = parallelize(REFERENCE, mesh, config, params0, init_optimizer_state(config, params0))
    tokens = np.random.default_rng(comm.Get_rank()).integers(0, config.vocab_size, (2, 16))
    logits, ctx = model_forward(config, params, tokens, ops=ops, check=False, recompute=recompute)
    after_forward = ops.gathered_bytes()
    model_backward(config, params, ctx, np.ones_like(logits))
    del ctx
    layers = [_bucket_bytes(ops, layer) for layer in range(config.num_hidden_layers)]
    head = _bucket_bytes(ops, "head") + (_bucket_bytes(ops, "embed") if config.tie_word_embeddings else 0)
    return after_forward, ops.gathered_bytes(), layers, head


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_gathered_weights_are_freed_after_use(tied, recompute):
    config = Config.preset("tiny").replace(num_hidden_layers=6, tie_word_embeddings=tied)
    for after_forward, after_backward, layers, head in VirtualCluster(2).run(_rank, config, recompute):
        # after the forward only the head's gather (prefetched for the backward) is alive, not the layers'
        assert after_forward <= head < sum(layers), (after_forward, head, layers)
        assert after_backward == 0
