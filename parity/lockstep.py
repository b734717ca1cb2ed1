"""Inputs shared by every configuration of a lockstep run: initial weights, batch order, digests.

Everything here is plain numpy and depends only on seeds and shapes, so each
worker process computes exactly the same values for every backend.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

# Parameter vectors longer than this are summarized by a count sketch of this many
# buckets. Relative distances between sketches estimate the distances between the
# full vectors within about sqrt(2 / SKETCH_SIZE), roughly 9 percent, which is far
# finer than the orders of magnitude that separate round-off from a fault.
SKETCH_SIZE = 256

_ONES_NAMES = ("gamma", "scale", "moving_variance")


def initial_weights(
    names: Sequence[str], shapes: Sequence[tuple[int, ...]], seed: int
) -> list[np.ndarray]:
    """Make float32 initial values for a model's variables from a seeded generator.

    Kernels (two or more dimensions) are Glorot-uniform, as Keras' default, with
    fan-in and fan-out counted over the receptive field for convolutions. Scales and
    variances start at one and every other vector (biases, means) at zero.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    values = []
    for name, shape in zip(names, shapes, strict=True):
        leaf = name.rsplit("/", 1)[-1]
        if len(shape) >= 2:
            receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
            fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            values.append(rng.uniform(-limit, limit, size=shape).astype(np.float32))
        elif any(leaf.startswith(prefix) for prefix in _ONES_NAMES):
            values.append(np.ones(shape, np.float32))
        else:
            values.append(np.zeros(shape, np.float32))
    return values


def perturb_ulp(values: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
    """Move every nonzero float32 value one unit in the last place up or down at random.

    Runs that start from perturbed weights differ from the unperturbed ones only by
    round-off, which is what the envelope of correct runs is made of.
    """
    rng = np.random.default_rng([seed, 0x0171])
    perturbed = []
    for value in values:
        value = np.asarray(value, np.float32)
        direction = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(
            np.float32
        )
        moved = np.nextafter(value, direction)
        perturbed.append(np.where(value == 0, value, moved).astype(np.float32))
    return perturbed


def batch_schedule(num_samples: int, epochs: int, seed: int) -> np.ndarray:
    """Return an (epochs, num_samples) array of per-epoch permutations of the data."""
    rng = np.random.default_rng([seed, 0xBA7C])
    return np.stack([rng.permutation(num_samples) for _ in range(epochs)]).astype(
        np.int64
    )


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Return the number of batches per epoch; the last batch may be smaller."""
    return -(-num_samples // batch_size)


def digest_bytes(arrays: Sequence[np.ndarray]) -> str:
    """Return a SHA-256 hex digest of the arrays' float32 bytes, for equality checks."""
    hasher = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array, dtype=np.float32)
        hasher.update(str(array.shape).encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()


class Sketch:
    """A fixed linear summary of a flat parameter vector, the same in every worker.

    Short vectors are kept whole. Longer ones go through a count sketch: each
    coordinate is added, with a random sign, to one of SKETCH_SIZE buckets.
    """

    def __init__(self, num_params: int, seed: int, size: int = SKETCH_SIZE):
        self.num_params = num_params
        if num_params <= size:
            self.buckets = None
            self.size = num_params
            return
        rng = np.random.default_rng([seed, 0x5CE7])
        self.size = size
        self.buckets = rng.integers(0, size, num_params)
        self.signs = np.where(rng.random(num_params) < 0.5, -1.0, 1.0)

    def __call__(self, flat: np.ndarray) -> np.ndarray:
        flat = np.asarray(flat, np.float64)
        if self.buckets is None:
            return flat.copy()
        return np.bincount(self.buckets, weights=self.signs * flat, minlength=self.size)

    def many(self, flat: np.ndarray) -> np.ndarray:
        """Sketch each row of a (rows, num_params) array; equal to calling row by row."""
        flat = np.asarray(flat, np.float64)
        if self.buckets is None:
            return flat.copy()
        rows = flat.shape[0]
        index = (np.arange(rows)[:, None] * self.size + self.buckets).ravel()
        sums = np.bincount(
            index, weights=(self.signs * flat).ravel(), minlength=rows * self.size
        )
        return sums.reshape(rows, self.size)


def relative_distance(candidate: np.ndarray, referee: np.ndarray) -> np.ndarray:
    """Return ``|c - t| / |t|`` row by row, in the L2 norm, for (steps, k) arrays."""
    candidate = np.asarray(candidate, np.float64)
    referee = np.asarray(referee, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        difference = np.linalg.norm(candidate - referee, axis=-1)
        scale = np.linalg.norm(referee, axis=-1)
    return difference / np.maximum(scale, np.finfo(np.float64).tiny)
