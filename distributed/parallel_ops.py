"""The op table of a rank in a parallel layout: a backend's table with the model's seams replaced by collectives.

The model code is the one of trinity.reference; what changes under a layout is only what its seams do
(reference/model/seams.py), each seam in its own module:

    parameter gather / gradient hand-back   fsdp.py              (dp_shard·cp: FSDP buckets; dp_replicate)
    token dispatch / combine                expert_parallel.py   (ep)
    key/value gathering, per-sequence sums  context_parallel.py  (cp)

Leaf operators (and `xp`, `scope`, the optimizer kernels) are the wrapped backend's. A seam whose dimension has size 1
is the single-process identity, so a mesh of one rank runs exactly the single-process computation.
"""

from __future__ import annotations

from .context_parallel import ContextParallelSeams
from .expert_parallel import ExpertParallelSeams
from .fsdp import ShardedParamSeams

__all__ = ["ParallelOps", "parallelize"]


class ParallelOps(ShardedParamSeams, ExpertParallelSeams, ContextParallelSeams):
    """`base` (an op table from trinity.accel.get_backend) on `mesh` (mesh.Mesh) for the model `config`."""

    def __init__(self, base, mesh, config):
        self.base, self.mesh, self.config = base, mesh, config
        self.name = f"{getattr(base, 'name', type(base).__name__)}@{mesh.layout}"
        self.xp = base.xp
        self._init_sharding()

    def __getattr__(self, name):  # the leaf operators, scope and the optimizer kernels: the backend's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.base, name)


def parallelize(backend, mesh, config, params: dict, optimizer_state: dict):
    """A run's single-process state laid out on this rank of `mesh`: (op table, this rank's ShardedParams, its
    sharded optimizer state). Every rank passes the same whole params and state (built or loaded the same way); no
    communication."""
    from .fsdp import ShardedParams
    from .sharded_optim import shard_optimizer_state
    sharded = ShardedParams.from_full(config, mesh, params)
    return ParallelOps(backend, mesh, config), sharded, shard_optimizer_state(config, sharded, optimizer_state)
