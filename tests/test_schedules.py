"""Learning-rate and batch-size schedules (SPEC §9.1, §14 #11)."""

import math

import pytest

from trinity.reference.training.schedules import BatchSchedule, learning_rate


def test_linear_warmup_then_wsd_constant_then_linear_decay_to_floor():
    lrs = [learning_rate(s, 100, 1.0, 10, "wsd", decay_start_fraction=0.8, floor_ratio=0.1) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # warmup reaches the peak at its last step
    assert all(lr == 1.0 for lr in lrs[10:80])                          # stable phase
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:]))                 # strictly decreasing
    assert decay[-1] == pytest.approx(0.1)                              # reaches the floor at the last step
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert max(steps) == pytest.approx(min(steps))                      # linear


def test_cosine_from_peak_to_floor():
    lrs = [learning_rate(s, 50, 2.0, 5, "cosine", floor_ratio=0.1) for s in range(50)]
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[-1] == pytest.approx(0.2)
    mid = 5 + (49 - 5) / 2
    assert learning_rate(int(mid), 50, 2.0, 5, "cosine", floor_ratio=0.1) == pytest.approx(
        0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 5) / 44)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_wsd_never_decays_before_warmup_ends():
    lrs = [learning_rate(s, 20, 1.0, 10, "wsd", decay_start_fraction=0.1) for s in range(20)]
    assert lrs[9] == 1.0 and lrs[10] == 1.0 and lrs[-1] == 0.0


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate(50, 100, 1.0, 10, "step")
    with pytest.raises(ValueError, match="step"):
        learning_rate(-1, 100, 1.0, 10)


def test_batch_size_changes_once_the_token_count_is_reached():
    """Trinity Large: 12,288 sequences per step, 16,384 after 4.9T tokens."""
    schedule = BatchSchedule(12288, ((4_900_000_000_000, 16384),))
    assert schedule.sequences(0) == 12288
    assert schedule.sequences(4_899_999_999_999) == 12288
    assert schedule.sequences(4_900_000_000_000) == 16384
    with pytest.raises(ValueError):
        BatchSchedule(8, ((100, 16), (50, 32)))
