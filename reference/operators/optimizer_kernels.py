"""The optimizer's array kernels (SPEC §9.2, §14 #3): Newton–Schulz orthogonalisation (Muon), the AdamW update, and
gradient clipping's sum of squares and rescale. The op table (model/ops.py) carries them, so a backend can replace
them (trinity.accel); training/optim.py composes them into the optimizer step and clipping, and its docstring gives
the update rules.
"""

from __future__ import annotations

import math

from .array_module import array_namespace

__all__ = ["NS_COEFFICIENTS", "newton_schulz", "ns_input", "adamw_update", "sum_of_squares", "scaled"]

# Newton–Schulz (a, b, c) per iteration (SPEC §9.2 Dion; §9.3 Keller Jordan).
NS_COEFFICIENTS: dict[str, list[tuple[float, float, float]]] = {
    "dion": [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)],
    "keller": [(3.4445, -4.7750, 2.0315)] * 5,
}


# ---- Newton–Schulz orthogonalisation -----------------------------------------------------------------------------
def _coefficient_schedule(coefficients, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) used at each of `steps` iterations. A named set ("dion", "keller") or an explicit list of
    triples; with more steps than triples the last triple repeats (Dion defines exactly five)."""
    table = NS_COEFFICIENTS[coefficients] if isinstance(coefficients, str) else [tuple(t) for t in coefficients]
    if steps < 1 or not table:
        raise ValueError(f"need steps >= 1 and at least one coefficient triple, got steps={steps}")
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def ns_input(G, dtype=None):
    """(G as an array, the compute dtype, tall) for Newton–Schulz: the checks and dtype rule every implementation
    shares (see newton_schulz). tall: rows > cols, so the iteration runs on Gᵀ. The dtype is one of G's namespace
    (a NumPy dtype for NumPy arrays)."""
    xp = array_namespace(G)
    G = xp.asarray(G)
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {G.shape}")
    if dtype is None:
        dtype = G.dtype if G.dtype in (xp.float32, xp.float64) else xp.float32
    return G, _dtype_of(xp, dtype), G.shape[-2] > G.shape[-1]


def _dtype_of(xp, dtype):
    """dtype as the namespace's own dtype object: NumPy's np.dtype(...) for NumPy (whatever was given, e.g. the
    type np.float32), the object itself for another namespace."""
    return xp.dtype(dtype) if hasattr(xp, "dtype") else dtype


def newton_schulz(G, steps: int = 5, coefficients="dion", eps: float = 1e-8, dtype=None):
    """Approximate the polar factor U Vᵀ of G = U Σ Vᵀ ("zeropower", SPEC §9.2).

        X = Gᵀ if rows > cols else G                 (so A = X Xᵀ is the smaller Gram matrix)
        X ← X / (‖X‖_F + eps)                        (every singular value now ≤ 1)
        for (a, b, c) in coefficients[:steps]:
            A = X Xᵀ;  X ← aX + (bA + cA²)X          (σ ← aσ + bσ³ + cσ⁵ on each singular value)
        transpose back

    G is one matrix [m, n] or a batch [..., m, n]; each matrix is normalised and iterated independently (routed
    experts are orthogonalised per expert, SPEC §9.1, §14 #5). The singular vectors of G are kept exactly (up to
    rounding); only the singular values move, towards a band around 1 that depends on the coefficients (measured in
    tests/test_optim.py: ≈[0.978, 1.032] for "dion", ≈[0.682, 1.134] for "keller", for inputs whose normalised
    singular values lie in [0.0125, 1], e.g. condition number ≤ 10 and min(m, n) ≤ 64).

    Dion computes in bf16. NumPy has no bf16, so this computes in `dtype` when given, else in G's dtype when it is
    float32 or float64, else float32 — a deliberate difference (SPEC §9.2). The Frobenius norm is accumulated in
    float64. The result has the compute dtype and is row-major (C order) on NumPy. (a, b, c) are Python floats,
    rounded to the compute dtype where they multiply.
    """
    G, dtype, tall = ns_input(G, dtype)
    xp = array_namespace(G)
    X = xp.astype(G, dtype, copy=False)
    if tall:
        X = xp.matrix_transpose(X)
    X64 = xp.astype(X, xp.float64)
    norm = xp.sqrt(xp.sum(X64 * X64, axis=(-2, -1), keepdims=True))
    X = X / xp.astype(norm + eps, dtype)
    for a, b, c in _coefficient_schedule(coefficients, steps):
        A = X @ xp.matrix_transpose(X)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:  # a row-major copy, as a transposed view would not be
        X = xp.reshape(xp.matrix_transpose(X), G.shape, copy=True)
    return X


# ---- AdamW -------------------------------------------------------------------------------------------------------
def adamw_update(X, G, m, v, *, lr: float, wd: float, beta1: float, beta2: float, eps: float, step: int) -> float:
    """One AdamW step on X, m, v in place (Dion's scalar AdamW, SPEC §9.2); step = t, 1-based; returns the norm of
    the lr-scaled update η·m̂/(√v̂ + ε) (before weight decay), accumulated in float64. Arithmetic in m's dtype with
    the scalars rounded to it (NumPy's rules for Python floats), in the order of the lines below; a backend's kernel
    that keeps this order and these roundings gives the same bits."""
    xp = array_namespace(m)
    G = xp.astype(xp.asarray(G), m.dtype, copy=False)
    m *= beta1                                    # m ← lerp(m, g, 1 − β₁)
    m += (1.0 - beta1) * G
    v *= beta2                                    # v ← β₂v + (1 − β₂)g²
    v += (1.0 - beta2) * (G * G)
    denom = xp.sqrt(v) / math.sqrt(1.0 - beta2 ** step) + eps   # √v̂ + ε
    delta = (lr / (1.0 - beta1 ** step)) * (m / denom)          # η·m̂/(√v̂ + ε)
    X *= 1.0 - lr * wd
    X -= delta
    return math.sqrt(sum_of_squares(delta))


# ---- gradient clipping -------------------------------------------------------------------------------------------
def sum_of_squares(x) -> float:
    """Σ x² over every element, accumulated in float64 (the norm kernel of clipping): one dot product x·x of the
    flattened array."""
    xp = array_namespace(x)
    x64 = xp.reshape(xp.astype(xp.asarray(x), xp.float64), (-1,))
    return float(xp.vecdot(x64, x64))


def scaled(x, scale: float):
    """A new array x·scale, the product formed in float64 and rounded once to x's dtype (clipping's rescale)."""
    xp = array_namespace(x)
    x = xp.asarray(x)
    return xp.astype(xp.astype(x, xp.float64) * float(scale), x.dtype)
