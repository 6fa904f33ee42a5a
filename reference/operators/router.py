"""Sigmoid token-choice top-K router with the selection-only expert bias (SPEC §4.8; backward §5 "Router")."""

from typing import NamedTuple

from .activations import sigmoid
from .array_module import array_namespace

__all__ = ["router_forward", "router_backward", "select_top_k", "RouterCtx"]


class RouterCtx(NamedTuple):
    """What router_backward and the routing statistics read; every backend's router returns this type."""
    x: object  # tokens [N, d]
    w_router: object  # W_r [E, d]
    scores: object  # s = σ(z) [N, E]
    experts: object  # 𝒦 [N, K] int64
    total: object  # S = Σ_{𝒦} s [N, 1]
    route_scale: float  # ρ
    logits: object  # z [N, E]


def select_top_k(biased_scores, k):
    """Indices of the K largest entries per row, in descending order, lowest index first on ties (SPEC §14 #14).

    A stable sort of the negated values keeps equal values in index order."""
    xp = array_namespace(biased_scores)
    return xp.argsort(-biased_scores, axis=-1, stable=True)[..., :k]


def router_forward(x, w_router, expert_bias, top_k, route_scale):
    """Route tokens x [N, d] to K of E experts (SPEC §4.8):

        z = W_r x                 router logits [N, E]
        s = σ(z)                  scores
        𝒦 = TopK_K(s + b)          selection uses the bias b (expert_bias) …
        g_k = ρ · s_{e_k} / (Σ_{k'∈𝒦} s_{e_k'} + 1e−20)   … but the weights use the unbiased scores.

    So Σ_k g_k = ρ (route_scale) and b changes which experts are chosen, never the weights of the chosen ones.
    b is float32 in every model dtype (docs/decisions.md #18); s + b is formed in the promoted dtype, as torch does:
    a float64 model upcasts b exactly, a float32 model adds in float32, a float16 model adds in float32 (HF's scores
    are float32 there).
    Returns (weights g [N, K], experts 𝒦 [N, K] int64, ctx); ctx = RouterCtx(x, W_r, s, 𝒦, S = Σ_{𝒦} s, ρ, z) is
    what the backward (through the normalised unbiased scores only) and the load-balancing statistics need.
    """
    xp = array_namespace(x)
    z = x @ w_router.T
    s = sigmoid(z)
    experts = select_top_k(s + expert_bias, top_k)
    chosen = xp.take_along_axis(s, experts, axis=-1)
    total = xp.sum(chosen, axis=-1, keepdims=True)
    weights = chosen / (total + 1e-20) * float(route_scale)  # ρ rounded to s's dtype
    return weights, experts, RouterCtx(x, w_router, s, experts, total, route_scale, z)


def router_backward(ctx, dweights, dscores=None):
    """Gradient through the normalised unbiased scores only (SPEC §5 "Router"); selection and b get none.

    dweights [N, K] is dg. For the chosen experts m, with S = Σ_{k∈𝒦} s_{e_k} and g_k = ρ s_{e_k}/S:
        ds_{e_m} = (ρ/S) · (dg_m − (1/ρ) Σ_k dg_k g_k),   0 for unchosen experts;
    `dscores` [N, E], when given, is an extra gradient on s over all E experts (the balance loss, SPEC §6.3).
    Then dz = ds ⊙ s(1 − s), dW_r = Σ_t dz_t x_tᵀ, dx = dz W_r. Returns (dx, dW_r).
    """
    x, w_router, s, experts, total, route_scale, _ = ctx
    xp = array_namespace(dweights, s)
    rho = float(route_scale)
    weights = xp.take_along_axis(s, experts, axis=-1) / (total + 1e-20) * rho
    ds_chosen = (rho / total) * (dweights - xp.sum(dweights * weights, axis=-1, keepdims=True) / rho)
    ds = xp.zeros_like(s) if dscores is None else xp.astype(dscores, s.dtype, copy=True)
    ds = _add_to_chosen(ds, experts, ds_chosen)
    dz = ds * s * (1.0 - s)
    return dz @ w_router, dz.T @ x


def _add_to_chosen(ds, experts, ds_chosen):
    """ds[t, 𝒦_t[k]] += ds_chosen[t, k]. The Array API has no put_along_axis: slot by slot, each row's chosen expert
    is picked out of the E columns by comparison (K passes over [N, E]; a row's K experts are distinct, so each
    entry gets at most one addition, the one the scatter makes)."""
    xp = array_namespace(ds)
    columns = xp.arange(ds.shape[-1], dtype=experts.dtype)
    for k in range(experts.shape[-1]):
        hit = experts[:, k:k + 1] == columns
        ds = xp.where(hit, ds + ds_chosen[:, k:k + 1], ds)
    return ds
