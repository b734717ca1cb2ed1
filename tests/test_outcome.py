"""Outcome-level comparison: final accuracies over seeds with a confidence interval."""

import pytest

from parity.doctor import DoctorOptions, run_doctor
from parity.env import installed_backends
from parity.outcome import compare_outcomes


def test_identical_samples_are_within_variation():
    result = compare_outcomes([0, 1, 2], [0.9, 0.95, 0.92], [0.9, 0.95, 0.92])
    assert result.mean_difference == 0.0
    assert result.beyond_seed_variation is False
    assert "within seed-to-seed variation" in result.message


def test_constant_gap_is_beyond_variation():
    result = compare_outcomes([0, 1, 2], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0])
    assert result.interval == (-0.5, -0.5)
    assert result.beyond_seed_variation is True
    assert "-0.5000" in result.message


def test_large_gap_beyond_noisy_variation():
    ours = [0.52, 0.49, 0.51, 0.50, 0.48]
    theirs = [0.99, 1.0, 0.98, 1.0, 0.99]
    result = compare_outcomes(list(range(5)), ours, theirs)
    low, high = result.interval
    assert high < 0
    assert low < result.mean_difference < high
    assert result.beyond_seed_variation is True


def test_small_gap_within_noisy_variation():
    ours = [0.90, 0.97, 0.93, 0.99]
    theirs = [0.95, 0.92, 0.98, 0.94]
    result = compare_outcomes(list(range(4)), ours, theirs)
    low, high = result.interval
    assert low < 0 < high
    assert result.beyond_seed_variation is False


def test_too_few_seeds_gives_no_verdict():
    result = compare_outcomes([0, 1], [0.9, None], [0.9, 0.8])
    assert result.beyond_seed_variation is None
    assert "need at least 2" in result.message


@pytest.mark.skipif(
    not {"jax", "tensorflow"} <= set(installed_backends()),
    reason="needs jax and tensorflow",
)
def test_doctor_seeds_adds_outcome(tmp_path):
    result = run_doctor(
        DoctorOptions(
            configs=["jax:cpu:jit"],
            faults=["fused-dense-relu"],
            epochs=15,
            seeds=3,
            out=tmp_path,
            report=False,
            jobs=2,
        )
    )
    (entry,) = result.summary["configs"]
    outcome = entry["outcome"]
    assert outcome["seeds"] == [0, 1, 2]
    assert len(outcome["accuracies"]) == 3
    assert all(value is not None for value in outcome["referee_accuracies"])
    # The faulty linear model cannot learn circles; the referee does, from every seed.
    assert outcome["beyond_seed_variation"] is True
    assert outcome["mean_difference"] < -0.2
