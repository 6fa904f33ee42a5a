"""Hypothesis strategies and random inputs shared by the conformance tests (no torch needed here).

Random weights are drawn for every parameter, router gate and expert_bias included: a zero router makes every
score tie at 0.5, so top-k would be decided by index alone (SPEC §3.4, §8, §14 #14).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from hypothesis import strategies as st

from trinity.reference import Config, param_shapes


def often_multiple_of_4(lo, hi):
    """Any size in [lo, hi], or a multiple of 4 there (torch's float32 grouped_mm needs multiples of 4)."""
    return st.one_of(st.integers(lo, hi), st.integers(-(-lo // 4), hi // 4).map(lambda n: 4 * n))


@st.composite
def small_configs(draw, max_layers=5, max_hidden=64, max_vocab=64, **fixed):
    """A small valid Config over every axis the model has: muP on/off, 0–2 dense layers, windows shorter and longer
    than the sequence, GQA ratios 1…h_q, head_dim independent of hidden/heads, 0–2 shared experts, route_scale,
    top-k up to E, tied or untied head. `fixed` overrides any field."""
    h_q = draw(st.integers(1, 6))
    h_kv = draw(st.sampled_from([k for k in range(1, h_q + 1) if h_q % k == 0]))
    layers = draw(st.integers(1, max_layers))
    E = draw(st.integers(1, 8))
    fields = dict(
        vocab_size=draw(st.integers(2, max_vocab)), hidden_size=draw(often_multiple_of_4(4, max_hidden)),
        intermediate_size=draw(st.integers(1, 48)), moe_intermediate_size=draw(often_multiple_of_4(1, 24)),
        num_hidden_layers=layers, num_dense_layers=draw(st.integers(0, min(2, layers))),
        num_attention_heads=h_q, num_key_value_heads=h_kv, head_dim=2 * draw(st.integers(1, 10)),
        num_experts=E, num_experts_per_tok=draw(st.integers(1, E)), num_shared_experts=draw(st.integers(0, 2)),
        route_scale=draw(st.floats(0.25, 3.0)), sliding_window=draw(st.integers(1, 32)),
        global_attn_every_n_layers=draw(st.integers(1, 4)), mup_enabled=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()), rope_theta=draw(st.sampled_from([10000.0, 100.0, 1e6])),
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])), max_position_embeddings=64)
    fields.update(fixed)
    return Config(**fields)


def random_params(config: Config, seed: int, router: float = 2.0, bias: float = 0.1) -> dict[str, np.ndarray]:
    """Float64 random values for every param.

    Matrices ~ N(0, 1/fan_in) so activations stay O(1); norm gains ~ U(0.5, 1.5); the router gate is scaled so that
    logits spread by about `router`; expert_bias ~ N(0, bias²), comparable to the gaps between sigmoid scores."""
    rng = np.random.default_rng(seed)
    d = config.hidden_size
    params = {}
    for key, shape in param_shapes(config).items():
        if key.endswith("expert_bias"):
            params[key] = rng.normal(0.0, bias, shape)
        elif len(shape) == 1:
            params[key] = rng.uniform(0.5, 1.5, shape)
        elif key == "model.embed_tokens.weight":
            params[key] = rng.normal(0.0, 1.0 / math.sqrt(d) if config.mup_enabled else 1.0, shape)
        elif key.endswith("router.gate.weight"):
            params[key] = rng.normal(0.0, router / math.sqrt(d), shape)
        else:
            params[key] = rng.normal(0.0, 1.0 / math.sqrt(shape[-1]), shape)
    return params


def topk_gaps(scores: np.ndarray, expert_bias: np.ndarray, k: int) -> np.ndarray:
    """Per token, the gap between the K-th and (K+1)-th largest of s + b (inf when K = E): how far the selection
    is from a tie. Rounding or a small perturbation can flip top-k only where this gap is small."""
    biased = np.sort(scores + expert_bias, axis=-1)[..., ::-1]
    if k >= biased.shape[-1]:
        return np.full(biased.shape[:-1], np.inf)
    return biased[..., k - 1] - biased[..., k]


def min_topk_gap(config: Config, params: dict, model_ctx) -> float:
    """The smallest top-k boundary gap over every MoE layer and token of a model_forward ctx."""
    gap = math.inf
    for layer, routing in enumerate(model_ctx["routing"]):
        if routing is not None:
            scores = routing[0]
            bias = params[f"model.layers.{layer}.mlp.expert_bias"]
            gap = min(gap, float(topk_gaps(scores, bias, config.num_experts_per_tok).min()))
    return gap


@st.composite
def token_batches(draw, config: Config, max_batch=2, max_len=24):
    """(tokens, labels, doc_ids or None): labels are the tokens with some positions set to −100 (ignored)."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(2, max_len))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tokens = rng.integers(0, config.vocab_size, (B, T))
    labels = np.where(rng.random((B, T)) < draw(st.sampled_from([0.0, 0.2, 0.5])), -100, tokens)
    doc_ids = np.sort(rng.integers(0, 3, (B, T)), axis=1) if draw(st.booleans()) else None
    return tokens, labels, doc_ids


# ---- token loaders (reference/data/packing.py, rsdb.py, mixture.py) ------------------------------------------------
# What the loaders promise about their streams, checked independently of how they are implemented: documents whose
# every non-EOS token says which document and position it is, and the document order the module docstring of
# reference/data/packing.py publishes, recomputed here from its formula.

@st.composite
def loader_corpora(draw, max_documents=12, max_length=40):
    """Document lengths >= 0 (0 = a lone EOS), at least one document."""
    lengths = draw(st.lists(st.one_of(st.integers(0, 3), st.integers(0, max_length)), min_size=1,
                            max_size=max_documents))
    return lengths


def tagged_documents(lengths, source=0):
    """Document i of source s holds 1 + s*100_000 + i*1000 + j at position j (never 0, the EOS these tests use)."""
    assert max(lengths, default=0) < 1000 and len(lengths) < 100
    return [np.arange(n, dtype=np.int64) + 1 + source * 100_000 + i * 1000 for i, n in enumerate(lengths)]


def documented_order(num_documents, seed, epoch):
    """The document order of `epoch` as reference/data/packing.py's module docstring states it."""
    return np.random.default_rng([seed, epoch]).permutation(num_documents)


def with_eos(document, eos):
    return np.append(np.asarray(document, np.int64), eos)


def token_counts(tokens, size):
    """How often each token id < size occurs in `tokens` (any array)."""
    return np.bincount(np.asarray(tokens, np.int64).reshape(-1), minlength=size)


def _diff_message(want, got, whole):
    """Which documents (by index in `whole`; a token run that is no document by its first tokens) are missing and
    which extra in `got`, or both orders when only the order differs."""
    def name(d):
        return f"doc {whole.index(d)}" if d in whole else f"not a document {d[:4]}..."

    missing, extra = Counter(want) - Counter(got), Counter(got) - Counter(want)
    if not missing and not extra:
        return f"order {[name(d) for d in got][:12]} != {[name(d) for d in want][:12]}"
    return (f"missing {[name(d) for d in sorted(missing.elements())][:8]} "
            f"extra {[name(d) for d in sorted(extra.elements())][:8]}")


def check_packed_epochs(stream, documents, seed, epochs, eos):
    """The sequential loader's promise (reference/data/packing.py), over `epochs` epochs.

    `stream` is the loader's rows, flattened in order; nothing but documents may be in it (no padding, no gaps: a
    row's tail continues in the next row, an epoch's last document runs on into the next epoch). Split at EOS, the
    documents come N per epoch: epoch e must be exactly the documents `documented_order(N, seed, e)`, each whole and
    in order, so every document exactly once."""
    N = len(documents)
    whole = [tuple(d.tolist()) for d in documents]
    ends = np.flatnonzero(stream == eos)
    found = [tuple(d[:-1].tolist()) for d in np.split(stream[:ends[-1] + 1], ends + 1)[:-1]] if ends.size else []
    assert len(found) >= epochs * N, f"{len(found)} documents, fewer than {epochs} epochs"
    for e in range(epochs):
        got = found[e * N:(e + 1) * N]
        assert sorted(got) == sorted(whole), f"epoch {e}: not every document exactly once: " \
                                             f"{_diff_message(whole, got, whole)}"
        want = [whole[i] for i in documented_order(N, seed, e)]
        assert got == want, f"epoch {e}: not the documented order: {_diff_message(want, got, whole)}"


def check_each_pass_in_order(words, documents):
    """`words` (the emitted non-EOS tokens, in stream order) read every document front to back in each pass. The
    passes of one document may interleave (a buffer can hold two passes of it at once), so the property is: the k-th
    read of position p comes after the k-th read of position p-1 (no prefix of the stream has read p more often than
    p-1), which holds exactly when the reads split into passes that each run 0, 1, 2, ..."""
    words = np.asarray(words, np.int64)
    index = {int(t): (i, j) for i, d in enumerate(documents) for j, t in enumerate(d.tolist())}
    foreign = [int(t) for t in words if int(t) not in index]
    assert not foreign, f"tokens {foreign[:8]} belong to no document"
    doc_pos = np.array([index[int(t)] for t in words], np.int64).reshape(-1, 2)
    for i in np.unique(doc_pos[:, 0]):
        pos = doc_pos[doc_pos[:, 0] == i, 1]
        for p in range(1, len(documents[i])):
            before, at = np.flatnonzero(pos == p - 1), np.flatnonzero(pos == p)
            assert at.size <= before.size and np.all(at > before[:at.size]), \
                f"document {i}: position {p} read before position {p - 1} of the same pass"


def rsdb_consumed_documents(state, num_documents):
    """The documents an RSDB loader's source has handed to its buffer so far, from the documented order and the
    source position (src_epoch, src_cursor) in its state_dict()."""
    docs = [documented_order(num_documents, state["seed"], e) for e in range(state["src_epoch"])]
    docs.append(documented_order(num_documents, state["seed"], state["src_epoch"])[:state["src_cursor"]])
    return np.concatenate(docs).astype(np.int64)


def check_rsdb_accounts(state, emitted_counts, documents, eos):
    """No token dropped or repeated (reference/data/rsdb.py), at any moment: the tokens emitted so far
    (`emitted_counts`, a token_counts vector, padding excluded) plus the tokens still unread in the buffer (each
    buffered document from its read head on, per state_dict()) are exactly the tokens of the documents the source has
    handed out."""
    size = emitted_counts.size
    full = [with_eos(d, eos) for d in documents]
    consumed = rsdb_consumed_documents(state, len(documents))
    want = token_counts(np.concatenate([full[d] for d in consumed] + [np.zeros(0, np.int64)]), size)
    unread = [full[state["slots"][i][0]][state["slots"][i][1]:] for i in state["live"]]
    have = emitted_counts + token_counts(np.concatenate(unread + [np.zeros(0, np.int64)]), size)
    if not np.array_equal(have, want):
        bad = np.flatnonzero(have != want)[:8]
        raise AssertionError(f"after source epoch {state['src_epoch']} cursor {state['src_cursor']}: tokens "
                             f"{bad.tolist()} handed out {want[bad].tolist()} times but emitted + unread "
                             f"{have[bad].tolist()} times")
