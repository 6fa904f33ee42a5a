"""The validation on published runs, by its mechanics (simulate/planning/published.py, validation.py, ranges.py):
the catalogue is data, so no test asserts that a held-out run's range holds its published figure (that would be
circular); benchmarks/validate_published.py reports that. Tested here: a range holds its point, the sensitivity
names the assumption whose range moves the answer most, out-of-scope runs are refused, the split is the stated rule,
and the fit reads the calibration half only."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.distributed.layout import Layout
from trinity.reference import Config
from trinity.simulate.planning.hardware import FITTED, GEMM_SPAN, VALIDATED, get_hardware
from trinity.simulate.planning.published import CATALOGUE, in_scope
from trinity.simulate.planning.ranges import Assumption, answer_range, gpu_assumptions, step_evaluator
from trinity.simulate.planning.validation import fit, predict_run, split


def _assumptions(n):
    return [Assumption(f"a{i}", 1.0, 2.0, 0.5, True, "test") for i in range(n)]


@settings(deadline=None, max_examples=50)
@given(st.lists(st.floats(0.01, 10.0), min_size=1, max_size=6), st.floats(0.1, 100.0))
def test_a_range_holds_its_point_and_the_most_sensitive_assumption_moves_it_most(weights, base):
    """Any answer, monotone or not: the range holds the point; the most sensitive assumption is the one whose own
    two ends are furthest apart."""
    assumptions = _assumptions(len(weights))

    def evaluate(values):
        return base + sum(w * math.log(values[f"a{i}"]) ** 2 * (1 if i % 2 else -1) for i, w in enumerate(weights))

    a = answer_range(evaluate, assumptions)
    assert a.low <= a.point <= a.high
    spread = {k: abs(v[1] - v[0]) for k, v in a.swings.items()}
    assert spread[a.most_sensitive] == max(spread.values())
    for name, (fast, slow) in a.swings.items():
        assert a.low <= min(fast, slow) and max(fast, slow) <= a.high


def test_the_most_sensitive_assumption_of_a_real_step():
    """A compute-bound dense step on one node (MPT-7B's equivalent) is most sensitive to the GEMM efficiency and
    hardly to the links, whose traffic hides under its compute; a small MoE step across nodes moves with the link
    efficiency and the router's imbalance."""
    hw = get_hardware("h100")
    mpt = next(r for r in CATALOGUE if r.name == "MPT-7B, 8 H100, 2k")
    evaluate = step_evaluator(mpt.config(), Layout.parse(mpt.layout), hw, seq_len=2048, sequences=48,
                              micro_batch_size=6)
    answer = answer_range(evaluate, gpu_assumptions(hw))
    assert answer.low <= answer.point <= answer.high and answer.low < answer.high
    assert answer.most_sensitive == "gemm_efficiency"
    assert answer.swings["link_efficiency"][0] == pytest.approx(answer.swings["link_efficiency"][1], rel=0.02)
    config = Config.preset("bench-medium")
    moe = step_evaluator(config, Layout.parse("dp_replicate=2,dp_shard=16,ep=16"), hw, seq_len=1024,
                         sequences=64, micro_batch_size=1)
    a = answer_range(moe, gpu_assumptions(hw, expert_parallel=True))
    assert abs(a.swings["link_efficiency"][1] - a.swings["link_efficiency"][0]) > 0
    assert a.swings["imbalance"][1] > a.swings["imbalance"][0]  # a less balanced router is slower


def test_out_of_scope_runs_are_listed_never_predicted_nor_counted():
    out = [r for r in CATALOGUE if r.out_of_scope]
    assert len(out) >= 5 and all(r.out_of_scope.strip() for r in out)
    calibration, held_out = split()
    assert not {r.name for r in out} & {r.name for r in calibration + held_out}
    for run in out:
        with pytest.raises(ValueError, match="out of scope"):
            predict_run(run)


def test_the_split_is_the_stated_rule():
    """Per source, in catalogue order, calibration and held out alternate; Arcee's runs are always held out; every
    in-scope run is in exactly one half; there are at least 10 runs and at least 5 held out."""
    calibration, held_out = split()
    names = [r.name for r in calibration + held_out]
    assert sorted(names) == sorted(r.name for r in in_scope()) and len(set(names)) == len(names)
    assert len(names) >= 10 and len(held_out) >= 5
    seen = {}
    for run in in_scope():
        if run.source == "arcee":
            assert run in held_out
            continue
        k = seen.get(run.source, 0)
        seen[run.source] = k + 1
        assert (run in calibration) == (k % 2 == 0), run.name
    assert split() == (calibration, held_out)  # deterministic


def test_every_in_scope_run_is_a_job_trinity_can_run_and_cites_its_source():
    for run in in_scope():
        assert run.reference.startswith("http") and (run.tokens_per_s or run.days)
        config = run.config()
        if run.layout:
            layout = Layout.parse(run.layout)
            assert layout.world_size == run.gpus, run.name
            assert run.global_batch % (layout.dp * run.micro_batch) == 0, run.name
        assert run.seq_len <= config.max_position_embeddings
    dense = [r for r in in_scope() if r.family == "dense"]
    assert dense and [r for r in in_scope() if r.family == "moe"]


def test_the_dense_equivalent_has_the_published_parameters():
    """MPT-7B: 6,658,859,008 parameters published (llm-foundry's table); the equivalent config's matrices add up
    within 0.2 % (the published count has 10M more: norms and buffers the equivalent does not have)."""
    run = next(r for r in CATALOGUE if r.name == "MPT-7B, 8 H100, 2k")
    c = run.config()
    per_layer = c.hidden_size * (3 * c.q_width + 2 * c.kv_width) + 3 * c.hidden_size * c.intermediate_size
    total = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    assert total == pytest.approx(6658859008, rel=2e-3)


def _small_catalogue():
    """Enough of the catalogue to fit fast: the first five in-scope runs of two sources."""
    keep = [r for r in in_scope() if r.source == "llm-foundry"][:4] + [r for r in in_scope()
                                                                       if r.source == "olmo-core"][:2]
    return keep


def test_the_fit_reads_the_calibration_half_only():
    runs = _small_catalogue()
    calibration, held_out = split(runs)
    assert calibration and held_out
    values, constrained, span = fit(calibration)
    # the held-out runs' published figures changed tenfold: the same fit
    changed = [dataclasses.replace(r, tokens_per_s=r.tokens_per_s * 10) if r in held_out else r for r in runs]
    again_calibration, _ = split(changed)
    assert fit(again_calibration) == (values, constrained, span)
    # a calibration run's published figure changed: another fit
    moved = [dataclasses.replace(r, tokens_per_s=r.tokens_per_s * 2) if r in calibration else r for r in runs]
    assert fit(split(moved)[0])[0] != values


def test_the_catalogue_hardware_carries_the_fit_of_the_calibration_half():
    """hardware.FITTED, GEMM_SPAN and VALIDATED are what validation.fit gives on today's calibration half (stale
    constants fail here; benchmarks/validate_published.py prints the fit)."""
    values, constrained, span = fit(split()[0])
    assert values == pytest.approx(FITTED, abs=0.005)
    assert span == pytest.approx(GEMM_SPAN, abs=0.005)
    assert all(VALIDATED[k] == v for k, v in constrained.items())


def test_a_plan_prints_ranges_its_most_sensitive_assumption_and_an_unvalidated_gpu():
    r = subprocess.run([sys.executable, "-m", "trinity.cli", "plan", "--model", "bench-medium", "--gpus", "16",
                        "--gpu", "h200", "--tokens", "1e9", "--seq-len", "1024", "--batch", "64", "--top", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "tok/s/GPU (range)" in lines[1] and "days (range)" in lines[1] and "most sensitive to" in lines[1]
    answer = next(line for line in lines if line.startswith("answer: "))
    assert " days, range " in answer and "most sensitive to " in answer
    assert any(line.startswith("! unvalidated: no published run on H200 SXM") for line in lines)
    low, point, high = _range_of(answer)
    assert low <= point <= high


def _range_of(answer: str):
    words = answer.replace(",", " ").split()
    point = float(words[1])
    i = words.index("range")
    return float(words[i + 1]), point, float(words[i + 3])
