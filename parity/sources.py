"""User data for ``parity run`` and ``parity.compare``: read, check, split and store.

The parent process reads the user's data once (a ``.npz`` file, a pair of ``.npy``
files, a ``.csv`` or ``.parquet`` table, or arrays passed from Python), checks it,
and writes a float32 ``data.npz`` into the run directory. Workers read only that
file, so they never parse CSV, and every configuration trains on the same bytes.

Labels are checked against the loss once the model has been inspected, because the
loss and the model's output shape decide what a valid label is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.errors import InputError
from parity.io import atomic_write

log = logging.getLogger("parity")

DATA_FILE = "data.npz"
TABLE_SUFFIXES = (".csv", ".parquet")

# Rows and columns named in an error about non-finite values.
SHOWN_POSITIONS = 5

# Losses grouped by the labels they expect, under Keras 3's function names.
BINARY_LOSSES = frozenset({"binary_crossentropy", "binary_focal_crossentropy"})
SPARSE_LOSSES = frozenset({"sparse_categorical_crossentropy"})
CATEGORICAL_LOSSES = frozenset(
    {"categorical_crossentropy", "categorical_focal_crossentropy"}
)
REGRESSION_LOSSES = frozenset(
    {
        "mean_squared_error",
        "mean_absolute_error",
        "mean_absolute_percentage_error",
        "mean_squared_logarithmic_error",
        "huber",
        "log_cosh",
    }
)


@dataclasses.dataclass
class Dataset:
    """Inputs and labels as read from the user, before the labels are checked."""

    x: np.ndarray  # float32, one row per sample
    y: np.ndarray  # numeric, as given
    source: str
    feature_names: list[str] | None = None


@dataclasses.dataclass
class Labels:
    """Labels in the form the loss trains on, and as class indices for the report."""

    train: np.ndarray
    classes: np.ndarray | None  # int64 class index per sample; None for regression
    task: str  # binary, multiclass, regression or other
    num_classes: int


def read_data(
    data: str | os.PathLike[str],
    *,
    x_name: str = "x",
    y_name: str = "y",
    target: str | None = None,
) -> Dataset:
    """Read inputs and labels from a data file or a comma-separated ``.npy`` pair."""
    text = os.fspath(data)
    if "," in text and not Path(text).exists():
        parts = [part.strip() for part in text.split(",")]
        if len(parts) != 2 or not all(part.endswith(".npy") for part in parts):
            raise InputError(
                f"Invalid --data {text!r}: a comma joins exactly two .npy files, "
                "inputs first, as in --data x.npy,y.npy."
            )
        return _read_npy_pair(Path(parts[0]), Path(parts[1]))
    path = Path(text)
    _check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, x_name, y_name)
    if suffix in TABLE_SUFFIXES:
        return _read_table(path, target)
    if suffix == ".npy":
        raise InputError(
            f"Data file {text!r} is a single .npy file: pass inputs and labels as a "
            "pair, --data x.npy,y.npy, or both in one .npz file."
        )
    raise InputError(
        f"Unknown data format {suffix or 'without a suffix'!r} of {text!r}: use .npz "
        "(arrays x and y), x.npy,y.npy, .csv or .parquet (with --target COLUMN)."
    )


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(
            f"Data file {str(path)!r} not found (--data, Python: x=). Check the path."
        )
    if not path.is_file():
        raise InputError(f"Data path {str(path)!r} is not a file (--data).")
    if not os.access(path, os.R_OK):
        raise InputError(
            f"Data file {str(path)!r} cannot be read: permission denied. "
            "Fix its permissions or copy it somewhere readable."
        )


def _load_npy(path: Path) -> np.ndarray:
    _check_readable(path)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:
        detail = "" if "pickle" in str(error) else f" ({str(error).rstrip('.')})"
        raise InputError(
            f"Data file {str(path)!r} cannot be read as a numeric .npy array{detail}. "
            "Save numeric arrays with numpy.save, not Python objects."
        ) from None
    except OSError as error:
        raise InputError(f"Data file {str(path)!r} cannot be read: {error}.") from None


def _read_npy_pair(x_path: Path, y_path: Path) -> Dataset:
    x = _load_npy(x_path)
    y = _load_npy(y_path)
    return _dataset(x, y, f"{x_path.name},{y_path.name}")


def _read_npz(path: Path, x_name: str, y_name: str) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        # numpy reports a file that is no archive as "pickled data" and suggests
        # loading it unsafely; that advice must not reach the user.
        detail = "" if "pickle" in str(error) else f" ({str(error).rstrip('.')})"
        raise InputError(
            f"Data file {str(path)!r} is not a readable .npz archive{detail}. "
            "Write it with numpy.savez(path, x=..., y=...)."
        ) from None
    with archive:
        missing = [name for name in (x_name, y_name) if name not in archive.files]
        if missing:
            raise InputError(
                f"Data file {str(path)!r} has no array named {missing[0]!r}; it has "
                f"{', '.join(map(repr, archive.files)) or 'no arrays'}. Name the arrays "
                "with --x NAME --y NAME (Python: x_name=, y_name=)."
            )
        try:
            x, y = archive[x_name], archive[y_name]
        except ValueError as error:
            raise InputError(
                f"Data file {str(path)!r}: arrays {x_name!r} and {y_name!r} cannot be "
                f"read without unpickling ({error}). Store numeric arrays only."
            ) from None
    return _dataset(x, y, path.name)


def _read_table(path: Path, target: str | None) -> Dataset:
    try:
        import pandas as pd
    except ImportError:
        raise InputError(
            f"Reading {str(path)!r} needs pandas: pip install 'parity-ml[data]'."
        ) from None
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path)
        else:
            frame = pd.read_parquet(path)
    except Exception as error:  # pandas raises many parser and engine types
        raise InputError(
            f"Data file {str(path)!r} cannot be read as a table: "
            f"{type(error).__name__}: {error}."
        ) from None
    if target is None:
        raise InputError(
            f"Data file {str(path)!r} is a table, so name its label column with "
            f"--target COLUMN. Its columns are: {_column_list(frame.columns)}."
        )
    if target not in frame.columns:
        raise InputError(
            f"Label column {target!r} (--target) not found in {str(path)!r}. "
            f"Its columns are: {_column_list(frame.columns)}."
        )
    if frame.empty:
        raise InputError(
            f"Data file {str(path)!r} has columns {_column_list(frame.columns)} but "
            "no data rows. Pass a table with at least one row per batch."
        )
    text_columns = [
        str(name)
        for name, dtype in frame.dtypes.items()
        if not (
            pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
        )
    ]
    if text_columns:
        raise InputError(
            f"Column(s) {_column_list(text_columns)} of {str(path)!r} contain text, "
            "and parity trains on numbers only. Encode them as numbers (category codes "
            "or one-hot columns) or drop them, then run again."
        )
    features = frame.drop(columns=[target])
    x = features.to_numpy(dtype=np.float64, na_value=np.nan)
    y = frame[target].to_numpy(dtype=np.float64, na_value=np.nan)
    source = f"{path.name} (label column {target!r})"
    return _dataset(x, y, source, [str(name) for name in features.columns])


def _column_list(names: Any) -> str:
    names = [repr(str(name)) for name in names]
    if len(names) > 12:
        # The label is often the last column, so the end of the list is kept too.
        hidden = len(names) - 12
        return f"{', '.join(names[:10])}, ({hidden} more), {', '.join(names[-2:])}"
    return ", ".join(names) or "none"


def from_arrays(x: Any, y: Any, source: str = "arrays") -> Dataset:
    """Make a dataset from array-likes passed from Python (numpy, pandas, lists)."""
    for name, value in (("x", x), ("y", y)):
        # A pandas DataFrame: name its text columns before numpy hides them.
        dtypes = getattr(value, "dtypes", None)
        if dtypes is not None and hasattr(dtypes, "items"):
            text = [
                str(column)
                for column, dtype in dtypes.items()
                if getattr(dtype, "kind", "O") not in "biufc"
            ]
            if text:
                raise InputError(
                    f"Column(s) {_column_list(text)} of {name} contain text; encode "
                    "them as numbers or drop them."
                )
    try:
        x_array = np.asarray(x)
        y_array = np.asarray(y)
    except (TypeError, ValueError) as error:
        raise InputError(f"x and y must be numeric arrays: {error}.") from None
    names = [str(c) for c in x.columns] if hasattr(x, "columns") else None
    return _dataset(x_array, y_array, source, names)


def _dataset(
    x: np.ndarray, y: np.ndarray, source: str, names: list[str] | None = None
) -> Dataset:
    for name, array in (("x", x), ("y", y)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise InputError(
                f"{name} in {source} has dtype {array.dtype}, not a number type. "
                "Convert it to numbers (category codes for classes) and run again."
            )
    if x.ndim == 0 or y.ndim == 0:
        raise InputError(
            f"x and y in {source} must have one row per sample; got shapes "
            f"{x.shape} and {y.shape}."
        )
    if len(x) != len(y):
        raise InputError(
            f"x has {len(x)} rows but y has {len(y)} in {source}: give one label per "
            "sample."
        )
    if len(x) == 0 or x.size == 0:
        raise InputError(
            f"The dataset {source} is empty (x has shape {x.shape}): pass at least "
            "one sample with at least one feature."
        )
    if x.ndim == 1:
        # One feature per sample: a column, as Keras' Input((1,)) expects.
        x = x.reshape(-1, 1)
    with np.errstate(over="ignore"):
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    return Dataset(x32, np.asarray(y), source, names)


def describe_nonfinite(name: str, array: np.ndarray, columns: list[str] | None) -> str:
    """Return a sentence with the counts and first positions of NaN and inf in ``array``."""
    values = np.asarray(array, np.float64)
    nan = int(np.isnan(values).sum())
    inf = int(np.isinf(values).sum())
    if nan == 0 and inf == 0:
        return ""
    bad = ~np.isfinite(values.reshape(len(values), -1))
    rows = np.flatnonzero(bad.any(axis=1))
    shown_rows = ", ".join(str(r) for r in rows[:SHOWN_POSITIONS])
    text = f"{name} has {nan} NaN and {inf} infinite values in {len(rows)} rows (first rows {shown_rows}"
    if columns is not None and bad.shape[1] == len(columns):
        bad_columns = [columns[c] for c in np.flatnonzero(bad.any(axis=0))]
        text += f"; columns {_column_list(bad_columns[:SHOWN_POSITIONS])}"
    return text + ")"


def check_finite(dataset: Dataset, allow_nonfinite: bool) -> list[str]:
    """Raise InputError if x or y has NaN or inf, unless allowed; return the findings.

    x is checked after the conversion to float32, so values beyond float32's range
    count as infinite.
    """
    findings = [
        text
        for text in (
            describe_nonfinite("x", dataset.x, dataset.feature_names),
            describe_nonfinite("y", dataset.y, None),
        )
        if text
    ]
    if findings and not allow_nonfinite:
        raise InputError(
            f"{'; '.join(findings)} in {dataset.source}. Training on them makes every "
            "configuration's loss NaN, so nothing could be compared. Clean the data, "
            "or pass --allow-nonfinite (Python: allow_nonfinite=True) to run anyway."
        )
    for text in findings:
        log.warning(
            "%s in %s; running anyway (--allow-nonfinite)", text, dataset.source
        )
    return findings


def split(dataset: Dataset, validation_split: float) -> tuple[Dataset, Dataset | None]:
    """Hold out the last ``validation_split`` fraction of rows, as Keras' fit does."""
    if not 0.0 <= validation_split < 1.0:
        raise InputError(
            f"Invalid --validation-split {validation_split!r} (Python: "
            "validation_split=): use a fraction from 0 (no held-out data) to below 1."
        )
    held_out = int(round(len(dataset.x) * validation_split))
    if held_out == 0:
        return dataset, None
    kept = len(dataset.x) - held_out
    if kept == 0:
        raise InputError(
            f"--validation-split {validation_split} holds out all {len(dataset.x)} rows "
            "of the data, so none is left to train on. Use a smaller fraction."
        )
    train = dataclasses.replace(dataset, x=dataset.x[:kept], y=dataset.y[:kept])
    evaluation = dataclasses.replace(dataset, x=dataset.x[kept:], y=dataset.y[kept:])
    return train, evaluation


def check_batch_size(batch_size: int, train: Dataset) -> None:
    """Raise InputError when a batch would be larger than the training data."""
    if batch_size > len(train.x):
        raise InputError(
            f"Batch size {batch_size} (--batch-size, Python: batch_size=) is larger "
            f"than the {len(train.x)} training rows of {train.source}. Use a batch "
            f"size of at most {len(train.x)}."
        )


def loss_task(loss_name: str) -> str:
    """Return the task a Keras loss function name trains: binary, multiclass, ..."""
    if loss_name in BINARY_LOSSES:
        return "binary"
    if loss_name in SPARSE_LOSSES or loss_name in CATEGORICAL_LOSSES:
        return "multiclass"
    if loss_name in REGRESSION_LOSSES:
        return "regression"
    return "other"


def prepare_labels(
    y: np.ndarray,
    loss_name: str,
    output_shape: Sequence[int | None],
    source: str,
) -> Labels:
    """Check labels against the loss and the model's output; return them ready to train.

    Non-finite labels, which only reach this point with --allow-nonfinite, are left
    out of the range checks.
    """
    outputs = int(output_shape[-1]) if len(output_shape) > 1 else 1
    values = np.asarray(y, np.float64)
    finite = values[np.isfinite(values)]
    where = f"the labels of {source}"
    if loss_name in BINARY_LOSSES:
        return _binary_labels(values, finite, outputs, loss_name, where)
    if loss_name in SPARSE_LOSSES:
        return _sparse_labels(values, finite, outputs, where)
    if loss_name in CATEGORICAL_LOSSES:
        return _categorical_labels(values, finite, outputs, loss_name, where)
    task = "regression" if loss_name in REGRESSION_LOSSES else "other"
    train = values.astype(np.float32)
    if train.ndim == 1 and len(output_shape) == 2:
        train = train.reshape(-1, 1)
    if task == "regression" and train.shape[1:] != tuple(output_shape[1:]):
        raise InputError(
            f"{where.capitalize()} have shape {values.shape[1:] or '(one value)'} per "
            f"sample, but the model outputs {tuple(output_shape[1:])} and {loss_name} "
            "compares them element by element. Reshape the labels to the output's shape."
        )
    return Labels(train, None, task, 0)


def _binary_labels(
    values: np.ndarray, finite: np.ndarray, outputs: int, loss_name: str, where: str
) -> Labels:
    if outputs != 1:
        raise InputError(
            f"The model has {outputs} outputs but {loss_name} expects one probability "
            "per sample. Use --loss sparse_categorical_crossentropy (Python: loss=) for "
            f"class indices 0..{outputs - 1}, or end the model with Dense(1)."
        )
    if values.ndim > 1 and values.shape[1:] != (1,):
        raise InputError(
            f"{where.capitalize()} have shape {values.shape[1:]} per sample, but "
            f"{loss_name} expects one 0/1 label per sample."
        )
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise InputError(
            f"{where.capitalize()} range from {finite.min():g} to {finite.max():g}, but "
            f"{loss_name} expects labels from 0 to 1. Encode the two classes as 0 and 1, "
            "or use --loss sparse_categorical_crossentropy for class indices."
        )
    train = values.reshape(-1, 1).astype(np.float32)
    classes = (np.nan_to_num(values.reshape(-1)) > 0.5).astype(np.int64)
    return Labels(train, classes, "binary", 2)


def _sparse_labels(
    values: np.ndarray, finite: np.ndarray, outputs: int, where: str
) -> Labels:
    if outputs < 2:
        raise InputError(
            "The model has one output but sparse_categorical_crossentropy needs one "
            "output per class. Use --loss binary_crossentropy (Python: loss=) for two "
            "classes, or end the model with Dense(number of classes)."
        )
    if values.ndim > 1 and values.shape[1:] != (1,):
        raise InputError(
            f"{where.capitalize()} have shape {values.shape[1:]} per sample, but "
            "sparse_categorical_crossentropy expects one class index per sample. For "
            "one-hot labels use --loss categorical_crossentropy (Python: loss=)."
        )
    if finite.size and not np.all(finite == np.round(finite)):
        raise InputError(
            f"{where.capitalize()} are not whole numbers (for example "
            f"{finite[finite != np.round(finite)][0]:g}), but "
            "sparse_categorical_crossentropy expects class indices 0, 1, 2, ..."
        )
    if finite.size and (finite.min() < 0 or finite.max() >= outputs):
        raise InputError(
            f"{where.capitalize()} range from {finite.min():g} to {finite.max():g}, but "
            f"the model has {outputs} outputs, so class indices must be 0 to "
            f"{outputs - 1}. Give the last layer one unit per class."
        )
    flat = values.reshape(-1)
    classes = np.nan_to_num(flat).astype(np.int64)
    return Labels(classes.astype(np.int32), classes, "multiclass", outputs)


def _categorical_labels(
    values: np.ndarray, finite: np.ndarray, outputs: int, loss_name: str, where: str
) -> Labels:
    if values.ndim != 2 or values.shape[1] != outputs:
        raise InputError(
            f"{where.capitalize()} have shape {values.shape[1:] or '(one value)'} per "
            f"sample, but {loss_name} expects one-hot rows of length {outputs}, one "
            "per model output. For class indices use --loss "
            "sparse_categorical_crossentropy (Python: loss=)."
        )
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise InputError(
            f"{where.capitalize()} range from {finite.min():g} to {finite.max():g}, but "
            f"{loss_name} expects one-hot or probability rows with values from 0 to 1."
        )
    classes = np.argmax(np.nan_to_num(values), axis=1).astype(np.int64)
    return Labels(values.astype(np.float32), classes, "multiclass", outputs)


def write_data(
    path: Path,
    train: Dataset,
    train_labels: Labels,
    evaluation: Dataset | None,
    evaluation_labels: Labels | None,
) -> None:
    """Write the float32 arrays the workers train and predict on to a ``.npz`` file.

    Without held-out data the workers predict on the training inputs, so ``x_eval``
    is then the training set.
    """
    arrays = {"x": train.x, "y": train_labels.train}
    if evaluation is not None and evaluation_labels is not None:
        arrays["x_eval"] = evaluation.x
        arrays["y_eval"] = evaluation_labels.train
        eval_classes = evaluation_labels.classes
    else:
        arrays["x_eval"] = train.x
        arrays["y_eval"] = train_labels.train
        eval_classes = train_labels.classes
    if eval_classes is not None:
        arrays["classes_eval"] = eval_classes
    atomic_write(path, lambda stream: np.savez(stream, **arrays))


def read_stored_data(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read the arrays that `write_data` stored."""
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}
