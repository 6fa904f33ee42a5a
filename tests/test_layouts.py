"""Every layout is the same model: three training steps on virtual ranks equal the single process (float64).

The distributed code runs unchanged on trinity.simulate's virtual communicator (n ranks as threads in one process);
tests/test_mpi_train.py runs the same comparison under real `mpiexec`. A wrong shard, a misrouted token, a halo of
the wrong length or a gradient reduced over the wrong group changes the parameters by far more than the tolerance
(1e-10 relative; float64 rounding of a reordered sum is ~1e-15).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed.parallel_ops import parallelize
from trinity.distributed.sharded_optim import gather_optimizer_state
from trinity.reference import Config, init_params
from trinity.reference.data.packing import document_ids
from trinity.reference.model.ops import REFERENCE
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.step import GlobalBatch, apply_update, compute_gradients
from trinity.simulate.virtual.virtual_comm import VirtualCluster

STEPS = 3
RTOL = 1e-10


def _config(window, doc_mask, method, tied, experts=4):
    return Config.preset("tiny").replace(
        num_experts=experts, num_experts_per_tok=2, sliding_window=window, intra_document_mask=doc_mask,
        load_balancing=method, balance_loss_coeff=1e-2, tie_word_embeddings=tied, vocab_size=64, hidden_size=32,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        smebu_lambda=1e-2, sign_update_rate=1e-2)


def _batches(config, S, T, seed, doc_every):
    """STEPS global batches; EOS (token 0) placed every `doc_every` tokens on average so documents cross chunks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        tokens = rng.integers(1, config.vocab_size, (S, T))
        tokens[rng.random((S, T)) < 1.0 / doc_every] = 0
        docs = document_ids(tokens, 0) if config.intra_document_mask else None
        out.append(GlobalBatch(tokens, doc_ids=docs))
    return out


def _single(config, params0, batches, mbs, lr):
    p = {k: v.copy() for k, v in params0.items()}
    o, b = init_optimizer_state(config, p), init_balancing_state(config, p)
    losses = []
    for batch in batches:
        g = compute_gradients(config, p, batch, micro_batch_size=mbs, ops=REFERENCE)
        apply_update(config, p, o, b, g, *lr, ops=REFERENCE)
        losses.append(g.losses)
    return p, o, b, losses


def _rank(comm, layout, config, params0, batches, mbs, lr):
    mesh = Mesh(comm, layout)
    ops, p, o = parallelize(REFERENCE, mesh, config, params0, init_optimizer_state(config, params0))
    b = init_balancing_state(config, params0)
    losses = []
    for batch in batches:
        g = compute_gradients(config, p, batch, micro_batch_size=mbs, ops=ops, mesh=mesh, check=False)
        apply_update(config, p, o, b, g, *lr, ops=ops, mesh=mesh)
        losses.append(g.losses)
    return p.full(), gather_optimizer_state(config, p, o), {k: v.copy() for k, v in b.items()}, losses, \
        {k: p[k].copy() for k in p.replicated}


def _close(a, b, what):
    scale = max(float(np.abs(b).max()), 1e-300)
    err = float(np.abs(np.asarray(a, dtype=np.float64) - b).max()) / scale
    assert err <= RTOL, f"{what}: relative error {err:.2e}"


def check_layout(layout, config, S, T, mbs, seed=0, doc_every=7.0):
    params0 = init_params(config, seed=seed, dtype=np.float64)
    batches = _batches(config, S, T, seed, doc_every)
    lr = (2e-2, 1e-2)
    ref_p, ref_o, ref_b, ref_losses = _single(config, params0, batches, S // layout.dp, lr)
    for rank, (p, o, b, losses, bias) in enumerate(
            VirtualCluster(layout.world_size).run(_rank, layout, config, params0, batches, mbs, lr)):
        assert set(p) == set(ref_p) and set(o) == set(ref_o)
        for k in ref_p:
            _close(p[k], ref_p[k], f"rank {rank} param {k}")
        for k in ref_o:
            if k != "step":
                _close(o[k], ref_o[k], f"rank {rank} optimizer {k}")
        for k in ref_b:
            _close(b[k], ref_b[k], f"rank {rank} balancing {k}")
        for k, v in bias.items():  # every rank holds the same expert_bias, the single process's
            _close(v, ref_p[k], f"rank {rank} {k}")
        for step, (got, want) in enumerate(zip(losses, ref_losses)):
            for part in want:
                assert abs(got[part] - want[part]) <= RTOL * max(abs(want[part]), 1e-300), (rank, step, part)


# The layouts the issue names, and one that uses every dimension at once.
NAMED = ["dp_shard=4", "dp_replicate=2,dp_shard=2", "dp_shard=2,ep=2", "dp_shard=4,ep=4", "cp=2",
         "dp_replicate=2,dp_shard=2,cp=2,ep=4"]


@pytest.mark.parametrize("text", NAMED)
def test_named_layouts_equal_the_single_process(text):
    layout = Layout.parse(text)
    config = _config(window=6, doc_mask=True, method="smebu", tied=False)
    S = 4 * layout.dp
    check_layout(layout, config, S=S, T=12 * layout.cp, mbs=2)


@st.composite
def layouts(draw):
    """A layout of at most 8 ranks with its job: sequence length, window, documents, experts, micro-batches."""
    cp = draw(st.sampled_from([1, 1, 2, 3]))
    dp_shard = draw(st.sampled_from([1, 2, 4]))
    dp_replicate = draw(st.sampled_from([1, 2]))
    if dp_replicate * dp_shard * cp > 8:
        dp_shard = 1
    ep = draw(st.sampled_from([e for e in (1, 2, 4) if (dp_shard * cp) % e == 0]))
    chunk = draw(st.integers(1, 5))
    T = 2 * cp * chunk
    # w ≥ 2: with w = 1 a query sees only its own key, the q/k gradients are 0 up to rounding, and Muon turns that
    # noise into an O(1) update that differs between layouts
    window = draw(st.one_of(st.integers(2, chunk + 1), st.integers(T, T + 3))) if cp > 1 else \
        draw(st.integers(2, T + 2))
    layout = Layout(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, ep=ep)
    mbs = draw(st.sampled_from([1, 2]))
    S = layout.dp * mbs * draw(st.integers(1, 2))
    config = _config(window=window, doc_mask=draw(st.booleans()), method=draw(st.sampled_from(["smebu", "sign"])),
                     tied=draw(st.booleans()), experts=4)
    return layout, config, S, T, mbs, draw(st.sampled_from([2.0, 5.0, 50.0]))


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(layouts(), st.integers(0, 2 ** 16))
def test_drawn_layouts_equal_the_single_process(drawn, seed):
    layout, config, S, T, mbs, doc_every = drawn
    assert not layout.problems(world_size=layout.world_size, config=config, seq_len=T, micro_batch_size=mbs,
                               batch_sizes=[S])
    check_layout(layout, config, S, T, mbs, seed=seed, doc_every=doc_every)
