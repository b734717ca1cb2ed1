"""One configuration's lockstep run, in a process of its own.

Run as ``python -m parity.worker SPEC.json``. The spec names the experiment
(a built-in scenario, or a user model with the run's stored data and training
settings), the configuration and where to write. The worker sets the environment
that the backend reads at start-up, imports Keras, applies faults, builds the
model, loads the shared initial weights and trains step by step on parity's batch
schedule. It writes ``result.json`` (metadata) and ``arrays.safetensors``
(per-step records, checkpoints, predictions), and ``progress.json`` while it runs.
Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from parity import faults as fault_catalogue
from parity import lockstep, stepping
from parity.config import Configuration, parse_config
from parity.env import backend_details, fingerprint
from parity.io import atomic_write_json, atomic_write_tensors
from parity.scenarios import Scenario, decision_grid, get_scenario

RESULT_FILE = "result.json"
ARRAYS_FILE = "arrays.safetensors"
PROGRESS_FILE = "progress.json"
RESULT_FORMAT = 1

# Updates of the progress file per run; each one is a small atomic write.
PROGRESS_UPDATES = 100


def set_environment(config: Configuration, threads: int | None = None) -> None:
    """Set the variables that the backend reads when it is imported.

    ``threads`` is the intra-op thread count to use when the configuration names
    none; None leaves the backend's default.
    """
    os.environ["KERAS_BACKEND"] = config.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if config.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if config.backend == "jax":
            os.environ["JAX_PLATFORMS"] = "cpu"
    elif config.device in ("cuda", "gpu") and config.device_index is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(config.device_index)
    if config.backend == "jax" and config.precision == "float64":
        os.environ["JAX_ENABLE_X64"] = "1"
    if config.onednn is not None:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if config.onednn else "0"
    threads = config.threads or threads
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if config.backend == "jax":
            eigen = "true" if threads > 1 else "false"
            xla_flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = (
                f"{xla_flags} --xla_cpu_multi_thread_eigen={eigen} "
                f"intra_op_parallelism_threads={threads}"
            ).strip()


def configure_backend(config: Configuration, threads: int | None = None) -> Any:
    """Import Keras for the configuration and set threads, devices and dtype policy.

    ``threads`` is as in `set_environment`.
    """
    import keras

    threads = config.threads or threads
    if config.backend == "tensorflow":
        import tensorflow as tf

        if config.device == "cpu":
            tf.config.set_visible_devices([], "GPU")
        if threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif config.backend == "torch":
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
    if config.precision == "float64":
        keras.config.set_floatx("float64")
    keras.config.set_dtype_policy(config.precision)
    return keras


def keras_device_name(config: Configuration) -> str:
    """Return the device name for ``keras.device`` in the backend's own spelling."""
    index = config.device_index or 0
    if config.device == "cpu":
        return "cpu" if config.backend == "torch" else "cpu:0"
    if config.device == "mps":
        return "mps"
    if config.backend == "torch":
        return "cuda:0"
    if config.backend == "tensorflow":
        return f"gpu:{index if config.device_index is None else 0}"
    return f"{config.device}:0"


def compile_model(
    keras: Any,
    model: Any,
    scenario: Scenario,
    config: Configuration,
    lr: float,
    optimizer: str | None = None,
) -> None:
    """Compile with the scenario's loss and Adam, in the configuration's execution mode.

    ``optimizer`` set to `parity.workarounds.REFERENCE_ADAM` swaps Keras' Adam
    for the reference Adam written in plain Keras ops; None keeps Keras' Adam.
    """
    from parity.workarounds import REFERENCE_ADAM, reference_adam

    if optimizer is None:
        adam = keras.optimizers.Adam(learning_rate=lr)
    elif optimizer == REFERENCE_ADAM:
        adam = reference_adam(keras, learning_rate=lr)
    else:
        raise ValueError(
            f"invalid optimizer option {optimizer!r} in the worker spec: "
            f"use {REFERENCE_ADAM!r} or leave it out"
        )
    model.compile(
        optimizer=adam,
        loss=scenario.loss,
        metrics=["accuracy"],
        run_eagerly=config.mode == "eager",
        jit_compile=config.mode in ("xla", "jit", "compile"),
    )


@dataclasses.dataclass
class Experiment:
    """A worker's training job: data, how to build and compile the model, the task."""

    name: str
    x: np.ndarray  # float32 training inputs
    y: np.ndarray
    x_eval: np.ndarray  # float32 inputs whose predictions are compared
    y_eval: np.ndarray
    task: str  # binary, multiclass, regression or other
    from_logits: bool
    # (keras, sample batch) -> (model, stored initial weights or None for parity's)
    build: Callable[[Any, np.ndarray], tuple[Any, list[np.ndarray] | None]]
    compile: Callable[[Any, Any], None]  # (keras, model)


def scenario_experiment(spec: dict[str, Any], config: Configuration) -> Experiment:
    """Return the experiment of a built-in scenario; predictions are on its data."""
    scenario = get_scenario(spec["scenario"])
    x32, y = scenario.data()

    def build(keras: Any, sample: np.ndarray) -> tuple[Any, None]:
        return scenario.build(keras, spec.get("activation", "relu")), None

    def compile(keras: Any, model: Any) -> None:
        learning_rate = spec.get("learning_rate", scenario.learning_rate)
        compile_model(
            keras, model, scenario, config, learning_rate, spec.get("optimizer")
        )

    return Experiment(
        scenario.name, x32, y, x32, y, scenario.task, False, build, compile
    )


class Recorder:
    """Per-step records: loss, batch accuracy, variable norms and a parameter sketch."""

    def __init__(self, model: Any, total_steps: int, seed: int):
        self.variables = list(model.weights)
        self.names = [variable.path for variable in self.variables]
        num_params = sum(int(np.prod(variable.shape)) for variable in self.variables)
        self.sketch = lockstep.Sketch(num_params, seed)
        self.loss = np.full(total_steps, np.nan)
        self.accuracy = np.full(total_steps, np.nan)
        self.norms = np.zeros((total_steps + 1, len(self.variables)))
        self.digest = np.zeros((total_steps + 1, self.sketch.size))

    def parameters(self) -> list[np.ndarray]:
        """Return the current values of all model variables as numpy arrays."""
        return [np.asarray(variable.numpy()) for variable in self.variables]

    def record_parameters(self, step: int) -> list[np.ndarray]:
        """Store norms and the sketch of the parameters after ``step`` updates."""
        values = self.parameters()
        self.record_many(step, [values])
        return values

    def record_many(self, first: int, snapshots: list[list[np.ndarray]]) -> None:
        """Store norms and sketches of consecutive snapshots, the first after ``first`` updates."""
        if not snapshots:
            return
        flat = np.stack(
            [
                np.concatenate([np.ravel(value) for value in values]).astype(np.float64)
                for values in snapshots
            ]
        )
        sizes = [int(np.size(value)) for value in snapshots[0]]
        offsets = np.cumsum([0, *sizes[:-1]])
        rows = slice(first, first + len(snapshots))
        if flat.shape[1]:
            squares = np.add.reduceat(flat * flat, offsets, axis=1)
            # reduceat returns the element at an offset for an empty variable.
            squares[:, np.array(sizes) == 0] = 0.0
            self.norms[rows] = np.sqrt(squares)
        self.digest[rows] = self.sketch.many(flat)


def optimizer_values(model: Any) -> list[np.ndarray]:
    """Return the optimizer's variables (step count, moments) as numpy arrays."""
    return [np.asarray(variable.numpy()) for variable in model.optimizer.variables]


def locate_nonfinite(
    keras: Any,
    model: Any,
    batch: np.ndarray,
    before: list[np.ndarray],
    after: list[np.ndarray],
) -> dict[str, Any]:
    """Find the layer and phase where the first non-finite step went wrong.

    The forward pass is rerun layer by layer on the step's batch with the weights
    from before the step. The first layer with a non-finite output is named, with
    phase "forward". If every output is finite, the loss or the update made the
    non-finite value: phase "update" names the first layer whose variables became
    non-finite, and phase "loss" names no layer. The model's weights are restored.
    """
    current = model.get_weights()
    layers = [
        layer for layer in model.layers if layer.__class__.__name__ != "InputLayer"
    ]
    try:
        model.set_weights(before)
        probe = keras.Model(model.inputs, [layer.output for layer in layers])
        outputs = probe(batch)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for layer, output in zip(layers, outputs, strict=True):
            if not np.all(np.isfinite(keras.ops.convert_to_numpy(output))):
                return {"layer": layer.name, "phase": "forward"}
    finally:
        model.set_weights(current)
    paths = [variable.path for variable in model.weights]
    for path, value in zip(paths, after, strict=True):
        if not np.all(np.isfinite(value)):
            owner = next(
                (
                    layer.name
                    for layer in layers
                    if path in [w.path for w in layer.weights]
                ),
                None,
            )
            return {"layer": owner, "phase": "update"}
    return {"layer": None, "phase": "loss"}


def to_probabilities(outputs: np.ndarray, task: str, from_logits: bool) -> np.ndarray:
    """Turn logits into probabilities in float64 (sigmoid or softmax) for classifiers."""
    values = np.asarray(outputs)
    if not from_logits or task not in ("binary", "multiclass"):
        return values
    logits = values.astype(np.float64)
    if task == "binary":
        return 0.5 * (1.0 + np.tanh(0.5 * logits))
    shifted = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    return shifted / np.sum(shifted, axis=-1, keepdims=True)


def evaluate(
    task: str, probabilities: np.ndarray, y: np.ndarray
) -> tuple[float | None, float | None]:
    """Return loss and accuracy of predicted probabilities, computed in float64.

    Only classification is evaluated here, with cross-entropy; regression and
    other losses return None for both.
    """
    if task not in ("binary", "multiclass"):
        return None, None
    p = np.asarray(probabilities, np.float64)
    eps = 1e-7
    if task == "binary":
        p = np.clip(p.reshape(-1), eps, 1 - eps)
        labels = y.reshape(-1)
        loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
        accuracy = np.mean((p > 0.5) == (labels > 0.5))
    else:
        one_hot = y.ndim == 2 and y.shape[1] > 1
        labels = np.argmax(y, axis=1) if one_hot else y.reshape(-1).astype(np.int64)
        picked = np.clip(p[np.arange(len(labels)), labels], eps, 1.0)
        loss = -np.mean(np.log(picked))
        accuracy = np.mean(np.argmax(p, axis=1) == labels)
    return float(loss), float(accuracy)


@dataclasses.dataclass
class FailureContext:
    """The model and a sample batch, kept so that a failure can be traced to a layer."""

    model: Any = None
    sample: np.ndarray | None = None


def load_experiment(spec: dict[str, Any], config: Configuration) -> Experiment:
    """Return the spec's experiment: a built-in scenario or a user model."""
    if "scenario" in spec:
        return scenario_experiment(spec, config)
    from parity.models import user_experiment

    return user_experiment(spec, config)


def read_start_file(path: str | None) -> dict[str, np.ndarray]:
    """Read the spec's ``start_file``: the tensors a run starts from, if it names one.

    The file is safetensors, with the initial weights as ``param/0``, ``param/1``,
    ... in the model's variable order and the batch schedule as ``schedule``.
    Either part may be missing, and the worker then makes that part from the seed
    (or takes a ``.keras`` file's stored weights). Replay writes it from a trace.
    """
    if path is None:
        return {}
    from safetensors.numpy import load_file

    return load_file(path)


def start_schedule(schedule: np.ndarray, samples: int, epochs: int) -> np.ndarray:
    """Return the start file's batch schedule after checking it against the data."""
    if schedule.shape != (epochs, samples) or schedule.dtype.kind not in "iu":
        raise ValueError(
            f"The start file's schedule is {schedule.dtype} {list(schedule.shape)}, "
            f"but {epochs} epochs of {samples} samples need integers of shape "
            f"[{epochs}, {samples}]."
        )
    expected = np.arange(samples)
    for epoch, order in enumerate(schedule):
        if not np.array_equal(np.sort(order), expected):
            raise ValueError(
                f"Row {epoch} of the start file's schedule is not a permutation of "
                f"the {samples} samples."
            )
    return schedule.astype(np.int64)


def start_weights(
    start: dict[str, np.ndarray], names: list[str], shapes: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Return the start file's initial weights as float32, checked against the model."""
    count = sum(name.startswith("param/") for name in start)
    if count != len(shapes):
        raise ValueError(
            f"The start file has {count} initial weights, but the model has "
            f"{len(shapes)} variables."
        )
    values = []
    for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        value = start.get(f"param/{i}")
        if value is None or tuple(value.shape) != tuple(shape):
            found = "missing" if value is None else list(value.shape)
            raise ValueError(
                f"Initial weight param/{i} of the start file is {found}, but the "
                f"model's variable {name} has shape {list(shape)}."
            )
        values.append(np.asarray(value, np.float32))
    return values


def run(spec: dict[str, Any], failure: FailureContext | None = None) -> None:
    """Train one configuration as the spec says and write its result files."""
    out_dir = Path(spec["out_dir"])
    config = parse_config(spec["config"])
    started = time.perf_counter()
    threads = spec.get("threads")
    set_environment(config, threads)
    keras = configure_backend(config, threads)
    imported = time.perf_counter()

    for fault in spec.get("faults", []):
        fault_catalogue.resolve_fault(fault)(config)

    experiment = load_experiment(spec, config)
    x32, y = experiment.x, experiment.y
    dtype = np.float64 if config.precision == "float64" else np.float32
    x = x32.astype(dtype)
    epochs, batch_size = int(spec["epochs"]), int(spec["batch_size"])
    seed = int(spec.get("seed", 0))
    start_tensors = read_start_file(spec.get("start_file"))
    if "schedule" in start_tensors:
        schedule = start_schedule(start_tensors["schedule"], len(x), epochs)
    else:
        schedule = lockstep.batch_schedule(len(x), epochs, seed)
    per_epoch = lockstep.steps_per_epoch(len(x), batch_size)
    total_steps = epochs * per_epoch
    checkpoint_every = int(spec.get("checkpoint_every") or per_epoch)

    with keras.device(keras_device_name(config)):
        failure = failure or FailureContext()
        failure.sample = x[:2]
        model, stored = experiment.build(keras, x[:2])
        failure.model = model
        experiment.compile(keras, model)
        names = [variable.path for variable in model.weights]
        shapes = [tuple(variable.shape) for variable in model.weights]
        if any(name.startswith("param/") for name in start_tensors):
            init = start_weights(start_tensors, names, shapes)
        elif stored is None:
            init = lockstep.initial_weights(names, shapes, seed)
        else:
            init = stored
        init_digest = lockstep.digest_bytes(init)
        if spec.get("perturb_seed") is not None:
            init = lockstep.perturb_ulp(init, int(spec["perturb_seed"]))
        model.set_weights(
            [
                value.astype(variable.dtype)
                for value, variable in zip(init, model.weights, strict=True)
            ]
        )

        recorder = Recorder(model, total_steps, seed)
        tensors: dict[str, np.ndarray] = {}
        checkpoint_steps = []

        stepper = stepping.make_stepper(model, config.backend, config.mode)

        def checkpoint(step: int, values: list[np.ndarray]) -> None:
            checkpoint_steps.append(step)
            for i, value in enumerate(values):
                tensors[f"checkpoint/{step}/param/{i}"] = value
            for i, value in enumerate(stepper.optimizer_values()):
                tensors[f"checkpoint/{step}/optimizer/{i}"] = value

        before = recorder.record_parameters(0)
        checkpoint(0, before)
        built = time.perf_counter()
        progress_every = max(1, total_steps // PROGRESS_UPDATES)
        batches = [
            order[start : start + batch_size]
            for order in schedule
            for start in range(0, len(x), batch_size)
        ]
        longest = stepping.chunk_length(
            sum(value.nbytes for value in before), checkpoint_every
        )
        # (step, batch, parameters before it, after it) of the first step whose loss
        # or parameters are not finite.
        nonfinite: tuple[int, np.ndarray, list[np.ndarray], list[np.ndarray]] | None
        nonfinite = None
        step = 0
        while step < total_steps:
            # Chunks end at every checkpoint and progress update.
            end = min(
                total_steps,
                (step // checkpoint_every + 1) * checkpoint_every,
                (step // progress_every + 1) * progress_every,
                step + longest,
            )
            chunk = stepper.run([(x[b], y[b]) for b in batches[step:end]])
            recorder.loss[step:end] = chunk.loss
            recorder.accuracy[step:end] = chunk.accuracy
            recorder.record_many(step + 1, chunk.weights)
            if nonfinite is None:
                # Norms are sums of squares in float64, finite for any finite float32.
                finite = np.isfinite(chunk.loss) & np.all(
                    np.isfinite(recorder.norms[step + 1 : end + 1]), axis=1
                )
                if not finite.all():
                    k = int(np.argmin(finite))
                    previous = chunk.weights[k - 1] if k else before
                    nonfinite = (
                        step + k,
                        batches[step + k],
                        previous,
                        chunk.weights[k],
                    )
            before = chunk.weights[-1]
            step = end
            if step % checkpoint_every == 0 or step == total_steps:
                checkpoint(step, before)
            if step % progress_every == 0 or step == total_steps:
                atomic_write_json(
                    out_dir / PROGRESS_FILE, {"step": step, "total": total_steps}
                )
        stepper.finish()
        trained = time.perf_counter()

        located: dict[str, Any] = {"step": None, "layer": None, "phase": None}
        if nonfinite is not None:
            first_step, first_batch, weights_before, weights_after = nonfinite
            located = {"step": first_step, "layer": None, "phase": None}
            try:
                located.update(
                    locate_nonfinite(
                        keras, model, x[first_batch], weights_before, weights_after
                    )
                )
            except Exception:
                # The run itself finished; report it without the layer.
                traceback.print_exc()

        classifier = experiment.task in ("binary", "multiclass")
        x_eval = experiment.x_eval.astype(dtype)
        data_probabilities = to_probabilities(
            model.predict(x_eval, batch_size=1024, verbose=0),
            experiment.task,
            experiment.from_logits,
        )
        # Verdicts compare predicted classes, so other outputs are kept apart.
        # NOTE: without class predictions a regression model is at best roundoff,
        # never consistent, until verdicts compare output values too.
        key = "predictions/data" if classifier else "predictions/values"
        tensors[key] = np.asarray(data_probabilities)
        if classifier and x_eval.ndim == 2 and x_eval.shape[1] == 2:
            _, _, grid = decision_grid(experiment.x_eval)
            tensors["predictions/grid"] = to_probabilities(
                model.predict(grid.astype(dtype), batch_size=4096, verbose=0),
                experiment.task,
                experiment.from_logits,
            )
    final_loss, final_accuracy = evaluate(
        experiment.task, data_probabilities, experiment.y_eval
    )

    tensors.update(
        {
            "steps/loss": recorder.loss,
            "steps/accuracy": recorder.accuracy,
            "steps/norms": recorder.norms,
            "steps/digest": recorder.digest,
            "schedule": schedule,
        }
    )
    atomic_write_tensors(out_dir / ARRAYS_FILE, tensors)
    result = {
        "format": RESULT_FORMAT,
        "status": "ok",
        "config": str(config),
        "role": spec.get("role", "candidate"),
        "scenario": experiment.name,
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": total_steps,
        "steps_per_epoch": per_epoch,
        "checkpoint_steps": checkpoint_steps,
        "variable_names": recorder.names,
        "variable_shapes": [list(shape) for shape in shapes],
        "num_params": recorder.sketch.num_params,
        "init_digest": init_digest,
        "schedule_digest": lockstep.digest_bytes([schedule]),
        "data_digest": lockstep.digest_bytes([x32]),
        "perturb_seed": spec.get("perturb_seed"),
        "faults": spec.get("faults", []),
        "resume_key": spec.get("resume_key"),
        "final_loss": final_loss,
        "final_accuracy": final_accuracy,
        "first_nonfinite_step": located["step"],
        "first_nonfinite_layer": located["layer"],
        "first_nonfinite_phase": located["phase"],
        "timing": {
            "import": imported - started,
            "build": built - imported,
            "train": trained - built,
            "total": time.perf_counter() - started,
        },
        "environment": fingerprint(backend_details(config.backend)),
    }
    atomic_write_json(out_dir / RESULT_FILE, result)


def condense_error(error: BaseException) -> str:
    """Return an exception as one line: its type and its most telling message line."""
    from parity.models import condense_error as condense

    return condense(error)


def main(argv: list[str] | None = None) -> int:
    """Run the worker on the spec file named in ``argv``; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m parity.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    failure = FailureContext()
    try:
        run(spec, failure)
    except Exception as error:
        traceback.print_exc()
        from parity.models import describe_failure

        atomic_write_json(
            Path(spec["out_dir"]) / RESULT_FILE,
            {
                "format": RESULT_FORMAT,
                "status": "failed",
                "error": describe_failure(error, failure.model, failure.sample),
            },
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
