"""`parity.compare`, its `Report`, and `parity.testing.assert_consistent`.

Input checks raise InputError before any worker starts. The two end-to-end tests
train scikit-learn's breast cancer data for two epochs: on TensorFlow, JAX and
PyTorch through `parity.compare`, and on TensorFlow's graph mode with an emulated
fused dense+ReLU fault through `assert_consistent`.
"""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

import parity
from parity.env import installed_backends
from parity.errors import InputError
from parity.testing import assert_consistent

INSTALLED = installed_backends()
THREE_BACKENDS = [
    "tensorflow:cpu:graph:float32",
    "jax:cpu:jit:float32",
    "torch:cpu:eager:float32",
]
FAULTY = "tensorflow:cpu:graph:float32"

needs_all = pytest.mark.skipif(
    len(INSTALLED) < 3, reason=f"needs tensorflow, jax and torch; found {INSTALLED}"
)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run each test in its own directory, where a default output directory goes."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def cancer():
    """Standardized breast cancer features (569 x 30) and 0/1 labels."""
    bunch = load_breast_cancer()
    x = (bunch.data - bunch.data.mean(axis=0)) / bunch.data.std(axis=0)
    return x.astype(np.float32), bunch.target


def relu_model(compiled: bool = True):
    """Dense 8 ReLU, Dense 1 sigmoid: the layer the fused dense+ReLU fault breaks."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((30,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    if compiled:
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


# Input checks.


def test_unknown_argument(cancer, tmp_path):
    x, y = cancer
    with pytest.raises(InputError, match="epoch_count"):
        parity.compare(relu_model(), x, y, epoch_count=3, out=tmp_path)


def test_uncompiled_model_needs_loss(cancer, tmp_path):
    x, y = cancer
    with pytest.raises(
        InputError, match=r"not compiled.*--loss NAME \(Python: loss=\)"
    ):
        parity.compare(relu_model(compiled=False), x, y, out=tmp_path)


def test_unbuilt_model(cancer, tmp_path):
    import keras

    x, y = cancer
    model = keras.Sequential([keras.layers.Dense(1, activation="sigmoid")])
    with pytest.raises(InputError, match="not built"):
        parity.compare(model, x, y, loss="binary_crossentropy", out=tmp_path)


def test_labels_beyond_binary_range(cancer, tmp_path):
    x, y = cancer
    with pytest.raises(InputError, match="range from 0 to 2"):
        parity.compare(relu_model(), x, y * 2, out=tmp_path)


def test_input_shape_mismatch(cancer, tmp_path):
    x, y = cancer
    with pytest.raises(InputError, match=r"inputs of shape \(29,\)"):
        parity.compare(relu_model(), x[:, :29], y, out=tmp_path)


def test_lengths_differ(cancer, tmp_path):
    x, y = cancer
    with pytest.raises(InputError, match="x has 569 rows but y has 568"):
        parity.compare(relu_model(), x, y[:-1], out=tmp_path)


def test_nonfinite_arrays(cancer, tmp_path):
    x, y = cancer
    x = x.copy()
    x[0, 0] = np.inf
    with pytest.raises(InputError, match="0 NaN and 1 infinite values in 1 rows"):
        parity.compare(relu_model(), x, y, out=tmp_path)


def test_text_column_in_dataframe(cancer, tmp_path):
    x, y = cancer
    frame = pd.DataFrame(x)
    frame["site"] = "a"
    with pytest.raises(InputError, match="'site'"):
        parity.compare(relu_model(), frame, y, out=tmp_path)


def test_unknown_loss(cancer, tmp_path):
    x, y = cancer
    with pytest.raises(InputError, match="Unknown loss 'binary_crossentropi'"):
        parity.compare(relu_model(), x, y, loss="binary_crossentropi", out=tmp_path)


def test_notebook_function_rejected(cancer, tmp_path):
    x, y = cancer
    with pytest.raises(InputError, match="cannot import"):
        parity.compare(lambda: relu_model(), x, y, out=tmp_path)


def test_lambda_layer_rejected(cancer, tmp_path):
    import keras

    x, y = cancer
    model = keras.Sequential(
        [
            keras.Input((30,)),
            keras.layers.Lambda(lambda t: t * 2.0),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    with pytest.raises(InputError, match="Lambda layer"):
        parity.compare(model, x, y, loss="binary_crossentropy", out=tmp_path)


def test_unknown_configuration(cancer, tmp_path):
    x, y = cancer
    with pytest.raises(parity.ConfigError, match="'tensorflow:cpu:fast'"):
        parity.compare(relu_model(), x, y, configs=["tensorflow:cpu:fast"])


# End to end.


@pytest.mark.slow
@needs_all
def test_compare_three_backends(cancer, tmp_path):
    x, y = cancer
    report = parity.compare(
        relu_model(),
        x,
        y,
        configs=THREE_BACKENDS,
        epochs=2,
        batch_size=64,
        validation_split=0.2,
        jobs=1,
        out=tmp_path / "run",
    )
    assert set(report.verdicts) == set(THREE_BACKENDS)
    for config, verdict in report.verdicts.items():
        assert verdict in ("consistent", "roundoff"), (config, report)
    assert report.ok

    summary = report.to_dict()
    assert summary["scenario"]["data"]["held_out_rows"] == 114
    assert summary["scenario"]["model"]["kind"] == "file"
    assert summary == json.loads(report.json_path.read_text())

    page = report._repr_html_()
    assert "<table>" in page
    assert "data:image/png;base64," in page
    for config in THREE_BACKENDS:
        assert config in page
    saved = report.save(tmp_path / "copy.html")
    assert "Disagreement with the referee per class" in saved.read_text()
    saved = report.save(tmp_path / "copy.json")
    assert json.loads(saved.read_text())["configs"] == summary["configs"]


TF_ONLY_FACTORY = """
import keras


class TFSquare(keras.layers.Layer):
    def call(self, inputs):
        import tensorflow as tf

        return tf.math.square(inputs)


def build():
    model = keras.Sequential(
        [
            keras.Input((30,)),
            keras.layers.Dense(8, activation="relu"),
            TFSquare(name="tf_square"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model
"""


@pytest.mark.slow
@needs_all
def test_assert_consistent_names_fault_and_layer(cancer, tmp_path):
    # One run shows both kinds of failure: the fault makes TensorFlow's graph mode
    # divergent, and PyTorch cannot run a layer that calls TensorFlow directly.
    factory = tmp_path / "tf_only.py"
    factory.write_text(TF_ONLY_FACTORY)
    x, y = cancer
    with pytest.raises(AssertionError) as caught:
        assert_consistent(
            f"{factory}:build",
            x,
            y,
            configs=[FAULTY, "torch:cpu:eager:float32"],
            faults=[f"fused-dense-relu@{FAULTY}"],
            epochs=2,
            batch_size=64,
            jobs=1,
            out=tmp_path / "run",
        )

    lines = str(caught.value).splitlines()
    assert "2 of 2 configurations did not train" in lines[0]
    assert "referee tensorflow:cpu:graph:float64 (ok)" in lines[0]
    faulty = next(line for line in lines if line.strip().startswith(FAULTY))
    assert "(faults: fused-dense-relu): divergent" in faulty
    assert "max excess" in faulty
    assert "(threshold 30x)" in faulty
    assert "first divergent step" in faulty
    torch = next(line for line in lines if "torch:cpu:eager:float32" in line)
    assert "failed" in torch
    assert "in layer 'tf_square' (TFSquare)" in torch
    assert lines[-1].startswith("Results: ")
    assert lines[-1].endswith("results.json")
