"""Expert load balancing by the selection-only expert bias (SPEC §6.1, §6.2, §6.4; decisions §14 #7, #8).

Per optimizer step, n_i is the number of (token, slot) assignments routed to expert i by the biased selection,
summed over every micro-batch (and, distributed, every data-parallel rank), and n̄ = (1/E) Σ_i n_i. The bias is
updated once per step, before the parameter update. Three methods:

  "sign"  (Nano, Mini; Loss-Free Balancing):  Δb = γ·sign(n̄ − n), centred;  b ← b + Δb
  "smebu" (Large):  v = (n̄ − n)/n̄,  Δb = λ·tanh(κ v), centred,  m ← βm + (1−β)Δb,  b ← b + m
  "none"

Centring Δb (torchtitan) rather than b keeps b zero-mean when it starts at zero (SPEC §6.1).

Dtypes (docs/decisions.md #18): the bias is float32 whatever the model's dtype, and so is the SMEBU momentum. Each
update is computed in float64 and rounded once to the stored dtype; `sign_update` and `smebu_update` keep the dtypes
of the arrays they are given, `init_balancing_state` and `balance_step` store float32. The arrays stay in the bias's
array namespace (counts given as a list or a NumPy array are moved there).
"""

from __future__ import annotations

import math

from ..model.config import Config
from ..model.params import EXPERT_BIAS_DTYPE, is_expert_bias
from ..operators.array_module import array_namespace

__all__ = ["sign_update", "smebu_update", "max_violation", "init_balancing_state", "balance_step",
           "momentum_key"]


def sign_update(bias, counts, gamma=1e-3):
    """Δb_i = γ·sign(n̄ − n_i), then Δb ← Δb − mean(Δb); returns b + Δb (SPEC §6.1), computed in float64 and
    rounded to `bias`'s dtype. No tokens: no change."""
    xp = array_namespace(bias)
    counts = _float64(xp, counts)
    if float(xp.sum(counts)) == 0:
        return xp.asarray(bias, copy=True)
    delta = gamma * xp.sign(xp.mean(counts) - counts)
    delta -= xp.mean(delta)
    return xp.astype(bias + delta, bias.dtype)


def _float64(xp, counts):
    """The counts n as float64 in namespace xp."""
    return xp.astype(xp.asarray(counts), xp.float64)


def smebu_update(bias, momentum, counts, lam=5e-4, beta=0.5, kappa=2.0):
    """One SMEBU step for one layer (SPEC §6.2, Trinity eqs. 23-28). Returns (new_bias, new_momentum):

        v_i = (n̄ − n_i) / n̄          normalised violation (independent of batch size)
        Δb_i = λ·tanh(κ v_i)          soft-clamped sign
        Δb ← Δb − mean(Δb)            centred
        m ← β m + (1 − β) Δb          momentum
        b ← b + m
    computed in float64; m is rounded to `momentum`'s dtype first and b ← b + m uses that stored m, so the bias moves
    by exactly the momentum that is kept (then rounded to `bias`'s dtype). A step with no tokens (n̄ = 0) leaves both
    unchanged.
    """
    xp = array_namespace(bias)
    counts = _float64(xp, counts)
    mean = float(xp.mean(counts))
    momentum = xp.asarray(momentum)
    if mean == 0:
        return xp.asarray(bias, copy=True), xp.asarray(momentum, copy=True)
    delta = lam * xp.tanh(kappa * (mean - counts) / mean)
    delta -= xp.mean(delta)
    new_momentum = xp.astype(beta * xp.astype(momentum, xp.float64) + (1.0 - beta) * delta, momentum.dtype)
    return xp.astype(xp.astype(bias, xp.float64) + new_momentum, bias.dtype), new_momentum


def max_violation(counts) -> float:
    """MaxVio = (max_i n_i − n̄) / n̄ (SPEC §6.4); 0 when there are no tokens."""
    counts = _float64(array_namespace(counts), counts)
    xp = array_namespace(counts)
    mean = float(xp.mean(counts))
    return 0.0 if mean == 0 else (float(xp.max(counts)) - mean) / mean


def momentum_key(bias_key: str) -> str:
    return "smebu.momentum/" + bias_key


def init_balancing_state(config: Config, params: dict) -> dict:
    """SMEBU momentum per MoE layer, zero and float32 like the bias (SPEC §6.2: m = b = 0 at the start); empty for
    "sign" and "none"."""
    if config.load_balancing != "smebu":
        return {}
    return {momentum_key(k): _bias_dtype_zeros(v) for k, v in params.items() if is_expert_bias(k)}


def _bias_dtype(xp):
    """EXPERT_BIAS_DTYPE (float32) in namespace xp."""
    return getattr(xp, EXPERT_BIAS_DTYPE.name)


def _bias_dtype_zeros(bias):
    xp = array_namespace(bias)
    return xp.zeros(bias.shape, dtype=_bias_dtype(xp))


def balance_step(config: Config, params: dict, state: dict, counts: dict) -> dict:
    """Update every layer's expert_bias in `params` (and the SMEBU momentum in `state`) in place from this step's
    counts {layer: n [E]}. Returns per-layer metrics {layer: {"max_vio", "bias_step_rms"}}. An updated bias is
    stored in float32 (a bias given in the model's dtype becomes float32 at its first update)."""
    metrics = {}
    for layer, n in counts.items():
        key = f"model.layers.{layer}.mlp.expert_bias"
        old = params[key]
        xp = array_namespace(old)
        old32 = xp.astype(old, _bias_dtype(xp), copy=False)
        if config.load_balancing == "smebu":
            new, state[momentum_key(key)] = smebu_update(old32, state[momentum_key(key)], n, config.smebu_lambda,
                                                         config.smebu_beta, config.smebu_kappa)
        elif config.load_balancing == "sign":
            new = sign_update(old32, n, config.sign_update_rate)
        else:
            new = old
        step = xp.astype(new - old, xp.float64)
        metrics[layer] = {"max_vio": max_violation(n), "bias_step_rms": math.sqrt(float(xp.mean(step * step)))}
        params[key] = new
    return metrics
