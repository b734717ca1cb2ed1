"""Traces of a user's own model: ``parity record MODEL --data DATA`` and its replay.

A model trace is a lockstep trace (see `parity.record`) of layout version 2. It
has the scenario trace's contents, with ``meta.scenario.name`` set to the model
as the user named it and ``meta.scenario.activation`` null, and three more
sections in ``meta``:

- ``model``: the reference as the user gave it, the modules the recording
  imported first (``imports``, names only) and a ``summary``. The reference has
  the ``kind`` (file or factory), the ``text``, the file name, the factory's
  function and module, and ``sha256``, the digest of the ``.keras`` or factory
  file. The summary has the class, parameter count, input and output shapes,
  random layers, and one entry per layer (name, class, parameter count,
  activation);
- ``training``: the loss, optimizer and metrics the runs trained with, as
  `parity.models.resolve_training` returns them, and ``options``, the training
  flags given to ``parity record`` (``--loss``, ``--optimizer``, ``--lr``,
  ``--metrics``, ``--from-logits``);
- ``data``: ``sha256`` (`data_digest` of the data as read), the source, row
  counts, feature shape, class count, the reading options (``x_name``,
  ``y_name``, ``target``, ``validation_split``, ``allow_nonfinite``), and
  ``stored``: whether the data itself is in the trace.

A model trace contains more tensors than a scenario trace. ``data/x`` (float32)
and ``data/y`` (the labels as read) are stored when they fit in
`MAX_STORED_DATA_BYTES`. For the report's figures it also stores
``report/classes_eval``, the class of each compared row of a classifier, and
``report/x_eval``, the compared rows when they have two features.

A trace never names code that replay runs: the model comes from the MODEL
argument of ``parity replay``, and its digest must equal the recorded one.
Modules listed in ``model.imports`` are shown, never imported.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.errors import InputError
from parity.io import atomic_write_tensors
from parity.lockstep import digest_bytes
from parity.scenarios import Scenario
from parity.trace import Trace

if TYPE_CHECKING:
    from parity.api import PreparedData, PreparedModel, RunOptions
    from parity.record import (
        CompareResult,
        RecordedTrace,
        RecordOptions,
        RecordResult,
        ReplayOptions,
    )
    from parity.runner import ProgressCallback, RunResult

log = logging.getLogger("parity")

# Largest data, inputs and labels together, that a trace stores. Larger data stays
# out, and replaying the trace then needs --data. 64 MiB is a judgment call. It
# fits a million rows of 16 float32 features, and a trace of a few runs stays small
# enough to copy between machines.
MAX_STORED_DATA_BYTES = 64 * 2**20

# The file, in the replay's run directory, with the initial weights and the batch
# schedule that every run there starts from (the worker's spec field start_file).
START_FILE = "start.safetensors"

_TASKS = ("binary", "multiclass", "regression", "other")
_KINDS = ("file", "factory")
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Keras names of losses, optimizers and metrics, as --loss, --optimizer and
# --metrics take them.
_KERAS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
# Maximum length of a text field (a model path, a data source) read from a trace.
_MAX_TEXT = 1000
# Training settings that two traces, or a trace and its replay, must share.
_TRAINING_ITEMS = ("loss_name", "from_logits", "optimizer_name", "learning_rate")


# ---------------------------------------------------------------------------
# Recording


def data_digest(x: np.ndarray, y: np.ndarray) -> str:
    """Return the SHA-256 of the data's values: inputs as float32, labels as float64.

    Files that hold the same numbers get the same digest, such as a ``.csv`` and
    a ``.npz`` with integer labels, so a trace can be replayed from data saved in
    another format.
    """
    hasher = hashlib.sha256()
    for array, dtype in ((x, np.float32), (y, np.float64)):
        values = np.ascontiguousarray(array, dtype=dtype)
        hasher.update(str(values.shape).encode())
        hasher.update(values.tobytes())
    return hasher.hexdigest()


def _stored_labels(y: np.ndarray) -> np.ndarray:
    """Return the labels in a dtype that a trace stores: their own, else float64."""
    if y.dtype.kind in "biuf" and y.dtype.itemsize <= 8:
        return y
    return np.asarray(y, np.float64)


def record_run_options(options: RecordOptions) -> RunOptions:
    """Return the options of `parity.api` that record the model of ``options``."""
    from parity.api import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, RunOptions

    return RunOptions(
        model=options.model,
        data=options.data,
        x_name=options.x_name,
        y_name=options.y_name,
        target=options.target,
        imports=options.imports,
        validation_split=options.validation_split,
        configs=[options.config],
        epochs=options.epochs or DEFAULT_EPOCHS,
        batch_size=options.batch_size or DEFAULT_BATCH_SIZE,
        loss=options.loss,
        from_logits=options.from_logits,
        optimizer=options.optimizer,
        learning_rate=options.learning_rate,
        metrics=options.metrics,
        seed=options.seed,
        faults=options.faults,
        jobs=options.jobs,
        timeout=options.timeout,
        referee=options.referee,
        allow_nonfinite=options.allow_nonfinite,
        report=False,
    )


def record_model(
    options: RecordOptions, progress: ProgressCallback | None = None
) -> RecordResult:
    """Train a user model on one configuration in lockstep and write its trace.

    The model and the data go through the same checks and preparation as in
    ``parity run``. The trace is written even when the run fails.
    """
    from parity.api import _reference_text, prepare_data, prepare_model_run
    from parity.doctor import plan_runs
    from parity.record import (
        RecordResult,
        check_runnable,
        check_writable,
        write_recording,
    )
    from parity.runner import default_memory_limit, execute
    from parity.sources import read_stored_data

    check_writable(options.output)
    if options.data is None:
        raise InputError(
            f"Recording the model {options.model!r} needs its data: pass --data FILE "
            "(Python: data=), as for parity run."
        )
    settings = record_run_options(options)
    doctor_options = settings.doctor_options(_reference_text(options.model))
    plan = plan_runs(doctor_options)
    runs = plan if options.with_referee else [r for r in plan if r.role == "candidate"]
    check_runnable(runs)
    data = prepare_data(settings)
    jobs = options.jobs or max(1, min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="parity-record-") as work:
        # The plan still has the referee, whose backend inspects the model.
        prepared = prepare_model_run(settings, plan, data, Path(work))
        results = execute(
            runs,
            Path(work) / "runs",
            prepared.common,
            jobs=jobs,
            timeout=prepared.timeout,
            memory_limit=default_memory_limit(jobs),
            progress=progress,
        )
        stored = read_stored_data(prepared.common["data"]["path"])
    meta, tensors = model_trace_contents(settings, prepared, data, stored, results)
    write_recording(options.output, meta, tensors)
    log.info(
        "recorded %d runs of %s into %s", len(results), options.model, options.output
    )
    return RecordResult(os.fspath(options.output), results)


def model_trace_contents(
    settings: RunOptions,
    prepared: PreparedModel,
    data: PreparedData,
    stored: Mapping[str, np.ndarray],
    results: Sequence[RunResult],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return the meta and tensors of a model trace.

    ``stored`` contains the arrays that the workers trained and predicted on.
    """
    from parity.api import _overrides
    from parity.record import MODEL_KIND_VERSION, trace_contents

    common = prepared.common
    training = common["training"]
    scenario_fields = {
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "learning_rate": training["learning_rate"],
        "activation": None,
    }
    meta, tensors = trace_contents(prepared.scenario, scenario_fields, results)
    meta["kind_version"] = MODEL_KIND_VERSION
    reference = prepared.reference
    description = prepared.description
    meta["model"] = {
        "reference": {
            "kind": reference.kind,
            "text": reference.text,
            "file_name": None if reference.path is None else Path(reference.path).name,
            "module": reference.module,
            "function": reference.function,
            "sha256": reference.sha256,
        },
        "imports": [name for name, _ in reference.imports],
        "summary": {
            "class_name": description["class_name"],
            "num_params": description["num_params"],
            "feature_shape": description["feature_shape"],
            "output_shape": description["output_shape"],
            "random_layers": description["random_layers"],
            "compiled": description["compiled"],
            "layers": description.get("layers", []),
        },
    }
    meta["training"] = {**training, "options": _overrides(settings)}

    dataset = data.dataset
    labels = _stored_labels(dataset.y)
    size = dataset.x.nbytes + labels.nbytes
    keep = size <= MAX_STORED_DATA_BYTES
    meta["data"] = {
        "sha256": data_digest(dataset.x, dataset.y),
        "source": dataset.source,
        "rows": len(dataset.x),
        "train_rows": common["data"]["train_rows"],
        "held_out_rows": common["data"]["held_out_rows"],
        "feature_shape": common["data"]["feature_shape"],
        "num_classes": prepared.scenario.num_classes,
        "bytes": size,
        "stored": keep,
        "x_name": settings.x_name,
        "y_name": settings.y_name,
        "target": settings.target,
        "validation_split": settings.validation_split,
        "allow_nonfinite": settings.allow_nonfinite,
        "nonfinite": common["data"]["nonfinite"],
    }
    if keep:
        tensors["data/x"] = dataset.x
        tensors["data/y"] = labels
    else:
        log.info(
            "the data (%d bytes) is over the %d bytes a trace stores, so replaying "
            "the trace will need --data",
            size,
            MAX_STORED_DATA_BYTES,
        )
    if "classes_eval" in stored:
        tensors["report/classes_eval"] = stored["classes_eval"].astype(np.int64)
        if stored["x_eval"].ndim == 2 and stored["x_eval"].shape[1] == 2:
            tensors["report/x_eval"] = stored["x_eval"]
    return meta, tensors


# ---------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class ModelSection:
    """The validated ``model``, ``training`` and ``data`` sections of a model trace."""

    model: dict[str, Any]
    training: dict[str, Any]
    data: dict[str, Any]

    @property
    def text(self) -> str:
        """The model as the user named it when recording."""
        return self.model["reference"]["text"]

    @property
    def sha256(self) -> str | None:
        """The digest of the recorded model's file."""
        return self.model["reference"]["sha256"]

    @property
    def eval_rows(self) -> int:
        """Rows whose predictions are compared: the held-out rows, else all."""
        return self.data["held_out_rows"] or self.data["train_rows"]

    def summary_fields(self) -> dict[str, Any]:
        """Return the sections as the comparison's JSON shows them."""
        return {"model": self.model, "training": self.training, "data": self.data}


def read_model_settings(
    url: str, trace: Trace
) -> tuple[Scenario, dict[str, Any], ModelSection]:
    """Validate a model trace's settings and sections, and make its `Scenario`.

    The scenario stands for the model in the report. Its data are the compared
    rows and their classes from the ``report/`` tensors, read when first used.
    """
    from parity.record import _field, _invalid

    meta = trace.meta
    recorded = _field(url, meta, "scenario", "meta", "dict")
    settings = {
        "name": _text(url, recorded, "name", "meta.scenario"),
        "epochs": _field(url, recorded, "epochs", "meta.scenario", "count"),
        "batch_size": _field(url, recorded, "batch_size", "meta.scenario", "count"),
        "seed": _field(url, recorded, "seed", "meta.scenario", "int"),
        "learning_rate": _field(
            url, recorded, "learning_rate", "meta.scenario", "number?"
        ),
        "activation": None,
    }
    if not 0 <= settings["seed"] < 2**63:
        raise _invalid(url, "meta.scenario.seed is out of range")
    section = ModelSection(
        _read_model(url, meta),
        _read_training(url, meta),
        _read_data(url, meta),
    )
    settings["eval_rows"] = section.eval_rows
    _check_data_tensors(url, trace, section)
    scenario = _trace_scenario(url, trace, settings, section)
    return scenario, settings, section


def _text(url: str, mapping: Any, key: str, where: str, optional: bool = False) -> Any:
    from parity.record import _field, _invalid, _short

    value = _field(url, mapping, key, where, "str?" if optional else "str")
    if value is not None and (not value or len(value) > _MAX_TEXT):
        raise _invalid(url, f"{where}.{key} {_short(repr(value))} is empty or too long")
    return value


def _digest(url: str, mapping: Any, key: str, where: str, optional: bool) -> Any:
    from parity.record import _field, _invalid, _short

    value = _field(url, mapping, key, where, "str?" if optional else "str")
    if value is not None and not _DIGEST.fullmatch(value):
        raise _invalid(
            url, f"{where}.{key} is not a SHA-256 hex digest: {_short(repr(value))}"
        )
    return value


def _read_model(url: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    from parity.record import _field, _invalid, _is_shape

    model = _field(url, meta, "model", "meta", "dict")
    where = "meta.model.reference"
    reference = _field(url, model, "reference", "meta.model", "dict")
    kind = _field(url, reference, "kind", where, "str")
    if kind not in _KINDS:
        raise _invalid(url, f"{where}.kind is {kind!r}, expected 'file' or 'factory'")
    checked_reference = {
        "kind": kind,
        "text": _text(url, reference, "text", where),
        "file_name": _text(url, reference, "file_name", where, optional=True),
        "module": _text(url, reference, "module", where, optional=True),
        "function": _text(url, reference, "function", where, optional=True),
        "sha256": _digest(url, reference, "sha256", where, optional=True),
    }
    imports = _field(url, model, "imports", "meta.model", "list")
    if not all(isinstance(name, str) and len(name) <= _MAX_TEXT for name in imports):
        raise _invalid(url, "meta.model.imports is not a list of module names")

    where = "meta.model.summary"
    summary = _field(url, model, "summary", "meta.model", "dict")
    output_shape = _field(url, summary, "output_shape", where, "list")
    if not _is_shape([d for d in output_shape if d is not None]):
        raise _invalid(url, f"{where}.output_shape is not a shape")
    layers = _field(url, summary, "layers", where, "list")
    for position, layer in enumerate(layers):
        _text(url, layer, "name", f"{where}.layers[{position}]")
        _text(url, layer, "class_name", f"{where}.layers[{position}]")
    checked_summary = {
        "class_name": _text(url, summary, "class_name", where),
        "num_params": _field(url, summary, "num_params", where, "int"),
        "feature_shape": _field(url, summary, "feature_shape", where, "list"),
        "output_shape": output_shape,
        "random_layers": _field(url, summary, "random_layers", where, "list"),
        "compiled": _field(url, summary, "compiled", where, "bool"),
        "layers": layers,
    }
    return {
        "reference": checked_reference,
        "imports": imports,
        "summary": checked_summary,
    }


def _read_training(url: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    from parity.record import _field, _invalid, _short

    training = _field(url, meta, "training", "meta", "dict")
    where = "meta.training"
    task = _field(url, training, "task", where, "str")
    if task not in _TASKS:
        raise _invalid(url, f"{where}.task is {_short(repr(task))}")
    metrics = _field(url, training, "metrics", where, "list")
    if not all(isinstance(name, str) and len(name) <= _MAX_TEXT for name in metrics):
        raise _invalid(url, f"{where}.metrics is not a list of metric names")
    # These are compared and shown, never resolved: the runs here train with what
    # the model and the options below resolve to.
    checked = {
        **training,
        "task": task,
        "loss_name": _text(url, training, "loss_name", where),
        "optimizer_name": _text(url, training, "optimizer_name", where),
        "learning_rate": _field(url, training, "learning_rate", where, "number?"),
        "from_logits": _field(url, training, "from_logits", where, "bool"),
        "metrics": metrics,
    }
    options = _field(url, training, "options", where, "dict")
    where = "meta.training.options"
    rate = _field(url, options, "learning_rate", where, "number?")
    if rate is not None and not rate > 0:
        raise _invalid(url, f"{where}.learning_rate {rate!r} is not positive")
    checked["options"] = {
        "loss": _keras_name(url, options, "loss", where),
        "optimizer": _keras_name(url, options, "optimizer", where),
        "learning_rate": rate,
        "metrics": _names(url, options, "metrics", where),
        "from_logits": _field(url, options, "from_logits", where, "bool?"),
    }
    return checked


def _keras_name(url: str, mapping: Any, key: str, where: str) -> str | None:
    from parity.record import _field, _invalid, _short

    value = _field(url, mapping, key, where, "str?")
    if value is not None and not _KERAS_NAME.fullmatch(value):
        raise _invalid(
            url, f"{where}.{key} {_short(repr(value))} is not a Keras object name"
        )
    return value


def _names(url: str, mapping: Any, key: str, where: str) -> list[str] | None:
    from parity.record import _field, _invalid

    values = _field(url, mapping, key, where, "list?")
    if values is not None and not all(
        isinstance(value, str) and _KERAS_NAME.fullmatch(value) for value in values
    ):
        raise _invalid(url, f"{where}.{key} is not a list of Keras metric names")
    return values


def _read_data(url: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    from parity.record import _field, _invalid, _is_shape

    data = _field(url, meta, "data", "meta", "dict")
    where = "meta.data"
    checked = {
        "sha256": _digest(url, data, "sha256", where, optional=False),
        "source": _text(url, data, "source", where),
        "rows": _field(url, data, "rows", where, "count"),
        "train_rows": _field(url, data, "train_rows", where, "count"),
        "held_out_rows": _field(url, data, "held_out_rows", where, "int"),
        "feature_shape": _field(url, data, "feature_shape", where, "list"),
        "num_classes": _field(url, data, "num_classes", where, "int"),
        "bytes": _field(url, data, "bytes", where, "int"),
        "stored": _field(url, data, "stored", where, "bool"),
        "x_name": _text(url, data, "x_name", where),
        "y_name": _text(url, data, "y_name", where),
        "target": _text(url, data, "target", where, optional=True),
        "validation_split": _field(url, data, "validation_split", where, "number"),
        "allow_nonfinite": _field(url, data, "allow_nonfinite", where, "bool"),
        "nonfinite": _field(url, data, "nonfinite", where, "list"),
    }
    if checked["held_out_rows"] < 0 or (
        checked["train_rows"] + checked["held_out_rows"] != checked["rows"]
    ):
        raise _invalid(
            url,
            f"{where} has {checked['rows']} rows, but {checked['train_rows']} "
            f"training and {checked['held_out_rows']} held-out rows",
        )
    if not _is_shape(checked["feature_shape"]) or checked["num_classes"] < 0:
        raise _invalid(url, f"{where}.feature_shape or num_classes is invalid")
    if not 0 <= checked["validation_split"] < 1:
        raise _invalid(url, f"{where}.validation_split is not a fraction below 1")
    return checked


def _check_data_tensors(url: str, trace: Trace, section: ModelSection) -> None:
    """Check the shapes and dtypes of the stored data and the report's tensors."""
    from parity.record import _invalid, _is_float, _tensor_info

    data = section.data
    names = trace.tensor_names()
    expected: dict[str, tuple[str, list[int]]] = {}
    if data["stored"]:
        expected["data/x"] = ("float", [data["rows"], *data["feature_shape"]])
        expected["data/y"] = ("number", [data["rows"]])
    if "report/classes_eval" in names:
        expected["report/classes_eval"] = ("integer", [section.eval_rows])
    if "report/x_eval" in names:
        expected["report/x_eval"] = ("float", [section.eval_rows, 2])
    for name, (kind, shape) in expected.items():
        info = _tensor_info(url, trace, name)
        found = list(info.shape)
        # Labels may have more dimensions (one-hot rows), so only rows are fixed.
        shape_ok = found[:1] == shape if kind == "number" else found == shape
        kind_ok = {
            "float": _is_float(info.dtype),
            "integer": info.dtype.kind in "iu",
            "number": info.dtype.kind in "biuf",
        }[kind]
        if not (shape_ok and kind_ok):
            raise _invalid(
                url,
                f"tensor {name!r} is {info.dtype} {found}, expected {kind} values of "
                f"shape {shape}" + (" and more" if kind == "number" else ""),
            )


def _trace_scenario(
    url: str, trace: Trace, settings: Mapping[str, Any], section: ModelSection
) -> Scenario:
    """Return a `Scenario` whose data are the compared rows stored for the report."""
    training = section.training
    summary = section.model["summary"]
    rows = section.eval_rows

    @functools.cache
    def load() -> tuple[np.ndarray, np.ndarray]:
        names = trace.tensor_names()
        if "report/x_eval" in names:
            x = trace.tensor("report/x_eval")
        else:
            x = np.zeros((rows, 0), np.float32)
        if "report/classes_eval" in names:
            y = trace.tensor("report/classes_eval")
        else:
            y = np.zeros(rows, np.int64)
        return x, y

    def build(keras: Any, activation: str) -> Any:
        raise TypeError("a recorded user model is built from the MODEL argument")

    rate = training["learning_rate"]
    description = (
        f"{summary['class_name']} {settings['name']} ({summary['num_params']} "
        f"parameters) on {section.data['source']}, {section.data['train_rows']} "
        f"training rows; {training['loss_name']}, {training['optimizer_name']}"
        + (f" at learning rate {rate:.3g}" if rate is not None else "")
    )
    return Scenario(
        settings["name"],
        description,
        training["task"],
        section.data["num_classes"],
        settings["epochs"],
        settings["batch_size"],
        math.nan if rate is None else float(rate),
        load,
        build,
    )


# ---------------------------------------------------------------------------
# Comparing


def check_same_model(traces: Sequence[RecordedTrace]) -> None:
    """Check that traces record the same model on the same data, or raise InputError."""
    from parity.record import _short

    first = traces[0]
    for other in traces[1:]:
        pair = f"Traces {first.url} and {other.url}"
        if (first.model is None) != (other.model is None):
            scenario, model = (first, other) if first.model is None else (other, first)
            raise InputError(
                f"{pair} record different kinds of run: {scenario.url} records the "
                f"built-in scenario {scenario.settings['name']!r}, {model.url} the "
                f"user model {_short(repr(model.settings['name']))}. Compare traces "
                "of the same model."
            )
        assert first.model is not None and other.model is not None
        ours, theirs = first.model, other.model
        if ours.sha256 != theirs.sha256:
            raise InputError(
                f"{pair} record different models: {_short(repr(ours.text))} with "
                f"sha256 {ours.sha256} in the first, {_short(repr(theirs.text))} with "
                f"sha256 {theirs.sha256} in the second. Compare traces recorded from "
                "the same model file."
            )
        if ours.data["sha256"] != theirs.data["sha256"]:
            raise InputError(
                f"{pair} record different data: "
                f"{_short(repr(ours.data['source']))} with digest "
                f"{ours.data['sha256']} in the first, "
                f"{_short(repr(theirs.data['source']))} with digest "
                f"{theirs.data['sha256']} in the second. Compare traces recorded on "
                "the same data."
            )
        _check_same_settings(pair, first, other)


def _check_same_settings(pair: str, first: RecordedTrace, other: RecordedTrace) -> None:
    """Raise InputError when two model traces trained with different settings."""
    assert first.model is not None and other.model is not None
    items = [
        (f"--{name.replace('_', '-')}", first.settings[name], other.settings[name])
        for name in ("epochs", "batch_size", "seed")
    ]
    ours, theirs = first.model.data, other.model.data
    items.append(
        ("--validation-split", ours["validation_split"], theirs["validation_split"])
    )
    ours, theirs = first.model.training, other.model.training
    for name in _TRAINING_ITEMS:
        items.append((f"the {name.replace('_', ' ')}", ours[name], theirs[name]))
    for name, ours, theirs in items:
        if ours != theirs:
            raise InputError(
                f"{pair} record different runs: {name} is {ours!r} in the first and "
                f"{theirs!r} in the second. Compare traces recorded with the same "
                "training options."
            )


# ---------------------------------------------------------------------------
# Replaying


def start_file_spec(
    recorded: RecordedTrace, directory: Path
) -> tuple[dict[str, Any], str | None]:
    """Write the trace's initial weights and batch schedule for the runs here.

    Returns the worker spec fields that make every run start from them, and a
    note when a part is missing. A trace without a finished run has neither part,
    and one whose step-0 checkpoints all lack the init digest has no initial
    weights. The runs here then make that part as the recording did.
    """
    from parity.record import _invalid

    if "schedule" not in recorded.trace.tensor_names():
        return {}, (
            f"No run in {recorded.url} finished, so the runs here make their initial "
            "weights and batch schedule as the recording did."
        )
    schedule = recorded.trace.tensor("schedule")
    samples = schedule.shape[1]
    expected = np.arange(samples)
    for epoch, order in enumerate(schedule):
        if not np.array_equal(np.sort(order), expected):
            raise _invalid(
                recorded.url,
                f"row {epoch} of tensor 'schedule' is not a permutation of the "
                f"{samples} samples",
            )
    tensors = {"schedule": schedule.astype(np.int64)}
    weights = recorded_initial_weights(recorded)
    note = None
    if weights is None:
        note = (
            f"No run in {recorded.url} has a step-0 checkpoint with the trace's "
            "initial-weights digest, so the runs here make their initial weights as "
            "the recording did (from the seed, or a .keras file's stored weights)."
        )
    else:
        tensors.update({f"param/{j}": value for j, value in enumerate(weights)})
    path = directory / START_FILE
    atomic_write_tensors(path, tensors)
    return {"start_file": str(path.resolve())}, note


def recorded_initial_weights(recorded: RecordedTrace) -> list[np.ndarray] | None:
    """Return the first finished run's step-0 parameters that have the init digest.

    Envelope runs start from perturbed weights and bfloat16 runs round them, so
    the digest picks a run whose checkpoint contains the shared initial weights.
    """
    expected = recorded.digests.get("init")
    for result in recorded.results:
        if not result.ok or 0 not in result.meta["checkpoint_steps"]:
            continue
        prefix = recorded.tensor_prefix[result.run.key]
        count = len(result.meta["variable_shapes"])
        values = [
            recorded.trace.tensor(f"{prefix}checkpoint/0/param/{j}")
            for j in range(count)
        ]
        if digest_bytes(values) == expected:
            return [np.asarray(value, np.float32) for value in values]
    return None


def replay_model(
    recorded: RecordedTrace,
    options: ReplayOptions,
    progress: ProgressCallback | None = None,
) -> CompareResult:
    """Rerun a recorded user model here on other configurations and judge all runs.

    The model comes from ``options.model``, never from the trace, and the data
    from ``options.data`` or from the trace. Both must have the recorded digests.
    Every run here starts from the trace's initial weights and batch schedule.
    """
    from parity.api import prepare_data, prepare_model_run
    from parity.doctor import plan_runs
    from parity.record import (
        _TRAINED_FROM_SEED,
        _TRAINED_HERE,
        _conclude_replay,
        _replay_plan_inputs,
        check_reproduced,
        localize_replayed,
        verify_checksums,
    )
    from parity.runner import default_memory_limit, execute

    section = recorded.model
    assert section is not None
    if options.model is None:
        raise InputError(
            f"Trace {recorded.url} records the user model "
            f"{_short_text(section.text)}, and replay never runs code named by a "
            f"trace: pass the model, as in parity replay {recorded.url} MODEL "
            "(Python: model=)."
        )
    notes = check_model_digest(recorded, options.model)
    configs, faults, plan_notes = _replay_plan_inputs(recorded, options)
    notes += plan_notes
    settings = _replay_run_options(recorded, options, configs, faults)
    plan = plan_runs(settings.doctor_options(recorded.settings["name"]))
    for run in plan:
        run.key = f"here-{run.key}"
    data = prepare_data(settings)
    if options.data is None:
        data = _with_source(data, f"the data stored in {recorded.name}")
    check_data_digest(recorded, options, data)
    verify_checksums(recorded)
    out = Path(options.out)
    prepared = prepare_model_run(settings, plan, data, out)
    check_training(recorded, prepared.common["training"])
    if recorded.referee is not None:
        plan = [run for run in plan if run.role == "candidate"]
    elif any(run.not_run_reason for run in plan if run.role != "candidate"):
        raise InputError(
            f"The trace {recorded.url} contains no referee, and the referee cannot "
            "run here: pass --referee with an installed backend."
        )
    start, note = start_file_spec(recorded, out / "runs")
    notes += [note] if note else []
    common = {**prepared.common, **start}
    jobs = options.jobs or max(1, min(4, os.cpu_count() or 1))
    replayed = execute(
        plan,
        out / "runs",
        common,
        jobs=jobs,
        timeout=prepared.timeout,
        memory_limit=default_memory_limit(jobs),
        progress=progress,
    )
    check_reproduced(replayed, recorded)
    text = _TRAINED_HERE if note is None else _TRAINED_FROM_SEED
    result = _conclude_replay(recorded, replayed, notes, out, options, text)
    if options.localize:
        localize_replayed(result, recorded, options, common)
    return result


def _with_source(data: PreparedData, source: str) -> PreparedData:
    """Return ``data`` with its datasets described as coming from ``source``."""
    evaluation = data.evaluation
    return dataclasses.replace(
        data,
        dataset=dataclasses.replace(data.dataset, source=source),
        train=dataclasses.replace(data.train, source=source),
        evaluation=None
        if evaluation is None
        else dataclasses.replace(evaluation, source=source),
    )


def _short_text(text: str) -> str:
    from parity.record import _short

    return _short(repr(text))


def check_model_digest(recorded: RecordedTrace, model: Any) -> list[str]:
    """Raise InputError unless ``model`` has the recorded model's digest.

    Returns notes for the output: modules that the recording imported first, which
    replay imports only when ``--import`` names them.
    """
    from parity.models import parse_model_reference

    section = recorded.model
    assert section is not None
    reference = parse_model_reference(model)
    recorded_kind = section.model["reference"]["kind"]
    if reference.kind != recorded_kind or reference.sha256 != section.sha256:
        raise InputError(
            f"Model {os.fspath(model)!r} ({reference.kind}, sha256 "
            f"{reference.sha256}) is not the model recorded in {recorded.url}: "
            f"{_short_text(section.text)} ({recorded_kind}, sha256 "
            f"{section.sha256}). Pass the model file that was recorded."
        )
    imported = section.model["imports"]
    if not imported:
        return []
    return [
        f"The recording imported {', '.join(map(_short_text, imported))} before "
        "loading the model. Replay imports only the modules that --import names."
    ]


def _replay_run_options(
    recorded: RecordedTrace,
    options: ReplayOptions,
    configs: list[str],
    faults: list[str],
) -> RunOptions:
    """Return the `parity.api` options of the replay: trace settings, local data."""
    from parity.api import RunOptions

    assert recorded.model is not None
    data, training = recorded.model.data, recorded.model.training
    settings = recorded.settings
    arrays: dict[str, Any] = {}
    if options.data is None:
        arrays = dict(zip(("x", "y"), stored_data(recorded), strict=True))
    flags = training["options"]
    return RunOptions(
        model=options.model,
        data=options.data,
        **arrays,
        x_name=data["x_name"],
        y_name=data["y_name"],
        target=data["target"],
        imports=options.imports,
        validation_split=data["validation_split"],
        configs=configs,
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        loss=flags["loss"],
        from_logits=flags["from_logits"],
        optimizer=flags["optimizer"],
        learning_rate=flags["learning_rate"],
        metrics=flags["metrics"],
        seed=settings["seed"],
        faults=faults,
        out=options.out,
        json_path=options.json_path,
        jobs=options.jobs,
        timeout=options.timeout,
        referee=options.referee,
        allow_nonfinite=data["allow_nonfinite"],
        report=options.report,
    )


def stored_data(recorded: RecordedTrace) -> tuple[np.ndarray, np.ndarray]:
    """Return the data stored in a model trace after checking it against its digest."""
    from parity.record import _invalid

    assert recorded.model is not None
    data = recorded.model.data
    if not data["stored"]:
        raise InputError(
            f"Trace {recorded.url} does not contain its data: "
            f"{data['bytes'] / 2**20:.1f} MiB is over the "
            f"{MAX_STORED_DATA_BYTES // 2**20} MiB a trace stores. Pass the data "
            f"that was recorded ({_short_text(data['source'])}) with --data "
            "(Python: data=)."
        )
    x = recorded.trace.tensor("data/x")
    y = recorded.trace.tensor("data/y")
    if data_digest(x, y) != data["sha256"]:
        raise _invalid(
            recorded.url, "tensors data/x and data/y do not match meta.data.sha256"
        )
    return x, y


def check_data_digest(
    recorded: RecordedTrace, options: ReplayOptions, data: PreparedData
) -> None:
    """Raise InputError unless the data read here has the recorded digest."""
    assert recorded.model is not None
    recorded_data = recorded.model.data
    digest = data_digest(data.dataset.x, data.dataset.y)
    if digest == recorded_data["sha256"]:
        return
    source = os.fspath(options.data) if options.data is not None else recorded.url
    fix = "Pass the data file that was recorded"
    if recorded_data["stored"]:
        fix += ", or leave out --data to use the data stored in the trace"
    raise InputError(
        f"Data {source!r} has digest {digest}, but the trace {recorded.url} was "
        f"recorded with data of digest {recorded_data['sha256']} "
        f"({_short_text(recorded_data['source'])}). {fix}."
    )


def check_training(recorded: RecordedTrace, training: Mapping[str, Any]) -> None:
    """Raise InputError unless the model here trains as the recorded one did."""
    assert recorded.model is not None
    recorded_training = recorded.model.training
    for name in ("task", *_TRAINING_ITEMS, "metrics"):
        ours, theirs = training.get(name), recorded_training.get(name)
        if ours != theirs:
            raise InputError(
                f"The model here trains with the {name.replace('_', ' ')} {ours!r}, "
                f"but the trace {recorded.url} recorded {theirs!r}. Replay with the "
                "model and the Keras version that were recorded."
            )
