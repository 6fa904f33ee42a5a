"""Contracts every op table meets, which the parallel seams rely on (reference/model/seams.py)."""

import numpy as np
import pytest

from trinity.accel import available_backends, get_backend
from trinity.distributed.layout import Layout
from trinity.reference.model.precision import PRECISIONS, with_precision
from trinity.reference.model.seams import LINEAR_CTX, linear_ctx_weight
from trinity.reference.training.groups import GROUPS
from trinity.reference.training.step import LOCAL


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", [n for n, why in available_backends().items() if why is None])
def test_every_backends_linear_ctx_holds_the_weight_itself(backend, precision):
    ops = with_precision(get_backend(backend), precision)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 8)), rng.standard_normal((5, 8))
    y, ctx = ops.linear_forward(x, w)
    assert linear_ctx_weight(ctx, w), f"{backend}: linear ctx is not {LINEAR_CTX}"
    dx, dw = ops.linear_backward(ctx, np.ones_like(y))
    assert dx.shape == x.shape and dw.shape == w.shape


class _OtherCtx:
    """An op table whose linear ctx breaks the contract (it copies the weight)."""
    name = "other-ctx"

    def __init__(self):
        self.base = get_backend("reference")
        self.xp = self.base.xp

    def linear_forward(self, x, w):
        y, (x_, w_) = self.base.linear_forward(x, w)
        return y, {"x": x_, "w": w_.copy()}

    def __getattr__(self, name):
        return getattr(self.base, name)


def _forward_with(comm, config):
    from trinity.distributed.mesh import Mesh
    from trinity.distributed.parallel_ops import parallelize
    from trinity.reference import init_params
    from trinity.reference.model.model import model_forward
    from trinity.reference.training.optim import init_optimizer_state
    mesh = Mesh(comm, Layout(dp_shard=2))
    params0 = init_params(config, seed=0, dtype=np.float64)
    ops, params, _ = parallelize(_OtherCtx(), mesh, config, params0, init_optimizer_state(config, params0))
    tokens = np.zeros((1, 8), dtype=np.int64)
    try:
        model_forward(config, params, tokens, ops=ops, check=False)
    except TypeError as e:
        return str(e)
    return None


def test_fsdp_refuses_an_op_table_that_breaks_the_linear_ctx_contract():
    from trinity.reference.model.config import Config
    from trinity.simulate.virtual.virtual_comm import VirtualCluster
    config = Config.preset("tiny").replace(num_hidden_layers=2)
    for message in VirtualCluster(2).run(_forward_with, config):
        assert message is not None and "other-ctx" in message and LINEAR_CTX in message


@pytest.mark.parametrize("name", ["data", "shards", "replicas", "fsdp ", ""])
def test_a_misspelt_group_fails_in_one_process_too(name):
    with pytest.raises(ValueError, match="unknown group"):
        LOCAL.sum(1.0, name)
    with pytest.raises(ValueError, match="unknown group"):
        LOCAL.max(1.0, name)


@pytest.mark.parametrize("name", GROUPS)
def test_every_group_of_the_vocabulary_is_the_identity_in_one_process(name):
    assert LOCAL.sum(3.5, name) == 3.5 and LOCAL.max(2.0, name) == 2.0
