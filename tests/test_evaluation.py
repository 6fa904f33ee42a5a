"""Held-out evaluation (reference/training/evaluation.py): the same loss on every layout as in one process, exactly
the plan's collectives, and nothing it does reaches training.

- Every layout of the cluster tests, on virtual ranks: the eval losses equal the single process's to 1e-10 relative
  (float64; a wrong row, chunk, halo or routed token is off by far more), the token, byte and expert counts are
  equal exactly, and each rank's traced collectives equal `eval_schedule` exactly (routing from a single-process
  forward of the same batches). Drawn layouts (hypothesis) check the losses too.
- The definition: the result is the mean token cross-entropy of the batches laid end to end (a plain NumPy
  log-softmax of the reference logits), whatever the micro-batch size.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed.parallel_ops import parallelize
from trinity.distributed.plan import ParallelPlan
from trinity.distributed.schedule import eval_schedule, routing_counts
from trinity.reference import Config, init_params, logits
from trinity.reference.data.packing import document_ids
from trinity.reference.model.objective import evaluate_losses
from trinity.reference.model.ops import REFERENCE
from trinity.reference.training.evaluation import combine, evaluate
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.step import GlobalBatch
from trinity.simulate.virtual.virtual_comm import VirtualCluster

RTOL = 1e-10
CLUSTER = ["dp_shard=4", "dp_replicate=2,dp_shard=2", "dp_shard=2,ep=2", "dp_shard=4,ep=4", "cp=2",
           "dp_replicate=2,dp_shard=2,cp=2,ep=4", "dp_replicate=2,cp=2,ep=2", "dp_replicate=2,dp_shard=2,cp=2,ep=2",
           "dp_shard=2,cp=2,ep=2", "dp_replicate=2,cp=2", "cp=3", "dp_shard=3"]


def _config(window=6, doc_mask=True, tied=False, experts=4):
    return Config.preset("tiny").replace(
        num_experts=experts, num_experts_per_tok=2, sliding_window=window, intra_document_mask=doc_mask,
        balance_loss_coeff=1e-2, z_loss_coeff=1e-3, tie_word_embeddings=tied, vocab_size=64, hidden_size=32,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=16)


def _batches(config, count, S, T, seed, doc_every=7.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tokens = rng.integers(1, config.vocab_size, (S, T))
        tokens[rng.random((S, T)) < 1.0 / doc_every] = 0
        out.append(GlobalBatch(tokens, doc_ids=document_ids(tokens, 0) if config.intra_document_mask else None))
    return out


def _rows_only(batches, rows):
    """Each batch as a rank reads it: its rows only."""
    return [GlobalBatch(b.tokens[rows], doc_ids=None if b.doc_ids is None else b.doc_ids[rows], rows=rows,
                        sequences=b.tokens.shape[0]) for b in batches]


def _rank(comm, layout, config, params, batches, mbs, token_bytes):
    mesh = Mesh(comm, layout)
    ops, sharded, _ = parallelize(REFERENCE, mesh, config, params, init_optimizer_state(config, params))
    mesh.record = True
    mine = _rows_only(batches, mesh.local_sequences(batches[0].tokens.shape[0]))
    result = evaluate(config, sharded, mine, micro_batch_size=mbs, ops=ops, mesh=mesh, token_bytes=token_bytes)
    return result, list(mesh.events)


def _same(got, want, what):
    for part, value in want.losses.items():
        assert abs(got.losses[part] - value) <= RTOL * max(abs(value), 1e-300), (what, part, got.losses, want.losses)
    assert (got.tokens, got.sequences, got.batches, got.target_bytes) == \
        (want.tokens, want.sequences, want.batches, want.target_bytes), what
    assert set(got.counts) == set(want.counts)
    for layer in want.counts:
        assert np.array_equal(got.counts[layer], want.counts[layer]), (what, layer)


def _check(layout, config, S, T, mbs, count=2, seed=0, doc_every=7.0, schedule=True):
    params = init_params(config, seed=seed, dtype=np.float64)
    batches = _batches(config, count, S, T, seed, doc_every)
    token_bytes = np.arange(config.vocab_size) % 4  # any table: the byte count is a sum like the tokens'
    want = evaluate(config, params, batches, micro_batch_size=S // layout.dp, token_bytes=token_bytes)
    ranks = VirtualCluster(layout.world_size).run(_rank, layout, config, params, batches, mbs, token_bytes)
    if schedule:  # the routing of every token, from a single-process forward of each batch
        chosen = [{layer: s["chosen_experts"] for layer, s in
                   evaluate_losses(config, params, b.tokens, b.tokens, b.doc_ids)[1]["layers"].items()}
                  for b in batches]
        plan = ParallelPlan(config, layout)
        per_batch = [routing_counts(plan, c, mbs) for c in chosen]
        counts = [[mb for batch in per_batch for mb in batch[rank]] for rank in range(layout.world_size)]
    for rank, (got, events) in enumerate(ranks):
        _same(got, want, f"{layout} rank {rank}")
        if schedule:
            traced = [(e["phase"], e["layer"], e["kind"], e["group"], e["bytes"]) for e in events]
            scheduled = [tuple(s) for s in eval_schedule(plan, rank, S, T, mbs, count, 8, config.intra_document_mask,
                                                         counts if layout.ep > 1 else None)]
            assert traced == scheduled, (str(layout), rank)
    return want


@pytest.mark.parametrize("text", CLUSTER)
def test_every_layout_evaluates_the_single_process_loss_with_the_plans_collectives(text):
    layout = Layout.parse(text)
    _check(layout, _config(), S=2 * layout.dp, T=12 * layout.cp, mbs=1)


@pytest.mark.parametrize("text", ["dp_shard=2,ep=2", "dp_replicate=2,dp_shard=2,cp=2,ep=2"])
def test_tied_embeddings_and_two_micro_batches_per_rank(text):
    layout = Layout.parse(text)
    _check(layout, _config(window=4, tied=True, doc_mask=False), S=4 * layout.dp, T=8 * layout.cp, mbs=2, count=3)


@pytest.mark.parametrize("options", [
    "keep_gathered=all,reshard_after_forward=none,reduce_gradients=step,async_reduce=true",
    "keep_gathered=experts,keep_gathered_gib=0.00002,reshard_after_forward=dense"])
@pytest.mark.parametrize("text", ["dp_shard=4", "dp_replicate=2,dp_shard=2,cp=2,ep=2"])
def test_the_schedule_options_evaluate_a_forward_alone(text, options):
    """An evaluation's forward under every schedule option: the same losses and the plan's collectives (nothing is
    kept across its micro-batches, nothing left gathered after: end_forward drops what a forward kept for a backward
    that does not come)."""
    layout = Layout.parse(f"{text},{options}")
    _check(layout, _config(tied=True), S=4 * layout.dp, T=12 * layout.cp, mbs=2)


@st.composite
def layouts(draw):
    """A layout of at most 8 ranks with its evaluation: sequence length, window, documents, micro-batches."""
    cp = draw(st.sampled_from([1, 2, 3]))
    dp_shard = draw(st.sampled_from([1, 2, 4]))
    dp_replicate = draw(st.sampled_from([1, 2]))
    if dp_replicate * dp_shard * cp > 8:
        dp_shard = 1
    ep = draw(st.sampled_from([e for e in (1, 2, 4) if (dp_shard * cp) % e == 0]))
    chunk = draw(st.integers(1, 4))
    T = 2 * cp * chunk
    window = draw(st.one_of(st.integers(1, chunk + 1), st.integers(T, T + 3))) if cp > 1 else \
        draw(st.integers(1, T + 2))
    layout = Layout(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, ep=ep)
    mbs = draw(st.sampled_from([1, 2]))
    S = layout.dp * mbs * draw(st.integers(1, 2))
    config = _config(window=window, doc_mask=draw(st.booleans()), tied=draw(st.booleans()))
    return layout, config, S, T, mbs, draw(st.sampled_from([2.0, 5.0, 50.0]))


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(layouts(), st.integers(0, 2 ** 16), st.integers(1, 3))
def test_drawn_layouts_evaluate_the_single_process_loss(drawn, seed, count):
    layout, config, S, T, mbs, doc_every = drawn
    _check(layout, config, S, T, mbs, count=count, seed=seed, doc_every=doc_every, schedule=False)


def _plain_mean_ce(config, params, batches) -> float:
    """The mean token cross-entropy of the batches laid end to end, by a plain log-softmax of the logits."""
    total, n = 0.0, 0
    for b in batches:
        out = logits(config, params, b.tokens, b.doc_ids)
        lse = np.log(np.exp(out - out.max(-1, keepdims=True)).sum(-1)) + out.max(-1)
        picked = np.take_along_axis(out[:, :-1], b.tokens[:, 1:, None], -1)[..., 0]
        total += float((lse[:, :-1] - picked).sum())
        n += b.tokens[:, 1:].size
    return total / n


@pytest.mark.parametrize("mbs", [1, 2, 4])
def test_the_eval_loss_is_the_mean_token_cross_entropy_whatever_the_micro_batches(mbs):
    config = _config().replace(z_loss_coeff=0.0)
    params = init_params(config, seed=3, dtype=np.float64)
    batches = _batches(config, 3, 4, 10, seed=3)
    result = evaluate(config, params, batches, micro_batch_size=mbs)
    want = _plain_mean_ce(config, params, batches)
    assert abs(result.losses["ce"] - want) <= 1e-12 * want
    assert result.tokens == 3 * 4 * 9 and result.sequences == 12 and result.batches == 3
    assert math.isclose(result.perplexity, math.exp(want), rel_tol=1e-12)
    assert result.bits_per_byte is None  # no byte table
    assert sum(int(n.sum()) for n in result.counts.values()) == \
        3 * 4 * 10 * config.num_experts_per_tok * sum(config.is_moe_layer(l) for l in range(config.num_hidden_layers))


def test_combining_sets_is_evaluating_their_batches_together():
    config = _config()
    params = init_params(config, seed=1, dtype=np.float64)
    a, b = _batches(config, 2, 2, 8, seed=1), _batches(config, 1, 2, 8, seed=2)
    table = np.ones(config.vocab_size, dtype=np.int64)
    parts = {"a": evaluate(config, params, a, token_bytes=table), "b": evaluate(config, params, b, token_bytes=table)}
    together = evaluate(config, params, a + b, token_bytes=table)
    both = combine(parts)
    for k, v in together.losses.items():
        assert abs(both.losses[k] - v) <= 1e-12 * abs(v)
    assert (both.tokens, both.sequences, both.batches, both.target_bytes) == \
        (together.tokens, together.sequences, together.batches, together.target_bytes)
    assert math.isclose(both.bits_per_byte, together.losses["ce"] / math.log(2), rel_tol=1e-12)  # 1 byte per token
