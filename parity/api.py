"""Your own model and data, in lockstep: ``parity run`` and ``parity.compare``.

`run_model` checks the model and the data before any worker starts. It stores the
data as float32 arrays and the model as a ``.keras`` file (or a factory name) in the
run directory. Then it runs the same lockstep training, verdicts, JSON and report
as the doctor. `compare` is its Python form and returns a `Report`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import html
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.doctor import (
    TIMEOUT_BASE_SECONDS,
    TIMEOUT_SECONDS_PER_STEP,
    DoctorOptions,
    DoctorResult,
    plan_runs,
    prepare_output_paths,
    run_planned,
)
from parity.env import installed_backends
from parity.errors import InputError
from parity.io import atomic_write_json, atomic_write_text
from parity.lockstep import steps_per_epoch
from parity.models import (
    ModelReference,
    all_layers,
    describe_model,
    inspect_model,
    parse_model_reference,
)
from parity.runner import PlannedRun, ProgressCallback
from parity.scenarios import Scenario
from parity.sources import (
    DATA_FILE,
    Dataset,
    check_batch_size,
    check_finite,
    from_arrays,
    prepare_labels,
    read_data,
    read_stored_data,
    split,
    write_data,
)

log = logging.getLogger("parity")

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 32  # Keras' default for fit

MODEL_FILE = "model.keras"

PASSING_VERDICTS = ("consistent", "roundoff")


@dataclasses.dataclass
class RunOptions:
    """Options of `run_model`, set by the CLI flags of `parity run` or by `compare`.

    ``model`` is a ``.keras`` path, a factory string or a Keras model object. The
    data comes from ``data`` (a file, or ``x.npy,y.npy``) or from ``x`` and ``y``.
    """

    model: Any
    data: str | os.PathLike[str] | None = None
    x: Any = None
    y: Any = None
    validation_data: tuple[Any, Any] | None = None
    x_name: str = "x"
    y_name: str = "y"
    target: str | None = None
    imports: Sequence[str] = ()  # modules that register custom layers
    validation_split: float = 0.0
    configs: Sequence[str] | str | None = None
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    loss: str | None = None
    from_logits: bool | None = None
    optimizer: str | None = None
    learning_rate: float | None = None
    metrics: Sequence[str] | str | None = None
    seed: int = 0
    faults: Sequence[str] = ()
    out: str | os.PathLike[str] = "parity-report"
    json_path: str | os.PathLike[str] | None = None
    jobs: int | None = None
    timeout: float | None = None
    memory_limit: int | str | None = None
    resume: bool = False
    referee: str | None = None
    allow_nonfinite: bool = False
    report: bool = True

    def doctor_options(self, name: str) -> DoctorOptions:
        """Return the options that planning and running share with the doctor."""
        return DoctorOptions(
            scenario=name,
            configs=self.configs,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            faults=tuple(self.faults),
            out=self.out,
            json_path=self.json_path,
            jobs=self.jobs,
            timeout=self.timeout,
            referee=self.referee,
            report=self.report,
            memory_limit=self.memory_limit,
            resume=self.resume,
        )


def _overrides(options: RunOptions) -> dict[str, Any]:
    """Return the training settings given as options, checked for type and range."""
    rate = options.learning_rate
    if rate is not None and not (
        isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0
    ):
        raise InputError(
            f"Invalid --lr {rate!r} (Python: learning_rate=): use a positive number."
        )
    metrics = options.metrics
    if isinstance(metrics, str):
        metrics = [name.strip() for name in metrics.split(",") if name.strip()]
    return {
        "loss": options.loss,
        "from_logits": options.from_logits,
        "optimizer": options.optimizer,
        "learning_rate": None if rate is None else float(rate),
        "metrics": None if metrics is None else list(metrics),
    }


def _keras_model(model: Any) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.Model)


def _factory_name(function: Any) -> str:
    """Return ``module:function`` for an importable module-level function."""
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", "")
    if module in (None, "__main__") or not name.isidentifier():
        raise InputError(
            f"Model {function!r} is a function that worker processes cannot import "
            "(defined in __main__ or a notebook, or nested). Pass the Keras model it "
            "returns, or a function defined at the top of an importable module."
        )
    return f"{module}:{name}"


def _check_portable(keras: Any, model: Any) -> None:
    """Raise InputError for layers that the workers cannot load from a saved file."""
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.Lambda):
            raise InputError(
                f"Layer {layer.name!r} is a Lambda layer, whose code is never loaded "
                "in safe mode. Rewrite it as a layer class in an importable module."
            )
        if type(layer).__module__ == "__main__":
            raise InputError(
                f"Layer {layer.name!r} is of class {type(layer).__name__}, defined in "
                "__main__ (a script or notebook), so worker processes cannot load it. "
                "Move the class to an importable module and register it with "
                "@keras.saving.register_keras_serializable()."
            )


def _save_model_object(model: Any, out: Path) -> ModelReference:
    """Save a Keras model object for the workers; its custom classes' modules go along."""
    keras = sys.modules["keras"]
    if not model.built:
        raise InputError(
            f"Model {model.name!r} is not built, so it has no weights to start from: "
            "give it a keras.Input or call it on a batch first."
        )
    _check_portable(keras, model)
    path = out / MODEL_FILE
    model.save(path)
    modules = {type(layer).__module__ for layer in [model, *all_layers(model)]}
    custom = sorted(name for name in modules if name.split(".")[0] != "keras")
    return parse_model_reference(path).with_imports(custom)


def _inspect(
    options: RunOptions,
    reference: ModelReference,
    feature_shape: tuple[int, ...],
    runs: list[PlannedRun],
    out: Path,
) -> dict[str, Any]:
    overrides = _overrides(options)
    if _keras_model(options.model):
        keras = sys.modules["keras"]
        model = options.model
        compile_config = model.get_compile_config() if model.compiled else None
        return describe_model(
            keras, model, feature_shape, compile_config, overrides, repr(model.name)
        )
    installed = installed_backends()
    referee = next(run.config for run in runs if run.role == "referee")
    backend = referee.backend if referee.backend in installed else installed[0]
    return inspect_model(reference, feature_shape, overrides, backend, out / "inspect")


def _read_dataset(options: RunOptions) -> Dataset:
    if options.data is not None:
        if options.x is not None or options.y is not None:
            raise InputError(
                "Give the data either as a file (--data, Python: data=) or as arrays "
                "(Python: x=, y=), not both."
            )
        return read_data(
            options.data,
            x_name=options.x_name,
            y_name=options.y_name,
            target=options.target,
        )
    if options.x is None or options.y is None:
        raise InputError(
            "No data given: pass --data FILE (Python: x= and y= arrays, or data=FILE)."
        )
    return from_arrays(options.x, options.y)


def _user_scenario(
    name: str,
    description: str,
    labels_task: str,
    num_classes: int,
    options: RunOptions,
    learning_rate: float | None,
    data_path: Path,
) -> Scenario:
    """Wrap the stored data as a `Scenario`, so the doctor's report can draw it.

    Its data are the compared (held-out) inputs with their class indices.
    """

    def load() -> tuple[np.ndarray, np.ndarray]:
        arrays = read_stored_data(data_path)
        return arrays["x_eval"], arrays.get("classes_eval", arrays["y_eval"])

    def build(keras: Any, activation: str) -> Any:
        raise TypeError("a user model is built by parity.models.build_model")

    return Scenario(
        name,
        description,
        labels_task,
        num_classes,
        options.epochs,
        options.batch_size,
        learning_rate if learning_rate is not None else math.nan,
        load,
        build,
    )


def _describe(
    description: dict[str, Any],
    reference_text: str,
    train: Dataset,
    evaluation: Dataset | None,
) -> str:
    training = description["training"]
    rate = training["learning_rate"]
    held_out = (
        f"{len(evaluation.x)} held-out rows compared"
        if evaluation is not None
        else "predictions compared on the training data"
    )
    text = (
        f"{description['class_name']} {reference_text} ({description['num_params']} "
        f"parameters) on {train.source}: {len(train.x)} training rows, {held_out}; "
        f"{training['loss_name']}, {training['optimizer_name']}"
        + (f" at learning rate {rate:.3g}" if rate is not None else "")
    )
    if description["random_layers"]:
        text += (
            f". NOTE: layers {', '.join(description['random_layers'])} draw random "
            "numbers, which differ between backends, so their trajectories differ by "
            "more than round-off"
        )
    return text


def run_model(
    options: RunOptions, progress: ProgressCallback | None = None
) -> DoctorResult:
    """Check the model and data, then train in lockstep, judge and report.

    Every input check runs before the first worker starts and raises InputError
    (or ConfigError) naming the value and the fix.
    """
    reference_text = _reference_text(options.model)
    doctor_options = options.doctor_options(reference_text)
    runs = plan_runs(doctor_options)
    _overrides(options)
    prepare_output_paths(doctor_options)
    data = prepare_data(options)
    prepared = prepare_model_run(options, runs, data, Path(options.out))
    return run_planned(
        doctor_options,
        prepared.scenario,
        runs,
        prepared.common,
        prepared.timeout,
        progress,
    )


@dataclasses.dataclass
class PreparedData:
    """The data as read (``dataset``), split into training and held-out rows."""

    dataset: Dataset
    train: Dataset
    evaluation: Dataset | None
    nonfinite: list[str]  # findings of NaN and inf, when they are allowed


@dataclasses.dataclass
class PreparedModel:
    """A checked model with its stored data: what the workers of a run share."""

    reference: ModelReference
    description: dict[str, Any]
    scenario: Scenario
    common: dict[str, Any]  # the common worker spec
    timeout: float  # seconds per worker


def prepare_model_run(
    options: RunOptions, runs: list[PlannedRun], data: PreparedData, directory: Path
) -> PreparedModel:
    """Inspect the model against the data and store both in ``directory`` for workers.

    ``runs`` must include the referee, whose backend inspects the model.
    `parity run` and `parity record MODEL` share this step.
    """
    train, evaluation = data.train, data.evaluation
    reference_text = _reference_text(options.model)
    reference = _resolve_reference(options, directory)
    description = _inspect(options, reference, train.x.shape[1:], runs, directory)
    loss_name = description["training"]["loss_name"]
    output_shape = description["output_shape"]
    train_labels = prepare_labels(train.y, loss_name, output_shape, train.source)
    evaluation_labels = None
    if evaluation is not None:
        evaluation_labels = prepare_labels(
            evaluation.y, loss_name, output_shape, evaluation.source
        )
    data_path = directory / DATA_FILE
    write_data(data_path, train, train_labels, evaluation, evaluation_labels)
    if description["random_layers"]:
        log.warning(
            "layers %s draw random numbers, which differ between backends: expect "
            "divergent verdicts that are not faults",
            ", ".join(description["random_layers"]),
        )

    training = {**description["training"], "task": train_labels.task}
    scenario = _user_scenario(
        reference_text,
        _describe(description, reference_text, train, evaluation),
        train_labels.task,
        train_labels.num_classes,
        options,
        training["learning_rate"],
        data_path,
    )
    common = {
        "name": reference_text,
        "model": reference.to_spec(),
        "model_summary": _model_summary(description),
        "data": {
            "path": str(data_path.resolve()),
            "source": train.source,
            "sha256": _file_digest(data_path),
            "train_rows": len(train.x),
            "held_out_rows": 0 if evaluation is None else len(evaluation.x),
            "feature_shape": list(train.x.shape[1:]),
            "nonfinite": data.nonfinite,
        },
        "training": training,
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "seed": options.seed,
    }
    steps = options.epochs * steps_per_epoch(len(train.x), options.batch_size)
    timeout = options.timeout or (
        TIMEOUT_BASE_SECONDS + TIMEOUT_SECONDS_PER_STEP * steps
    )
    return PreparedModel(reference, description, scenario, common, timeout)


def prepare_data(options: RunOptions) -> PreparedData:
    """Read and check the data and split off the held-out rows."""
    dataset = _read_dataset(options)
    findings = check_finite(dataset, options.allow_nonfinite)
    if options.validation_data is None:
        train, evaluation = split(dataset, options.validation_split)
    elif options.validation_split:
        raise InputError(
            "Give held-out data either as validation_data= or as validation_split=, "
            "not both."
        )
    else:
        train = dataset
        evaluation = from_arrays(*options.validation_data, source="validation_data")
        findings += check_finite(evaluation, options.allow_nonfinite)
        if evaluation.x.shape[1:] != train.x.shape[1:]:
            raise InputError(
                f"Validation inputs (Python: validation_data=) have shape "
                f"{evaluation.x.shape[1:]} per sample but the training inputs have "
                f"{train.x.shape[1:]}: give both the same features."
            )
    check_batch_size(options.batch_size, train)
    return PreparedData(dataset, train, evaluation, findings)


def _resolve_reference(options: RunOptions, out: Path) -> ModelReference:
    """Turn the model option into a checked reference, saving a model object first."""
    if _keras_model(options.model):
        reference = _save_model_object(options.model, out)
    elif callable(options.model):
        reference = parse_model_reference(_factory_name(options.model))
    else:
        reference = parse_model_reference(options.model)
    if options.imports:
        named = [*(name for name, _ in reference.imports), *options.imports]
        reference = reference.with_imports(list(dict.fromkeys(named)))
    return reference


def _reference_text(model: Any) -> str:
    if _keras_model(model):
        return f"model {model.name!r}"
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if callable(model):
        return getattr(model, "__qualname__", repr(model))
    raise InputError(
        f"Invalid model {type(model).__name__}: pass a keras.Model, a .keras path, or "
        "a factory string module:function or path/to/file.py:function."
    )


def _model_summary(description: dict[str, Any]) -> dict[str, Any]:
    keys = ("class_name", "num_params", "output_shape", "random_layers", "compiled")
    return {key: description[key] for key in keys}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Report:
    """The outcome of `compare`: verdicts per configuration, the JSON, the report.

    In Jupyter the report shows itself as the verdict table and the main figure.
    """

    def __init__(self, result: DoctorResult):
        self.result = result

    @property
    def verdicts(self) -> dict[str, str]:
        """The verdict of each configuration, keyed by its configuration string."""
        return {
            entry["config"]: entry["verdict"]
            for entry in self.result.summary["configs"]
        }

    @property
    def ok(self) -> bool:
        """Whether every configuration is consistent or roundoff."""
        return all(verdict in PASSING_VERDICTS for verdict in self.verdicts.values())

    @property
    def report_path(self) -> Path | None:
        """The HTML report written by the run, if one was written."""
        return self.result.report_path

    @property
    def json_path(self) -> Path | None:
        """The JSON results written by the run."""
        return self.result.json_path

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON document of the run (the same as ``results.json``)."""
        return json.loads(json.dumps(copy.deepcopy(self.result.summary), default=str))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON results (for a ``.json`` path) or the HTML report (otherwise)."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            atomic_write_json(path, self.result.summary)
        else:
            from parity.report import render

            atomic_write_text(path, render(self.result))
        return path

    def __repr__(self) -> str:
        lines = [f"<parity.Report: {self.result.summary['scenario']['name']}>"]
        for entry in self.result.summary["configs"]:
            lines.append(f"  {entry['config']}: {entry['verdict']} ({entry['reason']})")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from parity.report import (
            boundary_figure,
            class_disagreement_figure,
            verdict_table,
        )

        summary = self.result.summary
        referee = summary["referee"] or {}
        parts = [
            f"<h3>parity: {html.escape(summary['scenario']['name'])}</h3>",
            f"<p>{html.escape(summary['scenario']['description'])}. Referee "
            f"<code>{html.escape(str(referee.get('config')))}</code>.</p>",
            verdict_table(self.result),
        ]
        figure = boundary_figure(self.result) or class_disagreement_figure(self.result)
        if figure:
            parts.append(
                '<img alt="predictions compared with the referee" '
                f'src="data:image/png;base64,{figure}">'
            )
        if self.report_path:
            parts.append(
                f"<p>Full report: <code>{html.escape(str(self.report_path))}</code></p>"
            )
        return "\n".join(parts)


def compare(
    model: Any,
    x: Any,
    y: Any,
    *,
    configs: Sequence[str] | str | None = None,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    out: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Report:
    """Train ``model`` on ``x`` and ``y`` in lockstep on each configuration and judge it.

    ``model`` is a Keras model object (saved to ``model.keras`` in the run
    directory), a ``.keras`` path, or a factory string. Other keyword arguments are
    the fields of `RunOptions` (``loss``, ``optimizer``, ``learning_rate``,
    ``validation_split``, ``faults``, ``referee``, ...). Without ``out`` the run
    directory is a new temporary directory, named in the returned report's paths.
    """
    fields = {field.name for field in dataclasses.fields(RunOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise InputError(
            f"Unknown argument(s) {', '.join(unknown)} for parity.compare; the "
            f"arguments are: {', '.join(sorted(fields - {'model', 'x', 'y'}))}."
        )
    directory = out if out is not None else tempfile.mkdtemp(prefix="parity-")
    run_options = RunOptions(
        model=model,
        x=x,
        y=y,
        configs=configs,
        epochs=epochs,
        batch_size=batch_size,
        out=directory,
        **options,
    )
    return Report(run_model(run_options))
