"""The parallel layout (trinity.distributed.layout): its text form, the rules `Layout.check` enforces (each refusal
names why and lists only layouts that really pass), `fitting_layouts` against a brute force over every layout, the
run file's [parallel] section and `trinity train --mesh`.

The rules are stated once, in `Layout.problems`; the brute force asks it too, so it checks that `fitting_layouts`
finds every fitting layout, in order, and nothing else. What pins each rule: the examples of
test_each_rule_is_refused_with_the_layouts_that_fit (one per rule) and, for the window rule, what context parallel
really runs (test_the_window_rule_is_what_context_parallel_runs: a layout that passes gives the single-process
losses on a virtual cluster, one refused is refused by context parallel too)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st
from strategies import min_topk_gap, random_params
from test_context_parallel import cp_loss_and_grads
from test_user_errors import render

from trinity.cli.main import build_parser, main
from trinity.distributed.options import CHOICES, ParallelOptions
from trinity.distributed.layout import DIMS, Layout, LayoutError, fitting_layouts
from trinity.run.run_config import RunConfigError, load_run_config
from trinity.reference import loss_and_grads, model_forward
from trinity.reference.model.config import SLIDING, Config
from trinity.simulate.virtual.virtual_comm import RankFailed

TINY = Config.preset("tiny")  # 8 experts, sliding window 32 on its sliding layers
FULL_ONLY = TINY.replace(layer_types=("full_attention",) * TINY.num_hidden_layers)


def job(world_size=4, config=TINY, seq_len=64, micro_batch_size=2, batch_sizes=(16,)):
    return dict(world_size=world_size, config=config, seq_len=seq_len, micro_batch_size=micro_batch_size,
                batch_sizes=list(batch_sizes))


def passes(layout: Layout, **job) -> bool:
    try:
        layout.check(**job)
        return True
    except LayoutError:
        return False


def rules_hold(layout: Layout, **job) -> bool:
    """The rules, from their one statement (`Layout.problems`; see the module docstring for what pins each rule)."""
    return not layout.problems(**job)


def brute_force(**job) -> set[Layout]:
    """Every layout of at most world_size in each dimension that the rules allow."""
    n = job["world_size"]
    return {Layout(*dims) for dims in itertools.product(range(1, n + 1), repeat=4) if rules_hold(Layout(*dims), **job)}


def listed(message: str) -> list[Layout]:
    """The layouts a refusal lists after "layouts that fit: " (the "... (N in all)" tail left out)."""
    assert "\n" not in message
    if "layouts that fit: " not in message:
        return []
    tail = message.split("layouts that fit: ", 1)[1]
    return [Layout.parse(part) for part in tail.split("; ") if not part.startswith("...")]


# ---- the text form --------------------------------------------------------------------------------------------
options = st.builds(ParallelOptions, **{name: st.sampled_from(values) for name, values in CHOICES.items()},
                    keep_gathered_gib=st.sampled_from([0.0, 0.5, 2.0, 1e3]), async_reduce=st.booleans())
layouts = st.builds(Layout, *[st.integers(1, 64)] * 4, options=st.one_of(st.just(ParallelOptions()), options))


@given(layouts)
def test_parse_round_trips(layout):
    assert Layout.parse(str(layout)) == layout
    assert str(Layout.parse(str(layout))) == str(layout)


@given(layouts, st.permutations(DIMS), st.lists(st.sampled_from(["", " ", "  "]), min_size=16, max_size=16),
       st.booleans())
def test_parse_takes_any_order_spaces_and_explicit_ones(layout, order, spaces, explicit):
    pad = iter(spaces)
    parts = [f"{next(pad)}{name}{next(pad)}={next(pad)}{getattr(layout, name)}{next(pad)}" for name in order
             if explicit or getattr(layout, name) != 1]
    assert Layout.parse(",".join(parts) or "single") == layout.sizes
    options = layout.options.text().split(",") if layout.options.text() else []  # options mixed in anywhere
    assert Layout.parse(",".join(options[::-1] + parts) or "single") == layout


def test_options_in_the_text_and_over_a_run_files():
    layout = Layout.parse("dp_shard=4,ep=4,keep_gathered=all,reduce_gradients=step")
    assert layout.options == ParallelOptions(keep_gathered="all", reduce_gradients="step")
    assert str(layout) == "dp_shard=4,ep=4,keep_gathered=all,reduce_gradients=step" and layout.sizes == Layout(1, 4, 1, 4)
    base = ParallelOptions(keep_gathered="experts", async_reduce=True)
    over = Layout.parse("cp=2,keep_gathered=none", options=base)  # --mesh over a run file's options
    assert over.options == ParallelOptions(keep_gathered="none", async_reduce=True) and over.cp == 2
    assert Layout.parse("single,keep_gathered_gib=2.5").options.keep_gathered_gib == 2.5
    for text, bad in (("dp_shard=2,keep_gathered=some", "keep_gathered = 'some'"),
                      ("dp_shard=2,async_reduce=yes", "async_reduce=yes"),
                      ("dp_shard=2,keep_gathered_gib=-1", "keep_gathered_gib"),
                      ("dp_shard=2,muon_owners=local,muon_owners=local", "given twice")):
        with pytest.raises(LayoutError, match=re.escape(bad)):
            Layout.parse(text)


def test_text_form_examples():
    assert str(Layout()) == "single" and Layout.parse(" single ") == Layout()
    assert str(Layout(dp_shard=2, ep=2)) == "dp_shard=2,ep=2"
    assert str(Layout(2, 2, 1, 1)) == "dp_replicate=2,dp_shard=2"
    assert Layout.parse("ep=2, dp_shard = 4") == Layout(dp_shard=4, ep=2)
    assert Layout(2, 3, 5, 7).world_size == 30 and Layout(2, 3, 5, 7).dp == 6
    assert Layout(dp_shard=4, ep=4).world_size == 4  # ep borrows its ranks


@pytest.mark.parametrize("text, bad", [
    ("dp_shrd=2", "unknown dimension 'dp_shrd'"), ("tp=2", "unknown dimension 'tp'"),
    ("dp_shard=2,dp_shard=2", "dp_shard given twice"), ("ep=0", "ep=0: the size must be a positive integer"),
    ("cp=-1", "cp=-1: the size"), ("ep=1.5", "ep=1.5: the size"), ("ep=two", "ep=two: the size"),
    ("ep=", "ep=: the size"), ("ep", "'ep' is not name=size"), ("=2", "'=2' is not name=size"),
    ("dp_shard=2,", "'' is not name=size"), ("", "'' is not name=size"), ("single,ep=2", "'single' is not"),
    ("dp_shard=2\nep=2", "dp_shard=2 ep=2: the size"),
])
def test_parse_refuses_bad_text_naming_the_part_and_the_names(text, bad):
    with pytest.raises(LayoutError) as e:
        Layout.parse(text)
    message = str(e.value)
    assert "\n" not in message and bad in message, message
    assert "dp_replicate, dp_shard, cp, ep" in message


@pytest.mark.parametrize("value", [0, -1, 1.0, True, "2", None])
def test_layout_refuses_sizes_that_are_not_positive_integers(value):
    with pytest.raises(LayoutError, match=r"^ep = .*: must be a positive integer$"):
        Layout(ep=value)


# ---- the rules ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout, changes, why", [
    ("dp_shard=3", {}, r"dp_replicate·dp_shard·cp = 3, but the job has 4 ranks"),
    ("dp_replicate=2,dp_shard=4", {}, r"dp_replicate·dp_shard·cp = 8, but the job has 4 ranks"),
    ("dp_replicate=4,ep=2", {}, r"ep = 2 does not divide dp_shard·cp = 1"),
    ("dp_shard=4,ep=4", dict(config=TINY.replace(num_experts=6)), r"ep = 4 does not divide num_experts = 6"),
    ("dp_shard=4", dict(batch_sizes=(16, 12), seq_len=128),
     r"sequences per step 12 not divisible by dp·micro_batch_size = 4·2 = 8"),
    ("dp_replicate=2,dp_shard=2", dict(micro_batch_size=3, batch_sizes=(12, 24, 18), seq_len=128),
     r"sequences per step 18 not divisible by dp·micro_batch_size = 4·3 = 12"),
    ("dp_shard=2,cp=2", dict(seq_len=66), r"seq_len = 66 not divisible by 2·cp = 4"),
    ("cp=4", dict(seq_len=64), r"sliding window 32 needs 31 preceding tokens but a cp chunk holds "
                               r"seq_len/\(2·cp\) = 8"),
])
def test_each_rule_is_refused_with_the_layouts_that_fit(layout, changes, why):
    the_job = job(**changes)
    layout = Layout.parse(layout)
    with pytest.raises(LayoutError) as e:
        layout.check(**the_job)
    message = str(e.value)
    assert message.startswith(f"layout {layout}: ") and re.search(why, message), message
    fits = listed(message)
    assert fits and all(passes(x, **the_job) for x in fits), message
    assert fits == fitting_layouts(**the_job)[:len(fits)]


def test_the_halo_rule_is_about_sliding_windows_only():
    assert passes(Layout(cp=4), **job(config=FULL_ONLY))  # no sliding layer: any chunk length works
    assert passes(Layout(cp=2), **job(world_size=2, seq_len=124))  # chunk 31 = w - 1: the halo just fits
    assert not passes(Layout(cp=2), **job(world_size=2, seq_len=120))  # chunk 30 < 31
    # a window of at least seq_len is causal attention over the whole sequence, gathered like a global layer's
    # (issue 18: seq_len 8, window 8, cp 2 has chunks of 2 and fits)
    window_8 = job(world_size=2, config=TINY.replace(num_experts=2, sliding_window=8), seq_len=8,
                   micro_batch_size=1, batch_sizes=[1])
    assert [str(x) for x in fitting_layouts(**window_8)] == ["cp=2", "cp=2,ep=2"]
    assert not passes(Layout(cp=2), **dict(window_8, config=window_8["config"].replace(sliding_window=7)))
    assert passes(Layout(cp=2), **dict(window_8, config=window_8["config"].replace(sliding_window=3)))  # 2 = w - 1


def sliding_config(window: int, seq_len: int) -> Config:
    """A small model whose every attention layer slides with `window` (a dense layer, then a MoE layer)."""
    return Config(vocab_size=16, hidden_size=8, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=2,
                  num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=2,
                  num_experts_per_tok=1, sliding_window=window, layer_types=(SLIDING, SLIDING),
                  max_position_embeddings=max(seq_len, window, 8))


@st.composite
def cp_window_cases(draw):
    """(cp, seq_len, window): windows around the halo limit (chunk + 1) and around seq_len, or anywhere up to it."""
    cp, chunk = draw(st.integers(2, 4)), draw(st.integers(1, 4))
    seq_len = 2 * cp * chunk
    near = [chunk, chunk + 1, chunk + 2, seq_len - 1, seq_len, seq_len + 1]
    window = draw(st.one_of(st.sampled_from([w for w in near if w >= 1]), st.integers(1, seq_len + 2)))
    return cp, seq_len, window


@given(cp_window_cases(), st.integers(0, 2**32 - 1))
def test_the_window_rule_is_what_context_parallel_runs(case, seed):
    """The window rule against its ground truth, context parallel itself on a virtual cluster of cp ranks: where
    `check` passes Layout(cp=cp), the ranks' loss shares add up to the single-process loss (so every query saw
    exactly the keys of its window); where it refuses, context parallel refuses the window too."""
    cp, seq_len, window = case
    config = sliding_config(window, seq_len)
    fits = passes(Layout(cp=cp), **job(world_size=cp, config=config, seq_len=seq_len, micro_batch_size=1,
                                       batch_sizes=[1]))
    event("fits" if fits else "refused")
    event("window >= seq_len" if window >= seq_len else "window < seq_len")
    params = random_params(config, seed)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (1, seq_len))
    _, ctx = model_forward(config, params, tokens, None)
    assume(min_topk_gap(config, params, ctx) > 1e-9)  # rounding must not flip a top-k choice
    if not fits:
        with pytest.raises(RankFailed, match=r"ValueError: .*sliding window"):
            cp_loss_and_grads(cp, config, params, tokens, tokens, None)
        return
    want, _, _ = loss_and_grads(config, params, tokens, tokens)
    ranks = cp_loss_and_grads(cp, config, params, tokens, tokens, None)
    np.testing.assert_allclose(sum(losses["total"] for losses, *_ in ranks), want["total"], rtol=1e-12, atol=1e-15)


def test_nothing_fits():
    the_job = job(world_size=3, batch_sizes=(2,), micro_batch_size=2, seq_len=16)  # dp 3 can't split 2; cp 3 no
    assert fitting_layouts(**the_job) == []
    with pytest.raises(LayoutError, match=r"^layout dp_shard=3: .*; no layout of 3 ranks fits"):
        Layout(dp_shard=3).check(**the_job)


def test_a_long_list_is_cut():
    the_job = job(world_size=16, batch_sizes=(64,), micro_batch_size=1, seq_len=1024, config=FULL_ONLY)
    fits = fitting_layouts(**the_job)
    assert len(fits) > 8
    with pytest.raises(LayoutError) as e:
        Layout(dp_shard=3).check(**the_job)
    assert listed(str(e.value)) == fits[:8] and str(e.value).endswith(f"; ... ({len(fits)} in all)")


def test_fitting_layouts_example_order():
    assert [str(x) for x in fitting_layouts(**job())] == [
        "dp_shard=4", "dp_replicate=4", "dp_shard=4,ep=2", "dp_shard=4,ep=4", "dp_replicate=2,dp_shard=2",
        "dp_replicate=2,dp_shard=2,ep=2"]
    assert fitting_layouts(**job(world_size=1)) == [Layout()]


jobs = st.fixed_dictionaries(dict(
    world_size=st.integers(1, 12),
    config=st.builds(lambda experts, window, full: (FULL_ONLY if full else TINY).replace(
        num_experts=experts, sliding_window=window), st.sampled_from([2, 3, 4, 6, 8, 12, 16]), st.integers(1, 40),
        st.booleans()),
    seq_len=st.sampled_from([8, 16, 24, 30, 48, 64, 96, 128]),
    micro_batch_size=st.integers(1, 4),
    batch_sizes=st.lists(st.sampled_from([1, 2, 4, 6, 8, 12, 16, 24, 32, 48]), min_size=1, max_size=3)))


@given(jobs, st.builds(Layout, *[st.integers(1, 12)] * 4))
def test_check_and_fitting_layouts_agree_with_the_rules(the_job, layout):
    fits = fitting_layouts(**the_job)
    assert set(fits) == brute_force(**the_job)  # complete, and nothing that breaks a rule
    assert len(fits) == len(set(fits))
    key = [(sum(getattr(x, n) != 1 for n in DIMS), -x.dp_shard, x.cp, x.ep) for x in fits]
    assert key == sorted(key)  # simplest first, as documented
    if rules_hold(layout, **the_job):
        layout.check(**the_job)
        assert layout in fits
    else:
        with pytest.raises(LayoutError) as e:
            layout.check(**the_job)
        assert listed(str(e.value)) == fits[:8]
        assert all(passes(x, **the_job) for x in listed(str(e.value)))


# ---- [parallel] in the run file -------------------------------------------------------------------------------
def load(tmp_path, changes=None, extra=None, drop_parallel=False):
    text = render(changes, extra)
    if drop_parallel:
        text = text.split("[parallel]")[0]
    (tmp_path / "run.toml").write_text(text)
    return load_run_config(tmp_path / "run.toml")


def test_parallel_section(tmp_path):
    assert load(tmp_path, drop_parallel=True).layout == Layout()  # the section is optional
    assert load(tmp_path).layout == Layout()
    run = load(tmp_path, {("parallel", "dp_shard"): "4", ("parallel", "ep"): "2", ("parallel", "cp"): None})
    assert run.layout == Layout(dp_shard=4, ep=2) and not run.checksums  # checksums are off by default
    assert load(tmp_path, extra={"parallel": ["checksums = true"]}).checksums
    with pytest.raises(RunConfigError, match=r"^\[parallel\] checksums = 1: must be true or false$"):
        load(tmp_path, extra={"parallel": ["checksums = 1"]})
    assert run.batch_sizes == [2]
    run = load(tmp_path, {("train", "sequences_per_step"): "4"}, extra={"train": ["batch_schedule = [[100, 8]]"]})
    assert run.batch_sizes == [4, 8]


@pytest.mark.parametrize("key, value, message", [
    ("cp", "0", "[parallel] cp = 0: must be a positive integer"),
    ("ep", "-1", "[parallel] ep = -1: must be a positive integer"),
    ("dp_shard", "1.5", "[parallel] dp_shard = 1.5: must be a positive integer"),
    ("dp_replicate", '"2"', "[parallel] dp_replicate = '2': must be a positive integer"),
    ("dp_replicate", "true", "[parallel] dp_replicate = True: must be a positive integer"),
])
def test_parallel_section_bad_values(tmp_path, key, value, message):
    with pytest.raises(RunConfigError) as e:
        load(tmp_path, {("parallel", key): value})
    assert str(e.value) == message


def test_parallel_section_unknown_key(tmp_path):
    with pytest.raises(RunConfigError) as e:
        load(tmp_path, extra={"parallel": ["tp = 2"]})
    assert str(e.value) == ("[parallel] unknown key(s): tp; expected dp_replicate, dp_shard, cp, ep, checksums, "
                            "watchdog_seconds, keep_gathered, keep_gathered_gib, reshard_after_forward, "
                            "reduce_gradients, muon_owners, cp_exchange, gather_dtype, reduce_dtype, async_reduce")
    for line, bad in (('keep_gathered = "some"', "[parallel] keep_gathered = 'some': must be one of"),
                      ("async_reduce = 1", "[parallel] async_reduce = 1: must be true or false"),
                      ("keep_gathered_gib = -2", "[parallel] keep_gathered_gib = -2.0: must be a number")):
        with pytest.raises(RunConfigError) as e:
            load(tmp_path, extra={"parallel": [line]})
        assert str(e.value).startswith(bad), str(e.value)
    loaded = load(tmp_path, extra={"parallel": ['keep_gathered = "experts"', "keep_gathered_gib = 3"]}).layout.options
    assert (loaded.keep_gathered, loaded.keep_gathered_gib) == ("experts", 3.0)
    (tmp_path / "run.toml").write_text("parallel = 2\n" + render().split("[parallel]")[0])
    with pytest.raises(RunConfigError, match=r"^\[parallel\] must be a table$"):
        load_run_config(tmp_path / "run.toml")


# ---- trinity train --mesh -------------------------------------------------------------------------------------
def test_mesh_option_parses():
    args = build_parser().parse_args(["train", "run.toml", "--mesh", "dp_shard=2,ep=2"])
    assert args.mesh == "dp_shard=2,ep=2" and Layout.parse(args.mesh) == Layout(dp_shard=2, ep=2)
    assert build_parser().parse_args(["train", "run.toml"]).mesh is None


class FakeTrainer:
    """Stands in for the trainer: records the RunConfig the CLI built; `fail` is raised by train()."""
    seen, fail = [], None

    def __init__(self, run_config, resume=False, restart=False, comm=None):
        FakeTrainer.seen.append(run_config)
        self.stopped_by = None

    def train(self):
        if FakeTrainer.fail is not None:
            raise FakeTrainer.fail
        return None


@pytest.fixture
def fake_trainer(monkeypatch):
    import trinity.run.trainer as trainer

    monkeypatch.setattr(trainer, "Trainer", FakeTrainer)
    FakeTrainer.seen, FakeTrainer.fail = [], None
    return FakeTrainer


def test_mesh_overrides_the_parallel_section(tmp_path, capsys, fake_trainer):
    path = tmp_path / "run.toml"
    path.write_text(render({("parallel", "dp_shard"): "4"}))
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path), "--mesh", " ep=2 , dp_shard=2, dp_replicate=2"]) == 0
    assert main(["train", str(path), "--mesh", "single"]) == 0
    assert [run.layout for run in fake_trainer.seen] == [Layout(dp_shard=4), Layout(2, 2, 1, 2), Layout()]


def test_bad_mesh_and_refused_layouts_are_one_line(tmp_path, capsys, fake_trainer):
    path = tmp_path / "run.toml"
    path.write_text(render())
    capsys.readouterr()
    assert main(["train", str(path), "--mesh", "dp_shard=2,tp=2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("trinity train: error: --mesh: layout 'dp_shard=2,tp=2': unknown "
                                               "dimension 'tp'"), err
    assert fake_trainer.seen == []  # refused before the run file is used
    # a layout the trainer's check refuses is one line too, status 2
    fake_trainer.fail = LayoutError("layout dp_shard=3: dp_replicate·dp_shard·cp = 3, but the job has 1 ranks; "
                                    "layouts that fit: single")
    assert main(["train", str(path), "--mesh", "dp_shard=3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["trinity train: error: layout dp_shard=3: dp_replicate·dp_shard·cp = 3, but the job has 1 ranks; "
                   "layouts that fit: single"]
