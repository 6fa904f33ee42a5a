"""The cost model (trinity.simulate.planning.cost_model, workload, traffic_model, hardware): its accounts agree with the code
they describe, and its predictions move the way the hardware and the layout say they must."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.distributed.layout import Layout, fitting_layouts
from trinity.reference import Config
from trinity.simulate.planning.cost_model import predict
from trinity.simulate.planning.hardware import CATALOGUE, get_hardware, host_hardware
from trinity.simulate.planning.traffic_model import Itemsizes, step_collectives
from trinity.simulate.planning.workload import forward_flops_per_token, mean_keys, muon_flops, step_work, training_flops


def small_config(draw_layers=4, window=8, experts=8, top_k=2, dense=1):
    return Config.preset("tiny").replace(num_hidden_layers=draw_layers, sliding_window=window, num_experts=experts,
                                         num_experts_per_tok=top_k, num_dense_layers=dense)


configs = st.builds(small_config, st.integers(2, 6), st.sampled_from([4, 8, 16, 64]), st.sampled_from([4, 8, 16]),
                    st.integers(1, 4), st.integers(0, 2))


@given(st.integers(1, 300), st.one_of(st.none(), st.integers(1, 400)))
def test_mean_keys_is_the_causal_window_count(T, window):
    want = sum(min(t + 1, window) if window else t + 1 for t in range(T)) / T
    assert math.isclose(mean_keys(T, window), want, rel_tol=1e-12)


@settings(deadline=None)
@given(configs, st.sampled_from([16, 32, 64]), st.integers(1, 3))
def test_the_operators_forward_flops_are_the_models(config, T, B):
    """The op-by-op account of one process adds up to the MFU numerator's forward; the backward is 2× (products)
    and 2.5× (attention)."""
    works = step_work(config, None, T, B, 1, q=4)
    forward = sum(w.flops for w in works if w.phase == "forward")
    assert math.isclose(forward, forward_flops_per_token(config, T) * B * T, rel_tol=1e-9)
    backward = {w.op: w.flops for w in works if w.phase == "backward"}
    fwd = {w.op: w.flops for w in works if w.phase == "forward"}
    assert math.isclose(backward["linear_backward"], 2 * fwd["linear_forward"], rel_tol=1e-12)
    assert math.isclose(backward["attention_backward"], 2.5 * fwd["attention_forward"], rel_tol=1e-12)
    assert math.isclose(training_flops(config, B, T), 3 * forward_flops_per_token(config, T) * B * T)


@settings(deadline=None)
@given(configs, st.sampled_from([2, 4]), st.sampled_from(["dp_shard", "cp", "ep"]))
def test_a_rank_does_its_share_of_the_step(config, n, dim):
    """Under dp_shard=n (or cp=n) a rank's forward is 1/n of the single process's; ep moves no compute, and the
    Newton–Schulz work of the busiest owner is at least 1/n of the whole and at most the whole."""
    T, S = 64, 4
    if dim == "ep" and config.num_experts % n:
        return
    text = {"dp_shard": f"dp_shard={n}", "cp": f"cp={n}", "ep": f"dp_shard={n},ep={n}"}[dim]
    layout = Layout.parse(text)
    one = sum(w.flops for w in step_work(config, None, T, S, 1) if w.phase == "forward")
    many = sum(w.flops for w in step_work(config, layout, T, S, 1) if w.phase == "forward")
    assert math.isclose(many, one / n, rel_tol=1e-9)
    ns = muon_flops(config, Layout.parse(f"dp_shard={n}"))
    assert muon_flops(config) / n <= ns * (1 + 1e-12) and ns <= muon_flops(config)


def test_routing_imbalance_slows_the_expert_parallel_step_only():
    config, hw = Config.preset("bench-medium"), get_hardware("h100")
    kw = dict(seq_len=1024, sequences=64, micro_batch_size=1)
    ep, dp = Layout.parse("dp_shard=8,ep=8"), Layout.parse("dp_shard=8")
    assert predict(config, ep, hw, imbalance=1.5, **kw).step_seconds > predict(config, ep, hw, **kw).step_seconds
    assert predict(config, dp, hw, imbalance=1.5, **kw).step_seconds == predict(config, dp, hw, **kw).step_seconds


@pytest.mark.parametrize("layout", ["dp_shard=8", "dp_replicate=2,dp_shard=4,ep=4", "dp_shard=4,cp=2,ep=2"])
def test_faster_hardware_is_never_slower(layout):
    config, base = Config.preset("bench-medium"), get_hardware("h100")
    L = Layout.parse(layout)
    kw = dict(seq_len=1024, sequences=64, micro_batch_size=2)
    t0 = predict(config, L, base, **kw).step_seconds
    for change in (dict(peak_flops=2 * base.peak_flops), dict(hbm_bandwidth=2 * base.hbm_bandwidth),
                   dict(intra_node_bandwidth=2 * base.intra_node_bandwidth),
                   dict(inter_node_bandwidth=2 * base.inter_node_bandwidth), dict(ranks_per_node=4)):
        t = predict(config, L, dataclasses.replace(base, **change), **kw).step_seconds
        assert (t <= t0) if "ranks_per_node" not in change else (t >= t0), change
    # with nothing to overlap the step is the sum of everything
    p = predict(config, L, base, overlap=False, **kw)
    assert p.step_seconds == pytest.approx(sum(p.detail["comm"].values()) + sum(
        v for k, v in p.phases.items() if k in ("forward", "backward", "optimizer")))


def test_the_host_shares_its_cores_among_ranks():
    cal = {"cores": 2, "memory_bytes": 1e10, "op_rates": {"linear_forward": [0.0, 1e-10]},
           "copy_bytes_per_s": 1e10, "link_bytes_per_s": 1e9, "link_latency_s": 1e-6, "gemm_flops_per_s": 1e10}
    config = Config.preset("tiny")
    kw = dict(seq_len=64, sequences=8, micro_batch_size=1, items=Itemsizes.of(4), q=4, overlap=False)
    two = predict(config, Layout.parse("dp_shard=2"), host_hardware(cal, 2), **kw)
    four = predict(config, Layout.parse("dp_shard=4"), host_hardware(cal, 4), **kw)
    # half the work per rank, but each rank gets half a core: the same compute time
    assert four.phases["forward"] == pytest.approx(two.phases["forward"])


def test_memory_shards_with_fsdp_and_recompute_saves_activations():
    config = Config.preset("trinity-nano")
    hw = get_hardware("h100")
    kw = dict(seq_len=4096, sequences=64, micro_batch_size=1)
    small, big = (predict(config, Layout.parse(t), hw, **kw) for t in ("dp_shard=8", "dp_shard=32"))
    for part in ("params", "grads", "optimizer"):
        assert big.memory[part] < small.memory[part] / 3
    plain = predict(config, Layout.parse("dp_shard=8"), hw, **kw)
    again = predict(config, Layout.parse("dp_shard=8"), hw, recompute=True, **kw)
    assert again.memory["activations"] < plain.memory["activations"] / 2
    assert again.phases["backward"] > plain.phases["backward"]  # the forward again, in the backward
    assert plain.fits == (plain.memory["total"] <= 0.9 * hw.hbm_bytes)


def test_traffic_of_the_planned_layout_without_counts_spreads_rows_evenly():
    config = Config.preset("bench-medium")
    layout = Layout.parse("dp_shard=4,ep=4")
    cols = [c for c in step_collectives(config, layout, 8, 256, 1, Itemsizes.of(4)) if c.kind == "Alltoallv"
            and c.group == "ep"]
    moe = sum(config.is_moe_layer(layer) for layer in range(config.num_hidden_layers))
    rows = 2 * 256 * config.num_experts_per_tok * 3 / 4  # m = 2 micro-batches, 3/4 of the rows leave
    assert sum(c.total_bytes for c in cols) == pytest.approx(moe * 4 * rows * 4 * config.hidden_size * 4)


def test_catalogue_figures_have_sources():
    for key, hw in CATALOGUE.items():
        assert hw.peak_flops > 1e14 and hw.hbm_bytes > 5e10 and hw.intra_node_bandwidth > hw.inter_node_bandwidth
        assert {"peak_flops", "hbm", "nvlink", "network"} <= set(hw.sources)
        assert get_hardware(key.upper()) is hw
    with pytest.raises(ValueError, match="unknown GPU 'a100'; the catalogue has h100, h200, b200, b300"):
        get_hardware("a100")


def test_every_fitting_layout_of_a_job_gets_a_prediction():
    config = Config.preset("bench-medium")
    for layout in fitting_layouts(world_size=8, config=config, seq_len=512, micro_batch_size=1, batch_sizes=[16]):
        p = predict(config, layout, get_hardware("b200"), seq_len=512, sequences=16, micro_batch_size=1)
        assert p.step_seconds > 0 and 0 < p.mfu < 1 and p.bound in p.phases


@given(st.sampled_from([1, 2, 4, 8]), st.lists(st.integers(0, 1000), min_size=8, max_size=8))
def test_the_busiest_rank_factor_lies_between_balance_and_one_rank_taking_all(ep, counts):
    from trinity.simulate.planning.routing import busiest_rank_factor
    f = busiest_rank_factor([{"1": counts}], ep)
    assert 1.0 - 1e-12 <= f <= ep + 1e-12
    if sum(counts):
        blocks = [sum(counts[i:i + 8 // ep]) for i in range(0, 8, 8 // ep)]
        assert f == pytest.approx(max(blocks) / (sum(blocks) / ep))
    assert busiest_rank_factor([{"1": [5] * 8}], ep) == pytest.approx(1.0)


# ---- overlap and latency, per collective (simulate/planning/overlap.py) ------------------------------------------
def test_each_collective_states_what_it_hides_under():
    from trinity.simulate.planning.overlap import rule
    blocking, posted = Layout.parse("dp_shard=4"), Layout.parse("dp_shard=4,async_reduce=true")
    assert rule("Iallgather", "fsdp", "forward").hides_under == "forward"
    assert rule("Iallgather", "efsdp", "backward").hides_under == "backward"
    assert rule("Reduce_scatter_block", "fsdp", "backward", blocking).hides_under is None  # the step waits
    assert rule("Reduce_scatter_block", "efsdp", "backward", posted).hides_under == "backward"
    assert rule("Allreduce", "dp_replicate", "reductions").hides_under is None  # once per step, after the backward
    assert rule("Allreduce", "dp_replicate", "backward").hides_under == "backward"  # bucketed into the backward
    for kind, group, phase in (("Alltoallv", "ep", "forward"), ("Alltoall", "ep", "forward"),
                               ("Alltoallv", "ep", "backward"), ("Allgather", "cp", "forward"),
                               ("Reduce_scatter_block", "cp", "backward"), ("Alltoallv", "cp", "forward"),
                               ("Alltoallv", "fsdp", "optimizer"), ("Allreduce", "world", "control")):
        assert rule(kind, group, phase).hides_under is None, (kind, group, phase)


@pytest.mark.parametrize("n", [2, 3, 8, 64, 1000])
def test_latency_steps_per_collective(n):
    """A ring pays n−1 steps, a tree 2⌈log₂n⌉, Bruck's all-to-all ⌈log₂n⌉, an Alltoallv one (its messages to every
    peer posted at once), not n−1 in sequence."""
    from trinity.simulate.planning.overlap import latency_steps, rule
    assert latency_steps(rule("Iallgather", "fsdp", "forward").latency, n) == n - 1
    assert latency_steps(rule("Allreduce", "world", "reductions").latency, n) == 2 * math.ceil(math.log2(n))
    assert latency_steps(rule("Alltoall", "ep", "forward").latency, n) == math.ceil(math.log2(n))
    assert latency_steps(rule("Alltoallv", "ep", "forward").latency, n) == 1
    assert latency_steps("direct", 1) == 0


def test_an_expert_all_to_all_pays_one_latency_per_call_at_any_group_size():
    config = Config.preset("bench-medium")
    for ep in (2, 4, 8, 16):
        cols = [c for c in step_collectives(config, Layout.parse(f"dp_shard=16,ep={ep}"), 16, 256, 1, Itemsizes.of(2))
                if (c.kind, c.group) == ("Alltoallv", "ep")]
        assert len(cols) == 1 and cols[0].latency_steps == cols[0].calls


def test_a_reduce_scatter_posted_early_hides_under_the_backward():
    """The same step with the reduce-scatters posted non-blocking (async_reduce) is never slower, and faster when
    they exceed nothing else; nothing changes on the host, where nothing overlaps."""
    config, hw = Config.preset("bench-medium"), get_hardware("h100")
    kw = dict(seq_len=1024, sequences=64, micro_batch_size=2)
    blocking = predict(config, Layout.parse("dp_shard=8"), hw, **kw)
    posted = predict(config, Layout.parse("dp_shard=8,async_reduce=true"), hw, **kw)
    assert posted.step_seconds < blocking.step_seconds
    assert posted.detail["hidable"]["backward"] > blocking.detail["hidable"]["backward"]
    assert predict(config, Layout.parse("dp_shard=8"), hw, overlap=False, **kw).step_seconds == pytest.approx(
        predict(config, Layout.parse("dp_shard=8,async_reduce=true"), hw, overlap=False, **kw).step_seconds)


def test_a_ring_across_nodes_uses_every_card_of_the_node():
    """An fsdp group of 16 ranks on two nodes of 8 moves its ring's bytes at min(NVLink, 8 × the card); an ep
    all-to-all of 16 sends the 8 of 15 peers' share off the node through the rank's own card."""
    from trinity.simulate.planning.cost_model import _collective_seconds, link_shape
    from trinity.simulate.planning.traffic_model import Collective
    hw = get_hardware("h100")
    layout = Layout.parse("dp_shard=16,ep=16")
    assert link_shape(layout, "fsdp", 8) == (8, 2) and link_shape(layout, "fsdp", 16) == (16, 1)
    nvlink, network = hw.link("intra-node")[0], hw.link("inter-node")[0]
    gather = Collective("Iallgather", "fsdp", 16, "fsdp", 0, 1e9, 1.6e10, "forward", "ring")
    assert _collective_seconds(gather, layout, hw) == pytest.approx(1e9 / min(nvlink, 8 * network))
    rows = Collective("Alltoallv", "ep", 16, "exchange", 0, 1e9, 1.6e10, None, "direct")
    assert _collective_seconds(rows, layout, hw) == pytest.approx(max(1e9 * 7 / 15 / nvlink, 1e9 * 8 / 15 / network))
