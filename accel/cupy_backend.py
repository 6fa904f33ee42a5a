"""The "cupy" op table: the reference's operators on the inputs' array module, with the Numba-CUDA kernels of
trinity.accel.cuda where they exist (docs/gpu.md).

    load()         the table on a machine with CuPy and a CUDA device (get_backend("cupy")); BackendUnavailable
                   otherwise
    simulated()    the same table with NumPy as its array module and the kernels under Numba's CUDA simulator: the
                   backend's code path on any CPU (tests, CI). Needs numba-cuda; BackendUnavailable without it, or
                   when numba.cuda was already imported for a real GPU in this process.

Like NumbaOps, CupyOps subclasses the reference table and replaces leaf operators only; model code is never
duplicated. What each operator runs:
    kernels (accel/cuda)        rmsnorm, rope, attention (flash, no T×T matrix), swiglu, output gate, router
                                (scores/top-k/weights and dz; the products z = x W_rᵀ, dx = dz W_r, dW_r = dzᵀ x
                                in the array module), dispatch (counting sort), cross-entropy + z-loss (vocabulary
                                in chunks), embedding backward (deterministic segment sum)
    grouped GEMMs (here)        experts_forward / experts_backward: every expert's rows padded to the largest count
                                C into [E, C, d] and one batched product per weight (no loop over experts)
    the reference, on xp        linear (cuBLAS under CuPy), embedding forward (a gather), rope tables, combine,
                                combine backward, scatter_to_tokens, balance loss, AdamW, clipping's sum of squares
                                and rescale
    Newton–Schulz (here)        the reference's iteration on G's module in its float dtype (NumPy: the same bits);
                                in bf16 with newton_schulz(..., dtype="bfloat16"), or by default for
                                CupyOps(xp, ns_dtype="bfloat16"): bf16 factors in every product, float32
                                accumulation (bf16 emulated by rounding float32, see round_bf16)
The seams are SingleProcessSeams' (inherited); distributed.parallel_ops.ParallelOps wraps this table like any other.

Buffers are arrays of the table's module, allocated by the table or the kernels' launch functions and passed to the
kernels as zero-copy views; nothing in a step moves between host and device (accel/device.py is the one place
arrays cross, at a step's boundary).
"""

from __future__ import annotations

import numpy as np

from trinity.reference.model.ops import ReferenceOps
from trinity.reference.operators.bf16 import BF16, newton_schulz_bf16, newton_schulz_rounded, round_bf16

from .device import DeviceTable

__all__ = ["CupyOps", "load", "simulated", "round_bf16", "newton_schulz_bf16", "KERNEL_OPS", "TABLE_OPS"]

# The leaf operators the kernels replace, by kernel module; and those this module computes itself (products in the
# array module around kernels, the grouped GEMMs, Newton–Schulz).
KERNEL_OPS = {
    "norms": ["rmsnorm_forward", "rmsnorm_backward"],
    "rope": ["rope_forward", "rope_backward"],
    "attention": ["attention_forward", "attention_backward"],
    "elementwise": ["swiglu_forward", "swiglu_backward", "output_gate_forward", "output_gate_backward"],
    "router": ["dispatch"],
    "losses": ["cross_entropy_forward", "cross_entropy_backward"],
    "embedding": ["embedding_backward"],
}
TABLE_OPS = ["router_forward", "router_backward", "experts_forward", "experts_backward", "newton_schulz"]



def _module(x):
    """cupy for a CuPy array, numpy otherwise."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


# ---- grouped expert GEMMs ------------------------------------------------------------------------------------------
def _padding(xp, offsets, M: int, E: int):
    """(C, pos): C = the largest expert's row count (one scalar read), pos [M] = where each grouped row sits in the
    padded [E·C] layout: row j of expert e (offsets_e ≤ j < offsets_{e+1}) at e·C + j − offsets_e."""
    counts = offsets[1:] - offsets[:-1]
    C = int(counts.max()) if M else 0
    rows = xp.arange(M, dtype=offsets.dtype)
    expert = xp.searchsorted(offsets, rows, side="right") - 1  # empty experts' equal offsets are skipped
    return C, expert * C + rows - offsets[expert]


def _scatter_rows(xp, rows, pos, E: int, C: int):
    """rows [M, k] placed at pos of a zeroed [E·C, k], as [E, C, k] (padded rows stay 0)."""
    out = xp.zeros((E * C, rows.shape[-1]), dtype=rows.dtype)
    out[pos] = rows
    return out.reshape(E, C, rows.shape[-1])


def _t(xp, w):
    return xp.swapaxes(w, -1, -2)


def experts_forward(x_grouped, offsets, w1, w3, w2):
    """FFN_e(x) = W2_e (silu(W1_e x) ⊙ W3_e x) on each expert's block of rows (SPEC §4.9), as reference
    experts_forward, as grouped GEMMs: the rows padded per expert to the largest count C, then one batched product
    per weight ([E, C, d] × [E, d, I]) and the SwiGLU kernel; padded rows are zero and stay out of every result.
    ctx = (padded x, pos, a, c, h) in the padded layout."""
    from .cuda import elementwise

    xp = _module(x_grouped)
    M, d = x_grouped.shape
    E = w1.shape[0]
    C, pos = _padding(xp, offsets, M, E)
    xpad = _scatter_rows(xp, x_grouped, pos, E, C)
    a = xp.matmul(xpad, _t(xp, w1))
    c = xp.matmul(xpad, _t(xp, w3))
    h, _ = elementwise.swiglu_forward(a, c)
    ypad = xp.matmul(h, _t(xp, w2))
    y = xp.take(ypad.reshape(E * C, d), pos, axis=0)
    return y, (xpad, pos, a, c, h)


def experts_backward(ctx, dy_grouped, w1, w3, w2):
    """dh = dy W2_e, dW2_e = dyᵀ h, (da, dc) = SwiGLU backward, dW1_e = daᵀ x, dW3_e = dcᵀ x, dx = da W1_e + dc W3_e
    (SPEC §5), as reference experts_backward, each a batched product over [E, C, ·]; experts with no rows get zero
    gradients. Returns (dx_grouped, dW1, dW3, dW2)."""
    from .cuda import elementwise

    xpad, pos, a, c, h = ctx
    xp = _module(xpad)
    E, C, d = xpad.shape
    dypad = _scatter_rows(xp, dy_grouped, pos, E, C)
    dh = xp.matmul(dypad, w2)
    dw2 = xp.matmul(_t(xp, dypad), h)
    da, dc = elementwise.swiglu_backward((a, c), dh)
    dw1 = xp.matmul(_t(xp, da), xpad)
    dw3 = xp.matmul(_t(xp, dc), xpad)
    dxpad = xp.matmul(da, w1) + xp.matmul(dc, w3)
    dx = xp.take(dxpad.reshape(E * C, d), pos, axis=0)
    return dx, dw1, dw3, dw2


# ---- router: products in the array module, the rest in the kernels -----------------------------------------------
def router_forward(x, w_router, expert_bias, top_k, route_scale):
    """z = x W_rᵀ (a product of the array module), then the router kernel: s = σ(z), 𝒦 = TopK_K(s + b),
    g = ρ s_𝒦 / Σ_𝒦 s (SPEC §4.8). Returns (weights, experts, RouterCtx) as reference router_forward."""
    from .cuda import router

    return router.router_forward(x @ w_router.T, expert_bias, top_k, route_scale, x=x, w_router=w_router)


def router_backward(ctx, dweights, dscores=None):
    """dz from the kernel (SPEC §5 "Router"), then dx = dz W_r and dW_r = dzᵀ x. Returns (dx, dW_r)."""
    from .cuda import router

    dz = router.router_backward(ctx, dweights, dscores)
    return dz @ ctx.w_router, dz.T @ ctx.x


def _attention_forward(q, k, v, window=None, doc_ids=None, q_pos=None, k_pos=None, block_budget=None):
    """The flash-attention kernel (accel/cuda/attention.py); block_budget (the reference's memory knob) is moot."""
    from .cuda import attention

    return attention.attention_forward(q, k, v, window=window, doc_ids=doc_ids, q_pos=q_pos, k_pos=k_pos)


def _attention_backward(ctx, do, block_budget=None):
    from .cuda import attention

    return attention.attention_backward(ctx, do)


# ---- the table -----------------------------------------------------------------------------------------------------
class CupyOps(DeviceTable, ReferenceOps):
    """The reference table on `xp` (cupy on a GPU; numpy with the kernels under the CUDA simulator), float32 or
    float64. ns_dtype="bfloat16" makes Newton–Schulz compute in emulated bf16 by default (module docstring). Its
    arrays live on the device: `to_device` / `to_host` are accel/device.py's counted copies (under the simulator
    copies between NumPy arrays, so that the placement runs the same path on a CPU)."""

    name = "cupy"
    ns_bf16 = True  # newton_schulz accepts dtype="bfloat16" (tests/conformance: test_newton_schulz_bf16)

    def __init__(self, xp, *, simulated: bool = False, ns_dtype=None):
        if ns_dtype not in (None, BF16):
            raise ValueError(f"ns_dtype must be None (the reference's rule) or {BF16!r}, got {ns_dtype!r}")
        _bind_kernels()
        self.xp = xp
        self.simulated = simulated
        self.ns_dtype = ns_dtype

    def __repr__(self):
        return f"CupyOps(xp={self.xp.__name__}{', simulated' if self.simulated else ''})"

    def device_count(self) -> int | None:
        """This host's GPUs (None under the simulator)."""
        return None if self.simulated else int(self.xp.cuda.runtime.getDeviceCount())

    def select_device(self, local_rank: int) -> str | None:
        """One GPU per rank: the `local_rank`-th GPU of this host for CuPy and the Numba kernels (both keep the
        choice per thread). BackendUnavailable when the host has fewer GPUs than ranks. Under the simulator there is
        nothing to choose (None). Not yet run on a machine with several GPUs."""
        if self.simulated:
            return None
        from . import BackendUnavailable

        count = self.xp.cuda.runtime.getDeviceCount()
        if local_rank >= count:
            raise BackendUnavailable(f"backend 'cupy': this rank is rank {local_rank} of its host, which has {count} "
                                     f"GPU(s): run at most {count} rank(s) per host (one GPU each)")
        self.xp.cuda.Device(local_rank).use()
        from numba import cuda

        cuda.select_device(local_rank)
        self.device_index = local_rank
        return f"GPU {local_rank} of {count}"

    def newton_schulz(self, G, steps: int = 5, coefficients="dion", eps: float = 1e-8, dtype=None):
        """reference newton_schulz (the same operations on G's module); in emulated bf16 (newton_schulz_bf16) when
        dtype is "bfloat16", or when the table's ns_dtype is and no dtype other than G's own is asked for (the
        optimizer passes G's). The bf16 result is float32 when dtype is "bfloat16" or None, else cast to dtype."""
        named = isinstance(dtype, str) and dtype == BF16
        own = dtype is None or (not isinstance(dtype, str) and np.dtype(dtype) == np.dtype(G.dtype))
        if named or (own and self.ns_dtype == BF16):
            out = newton_schulz_bf16(G, steps, coefficients, eps)
            return out if dtype is None or named else out.astype(dtype)
        if dtype is None:  # the reference's rule: G's dtype when float32 or float64, else float32
            dtype = G.dtype if np.dtype(G.dtype) in (np.dtype(np.float32), np.dtype(np.float64)) else np.float32
        return newton_schulz_rounded(G, steps, coefficients, eps, np.dtype(dtype), rounded=False)


_BOUND = []


def _bind_kernels():
    """Put the kernels' launch functions on the table (once; importing accel/cuda selects the simulator or the GPU,
    so this module does not import it until a table is made)."""
    if _BOUND:
        return
    import importlib

    for module, names in KERNEL_OPS.items():
        kernels = importlib.import_module(f"trinity.accel.cuda.{module}")
        for name in names:
            setattr(CupyOps, name, staticmethod(getattr(kernels, name)))
    CupyOps.attention_forward = staticmethod(_attention_forward)
    CupyOps.attention_backward = staticmethod(_attention_backward)
    for fn in (router_forward, router_backward, experts_forward, experts_backward):
        setattr(CupyOps, fn.__name__, staticmethod(fn))
    _BOUND.append(True)


# ---- loading -------------------------------------------------------------------------------------------------------
def load():
    """The table on a GPU: CuPy and a CUDA device, with numba-cuda for the kernels. BackendUnavailable otherwise."""
    from . import BackendUnavailable

    try:
        import cupy
    except ImportError:
        raise BackendUnavailable("backend 'cupy' needs the cupy package and an NVIDIA GPU "
                                 "(pip install 'trinity-moe[gpu]'); cupy is not installed") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any CUDA runtime failure means no usable GPU
        raise BackendUnavailable(f"backend 'cupy': no usable CUDA device ({type(e).__name__}: {e})") from None
    if count < 1:
        raise BackendUnavailable("backend 'cupy': cupy is installed but no CUDA device is visible")
    if _kernels_mode() is not False:
        raise BackendUnavailable("backend 'cupy': the Numba-CUDA kernels cannot run on the GPU here "
                                 f"({_kernels_problem() or 'numba.cuda runs the simulator in this process'})")
    return CupyOps(cupy)


def simulated(ns_dtype=None) -> CupyOps:
    """The cupy table's code path on the CPU: NumPy as the array module and the kernels under Numba's CUDA
    simulator (NUMBA_ENABLE_CUDASIM; it must be on, or turned on here, before numba.cuda is first imported).
    BackendUnavailable without numba-cuda, or when numba.cuda already runs on a real GPU in this process."""
    from . import BackendUnavailable

    if _kernels_mode() is not True:
        raise BackendUnavailable("the simulated cupy table needs Numba's CUDA simulator: "
                                 f"{_kernels_problem() or 'numba.cuda was imported for a real GPU in this process'}")
    return CupyOps(np, simulated=True, ns_dtype=ns_dtype)


_MODE: dict = {}


def _kernels_mode():
    """True: the kernels run under the simulator; False: on a GPU; None: they cannot be imported (see
    _kernels_problem). Imports numba.cuda through trinity.accel.cuda (select_simulator first)."""
    if "mode" not in _MODE:
        import importlib.util

        if importlib.util.find_spec("numba_cuda") is None:
            _MODE.update(mode=None, problem="numba-cuda is not installed (pip install 'trinity-moe[gpu]' or "
                                            "'trinity-moe[test]')")
        else:
            try:
                from .cuda import _common
                _MODE.update(mode=_common.SIMULATOR, problem=None)
            except (ImportError, RuntimeError) as e:
                _MODE.update(mode=None, problem=f"{type(e).__name__}: {e}")
    return _MODE["mode"]


def _kernels_problem():
    _kernels_mode()
    return _MODE.get("problem")
