"""Training losses with their gradients: causal-LM cross-entropy with z-loss (SPEC §4.10, §7) and the
sequence-wise balance loss (SPEC §6.3, §14 #6, #16)."""

from __future__ import annotations

from typing import NamedTuple

from .array_module import array_namespace
from .scatter import bincount

__all__ = ["IGNORE_INDEX", "cross_entropy_forward", "cross_entropy_backward", "balance_loss_forward",
           "balance_loss_backward", "CrossEntropyCtx"]


class CrossEntropyCtx(NamedTuple):
    """What cross_entropy_backward and the token count read; every backend's cross-entropy returns this type."""
    logits: object  # [B, T, V]
    target: object  # the label each predicting position predicts, ignored ones replaced by 0 [B, P]
    valid: object  # the predicting positions that count [B, P] bool (P = T − 1 with shift, else T)
    lse: object  # log Σ_v exp(logit) [B, P]
    denom: object  # N: the number of counted tokens (at least 1), or the step's global count
    z_loss_coeff: float  # λ_z

IGNORE_INDEX = -100


def _logsumexp(z):
    xp = array_namespace(z)
    m = xp.max(z, axis=-1, keepdims=True)
    return (m + xp.log(xp.sum(xp.exp(z - m), axis=-1, keepdims=True)))[..., 0]


def cross_entropy_forward(logits, labels, z_loss_coeff=0.0, *, shift=True, denom=None):
    """Hugging Face causal-LM loss semantics plus the z-loss (SPEC §4.10, §7, §14 #17).

    Labels are shifted inside: position t predicts labels[t+1]; labels equal to −100 are ignored; with N the number
    of tokens that count and lse_t = log Σ_v exp(logit_{t,v}):
        ce = (1/N) Σ_t (lse_t − logit_{t,y_t}),      z = λ_z · (1/N) Σ_t lse_t²
    Returns (ce, z, ctx). With N = 0 both are 0 (HF would return NaN) and so is the gradient.

    shift=False takes labels already aligned (labels[t] is what position t predicts, −100 where none): a rank that
    holds chunks of sequences gets its targets from the whole sequence. denom, when given, replaces N: the training
    step divides every rank's and micro-batch's sums by the token count of the whole step.
    """
    xp = array_namespace(logits)
    labels = xp.asarray(labels)
    if labels.shape != logits.shape[:-1] or not xp.isdtype(labels.dtype, "integral"):
        raise ValueError(f"labels must be an integer array shaped like tokens {logits.shape[:-1]}, "
                         f"got dtype {labels.dtype} shape {labels.shape}")
    V = logits.shape[-1]
    target = labels[:, 1:] if shift else labels
    valid = target != IGNORE_INDEX
    if bool(xp.any(valid & ((target < 0) | (target >= V)))):
        raise ValueError(f"labels must be token ids in [0, {V}) or {IGNORE_INDEX}")
    z = logits[:, :target.shape[1], ...]
    n = int(xp.count_nonzero(valid))
    lse = _logsumexp(z)
    safe_target = xp.where(valid, target, 0)
    picked = xp.take_along_axis(z, safe_target[..., None], axis=-1)[..., 0]
    denom = max(n, 1) if denom is None else denom
    ce = float(xp.sum(xp.where(valid, lse - picked, 0.0)) / denom)
    zl = float(z_loss_coeff * xp.sum(xp.where(valid, lse * lse, 0.0)) / denom)
    return ce, zl, CrossEntropyCtx(logits, safe_target, valid, lse, denom, z_loss_coeff)


def cross_entropy_backward(ctx, scale=1.0):
    """d(ce + z)/dlogit_t = (softmax(logit_t)·(1 + 2λ_z lse_t) − onehot(y_t)) / N on counted positions, 0 elsewhere
    (with shift, the last position predicts nothing) (SPEC §5 "Cross-entropy + z-loss"). `scale` multiplies the
    result. The one-hot term is a boolean mask (a comparison with the vocabulary ids), not an integer scatter, which
    the Array API does not have."""
    logits, target, valid, lse, denom, lam = ctx
    xp = array_namespace(logits)
    B, T, V = logits.shape
    P = valid.shape[1]
    z = logits[:, :P, ...]
    coef = xp.astype(xp.where(valid, (1.0 + 2.0 * lam * lse) * (scale / denom), 0.0), logits.dtype)
    dz = xp.exp(z - lse[..., None]) * coef[..., None]
    counted_target = xp.where(valid, xp.astype(target, xp.int64), -1)  # −1 matches no vocabulary id
    hit = counted_target[..., None] == xp.arange(V, dtype=xp.int64)  # onehot(y_t) on counted positions
    dz[hit] = dz[hit] - float(scale / denom)  # 1/N rounded to the logits' dtype
    if P == T:
        return dz
    return xp.concat([dz, xp.zeros((B, T - P, V), dtype=logits.dtype)], axis=1)


def balance_loss_forward(scores, experts, top_k, coeff, *, seq_len=None, num_sequences=None, sequence_sum=None):
    """Trinity's sequence-wise balance loss for one MoE layer, averaged over the B sequences (SPEC §6.3):

        f_i = E/(K·T) Σ_t 1[i ∈ 𝒦_t]   (𝒦_t: the actual, biased selection; treated as a constant)
        s̃_{i,t} = s_{i,t} / Σ_{j=1..E} s_{j,t},   P_i = (1/T) Σ_t s̃_{i,t},   L = α Σ_i f_i P_i

    scores [B, T, E] (sigmoid scores s), experts [B, T, K]. Returns (loss, ctx).

    For a rank that holds parts of sequences and some of the step's sequences: seq_len is the whole sequences' T,
    num_sequences the step's B (the mean runs over every sequence of the step), and sequence_sum(x [B, E]) sums the
    per-sequence counts over the ranks holding the other parts of the same sequences (the op table's seam): f is the
    whole sequence's, P_i this rank's part of the sum over t, so the loss returned is this rank's share of L and the
    shares add up to L.
    """
    B, T, E = scores.shape
    seq_len = T if seq_len is None else seq_len
    num_sequences = B if num_sequences is None else num_sequences
    xp = array_namespace(scores)
    # counts[b, i] = #{(t, k) : 𝒦_{t,k} = i} in sequence b: one count over the ids b·E + i
    sequence_of = xp.reshape(xp.arange(B, dtype=experts.dtype), (B, 1, 1))
    counts = xp.astype(xp.reshape(bincount(sequence_of * E + experts, B * E), (B, E)), scores.dtype)
    total = xp.sum(scores, axis=-1, keepdims=True)
    s_norm = scores / total
    s_sum = xp.sum(s_norm, axis=1)
    if sequence_sum is not None:  # f needs the whole sequence's counts; P splits: Σ_t over this rank's tokens
        counts = sequence_sum(counts)
    f = counts * (E / (top_k * seq_len))
    P = s_sum / seq_len
    loss = float(coeff * xp.sum(xp.sum(f * P, axis=-1)) / num_sequences)
    return loss, (scores, total, s_norm, f, coeff, seq_len, num_sequences)


def balance_loss_backward(ctx, scale=1.0):
    """dL/ds̃_{i,t} = α f_i / (T·B); ds_j = (dL/ds̃_j − Σ_i dL/ds̃_i s̃_i) / S_t with S_t = Σ_j s_{j,t}, over all E
    experts, not just the chosen K (SPEC §5 "Sequence-wise balance loss"). Returns ds [B, T, E] (of this rank's
    tokens; T and B those of balance_loss_forward's seq_len and num_sequences)."""
    scores, total, s_norm, f, coeff, seq_len, num_sequences = ctx
    xp = array_namespace(scores)
    g = xp.broadcast_to((scale * coeff / (seq_len * num_sequences)) * f[:, None, :], scores.shape)
    return (g - xp.sum(g * s_norm, axis=-1, keepdims=True)) / total
