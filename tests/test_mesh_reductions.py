"""The mesh's sums are the rank-ordered sums x₀ + x₁ + x₂ + … on every rank and at every chunk size (mesh.py)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from trinity.distributed import mesh as mesh_module
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.simulate.virtual.virtual_comm import VirtualCluster


def _ordered(rows):
    acc = rows[0].copy()
    for row in rows[1:]:
        acc += row
    return acc


@settings(deadline=None, max_examples=25)
@given(n=st.integers(3, 6), m=st.integers(1, 40), chunk_elements=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_a_chunked_reduce_scatter_is_the_rank_ordered_sum_bitwise(n, m, chunk_elements, seed):
    rng = np.random.default_rng(seed)
    sends = [rng.standard_normal(n * m) * 10.0 ** rng.integers(-8, 8, n * m) for _ in range(n)]
    expected = _ordered([s.reshape(n, m) for s in sends])  # [n (destination), m]
    old = mesh_module.REDUCE_CHUNK_BYTES
    mesh_module.REDUCE_CHUNK_BYTES = chunk_elements * 8

    def rank(comm):
        mesh = Mesh(comm, Layout(dp_shard=n))
        out = np.empty(m)
        mesh.collective("Reduce_scatter_block", "fsdp", sends[comm.Get_rank()].copy(), out)
        return out

    try:
        got = VirtualCluster(n).run(rank)
    finally:
        mesh_module.REDUCE_CHUNK_BYTES = old
    for r in range(n):
        assert np.array_equal(got[r], expected[r])


@pytest.mark.parametrize("n", [3, 4])
def test_the_chunk_does_not_change_the_counted_bytes(n):
    def rank(comm):
        mesh = Mesh(comm, Layout(dp_shard=n))
        mesh.collective("Reduce_scatter_block", "fsdp", np.ones(n * 1000), np.empty(1000))
        return dict(mesh.traffic)

    old = mesh_module.REDUCE_CHUNK_BYTES
    counted = []
    for chunk in (8, 800, old):
        mesh_module.REDUCE_CHUNK_BYTES = chunk
        try:
            counted.append(VirtualCluster(n).run(rank))
        finally:
            mesh_module.REDUCE_CHUNK_BYTES = old
    assert counted[0] == counted[1] == counted[2]
    assert counted[0][0][("Reduce_scatter_block", "fsdp")] == (n - 1) * 1000 * 8
