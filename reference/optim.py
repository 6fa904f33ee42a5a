"""Muon (Dion flavour) for hidden matrices and AdamW for everything else (SPEC §9; §14 #2, #3, #4, #5).

Parameter groups (SPEC §9.1, §9.2 torchtitan-Dion grouping, §14 #4):
    muon   every ≥2-D hidden matrix: attention q/k/v/o/gate_proj, dense MLP, shared experts, each routed-expert
           tensor [E, out, in] (orthogonalised per expert, never flattened: §9.1, §14 #5), and the router gate
           unless `config.router_optimizer == "adamw"` (§14 #4: an assumption, not a published fact)
           (`config.matrix_optimizer == "adamw"` moves every matrix to AdamW: the all-AdamW baseline that
           Muon is compared against, and the like-for-like setting of benchmarks/train_step.py)
    adamw  `model.embed_tokens.weight`, `lm_head.weight` and every 1-D parameter (the RMSNorm gains)
    none   `model.layers.{l}.mlp.expert_bias`: moved by load balancing (SPEC §6), never by a gradient

Muon step for a matrix X with gradient G, momentum M, base lr η, weight decay λ (SPEC §9.2, §14 #2):
    M ← μM + G                                (no dampening)
    U = μM + G  if nesterov  else  U = M      (Dion default: nesterov False)
    O = NS(U)                                 (Newton–Schulz "zeropower", per 2-D matrix)
    X ← X·(1 − ηλ)                            (decay with the *unadjusted* lr)
    X ← X − η·s·O,   s = √max(1, fan_out/fan_in)  (Trinity eq.41; "dion": √(fan_out/fan_in))

AdamW step (Dion's scalar AdamW, SPEC §9.2), with t = step + 1:
    m ← β₁m + (1 − β₁)g        (= lerp(m, g, 1 − β₁))
    v ← β₂v + (1 − β₂)g²
    X ← X·(1 − ηλ) − η·m̂/(√v̂ + ε),   m̂ = m/(1 − β₁ᵗ),  v̂ = v/(1 − β₂ᵗ)

Deliberate differences from Dion: Dion casts U to bf16 before Newton–Schulz; NumPy has no bf16, so NS runs in the
input's float dtype (float32 for float32 params, float64 for float64). Trinity's √max(1, ·) replaces Dion's
√(fan_out/fan_in) by default. The optimizer state is a flat dict of arrays so a checkpoint stores it as-is.
"""

from __future__ import annotations

import math

import numpy as np

from .config import Config
from .params import is_norm_gain

__all__ = ["NS_COEFFICIENTS", "newton_schulz", "param_group", "weight_decay_for", "muon_lr_scale",
           "init_optimizer_state", "clip_grad_norm", "optimizer_step", "adamw_update", "sum_of_squares", "scaled",
           "MUON_MOMENTUM", "ADAMW_M", "ADAMW_V"]

# Newton–Schulz (a, b, c) per iteration (SPEC §9.2 Dion; §9.3 Keller Jordan).
NS_COEFFICIENTS: dict[str, list[tuple[float, float, float]]] = {
    "dion": [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)],
    "keller": [(3.4445, -4.7750, 2.0315)] * 5,
}

# Prefixes of the flat optimizer-state keys: "<prefix>/<param key>".
MUON_MOMENTUM, ADAMW_M, ADAMW_V = "muon.momentum/", "adamw.m/", "adamw.v/"

_ADAMW_MATRICES = ("model.embed_tokens.weight", "lm_head.weight")


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
    shares (see newton_schulz). tall: rows > cols, so the iteration runs on Gᵀ."""
    G = np.asarray(G)
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {G.shape}")
    if dtype is None:
        dtype = G.dtype if G.dtype in (np.float32, np.float64) else np.float32
    return G, np.dtype(dtype), G.shape[-2] > G.shape[-1]


def newton_schulz(G, steps: int = 5, coefficients="dion", eps: float = 1e-8, dtype=None) -> np.ndarray:
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
    float64. The result has the compute dtype.
    """
    G, dtype, tall = ns_input(G, dtype)
    X = G.astype(dtype, copy=False)
    if tall:
        X = np.swapaxes(X, -1, -2)
    norm = np.sqrt(np.sum(np.square(X, dtype=np.float64), axis=(-2, -1), keepdims=True))
    X = X / (norm + eps).astype(dtype)
    for a, b, c in _coefficient_schedule(coefficients, steps):
        A = X @ np.swapaxes(X, -1, -2)
        B = dtype.type(b) * A + dtype.type(c) * (A @ A)
        X = dtype.type(a) * X + B @ X
    if tall:
        X = np.swapaxes(X, -1, -2)
    return np.ascontiguousarray(X)


# ---- grouping and hyper-parameters ------------------------------------------------------------------------------
def param_group(config: Config, key: str, shape=None) -> str:
    """"muon", "adamw" or "none" for a parameter key (SPEC §9.1, §9.2 grouping, §14 #4).

    expert_bias → "none"; embedding, head, norm gains (and any 1-D parameter when `shape` is given) → "adamw";
    the router gate → `config.router_optimizer`; every other matrix → "muon"; with
    `config.matrix_optimizer == "adamw"` everything but expert_bias → "adamw".
    """
    if key.endswith("expert_bias"):
        return "none"
    if (config.matrix_optimizer == "adamw" or key in _ADAMW_MATRICES or is_norm_gain(key)
            or (shape is not None and len(shape) < 2)):
        return "adamw"
    if key.endswith("router.gate.weight"):
        return config.router_optimizer
    return "muon"


def weight_decay_for(config: Config, key: str) -> float:
    """λ of a parameter: `norm_weight_decay` (default 0; the report removed WD from norms, SPEC §9.1, §14 #3) for
    norm gains, `weight_decay` (default 0.1) for matrices, embedding and head; 0 for expert_bias (not optimised)."""
    if key.endswith("expert_bias"):
        return 0.0
    return float(config.norm_weight_decay if is_norm_gain(key) else config.weight_decay)


def muon_lr_scale(config: Config, shape) -> float:
    """s in X ← X − η·s·O, with (fan_out, fan_in) = the last two dims (rows, cols) of the stored weight.

    "trinity" (default, SPEC §9.1 eq.41, §14 #2): s = √max(1, fan_out/fan_in)
    "dion"    (Dion "spectral_norm", SPEC §9.2):   s = √(fan_out/fan_in)
    e.g. a Nano expert w2 [1024, 256] → 2; Mini q_proj [4096, 2048] → √2; w1 [I_m, d] with I_m < d → 1 (trinity).
    """
    fan_out, fan_in = shape[-2], shape[-1]
    ratio = fan_out / fan_in
    if config.muon_lr_adjust == "trinity":
        return math.sqrt(max(1.0, ratio))
    if config.muon_lr_adjust == "dion":
        return math.sqrt(ratio)
    raise ValueError(f"unknown muon_lr_adjust {config.muon_lr_adjust!r}")


# ---- state ------------------------------------------------------------------------------------------------------
def init_optimizer_state(config: Config, params: dict) -> dict[str, np.ndarray]:
    """A flat dict of zero arrays: "step" (int64 scalar, the number of steps taken), "muon.momentum/<key>" for Muon
    parameters, "adamw.m/<key>" and "adamw.v/<key>" for AdamW parameters, each shaped and typed like its parameter.
    Nothing for expert_bias."""
    state: dict[str, np.ndarray] = {"step": np.zeros((), dtype=np.int64)}
    for key, p in params.items():
        group = param_group(config, key, p.shape)
        if group == "muon":
            state[MUON_MOMENTUM + key] = np.zeros_like(p)
        elif group == "adamw":
            state[ADAMW_M + key] = np.zeros_like(p)
            state[ADAMW_V + key] = np.zeros_like(p)
    return state


# ---- gradient clipping ------------------------------------------------------------------------------------------
def sum_of_squares(x) -> float:
    """Σ x² over every element, accumulated in float64 (the norm kernel of clipping)."""
    x64 = np.asarray(x, dtype=np.float64)
    return float(np.vdot(x64, x64))


def scaled(x, scale: float):
    """A new array x·scale, the product formed in float64 and rounded once to x's dtype (clipping's rescale)."""
    x = np.asarray(x)
    return (x.astype(np.float64) * scale).astype(x.dtype)


def clip_grad_norm(grads: dict, max_norm: float, kernels=None):
    """Global-norm clipping (SPEC §14 #3, default 1.0): n = √(Σ_k ‖g_k‖²) over every gradient except expert_bias,
    computed in float64; if max_norm > 0 and n > max_norm, every such g_k is scaled by max_norm/n, so the clipped
    norm is min(n, max_norm). max_norm = 0 disables clipping (n is still returned).

    Returns (new dict of new arrays in the input dtypes, n). Inputs are not modified. Unlike torch's
    clip_grad_norm_ there is no +1e-6 in the denominator. A non-finite n propagates into the gradients (the trainer
    decides what to do with a non-finite norm). `kernels` (an op table from trinity.accel.get_backend) supplies
    `sum_of_squares` and `scaled`; by default this module's.
    """
    k = kernels or _reference_table()
    total = 0.0
    for key, g in grads.items():
        if not key.endswith("expert_bias"):
            total += k.sum_of_squares(g)
    norm = math.sqrt(total)
    scale = max_norm / norm if (max_norm > 0 and norm > max_norm) else 1.0
    out = {}
    for key, g in grads.items():
        g = np.asarray(g)
        if scale == 1.0 or key.endswith("expert_bias"):
            out[key] = g.copy()
        else:
            out[key] = k.scaled(g, scale)
    return out, norm


# ---- the step ---------------------------------------------------------------------------------------------------
def _muon_update(config: Config, X, G, M, lr: float, wd: float, kernels) -> float:
    """One Muon step on X in place (SPEC §9.2, §14 #2, #5); returns ‖η·s·O‖_F for logging."""
    mu = config.muon_momentum
    G = np.asarray(G).astype(M.dtype, copy=False)
    M *= mu                                       # M ← μM + G
    M += G
    U = mu * M + G if config.muon_nesterov else M
    O = kernels.newton_schulz(U, steps=config.muon_ns_steps, coefficients=config.muon_ns_coefficients,
                              eps=config.muon_eps, dtype=M.dtype)  # per matrix of a [..., out, in] batch
    step = lr * muon_lr_scale(config, X.shape)
    X *= 1.0 - lr * wd                            # decay with the unadjusted lr
    X -= step * O
    return step * float(np.linalg.norm(O.astype(np.float64)))


def adamw_update(X, G, m, v, *, lr: float, wd: float, beta1: float, beta2: float, eps: float, step: int) -> float:
    """One AdamW step on X, m, v in place (Dion's scalar AdamW, SPEC §9.2); step = t, 1-based; returns the norm of
    the lr-scaled update η·m̂/(√v̂ + ε) (before weight decay), accumulated in float64. Arithmetic in m's dtype with
    the scalars rounded to it (NumPy's rules for Python floats), in the order of the lines below; a backend's kernel
    that keeps this order and these roundings gives the same bits."""
    G = np.asarray(G).astype(m.dtype, copy=False)
    m *= beta1                                    # m ← lerp(m, g, 1 − β₁)
    m += (1.0 - beta1) * G
    v *= beta2                                    # v ← β₂v + (1 − β₂)g²
    v += (1.0 - beta2) * np.square(G)
    denom = np.sqrt(v) / math.sqrt(1.0 - beta2 ** step) + eps   # √v̂ + ε
    delta = (lr / (1.0 - beta1 ** step)) * (m / denom)          # η·m̂/(√v̂ + ε)
    X *= 1.0 - lr * wd
    X -= delta
    return float(np.linalg.norm(delta.astype(np.float64)))


def optimizer_step(config: Config, params: dict, grads: dict, state: dict, muon_lr: float, adamw_lr: float,
                   kernels=None) -> dict:
    """One optimizer step: updates `params` and `state` in place (arrays reused, dtypes kept).

    Muon parameters use `muon_lr`, AdamW parameters `adamw_lr` (the scheduled learning rates, SPEC §9.1); the
    per-parameter weight decay is `weight_decay_for`. expert_bias is skipped (its gradient, if any, is ignored).
    Clip the gradients beforehand with `clip_grad_norm`. `kernels` (an op table from trinity.accel.get_backend,
    e.g. get_backend("numba")) supplies `newton_schulz` and `adamw_update` with this module's signatures; by default
    this module's own. state["step"] counts steps: AdamW's bias correction uses
    t = step + 1, and step is incremented once.

    Returns logging info: step (the t just taken), muon_lr, adamw_lr, muon_tensors/adamw_tensors (how many
    parameters each group updated) and muon_update_norm/adamw_update_norm (global L2 norm of the lr-scaled update
    before weight decay).
    """
    k = kernels or _reference_table()
    if not hasattr(k, "adamw_update"):
        raise TypeError("kernels must be an op table with newton_schulz and adamw_update (trinity.accel.get_backend), "
                        f"got {type(k).__name__}")
    t = int(state["step"]) + 1
    norms = {"muon": 0.0, "adamw": 0.0}
    counts = {"muon": 0, "adamw": 0}
    for key, X in params.items():
        group = param_group(config, key, X.shape)
        if group == "none":
            continue
        if key not in grads:
            raise KeyError(f"no gradient for parameter {key!r}")
        G = grads[key]
        if np.shape(G) != X.shape:
            raise ValueError(f"gradient of {key!r} has shape {np.shape(G)}, parameter has {X.shape}")
        wd = weight_decay_for(config, key)
        try:
            if group == "muon":
                u = _muon_update(config, X, G, state[MUON_MOMENTUM + key], muon_lr, wd, k)
            else:
                u = k.adamw_update(X, G, state[ADAMW_M + key], state[ADAMW_V + key], lr=adamw_lr, wd=wd,
                                   beta1=config.adamw_beta1, beta2=config.adamw_beta2, eps=config.adamw_eps, step=t)
        except KeyError as e:
            raise KeyError(f"optimizer state has no {e.args[0]!r}; build it with init_optimizer_state") from None
        norms[group] += u * u
        counts[group] += 1
    if isinstance(state["step"], np.ndarray) and state["step"].ndim == 0:
        state["step"][...] = t
    else:
        state["step"] = np.array(t, dtype=np.int64)
    return {"step": t, "muon_lr": float(muon_lr), "adamw_lr": float(adamw_lr),
            "muon_tensors": counts["muon"], "adamw_tensors": counts["adamw"],
            "muon_update_norm": math.sqrt(norms["muon"]), "adamw_update_norm": math.sqrt(norms["adamw"])}


def _reference_table():
    """The op table optimizer_step and clip_grad_norm use when none is given: the reference's (ops.REFERENCE,
    which holds this module's kernels; imported here because ops.py imports this module)."""
    from .ops import REFERENCE
    return REFERENCE
