"""The fault catalogue: names, user faults, each fault's effect on each backend, verdicts.

Effects are measured by running this file as a script in a subprocess per backend
(``python tests/test_faults.py BACKEND``): it applies each catalogued fault in turn
to plain Keras ops, measures what changed, restores Keras and prints the numbers as
JSON. Verdicts come from short doctor runs with the real workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity import faults
from parity.cli import main as cli_main
from parity.config import Configuration
from parity.doctor import DoctorOptions, DoctorResult, run_doctor
from parity.errors import InputError

BACKENDS = ("tensorflow", "jax", "torch")

CATALOGUE_NAMES = (
    "fused-dense-relu",
    "tf32-matmul",
    "unordered-reduction",
    "nan-kernel",
    "relu-grad",
    "adam-epsilon",
    "wide-matmul",
)

# Seconds for one backend's effect probe: a framework import and a few small ops.
PROBE_TIMEOUT_SECONDS = 300


# Measurements made inside the probe subprocess.


def _numpy(keras: Any, tensor: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def _relative_error(value: np.ndarray, exact: np.ndarray) -> float:
    value = np.asarray(value, np.float64)
    exact = np.asarray(exact, np.float64)
    return float(np.max(np.abs(value - exact)) / np.max(np.abs(exact)))


def _gradient(backend: str, function: Any, x: np.ndarray) -> np.ndarray:
    """Return the gradient of ``sum(function(x))`` with respect to ``x``."""
    if backend == "tensorflow":
        import tensorflow as tf

        value = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(value)
            total = tf.reduce_sum(function(value))
        # A gradient through a gather comes back as IndexedSlices.
        return tf.convert_to_tensor(tape.gradient(total, value)).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: function(v).sum())(x))
    import torch

    value = torch.tensor(x, requires_grad=True)
    function(value).sum().backward()
    return value.grad.numpy()


def _round_tf32_reference(x: np.ndarray) -> np.ndarray:
    """Round float32 values to 11 significant bits, ties to even, with frexp."""
    mantissa, exponent = np.frexp(x.astype(np.float64))
    return np.ldexp(np.round(mantissa * 2.0**11) / 2.0**11, exponent).astype(np.float32)


def _measure_fused_dense_relu(keras, backend, rng, apply) -> dict[str, Any]:
    layer = keras.layers.Dense(6, activation="relu")
    x = rng.normal(size=(16, 3)).astype(np.float32)
    layer.build((None, 3))
    apply()
    eager = _numpy(keras, layer(x))
    measured = {"eager_min": float(eager.min()), "compiled_min": None}
    if backend == "tensorflow":
        import tensorflow as tf

        measured["compiled_min"] = float(tf.function(layer)(x).numpy().min())
    elif backend == "jax":
        # For JAX the configuration's mode decides, and the probe's is "jit".
        measured["compiled_min"] = measured.pop("eager_min")
    return measured


def _measure_tf32_matmul(keras, backend, rng, apply) -> dict[str, Any]:
    a = rng.normal(size=(8, 64)).astype(np.float32)
    b = rng.normal(size=(64, 5)).astype(np.float32)
    ties = np.array(
        [1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -(1.0 + 2.0**-11), 3.0e-3, np.inf],
        np.float32,
    )
    images = rng.uniform(size=(2, 6, 6, 1)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 1, 2)).astype(np.float32)
    exact_conv = _numpy(
        keras,
        keras.ops.conv(_round_tf32_reference(images), _round_tf32_reference(kernel)),
    )
    apply()
    product = _numpy(keras, keras.ops.matmul(a, b))
    rounded = faults.round_mantissa(keras.ops.convert_to_tensor(ties), backend)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    tf32 = _round_tf32_reference(a).astype(np.float64) @ _round_tf32_reference(b)
    conv = _numpy(keras, keras.ops.conv(images, kernel))
    return {
        "error_to_tf32": _relative_error(product, tf32),
        "error_to_exact": _relative_error(product, exact),
        "rounding_matches": bool(
            np.array_equal(_numpy(keras, rounded), _round_tf32_reference(ties))
        ),
        "conv_error_to_tf32": _relative_error(conv, exact_conv),
    }


def _measure_unordered_reduction(keras, backend, rng, apply) -> dict[str, Any]:
    a = rng.normal(size=(32, 256)).astype(np.float32)
    b = rng.normal(size=(256, 8)).astype(np.float32)
    plain = _numpy(keras, keras.ops.matmul(a, b))
    apply()
    shuffled = _numpy(keras, keras.ops.matmul(a, b))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    gradient = _gradient(backend, lambda v: keras.ops.matmul(v, b), a)
    # Every row of the gradient of sum(a @ b) with respect to a is b's row sums.
    exact_gradient = np.broadcast_to(b.astype(np.float64).sum(axis=1), a.shape)
    return {
        "error_to_exact": _relative_error(shuffled, exact),
        "plain_error_to_exact": _relative_error(plain, exact),
        "changed_elements": int(np.count_nonzero(shuffled != plain)),
        "gradient_error": _relative_error(gradient, exact_gradient),
    }


def _measure_nan_kernel(keras, backend, rng, apply) -> dict[str, Any]:
    threshold = faults.NAN_KERNEL_THRESHOLD
    a = rng.uniform(-0.9 * threshold, 0.9 * threshold, size=(6, 4)).astype(np.float32)
    a[2, 1] = 1.5 * threshold
    a[4, 0] = -3.0 * threshold
    b = rng.normal(size=(4, 3)).astype(np.float32)
    apply()
    product = _numpy(keras, keras.ops.matmul(a, b))
    rows_with_nan = np.flatnonzero(np.isnan(product).any(axis=1))
    finite_rows = np.setdiff1d(np.arange(6), rows_with_nan)
    exact = a[finite_rows].astype(np.float64) @ b
    return {
        "rows_with_nan": rows_with_nan.tolist(),
        "all_nan_in_those_rows": bool(np.isnan(product[rows_with_nan]).all()),
        "error_elsewhere": _relative_error(product[finite_rows], exact),
    }


def _measure_relu_grad(keras, backend, rng, apply) -> dict[str, Any]:
    x = np.array([-2.0, -0.5, -0.1, 0.1, 0.5, 2.0], np.float32)
    apply()
    forward = _numpy(keras, keras.activations.relu(x))
    gradient = _gradient(backend, keras.activations.relu, x)
    return {"forward": forward.tolist(), "gradient": gradient.tolist()}


def _adam_reference(
    weights: np.ndarray, gradients: list[np.ndarray], lr: float, paper: bool
) -> np.ndarray:
    """Return weights after Adam steps in float64.

    With ``paper`` epsilon is added to the square root of the bias-corrected second
    moment, as torch.optim.Adam does. Without it, as Keras 3.15 does, the bias
    correction is folded into the step size and epsilon is added to the square
    root of the raw second moment.
    """
    beta_1, beta_2, epsilon = 0.9, 0.999, 1e-7
    w = weights.astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for step, gradient in enumerate(gradients, start=1):
        m += (gradient - m) * (1 - beta_1)
        v += (gradient**2 - v) * (1 - beta_2)
        if paper:
            m_hat = m / (1 - beta_1**step)
            v_hat = v / (1 - beta_2**step)
            w -= lr * m_hat / (np.sqrt(v_hat) + epsilon)
        else:
            alpha = lr * np.sqrt(1 - beta_2**step) / (1 - beta_1**step)
            w -= alpha * m / (np.sqrt(v) + epsilon)
    return w


def _measure_adam_epsilon(keras, backend, rng, apply) -> dict[str, Any]:
    initial = np.array([1.0, -2.0, 0.5, 0.25], np.float32)
    gradients = [
        np.array([1e-3, -1e-6, 1e-7, 2.0], np.float32),
        np.array([2e-3, 1e-6, -1e-7, 1.0], np.float32),
    ]
    apply()
    variable = keras.Variable(initial)
    optimizer = keras.optimizers.Adam(learning_rate=0.1)
    for gradient in gradients:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(gradient), variable)])
    final = _numpy(keras, variable)
    paper = _adam_reference(initial, gradients, 0.1, paper=True)
    keras_form = _adam_reference(initial, gradients, 0.1, paper=False)
    return {
        "distance_to_paper": float(np.max(np.abs(final - paper))),
        "distance_to_keras": float(np.max(np.abs(final - keras_form))),
    }


def _measure_wide_matmul(keras, backend, rng, apply) -> dict[str, Any]:
    a = rng.normal(size=(4, 3)).astype(np.float32)
    wide = rng.normal(size=(3, 1100)).astype(np.float32)
    narrow = wide[:, :1000].copy()
    apply()
    product = _numpy(keras, keras.ops.matmul(a, wide))
    exact = a.astype(np.float64) @ wide
    narrow_product = _numpy(keras, keras.ops.matmul(a, narrow))
    return {
        "error_first_1024": _relative_error(product[:, :1024], exact[:, :1024]),
        "error_after_1024": _relative_error(product[:, 1024:], exact[:, 1024:]),
        "repeats_first_columns": bool(
            np.array_equal(product[:, 1024:], product[:, : 1100 - 1024])
        ),
        "error_narrow": _relative_error(narrow_product, exact[:, :1000]),
    }


MEASUREMENTS = {
    "fused-dense-relu": _measure_fused_dense_relu,
    "tf32-matmul": _measure_tf32_matmul,
    "unordered-reduction": _measure_unordered_reduction,
    "nan-kernel": _measure_nan_kernel,
    "relu-grad": _measure_relu_grad,
    "adam-epsilon": _measure_adam_epsilon,
    "wide-matmul": _measure_wide_matmul,
}


def probe(backend: str) -> dict[str, Any]:
    """Apply each catalogued fault in this process, measure it, then undo it."""
    os.environ["KERAS_BACKEND"] = backend
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import keras

    config = Configuration(backend)
    measured = {}
    for name, measure in MEASUREMENTS.items():
        rng = np.random.default_rng(0)
        try:
            measured[name] = measure(
                keras,
                backend,
                rng,
                lambda name=name: faults.CATALOGUE[name].apply(config),
            )
        finally:
            faults.undo_patches()
    return measured


# Tests that need no deep learning framework.


def test_catalogue_has_every_fault():
    assert tuple(faults.CATALOGUE) == CATALOGUE_NAMES


@pytest.mark.parametrize("name", CATALOGUE_NAMES)
def test_catalogue_entry_is_documented(name):
    fault = faults.CATALOGUE[name]
    assert fault.name == name
    assert fault.summary.endswith(".")
    assert len(fault.stands_for) > 80
    assert callable(fault.apply)


def test_parity_faults_lists_catalogue(capsys):
    assert cli_main(["faults"]) == 0
    output = capsys.readouterr().out
    for name in CATALOGUE_NAMES:
        assert name in output


def test_undo_patches_restores_attributes():
    class Owner:
        value = 1

    faults.patch(Owner, "value", 2)
    faults.patch(Owner, "value", 3)
    assert Owner.value == 3
    faults.undo_patches()
    assert Owner.value == 1


USER_FAULT_SOURCE = textwrap.dedent(
    """
    calls = []

    def record(config):
        calls.append(str(config))
    """
)


def test_user_fault_from_module(tmp_path, monkeypatch):
    (tmp_path / "my_user_faults.py").write_text(USER_FAULT_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    function = faults.resolve_fault("my_user_faults:record")
    function(Configuration("jax"))
    import my_user_faults

    assert my_user_faults.calls == ["jax:cpu:jit:float32"]
    faults.validate_fault_name("my_user_faults:record")


def test_user_fault_from_file(tmp_path):
    path = tmp_path / "fault_file.py"
    path.write_text(USER_FAULT_SOURCE)
    function = faults.resolve_fault(f"{path}:record")
    function(Configuration("torch"))
    assert function.__globals__["calls"] == ["torch:cpu:eager:float32"]
    faults.validate_fault_name(f"{path}:record")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-fault", "Unknown fault"),
        ("missing_module_xyz:function", "Cannot import module"),
        ("os:no_such_function", "has no callable"),
        ("/nonexistent/faults.py:function", "not found"),
    ],
)
def test_resolve_fault_rejects_bad_names(spec, message):
    with pytest.raises(InputError, match=message):
        faults.resolve_fault(spec)


@pytest.mark.parametrize(
    "spec", ["no-such-fault", "module:not an identifier", "/nonexistent/f.py:g"]
)
def test_validate_fault_name_rejects(spec):
    with pytest.raises(InputError):
        faults.validate_fault_name(spec)


# Each fault's effect on each backend, measured in a subprocess per backend.


@pytest.fixture(scope="module", params=BACKENDS)
def effects(request) -> tuple[str, dict[str, Any]]:
    backend = request.param
    completed = subprocess.run(
        [sys.executable, __file__, backend],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return backend, json.loads(completed.stdout.strip().splitlines()[-1])


def test_fused_dense_relu_effect(effects):
    backend, measured = effects
    result = measured["fused-dense-relu"]
    if result.get("eager_min") is not None:
        assert result["eager_min"] >= 0.0
    if result["compiled_min"] is not None:
        assert result["compiled_min"] < 0.0


def test_tf32_matmul_effect(effects):
    backend, measured = effects
    result = measured["tf32-matmul"]
    assert result["rounding_matches"]
    assert result["error_to_tf32"] < 1e-6
    assert result["error_to_exact"] > 1e-5
    assert result["conv_error_to_tf32"] < 1e-6


def test_unordered_reduction_effect(effects):
    backend, measured = effects
    result = measured["unordered-reduction"]
    assert result["changed_elements"] > 0
    assert result["error_to_exact"] < 1e-5
    assert result["gradient_error"] < 1e-5


def test_nan_kernel_effect(effects):
    backend, measured = effects
    result = measured["nan-kernel"]
    assert result["rows_with_nan"] == [2, 4]
    assert result["all_nan_in_those_rows"]
    assert result["error_elsewhere"] < 1e-6


def test_relu_grad_effect(effects):
    backend, measured = effects
    result = measured["relu-grad"]
    assert result["forward"] == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.5, 2.0])
    leak = faults.RELU_GRAD_LEAK
    assert result["gradient"] == pytest.approx([leak, leak, leak, 1.0, 1.0, 1.0])


def test_adam_epsilon_effect(effects):
    backend, measured = effects
    result = measured["adam-epsilon"]
    assert result["distance_to_paper"] < 1e-5
    assert result["distance_to_keras"] > 1e-3


def test_wide_matmul_effect(effects):
    backend, measured = effects
    result = measured["wide-matmul"]
    assert result["error_first_1024"] < 1e-6
    assert result["error_after_1024"] > 0.1
    assert result["repeats_first_columns"]
    assert result["error_narrow"] < 1e-6


# Verdicts: one short doctor run on the wide scenario, which every fault applies
# to, with each fault on a configuration of its own and every backend used. The
# effect tests above cover every fault on every backend, and
# tests/test_cases_training.py covers fused-dense-relu, adam-epsilon and
# unordered-reduction.

JOBS = 1
TF_GRAPH = "tensorflow:cpu:graph:float32"
TF_EAGER = "tensorflow:cpu:eager:float32"
JAX_JIT = "jax:cpu:jit:float32"
TORCH_EAGER = "torch:cpu:eager:float32"

FAULT_CONFIGS = {
    "wide-matmul": TF_GRAPH,
    "relu-grad": JAX_JIT,
    "tf32-matmul": TORCH_EAGER,
    # PyTorch's binary cross-entropy raises on NaN probabilities, which would make
    # the run fail instead of reaching a verdict.
    "nan-kernel": TF_EAGER,
}

# The user fault only writes a marker file, so it can share a configuration.
USER_FAULT_CONFIG = TF_EAGER

# Steps within which every fault here leaves the round-off envelope.
EARLY_STEPS = 3


def _doctor(**options: Any) -> DoctorResult:
    # Same as parity.doctor(...). NOTE: the package attribute parity.doctor is
    # replaced by the submodule once anything imports parity.doctor, so the tests
    # call run_doctor directly.
    return run_doctor(DoctorOptions(**options))


USER_FAULT_MARKER = textwrap.dedent(
    """
    import os

    def mark(config):
        with open(os.environ["PARITY_TEST_MARKER"], "a") as marker:
            marker.write(str(config) + "\\n")
    """
)


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> tuple[dict[str, Any], Path]:
    directory = tmp_path_factory.mktemp("fault-verdicts")
    user_fault = directory / "user_fault.py"
    user_fault.write_text(USER_FAULT_MARKER)
    marker = directory / "marker.txt"
    os.environ["PARITY_TEST_MARKER"] = str(marker)
    try:
        result = _doctor(
            scenario="wide",
            configs=list(FAULT_CONFIGS.values()),
            faults=[f"{name}@{config}" for name, config in FAULT_CONFIGS.items()]
            + [f"{user_fault}:mark@{USER_FAULT_CONFIG}"],
            epochs=2,
            jobs=JOBS,
            out=directory / "report",
            report=False,
        )
    finally:
        del os.environ["PARITY_TEST_MARKER"]
    entries = {entry["config"]: entry for entry in result.summary["configs"]}
    return entries, marker


@pytest.mark.parametrize("name", ["wide-matmul", "relu-grad", "tf32-matmul"])
def test_fault_divergent_from_start(verdicts, name):
    entry = verdicts[0][FAULT_CONFIGS[name]]
    assert entry["faults"] == [name]
    assert entry["verdict"] == "divergent", entry["reason"]
    assert entry["first_divergent_step"] <= EARLY_STEPS
    assert entry["first_nonfinite_step"] is None


def test_nan_kernel_divergent_nonfinite(verdicts):
    entry = verdicts[0][FAULT_CONFIGS["nan-kernel"]]
    assert entry["faults"][0] == "nan-kernel"
    assert entry["verdict"] == "divergent", entry["reason"]
    # Moons inputs exceed the threshold in every batch.
    assert entry["first_nonfinite_step"] == 0


def test_user_fault_file_runs_in_worker(verdicts):
    entries, marker = verdicts
    assert marker.read_text().splitlines() == [USER_FAULT_CONFIG]
    assert entries[USER_FAULT_CONFIG]["faults"][-1].endswith("user_fault.py:mark")


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1])))
