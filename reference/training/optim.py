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
from typing import Callable

import numpy as np

from ..model.config import Config
from ..model.ops import REFERENCE
from ..model.params import is_norm_gain
from ..operators.array_module import array_namespace
from ..operators.optimizer_kernels import sum_of_squares

__all__ = ["param_group", "weight_decay_for", "muon_lr_scale", "init_optimizer_state", "grad_norm", "clip_grad_norm",
           "optimizer_step", "MUON_MOMENTUM", "ADAMW_M", "ADAMW_V"]

# Prefixes of the flat optimizer-state keys: "<prefix>/<param key>".
MUON_MOMENTUM, ADAMW_M, ADAMW_V = "muon.momentum/", "adamw.m/", "adamw.v/"

_ADAMW_MATRICES = ("model.embed_tokens.weight", "lm_head.weight")


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
    parameters, "adamw.m/<key>" and "adamw.v/<key>" for AdamW parameters, each shaped and typed like its parameter
    and in its array namespace (the step counter is a NumPy scalar: host state). Nothing for expert_bias."""
    state: dict[str, np.ndarray] = {"step": np.zeros((), dtype=np.int64)}
    for key, p in params.items():
        group = param_group(config, key, p.shape)
        zeros = array_namespace(p).zeros_like
        if group == "muon":
            state[MUON_MOMENTUM + key] = zeros(p)
        elif group == "adamw":
            state[ADAMW_M + key] = zeros(p)
            state[ADAMW_V + key] = zeros(p)
    return state


# ---- gradient clipping ------------------------------------------------------------------------------------------
def grad_norm(grads: dict, kernels=None, reduce: Callable | None = None) -> float:
    """n = √(Σ_k ‖g_k‖²) over every gradient except expert_bias, the sum in float64 (SPEC §14 #3). `reduce`, when
    given, sums the local Σ over the ranks holding the other parts of the gradients (training/step.py)."""
    k = kernels or REFERENCE
    total = 0.0
    for key, g in grads.items():
        if not key.endswith("expert_bias"):
            total += k.sum_of_squares(g)
    if reduce is not None:
        total = float(reduce(total))
    return math.sqrt(total)


def clip_grad_norm(grads: dict, max_norm: float, kernels=None, norm: float | None = None):
    """Global-norm clipping (SPEC §14 #3, default 1.0): n = grad_norm(grads) (or `norm`, computed by the caller over
    every rank); if max_norm > 0 and n > max_norm, every gradient but expert_bias's is scaled by max_norm/n, so the
    clipped norm is min(n, max_norm). max_norm = 0 disables clipping (n is still returned).

    Returns (new dict of new arrays in the input dtypes, n). Inputs are not modified. Unlike torch's
    clip_grad_norm_ there is no +1e-6 in the denominator. A non-finite n propagates into the gradients (the trainer
    decides what to do with a non-finite norm). `kernels` (an op table from trinity.accel.get_backend) supplies
    `sum_of_squares` and `scaled`; by default the reference's (operators/optimizer_kernels.py).
    """
    k = kernels or REFERENCE
    norm = grad_norm(grads, k) if norm is None else norm
    scale = max_norm / norm if (max_norm > 0 and norm > max_norm) else 1.0
    out = {}
    for key, g in grads.items():
        xp = array_namespace(g)
        g = xp.asarray(g)
        if scale == 1.0 or key.endswith("expert_bias"):
            out[key] = xp.asarray(g, copy=True)
        else:
            out[key] = k.scaled(g, scale)
    return out, norm


# ---- the step ---------------------------------------------------------------------------------------------------
def muon_update(config: Config, X, G, M, lr: float, segments, orthogonalise) -> float:
    """One Muon step on X in place (SPEC §9.2, §14 #2, #5), for a whole matrix and for a rank's flat shard alike;
    returns Σ ‖η·s·O‖²_F over the matrices `orthogonalise` reports (for logging):

        M ← μM + G ;  U = M  (or μM + G, nesterov)          elementwise
        O = NS(U)                                            `orthogonalise(U)` → (O, [(matrix shape, ‖O‖²)]):
                                                             Newton–Schulz of each whole matrix (sharded_optim.py
                                                             runs it on each matrix's owner)
        X ← X(1 − ηλ) − η·s·O                                per segment (key, its λ and s)

    `segments`: [(slice of X, key, the key's shape)]: one (everything) for a whole parameter, one per key a shard
    holds part of."""
    mu = config.muon_momentum
    xp = array_namespace(M)
    G = xp.astype(xp.asarray(G), M.dtype, copy=False)
    M *= mu                                       # M ← μM + G
    M += G
    U = mu * M + G if config.muon_nesterov else M
    O, owned = orthogonalise(U)
    for where, key, shape in segments:
        X[where] *= 1.0 - lr * weight_decay_for(config, key)   # decay with the unadjusted lr
        X[where] -= (lr * muon_lr_scale(config, shape)) * O[where]
    return sum((lr * muon_lr_scale(config, shape)) ** 2 * o_sq for shape, o_sq in owned)


def newton_schulz_whole(config: Config, kernels):
    """`orthogonalise` for a whole parameter: the kernel's Newton–Schulz of every matrix of a [..., out, in] batch,
    and ‖O‖²_F (in float64) under the parameter's shape."""
    def orthogonalise(U):
        O = kernels.newton_schulz(U, steps=config.muon_ns_steps, coefficients=config.muon_ns_coefficients,
                                  eps=config.muon_eps, dtype=U.dtype)
        return O, [(tuple(U.shape), sum_of_squares(O))]
    return orthogonalise


def optimizer_kernels(kernels):
    """The op table whose newton_schulz and adamw_update the optimizer runs, whole or sharded: `kernels`, by
    default the reference's; an object without them is a TypeError (never a silent fallback)."""
    k = kernels or REFERENCE
    if not hasattr(k, "adamw_update") or not hasattr(k, "newton_schulz"):
        raise TypeError("kernels must be an op table with newton_schulz and adamw_update (trinity.accel.get_backend), "
                        f"got {type(k).__name__}")
    return k


def optimizer_step(config: Config, params: dict, grads: dict, state: dict, muon_lr: float, adamw_lr: float,
                   kernels=None, observe: Callable | None = None) -> dict:
    """One optimizer step: updates `params` and `state` in place (arrays reused, dtypes kept).

    Muon parameters use `muon_lr`, AdamW parameters `adamw_lr` (the scheduled learning rates, SPEC §9.1); the
    per-parameter weight decay is `weight_decay_for`. expert_bias is skipped (its gradient, if any, is ignored).
    Clip the gradients beforehand with `clip_grad_norm`. `kernels` (an op table from trinity.accel.get_backend,
    e.g. get_backend("numba")) supplies `newton_schulz` and `adamw_update` with the signatures of
    operators/optimizer_kernels.py; by default those. state["step"] counts steps: AdamW's bias correction uses
    t = step + 1, and step is incremented once.

    observe(key, group, X, G, lr, state entries of X), when given, is called before each parameter's update and may
    return a callable that is called after it (the step inspector records each update so).

    Returns logging info: step (the t just taken), muon_lr, adamw_lr, muon_tensors/adamw_tensors (how many
    parameters each group updated) and muon_update_norm/adamw_update_norm (global L2 norm of the lr-scaled update
    before weight decay).
    """
    k = optimizer_kernels(kernels)
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
        if tuple(G.shape) != tuple(X.shape):
            raise ValueError(f"gradient of {key!r} has shape {tuple(G.shape)}, parameter has {X.shape}")
        wd = weight_decay_for(config, key)
        lr = muon_lr if group == "muon" else adamw_lr
        after = None if observe is None else observe(key, group, X, G, lr, {
            k: v for k, v in state.items() if k.endswith("/" + key) and k.split("/", 1)[1] == key})
        try:
            if group == "muon":
                u = math.sqrt(muon_update(config, X, G, state[MUON_MOMENTUM + key], muon_lr,
                                          [(Ellipsis, key, tuple(X.shape))], newton_schulz_whole(config, k)))
            else:
                u = k.adamw_update(X, G, state[ADAMW_M + key], state[ADAMW_V + key], lr=adamw_lr, wd=wd,
                                   beta1=config.adamw_beta1, beta2=config.adamw_beta2, eps=config.adamw_eps, step=t)
        except KeyError as e:
            raise KeyError(f"optimizer state has no {e.args[0]!r}; build it with init_optimizer_state") from None
        if after is not None:
            after()
        norms[group] += u * u
        counts[group] += 1
    if isinstance(state["step"], np.ndarray) and state["step"].ndim == 0:
        state["step"][...] = t
    else:
        state["step"] = np.array(t, dtype=np.int64)
    return {"step": t, "muon_lr": float(muon_lr), "adamw_lr": float(adamw_lr),
            "muon_tensors": counts["muon"], "adamw_tensors": counts["adamw"],
            "muon_update_norm": math.sqrt(norms["muon"]), "adamw_update_norm": math.sqrt(norms["adamw"])}
