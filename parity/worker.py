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
from parity import lockstep
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


def set_environment(config: Configuration) -> None:
    """Set the variables that the backend reads when it is imported."""
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
    threads = config.threads
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if config.backend == "jax":
            eigen = "true" if threads > 1 else "false"
            xla_flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = (
                f"{xla_flags} --xla_cpu_multi_thread_eigen={eigen} "
                f"intra_op_parallelism_threads={threads}"
            ).strip()


def configure_backend(config: Configuration) -> Any:
    """Import Keras for the configuration and set threads, devices and dtype policy."""
    import keras

    if config.backend == "tensorflow":
        import tensorflow as tf

        if config.device == "cpu":
            tf.config.set_visible_devices([], "GPU")
        if config.threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(config.threads)
            tf.config.threading.set_inter_op_parallelism_threads(config.threads)
    elif config.backend == "torch":
        import torch

        if config.threads is not None:
            torch.set_num_threads(config.threads)
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
    keras: Any, model: Any, scenario: Scenario, config: Configuration, lr: float
) -> None:
    """Compile with the scenario's loss and Adam, in the configuration's execution mode."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
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
        compile_model(keras, model, scenario, config, learning_rate)

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
        flat = np.concatenate([value.astype(np.float64).ravel() for value in values])
        self.norms[step] = [
            np.linalg.norm(value.astype(np.float64)) for value in values
        ]
        self.digest[step] = self.sketch(flat)
        return values


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


def run(spec: dict[str, Any], failure: FailureContext | None = None) -> None:
    """Train one configuration as the spec says and write its result files."""
    out_dir = Path(spec["out_dir"])
    config = parse_config(spec["config"])
    started = time.perf_counter()
    set_environment(config)
    keras = configure_backend(config)
    imported = time.perf_counter()

    for fault in spec.get("faults", []):
        fault_catalogue.resolve_fault(fault)(config)

    experiment = load_experiment(spec, config)
    x32, y = experiment.x, experiment.y
    dtype = np.float64 if config.precision == "float64" else np.float32
    x = x32.astype(dtype)
    epochs, batch_size = int(spec["epochs"]), int(spec["batch_size"])
    seed = int(spec.get("seed", 0))
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
        if stored is None:
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

        def checkpoint(step: int, values: list[np.ndarray]) -> None:
            checkpoint_steps.append(step)
            for i, value in enumerate(values):
                tensors[f"checkpoint/{step}/param/{i}"] = value
            for i, value in enumerate(optimizer_values(model)):
                tensors[f"checkpoint/{step}/optimizer/{i}"] = value

        before = recorder.record_parameters(0)
        checkpoint(0, before)
        built = time.perf_counter()
        progress_every = max(1, total_steps // PROGRESS_UPDATES)
        step = 0
        # (step, batch, parameters before it, after it) of the first step whose loss
        # or parameters are not finite.
        nonfinite: tuple[int, np.ndarray, list[np.ndarray], list[np.ndarray]] | None
        nonfinite = None
        for epoch in range(epochs):
            order = schedule[epoch]
            for start in range(0, len(x), batch_size):
                batch = order[start : start + batch_size]
                logs = model.train_on_batch(x[batch], y[batch], return_dict=True)
                recorder.loss[step] = float(logs["loss"])
                recorder.accuracy[step] = float(logs.get("accuracy", np.nan))
                step += 1
                values = recorder.record_parameters(step)
                finite = np.isfinite(recorder.loss[step - 1]) and all(
                    np.all(np.isfinite(value)) for value in values
                )
                if nonfinite is None and not finite:
                    nonfinite = (step - 1, batch, before, values)
                before = values
                if step % checkpoint_every == 0 or step == total_steps:
                    checkpoint(step, values)
                if step % progress_every == 0:
                    atomic_write_json(
                        out_dir / PROGRESS_FILE, {"step": step, "total": total_steps}
                    )
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
