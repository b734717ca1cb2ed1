"""`parity run`: your own Keras model and data, judged like the doctor's scenarios.

The input checks run in-process through `parity.cli.main` and fail before any
worker starts, so most of them take well under a second. Checks that need the
model's output shape, or a factory's code, start one inspection subprocess. The
end-to-end runs train scikit-learn's bundled datasets for two epochs on
TensorFlow, JAX and PyTorch.
"""

import json
import zipfile

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_digits

from parity.cli import main
from parity.env import installed_backends
from parity.errors import InputError
from parity.runner import load_result_arrays
from parity.sources import prepare_labels, read_data

INSTALLED = installed_backends()
THREE_BACKENDS = (
    "tensorflow:cpu:graph:float32,jax:cpu:jit:float32,torch:cpu:eager:float32"
)
PASSING = ("consistent", "roundoff")

needs_all = pytest.mark.skipif(
    len(INSTALLED) < 3, reason=f"needs tensorflow, jax and torch; found {INSTALLED}"
)


def breast_cancer() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return standardized breast cancer features, 0/1 labels and feature names."""
    bunch = load_breast_cancer()
    x = (bunch.data - bunch.data.mean(axis=0)) / bunch.data.std(axis=0)
    return x.astype(np.float32), bunch.target, list(bunch.feature_names)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the 8x8 digit images as 64 features in 0..1 and the class indices."""
    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run each test in its own directory, where the default parity-report goes."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Write both datasets as .npz and .csv, and two .keras models, to a directory."""
    import keras

    # Seeded, so the models' stored initial weights and the accuracies they reach
    # are the same on every run.
    keras.utils.set_random_seed(0)
    directory = tmp_path_factory.mktemp("inputs")
    x, y, names = breast_cancer()
    np.savez(directory / "cancer.npz", x=x, y=y)
    table = pd.DataFrame(x, columns=names)
    table["diagnosis"] = y
    table.to_csv(directory / "cancer.csv", index=False)
    pixels, labels = digits()
    np.savez(directory / "digits.npz", x=pixels, y=labels)
    table = pd.DataFrame(pixels, columns=[f"pixel_{i}" for i in range(64)])
    table["digit"] = labels
    table.to_csv(directory / "digits.csv", index=False)

    cancer_model = keras.Sequential(
        [
            keras.Input((30,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    cancer_model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy"
    )
    cancer_model.save(directory / "cancer.keras")
    # Not compiled, so the test passes --loss, --optimizer and --lr.
    digits_model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    digits_model.save(directory / "digits.keras")
    return directory


def run_cli(capsys, *args):
    """Run `parity` in-process and return (exit status, stderr)."""
    status = main(["-q", *map(str, args)])
    return status, capsys.readouterr().err


# Input checks that need no framework.


def test_tables_and_npz_read_alike(files):
    for name, target in (("cancer", "diagnosis"), ("digits", "digit")):
        from_npz = read_data(files / f"{name}.npz")
        from_csv = read_data(files / f"{name}.csv", target=target)
        np.testing.assert_allclose(from_csv.x, from_npz.x, rtol=1e-6)
        np.testing.assert_array_equal(from_csv.y, from_npz.y)


def test_npy_pair_reads(files, tmp_path):
    x, y, _ = breast_cancer()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    dataset = read_data(f"{tmp_path / 'x.npy'},{tmp_path / 'y.npy'}")
    assert dataset.x.shape == (569, 30)
    assert dataset.y.shape == (569,)


def test_parquet_reads(files, tmp_path):
    x, y, names = breast_cancer()
    table = pd.DataFrame(x, columns=names)
    table["diagnosis"] = y
    table.to_parquet(tmp_path / "cancer.parquet")
    dataset = read_data(tmp_path / "cancer.parquet", target="diagnosis")
    assert dataset.x.shape == (569, 30)
    assert dataset.feature_names == names


def test_missing_data_file(files, tmp_path, capsys):
    status, err = run_cli(
        capsys, "run", files / "cancer.keras", "--data", tmp_path / "nowhere.npz"
    )
    assert status == 2
    assert "nowhere.npz" in err
    assert "not found" in err


def test_unreadable_npz(files, tmp_path, capsys):
    (tmp_path / "broken.npz").write_bytes(b"not an archive at all")
    status, err = run_cli(
        capsys, "run", files / "cancer.keras", "--data", tmp_path / "broken.npz"
    )
    assert status == 2
    assert "broken.npz" in err
    assert "numpy.savez" in err


def test_npz_without_named_arrays(files, tmp_path, capsys):
    np.savez(tmp_path / "named.npz", features=np.ones((4, 30)), labels=np.ones(4))
    status, err = run_cli(
        capsys, "run", files / "cancer.keras", "--data", tmp_path / "named.npz"
    )
    assert status == 2
    assert "'features'" in err
    assert "--x NAME --y NAME" in err


def test_missing_model_file(files, tmp_path, capsys):
    status, err = run_cli(
        capsys, "run", tmp_path / "absent.keras", "--data", files / "cancer.npz"
    )
    assert status == 2
    assert "absent.keras" in err
    assert "not found" in err


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("text.keras", b"just some text", "not a zip"),
        ("legacy.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "legacy .h5"),
    ],
)
def test_model_file_not_keras_archive(files, tmp_path, capsys, name, content, expected):
    (tmp_path / name).write_bytes(content)
    status, err = run_cli(
        capsys, "run", tmp_path / name, "--data", files / "cancer.npz"
    )
    assert status == 2
    assert name in err
    assert expected in err
    assert "model.save('model.keras')" in err


def test_zip_without_keras_config(files, tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("readme.txt", "not a model")
    status, err = run_cli(
        capsys, "run", tmp_path / "other.keras", "--data", files / "cancer.npz"
    )
    assert status == 2
    assert "no config.json" in err


def test_x_and_y_lengths_differ(files, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((10, 30), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(9))
    pair = f"{tmp_path / 'x.npy'},{tmp_path / 'y.npy'}"
    status, err = run_cli(capsys, "run", files / "cancer.keras", "--data", pair)
    assert status == 2
    assert "x has 10 rows but y has 9" in err


def test_nonfinite_data_is_counted(files, tmp_path, capsys):
    x, y, _ = breast_cancer()
    x[3, 0] = np.nan
    x[7, 2] = np.inf
    x[7, 4] = np.nan
    np.savez(tmp_path / "holes.npz", x=x, y=y)
    status, err = run_cli(
        capsys, "run", files / "cancer.keras", "--data", tmp_path / "holes.npz"
    )
    assert status == 2
    assert "2 NaN and 1 infinite values in 2 rows" in err
    assert "first rows 3, 7" in err
    assert "--allow-nonfinite" in err


def test_allow_nonfinite_goes_on(files, tmp_path, capsys):
    x, y, _ = breast_cancer()
    x[3, 0] = np.nan
    np.savez(tmp_path / "holes.npz", x=x, y=y)
    # The next check, on the batch size, shows that the NaN check let it through.
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        tmp_path / "holes.npz",
        "--allow-nonfinite",
        "--batch-size",
        "1000",
    )
    assert status == 2
    assert "NaN" not in err
    assert "Batch size 1000" in err


def test_nonfinite_table_names_columns(files, tmp_path, capsys):
    table = pd.read_csv(files / "cancer.csv")
    table.loc[5, "mean radius"] = None
    table.to_csv(tmp_path / "gaps.csv", index=False)
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        tmp_path / "gaps.csv",
        "--target",
        "diagnosis",
    )
    assert status == 2
    assert "1 NaN" in err
    assert "'mean radius'" in err


def test_string_column_in_csv(files, tmp_path, capsys):
    table = pd.read_csv(files / "cancer.csv")
    table["hospital"] = "north"
    table.to_csv(tmp_path / "text.csv", index=False)
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        tmp_path / "text.csv",
        "--target",
        "diagnosis",
    )
    assert status == 2
    assert "'hospital'" in err
    assert "contain text" in err


def test_csv_needs_target(files, capsys):
    status, err = run_cli(
        capsys, "run", files / "cancer.keras", "--data", files / "cancer.csv"
    )
    assert status == 2
    assert "--target COLUMN" in err
    assert "'diagnosis'" in err


def test_unknown_target_column(files, capsys):
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        files / "cancer.csv",
        "--target",
        "label",
    )
    assert status == 2
    assert "'label'" in err
    assert "not found" in err


def test_empty_dataset(files, tmp_path, capsys):
    pd.read_csv(files / "cancer.csv").head(0).to_csv(
        tmp_path / "empty.csv", index=False
    )
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        tmp_path / "empty.csv",
        "--target",
        "diagnosis",
    )
    assert status == 2
    assert "empty" in err


def test_batch_larger_than_data(files, capsys):
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        files / "cancer.npz",
        "--batch-size",
        "600",
    )
    assert status == 2
    assert "Batch size 600" in err
    assert "569 training rows" in err


def test_batch_larger_than_training_split(files, capsys):
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        files / "cancer.npz",
        "--batch-size",
        "500",
        "--validation-split",
        "0.2",
    )
    assert status == 2
    assert "455 training rows" in err


def test_invalid_validation_split(files, capsys):
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        files / "cancer.npz",
        "--validation-split",
        "1.5",
    )
    assert status == 2
    assert "--validation-split 1.5" in err


def test_unknown_configuration(files, capsys):
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        files / "cancer.npz",
        "--configs",
        "tensorflow:cpu:turbo:float32",
    )
    assert status == 2
    assert "'turbo'" in err


def test_invalid_learning_rate(files, capsys):
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        files / "cancer.npz",
        "--lr",
        "-1",
    )
    assert status == 2
    assert "--lr -1" in err


def test_factory_file_missing(files, capsys):
    status, err = run_cli(
        capsys, "run", "nowhere.py:build", "--data", files / "cancer.npz"
    )
    assert status == 2
    assert "'nowhere.py'" in err


def test_factory_module_missing(files, capsys):
    status, err = run_cli(
        capsys, "run", "no_such_module_here:build", "--data", files / "cancer.npz"
    )
    assert status == 2
    assert "'no_such_module_here'" in err


# Label checks: the loss and the model's output shape decide what fits.


@pytest.mark.parametrize(
    ("labels", "loss", "output", "expected"),
    [
        (np.array([0, 1, 2]), "binary_crossentropy", (None, 1), "range from 0 to 2"),
        (np.array([0, 1, 1]), "binary_crossentropy", (None, 3), "has 3 outputs"),
        (np.array([0, 3, 10]), "sparse_categorical_crossentropy", (None, 10), "0 to 9"),
        (np.array([0.5, 1.0]), "sparse_categorical_crossentropy", (None, 3), "whole"),
        (np.array([0, 1]), "sparse_categorical_crossentropy", (None, 1), "one output"),
        (np.array([0, 2]), "categorical_crossentropy", (None, 3), "one-hot rows"),
        (np.ones((2, 4)), "categorical_crossentropy", (None, 3), "length 3"),
        (np.ones((2, 2)), "mean_squared_error", (None, 1), "element by element"),
    ],
)
def test_labels_that_do_not_fit(labels, loss, output, expected):
    with pytest.raises(InputError, match=expected):
        prepare_labels(labels, loss, output, "test data")


def test_labels_that_fit():
    binary = prepare_labels(np.array([0, 1, 1]), "binary_crossentropy", (None, 1), "")
    assert binary.train.shape == (3, 1)
    assert binary.task == "binary"
    sparse = prepare_labels(
        np.array([2, 0]), "sparse_categorical_crossentropy", (None, 3), ""
    )
    assert sparse.train.dtype == np.int32
    assert sparse.num_classes == 3
    one_hot = prepare_labels(
        np.eye(3)[[2, 0]], "categorical_crossentropy", (None, 3), ""
    )
    assert list(one_hot.classes) == [2, 0]


# Checks that inspect the model in a subprocess (about 10 to 20 s each).


CUSTOM_LAYER_MODULE = """
import keras


@keras.saving.register_keras_serializable(package="parity_tests")
class Doubling(keras.layers.Layer):
    def call(self, inputs):
        return inputs * 2.0
"""


@pytest.fixture
def custom_layer_model(tmp_path, monkeypatch):
    """Save a model with a registered custom layer from a module in tmp_path."""
    import importlib

    import keras

    (tmp_path / "doubling_layers.py").write_text(CUSTOM_LAYER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("doubling_layers")
    model = keras.Sequential(
        [
            keras.Input((30,)),
            module.Doubling(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.save(tmp_path / "custom.keras")
    return tmp_path / "custom.keras"


def test_custom_layer_needs_import(files, custom_layer_model, capsys):
    status, err = run_cli(
        capsys, "run", custom_layer_model, "--data", files / "cancer.npz"
    )
    assert status == 2
    assert "Could not locate class 'Doubling'" in err
    assert "--import MODULE" in err


def test_labels_out_of_range_for_loss(files, custom_layer_model, tmp_path, capsys):
    # The model loads with --import, so the run gets as far as the label check.
    x, y, _ = breast_cancer()
    np.savez(tmp_path / "three.npz", x=x, y=y * 2)
    status, err = run_cli(
        capsys,
        "run",
        custom_layer_model,
        "--import",
        "doubling_layers",
        "--data",
        tmp_path / "three.npz",
    )
    assert status == 2
    assert "range from 0 to 2" in err
    assert "binary_crossentropy" in err


def test_factory_that_raises(files, tmp_path, capsys):
    factory = tmp_path / "broken_factory.py"
    factory.write_text(
        "def build():\n    raise ValueError('the config file has no units entry')\n"
    )
    status, err = run_cli(
        capsys, "run", f"{factory}:build", "--data", files / "cancer.npz"
    )
    assert status == 2
    assert "raised ValueError: the config file has no units entry" in err


def test_lambda_code_never_runs(files, tmp_path, capsys):
    import keras

    marker = tmp_path / "lambda-ran"
    # The path is a constant in the function's code, which Keras stores as bytecode.
    touch = eval(
        f"lambda t: (__import__('pathlib').Path({str(marker)!r}).touch(), t)[1]"
    )
    model = keras.Sequential(
        [
            keras.Input((30,)),
            keras.layers.Lambda(touch),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.save(tmp_path / "lambda.keras")
    marker.unlink(missing_ok=True)
    status, err = run_cli(
        capsys,
        "run",
        tmp_path / "lambda.keras",
        "--data",
        files / "cancer.npz",
        "--loss",
        "binary_crossentropy",
    )
    assert status == 2
    assert "safe mode" in err
    assert not marker.exists()


# End to end on three backends.


def read_summary(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@needs_all
def test_breast_cancer_csv_three_backends(files, tmp_path, capsys):
    out = tmp_path / "report"
    status, err = run_cli(
        capsys,
        "run",
        files / "cancer.keras",
        "--data",
        files / "cancer.csv",
        "--target",
        "diagnosis",
        "--configs",
        THREE_BACKENDS,
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--jobs",
        "1",
        "--out",
        out,
    )

    summary = read_summary(out)
    verdicts = {entry["config"]: entry["verdict"] for entry in summary["configs"]}
    assert status == 0, (err[-2000:], verdicts)
    assert set(verdicts) == set(THREE_BACKENDS.split(","))
    assert all(verdict in PASSING for verdict in verdicts.values()), verdicts
    assert summary["referee"]["status"] == "ok"
    assert summary["scenario"]["training"]["loss_name"] == "binary_crossentropy"
    assert summary["scenario"]["training"]["learning_rate"] == 0.01
    assert summary["scenario"]["data"]["train_rows"] == 569

    # Every run starts from the weights stored in the file, upcast for the referee.
    import keras

    stored = keras.saving.load_model(files / "cancer.keras").get_weights()
    referee_dir = next((out / "runs").glob("referee-*"))
    arrays = load_result_arrays(referee_dir)
    for index, value in enumerate(stored):
        start = arrays[f"checkpoint/0/param/{index}"]
        assert start.dtype == np.float64
        np.testing.assert_array_equal(start, value.astype(np.float64))
    digests = {entry["init_digest"] for entry in summary["configs"]}
    digests |= {entry["init_digest"] for entry in summary["envelope"]}
    assert digests == {summary["referee"]["init_digest"]}

    page = (out / "report.html").read_text()
    assert "Disagreement with the referee per class" in page
    assert "Predicted classes compared between configurations" in page


@pytest.mark.slow
@needs_all
def test_digits_npz_three_backends(files, tmp_path, capsys):
    out = tmp_path / "report"
    status, err = run_cli(
        capsys,
        "run",
        files / "digits.keras",
        "--data",
        files / "digits.npz",
        "--loss",
        "sparse_categorical_crossentropy",
        "--optimizer",
        "adam",
        "--lr",
        "0.005",
        "--validation-split",
        "0.25",
        "--configs",
        THREE_BACKENDS,
        "--epochs",
        "4",
        "--batch-size",
        "64",
        "--jobs",
        "1",
        "--out",
        out,
    )

    summary = read_summary(out)
    verdicts = {entry["config"]: entry["verdict"] for entry in summary["configs"]}
    assert status == 0, (err[-2000:], verdicts)
    assert all(verdict in PASSING for verdict in verdicts.values()), verdicts
    assert summary["scenario"]["data"]["held_out_rows"] == 449
    assert summary["scenario"]["training"]["optimizer_name"] == "Adam"
    assert summary["scenario"]["training"]["learning_rate"] == 0.005
    for entry in summary["configs"]:
        assert entry["disagreement_on"] == "data"
        assert entry["final_accuracy"] > 0.5

    page = (out / "report.html").read_text()
    assert "Disagreement with the referee per class" in page
