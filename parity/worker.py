"""One configuration's lockstep run, in a process of its own.

Run as ``python -m parity.worker SPEC.json``. The spec names the scenario, the
configuration and where to write. The worker sets the environment that the
backend reads at start-up, imports Keras, applies faults, builds the model,
loads parity's initial weights and trains step by step on parity's batch
schedule. It writes ``result.json`` (metadata) and ``arrays.safetensors``
(per-step records, checkpoints, predictions), and ``progress.json`` while it runs.
Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
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


def evaluate(
    scenario: Scenario, probabilities: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """Return loss and accuracy of predicted probabilities, computed in float64."""
    p = np.asarray(probabilities, np.float64)
    eps = 1e-7
    if scenario.task == "binary":
        p = np.clip(p.reshape(-1), eps, 1 - eps)
        labels = y.reshape(-1)
        loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
        accuracy = np.mean((p > 0.5) == (labels > 0.5))
    else:
        labels = y.reshape(-1).astype(np.int64)
        picked = np.clip(p[np.arange(len(labels)), labels], eps, 1.0)
        loss = -np.mean(np.log(picked))
        accuracy = np.mean(np.argmax(p, axis=1) == labels)
    return float(loss), float(accuracy)


def run(spec: dict[str, Any]) -> None:
    """Train one configuration as the spec says and write its result files."""
    out_dir = Path(spec["out_dir"])
    config = parse_config(spec["config"])
    scenario = get_scenario(spec["scenario"])
    started = time.perf_counter()
    set_environment(config)
    keras = configure_backend(config)
    imported = time.perf_counter()

    for fault in spec.get("faults", []):
        fault_catalogue.resolve_fault(fault)(config)

    x32, y = scenario.data()
    dtype = np.float64 if config.precision == "float64" else np.float32
    x = x32.astype(dtype)
    epochs, batch_size = int(spec["epochs"]), int(spec["batch_size"])
    seed = int(spec.get("seed", 0))
    schedule = lockstep.batch_schedule(len(x), epochs, seed)
    per_epoch = lockstep.steps_per_epoch(len(x), batch_size)
    total_steps = epochs * per_epoch
    checkpoint_every = int(spec.get("checkpoint_every") or per_epoch)

    with keras.device(keras_device_name(config)):
        model = scenario.build(keras, spec.get("activation", "relu"))
        compile_model(
            keras,
            model,
            scenario,
            config,
            spec.get("learning_rate", scenario.learning_rate),
        )
        names = [variable.path for variable in model.weights]
        shapes = [tuple(variable.shape) for variable in model.weights]
        init = lockstep.initial_weights(names, shapes, seed)
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

        checkpoint(0, recorder.record_parameters(0))
        built = time.perf_counter()
        progress_every = max(1, total_steps // PROGRESS_UPDATES)
        step = 0
        for epoch in range(epochs):
            order = schedule[epoch]
            for start in range(0, len(x), batch_size):
                batch = order[start : start + batch_size]
                logs = model.train_on_batch(x[batch], y[batch], return_dict=True)
                recorder.loss[step] = float(logs["loss"])
                recorder.accuracy[step] = float(logs.get("accuracy", np.nan))
                step += 1
                values = recorder.record_parameters(step)
                if step % checkpoint_every == 0 or step == total_steps:
                    checkpoint(step, values)
                if step % progress_every == 0:
                    atomic_write_json(
                        out_dir / PROGRESS_FILE, {"step": step, "total": total_steps}
                    )
        trained = time.perf_counter()

        data_probabilities = model.predict(x, batch_size=1024, verbose=0)
        tensors["predictions/data"] = np.asarray(data_probabilities)
        if x.ndim == 2 and x.shape[1] == 2:
            _, _, grid = decision_grid(x32)
            tensors["predictions/grid"] = np.asarray(
                model.predict(grid.astype(dtype), batch_size=4096, verbose=0)
            )
    final_loss, final_accuracy = evaluate(scenario, data_probabilities, y)

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
        "scenario": scenario.name,
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
        "final_loss": final_loss,
        "final_accuracy": final_accuracy,
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
    """Return an exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:500]


def main(argv: list[str] | None = None) -> int:
    """Run the worker on the spec file named in ``argv``; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m parity.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        run(spec)
    except Exception as error:
        traceback.print_exc()
        atomic_write_json(
            Path(spec["out_dir"]) / RESULT_FILE,
            {
                "format": RESULT_FORMAT,
                "status": "failed",
                "error": condense_error(error),
            },
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
