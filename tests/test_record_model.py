"""`parity record MODEL --data DATA`: traces of your own model, compared and replayed.

A small Dense ReLU network, saved as `.keras`, is recorded on scikit-learn's
`make_circles` data with TensorFlow and with JAX in separate `parity record`
processes, and once more with the fused dense+ReLU fault and a referee. These
three records and one of the circles scenario (for the replay of scenario traces)
run at once in the module's fixture. The file took about two minutes on a 2-core
x86-64 CPU shared with other work, most of it framework imports in the workers.
Input checks run in-process and fail before any worker starts, except the shape
check, which inspects the model in one subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.datasets import make_circles

from parity.cli import main
from parity.env import installed_backends
from parity.lockstep import batch_schedule, digest_bytes, initial_weights
from parity.record_model import START_FILE, data_digest
from parity.trace import read_trace, write_trace

INSTALLED = installed_backends()
pytestmark = pytest.mark.skipif(
    not {"tensorflow", "jax"} <= set(INSTALLED),
    reason=f"needs tensorflow and jax; found {INSTALLED}",
)

EPOCHS = "2"
FAULTY = "tensorflow:cpu:graph:float32"
PASSING = ("consistent", "roundoff")
# Variables of the circles scenario's model: Dense 12, Dense 8, Dense 1 on 2 inputs.
CIRCLES_NAMES = [
    "dense/kernel",
    "dense/bias",
    "dense_1/kernel",
    "dense_1/bias",
    "dense_2/kernel",
    "dense_2/bias",
]
CIRCLES_SHAPES = [(2, 12), (12,), (12, 8), (8,), (8, 1), (1,)]


def circles() -> tuple[np.ndarray, np.ndarray]:
    """Return 400 points of two noisy circles and their 0/1 labels."""
    x, y = make_circles(n_samples=400, noise=0.05, factor=0.5, random_state=0)
    return x.astype(np.float32), y


def dense_relu_model(keras, hidden: int):
    """Return a compiled Dense ReLU network with one sigmoid output for 2 inputs."""
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Write the data, data that differs, 3-feature data and two .keras models."""
    import keras

    # Seeded, so the stored initial weights are the same on every run.
    keras.utils.set_random_seed(0)
    directory = tmp_path_factory.mktemp("inputs")
    x, y = circles()
    np.savez(directory / "circles.npz", x=x, y=y)
    np.savez(directory / "shifted.npz", x=x * np.float32(1.01), y=y)
    rng = np.random.default_rng(0)
    np.savez(
        directory / "three.npz",
        x=rng.standard_normal((100, 3)).astype(np.float32),
        y=np.arange(100) % 2,
    )
    dense_relu_model(keras, 8).save(directory / "model.keras")
    dense_relu_model(keras, 4).save(directory / "other.keras")
    return directory


def record_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "parity.cli", "-q", "record", *args]


@pytest.fixture(scope="module")
def recorded(inputs, tmp_path_factory) -> dict[str, str]:
    """Record the model with TensorFlow, with JAX, and with the fault and a referee.

    Also records the circles scenario on JAX with a JAX referee, for the replay of
    scenario traces. Each record is its own `parity record` process.
    """
    directory = tmp_path_factory.mktemp("recorded")
    names = ("tf", "jax", "fault", "scenario")
    paths = {name: str(directory / f"{name}.parity") for name in names}
    model = str(inputs / "model.keras")
    data = ["--data", str(inputs / "circles.npz"), "--epochs", EPOCHS]
    commands = {
        "tf": record_command(model, *data, "--config", FAULTY, "-o", paths["tf"]),
        "jax": record_command(
            model, *data, "--config", "jax:cpu:jit:float32", "-o", paths["jax"]
        ),
        "fault": record_command(
            model, *data, "--config", FAULTY, "--fault", "fused-dense-relu",
            "--with-referee", "--jobs", "2", "-o", paths["fault"],
        ),
        "scenario": record_command(
            "--config", "jax:cpu:jit:float32", "--epochs", "1", "--with-referee",
            "--referee", "jax:cpu:jit:float64", "--jobs", "2",
            "-o", paths["scenario"],
        ),
    }  # fmt: skip
    processes = {
        name: subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, command in commands.items()
    }
    outputs = {name: process.communicate() for name, process in processes.items()}
    statuses = {name: process.returncode for name, process in processes.items()}
    assert statuses == dict.fromkeys(names, 0), outputs
    return paths


@pytest.fixture(scope="module")
def compared(recorded, tmp_path_factory) -> tuple[int, dict, Path]:
    """Run `parity compare` on the TensorFlow, JAX and faulty traces."""
    out = tmp_path_factory.mktemp("compared")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(
            ["-q", "compare", recorded["tf"], recorded["jax"], recorded["fault"],
             "--out", str(out)]
        )  # fmt: skip
    summary = json.loads((out / "results.json").read_text())
    return status, summary, out


@pytest.fixture(scope="module")
def replayed(inputs, recorded, tmp_path_factory) -> tuple[int, dict, Path]:
    """Replay the faulty trace in TensorFlow eager mode with its stored data."""
    out = tmp_path_factory.mktemp("replayed")
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(
            ["-q", "replay", recorded["fault"], str(inputs / "model.keras"),
             "--configs", "tensorflow:cpu:eager:float32", "--out", str(out)]
        )  # fmt: skip
    summary = json.loads((out / "results.json").read_text())
    return status, summary, out


def trace_meta(path: str) -> dict:
    with read_trace(path) as trace:
        return trace.meta


def trace_tensor(path: str, name: str) -> np.ndarray:
    with read_trace(path) as trace:
        return trace.tensor(name)


def run_cli(capsys, *args) -> tuple[int, str]:
    """Run `parity` in-process and return (exit status, stderr)."""
    status = main(["-q", *map(str, args)])
    return status, capsys.readouterr().err


def edited_copy(source: str, target: Path, edit) -> str:
    """Copy a trace with its meta changed by ``edit``, as a hostile writer would."""
    with read_trace(source) as trace:
        meta = json.loads(json.dumps(trace.meta))
        tensors = {name: trace.tensor(name) for name in trace.tensor_names()}
    edit(meta, tensors)
    write_trace(target, meta, tensors)
    return str(target)


# ---------------------------------------------------------------------------
# Contents of a model trace


def test_model_trace_version(recorded):
    assert trace_meta(recorded["tf"])["kind_version"] == 2


def test_model_trace_names_model(inputs, recorded):
    model = trace_meta(recorded["tf"])["model"]
    digest = hashlib.sha256((inputs / "model.keras").read_bytes()).hexdigest()
    assert model["reference"]["sha256"] == digest
    assert model["reference"]["file_name"] == "model.keras"
    assert model["summary"]["num_params"] == 2 * 8 + 8 + 8 + 1


def test_model_trace_layer_summary(recorded):
    layers = trace_meta(recorded["tf"])["model"]["summary"]["layers"]
    assert [layer["class_name"] for layer in layers] == ["Dense", "Dense"]
    assert [layer["activation"] for layer in layers] == ["relu", "sigmoid"]
    assert [layer["num_params"] for layer in layers] == [24, 9]


def test_model_trace_stores_data(recorded):
    x, y = circles()
    meta = trace_meta(recorded["tf"])
    assert meta["data"]["stored"] is True
    assert meta["data"]["sha256"] == data_digest(x, y)
    np.testing.assert_array_equal(trace_tensor(recorded["tf"], "data/x"), x)
    np.testing.assert_array_equal(trace_tensor(recorded["tf"], "data/y"), y)


def test_model_trace_training_settings(recorded):
    training = trace_meta(recorded["tf"])["training"]
    assert training["loss_name"] == "binary_crossentropy"
    assert training["optimizer_name"] == "Adam"
    assert training["learning_rate"] == 0.01


def test_model_trace_initial_weights(inputs, recorded):
    """checkpoint/0 contains the .keras file's stored weights, with the init digest."""
    import keras

    stored = keras.saving.load_model(inputs / "model.keras").get_weights()
    with read_trace(recorded["tf"]) as trace:
        digest = trace.meta["digests"]["init"]
        count = len(trace.meta["runs"][0]["result"]["variable_shapes"])
        first = [trace.tensor(f"run/0/checkpoint/0/param/{j}") for j in range(count)]
    assert digest_bytes(first) == digest
    assert digest_bytes(stored) == digest


def test_model_trace_schedule(recorded):
    schedule = trace_tensor(recorded["tf"], "schedule")
    assert schedule.shape == (int(EPOCHS), 400)


# ---------------------------------------------------------------------------
# Comparing model traces


def test_tf_and_jax_model_traces_pass(compared, recorded):
    _, summary, _ = compared
    verdicts = {entry["label"]: entry["verdict"] for entry in summary["configs"]}
    assert verdicts[f"{FAULTY} (tf.parity)"] in PASSING
    assert verdicts["jax:cpu:jit:float32 (jax.parity)"] in PASSING


def test_faulty_model_trace_divergent(compared, recorded):
    status, summary, out = compared
    verdicts = {entry["label"]: entry for entry in summary["configs"]}
    faulty = verdicts[f"{FAULTY} (fault.parity)"]
    assert faulty["verdict"] == "divergent"
    assert faulty["first_divergent_step"] == 1
    assert status == 1
    assert summary["referee_source"] == recorded["fault"]
    assert (out / "report.html").exists()


def test_model_compare_environment_differs(compared):
    _, summary, _ = compared
    rows = {row["item"]: row["values"] for row in summary["environment_differences"]}
    assert rows["backend"]["jax:cpu:jit:float32 (jax.parity)"] == "jax"
    assert rows["backend"][f"{FAULTY} (tf.parity)"] == "tensorflow"


def test_model_compare_json_names_model(compared, inputs):
    _, summary, _ = compared
    digest = hashlib.sha256((inputs / "model.keras").read_bytes()).hexdigest()
    assert summary["scenario"]["model"]["reference"]["sha256"] == digest
    assert summary["scenario"]["data"]["rows"] == 400


def test_compare_without_referee_rejected(recorded, tmp_path, capsys):
    status, err = run_cli(
        capsys, "compare", recorded["tf"], recorded["jax"], "--out", tmp_path
    )
    assert status == 2
    assert "--with-referee" in err


def test_scenario_and_model_traces_rejected(recorded, tmp_path, capsys):
    status, err = run_cli(
        capsys, "compare", recorded["scenario"], recorded["jax"], "--out", tmp_path
    )
    assert status == 2
    assert "built-in scenario 'circles'" in err
    assert "user model" in err


def test_different_data_traces_rejected(recorded, tmp_path, capsys):
    other = "0" * 64

    def edit(meta, tensors):
        meta["data"]["sha256"] = other

    changed = edited_copy(recorded["jax"], tmp_path / "changed.parity", edit)
    status, err = run_cli(
        capsys, "compare", recorded["fault"], changed, "--out", tmp_path / "out"
    )
    recorded_digest = trace_meta(recorded["fault"])["data"]["sha256"]
    assert status == 2
    assert "different data" in err
    assert other in err
    assert recorded_digest in err


def test_different_model_traces_rejected(recorded, tmp_path, capsys):
    def edit(meta, tensors):
        meta["model"]["reference"]["sha256"] = "1" * 64

    changed = edited_copy(recorded["jax"], tmp_path / "changed.parity", edit)
    status, err = run_cli(
        capsys, "compare", recorded["fault"], changed, "--out", tmp_path / "out"
    )
    assert status == 2
    assert "different models" in err


def drop(*path):
    def edit(meta, tensors):
        target = meta
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


def set_meta(value, *path):
    def edit(meta, tensors):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def drop_tensor(name):
    def edit(meta, tensors):
        del tensors[name]

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(set_meta(3, "kind_version"), "layout version 3", id="version"),
        pytest.param(drop("model"), "meta.model is missing", id="no model"),
        pytest.param(
            set_meta("evil", "model", "reference", "sha256"),
            "not a SHA-256",
            id="model digest",
        ),
        pytest.param(set_meta(399, "data", "rows"), "400 training", id="rows"),
        pytest.param(drop_tensor("data/x"), "'data/x' is missing", id="no data"),
        pytest.param(
            set_meta("os.system", "training", "options", "loss"),
            "not a Keras object name",
            id="loss name",
        ),
        pytest.param(
            set_meta("rm -rf", "training", "options", "optimizer"),
            "not a Keras object name",
            id="optimizer name",
        ),
        pytest.param(set_meta("sql", "training", "task"), "task", id="task"),
    ],
)
def test_invalid_model_trace_exits_2(recorded, tmp_path, capsys, edit, message):
    changed = edited_copy(recorded["fault"], tmp_path / "changed.parity", edit)
    status, err = run_cli(capsys, "compare", changed, "--out", tmp_path / "out")
    assert status == 2
    assert message in err


# ---------------------------------------------------------------------------
# Replaying a model trace


def test_replayed_model_passes(replayed):
    status, summary, _ = replayed
    verdicts = {entry["label"]: entry["verdict"] for entry in summary["configs"]}
    assert verdicts["tensorflow:cpu:eager:float32 (replayed here)"] in PASSING
    assert verdicts[f"{FAULTY} (recorded in fault.parity)"] == "divergent"
    assert status == 1


def test_replay_starts_from_trace_weights(replayed, recorded):
    """The replayed run's spec names the start file, and both have the init digest."""
    _, summary, out = replayed
    digest = trace_meta(recorded["fault"])["digests"]["init"]
    entry = next(e for e in summary["configs"] if "replayed here" in e["label"])
    spec_path = out / "runs" / "here-00-tensorflow-cpu-eager-float32" / "spec.json"
    spec = json.loads(spec_path.read_text())
    start = load_file(spec["start_file"])
    weights = [start[f"param/{j}"] for j in range(sum("param/" in n for n in start))]
    assert spec["start_file"] == str((out / "runs" / START_FILE).resolve())
    assert digest_bytes(weights) == digest
    assert entry["init_digest"] == digest


def test_replay_uses_stored_data(replayed):
    _, _, out = replayed
    x, _ = circles()
    with np.load(out / "data.npz") as stored:
        np.testing.assert_array_equal(stored["x"], x)


def test_replayed_scenario_starts_from_trace(recorded, tmp_path):
    """A scenario trace's replay starts from its step-0 checkpoint too."""
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(
            ["-q", "replay", recorded["scenario"], "--configs", "jax:cpu:eager:float32",
             "--out", str(tmp_path)]
        )  # fmt: skip
    summary = json.loads((tmp_path / "results.json").read_text())
    spec_path = tmp_path / "runs" / "here-00-jax-cpu-eager-float32" / "spec.json"
    spec = json.loads(spec_path.read_text())
    digest = trace_meta(recorded["scenario"])["digests"]["init"]
    replayed = next(e for e in summary["configs"] if "replayed here" in e["label"])
    assert status == 0
    assert replayed["verdict"] in PASSING
    assert os.path.isfile(spec["start_file"])
    assert replayed["init_digest"] == digest


def test_replay_without_model_rejected(recorded, tmp_path, capsys):
    status, err = run_cli(capsys, "replay", recorded["fault"], "--out", tmp_path)
    assert status == 2
    assert "MODEL" in err
    assert "model.keras" in err


def test_replay_other_data_rejected(inputs, recorded, tmp_path, capsys):
    status, err = run_cli(
        capsys, "replay", recorded["fault"], inputs / "model.keras",
        "--data", inputs / "shifted.npz", "--out", tmp_path,
    )  # fmt: skip
    x, y = circles()
    assert status == 2
    assert "shifted.npz" in err
    assert data_digest(x * np.float32(1.01), y) in err
    assert data_digest(x, y) in err


def test_replay_other_model_rejected(inputs, recorded, tmp_path, capsys):
    status, err = run_cli(
        capsys, "replay", recorded["fault"], inputs / "other.keras", "--out", tmp_path
    )
    recorded_digest = hashlib.sha256((inputs / "model.keras").read_bytes()).hexdigest()
    assert status == 2
    assert "other.keras" in err
    assert recorded_digest in err


def test_replay_scenario_with_model_rejected(inputs, recorded, tmp_path, capsys):
    status, err = run_cli(
        capsys,
        "replay",
        recorded["scenario"],
        inputs / "model.keras",
        "--out",
        tmp_path,
    )
    assert status == 2
    assert "does not apply" in err


# ---------------------------------------------------------------------------
# Input checks of parity record MODEL


def test_model_with_scenario_rejected(inputs, tmp_path, capsys):
    status, err = run_cli(
        capsys, "record", inputs / "model.keras", "--scenario", "circles",
        "--data", inputs / "circles.npz", "--config", FAULTY,
        "-o", tmp_path / "run.parity",
    )  # fmt: skip
    assert status == 2
    assert "MODEL" in err
    assert "--scenario" in err


def test_missing_data_file_rejected(inputs, tmp_path, capsys):
    status, err = run_cli(
        capsys, "record", inputs / "model.keras", "--data", tmp_path / "nowhere.npz",
        "--config", FAULTY, "-o", tmp_path / "run.parity",
    )  # fmt: skip
    assert status == 2
    assert "nowhere.npz" in err
    assert "not found" in err


def test_data_without_model_rejected(inputs, tmp_path, capsys):
    status, err = run_cli(
        capsys, "record", "--data", inputs / "circles.npz", "--config", FAULTY,
        "-o", tmp_path / "run.parity",
    )  # fmt: skip
    assert status == 2
    assert "--data applies to your own model" in err


def test_mismatched_shapes_rejected(inputs, tmp_path, capsys):
    status, err = run_cli(
        capsys, "record", inputs / "model.keras", "--data", inputs / "three.npz",
        "--config", FAULTY, "-o", tmp_path / "run.parity",
    )  # fmt: skip
    assert status == 2
    assert "shape (3,)" in err
    assert not (tmp_path / "run.parity").exists()


# ---------------------------------------------------------------------------
# The worker's start file


def run_worker(directory: Path, start: dict[str, np.ndarray]) -> dict:
    """Train circles for one epoch on JAX from a start file and return result.json."""
    from parity.io import atomic_write_tensors

    atomic_write_tensors(directory / "start.safetensors", start)
    spec = {
        "scenario": "circles",
        "epochs": 1,
        "batch_size": 250,
        "seed": 0,
        "learning_rate": 0.01,
        "activation": "relu",
        "config": "jax:cpu:jit:float32",
        "role": "candidate",
        "faults": [],
        "perturb_seed": None,
        "start_file": str(directory / "start.safetensors"),
        "out_dir": str(directory),
    }
    (directory / "spec.json").write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, "-m", "parity.worker", str(directory / "spec.json")],
        capture_output=True,
        check=False,
    )
    return json.loads((directory / "result.json").read_text())


def test_start_file_sets_initial_weights(tmp_path):
    seeded = initial_weights(CIRCLES_NAMES, CIRCLES_SHAPES, 0)
    weights = [value + np.float32(0.25) for value in seeded]
    schedule = batch_schedule(1000, 1, 0)[:, ::-1].copy()
    start = {f"param/{j}": value for j, value in enumerate(weights)}
    result = run_worker(tmp_path, {**start, "schedule": schedule})
    assert result["status"] == "ok", result
    assert result["init_digest"] == digest_bytes(weights)
    assert result["init_digest"] != digest_bytes(seeded)
    assert result["schedule_digest"] == digest_bytes([schedule])


def test_start_file_bad_schedule_fails(tmp_path):
    schedule = np.zeros((1, 1000), np.int64)  # every step would see sample 0
    result = run_worker(tmp_path, {"schedule": schedule})
    assert result["status"] == "failed"
    assert "not a permutation" in result["error"]
