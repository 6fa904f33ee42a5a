"""Token embedding with the muP input multiplier (SPEC §4.1; backward §5 "Embedding")."""

from .array_module import array_namespace
from .scatter import segment_sum

__all__ = ["embedding_forward", "embedding_backward"]


def embedding_forward(tokens, table, multiplier=1.0):
    """x⁰_t = m · E_emb[tok_t], with m = √d under muP and 1 otherwise (SPEC §4.1).

    tokens: int array of any shape, values in [0, V); table: [V, d]. The multiplier scales the activations, not the
    weights. ctx = (tokens, V, multiplier): the backward scatter-adds m·dx⁰ into the rows of the used tokens.
    """
    xp = array_namespace(table, tokens)
    d = table.shape[-1]
    x = xp.reshape(xp.take(table, xp.reshape(tokens, (-1,)), axis=0), (*tokens.shape, d))
    if multiplier != 1.0:
        x = x * float(multiplier)
    return x, (tokens, table.shape[0], multiplier)


def embedding_backward(ctx, dx):
    """dE_emb[v] = m · Σ_{t: tok_t = v} dx⁰_t: a scatter-add, repeated tokens accumulate (SPEC §5 "Embedding").

    The Array API has no scatter-add; scatter.segment_sum forms it from a stable sort, a binary search and gathers,
    adding each token's rows in their order (the additions np.add.at makes)."""
    tokens, vocab, multiplier = ctx
    xp = array_namespace(dx, tokens)
    d = dx.shape[-1]
    dtable = segment_sum(xp.reshape(tokens, (-1,)), xp.reshape(dx, (-1, d)), vocab)
    if multiplier != 1.0:
        dtable *= float(multiplier)
    return dtable
