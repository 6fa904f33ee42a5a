"""Context parallel (distributed/context_parallel.py) on a virtual cluster of cp ∈ {1, 2, 3, 4} ranks, in float64.

Each rank holds chunks r and 2·cp−1−r of every sequence and runs the same model code through an op table whose
key/value gathering and per-sequence sums are the cp seams. Properties:
  - the seams themselves: gather_kv returns exactly the keys the queries may need (the whole sequence for a global
    layer; the rank's chunks and the w−1 keys before each for a sliding one), by position, and gather_kv_backward
    is its transpose (each rank's rows get every rank's gradients of them);
  - the whole objective: the ranks' loss shares add up to the single-process losses and their gradients to its
    gradients, for drawn configs (sliding windows up to chunk + 1, global layers, MoE layers with the balance loss,
    document boundaries anywhere, also exactly at chunk boundaries);
  - the traffic: the sliding layers' Alltoallv moves only the halos (w−1 rows per chunk), never whole sequences;
    under cp_exchange=read a global layer's Alltoallv moves only the chunks each rank reads (chunks 0 … 2·cp−1−r for
    rank r), and their gradients back;
  - cp_exchange=read trains the single process's model: on virtual ranks at the cluster tests' cp layouts (three
    steps, 1e-10 relative, tests/test_layouts.py's check) and under real mpiexec.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from trinity.distributed.context_parallel import ContextParallelSeams
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed.options import ParallelOptions
from trinity.reference import Config, loss_and_grads, model_forward
from trinity.reference.model.config import FULL, SLIDING
from trinity.reference.model.objective import LossScale
from trinity.reference.model.ops import REFERENCE, ReferenceOps
from trinity.reference.training.step import _aligned_targets
from trinity.simulate.virtual.virtual_comm import VirtualCluster
from mpi_jobs import requires_mpi, run_mpi
from strategies import min_topk_gap, random_params, small_configs

cps = st.integers(1, 4)
exchanges = st.sampled_from(["all", "read"])


class CPOps(ContextParallelSeams, ReferenceOps):
    """The reference table with the cp seams."""

    def __init__(self, mesh):
        self.mesh, self.base = mesh, REFERENCE


def on_cluster(cp, fn, exchange="all"):
    """fn(mesh, ops) on every rank of a cp-rank virtual cluster (cp_exchange `exchange`); results by rank."""
    def body(comm):
        mesh = Mesh(comm, Layout(cp=cp, options=ParallelOptions(cp_exchange=exchange)))
        return fn(mesh, CPOps(mesh))
    return VirtualCluster(cp, timeout=60).run(body)


@st.composite
def doc_ids_for(draw, B, T, chunk):
    """[B, T] document ids with boundaries anywhere, often exactly at chunk boundaries; or None."""
    if not draw(st.booleans()):
        return None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    starts = np.zeros((B, T), dtype=bool)
    starts[:, 1:] = rng.random((B, T - 1)) < draw(st.sampled_from([0.1, 0.3]))
    if draw(st.booleans()):  # documents that start where chunks start
        starts[:, chunk::chunk] |= rng.random((B, len(range(chunk, T, chunk)))) < 0.7
    return np.cumsum(starts, axis=1)


# ---- the seams alone --------------------------------------------------------------------------------------------
@given(cp=cps, chunk=st.integers(1, 5), B=st.integers(1, 2), hkv=st.integers(1, 2), docs=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 6)), seed=st.integers(0, 2**32 - 1), exchange=exchanges)
def test_gather_kv_returns_the_needed_keys_and_its_backward_is_the_transpose(cp, chunk, B, hkv, docs, window, seed,
                                                                              exchange):
    window = None if window is None else min(window, chunk + 1)
    T, dh = 2 * cp * chunk, 3
    rng = np.random.default_rng(seed)
    K, V = rng.standard_normal((2, B, T, hkv, dh))
    D = np.cumsum(rng.random((B, T)) < 0.3, axis=1) if docs else None
    dK_all = [rng.standard_normal((B, T, hkv, dh)) for _ in range(cp)]  # per rank, indexed by key position
    dV_all = [rng.standard_normal((B, T, hkv, dh)) for _ in range(cp)]

    def fn(mesh, ops):
        pos = mesh.local_positions(T)
        k_all, v_all, k_pos, k_doc, ctx = ops.gather_kv(K[:, pos], V[:, pos], pos, None if D is None else D[:, pos],
                                                        window)
        r = mesh.group_rank["cp"]
        dk, dv = ops.gather_kv_backward(ctx, dK_all[r][:, k_pos], dV_all[r][:, k_pos])
        return pos, k_all, v_all, k_pos, k_doc, dk, dv

    results = on_cluster(cp, fn, exchange)
    dK_sum, dV_sum = np.zeros_like(K), np.zeros_like(V)
    for r, (pos, k_all, v_all, k_pos, k_doc, dk, dv) in enumerate(results):
        assert np.all(np.diff(k_pos) > 0)
        if window is None and exchange == "read" and cp > 1:  # up to the rank's last query: chunks 0 … 2·cp−1−r
            need = np.arange(pos[-1] + 1)
        elif window is None:
            need = np.arange(T)  # global: every position (also those after the last query: one whole Allgather)
        else:  # the queries' own positions and the w−1 before each chunk
            need = np.unique(np.concatenate([pos] + [np.arange(max(p - window + 1, 0), p) for p in pos]))
        np.testing.assert_array_equal(k_pos, need)
        np.testing.assert_array_equal(k_all, K[:, k_pos])
        np.testing.assert_array_equal(v_all, V[:, k_pos])
        if D is None:
            assert k_doc is None
        else:
            np.testing.assert_array_equal(k_doc, D[:, k_pos])
        dK_sum[:, k_pos] += dK_all[r][:, k_pos]
        dV_sum[:, k_pos] += dV_all[r][:, k_pos]
    for pos, *_, dk, dv in results:  # each rank's rows: the sum of every rank's gradients of them
        np.testing.assert_allclose(dk, dK_sum[:, pos], rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(dv, dV_sum[:, pos], rtol=1e-14, atol=1e-14)


@given(cp=cps, seed=st.integers(0, 2**32 - 1))
def test_sequence_sum_over_cp_keeps_dtype(cp, seed):
    xs = np.random.default_rng(seed).standard_normal((cp, 2, 3)).astype(np.float32)
    got = on_cluster(cp, lambda mesh, ops: ops.sequence_sum(xs[mesh.group_rank["cp"]]))
    for g in got:
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, xs.sum(axis=0), rtol=1e-6)


def test_cp1_is_the_single_process_identity():
    def fn(mesh, ops):
        k, v, pos, doc = np.ones((1, 4, 1, 2)), np.zeros((1, 4, 1, 2)), np.arange(4), np.zeros((1, 4), int)
        for window in (None, 2):
            out = ops.gather_kv(k, v, pos, doc, window)
            assert out[0] is k and out[1] is v and out[2] is pos and out[3] is doc
            assert ops.gather_kv_backward(out[4], k, v) == (k, v)
        assert ops.sequence_sum(k) is k
        return mesh.take_traffic()

    assert on_cluster(1, fn) == [{}]


# ---- the whole objective ----------------------------------------------------------------------------------------
def cp_loss_and_grads(cp, config, params, tokens, labels, doc_ids, exchange="all"):
    """Every rank's (losses, grads, stats, traffic) for its chunks of the batch."""
    B, T = tokens.shape
    targets = _aligned_targets(labels)
    scale = LossScale(tokens=int((labels[:, 1:] != -100).sum()), sequences=B, seq_len=T)

    def fn(mesh, ops):
        pos = mesh.local_positions(T)
        losses, grads, stats = loss_and_grads(config, params, tokens[:, pos], targets[:, pos],
                                              None if doc_ids is None else doc_ids[:, pos], ops=ops, positions=pos,
                                              shift=False, scale=scale, check=False)
        return losses, grads, stats, mesh.take_traffic()
    return on_cluster(cp, fn, exchange)


@st.composite
def cp_cases(draw):
    cp, chunk = draw(cps), draw(st.integers(1, 4))
    T = 2 * cp * chunk
    config = draw(small_configs(max_layers=3, max_hidden=24, max_vocab=32))
    window = draw(st.sampled_from([1, chunk + 1, draw(st.integers(1, chunk + 1))]))  # up to chunk + 1: w−1 ≤ chunk
    config = config.replace(sliding_window=window, global_attn_every_n_layers=draw(st.integers(1, 3)),
                            num_dense_layers=draw(st.integers(0, min(1, config.num_hidden_layers))),
                            balance_loss_coeff=draw(st.sampled_from([0.0, 1e-2, 0.5])),
                            z_loss_coeff=draw(st.sampled_from([0.0, 1e-2])), max_position_embeddings=max(T, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    B = draw(st.integers(1, 2))
    tokens = rng.integers(0, config.vocab_size, (B, T))
    labels = np.where(rng.random((B, T)) < draw(st.sampled_from([0.0, 0.3])), -100, tokens)
    return cp, config, random_params(config, seed), tokens, labels, draw(doc_ids_for(B, T, chunk)), draw(exchanges)


@settings(max_examples=150)
@given(cp_cases())
def test_shares_add_up_to_the_single_process_losses_and_gradients(case):
    cp, config, params, tokens, labels, doc_ids, exchange = case
    chunk = tokens.shape[1] // (2 * cp)
    layers = range(config.num_hidden_layers)
    event(f"cp = {cp}, cp_exchange = {exchange}")
    event("a global layer" if any(config.window_of(i) is None for i in layers) else "no global layer")
    if any(config.window_of(i) is not None for i in layers):
        event(f"sliding, w − 1 {'=' if config.sliding_window - 1 == chunk else '<'} chunk")
    if config.balance_loss_coeff and any(config.is_moe_layer(i) for i in layers):
        event("balance loss on a MoE layer")
    if doc_ids is not None and np.any(doc_ids[:, chunk::chunk] != doc_ids[:, chunk - 1:-1:chunk]):
        event("a document starts at a chunk boundary")
    _, ctx = model_forward(config, params, tokens, doc_ids)
    assume(min_topk_gap(config, params, ctx) > 1e-9)  # rounding must not flip a top-k choice
    want_losses, want_grads, want_stats = loss_and_grads(config, params, tokens, labels, doc_ids)
    ranks = cp_loss_and_grads(cp, config, params, tokens, labels, doc_ids, exchange)
    for name in ("ce", "z", "balance", "total"):
        got = sum(losses[name] for losses, *_ in ranks)
        np.testing.assert_allclose(got, want_losses[name], rtol=1e-12, atol=1e-15, err_msg=name)
    # relative to each key's largest entry; a key that is only rounding noise (e.g. q_proj with w = 1, where every
    # query sees itself alone) against 1e-4 of the whole gradient's largest entry instead
    floor = 1e-4 * max(float(np.abs(g).max(initial=0.0)) for g in want_grads.values())
    for key, want in want_grads.items():
        got = sum(grads[key] for _, grads, *_ in ranks)
        scale = max(float(np.abs(want).max(initial=0.0)), floor, 1e-300)
        assert np.abs(got - want).max(initial=0.0) <= 1e-10 * scale, key
    for layer, s in want_stats["layers"].items():
        np.testing.assert_array_equal(sum(stats["layers"][layer]["expert_counts"] for _, _, stats, _ in ranks),
                                      s["expert_counts"])


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("with_docs", [False, True])
def test_sliding_layers_exchange_only_halos(cp, with_docs):
    chunk, B, window = 4, 2, 3
    T = 2 * cp * chunk
    types = (SLIDING, FULL, SLIDING)
    config = Config(vocab_size=16, hidden_size=8, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=3,
                    num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=2,
                    num_experts_per_tok=1, sliding_window=window, layer_types=types, max_position_embeddings=T)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 16, (B, T))
    doc_ids = np.cumsum(rng.random((B, T)) < 0.2, axis=1) if with_docs else None
    ranks = cp_loss_and_grads(cp, config, random_params(config, 0), tokens, tokens, doc_ids)
    h, hkv, dh, f = window - 1, config.num_key_value_heads, config.head_dim, 8  # float64 / int64: 8 bytes
    halo_kv = 2 * B * h * hkv * dh * f  # k and v of one halo
    halo_doc = B * h * 8 if with_docs else 0
    whole_kv = 2 * B * T * hkv * dh * f
    for r, (*_, traffic) in enumerate(ranks):
        neighbours = (r > 0) + (r < cp - 1)  # halos this rank sends (its chunks' tails needed by others)
        sent = traffic[("Alltoallv", "cp")]
        # per sliding layer: the halos forward (k, v, doc ids) and their gradients back, nothing else
        assert sent == types.count(SLIDING) * neighbours * (2 * halo_kv + halo_doc), (r, traffic)
        assert sent < types.count(SLIDING) * whole_kv
        assert traffic[("Allgather", "cp")] == types.count(FULL) * (cp - 1) * (whole_kv + (B * T * 8 if with_docs
                                                                                          else 0)) // cp


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("with_docs", [False, True])
def test_global_layers_under_cp_exchange_read_move_only_the_chunks_read(cp, with_docs):
    """Rank r sends its first chunk to every other rank and its second (chunk 2·cp−1−r) to the ranks before it (k, v
    and doc ids in one message), then the gradients of the chunks it got back: 3·(cp−1) chunks of k and v per rank
    and global layer, against the Allgather's and the Reduce_scatter_block's 4·(cp−1)."""
    chunk, B = 4, 2
    T = 2 * cp * chunk
    types = (FULL, SLIDING, FULL)
    config = Config(vocab_size=16, hidden_size=8, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=3,
                    num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=2,
                    num_experts_per_tok=1, sliding_window=1, layer_types=types, max_position_embeddings=T)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 16, (B, T))
    doc_ids = np.cumsum(rng.random((B, T)) < 0.2, axis=1) if with_docs else None
    params = random_params(config, 0)
    kv = 2 * B * chunk * config.num_key_value_heads * config.head_dim * 8  # k and v of one chunk, float64
    doc = B * chunk * 8 if with_docs else 0
    read = cp_loss_and_grads(cp, config, params, tokens, tokens, doc_ids, "read")
    gathered = cp_loss_and_grads(cp, config, params, tokens, tokens, doc_ids)
    for r, ((*_, traffic), (*_, before)) in enumerate(zip(read, gathered)):
        forward, backward = cp - 1 + r, 2 * cp - 2 - r  # chunks sent: its own to the readers; theirs back
        assert set(traffic) == {("Alltoallv", "cp"), ("Allreduce", "cp")}, traffic
        assert traffic[("Alltoallv", "cp")] == types.count(FULL) * (forward * (kv + doc) + backward * kv), r
        assert before[("Allgather", "cp")] + before[("Reduce_scatter_block", "cp")] == \
            types.count(FULL) * 4 * (cp - 1) * (kv + doc / 2)
    for (losses, grads, *_), (want, want_grads, *_) in zip(read, gathered):
        assert losses["total"] == pytest.approx(want["total"], rel=1e-12)
        for key in want_grads:
            np.testing.assert_allclose(grads[key], want_grads[key], rtol=1e-10, atol=1e-14)


# ---- cp_exchange=read trains the single process's model --------------------------------------------------------
# the cp layouts of the cluster tests (tests/test_layouts.py, tests/test_mpi_train.py), and cp = 3 and 4
READ_LAYOUTS = ["cp=2", "dp_replicate=2,dp_shard=2,cp=2,ep=4", "dp_replicate=2,cp=2,ep=2",
                "dp_replicate=2,dp_shard=2,cp=2,ep=2", "dp_shard=2,cp=2,ep=2", "cp=3", "cp=4,ep=2"]


@pytest.mark.parametrize("text", READ_LAYOUTS)
def test_cp_exchange_read_equals_the_single_process_on_virtual_ranks(text):
    from test_layouts import _config, check_layout
    layout = Layout.parse(text + ",cp_exchange=read")
    for window in (6, 12 * layout.cp):  # sliding and global layers; every layer global (a window >= seq_len)
        config = _config(window=window, doc_mask=True, method="smebu", tied=False)
        check_layout(layout, config, S=2 * layout.dp, T=12 * layout.cp, mbs=1)


@pytest.fixture(scope="module")
def mpi_single(tmp_path_factory):
    """(the token file, the single-process run folder of 4 steps) of tests/test_mpi_train.py's jobs."""
    from test_mpi_train import _run_dir
    from test_trainer import trinity
    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource
    data = tmp_path_factory.mktemp("data") / "tokens.bin"
    for path, docs in ((data, 20000), (data.parent / "held.bin", 2000)):
        write_token_file(path, MarkovSource(256, eos_id=0, branching=4, mean_doc_len=20, seed=0).documents(docs),
                         eos_id=0)
    single = _run_dir(tmp_path_factory.mktemp("single"), data)
    r = trinity("train", str(single / "run.toml"))
    assert r.returncode == 0, r.stderr
    return data, single


@requires_mpi
@pytest.mark.parametrize("ranks,layout,backend", [(2, "cp=2", "reference"), (4, "dp_shard=2,cp=2,ep=2", "numba")])
def test_cp_exchange_read_under_mpiexec_trains_the_single_process_model(tmp_path, mpi_single, ranks, layout, backend):
    """The mpiexec job of tests/test_mpi_train.py with cp_exchange=read (numba: with --checksums, each message's
    crc checked): its losses and its checkpoints after steps 1, 3 and 4 equal the single process's to 1e-10."""
    from test_mpi_train import _assert_same_losses, _assert_same_state, _checkpoint, _metrics, _run_dir
    data, single = mpi_single
    d = _run_dir(tmp_path, data)
    options = ["--mesh", f"{layout},cp_exchange=read", "--backend", backend] + \
        (["--checksums"] if backend == "numba" else [])
    code, out, err, _ = run_mpi(ranks, ["-m", "trinity.cli", "train", "run.toml", *options], cwd=d, timeout=180)
    assert code == 0, err
    assert f"layout {layout},cp_exchange=read over {ranks} ranks" in out
    _assert_same_losses(_metrics(d), _metrics(single))
    _assert_same_losses(_metrics(d, "eval"), _metrics(single, "eval"))
    for step in (1, 3, 4):
        _assert_same_state(_checkpoint(d, step), _checkpoint(single, step))


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_cp_exchange_read_shrinks_the_keys_a_rank_holds(cp):
    """rank_memory's context part: under cp_exchange=read cp rank r keeps (2·cp−r)·c keys of a global layer instead
    of T (rank 0 reads them all; the layer's backward buffers shrink alike)."""
    from trinity.distributed.rank_memory import estimate_rank_bytes
    B, T = 2, 2 * cp * 16
    config = Config.preset("tiny").replace(sliding_window=T)  # every layer causal over the whole sequence
    c, kvw, L = T // (2 * cp), config.kv_width, config.num_hidden_layers
    for r in range(cp):
        everything, read = (estimate_rank_bytes(config, Layout(cp=cp, options=ParallelOptions(cp_exchange=x)), r, T,
                                                B, "float32")["context"] for x in ("all", "read"))
        # kept: 2·B·(keys − T/cp)·kvw per layer; the exchange buffers 4·B·keys·kvw, in float32
        assert everything - read == (2 * L + 4) * B * r * c * kvw * 4, r


def test_the_documented_benchmark_prints_the_bytes_it_saves():
    """benchmarks/cp_exchange.py --parts bytes (docs/performance.md): a quarter of the global layers' bytes."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "cp_exchange.py"), "--parts", "bytes",
                        "--layouts", "cp=2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1].split()[:4] == ["read", "/", "all", "0.750"], r.stdout
