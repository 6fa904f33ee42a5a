"""The conformance suite's tolerances, in one place.

A backend and the reference compute the same floating-point expression in different orders (blocked or tiled
sums, fused passes, float64 accumulators, their own exp). Both are accurate to a few ulps per elementary operation,
so they may differ by the accumulated rounding of each output's reductions. With unit roundoff u = eps/2 of the
dtype, a computed sum of n terms t_i satisfies |ŝ − s| ≤ γ(n)·Σ|t_i| with γ(n) ≈ λ√n·u when rounding errors are
independent and zero-mean (the probabilistic bound of Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019: it holds
with probability ≥ 1 − 2exp(−λ²(1−u)²/2); λ = 5 makes a failure a ~1e-5 event per element). So each check is

    max |backend − reference| ≤ rtol(dtype, n) · scale,    rtol = C · eps(dtype) · √n,    C = 8

  n      the length of the reduction behind each output element, stated at the check (d_in for a linear map,
         d_h + keys for attention, …; 1 for an elementwise map);
  scale  the size of what is summed: max over the output of Σ|t_i|, i.e. the same operator applied to the absolute
         values of its inputs where the operator is bilinear or monotone in them (linear maps, experts, combine),
         the explicit term sizes where it is not (normalisation and router backwards, attention), or
         |output| × the condition number of an elementwise map (exp(x) turns an absolute error δ in x into a
         relative error δ: cross-entropy's softmax). Measuring against max |output| instead would fail wherever
         random-sign terms cancel (e.g. RMSNorm's dx for width 1 is exactly 0 in exact arithmetic).
  C = 8  = 2 (two implementations, each within λ√n·u = 2.5√n·eps)
         × 1.6 (a handful of elementwise roundings per element around each reduction: exp, σ, scaling)
         × 2.5 (margin: the λ bound is per element, the check takes the maximum over up to ~10⁶ elements).

For the whole training step, rounding differences travel through every layer and the gradient of one parameter is
a sum over tokens whose terms we cannot see from outside; how much of its own size is cancellation varies from key
to key (a gain's gradient Σ_t dy_t ⊙ x̂_t may be 10³× smaller than its terms), and a drawn model can be
ill-conditioned (a head_dim-2 QK norm of a vector whose rms is near √ε multiplies perturbations by 1/rms ≈ 300).
Each output's rounding scale is therefore measured on the draw itself, from several samples:

    natural(key) = max( |g_ref,float32 − g_ref,float64|,                the reference's own float32 rounding,
                        |g_ref,float64(p ⊙ (1 + eps32·r_k)) − g_ref,float64(p)|,  k < PERTURBED_RUNS: the model
                        under relative float32-ulp perturbations of its parameters, r_k ~ N(0, 1) )
    tol(key, dtype) = MODEL_C · natural(key) · eps(dtype)/eps(float32) + rtol(dtype, n) · G

The perturbed runs measure how strongly the draw amplifies ulp-sized differences: a single float32 sample can be
lucky exactly where the model is most sensitive (one draw had the reference's float32 error 100× below the
backend's, and below what ulp-level changes of its parameters produce). First-order rounding errors scale with
eps, so natural × eps(dtype)/eps(float32) is the same key's rounding scale in the checked dtype. The second term
is a floor: differences of relative size rtol(dtype, n), n = model_reduction_length, enter the upstream gradient
of every layer, and measured against G = the largest gradient entry of the whole model (activations are O(1) on
the drawn parameters; at least the balance coefficient, see the test) they bound what any key can carry however
much its own sum cancels; it covers keys whose exact gradient is 0 (a router with K = E, a key projection under a
window of 1), where `natural` is pure noise. MODEL_C = 8 = 2 (the backend and the reference each carry about
`natural`) × 4 (margin: three samples' maximum still estimates the tail of the rounding from below). Measured over
1000 drawn steps (both dtypes) the largest gradient difference was 0.25 × its tolerance. (With `natural` from the
float32 run alone, one CI draw exceeded MODEL_C = 16 by 2.3×: float32 embedding gradient 0.0168 vs 0.00743, an
ill-conditioned QK norm; the perturbed runs are what fixed that, not a larger constant.)

Newton–Schulz (alone and inside the Muon update): σ ↦ aσ + bσ³ + cσ⁵ multiplies a perturbation along a small
singular value by a, so a rounding difference made at iteration i grows by ∏_{j>i} a_j; the checks use n = the
products' lengths and scale = max |output| × ∏_j |a_j| (≈ 493 for Dion's five iterations).

Newton–Schulz in bfloat16 (the cupy table's bf16 mode: every array between operations a bf16 value, products with
bf16 factors accumulated in float32): rounding a factor to bf16 moves each product term by up to 2u (u = eps/2, eps
of bf16 = 2⁻⁷), whatever the product's length n, so a product is within (2u + rtol(float32, n)) of its terms' sum
Σ|a||b| (bf16_product_tol). For the whole iteration the roundings of the last step dominate: the iteration pulls the
singular values of a well-conditioned input into its band, where earlier errors contract, while the last step's
roundings stay; its terms are (|a| + |b| + |c|)·max|X| (the coefficients cancel: 4.08 − 6.89 + 2.93 for Dion's first
step), so ns_bf16_tol = C·eps(bf16)·(|a|+|b|+|c|)_last·max|X| + rtol(float32, n)·∏|a_j|·max|X| (the float32
accumulation, amplified as in float32). Measured over 1500 draws (shapes ≤ 48, 1-6 steps, condition number ≤ 10)
the error was at most 1.64 of eps(bf16)·(|a|+|b|+|c|)_last·max|X|, i.e. 0.2 of the tolerance. An ill-conditioned input
is another matter: bf16 cannot resolve singular directions below eps(bf16) of the largest, and ∏a_j amplifies them,
so the check draws condition numbers ≤ 10 (as tests/test_optim.py's band measurement does).

The bf16 step (reference/model/precision.py: float32 master weights, every operator's inputs and outputs rounded to
bf16, float32 accumulation) is compared with the reference's bf16 step. Rounding to bf16 is not smooth at the scale of
a float32 difference: where the two tables' float32 results straddle a bf16 rounding boundary they round one bf16
ulp apart, and that difference travels like any other rounding of the step. So the bf16 step's own rounding is the
scale: natural_bf16(key) = max over the reference's bf16 step on the parameters and on PERTURBED_RUNS relative
float32-ulp perturbations of them, of its distance to the float64 step; bf16_step_tol = MODEL_C · natural_bf16 +
rtol(float32, n) · G (the products and sums accumulate in float32). The reference's bf16 step itself is checked
against float64 at the first-order scale of bf16 (tests/test_precision.py): its loss within MODEL_C · natural32 ·
eps(bf16)/eps(float32) of the float64 loss.

Top-k routing is not continuous: where the K-th and (K+1)-th biased scores are closer than the backends' score
difference can be, the two may choose different experts and then legitimately disagree. Draws whose smallest
top-k gap is below topk_gap(dtype, n) are rejected (assume) — and for every other draw the choices must be equal.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["C", "MODEL_C", "PERTURBED_RUNS", "BF16", "eps", "rtol", "model_tol", "model_reduction_length", "topk_gap",
           "bf16_product_tol", "ns_bf16_tol", "bf16_step_tol", "check_close", "Recorder"]

C = 8.0
MODEL_C = 8.0
PERTURBED_RUNS = 2


BF16 = "bfloat16"  # NumPy has no bfloat16 dtype: the name stands for it here


def _is_bf16(dtype) -> bool:
    return isinstance(dtype, str) and dtype == BF16


def eps(dtype) -> float:
    """Machine epsilon of dtype; "bfloat16" (8 significand bits): 2⁻⁷."""
    if _is_bf16(dtype):
        return 2.0 ** -7
    return float(np.finfo(np.dtype(dtype)).eps)


def rtol(dtype, n) -> float:
    """C · eps(dtype) · √n for a reduction of length n (n ≥ 1)."""
    return C * eps(dtype) * math.sqrt(max(1, n))


def model_reduction_length(config, T: int) -> int:
    """Σ of the reduction lengths along one forward-and-backward path through the model: per layer the norm width
    (×4 sandwich norms), the projections (d in, h_q·d_h out), attention (d_h + T keys), the FFN (the widest of the
    dense, shared and K routed widths, and E for the router), then the head (d) and the vocabulary (V)."""
    c = config
    ffn = max(c.intermediate_size, c.moe_intermediate_size * max(1, c.num_experts_per_tok),
              c.moe_intermediate_size * max(1, c.num_shared_experts))
    per_layer = 4 * c.hidden_size + c.hidden_size + c.num_attention_heads * c.head_dim + c.head_dim + T + ffn \
        + c.num_experts
    return c.num_hidden_layers * per_layer + c.hidden_size + c.vocab_size


def model_tol(dtype, natural32: float, n: int, scale: float) -> float:
    """MODEL_C · natural32 · eps(dtype)/eps(float32) + rtol(dtype, n) · scale (module docstring)."""
    return MODEL_C * natural32 * eps(dtype) / eps(np.float32) + rtol(dtype, n) * scale


def bf16_step_tol(natural_bf16: float, n: int, scale: float) -> float:
    """MODEL_C · natural_bf16 + rtol(float32, n) · scale: a bf16 step against the reference's bf16 step (module
    docstring)."""
    return MODEL_C * natural_bf16 + rtol(np.float32, n) * scale


def bf16_product_tol(n: int, terms: float) -> float:
    """A product with factors rounded to bf16 and float32 accumulation, against the exact product: (2u + u² +
    rtol(float32, n))·terms, u = eps(bf16)/2, terms = max of Σ|a||b| (module docstring)."""
    u = eps(BF16) / 2
    return (2 * u + u * u + rtol(np.float32, n)) * terms


def ns_bf16_tol(schedule, n: int, amax: float) -> float:
    """Newton–Schulz in bf16 against float64 for a well-conditioned input: C·eps(bf16)·(|a|+|b|+|c|) of the last
    step's (a, b, c) · amax, plus rtol(float32, n)·∏|a_j|·amax (module docstring); schedule: the (a, b, c) of every
    step, amax: max |X| of the reference output."""
    a, b, c = schedule[-1]
    cond = float(np.prod([abs(t[0]) for t in schedule]))
    return (C * eps(BF16) * (abs(a) + abs(b) + abs(c)) + rtol(np.float32, n) * cond) * amax


def topk_gap(dtype, config, T: int) -> float:
    """Smallest top-k gap (in biased-score units) at which both backends must pick the same experts. The router
    input b carries the rounding of every layer before it, relative size ≲ rtol(dtype, model_reduction_length);
    σ' ≤ 1/4 and |z| = O(few), so scores differ by less than that; 100× margin (a flip is a test failure, not a
    tolerance question)."""
    return 100.0 * rtol(dtype, model_reduction_length(config, T))


def check_close(actual, expected, dtype, n, scale=None, what="", recorder=None, tol=None):
    """assert max |actual − expected| ≤ rtol(dtype, n) · scale (module docstring); scale defaults to
    max |expected| (right where no cancellation is possible) and is never below the smallest normal number.
    An explicit `tol` (e.g. model_tol) replaces rtol(dtype, n) · scale. Records (error, tolerance) under `what`
    when a recorder is given."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    scale = max(float(scale), float(np.finfo(np.float32 if _is_bf16(dtype) else np.dtype(dtype)).tiny))
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    tol = rtol(dtype, n) * scale if tol is None else float(tol)
    if recorder is not None:
        recorder.note(what, dtype, err, tol)
    assert np.all(np.isfinite(actual) == np.isfinite(expected)), f"{what}: non-finite values differ"
    assert err <= tol, f"{what}: max |backend − reference| = {err:.3g} > tol {tol:.3g} (n={n}, scale={scale:.3g})"
    return err, tol


class Recorder:
    """Collects the worst (error, tolerance) per (backend, check, dtype) of one test into its report's
    user_properties, which conftest.py summarises (they survive the trip from xdist workers)."""

    def __init__(self, request, backend_name: str):
        self._props = request.node.user_properties
        self._backend = backend_name
        self._data: dict = {}
        self._props.append(("conformance", self._data))

    def note(self, what, dtype, err, tol):
        key = (self._backend, what, BF16 if _is_bf16(dtype) else np.dtype(dtype).name)
        old = self._data.get(key)
        if old is None or (err / tol if tol else 0) > (old[0] / old[1] if old[1] else 0):
            self._data[key] = (err, tol)
