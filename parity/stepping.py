"""Drive training one step at a time and hand back what each step produced.

A worker trains in chunks: the steps between two checkpoints, split further when
the parameter snapshots of a chunk would exceed `SNAPSHOT_BUDGET_BYTES`. A stepper
runs the chunk's batches and returns, per step, the loss, the batch accuracy and
the values of every model weight after the step.

`KerasStepper` calls ``model.train_on_batch`` for each step and reads the weights
back from the variables. It works on every backend and mode.

`JaxStepper` is for JAX in jit mode. ``train_on_batch`` copies the whole training
state into the Keras variables after every call, and reading a weight waits for
the step to finish. That doubles the time of small models against ``fit``, which
keeps the state inside its loop for an epoch. `JaxStepper` does what ``fit`` does:
it compiles Keras' own ``train_step`` and keeps the state between calls. Results
are read after the chunk, so JAX dispatches the steps back to back. The first step
still goes through ``train_on_batch``, which builds the optimizer and the compiled
metrics. The metric state is reset before every step, as ``train_on_batch`` does,
so the accuracy is the batch's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

# Upper bound on the parameter snapshots one chunk keeps before they are recorded.
# Memory stays bounded for large models; small models still get whole epochs per
# chunk.
SNAPSHOT_BUDGET_BYTES = 64 * 2**20


@dataclasses.dataclass
class Chunk:
    """Results of consecutive training steps, one entry per step."""

    loss: np.ndarray  # (steps,) float64
    accuracy: np.ndarray  # (steps,) float64, NaN without an accuracy metric
    weights: list[list[np.ndarray]]  # per step, the values of model.weights after it


def chunk_length(num_weight_bytes: int, limit: int) -> int:
    """Return how many steps a chunk may hold within the snapshot budget, at most ``limit``."""
    return max(1, min(limit, SNAPSHOT_BUDGET_BYTES // max(1, num_weight_bytes)))


class KerasStepper:
    """Step with ``train_on_batch``; valid on every backend and execution mode."""

    def __init__(self, model: Any):
        self.model = model

    def run(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> Chunk:
        """Train on each batch in turn and return the per-step results."""
        losses, accuracies, weights = [], [], []
        for x, y in batches:
            logs = self.model.train_on_batch(x, y, return_dict=True)
            losses.append(float(logs["loss"]))
            accuracies.append(float(logs.get("accuracy", np.nan)))
            weights.append([np.asarray(v.numpy()) for v in self.model.weights])
        return Chunk(np.array(losses), np.array(accuracies), weights)

    def optimizer_values(self) -> list[np.ndarray]:
        """Return the optimizer's variables (step count, moments) as numpy arrays."""
        return [np.asarray(v.numpy()) for v in self.model.optimizer.variables]

    def finish(self) -> None:
        """Nothing to do: the model's variables are current after every step."""


class JaxStepper:
    """Step with Keras' compiled ``train_step``, keeping the JAX state between calls."""

    def __init__(self, model: Any):
        import jax

        self.model = model
        self.jax = jax
        self.train_step = jax.jit(model.train_step)
        self.state: tuple[list[Any], list[Any], list[Any]] | None = None
        self.metrics_zero: list[Any] = []
        # Position of each of model.weights in the trainable or non-trainable list.
        self.where: list[tuple[int, int]] = []

    def _capture(self) -> None:
        model = self.model
        model.reset_metrics()
        self.metrics_zero = [v.value for v in model.metrics_variables]
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        optimizer = [v.value for v in model.optimizer.variables]
        self.state = (trainable, non_trainable, optimizer)
        index = {id(v): (0, i) for i, v in enumerate(model.trainable_variables)}
        index.update(
            {id(v): (1, i) for i, v in enumerate(model.non_trainable_variables)}
        )
        self.where = [index[id(v)] for v in model.weights]

    def run(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> Chunk:
        """Train on each batch in turn and return the per-step results."""
        batches = list(batches)
        head = Chunk(np.empty(0), np.empty(0), [])
        if self.state is None and batches:
            head = KerasStepper(self.model).run(batches[:1])
            batches = batches[1:]
            self._capture()
        outputs = []
        for x, y in batches:
            assert self.state is not None
            logs, state = self.train_step((*self.state, self.metrics_zero), (x, y))
            self.state = (state[0], state[1], state[2])
            outputs.append((logs, state[0], state[1]))
        losses = [float(np.asarray(logs["loss"])) for logs, _, _ in outputs]
        accuracies = [
            float(np.asarray(logs["accuracy"])) if "accuracy" in logs else np.nan
            for logs, _, _ in outputs
        ]
        weights = [
            [np.asarray(lists[kind][i]) for kind, i in self.where]
            for _, *lists in outputs
        ]
        return Chunk(
            np.concatenate([head.loss, losses]),
            np.concatenate([head.accuracy, accuracies]),
            head.weights + weights,
        )

    def optimizer_values(self) -> list[np.ndarray]:
        """Return the optimizer's variables (step count, moments) as numpy arrays."""
        if self.state is None:
            return KerasStepper(self.model).optimizer_values()
        return [np.asarray(value) for value in self.state[2]]

    def finish(self) -> None:
        """Write the state back into the model's variables, for prediction."""
        if self.state is None:
            return
        model = self.model
        trainable, non_trainable, optimizer = self.state
        for variables, values in (
            (model.trainable_variables, trainable),
            (model.non_trainable_variables, non_trainable),
            (model.optimizer.variables, optimizer),
        ):
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)


def make_stepper(model: Any, backend: str, mode: str) -> KerasStepper | JaxStepper:
    """Return the fastest stepper that is exact for this backend and mode."""
    if backend == "jax" and mode == "jit":
        return JaxStepper(model)
    return KerasStepper(model)
