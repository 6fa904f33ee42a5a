"""Held-out evaluation: the training objective's forward on batches that are never trained on (SPEC §7).

For each batch, this rank computes its part (training/step.py `rank_inputs`: its rows, its context-parallel
positions) in micro-batches, forward only, with the same losses as training (objective.evaluate_losses):

    ce_sum      = Σ_t (lse_t − logit_{t,y_t})      over this rank's counted target tokens t (labels ≠ −100)
    z_sum       = λ_z · Σ_t lse_t²
    balance_sum = Σ_{MoE layers} Σ_{sequences} L_Bal(sequence)   (this rank's share: P over its tokens, f whole)

and, summed the same way, the counted tokens N, the expert assignments per MoE layer, and (when the tokenizer's byte
lengths are known) the UTF-8 bytes of the counted targets. After the last batch one all-reduce over "world" adds
every rank's sums, so the result is the same under every layout:

    ce = ce_sum / N,   z = z_sum / N,   balance = balance_sum / sequences,   total = ce + z + balance
    perplexity = exp(ce),   bits per byte = ce_sum / (ln 2 · bytes)

(the mean token cross-entropy over every counted target of the batches, as transformers' loss with the batches laid
end to end). Nothing of the model, the optimizer, the balancing state or any data loader changes: a run that
evaluates trains the same bits as one that does not.

With an op table on a device the params and batches are the table's arrays; the expert counts are summed there and
come back through `ops.to_host` once, after the last batch (and, for bits per byte, each batch's targets do: the
byte lengths are a host table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from ..model.config import Config
from ..model.objective import LossScale, evaluate_losses
from ..model.ops import REFERENCE
from ..operators.losses import IGNORE_INDEX
from .balancing import max_violation
from .step import LOCAL, LOSS_PARTS, GlobalBatch, rank_inputs

__all__ = ["EvalResult", "evaluate", "combine"]


@dataclass
class EvalResult:
    """The losses of an evaluation (module docstring), with what they were computed over."""
    losses: dict  # LOSS_PARTS: ce and z per counted token, balance per sequence
    tokens: int  # counted target tokens N
    sequences: int
    batches: int
    counts: dict = field(default_factory=dict)  # {MoE layer: assignments per expert [E]}
    target_bytes: int | None = None  # UTF-8 bytes of the counted targets; None: unknown

    @property
    def perplexity(self) -> float:
        ce = self.losses["ce"]
        return math.exp(ce) if ce < 700 else math.inf

    @property
    def bits_per_byte(self) -> float | None:
        if self.target_bytes is None or self.target_bytes <= 0:
            return None
        return self.losses["ce"] * self.tokens / (math.log(2) * self.target_bytes)

    def max_vio(self) -> dict:
        """{MoE layer: MaxVio of the evaluation's expert assignments} (balancing.max_violation)."""
        return {layer: max_violation(n) for layer, n in self.counts.items()}

    def as_line(self) -> dict:
        """The metrics line's part of the result: loss, perplexity, bits_per_byte (when known), tokens, sequences,
        batches."""
        line = {"loss": dict(self.losses), "perplexity": self.perplexity}
        if self.bits_per_byte is not None:
            line["bits_per_byte"] = self.bits_per_byte
        line.update(tokens=self.tokens, sequences=self.sequences, batches=self.batches)
        return line


def evaluate(config: Config, params, batches: Iterable[GlobalBatch], *, micro_batch_size: int | None = None,
             ops=None, mesh=LOCAL, token_bytes=None, on_batch: Callable | None = None) -> EvalResult:
    """The held-out losses of `batches` (module docstring). Each batch may hold only this rank's rows (GlobalBatch
    rows=); micro_batch_size: sequences per forward on this rank (default: all of its rows at once). token_bytes: int
    [≤ vocab] UTF-8 bytes per token id, 0 past its end (None: bits per byte unknown). on_batch() is called after each batch. Collective
    under a layout: every rank passes the same number of batches."""
    with mesh.evaluation():
        return _evaluate(config, params, batches, micro_batch_size, ops, mesh, token_bytes, on_batch)


def _evaluate(config, params, batches, micro_batch_size, ops, mesh, token_bytes, on_batch) -> EvalResult:
    c = config
    host = (ops or REFERENCE).to_host
    mesh.set_phase("forward")
    sums = {"ce": 0.0, "z": 0.0, "balance": 0.0}
    tokens = sequences = count = target_bytes = 0
    counts: dict = {}
    lengths = None
    if token_bytes is not None:  # a tokenizer's table may be shorter than the model's vocabulary: 0 bytes past it
        table = np.asarray(token_bytes, dtype=np.int64)
        lengths = np.zeros(max(c.vocab_size, table.size), dtype=np.int64)
        lengths[:table.size] = table
    for batch in batches:
        S, T = batch.shape
        mine = rank_inputs(batch, mesh)
        local = mine.tokens.shape[0]
        mbs = local if micro_batch_size is None else micro_batch_size
        if local % max(mbs, 1):
            raise ValueError(f"{local} sequences on this rank are not a whole number of micro-batches of {mbs}")
        scale = LossScale(tokens=1, sequences=1, seq_len=T)  # sums: the denominators come after the all-reduce
        for m0 in range(0, local, max(mbs, 1)):
            mb = slice(m0, m0 + mbs)
            with np.errstate(over="ignore", invalid="ignore"):
                losses, stats = evaluate_losses(c, params, mine.tokens[mb, :], mine.targets[mb, :],
                                                None if mine.doc_ids is None else mine.doc_ids[mb, :], ops=ops,
                                                positions=None if mine.whole else mine.positions, shift=mine.whole,
                                                scale=scale, check=False)
            if ops is not None:
                ops.end_forward()
            for k in sums:
                sums[k] += losses[k]
            tokens += stats["tokens"]
            for layer, s in stats["layers"].items():
                n = s["expert_counts"]
                counts[layer] = n if layer not in counts else counts[layer] + n
        if lengths is not None:
            target_bytes += _target_bytes(host(mine.targets), mine.whole, lengths)
        sequences += S
        count += 1
        if on_batch is not None:
            on_batch()
    mesh.set_phase("reductions")
    counts = host(counts)
    layers = sorted(counts)
    E = c.num_experts
    vector = np.concatenate([np.array([sums["ce"], sums["z"], sums["balance"], tokens, target_bytes],
                                      dtype=np.float64),
                             *[np.asarray(counts[layer], dtype=np.float64).reshape(E) for layer in layers]])
    total = mesh.sum(vector, "world")  # one all-reduce: every rank's sums (counts and bytes are exact below 2⁵³)
    n = int(round(total[3]))
    parts = {"ce": total[0] / max(n, 1), "z": total[1] / max(n, 1), "balance": total[2] / max(sequences, 1)}
    parts["total"] = parts["ce"] + parts["z"] + parts["balance"]
    return EvalResult(losses={k: float(parts[k]) for k in LOSS_PARTS}, tokens=n, sequences=sequences, batches=count,
                      counts={layer: np.rint(total[5 + i * E:5 + (i + 1) * E]).astype(np.int64)
                              for i, layer in enumerate(layers)},
                      target_bytes=None if lengths is None else int(round(total[4])))


def _target_bytes(targets, whole: bool, lengths: np.ndarray) -> int:
    """UTF-8 bytes of this rank's counted targets (with the shift still to apply when it holds whole sequences)."""
    targets = np.asarray(targets)
    targets = targets[:, 1:] if whole else targets
    valid = targets != IGNORE_INDEX
    return int(lengths[targets[valid]].sum())


def combine(results: dict) -> EvalResult:
    """One result over several evaluated sets ({name: EvalResult}): the means over all their counted tokens and
    sequences together, as if their batches were one evaluation."""
    parts = list(results.values())
    n = sum(r.tokens for r in parts)
    sequences = sum(r.sequences for r in parts)
    losses = {"ce": sum(r.losses["ce"] * r.tokens for r in parts) / max(n, 1),
              "z": sum(r.losses["z"] * r.tokens for r in parts) / max(n, 1),
              "balance": sum(r.losses["balance"] * r.sequences for r in parts) / max(sequences, 1)}
    losses["total"] = losses["ce"] + losses["z"] + losses["balance"]
    counts: dict = {}
    for r in parts:
        for layer, x in r.counts.items():
            counts[layer] = counts.get(layer, 0) + x
    known = all(r.target_bytes is not None for r in parts)
    return EvalResult(losses={k: float(losses[k]) for k in LOSS_PARTS}, tokens=n, sequences=sequences,
                      batches=sum(r.batches for r in parts), counts=counts,
                      target_bytes=sum(r.target_bytes for r in parts) if known else None)
