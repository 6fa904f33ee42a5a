"""A learnable synthetic token stream with a known entropy floor, for smoke-training and tests.

The stream is a Markov chain over the vocabulary in which the EOS token is an ordinary state:
  - from a non-EOS token a, the next token is EOS with probability 1/mean_doc_len, else one of `branching`
    successors of a drawn with fixed random weights;
  - from EOS, the next token (the start of the next document) is uniform over the non-EOS tokens.
Cut at its EOS tokens, the stream is a list of documents. Its entropy rate H = Σ_a π_a · H(P[a, ·]) (π the
stationary distribution, H(P[a, ·]) the entropy of row a) is the lowest cross-entropy per token any model can reach
on it, in nats: the floor a training run is measured against.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MarkovSource"]


class MarkovSource:
    def __init__(self, vocab_size: int, eos_id: int = 0, branching: int = 4, mean_doc_len: float = 64.0,
                 seed: int = 0):
        if vocab_size < 3 or not 0 <= eos_id < vocab_size:
            raise ValueError(f"need vocab_size >= 3 and 0 <= eos_id < vocab_size, got {vocab_size}, {eos_id}")
        if not 1 <= branching < vocab_size or mean_doc_len < 1:
            raise ValueError(f"need 1 <= branching < vocab_size and mean_doc_len >= 1, got {branching}, "
                             f"{mean_doc_len}")
        rng = np.random.default_rng(seed)
        V = vocab_size
        words = np.array([t for t in range(V) if t != eos_id])
        P = np.zeros((V, V))
        p_end = 1.0 / mean_doc_len
        for a in words:
            successors = rng.choice(words, size=branching, replace=False)
            weights = rng.dirichlet(np.ones(branching))
            P[a, successors] = (1.0 - p_end) * weights
            P[a, eos_id] = p_end
        P[eos_id, words] = 1.0 / len(words)
        self.P, self.eos_id, self.vocab_size, self.seed = P, eos_id, V, seed

    def entropy_floor(self) -> float:
        """H = Σ_a π_a H(P[a, ·]) in nats per token, π the stationary distribution (left eigenvector for 1)."""
        vals, vecs = np.linalg.eig(self.P.T)
        pi = np.real(vecs[:, np.argmin(np.abs(vals - 1.0))])
        pi = pi / pi.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            row_entropy = -np.where(self.P > 0, self.P * np.log(self.P), 0.0).sum(axis=1)
        return float(pi @ row_entropy)

    def documents(self, num_tokens: int, seed: int | None = None) -> list[np.ndarray]:
        """About num_tokens tokens of the chain (EOS included), cut into documents (without their EOS)."""
        rng = np.random.default_rng(self.seed + 1 if seed is None else seed)
        cumulative = np.cumsum(self.P, axis=1)
        draws = rng.random(num_tokens)
        stream = np.empty(num_tokens, dtype=np.int64)
        state = self.eos_id
        for i in range(num_tokens):
            state = min(int(np.searchsorted(cumulative[state], draws[i], side="right")), self.vocab_size - 1)
            stream[i] = state
        pieces = np.split(stream, np.flatnonzero(stream == self.eos_id) + 1)
        return [piece[piece != self.eos_id] for piece in pieces if (piece != self.eos_id).any()]
