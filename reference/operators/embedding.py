"""Token embedding with the muP input multiplier (SPEC §4.1; backward §5 "Embedding")."""

import numpy as np

__all__ = ["embedding_forward", "embedding_backward"]


def embedding_forward(tokens, table, multiplier=1.0):
    """x⁰_t = m · E_emb[tok_t], with m = √d under muP and 1 otherwise (SPEC §4.1).

    tokens: int array of any shape, values in [0, V); table: [V, d]. The multiplier scales the activations, not the
    weights. ctx = (tokens, V, multiplier): the backward scatter-adds m·dx⁰ into the rows of the used tokens.
    """
    x = table[tokens]
    if multiplier != 1.0:
        x = x * np.asarray(multiplier, dtype=table.dtype)
    return x, (tokens, table.shape[0], multiplier)


def embedding_backward(ctx, dx):
    """dE_emb[v] = m · Σ_{t: tok_t = v} dx⁰_t: a scatter-add, repeated tokens accumulate (SPEC §5 "Embedding")."""
    tokens, vocab, multiplier = ctx
    d = dx.shape[-1]
    dtable = np.zeros((vocab, d), dtype=dx.dtype)
    np.add.at(dtable, tokens.reshape(-1), dx.reshape(-1, d))
    if multiplier != 1.0:
        dtable *= np.asarray(multiplier, dtype=dx.dtype)
    return dtable
