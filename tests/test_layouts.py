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


def _close(a, b, what, rtol=RTOL):
    scale = max(float(np.abs(b).max()), 1e-300)
    err = float(np.abs(np.asarray(a, dtype=np.float64) - b).max()) / scale
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def check_layout(layout, config, S, T, mbs, seed=0, doc_every=7.0, rtol=RTOL):
    params0 = init_params(config, seed=seed, dtype=np.float64)
    batches = _batches(config, S, T, seed, doc_every)
    lr = (2e-2, 1e-2)
    ref_p, ref_o, ref_b, ref_losses = _single(config, params0, batches, S // layout.dp, lr)
    for rank, (p, o, b, losses, bias) in enumerate(
            VirtualCluster(layout.world_size).run(_rank, layout, config, params0, batches, mbs, lr)):
        assert set(p) == set(ref_p) and set(o) == set(ref_o)
        for k in ref_p:
            _close(p[k], ref_p[k], f"rank {rank} param {k}", rtol)
        for k in ref_o:
            if k != "step":
                _close(o[k], ref_o[k], f"rank {rank} optimizer {k}", rtol)
        for k in ref_b:
            _close(b[k], ref_b[k], f"rank {rank} balancing {k}", rtol)
        for k, v in bias.items():  # every rank holds the same expert_bias, the single process's
            _close(v, ref_p[k], f"rank {rank} {k}", rtol)
        for step, (got, want) in enumerate(zip(losses, ref_losses)):
            for part in want:
                assert abs(got[part] - want[part]) <= rtol * max(abs(want[part]), 1e-300), (rank, step, part)


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


# ---- schedule options (distributed/options.py): each trains the same model ---------------------------------------
# Every option that changes what is gathered, kept, reduced or when, alone and combined; the dtype options are below
# (they change the rounding by design).
SCHEDULES = ["keep_gathered=all", "keep_gathered=experts", "keep_gathered=all,keep_gathered_gib=0.00002",
             "reshard_after_forward=none", "reshard_after_forward=dense", "reshard_after_forward=experts",
             "reduce_gradients=step", "async_reduce=true", "reduce_gradients=step,async_reduce=true",
             "keep_gathered=experts,reshard_after_forward=dense,async_reduce=true",
             "keep_gathered=all,reshard_after_forward=none,reduce_gradients=step,async_reduce=true"]
EVERYTHING = SCHEDULES[-1]


@pytest.mark.parametrize("options", SCHEDULES)
@pytest.mark.parametrize("text", ["dp_shard=4", "dp_replicate=2,dp_shard=2,cp=2,ep=2"])
def test_every_schedule_option_trains_the_single_process_model(text, options):
    layout = Layout.parse(f"{text},{options}")
    config = _config(window=6, doc_mask=True, method="smebu", tied=False)
    check_layout(layout, config, S=4 * layout.dp, T=12 * layout.cp, mbs=2)


@pytest.mark.parametrize("text", NAMED)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_every_option_at_once_on_every_named_layout(text, tied):
    layout = Layout.parse(f"{text},{EVERYTHING}")
    config = _config(window=6, doc_mask=True, method="sign", tied=tied)
    check_layout(layout, config, S=4 * layout.dp, T=12 * layout.cp, mbs=2, seed=1)


# The dtype options round what they move (by design): the step's gradients and losses are the single process's to
# within that dtype's rounding, not float64's. Measured worst errors on these layouts, relative to the largest
# gradient, in ulps of the dtype: float32 gathers 2.5, reductions 0.8; bfloat16 gathers 29 (the gradients of
# rounded weights), reductions 0.8. The tolerance is 64 ulps.
WIRE = {"float32": np.finfo(np.float32).eps}
try:
    import ml_dtypes
    WIRE["bfloat16"] = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)
except ImportError:
    ml_dtypes = None


def _rank_gradients(comm, layout, config, params0, batch, mbs):
    mesh = Mesh(comm, layout)
    ops, p, _ = parallelize(REFERENCE, mesh, config, params0, init_optimizer_state(config, params0))
    g = compute_gradients(config, p, batch, micro_batch_size=mbs, ops=ops, mesh=mesh, check=False)
    return g.losses, g.grad_norm, p.full(sharded=g.grads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", ["gather_dtype={d}", "reduce_dtype={d}",
                                     "gather_dtype={d},reduce_dtype={d},reduce_gradients=step,async_reduce=true"])
@pytest.mark.parametrize("text", ["dp_shard=4", "dp_replicate=2,dp_shard=2,cp=2,ep=2"])
def test_the_dtype_options_round_what_they_move_and_only_that(text, options, dtype):
    if dtype not in WIRE:
        pytest.skip("bfloat16 needs ml_dtypes (test_bfloat16_without_ml_dtypes_is_refused_in_one_line)")
    layout = Layout.parse(f"{text},{options.format(d=dtype)}")
    config = _config(window=6, doc_mask=True, method="smebu", tied=False)
    params0 = init_params(config, seed=2, dtype=np.float64)
    batch = _batches(config, 4 * layout.dp, 12 * layout.cp, 2, 7.0)[0]
    want = compute_gradients(config, {k: v.copy() for k, v in params0.items()}, batch, micro_batch_size=2 * layout.dp,
                             ops=REFERENCE)
    tol = 64 * WIRE[dtype]
    worst = 0.0
    for losses, norm, grads in VirtualCluster(layout.world_size).run(_rank_gradients, layout, config, params0,
                                                                      batch, 2):
        scale = max(float(np.abs(v).max()) for v in want.grads.values())
        for k, v in grads.items():
            err = float(np.abs(v - want.grads[k]).max()) / scale
            assert err <= tol, (k, err)
            worst = max(worst, err)
        assert abs(norm - want.grad_norm) <= tol * want.grad_norm
        for part in ("ce", "z"):
            assert abs(losses[part] - want.losses[part]) <= tol * abs(want.losses[part]), part
    assert worst > 1e-3 * tol  # the option did round something (float64 alone is ~1e-16)


def test_bfloat16_without_ml_dtypes_is_refused_in_one_line(monkeypatch):
    from trinity.distributed import options
    from trinity.distributed.layout import LayoutError
    monkeypatch.setattr(options, "_bfloat16", lambda: None)
    layout = Layout.parse("dp_shard=2,gather_dtype=bfloat16,reduce_dtype=bfloat16")
    config = _config(window=6, doc_mask=True, method="smebu", tied=False)
    with pytest.raises(LayoutError) as e:
        layout.check(world_size=2, config=config, seq_len=12, micro_batch_size=1, batch_sizes=[2])
    assert "gather_dtype and reduce_dtype = bfloat16 needs the ml_dtypes package (pip install ml_dtypes)" in \
        str(e.value) and "\n" not in str(e.value)
    with pytest.raises(options.OptionError, match="ml_dtypes"):
        options.wire_dtype("bfloat16", np.float64)
    assert Layout.parse("dp_shard=2,gather_dtype=float32").options.unavailable() == []
