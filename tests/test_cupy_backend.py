"""The cupy op table (trinity.accel.cupy_backend) beyond the conformance suite, which checks it op by op and step by
step as "cupy-sim" (tests/conformance): loading, the copy rule (no host↔device copy inside a training step, counted),
the grouped expert GEMMs, the bf16 emulation, and the table under the parallel seams (virtual ranks).

Without a GPU every test runs the simulated table (NumPy arrays, the kernels under Numba's CUDA simulator); with
CuPy and a CUDA device the step and copy tests also run get_backend("cupy"). The simulator runs every GPU thread as a
Python thread, so the models here are tiny.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from trinity.accel import BackendUnavailable, get_backend

if importlib.util.find_spec("numba_cuda") is None:
    pytest.skip("numba-cuda is not installed (it is in the test extra: pip install -e '.[test]')",
                allow_module_level=True)

from trinity.accel import cupy_backend  # noqa: E402
from trinity.accel.device import to_device, to_host, transfer_counts, watch_transfers  # noqa: E402

try:
    SIM = cupy_backend.simulated()
except BackendUnavailable as e:  # numba.cuda already imported for a real GPU in this process
    SIM = None
    SIM_WHY = str(e)

from strategies import random_params  # noqa: E402
from trinity.reference import Config  # noqa: E402
from trinity.reference.model.ops import REFERENCE  # noqa: E402
from trinity.reference.training.balancing import init_balancing_state  # noqa: E402
from trinity.reference.training.optim import init_optimizer_state  # noqa: E402
from trinity.reference.training.step import GlobalBatch, apply_update, compute_gradients  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    """The cupy tables that can run here: the simulated one, and the real one on a GPU."""
    out = []
    if SIM is not None:
        out.append(pytest.param(SIM, id="simulated"))
    try:
        out.append(pytest.param(get_backend("cupy"), id="gpu"))
    except BackendUnavailable:
        pass
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="no cupy table can run here"))]


needs_sim = pytest.mark.skipif(SIM is None, reason="the simulated table cannot run in this process")


# ---- loading ---------------------------------------------------------------------------------------------------
def test_get_backend_cupy_needs_cupy_and_a_gpu():
    try:
        import cupy  # noqa: F401
        pytest.skip("cupy is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable, match="cupy is not installed"):
        cupy_backend.load()


@needs_sim
def test_simulated_table():
    assert isinstance(SIM, cupy_backend.CupyOps) and SIM.simulated and SIM.xp is np and SIM.name == "cupy"
    from trinity.accel.cuda import _common
    assert _common.SIMULATOR
    # every kernel-backed or grouped operator is the table's own, not the reference's
    for module, names in cupy_backend.KERNEL_OPS.items():
        for name in names:
            assert getattr(SIM, name).__module__ in (f"trinity.accel.cuda.{module}", cupy_backend.__name__), name
    for name in cupy_backend.TABLE_OPS:
        assert getattr(type(SIM), name) is not getattr(type(REFERENCE), name), name
    with pytest.raises(ValueError, match="ns_dtype"):
        cupy_backend.CupyOps(np, simulated=True, ns_dtype="float16")


# ---- the copy rule -------------------------------------------------------------------------------------------------
def _config():
    """Two MoE layers after a dense one, a sliding and a global layer, documents, every loss on: tiny."""
    return Config.preset("tiny").replace(
        num_hidden_layers=3, num_dense_layers=1, vocab_size=40, hidden_size=16, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=24, moe_intermediate_size=8, num_experts=4,
        num_experts_per_tok=2, num_shared_experts=1, sliding_window=4, global_attn_every_n_layers=3,
        intra_document_mask=True, z_loss_coeff=1e-2, balance_loss_coeff=1e-2, load_balancing="smebu")


def _batch(config, S=2, T=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (S, T))
    labels = np.where(rng.random((S, T)) < 0.2, -100, tokens)
    return tokens, labels, np.sort(rng.integers(0, 2, (S, T)), axis=1)


def _step(config, ops, params, batch, mbs):
    opt, bal = init_optimizer_state(config, params), init_balancing_state(config, params)
    g = compute_gradients(config, params, batch, micro_batch_size=mbs, ops=ops)
    info = apply_update(config, params, opt, bal, g, 1e-2, 1e-2, ops=ops)
    return g, info, opt, bal


@pytest.mark.parametrize("ops", _tables())
def test_a_training_step_copies_nothing_between_host_and_device(ops):
    """compute_gradients + apply_update (two micro-batches) on the table: no array crosses host↔device inside the
    step (accel/device.py counts its own moves and watches every primitive conversion), and the step equals the
    reference's (float64). The parameters, optimizer state and batch move in before the step, the results out
    after it."""
    config = _config()
    params64 = random_params(config, 0)
    tokens, labels, docs = _batch(config)
    want_p = {k: v.copy() for k, v in params64.items()}
    want_g, want_info, want_opt, want_bal = _step(config, REFERENCE, want_p, GlobalBatch(tokens, labels, docs), 1)

    params = to_device(params64, ops.xp)  # once, before training
    batch = GlobalBatch(*to_device([tokens, labels, docs], ops.xp))  # the step's boundary
    opt, bal = init_optimizer_state(config, params), init_balancing_state(config, params)  # made on the device
    before = transfer_counts()
    with watch_transfers() as seen:
        g = compute_gradients(config, params, batch, micro_batch_size=1, ops=ops)
        info = apply_update(config, params, opt, bal, g, 1e-2, 1e-2, ops=ops)
    assert dict(seen) == {}, f"host↔device copies inside the step: {dict(seen)}"
    assert transfer_counts() == before

    got_p, got_opt, got_bal = to_host(params), to_host(opt), to_host(bal)
    assert g.losses.keys() == want_g.losses.keys()
    for k in g.losses:
        assert abs(g.losses[k] - want_g.losses[k]) <= 1e-10 * max(1.0, abs(want_g.losses[k])), k
    assert abs(g.grad_norm - want_g.grad_norm) <= 1e-10 * want_g.grad_norm
    for k, v in want_p.items():
        np.testing.assert_allclose(got_p[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
    for k, v in want_opt.items():
        np.testing.assert_allclose(np.asarray(got_opt[k], np.float64), v, rtol=1e-9, atol=1e-12, err_msg=k)
    for k, v in want_bal.items():
        np.testing.assert_allclose(got_bal[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
    assert info["optimizer"]["step"] == want_info["optimizer"]["step"]


@pytest.mark.parametrize("ops", _tables())
def test_a_bf16_step_copies_nothing_and_is_the_reference_bf16_step(ops):
    """The same step at precision "bf16" (float32 master weights; reference/model/precision.py): the rounding runs
    on the device's arrays, so nothing crosses inside the step either; its losses are the reference's bf16 losses
    within one bf16 rounding (eps(bf16) relative: the two tables' float32 results may straddle a bf16 boundary)."""
    from trinity.reference.model.precision import with_precision

    config = _config()
    params32 = {k: v.astype(np.float32) for k, v in random_params(config, 1).items()}
    tokens, labels, docs = _batch(config, seed=1)
    want_g, _, _, _ = _step(config, with_precision(REFERENCE, "bf16"), {k: v.copy() for k, v in params32.items()},
                            GlobalBatch(tokens, labels, docs), 1)
    table = with_precision(ops, "bf16")
    params = to_device(params32, ops.xp)
    batch = GlobalBatch(*to_device([tokens, labels, docs], ops.xp))
    opt, bal = init_optimizer_state(config, params), init_balancing_state(config, params)
    with watch_transfers() as seen:
        g = compute_gradients(config, params, batch, micro_batch_size=1, ops=table)
        apply_update(config, params, opt, bal, g, 1e-2, 1e-2, ops=table)
    assert dict(seen) == {}, f"host↔device copies inside the bf16 step: {dict(seen)}"
    for k in g.losses:
        assert abs(g.losses[k] - want_g.losses[k]) <= 2.0 ** -7 * max(1e-3, abs(want_g.losses[k])), k
    assert all(v.dtype == np.float32 for v in to_host(params).values())


@needs_sim
def test_the_watch_sees_copies():
    """The guard of the test above is not blind: each kind of conversion it watches is counted when it happens."""
    from numba import cuda

    from trinity.accel.cuda import _common, elementwise

    x = np.ones(5)
    with watch_transfers() as seen:
        to_host(to_device({"a": x, "b": [x, None]}, np))
        cuda.to_device(x)
        _common.launch(elementwise._gate_fwd, 1, 8, x, x, np.empty(5))  # through launch: a zero-copy view
        elementwise._gate_fwd[1, 8](x, x, np.empty(5))  # a host array straight to a kernel: the simulator copies
    assert seen["to_device"] == 2 and seen["to_host"] == 2
    assert seen["numba.cuda.to_device"] == 1
    assert seen["simulator copy in"] == 3 and seen["simulator copy_to_host"] == 3
    assert transfer_counts()["to_device"] >= 2


def test_the_table_moves_no_array_by_itself():
    """Only accel/device.py and the kernel tests' paths of accel/cuda/_common.py (numba device arrays, host arrays on a
    GPU) may copy: the table and the kernels' launch functions call no copy primitive (read from their syntax trees:
    calls named below, and `.get()` with no argument, CuPy's copy to the host)."""
    import ast

    copies = {"to_device", "copy_to_host", "copy_to_device", "device_array", "asnumpy", "to_host"}
    allowed = {"_common.py": {"device", "zeros", "arange", "alloc", "host"}}
    for path in [ROOT / "accel" / "cupy_backend.py", *sorted((ROOT / "accel" / "cuda").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            for node in ast.walk(func):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                copy = name in copies or (name == "get" and not node.args and not node.keywords)
                if copy and func.name not in allowed.get(path.name, ()):
                    pytest.fail(f"{path.name}:{node.lineno} in {func.name}: a copy ({name})")


# ---- grouped expert GEMMs ------------------------------------------------------------------------------------------
@needs_sim
@pytest.mark.parametrize("E", [1, 3, 9])
def test_grouped_experts_are_a_fixed_number_of_products(E, monkeypatch):
    """experts_forward / experts_backward make the same number of array-module products whatever the number of
    experts (batched over [E, C, ·], no loop over experts), and equal the reference's per-expert loop, experts with
    no tokens included."""
    rng = np.random.default_rng(E)
    N, K, d, I = 7, min(2, E), 6, 5
    experts = np.stack([rng.permutation(max(1, E - 1))[:K] for _ in range(N)])  # the last expert gets no token
    plan = REFERENCE.dispatch(experts, E)
    x = rng.standard_normal((N, d))[plan.token]
    w1, w3, w2 = rng.standard_normal((E, I, d)), rng.standard_normal((E, I, d)), rng.standard_normal((E, d, I))
    calls = []
    real = np.matmul
    monkeypatch.setattr(np, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    y, ctx = SIM.experts_forward(x, plan.offsets, w1, w3, w2)
    forward_calls = len(calls)
    dy = rng.standard_normal(y.shape)
    grads = SIM.experts_backward(ctx, dy, w1, w3, w2)
    monkeypatch.setattr(np, "matmul", real)
    assert (forward_calls, len(calls)) == (3, 9)  # 3 forward; 6 backward: dh, dW2, dW1, dW3, dx (2)
    y_r, ctx_r = REFERENCE.experts_forward(x, plan.offsets, w1, w3, w2)
    np.testing.assert_allclose(y, y_r, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, REFERENCE.experts_backward(ctx_r, dy, w1, w3, w2)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not np.any(grads[1][E - 1]) or E == 1


@needs_sim
def test_embedding_backward_is_the_reference_to_the_bit():
    """The segment-sum kernel adds each id's rows in token order, as np.add.at and the reference do."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 12, (3, 9))
    for dtype in (np.float32, np.float64):
        table = rng.standard_normal((13, 5)).astype(dtype)
        _, ctx = REFERENCE.embedding_forward(tokens, table, 3.0)
        dx = rng.standard_normal((3, 9, 5)).astype(dtype)
        got = SIM.embedding_backward(ctx, dx)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, REFERENCE.embedding_backward(ctx, dx))


@needs_sim
def test_the_bf16_table_runs_the_optimizer_in_bf16():
    """CupyOps(ns_dtype="bfloat16"): the optimizer's Newton–Schulz (called with the momentum's own dtype) computes in
    bf16 and hands back that dtype; an explicit other dtype keeps the reference's rule."""
    ops = cupy_backend.CupyOps(np, simulated=True, ns_dtype="bfloat16")
    G = np.random.default_rng(0).standard_normal((6, 10))
    for dtype in (np.float32, np.float64):
        X = ops.newton_schulz(G.astype(dtype), steps=5, coefficients="dion", dtype=dtype)
        assert X.dtype == dtype
        assert not np.any(X.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF))
    exact = ops.newton_schulz(G, dtype=np.float32)
    np.testing.assert_array_equal(exact, REFERENCE.newton_schulz(G, dtype=np.float32))


@needs_sim
def test_newton_schulz_is_the_references_to_the_bit():
    """In float32/float64 (and the reference's dtype rule for others) the table's Newton–Schulz runs the reference's
    operations in its order on G's module: on NumPy the same bits."""
    rng = np.random.default_rng(0)
    for shape in [(5, 9), (9, 5), (3, 7, 4), (1, 1)]:
        for dtype in (np.float32, np.float64, np.float16):
            G = rng.standard_normal(shape).astype(dtype)
            for coefficients in ("dion", "keller"):
                got = SIM.newton_schulz(G, steps=5, coefficients=coefficients)
                want = REFERENCE.newton_schulz(G, steps=5, coefficients=coefficients)
                assert got.dtype == want.dtype and got.flags.c_contiguous
                np.testing.assert_array_equal(got, want)


# ---- the parallel seams --------------------------------------------------------------------------------------------
@needs_sim
@pytest.mark.parametrize("layout", ["dp_shard=2,ep=2", "cp=2"])
def test_virtual_ranks_with_the_simulated_table_equal_the_reference(layout):
    """distributed.parallel_ops.ParallelOps wraps the table like any other: one training step on two virtual ranks
    (FSDP with expert parallel; context parallel) equals the single-process reference step (float64)."""
    from trinity.distributed.layout import Layout
    from trinity.distributed.mesh import Mesh
    from trinity.distributed.parallel_ops import parallelize
    from trinity.distributed.sharded_optim import gather_optimizer_state
    from trinity.simulate.virtual.virtual_comm import VirtualCluster

    config = _config().replace(intra_document_mask=False)
    params0 = random_params(config, 1)
    lay = Layout.parse(layout)
    tokens, labels, _ = _batch(config, S=2, T=12 if lay.cp > 1 else 8, seed=1)  # a cp chunk holds the window
    want = {k: v.copy() for k, v in params0.items()}
    _step(config, REFERENCE, want, GlobalBatch(tokens, labels), 2 // lay.dp)

    def rank(comm):
        mesh = Mesh(comm, lay)
        ops, p, o = parallelize(SIM, mesh, config, params0, init_optimizer_state(config, params0))
        b = init_balancing_state(config, params0)
        g = compute_gradients(config, p, GlobalBatch(tokens, labels), ops=ops, mesh=mesh, check=False)
        apply_update(config, p, o, b, g, 1e-2, 1e-2, ops=ops, mesh=mesh)
        gather_optimizer_state(config, p, o)
        return p.full()

    for got in VirtualCluster(lay.world_size).run(rank):
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-9, atol=1e-12, err_msg=f"{layout}: {k}")
