"""Plan = what runs: the parallel plan's collective schedule (trinity.distributed.schedule) is, collective by
collective, what the trainer calls on every rank, and it is what the cost model prices.

For every layout of the cluster tests (tests/test_layouts.py, tests/test_mpi_train.py, tests/test_simulate.py) and
more, up to 8 ranks, the trainer runs two steps on virtual ranks with every rank's mesh recording its collectives;
each rank's events of each step equal step_schedule(plan, rank, …) exactly: kind, group, bytes, phase and model
bucket, in order, with no band (a step that saves a checkpoint adds the checkpoint's collectives, which the schedule
leaves out; they are set aside by their phase, and only the last step has them).

The expert-parallel rows depend on the routing. The test takes it from outside the run under test: the same run file
trained in one process (the same model and data; every layout equals it to float64 rounding, tests/test_layouts.py)
gives, by a single-process forward of each step's global batch with that step's params, every token's chosen
experts; they are cut into each rank's rows, positions and micro-batches by the documented rule, written out here
(not the plan's code). Nothing is read from the distributed run but its trace.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from trinity.distributed.layout import Layout
from trinity.distributed.plan import ParallelPlan
from trinity.run.run_config import load_run_config
from trinity.distributed.schedule import Itemsizes, muon_sends, routing_counts, step_program, step_schedule
from trinity.run.trainer import Trainer
from trinity.reference.model.objective import evaluate_losses
from trinity.simulate.planning.traffic_model import step_collectives
from trinity.simulate.virtual.virtual_comm import VirtualCluster

T, B = 24, 1  # cp ≤ 4: chunks of T/(2·cp) ≥ 3 tokens hold the sliding layers' halo of w − 1 = 3
# the cluster tests' layouts, then more: a replica of one rank, cp = 3 and 4, a bucket padded over 3 and 6 ranks,
# ep = 8, ep within cp, every dimension at once with cp = 3
CLUSTER = ["dp_shard=4", "dp_replicate=2,dp_shard=2", "dp_shard=2,ep=2", "dp_shard=4,ep=4", "cp=2",
           "dp_replicate=2,dp_shard=2,cp=2,ep=4", "dp_replicate=2,cp=2,ep=2", "dp_replicate=2,dp_shard=2,cp=2,ep=2",
           "dp_shard=2,cp=2,ep=2", "dp_replicate=2,cp=2"]
MORE = ["dp_replicate=2", "cp=3", "cp=4", "dp_shard=3", "dp_replicate=2,dp_shard=3", "dp_shard=8,ep=8", "cp=2,ep=2",
        "dp_replicate=4,dp_shard=2,ep=2", "dp_shard=2,cp=3,ep=2"]
# cp_exchange=read (a global layer exchanges only the chunks each cp rank reads) at every layout above with cp > 1
READ = [text + ",cp_exchange=read" for text in CLUSTER + MORE if Layout.parse(text).cp > 1]

RUN = """
[model]
preset = "tiny"
dtype = "float64"
[model.overrides]
sliding_window = 4
global_attn_every_n_layers = 2
tie_word_embeddings = {tied}
[data]
path = "{data}"
eos_id = 0
seq_len = {T}
micro_batch_size = {B}
[train]
steps = 2
sequences_per_step = {sequences}
[optimizer]
muon_lr = 0.02
adamw_lr = 0.01
[schedule]
warmup_steps = 1
[loss]
intra_document_mask = true
balance_loss_coeff = 0.01
[checkpoint]
dir = "ckpt"
every = 1000
[logging]
metrics = "metrics.jsonl"
progress = false
"""


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource
    path = tmp_path_factory.mktemp("data") / "tokens.bin"
    write_token_file(path, MarkovSource(256, eos_id=0, branching=4, mean_doc_len=20, seed=0).documents(5000),
                     eos_id=0)
    return path


def _run(folder, data, sequences: int, tied: bool):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.toml").write_text(RUN.format(data=data, T=T, B=B, sequences=sequences, tied=str(tied).lower()))
    return load_run_config(folder / "run.toml")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    """(sequences, tied) → (config, [chosen experts {layer: [S, T, K]} of each step]) from the run in one process."""
    memo = {}

    def get(sequences: int, tied: bool):
        if (sequences, tied) not in memo:
            run = _run(tmp_path_factory.mktemp("single"), data, sequences, tied)
            trainer = Trainer(run, log=_quiet)
            read, seen = trainer.next_batch, []

            def recording(n):  # the step's batch, and the params it starts from
                batch = read(n)
                seen.append((batch, {k: np.array(v, copy=True) for k, v in trainer.params.items()}))
                return batch

            trainer.next_batch = recording
            trainer.train()
            chosen = []
            for batch, params in seen:
                _, stats = evaluate_losses(trainer.config, params, batch.tokens, batch.labels, batch.doc_ids)
                chosen.append({layer: s["chosen_experts"] for layer, s in stats["layers"].items()})
            memo[(sequences, tied)] = trainer.config, chosen
        return memo[(sequences, tied)]

    return get


def _cut(layout: Layout, chosen: dict, E: int) -> list:
    """counts[rank][mb][layer] by the documented rule: rank = (replica·dp_shard + shard)·cp + chunk; data-parallel
    rank q = replica·dp_shard + shard trains rows [q·S/dp, (q+1)·S/dp), cut into micro-batches of B in order; cp rank
    `chunk` holds chunks `chunk` and 2·cp−1−chunk of 2·cp equal chunks of each sequence."""
    S = next(iter(chosen.values())).shape[0]
    n, c = S // layout.dp, T // (2 * layout.cp)
    out = []
    for rank in range(layout.world_size):
        chunk, q = rank % layout.cp, rank // layout.cp
        cols = np.r_[chunk * c:(chunk + 1) * c, (2 * layout.cp - 1 - chunk) * c:(2 * layout.cp - chunk) * c]
        out.append([{layer: np.bincount(x[q * n + j * B:q * n + (j + 1) * B][:, cols].ravel(), minlength=E)
                     for layer, x in chosen.items()} for j in range(n // B)])
    return out


def _traced(run) -> list:
    """Every rank's recorded collectives of the run."""
    def rank(comm):
        trainer = Trainer(run, log=_quiet, comm=comm)
        trainer.mesh.record = True
        trainer.train()
        return list(trainer.mesh.events)

    return VirtualCluster(run.layout.world_size).run(rank)


def _check(tmp_path, data, single, text: str, recompute=False, tied=False, checksums=False):
    layout = Layout.parse(text)
    sequences = 2 * layout.dp * B
    config, chosen = single(sequences, tied)
    run = dataclasses.replace(_run(tmp_path / "ranks", data, sequences, tied), layout=layout, recompute=recompute,
                              checksums=checksums)
    events = _traced(run)
    plan = ParallelPlan(config, layout)
    for step, picked in enumerate(chosen, start=1):
        counts = _cut(layout, picked, config.num_experts)
        assert all(np.array_equal(a[mb][l], b[mb][l]) for a, b in zip(counts, routing_counts(plan, picked, B))
                   for mb in range(len(a)) for l in a[mb])
        for rank, rank_events in enumerate(events):
            got = [(e["phase"], e["layer"], e["kind"], e["group"], e["bytes"]) for e in rank_events
                   if e["step"] == step and e["phase"] != "checkpoint"]
            want = [tuple(s) for s in step_schedule(plan, rank, sequences, T, B, 8, recompute, True, counts,
                                                    checksums=checksums)]
            assert got == want, _difference(text, step, rank, got, want)
            saved = [e for e in rank_events if e["step"] == step and e["phase"] == "checkpoint"]
            assert bool(saved) == (step == len(chosen) and layout.world_size > 1)
    return events


def _difference(text, step, rank, got, want) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"{text}, step {step}, rank {rank}: collective {at} traced {got[at] if at < len(got) else None}, "
            f"scheduled {want[at] if at < len(want) else None} ({len(got)} traced, {len(want)} scheduled)")


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("text", CLUSTER + MORE + READ)
def test_every_rank_calls_exactly_the_plans_schedule(tmp_path, data, single, text, recompute):
    events = _check(tmp_path, data, single, text, recompute=recompute)
    kinds = {(e["kind"], e["group"]) for rank in events for e in rank}
    layout = Layout.parse(text)
    if layout.ep > 1:
        assert {("Alltoall", "ep"), ("Alltoallv", "ep")} <= kinds
    if layout.cp > 1:
        assert ("Allreduce", "cp") in kinds


@pytest.mark.parametrize("text", ["dp_shard=2,ep=2", "dp_replicate=2,dp_shard=2,cp=2,ep=2", "cp=3",
                                  "dp_shard=2,cp=2,ep=2,cp_exchange=read", "cp=3,cp_exchange=read"])
def test_tied_embeddings_and_checksums(tmp_path, data, single, text):
    """Tied embeddings gather embed three times per micro-batch (the head's forward and backward); message
    checksums add 4 bytes per block sent (their Alltoallv blocks depend on the routing)."""
    _check(tmp_path, data, single, text, recompute=True, tied=True, checksums=True)


# ---- schedule options (distributed/options.py): the schedule models each exactly ---------------------------------
OPTIONS = ["keep_gathered=all", "keep_gathered=experts", "keep_gathered=all,keep_gathered_gib=0.00002",
           "reshard_after_forward=none", "reshard_after_forward=dense", "reshard_after_forward=experts",
           "reduce_gradients=step", "async_reduce=true", "reduce_gradients=step,async_reduce=true",
           "gather_dtype=float32,reduce_dtype=float32",
           "keep_gathered=all,reshard_after_forward=none,reduce_gradients=step,async_reduce=true"]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("text", ["dp_shard=4", "dp_replicate=2,dp_shard=2,cp=2,ep=2"])
def test_every_schedule_option_is_traced_exactly_as_scheduled(tmp_path, data, single, text, options):
    events = _check(tmp_path, data, single, f"{text},{options}")
    kinds = {(e["kind"], e["group"]) for rank in events for e in rank}
    assert (("Ireduce_scatter_block", "fsdp") in kinds) == ("async_reduce=true" in options)
    assert (("Reduce_scatter_block", "fsdp") in kinds) == ("async_reduce=true" not in options)


@pytest.mark.parametrize("text, options", [
    ("dp_shard=2,ep=2", "keep_gathered=all,reshard_after_forward=none"),
    ("dp_replicate=2,dp_shard=2,cp=2,ep=2", "keep_gathered=experts,reshard_after_forward=dense,async_reduce=true"),
    ("cp=3", "keep_gathered=all,keep_gathered_gib=0.00002,reduce_gradients=step,gather_dtype=float32")])
def test_options_with_tied_embeddings_recompute_and_checksums(tmp_path, data, single, text, options):
    """The tied embedding is gathered for the head's forward and backward (kept between them under
    reshard_after_forward); checksums check a posted reduce-scatter at once."""
    _check(tmp_path, data, single, f"{text},{options}", recompute=True, tied=True, checksums=True)


def test_the_options_cut_the_gathers_and_reductions_as_stated():
    """Per step of m micro-batches over n ranks, with G the bytes one gather of every flat bucket sends and E the
    (untied) embedding's share: a micro-batch gathers every bucket twice (forward, backward) but the embedding once,
    m(2G − E), and reduce-scatters each once; keep_gathered=all gathers G once per step, reshard_after_forward=none
    mG, reduce_gradients=step reduce-scatters once per step; the dtype options scale the bytes."""
    from trinity.distributed.gathers import flat_refs
    from trinity.reference import Config
    config = Config.preset("tiny")
    m, n = 3, 4
    layout = Layout(dp_shard=n)
    G = sum((n - 1) * f.shard * 8 for f in flat_refs(config, layout))
    E = sum((n - 1) * f.shard * 8 for f in flat_refs(config, layout) if f.model_bucket == "embed")
    bytes_of = {}
    for options in ("", ",keep_gathered=all", ",reshard_after_forward=none", ",reduce_gradients=step",
                    ",gather_dtype=float32,reduce_dtype=float32"):
        plan = ParallelPlan(config, Layout.parse(f"dp_shard={n}{options}"))
        calls = step_schedule(plan, 0, m * n, 32, 1, 8)
        bytes_of[options] = {kind: sum(c.bytes for c in calls if c.kind == kind)
                             for kind in ("Iallgather", "Reduce_scatter_block")}
    base = bytes_of[""]
    assert base["Iallgather"] == m * (2 * G - E)
    assert bytes_of[",keep_gathered=all"] == {"Iallgather": G, "Reduce_scatter_block": base["Reduce_scatter_block"]}
    assert bytes_of[",reshard_after_forward=none"]["Iallgather"] == m * G
    assert bytes_of[",reduce_gradients=step"] == {"Iallgather": base["Iallgather"],
                                                  "Reduce_scatter_block": base["Reduce_scatter_block"] / m}
    assert bytes_of[",gather_dtype=float32,reduce_dtype=float32"] == {k: v / 2 for k, v in base.items()}


# ---- the cost model prices the schedule --------------------------------------------------------------------------
def _summed(plan, schedules, imbalance=1.0) -> dict:
    """{(kind, group): (calls per rank, busiest rank's bytes, every rank's bytes)} summed plainly over ranks."""
    per_rank = [{} for _ in schedules]
    for mine, calls in zip(per_rank, schedules):
        for s in calls:
            n, b = mine.get((s.kind, s.group), (0, 0))
            mine[(s.kind, s.group)] = (n + 1, b + s.bytes)
    out = {}
    for key in set().union(*per_rank):
        calls = {m[key][0] for m in per_rank}
        assert len(calls) == 1, key  # every rank calls every collective
        sent = [m[key][1] for m in per_rank]
        out[key] = (calls.pop(), max(sent) * (imbalance if key == ("Alltoallv", "ep") else 1), sum(sent))
    return out


def _priced(cols) -> dict:
    out = {}
    for c in cols:
        n, b, t = out.get((c.kind, c.group), (0, 0, 0))
        out[(c.kind, c.group)] = (n + c.calls, b + c.rank_bytes, t + c.total_bytes)
    return out


@pytest.mark.parametrize("text", ["dp_replicate=2,dp_shard=2,cp=2,ep=2", "dp_replicate=3,dp_shard=3", "cp=4",
                                  "dp_replicate=2,dp_shard=4,ep=4", "dp_shard=6,ep=2", "cp=4,cp_exchange=read",
                                  "dp_replicate=2,dp_shard=2,cp=2,ep=2,cp_exchange=read"])
@pytest.mark.parametrize("preset", ["tiny", "bench-medium"])
def test_the_cost_model_sums_every_ranks_schedule_without_visiting_every_rank(text, preset):
    """traffic_model.step_collectives equals the plain sum of step_schedule over every rank: calls, busiest rank and
    total per (kind, group), without counts (the planning assumption; with an imbalance on the busiest ep rank) and
    with drawn counts. Its planning path visits one replica's ranks only."""
    from trinity.reference import Config
    config, layout = Config.preset(preset), Layout.parse(text)
    plan, S, T_ = ParallelPlan(config, layout), 2 * layout.dp, 2 * layout.cp * config.sliding_window
    items = Itemsizes(gather=2, reduce=4, act=2)
    for recompute, imbalance in ((False, 1.0), (True, 1.25)):
        plain = _summed(plan, [step_schedule(plan, r, S, T_, 1, items, recompute) for r in range(plan.world_size)],
                        imbalance)
        priced = _priced(step_collectives(config, layout, S, T_, 1, items, recompute=recompute, imbalance=imbalance))
        assert set(plain) == set(priced)
        for key in plain:
            assert plain[key][0] == priced[key][0] and plain[key][1:] == pytest.approx(priced[key][1:], rel=1e-12), key
    rng = np.random.default_rng(0)
    moe = [l for l in range(config.num_hidden_layers) if config.is_moe_layer(l)]
    counts = [[{l: rng.integers(0, 9, config.num_experts) * (rng.random(config.num_experts) < 0.7) for l in moe}
               for _ in range(2)] for _ in range(plan.world_size)]
    plain = _summed(plan, [step_schedule(plan, r, S, T_, 1, items, False, True, counts, checksums=True)
                           for r in range(plan.world_size)])
    priced = _priced(step_collectives(config, layout, S, T_, 1, items, counts, checksums=True))
    assert plain == priced


def test_routing_counts_move_the_expert_rows_and_only_them():
    """A rank that keeps all its rows for its own experts sends no routed row; the rows it receives still go back."""
    from trinity.reference import Config
    config, layout = Config.preset("tiny"), Layout.parse("dp_shard=2,ep=2")
    plan, E = ParallelPlan(config, layout), config.num_experts
    moe = [l for l in range(config.num_hidden_layers) if config.is_moe_layer(l)]
    home = np.where(np.arange(E) < E // 2, 5, 0)  # rank 0's experts are the first half
    away = np.full(E, 1)
    counts = [[{l: home for l in moe}], [{l: away for l in moe}]]
    rows = {r: [s.bytes for s in step_schedule(plan, r, 2, 16, 1, 8, counts=counts) if s.kind == "Alltoallv"
                and s.group == "ep"] for r in (0, 1)}
    d = config.hidden_size * 8
    # per MoE layer: dispatch, combine (forward), then the combine's and the dispatch's backward
    assert rows[0] == [0, 4 * d, 0, 4 * d] * len(moe)  # rank 0 sends nothing; returns rank 1's 4 rows
    assert rows[1] == [4 * d, 0, 4 * d, 0] * len(moe)  # rank 1 sends 4 rows to rank 0, gets none to send back


def test_muon_sends_are_the_elements_outside_their_owners_shard():
    """Alltoallv #1 sends each element of a matrix held by another rank than its owner once, #2 sends it back: by
    element, from the owner rule (plan.owners_of) and the shards [i·⌈z/n⌉, (i+1)·⌈z/n⌉)."""
    from trinity.distributed.plan import owners_of
    rng = np.random.default_rng(1)
    for _ in range(30):
        shapes = tuple((int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 9))) if rng.random() < 0.3
                       else (int(rng.integers(1, 12)), int(rng.integers(1, 12))) for _ in range(rng.integers(1, 6)))
        n = int(rng.integers(2, 7))
        owner = np.concatenate([np.full(hi - lo, o) for lo, hi, o, _ in owners_of(shapes, n)])
        holder = np.arange(owner.size) // -(-owner.size // n)
        moved = owner != holder
        first, second, blocks1, blocks2 = muon_sends(shapes, n, True)
        assert first.tolist() == np.bincount(holder[moved], minlength=n).tolist()
        assert second.tolist() == np.bincount(owner[moved], minlength=n).tolist()
        pairs = set(zip(holder[moved].tolist(), owner[moved].tolist()))
        assert blocks1.tolist() == [sum(h == i for h, _ in pairs) for i in range(n)]
        assert blocks2.tolist() == [sum(o == i for _, o in pairs) for i in range(n)]


def test_the_schedule_refuses_what_no_step_can_run_in_one_line():
    from trinity.reference import Config
    config = Config.preset("tiny")
    plan = ParallelPlan(config, Layout.parse("dp_shard=2,cp=2,ep=2"))
    for args, kwargs, message in (
            ((4, 4, 128, 1, 8), {}, "rank 4 is not one of the 4 ranks"),
            ((0, 3, 64, 1, 8), {}, "3 sequences per step do not split into micro-batches of 1 on 2 data-parallel"),
            ((0, 4, 62, 1, 8), {}, "seq_len 62 does not split into 2·cp = 4 chunks"),
            ((0, 4, 40, 1, 8), {}, "layer 0: sliding window 32 needs 31 preceding tokens but a cp chunk holds"),
            ((0, 4, 128, 1, 8), {"counts": [[]] * 4}, "counts must hold 2 micro-batches for each of the 4 ranks")):
        with pytest.raises(ValueError, match=message) as e:
            step_schedule(plan, *args, **kwargs)
        assert "\n" not in str(e.value)


def test_a_micro_batch_is_one_block_repeated_and_only_the_routed_rows_tell_micro_batches_apart():
    """Without counts the step is its micro-batch's block m times and the step's end; with counts one block per
    micro-batch, which differ only in the expert-parallel Alltoallv bytes."""
    from trinity.reference import Config
    config = Config.preset("tiny")
    plan = ParallelPlan(config, Layout.parse("dp_shard=2,ep=2"))
    program = step_program(plan, 6, 32, 1, 4)
    assert [times for _, times in program.blocks] == [3, 1] and program.micro_batches == 3
    moe = [l for l in range(config.num_hidden_layers) if config.is_moe_layer(l)]
    counts = [[{l: np.arange(8) * (mb + 1) for l in moe} for mb in range(3)] for _ in range(2)]
    blocks = step_program(plan, 6, 32, 1, 4, counts=counts).blocks
    assert [times for _, times in blocks] == [1, 1, 1, 1]
    for a, b in itertools.combinations([calls for calls, _ in blocks[:3]], 2):
        assert [(x.phase, x.layer, x.kind, x.group) for x in a] == [(x.phase, x.layer, x.kind, x.group) for x in b]
        assert {x.kind for x, y in zip(a, b) if x.nbytes is not y.nbytes and not np.array_equal(
            getattr(x.nbytes, "values", x.nbytes), getattr(y.nbytes, "values", y.nbytes))} == {"Alltoallv"}
