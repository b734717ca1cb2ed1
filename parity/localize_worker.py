"""One configuration's share of localization, in a process of its own.

Run as ``python -m parity.localize_worker SPEC.json``. The spec is the doctor's
run spec for the configuration (scenario or user model, epochs, batch size,
seed) plus what to compute:

- ``role: referee``: replay the float64 referee from its last checkpoint before
  each requested step through the batch schedule. Then record every phase of
  that step layer by layer: each layer's input and output, the loss and its
  gradient, each layer's upstream, weight and input gradients, the optimizer
  update and the whole step. A float32 model in eager mode in the same process,
  the trusted reference, computes the same phases, both chained and from the
  referee's inputs.
- ``role: candidate``: apply the configuration's faults, start from the
  referee's state at each step and compute the same phases in the configuration's
  own mode. Each layer runs from the referee's input and upstream gradient (the
  error it introduces) and in the chain of its own values (the error that
  accumulates), and the trainer runs its own compiled step. Optional extras are
  the chain from the configuration's own checkpoints, which finds where a
  non-finite value first appears, and a short lockstep segment, which tests a
  workaround. With ``cases`` one process runs several sets of catalogued faults.

Tensors go to ``tensors.safetensors`` and metadata to ``result.json``. Nothing is
pickled.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity import faults as fault_catalogue
from parity import lockstep
from parity.config import Configuration, parse_config
from parity.io import atomic_write_json, atomic_write_tensors
from parity.phases import PhaseRunner, loss_from_identifier, to_numpy
from parity.setting import shares_process
from parity.workarounds import swap_optimizer
from parity.worker import (
    Recorder,
    condense_error,
    configure_backend,
    keras_device_name,
    load_experiment,
    optimizer_values,
    set_environment,
)

RESULT_FILE = "result.json"
TENSORS_FILE = "tensors.safetensors"
RESULT_FORMAT = 1


def batch_indices(
    schedule: np.ndarray, step: int, per_epoch: int, batch_size: int
) -> np.ndarray:
    """Return the sample indices of training step ``step`` (0-based) in the schedule."""
    epoch, position = divmod(step, per_epoch)
    return schedule[epoch][position * batch_size : (position + 1) * batch_size]


def checkpoint_steps(arrays: dict[str, np.ndarray]) -> list[int]:
    """Return the steps that have a parameter checkpoint in a worker's arrays."""
    steps = {int(key.split("/")[1]) for key in arrays if key.startswith("checkpoint/")}
    return sorted(steps)


def checkpoint_state(
    arrays: dict[str, np.ndarray], step: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return the parameters and optimizer values checkpointed after ``step`` updates."""
    return _indexed(arrays, f"checkpoint/{step}/param/"), _indexed(
        arrays, f"checkpoint/{step}/optimizer/"
    )


def _indexed(arrays: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    count = sum(1 for key in arrays if key.startswith(prefix))
    return [arrays[f"{prefix}{i}"] for i in range(count)]


def chain_layers(model: Any) -> list[Any]:
    """Return the model's layers in call order when each feeds only the next one.

    A model whose graph is not such a chain (branches, several inputs, shared
    layers) is returned as one layer, so its phases are attributed to the model.
    """
    import keras

    layers = [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    if isinstance(model, keras.Sequential) or not layers:
        return layers or [model]
    try:
        previous = model.inputs[0] if len(model.inputs) == 1 else None
        for layer in layers:
            if previous is None or len(layer._inbound_nodes) != 1:
                return [model]
            if layer.input is not previous:
                return [model]
            previous = layer.output
        if model.outputs[0] is not previous or len(model.outputs) != 1:
            return [model]
    except (AttributeError, ValueError):
        return [model]
    return layers


class _Guard:
    """Context manager that records a phase's exception, with the phase and layer."""

    def __init__(
        self,
        errors: list[dict[str, Any]],
        step: int | None,
        source: str,
        phase: str,
        layer: int | None,
    ):
        self.errors, self.step, self.source = errors, step, source
        self.phase, self.layer = phase, layer
        self.failed = False

    def __enter__(self) -> _Guard:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, trace: Any) -> bool:
        if error is None or not isinstance(error, Exception):
            return False
        self.failed = True
        self.errors.append(
            {
                "step": self.step,
                "source": self.source,
                "phase": self.phase,
                "layer": self.layer,
                "error": condense_error(error),
            }
        )
        return True


class Session:
    """A model in one configuration with its phase runner and the indices between lists."""

    def __init__(self, keras: Any, model: Any, config: Configuration, mode: str):
        self.keras = keras
        self.model = model
        self.config = config
        self.runner = PhaseRunner(keras, config.backend, mode)
        self.layers = chain_layers(model)
        self.loss = loss_from_identifier(keras, model.loss)
        weight_index = {id(variable): i for i, variable in enumerate(model.weights)}
        self.trainable_to_weight = [
            weight_index[id(variable)] for variable in model.trainable_variables
        ]
        trainable_index = {
            id(variable): i for i, variable in enumerate(model.trainable_variables)
        }
        self.layer_trainable = [
            [trainable_index[id(variable)] for variable in layer.trainable_variables]
            for layer in self.layers
        ]
        self.errors: list[dict[str, Any]] = []
        self.step: int | None = None  # the step being computed, for error records
        self.initial_optimizer = optimizer_values(model)

    def load_state(
        self, params: Sequence[np.ndarray], slots: Sequence[np.ndarray]
    ) -> None:
        """Assign parameters (model.weights order) and optimizer values, cast to their dtypes.

        The values fill the whole optimizer. Values from a referee without a
        loss-scale optimizer (mixed float16) fill only the optimizer inside it,
        and the loss scale keeps its value.
        """
        variables = self.model.weights
        if len(params) != len(variables):
            raise ValueError(
                f"the state has {len(params)} parameters, the model {len(variables)}"
            )
        for variable, value in zip(variables, params, strict=True):
            variable.assign(_cast(value, variable))
        optimizer_variables = self.model.optimizer.variables
        if len(slots) == len(self.optimizer.variables):
            optimizer_variables = self.optimizer.variables
        elif len(slots) < len(self.optimizer.variables):
            # Keras builds the optimizer's variables at the first update, so a
            # checkpoint with fewer values was taken before any update: the state
            # is the optimizer's initial one.
            slots = self.initial_optimizer
        if len(slots) != len(optimizer_variables):
            raise ValueError(
                f"the state has {len(slots)} optimizer values, the optimizer "
                f"{type(self.optimizer).__name__} has {len(optimizer_variables)}; "
                "localization needs the referee's optimizer layout"
            )
        for variable, value in zip(optimizer_variables, slots, strict=True):
            variable.assign(_cast(value, variable))

    @property
    def optimizer(self) -> Any:
        """The optimizer that updates the weights, inside any loss-scale optimizer."""
        return getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)

    def load_params(self, params: Sequence[np.ndarray]) -> None:
        """Assign parameters (model.weights order), cast to their dtypes."""
        for variable, value in zip(self.model.weights, params, strict=True):
            variable.assign(_cast(value, variable))

    def unit_activity(self, points: np.ndarray) -> dict[int, np.ndarray]:
        """Return, per hidden layer with an activation, the fraction of points on
        which each unit's pre-activation is positive.

        Over all points and all spatial positions, a fraction of 0 marks a dead
        ReLU unit and 1 a unit that is always active, which a ReLU passes through
        linearly.
        """
        keras = self.keras
        fractions: dict[int, np.ndarray] = {}
        h = keras.ops.convert_to_tensor(points, dtype=self.layers[0].compute_dtype)
        for index, layer in enumerate(self.layers[:-1]):
            if isinstance(layer, (keras.layers.Activation, keras.layers.ReLU)):
                pre = h
            elif callable(getattr(layer, "activation", None)):
                saved = layer.activation
                layer.activation = keras.activations.linear
                try:
                    pre = layer(h, training=False)
                finally:
                    layer.activation = saved
            else:
                pre = None
            h = layer(h, training=False)
            if pre is not None:
                values = to_numpy(pre)
                positive = values.reshape(-1, values.shape[-1]) > 0
                fractions[index] = positive.mean(axis=0)
        return fractions

    def trainable_values(self, params: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Pick the trainable values out of a full parameter list."""
        return [params[i] for i in self.trainable_to_weight]

    def output_dtype(self) -> str:
        """Return the dtype of the model's output, in which the loss receives predictions."""
        return self.layers[-1].compute_dtype

    def chained(
        self,
        x: np.ndarray,
        y: np.ndarray,
        params: Sequence[np.ndarray],
        slots: Sequence[np.ndarray],
        source: str = "chained",
    ) -> dict[str, np.ndarray]:
        """Run every phase of one step on the session's own values, layer after layer.

        A phase that raises ends the chain, because every later phase needs its
        result; the error is kept in ``self.errors``.
        """
        self.load_state(params, slots)
        tensors: dict[str, np.ndarray] = {}
        inputs = []
        h = x
        with self.guard(source, "forward", None) as guard:
            for index, layer in enumerate(self.layers):
                guard.layer = index
                inputs.append(h)
                tensors[f"forward/{index}/input"] = h
                h = self.runner.forward(layer, h)
                tensors[f"forward/{index}/output"] = h
        if guard.failed:
            return tensors
        with self.guard(source, "loss", None) as guard:
            value, upstream = self.runner.loss(self.loss, y, h, self.output_dtype())
            tensors["loss/value"] = value
            tensors["loss/gradient"] = upstream
        if guard.failed:
            return tensors
        grads: list[np.ndarray] = [np.empty(0)] * len(self.model.trainable_variables)
        with self.guard(source, "gradient", None) as guard:
            for index in reversed(range(len(self.layers))):
                guard.layer = index
                tensors[f"gradient/{index}/upstream"] = upstream
                weight_grads, input_grad = self.runner.vjp(
                    self.layers[index], inputs[index], upstream
                )
                for j, grad in zip(
                    self.layer_trainable[index], weight_grads, strict=True
                ):
                    tensors[f"gradient/{index}/weight/{j}"] = grad
                    grads[j] = grad
                if input_grad is not None:
                    tensors[f"gradient/{index}/input"] = input_grad
                    upstream = input_grad
        if guard.failed:
            return tensors
        with self.guard(source, "update", None):
            tensors.update(self.update(params, slots, grads))
        return tensors

    def isolated(
        self,
        referee: dict[str, np.ndarray],
        y: np.ndarray,
        params: Sequence[np.ndarray],
        slots: Sequence[np.ndarray],
    ) -> dict[str, np.ndarray]:
        """Run every phase from the referee's inputs, so each phase's own error shows."""
        self.load_state(params, slots)
        tensors: dict[str, np.ndarray] = {}
        for index, layer in enumerate(self.layers):
            x = referee[f"forward/{index}/input"]
            with self.guard("isolated", "forward", index):
                tensors[f"forward/{index}/output"] = self.runner.forward(layer, x)
            upstream = referee[f"gradient/{index}/upstream"]
            with self.guard("isolated", "gradient", index):
                weight_grads, input_grad = self.runner.vjp(layer, x, upstream)
                for j, grad in zip(
                    self.layer_trainable[index], weight_grads, strict=True
                ):
                    tensors[f"gradient/{index}/weight/{j}"] = grad
                if input_grad is not None:
                    tensors[f"gradient/{index}/input"] = input_grad
        prediction = referee[f"forward/{len(self.layers) - 1}/output"]
        with self.guard("isolated", "loss", None):
            value, gradient = self.runner.loss(
                self.loss, y, prediction, self.output_dtype()
            )
            tensors["loss/value"] = value
            tensors["loss/gradient"] = gradient
        grads: list[np.ndarray] = [np.empty(0)] * len(self.model.trainable_variables)
        for index, trainable in enumerate(self.layer_trainable):
            for j in trainable:
                grads[j] = referee[f"gradient/{index}/weight/{j}"]
        with self.guard("isolated", "update", None):
            tensors.update(self.update(params, slots, grads))
        return tensors

    def guard(self, source: str, phase: str, layer: int | None) -> _Guard:
        """Return a context that records an exception of one phase instead of raising it."""
        return _Guard(self.errors, self.step, source, phase, layer)

    def update(
        self,
        params: Sequence[np.ndarray],
        slots: Sequence[np.ndarray],
        grads: Sequence[np.ndarray],
    ) -> dict[str, np.ndarray]:
        """Apply the optimizer to ``grads`` from the given state; return the new parameters."""
        self.load_state(params, slots)
        # Read the values back, so that any optimizer layout load_state accepts
        # (such as a checkpoint before the first update) reaches the optimizer.
        values = [to_numpy(variable.value) for variable in self.optimizer.variables]
        new_params, _ = self.runner.update(
            self.optimizer, self.trainable_values(params), values, grads
        )
        return {f"update/{j}": value for j, value in enumerate(new_params)}

    def whole_step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        params: Sequence[np.ndarray],
        slots: Sequence[np.ndarray],
    ) -> dict[str, np.ndarray]:
        """Run the trainer's own step (``train_on_batch``); return the new trainable values."""
        self.load_state(params, slots)
        with self.guard("step", "step", None) as guard:
            self.model.train_on_batch(x, y)
        if guard.failed:
            return {}
        return {
            f"step/{j}": to_numpy(variable.value)
            for j, variable in enumerate(self.model.trainable_variables)
        }

    def layer_descriptions(self) -> list[dict[str, Any]]:
        """Describe each attributed layer: name, class, variables and serialized form."""
        described = []
        weight_index = {id(v): i for i, v in enumerate(self.model.weights)}
        for index, layer in enumerate(self.layers):
            try:
                serialized = self.keras.saving.serialize_keras_object(layer)
                json.dumps(serialized)
            except (TypeError, ValueError, NotImplementedError):
                serialized = None
            described.append(
                {
                    "index": index,
                    "name": layer.name,
                    "class": type(layer).__name__,
                    "trainable": self.layer_trainable[index],
                    "weights": [weight_index[id(v)] for v in layer.weights],
                    "shapes": [list(v.shape) for v in layer.trainable_variables],
                    "serialized": serialized if layer is not self.model else None,
                    "compute_dtype": layer.compute_dtype,
                }
            )
        return described


def _cast(value: np.ndarray, variable: Any) -> np.ndarray:
    """Return ``value`` in the variable's dtype and shape (safetensors stores scalars as (1,))."""
    return np.asarray(value).astype(variable.dtype).reshape(tuple(variable.shape))


class Replay:
    """Training on the batch schedule from a run's checkpoints, step by step."""

    def __init__(
        self,
        session: Session,
        arrays: dict[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        schedule: np.ndarray,
        per_epoch: int,
        batch_size: int,
    ):
        self.session = session
        self.arrays = arrays
        self.checkpoints = checkpoint_steps(arrays)
        self.x, self.y = x, y
        self.schedule, self.per_epoch, self.batch_size = schedule, per_epoch, batch_size
        self.position: int | None = None

    def advance(self, step: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Bring the model to the state after ``step`` updates; return that state."""
        usable = [c for c in self.checkpoints if c <= step]
        if not usable:
            raise ValueError(f"no checkpoint at or before step {step}")
        latest = usable[-1]
        if self.position is None or self.position > step or latest > self.position:
            self.session.load_state(*checkpoint_state(self.arrays, latest))
            self.position = latest
        model = self.session.model
        while self.position < step:
            batch = batch_indices(
                self.schedule, self.position, self.per_epoch, self.batch_size
            )
            model.train_on_batch(self.x[batch], self.y[batch])
            self.position += 1
        return self.state()

    def state(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Return the model's parameters and optimizer values now."""
        model = self.session.model
        return [to_numpy(v.value) for v in model.weights], optimizer_values(model)

    def forget(self) -> None:
        """Mark the model's state as unknown, after something else changed it."""
        self.position = None


def build_session(
    keras: Any,
    spec: dict[str, Any],
    config: Configuration,
    mode: str,
    optimizer_option: str | None = None,
) -> tuple[Session, Any]:
    """Build and compile the spec's model for ``config``; return it and its experiment."""
    experiment = load_experiment(spec, config)
    dtype = np.float64 if config.precision == "float64" else np.float32
    model, _ = experiment.build(keras, experiment.x[:2].astype(dtype))
    experiment.compile(keras, model)
    swap_optimizer(keras, model, optimizer_option)
    model.optimizer.build(model.trainable_variables)
    return Session(keras, model, config, mode), experiment


def build_reference(keras: Any, spec: dict[str, Any], config: Configuration) -> Session:
    """Build the trusted float32 reference: the referee's backend, eager, float32."""
    reference = config.replace(precision="float32", mode="eager")
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    try:
        session, _ = build_session(keras, spec, reference, "eager")
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)
    return session


def run_referee(
    keras: Any, spec: dict[str, Any], config: Configuration
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Record the referee's and the float32 reference's phases at each requested step."""
    session, experiment = build_session(keras, spec, config, "eager")
    reference = build_reference(keras, spec, config)
    arrays = _load_arrays(spec["arrays"])
    x = experiment.x.astype(np.float64)
    x32 = experiment.x.astype(np.float32)
    y = experiment.y
    schedule, per_epoch, batch_size = _schedule(spec, len(x))
    replay = Replay(session, arrays, x, y, schedule, per_epoch, batch_size)
    tensors: dict[str, np.ndarray] = {}
    for step in sorted(set(int(s) for s in spec["steps"])):
        params, slots = replay.advance(step)
        session.step = reference.step = step
        batch = batch_indices(schedule, step, per_epoch, batch_size)
        prefix = f"{step}/"
        tensors[prefix + "batch"] = batch
        tensors[prefix + "labels"] = np.asarray(y[batch])
        for i, value in enumerate(params):
            tensors[f"{prefix}state/param/{i}"] = value
        for i, value in enumerate(slots):
            tensors[f"{prefix}state/optimizer/{i}"] = value

        chained = session.chained(x[batch], y[batch], params, slots)
        _store(tensors, prefix + "referee/", chained)
        _store(
            tensors,
            prefix + "reference/chained/",
            reference.chained(x32[batch], y[batch], params, slots),
        )
        _store(
            tensors,
            prefix + "reference/isolated/",
            reference.isolated(chained, y[batch], params, slots),
        )
        _store(
            tensors,
            prefix + "reference/",
            reference.whole_step(x32[batch], y[batch], params, slots),
        )
        # The referee's own step is also the replay's next step.
        _store(
            tensors,
            prefix + "referee/",
            session.whole_step(x[batch], y[batch], params, slots),
        )
        replay.position = step + 1
    if session.errors or reference.errors:
        first = (session.errors + reference.errors)[0]
        raise ValueError(
            f"the referee failed in the {first['phase']} phase of layer "
            f"{first['layer']} at step {first['step']} ({first['source']}): "
            f"{first['error']}"
        )
    activity = spec.get("activity")
    if activity:
        points = _load_arrays(activity["points"])["points"].astype(np.float64)
        for run in activity["runs"]:
            params, _ = checkpoint_state(_load_arrays(run["arrays"]), int(run["step"]))
            session.load_params(params)
            for index, fraction in session.unit_activity(points).items():
                tensors[f"activity/{run['key']}/{index}"] = fraction
    meta = {
        "layers": session.layer_descriptions(),
        "activations": [_activation_name(layer) for layer in session.layers],
        "trainable_to_weight": session.trainable_to_weight,
        "loss": _serialize(keras, session.model.loss),
        "optimizer": _serialize(keras, session.model.optimizer),
    }
    return tensors, meta


def run_candidate(
    keras: Any, spec: dict[str, Any], config: Configuration
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Compute the candidate's phases from the referee's state and inputs, in its own mode."""
    session, experiment = build_session(
        keras, spec, config, config.mode, spec.get("optimizer")
    )
    dtype = np.float64 if config.precision == "float64" else np.float32
    x = experiment.x.astype(dtype)
    y = experiment.y
    tensors: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    if spec.get("referee_tensors"):
        started = time.perf_counter()
        referee = _load_arrays(spec["referee_tensors"])
        for step in sorted(set(int(s) for s in spec["steps"])):
            tensors.update(_candidate_step(session, referee, step, x, y))
        timing["attribution"] = time.perf_counter() - started

    own = spec.get("own_state")
    if own:
        started = time.perf_counter()
        arrays = _load_arrays(own["arrays"])
        schedule, per_epoch, batch_size = _schedule(spec, len(x))
        replay = Replay(session, arrays, x, y, schedule, per_epoch, batch_size)
        step = int(own["step"])
        params, slots = replay.advance(step)
        session.step = step
        batch = batch_indices(schedule, step, per_epoch, batch_size)
        with np.errstate(all="ignore"):
            own_tensors = session.chained(x[batch], y[batch], params, slots, "own")
        _store(tensors, f"{step}/own/", own_tensors)
        timing["own_state"] = time.perf_counter() - started

    segment = spec.get("segment")
    if segment:
        started = time.perf_counter()
        tensors.update(_segment(session, spec, segment, x, y))
        timing["segment"] = time.perf_counter() - started
    return tensors, {
        "config": str(config),
        "optimizer": spec.get("optimizer"),
        "layers": session.layer_descriptions(),
        "errors": session.errors,
        "timing": timing,
    }


def _candidate_step(
    session: Session,
    referee: dict[str, np.ndarray],
    step: int,
    x: np.ndarray,
    y: np.ndarray,
) -> dict[str, np.ndarray]:
    prefix = f"{step}/"
    batch = referee[prefix + "batch"]
    params = _indexed(referee, prefix + "state/param/")
    slots = _indexed(referee, prefix + "state/optimizer/")
    referee_phases = {
        key[len(prefix + "referee/") :]: value
        for key, value in referee.items()
        if key.startswith(prefix + "referee/")
    }
    tensors: dict[str, np.ndarray] = {}
    session.step = step
    _store(
        tensors,
        prefix + "isolated/",
        session.isolated(referee_phases, y[batch], params, slots),
    )
    _store(
        tensors, prefix + "chained/", session.chained(x[batch], y[batch], params, slots)
    )
    _store(tensors, prefix, session.whole_step(x[batch], y[batch], params, slots))
    return tensors


def _segment(
    session: Session,
    spec: dict[str, Any],
    segment: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
) -> dict[str, np.ndarray]:
    """Train from a referee checkpoint through the schedule, recording parameter digests.

    The digests are those of the doctor's workers (same sketch, same seed), so the
    parent compares them with the referee's rows and the round-off envelope.
    """
    arrays = _load_arrays(segment["arrays"])
    start, end = int(segment["start"]), int(segment["end"])
    schedule, per_epoch, batch_size = _schedule(spec, len(x))
    session.load_state(*checkpoint_state(arrays, start))
    recorder = Recorder(session.model, end - start, int(spec.get("seed", 0)))
    recorder.record_parameters(0)
    for offset, step in enumerate(range(start, end)):
        batch = batch_indices(schedule, step, per_epoch, batch_size)
        logs = session.model.train_on_batch(x[batch], y[batch], return_dict=True)
        recorder.loss[offset] = float(logs["loss"])
        recorder.record_parameters(offset + 1)
    return {"segment/digest": recorder.digest, "segment/loss": recorder.loss}


def _schedule(spec: dict[str, Any], num_samples: int) -> tuple[np.ndarray, int, int]:
    epochs, batch_size = int(spec["epochs"]), int(spec["batch_size"])
    schedule = lockstep.batch_schedule(num_samples, epochs, int(spec.get("seed", 0)))
    return schedule, lockstep.steps_per_epoch(num_samples, batch_size), batch_size


def _store(
    tensors: dict[str, np.ndarray], prefix: str, values: dict[str, np.ndarray]
) -> None:
    for key, value in values.items():
        tensors[prefix + key] = _storable(value)


def _storable(value: Any) -> np.ndarray:
    """Return an array that safetensors can write: bfloat16 and other types widened."""
    array = np.ascontiguousarray(np.asarray(value))
    if array.dtype.kind == "f" and array.dtype not in (
        np.float16,
        np.float32,
        np.float64,
    ):
        return array.astype(np.float32)
    if array.dtype.kind == "V":
        return array.astype(np.float32)
    return array


def _activation_name(layer: Any) -> str | None:
    """Return the name of a layer's activation, such as "relu", or None."""
    activation = getattr(layer, "activation", None)
    if isinstance(activation, str):
        return activation
    name = getattr(activation, "__name__", None)
    if name is None and type(layer).__name__ == "ReLU":
        return "relu"
    return name


def _serialize(keras: Any, value: Any) -> Any:
    if isinstance(value, str) or value is None:
        return value
    try:
        serialized = keras.saving.serialize_keras_object(value)
        json.dumps(serialized)
        return serialized
    except (TypeError, ValueError, NotImplementedError):
        return None


def _load_arrays(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def run_cases(
    keras: Any, spec: dict[str, Any], config: Configuration
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the candidate once per case, each with its own catalogued faults.

    ``spec["cases"]`` maps a case name to a list of fault names from the
    catalogue, or to a dict with ``faults`` and optional fields. ``config`` is
    another mode or precision policy of the process's configuration, and
    ``optimizer`` the optimizer option. ``segment`` and ``own_state`` are true to
    run the spec's segment or own-state chain in that case. Catalogued faults patch Keras
    through `parity.faults.patch`, so each case undoes the previous case's
    patches, applies its faults for its own configuration and builds a new model.
    One process then serves several cases, which saves a framework import each.
    Tensors and metadata are stored under ``case/NAME/``.
    """
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"cases": {}}
    for name, case in spec["cases"].items():
        case = {"faults": case} if isinstance(case, list) else case
        case_config = parse_config(case.get("config", spec["config"]))
        _check_shares_process(case_config, config, name)
        unknown = [f for f in case["faults"] if f not in fault_catalogue.CATALOGUE]
        if unknown:
            raise ValueError(
                f"case {name!r}: only catalogued faults can be undone, not {unknown}"
            )

        fault_catalogue.undo_patches()
        for fault in case["faults"]:
            fault_catalogue.resolve_fault(fault)(case_config)
        keras.config.set_floatx(
            "float64" if case_config.precision == "float64" else "float32"
        )
        keras.config.set_dtype_policy(case_config.precision)
        case_spec = {
            **spec,
            "optimizer": case.get("optimizer"),
            "segment": spec.get("segment") if case.get("segment") else None,
            "own_state": spec.get("own_state") if case.get("own_state") else None,
        }
        case_tensors, case_meta = run_candidate(keras, case_spec, case_config)
        _store(tensors, f"case/{name}/", case_tensors)
        meta["cases"][name] = case_meta
    fault_catalogue.undo_patches()
    return tensors, meta


def _check_shares_process(
    case: Configuration, process: Configuration, name: str
) -> None:
    """Raise ValueError unless a case differs from the process only in mode or precision."""
    if not shares_process(case, process):
        raise ValueError(
            f"case {name!r}: {case} differs from the process's {process} in more than "
            "mode and precision, so it needs a worker of its own"
        )


def run(spec: dict[str, Any]) -> None:
    """Compute the tensors that the spec's role requests and write the result files.

    A referee spec may carry ``candidates``: candidate specs (with ``cases`` and
    their own ``out_dir``) whose configurations share this process, as
    `parity.setting.shares_process` defines it. They run after the referee's
    files are written, which saves a framework import each.
    """
    config = parse_config(spec["config"])
    started = time.perf_counter()
    set_environment(config, spec.get("threads"))
    keras = configure_backend(config, spec.get("threads"))
    imported = time.perf_counter()
    timing = {"import": imported - started}
    with keras.device(keras_device_name(config)):
        if spec["role"] == "referee":
            tensors, meta = run_referee(keras, spec, config)
        elif "cases" in spec:
            tensors, meta = run_cases(keras, spec, config)
        else:
            for fault in spec.get("faults", []):
                fault_catalogue.resolve_fault(fault)(config)
            tensors, meta = run_candidate(keras, spec, config)
        _write_result(spec, config, tensors, meta, timing, started)
        for candidate in spec.get("candidates", []):
            _run_riding(keras, candidate, config)


def _run_riding(keras: Any, spec: dict[str, Any], process: Configuration) -> None:
    """Run a candidate spec with ``cases`` in this process; write its files or its error."""
    started = time.perf_counter()
    try:
        tensors, meta = run_cases(keras, spec, process)
    except Exception as error:
        traceback.print_exc()
        _write_failure(spec, error)
        return
    _write_result(
        spec, parse_config(spec["config"]), tensors, meta, {"import": 0.0}, started
    )


def _write_result(
    spec: dict[str, Any],
    config: Configuration,
    tensors: dict[str, np.ndarray],
    meta: dict[str, Any],
    timing: dict[str, float],
    started: float,
) -> None:
    out_dir = Path(spec["out_dir"])
    atomic_write_tensors(out_dir / TENSORS_FILE, tensors)
    meta.update(
        {
            "format": RESULT_FORMAT,
            "status": "ok",
            "config": meta.get("config", str(config)),
            "role": spec["role"],
            "timing": {
                **meta.get("timing", {}),
                **timing,
                "total": time.perf_counter() - started,
            },
        }
    )
    atomic_write_json(out_dir / RESULT_FILE, meta)


def _write_failure(spec: dict[str, Any], error: BaseException) -> None:
    atomic_write_json(
        Path(spec["out_dir"]) / RESULT_FILE,
        {"format": RESULT_FORMAT, "status": "failed", "error": condense_error(error)},
    )


def main(argv: list[str] | None = None) -> int:
    """Run the localize worker on the spec file named in ``argv``; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m parity.localize_worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        run(spec)
    except Exception as error:
        traceback.print_exc()
        _write_failure(spec, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
