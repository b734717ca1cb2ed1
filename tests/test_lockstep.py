"""Shared lockstep inputs: initial weights, one-ulp perturbation, batch schedule, sketch."""

import numpy as np

from parity import lockstep


def test_initial_weights_repeat_for_a_seed():
    names = ["dense/kernel", "dense/bias", "conv/kernel"]
    shapes = [(2, 12), (12,), (3, 3, 1, 8)]
    first = lockstep.initial_weights(names, shapes, seed=0)
    second = lockstep.initial_weights(names, shapes, seed=0)
    other = lockstep.initial_weights(names, shapes, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], other[0])
    assert all(value.dtype == np.float32 for value in first)


def test_initial_weights_follow_glorot_limits():
    kernel, bias, conv = lockstep.initial_weights(
        ["d/kernel", "d/bias", "c/kernel"], [(2, 12), (12,), (3, 3, 1, 8)], seed=3
    )
    assert np.abs(kernel).max() <= np.sqrt(6 / 14)
    assert np.abs(conv).max() <= np.sqrt(6 / (9 + 72))
    assert not bias.any()


def test_scales_start_at_one():
    (gamma,) = lockstep.initial_weights(["bn/gamma"], [(4,)], seed=0)
    assert np.array_equal(gamma, np.ones(4, np.float32))


def test_perturb_moves_one_ulp():
    values = [np.array([1.0, -2.5, 0.0, 3e-3], np.float32)]
    (moved,) = lockstep.perturb_ulp(values, seed=1)
    spacing = np.spacing(np.abs(values[0]))
    difference = np.abs(moved - values[0])
    assert moved[2] == 0.0
    nonzero = values[0] != 0
    # Moving down from a power of two crosses into a binade with half the spacing.
    assert np.all(
        (difference[nonzero] == spacing[nonzero])
        | (difference[nonzero] == spacing[nonzero] / 2)
    )


def test_schedule_is_permutations():
    schedule = lockstep.batch_schedule(50, epochs=3, seed=0)
    assert schedule.shape == (3, 50)
    for row in schedule:
        assert sorted(row) == list(range(50))
    assert not np.array_equal(schedule[0], schedule[1])
    assert np.array_equal(schedule, lockstep.batch_schedule(50, epochs=3, seed=0))


def test_steps_per_epoch_counts_partial_batch():
    assert lockstep.steps_per_epoch(1000, 32) == 32
    assert lockstep.steps_per_epoch(64, 32) == 2


def test_sketch_keeps_short_vectors_whole():
    sketch = lockstep.Sketch(10, seed=0)
    vector = np.arange(10.0)
    assert np.array_equal(sketch(vector), vector)


def test_sketch_estimates_relative_distance():
    rng = np.random.default_rng(0)
    sketch = lockstep.Sketch(20000, seed=0)
    base = rng.normal(size=20000)
    moved = base + 1e-3 * rng.normal(size=20000)
    exact = np.linalg.norm(moved - base) / np.linalg.norm(base)
    estimate = lockstep.relative_distance(sketch(moved)[None], sketch(base)[None])[0]
    assert 0.7 * exact < estimate < 1.3 * exact


def test_digest_bytes_detects_one_bit():
    a = np.ones((3, 3), np.float32)
    b = a.copy()
    b[1, 1] = np.nextafter(np.float32(1), np.float32(2))
    assert lockstep.digest_bytes([a]) != lockstep.digest_bytes([b])
