"""`trinity plan` takes bad input like `trinity train` does (issue 18): NaN, infinity and out-of-range numbers, sizes
beyond the planner's limits, output paths that cannot be written: one line, exit status 2, before any work. A search
of up to a million GPUs examines a bounded number of layouts (benchmarks/plan_inputs_speed.py times it), and one that
would take minutes is refused before any prediction."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trinity.cli.main import main
from trinity.distributed.layout import Layout, fitting_layouts
from trinity.reference import Config
from trinity.simulate.planning import planner
from trinity.simulate.planning.hardware import get_hardware

BASE = {"--model": "tiny", "--gpus": "8", "--gpu": "h100", "--tokens": "1e9"}


def _plan(capsys, changes: dict):
    args = {**BASE, **changes}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # argparse's refusals exit; ours return the status
        sys.exit(main(["plan", *[f"{k}={v}" for k, v in args.items()]]))  # --x=-1 is a value, not an option
    return stop.value.code, capsys.readouterr()


BAD = [
    ({"--tokens": "nan"}, "--tokens: 'nan': must be a finite number"),
    ({"--tokens": "inf"}, "--tokens: 'inf': must be a finite number"),
    ({"--tokens": "-1e9"}, "--tokens: '-1e9': must be above 0"),
    ({"--tokens": "0"}, "--tokens: '0': must be above 0"),
    ({"--max-vio": "nan"}, "--max-vio: 'nan': must be a finite number"),
    ({"--max-vio": "-inf"}, "--max-vio: '-inf': must be a finite number"),
    ({"--max-vio": "-0.5"}, "--max-vio: '-0.5': must be at least 0"),
    ({"--gpus": "1000001"}, "--gpus: '1000001': must be from 1 to 1,000,000"),
    ({"--gpus": "10000000"}, "--gpus: '10000000': must be from 1 to 1,000,000"),
    ({"--gpus": "-8"}, "--gpus: '-8': must be from 1"),
    ({"--gpus": "8.5"}, "--gpus: '8.5' is not a whole number"),
    ({"--seq-len": "10000000000"}, "--seq-len: '10000000000': must be from 1 to 262,144"),
    ({"--seq-len": "131072"}, "--seq-len 131,072: exceeds max_position_embeddings 65,536 of tiny"),
    ({"--seq-len": "0"}, "--seq-len: '0': must be from 1"),
    ({"--ranks-per-node": "0"}, "--ranks-per-node: '0': must be from 1"),
    ({"--top": "0"}, "--top: '0': must be at least 1"),
    ({"--batch": "64,128@nan"}, "'128@nan': the token count must be a finite number"),
    ({"--batch": "64,128@inf"}, "'128@inf': the token count must be a finite number"),
    ({"--batch": "100000000"}, "batch size 100,000,000: the planner takes 1 to 10,000,000 sequences per step"),
    ({"--gpus": "720720", "--batch": "720720"}, "more than 20,000 layouts to examine; narrow the search with --fix"),
    ({"--json": "{d}/no/such/folder/plan.json"}, "--json {d}/no/such/folder/plan.json: the folder"),
    ({"--png": "{d}"}, "--png {d}: is a folder"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[" ".join(f"{k} {v}" for k, v in c.items()) for c, _ in BAD])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, changes, message):
    def predicted(*args, **kwargs):
        raise AssertionError("a layout was predicted before the input was checked")

    monkeypatch.setattr(planner, "predict", predicted)
    code, out = _plan(capsys, {k: v.format(d=tmp_path) for k, v in changes.items()})
    err = out.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.out, (code, out)
    assert err[0].startswith("trinity plan: error: ") and message.format(d=tmp_path) in err[0], err
    assert list(tmp_path.iterdir()) == []  # no output was written


def test_a_search_that_would_take_minutes_is_refused_before_any_prediction(monkeypatch):
    """Trinity Large at its full context on 2,048 GPUs has thousands of choices: refused, naming the limit."""
    calls = []
    monkeypatch.setattr(planner, "predict", lambda *a, **k: calls.append(1))
    with pytest.raises(planner.SearchTooLarge, match="predictions .* more than the limit of 3,000; narrow"):
        planner.search(Config.preset("trinity-large"), gpus=2048, hardware=get_hardware("b300"), seq_len=262144,
                       batches=[(0, 12288), (4.9e12, 16384)], tokens=17e12, micro_batches=(1, 2, 3, 4, 6, 8, 12, 16))
    assert calls == []


@pytest.mark.parametrize("gpus", [1_000_000, 720_720, 2 ** 19, 999_983])
def test_a_million_gpus_examine_few_layouts(monkeypatch, gpus):
    """Every layout the planner tests against the rules costs time: for worlds of up to a million ranks (720,720 has
    240 divisors, 999,983 is prime) the default batch schedule leaves at most a few thousand to test. (Before: every layout
    of the world, 156,800 tests for a million GPUs, and 45 s.)"""
    tested = []
    problems = Layout.problems

    def counted(self, **job):
        tested.append(self)
        assert len(tested) <= 5_000, "the planner tests every layout of the world against the rules"
        return problems(self, **job)

    monkeypatch.setattr(Layout, "problems", counted)
    plan = planner.search(Config.preset("trinity-large"), gpus=gpus, hardware=get_hardware("b300"), seq_len=8192,
                          batches=[(0, 12288), (4.9e12, 16384)], tokens=17e12,
                          micro_batches=(1, 2, 3, 4, 6, 8, 12, 16))
    for cand in plan.ranked + plan.rejected:  # what it found still follows every rule
        assert not problems(cand.first.layout, world_size=gpus, config=Config.preset("trinity-large"), seq_len=8192,
                            micro_batch_size=cand.first.micro_batch_size, batch_sizes=[12288, 16384])


@given(world=st.integers(1, 96), experts=st.sampled_from([1, 2, 4, 6, 8, 16]), window=st.sampled_from([4, 8, 64]),
       seq_len=st.sampled_from([8, 16, 24, 64]), mbs=st.integers(1, 4),
       sizes=st.lists(st.integers(1, 96), min_size=1, max_size=3),
       fixed=st.dictionaries(st.sampled_from(["dp_replicate", "dp_shard", "cp", "ep"]), st.sampled_from([1, 2, 4]),
                             max_size=2))
def test_the_planners_layouts_are_fitting_layouts(world, experts, window, seq_len, mbs, sizes, fixed):
    """The planner's enumeration (from the batch and expert rules, then Layout.problems) finds exactly
    fitting_layouts' list, in its order, restricted to the fixed sizes."""
    config = Config.preset("tiny").replace(num_experts=experts, num_experts_per_tok=1, sliding_window=window)
    want = [x for x in fitting_layouts(world_size=world, config=config, seq_len=seq_len, micro_batch_size=mbs,
                                       batch_sizes=sizes) if all(getattr(x, d) == v for d, v in fixed.items())]
    got = planner.layouts_to_plan(gpus=world, config=config, seq_len=seq_len, micro_batch_size=mbs,
                                  batch_sizes=sizes, fixed=fixed)
    assert got == want


def test_plan_options_price_every_layout_with_them(capsys):
    """--options gives every candidate layout the schedule options, which the schedule (and so the price) follows:
    gradients reduced once per step and parameters kept gathered move fewer bytes than the default schedule."""
    from trinity.cli.main import main
    from trinity.simulate.planning.hardware import get_hardware
    from trinity.simulate.planning.planner import search
    from trinity.distributed.options import ParallelOptions
    from trinity.reference import Config

    config = Config.preset("tiny")
    kwargs = dict(gpus=8, hardware=get_hardware("h100"), seq_len=256, batches=[(0, 32)], tokens=1e9,
                  micro_batches=(1,), recompute=(False,), fixed={"dp_shard": 8})
    plain = search(config, **kwargs)
    options = ParallelOptions(keep_gathered="all", reshard_after_forward="none", reduce_gradients="step")
    kept = search(config, **kwargs, options=options)
    assert all(c.first.layout.options == options for c in kept.ranked + kept.rejected)
    a, b = plain.ranked[0].first, kept.ranked[0].first
    assert b.detail["comm"]["fsdp"] < 0.75 * a.detail["comm"]["fsdp"]  # the FSDP traffic's seconds
    assert main(["plan", "--model", "tiny", "--gpus", "8", "--gpu", "h100", "--tokens", "1e9", "--seq-len", "256",
                 "--batch", "32", "--fix", "dp_shard=8", "--options", "reduce_gradients=step"]) in (0, 1)
    assert "schedule options reduce_gradients=step" in capsys.readouterr().out
    assert main(["plan", "--model", "tiny", "--gpus", "8", "--gpu", "h100", "--tokens", "1e9",
                 "--options", "reduce_gradients=never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--options" in err[0]
