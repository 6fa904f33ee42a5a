"""Expert parallel (distributed/expert_parallel.py): the MoE layer on ep ∈ {1, 2, 4} virtual ranks, each routing its
own tokens to experts partitioned over the ranks, against the single-process MoE of each rank's tokens with all
experts; the order of the rows an expert receives; and the bytes counted for the exchanges."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.distributed.expert_parallel import ExpertParallelSeams
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.reference.model.layers import moe_backward, moe_forward
from trinity.reference.model.ops import REFERENCE, ReferenceOps
from trinity.simulate.virtual.virtual_comm import VirtualCluster

PRE = "model.layers.0.mlp."
EXPERT_KEYS = [PRE + "experts.gate_proj", PRE + "experts.up_proj", PRE + "experts.down_proj"]


SINGLE = REFERENCE


class EPOps(ExpertParallelSeams, ReferenceOps):
    """The reference table with the expert-parallel seams on `mesh`."""

    def __init__(self, mesh):
        self.mesh, self.base = mesh, REFERENCE


@st.composite
def moe_cases(draw, dtype=np.float64):
    """A MoE layer and each rank's tokens: E = ep·E_l experts, some of them starved of tokens (a large negative
    expert_bias, selection only), 0–6 tokens per rank."""
    ep = draw(st.sampled_from([1, 2, 4]))
    El = draw(st.integers(1, 3))
    E = ep * El
    K = draw(st.integers(1, E))
    d, I = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    Ns = draw(st.lists(st.integers(0, 6), min_size=ep, max_size=ep))
    starved = draw(st.lists(st.booleans(), min_size=E, max_size=E))
    if ep > 1 and draw(st.booleans()):  # every expert of one rank starved: it receives no rows at all
        r = draw(st.integers(0, ep - 1))
        starved[r * El:(r + 1) * El] = [True] * El
    while E - sum(starved) < K:  # keep K experts that can be chosen
        starved[starved.index(True)] = False
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = {PRE + "router.gate.weight": rng.normal(0, 2 / np.sqrt(d), (E, d)),
         PRE + "expert_bias": np.where(starved, -1e3, rng.normal(0, 0.1, E)),
         PRE + "experts.gate_proj": rng.normal(0, 1 / np.sqrt(d), (E, I, d)),
         PRE + "experts.up_proj": rng.normal(0, 1 / np.sqrt(d), (E, I, d)),
         PRE + "experts.down_proj": rng.normal(0, 1 / np.sqrt(I), (E, d, I))}
    if draw(st.booleans()):
        for name, shape in (("gate_proj", (I, d)), ("up_proj", (I, d)), ("down_proj", (d, I))):
            p[PRE + f"shared_experts.{name}.weight"] = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
    p = {k: v.astype(dtype) for k, v in p.items()}
    xs = [rng.normal(0, 1, (n, d)).astype(dtype) for n in Ns]
    dys = [rng.normal(0, 1, (n, d)).astype(dtype) for n in Ns]
    dscores = [rng.normal(0, 0.1, (n, E)).astype(dtype) if draw(st.booleans()) else None for n in Ns]
    return dict(ep=ep, K=K, route_scale=draw(st.floats(0.25, 3.0)), params=p, xs=xs, dys=dys, dscores=dscores)


def local_params(params, ep, r):
    """Rank r's params: its slice [E/ep, …] of the experts, the rest whole."""
    El = params[EXPERT_KEYS[0]].shape[0] // ep
    return {k: v[r * El:(r + 1) * El] if k in EXPERT_KEYS else v for k, v in params.items()}


def run_ep(case):
    """moe_forward/moe_backward on ep virtual ranks; per rank (y, dx, grads, ctx, traffic)."""
    ep = case["ep"]

    def rank(comm):
        mesh = Mesh(comm, Layout(dp_shard=ep, ep=ep))
        r = mesh.ep_rank
        ops, p = EPOps(mesh), local_params(case["params"], ep, r)
        y, ctx = moe_forward(ops, case["xs"][r], p, PRE, case["K"], case["route_scale"])
        dx, grads = moe_backward(ops, ctx, case["dys"][r], p, PRE, case["dscores"][r])
        return y, dx, grads, ctx, mesh.take_traffic()

    return VirtualCluster(ep, timeout=30.0).run(rank)


def run_single(case, r):
    y, ctx = moe_forward(SINGLE, case["xs"][r], case["params"], PRE, case["K"], case["route_scale"])
    dx, grads = moe_backward(SINGLE, ctx, case["dys"][r], case["params"], PRE, case["dscores"][r])
    return y, dx, grads, ctx


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=100)
@given(moe_cases())
def test_moe_layer_matches_single_process(case):
    ep = case["ep"]
    E = case["params"][EXPERT_KEYS[0]].shape[0]
    El = E // ep
    got, want = run_ep(case), [run_single(case, r) for r in range(ep)]
    for r in range(ep):
        (y, dx, grads, ctx, traffic), (y1, dx1, grads1, ctx1) = got[r], want[r]
        assert y.shape == y1.shape and dx.shape == dx1.shape
        close(y, y1)
        close(dx, dx1)
        for k in grads1:  # router, bias, shared expert: this rank's own tokens
            if k not in EXPERT_KEYS:
                close(grads[k], grads1[k])
        for k in EXPERT_KEYS:  # rank r's experts see every rank's tokens: Σ_s (rank s's full gradient)[r's experts]
            assert grads[k].shape[0] == El
            close(grads[k], sum(w[2][k] for w in want)[r * El:(r + 1) * El])
        # the rows rank r's experts received: local expert, then source rank, then the source's order
        x_local, offsets_local = ctx["experts"][0], ctx["experts"][1]
        blocks, counts = [], []
        for e in range(r * El, (r + 1) * El):
            rows = [w[3]["router"].x[w[3]["plan"].token[w[3]["plan"].offsets[e]:w[3]["plan"].offsets[e + 1]]]
                    for w in want]
            blocks += rows
            counts.append(sum(len(b) for b in rows))
        np.testing.assert_array_equal(x_local, np.concatenate(blocks).reshape(-1, x_local.shape[1]))
        np.testing.assert_array_equal(offsets_local, np.concatenate([[0], np.cumsum(counts)]))
        if ep == 1:
            assert traffic == {}  # the identity: no collective at all
        else:
            assert set(traffic) <= {("Alltoall", "ep"), ("Alltoallv", "ep")}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(data=st.data())
def test_alltoallv_counts_the_rows_that_leave_the_rank(dtype, data):
    case = data.draw(moe_cases(dtype=dtype).filter(lambda c: c["ep"] > 1))
    ep, d = case["ep"], case["xs"][0].shape[1]
    E = case["params"][EXPERT_KEYS[0]].shape[0]
    El = E // ep
    got = run_ep(case)
    counts = [g[3]["plan"].counts.reshape(ep, El).sum(axis=1) for g in got]  # [ep] rows per destination rank
    itemsize = np.dtype(dtype).itemsize
    for r, (y, dx, grads, ctx, traffic) in enumerate(got):
        assert y.dtype == dx.dtype == dtype and ctx["experts"][0].dtype == dtype
        out_rows = counts[r].sum() - counts[r][r]  # this rank's rows for other ranks' experts
        in_rows = sum(counts[s][r] for s in range(ep) if s != r)  # other ranks' rows for this rank's experts
        # dispatch and combine-backward send out_rows; combine and dispatch-backward send in_rows back
        assert traffic[("Alltoallv", "ep")] == 2 * (out_rows + in_rows) * d * itemsize
        assert traffic[("Alltoall", "ep")] == (ep - 1) * E * 8 // ep  # one count exchange, at the dispatch
