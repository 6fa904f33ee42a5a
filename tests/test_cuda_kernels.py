"""Every Numba-CUDA kernel of trinity.accel.cuda, forward and backward, against the NumPy reference operator.

Without a CUDA device the kernels run under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): `select_simulator()`
turns it on before numba.cuda is first imported in this process, and leaves a real GPU alone, so the same tests run
on the device there. The variable concerns numba.cuda only: the numba CPU backend tests in the same run do not see
it. The simulator runs each GPU thread as a Python thread, so shapes are small and examples few.

Tolerances: float64 kernels agree with the float64 reference to ~1e-10 relative; float32 kernels with the float64
reference evaluated on the same (float32) inputs to ~1e-5 of the output's scale. The router and its selection are
compared with the reference in the kernel's own dtype (top-k must pick the same experts, ties included).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

if importlib.util.find_spec("numba_cuda") is None:
    pytest.skip("numba-cuda is not installed (it is in the test extra: pip install -e '.[test]')",
                allow_module_level=True)

from trinity.accel.cuda import select_simulator  # noqa: E402

SIMULATED = select_simulator()  # before anything imports numba.cuda

try:
    _cuda = importlib.import_module("numba.cuda")
except ImportError as e:  # e.g. the CUDA Python bindings numba-cuda needs
    pytest.skip(f"numba.cuda cannot be imported: {e}", allow_module_level=True)
if not SIMULATED and not _cuda.is_available():
    pytest.skip("NUMBA_ENABLE_CUDASIM=0 was set and no CUDA device is usable", allow_module_level=True)

from trinity.accel.cuda import attention as cu_attention  # noqa: E402
from trinity.accel.cuda import elementwise as cu_elementwise  # noqa: E402
from trinity.accel.cuda import losses as cu_losses  # noqa: E402
from trinity.accel.cuda import norms as cu_norms  # noqa: E402
from trinity.accel.cuda import rope as cu_rope  # noqa: E402
from trinity.accel.cuda import router as cu_router  # noqa: E402
from trinity.accel.cuda._common import THREADS, cuda, host, launch  # noqa: E402
from trinity.reference.operators import attention as ref_attention  # noqa: E402
from trinity.reference.operators import losses as ref_losses  # noqa: E402
from trinity.reference.operators import mlp as ref_mlp  # noqa: E402
from trinity.reference.operators import moe as ref_moe  # noqa: E402
from trinity.reference.operators import norms as ref_norms  # noqa: E402
from trinity.reference.operators import rope as ref_rope  # noqa: E402
from trinity.reference.operators import router as ref_router  # noqa: E402

DTYPES = [np.float64, np.float32]
RTOL = {np.float64: 1e-10, np.float32: 1e-5}
seeds = st.integers(0, 2**32 - 1)


def assert_close(got, want, dtype):
    """|got − want| ≤ rtol·|want| + rtol·scale, scale the largest finite |want| (at least 1); ±inf must match."""
    got, want = host(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    finite = np.abs(want[np.isfinite(want)])
    tol = RTOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, finite.max(initial=0.0)))


def wide(*arrays):
    """The float64 copies the reference runs on (exactly the values the kernel got)."""
    return [np.asarray(a, dtype=np.float64) for a in arrays]


# ---- RMSNorm, RoPE, SwiGLU, output gate -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=5)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), d=st.integers(1, THREADS + 9), seed=seeds)
def test_rmsnorm(dtype, lead, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, d)).astype(dtype)
    gain = rng.uniform(0.5, 1.5, d).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y, ctx = cu_norms.rmsnorm_forward(x, gain, 1e-6)
    xr, gr, dyr = wide(x, gain, dy)
    y_ref, ctx_ref = ref_norms.rmsnorm_forward(xr, gr, 1e-6)
    assert_close(y, y_ref, dtype)
    dx, dgain = cu_norms.rmsnorm_backward(ctx, dy)
    dx_ref, dgain_ref = ref_norms.rmsnorm_backward(ctx_ref, dyr)
    assert_close(dx, dx_ref, dtype)
    assert_close(dgain, dgain_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=4)
@given(B=st.integers(1, 2), T=st.integers(1, 6), heads=st.integers(1, 3), half=st.integers(1, 5),
       theta=st.sampled_from([100.0, 10000.0]), seed=seeds)
def test_rope(dtype, B, T, heads, half, theta, seed):
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, 4 * T, T)  # explicit (a context-parallel chunk's) positions
    cos, sin = ref_rope.rope_tables(positions, 2 * half, theta, dtype)
    x, dy = (rng.normal(size=(B, T, heads, 2 * half)).astype(dtype) for _ in range(2))
    y, ctx = cu_rope.rope_forward(x, cos, sin)
    y_ref, ctx_ref = ref_rope.rope_forward(*wide(x, cos, sin))
    assert_close(y, y_ref, dtype)
    assert_close(cu_rope.rope_backward(ctx, dy), ref_rope.rope_backward(ctx_ref, *wide(dy)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["swiglu", "output_gate"])
@settings(max_examples=4)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), spread=st.sampled_from([1.0, 40.0]), seed=seeds)
def test_sigmoid_products(dtype, op, shape, spread, seed):
    """SwiGLU h = silu(a) ⊙ c and the gate Õ = O ⊙ σ(G), with |inputs| up to ~100 (the stable sigmoid)."""
    rng = np.random.default_rng(seed)
    a, c, dy = (rng.normal(0, spread, shape).astype(dtype) for _ in range(3))
    if op == "swiglu":
        fwd, bwd = cu_elementwise.swiglu_forward, cu_elementwise.swiglu_backward
        fwd_ref, bwd_ref = ref_mlp.swiglu_forward, ref_mlp.swiglu_backward
    else:
        fwd, bwd = cu_elementwise.output_gate_forward, cu_elementwise.output_gate_backward
        fwd_ref, bwd_ref = ref_attention.output_gate_forward, ref_attention.output_gate_backward
    y, ctx = fwd(a, c)
    ar, cr, dyr = wide(a, c, dy)
    y_ref, ctx_ref = fwd_ref(ar, cr)
    assert_close(y, y_ref, dtype)
    for got, want in zip(bwd(ctx, dy), bwd_ref(ctx_ref, dyr)):
        assert_close(got, want, dtype)


# ---- router and dispatch ----------------------------------------------------------------------------------------
@st.composite
def router_cases(draw):
    E = draw(st.integers(1, 10))
    return dict(N=draw(st.integers(1, 12)), E=E, K=draw(st.integers(1, E)), ties=draw(st.booleans()),
                route_scale=draw(st.floats(0.25, 3.0)), with_dscores=draw(st.booleans()), seed=draw(seeds))


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=10)
@given(case=router_cases())
def test_router(dtype, case):
    """Scores, biased top-k (ties: lowest index first), weights, and dz of the backward, against the reference
    router run on the same logits (x = z, W_r = I, so z = x W_rᵀ exactly and the reference's dx is dz)."""
    N, E, K = case["N"], case["E"], case["K"]
    rng = np.random.default_rng(case["seed"])
    if case["ties"]:  # few distinct logits and no bias: selection decided by index
        z, bias = rng.integers(-1, 2, (N, E)).astype(dtype), np.zeros(E, np.float32)
    else:
        z, bias = rng.normal(0, 2, (N, E)).astype(dtype), rng.normal(0, 0.1, E).astype(np.float32)
    rho = case["route_scale"]
    weights, experts, ctx = cu_router.router_forward(z, bias, K, rho)
    w_ref, e_ref, ctx_ref = ref_router.router_forward(z, np.eye(E, dtype=dtype), bias, K, rho)
    np.testing.assert_array_equal(host(experts), e_ref)
    assert_close(weights, w_ref, dtype)
    assert_close(ctx.scores, ctx_ref.scores, dtype)
    assert_close(ctx.total, ctx_ref.total, dtype)
    dweights = rng.normal(size=(N, K)).astype(dtype)
    dscores = rng.normal(size=(N, E)).astype(dtype) if case["with_dscores"] else None
    dz_ref, _ = ref_router.router_backward(ctx_ref, dweights, dscores)
    assert_close(cu_router.router_backward(ctx, dweights, dscores), dz_ref, dtype)


@settings(max_examples=10)
@given(N=st.integers(1, 40), E=st.integers(1, 9), data=st.data())
def test_dispatch(N, E, data):
    """The dispatch plan is the reference's exactly (stable order within an expert), across several chunks."""
    K = data.draw(st.integers(1, min(E, 4)))
    seed = data.draw(seeds)
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int64)
    plan, plan_ref = cu_router.dispatch(experts, E), ref_moe.dispatch(experts, E)
    for name in plan_ref._fields:
        np.testing.assert_array_equal(host(getattr(plan, name)), getattr(plan_ref, name), err_msg=name)


# ---- cross-entropy + z-loss ---------------------------------------------------------------------------------------
@st.composite
def ce_cases(draw):
    return dict(B=draw(st.integers(1, 2)), T=draw(st.integers(1, 6)), V=draw(st.integers(1, 2 * THREADS + 5)),
                shift=draw(st.booleans()), z=draw(st.sampled_from([0.0, 1e-3, 0.5])),
                denom=draw(st.one_of(st.none(), st.integers(1, 20))), scale=draw(st.sampled_from([1.0, 0.25])),
                ignore=draw(st.floats(0.0, 0.6)), seed=draw(seeds))


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=5)
@given(case=ce_cases())
def test_cross_entropy(dtype, case):
    B, T, V = case["B"], case["T"], case["V"]
    rng = np.random.default_rng(case["seed"])
    logits = rng.normal(0, 3, (B, T, V)).astype(dtype)
    labels = rng.integers(0, V, (B, T))
    labels[rng.random((B, T)) < case["ignore"]] = ref_losses.IGNORE_INDEX
    kw = dict(shift=case["shift"], denom=case["denom"])
    ce, zl, ctx = cu_losses.cross_entropy_forward(logits, labels, case["z"], **kw)
    ce_ref, zl_ref, ctx_ref = ref_losses.cross_entropy_forward(*wide(logits), labels, case["z"], **kw)
    assert_close(np.array([ce, zl]), np.array([ce_ref, zl_ref]), dtype)
    assert_close(ctx.lse, ctx_ref.lse, dtype)
    np.testing.assert_array_equal(host(ctx.valid), ctx_ref.valid)
    assert ctx.denom == ctx_ref.denom
    assert_close(cu_losses.cross_entropy_backward(ctx, case["scale"]),
                 ref_losses.cross_entropy_backward(ctx_ref, case["scale"]), dtype)


def test_cross_entropy_rejects_bad_labels():
    logits = np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="token ids"):
        cu_losses.cross_entropy_forward(logits, np.array([[0, 4, 1]]))
    with pytest.raises(ValueError, match="integer array"):
        cu_losses.cross_entropy_forward(logits, np.zeros((1, 3)))


# ---- flash attention ------------------------------------------------------------------------------------------
@st.composite
def attention_cases(draw):
    """Self-attention (positions 0…T−1, packed documents) or explicit positions (sorted keys, queries in any order,
    one possibly before every key), GQA r = 1…3, windows shorter and longer than T, more than one block of
    ROWS queries and keys."""
    Tq = draw(st.integers(1, cu_attention.ROWS + 4))
    explicit = draw(st.booleans())
    return dict(B=draw(st.integers(1, 2)), hkv=draw(st.integers(1, 2)), r=draw(st.integers(1, 3)),
                dh=draw(st.sampled_from([2, 4, 8])), Tq=Tq,
                Tk=draw(st.integers(1, cu_attention.ROWS + 4)) if explicit else Tq, explicit=explicit,
                window=draw(st.one_of(st.none(), st.integers(1, Tq + 2))), docs=draw(st.booleans()),
                seed=draw(seeds))


def attention_inputs(case, dtype):
    B, Tq, Tk, hkv, dh = case["B"], case["Tq"], case["Tk"], case["hkv"], case["dh"]
    rng = np.random.default_rng(case["seed"])
    q = rng.normal(size=(B, Tq, hkv * case["r"], dh)).astype(dtype)
    k, v = (rng.normal(size=(B, Tk, hkv, dh)).astype(dtype) for _ in range(2))
    kw = dict(window=case["window"])
    if case["explicit"]:
        kw["k_pos"] = k_pos = np.sort(rng.choice(2 * Tk + 4, Tk, replace=False))
        # queries at key positions in any order (a context-parallel chunk), and one before every key when there are
        # others: the reference needs each query block to span at least one key
        kw["q_pos"] = q_pos = rng.choice(k_pos, Tq)
        if Tq > 1 and k_pos[0] > 0:
            q_pos[0] = k_pos[0] - 1  # in the first query block, which has others
        if case["docs"]:
            kw["doc_ids"] = (rng.integers(0, 3, (B, Tq)), rng.integers(0, 3, (B, Tk)))
    elif case["docs"]:
        kw["doc_ids"] = np.sort(rng.integers(0, 3, (B, Tq)), axis=1)
    do = rng.normal(size=q.shape).astype(dtype)
    return q, k, v, do, kw


FULL_CASE = dict(B=2, hkv=2, r=3, dh=8, Tq=cu_attention.ROWS + 4, Tk=cu_attention.ROWS + 3, explicit=True,
                 window=5, docs=True, seed=7)  # every mask at once, two blocks of queries and of keys


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=10)
@given(case=attention_cases())
@example(case=FULL_CASE)
@example(case=dict(FULL_CASE, explicit=False, Tk=FULL_CASE["Tq"], window=None))
def test_attention(dtype, case):
    """O and lse of the forward, dQ, dK, dV of the backward (lse = −∞ and O = 0 for a query with no key)."""
    q, k, v, do, kw = attention_inputs(case, dtype)
    o, ctx = cu_attention.attention_forward(q, k, v, **kw)
    o_ref, ctx_ref = ref_attention.attention_forward(*wide(q, k, v), **kw)
    assert_close(o, o_ref, dtype)
    assert_close(ctx[4], ctx_ref[4], dtype)
    grads, grads_ref = cu_attention.attention_backward(ctx, do), ref_attention.attention_backward(ctx_ref, *wide(do))
    for got, want in zip(grads, grads_ref):
        assert_close(got, want, dtype)


def test_attention_rejects_large_heads():
    q = np.zeros((1, 1, 1, cu_attention.MAX_HEAD_DIM + 2))
    with pytest.raises(ValueError, match="MAX_HEAD_DIM"):
        cu_attention.attention_forward(q, q, q)


# ---- the simulator's shared memory ----------------------------------------------------------------------------------
@pytest.mark.skipif(not SIMULATED, reason="a property of Numba's CUDA simulator")
def test_simulated_shared_arrays_are_one_per_block_under_any_interleaving(monkeypatch):
    """Every thread of a block gets the same array from one cuda.shared.array line, and two lines give two arrays,
    even when the simulator's threads switch between the lookup and the creation (numba-cuda 0.30 does that lookup
    unlocked; _common serialises it). The kernel stages tid and 2·tid in two shared arrays and every thread reads its
    neighbours' entries: a thread with an array of its own reads garbage, and aliased arrays read 2·tid twice."""
    import time

    from numba.cuda.simulator import kernelapi

    class SlowLookups(dict):  # a thread switch inside every lookup: the interleaving CI met by chance
        def get(self, key, default=None):
            found = dict.get(self, key, default)
            time.sleep(1e-3)
            return found

    unpatched_init = kernelapi.FakeCUDAShared.__init__

    def init(self, dynshared_size):
        unpatched_init(self, dynshared_size)
        self._allocations = SlowLookups()

    monkeypatch.setattr(kernelapi.FakeCUDAShared, "__init__", init)

    @cuda.jit
    def neighbours(out):
        a = cuda.shared.array(8, np.float64)
        b = cuda.shared.array(8, np.float64)
        tid = cuda.threadIdx.x
        a[tid] = tid
        b[tid] = 2 * tid
        cuda.syncthreads()
        n = cuda.blockDim.x
        out[cuda.blockIdx.x, tid, 0] = a[(tid + 1) % n]
        out[cuda.blockIdx.x, tid, 1] = b[(tid + n - 1) % n]

    out = np.full((2, 8, 2), np.nan)
    launch(neighbours, 2, 8, out)
    tid = np.arange(8)
    np.testing.assert_array_equal(out[..., 0], np.broadcast_to((tid + 1) % 8, (2, 8)))
    np.testing.assert_array_equal(out[..., 1], np.broadcast_to(2 * ((tid + 7) % 8), (2, 8)))


@pytest.mark.skipif(not SIMULATED, reason="a property of Numba's CUDA simulator")
def test_a_kernel_built_while_another_thread_runs_one_gets_the_real_cuda_module():
    """Virtual ranks are threads: one may build a kernel (a per_dtype factory's first call) while another runs a
    kernel of the same module, during which the simulator has swapped the module's `cuda` for its fake one (which has
    no `jit`). _common.per_dtype builds under the launch lock, so the build waits for the launch."""
    import threading
    import time

    from trinity.accel.cuda._common import per_dtype

    started = threading.Event()

    @cuda.jit
    def slow(out):
        started.set()
        time.sleep(0.2)  # the module's `cuda` is the fake one for this long
        out[0] = 1.0

    @per_dtype
    def build(ft):
        @cuda.jit
        def kernel(out):
            out[cuda.grid(1)] = 2.0
        return kernel

    out, errors = np.zeros(1), []

    def run_slow():
        try:
            launch(slow, 1, 1, out)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=run_slow)
    t.start()
    assert started.wait(10)
    kernel = build(np.float64)  # built while `slow` runs: must not see the fake module
    t.join()
    assert not errors and out[0] == 1.0
    got = np.zeros(4)
    launch(kernel, 1, 4, got)
    np.testing.assert_array_equal(got, 2.0)
