"""Record lockstep runs into trace files, and compare or replay recorded runs.

Machines that never meet each record a run into a ``.parity`` trace (see
`parity.trace` for the file format). Any machine can then compare the traces
against a float64 referee, or rerun a recorded run on its own configurations.

Contents of a lockstep trace
----------------------------
``meta`` is a JSON object:

- ``kind``: ``"parity-lockstep"``, and ``kind_version``: 1;
- ``parity_version`` and ``recorded_at`` (UTC, ISO 8601);
- ``scenario``: name, epochs, batch size, seed, learning rate and activation;
- ``digests``: SHA-256 of the initial weights, the batch schedule and the data, as
  `parity.lockstep.digest_bytes` computes them;
- ``environment``: the fingerprint of the recording process;
- ``runs``: one entry per worker run. An entry contains the run's key, role
  (``candidate``, ``referee`` or ``envelope``), configuration, faults, envelope
  seed, status and error. Its ``result`` is the worker's own result document:
  steps, checkpoint steps, variable names and shapes, final loss and accuracy,
  timing and the worker's environment fingerprint.

Tensors: ``schedule`` (epochs x samples batch order) once, and for run ``i`` every
array that its worker wrote, under ``run/{i}/``: per-step loss, batch accuracy,
parameter norms and parameter digests (``steps/...``), checkpoints of parameters
and optimizer state (``checkpoint/{step}/param/{j}``, where step 0 holds the
initial weights) and predictions on the data and on the decision grid.

``parity record --with-referee`` puts the float64 referee and the envelope runs in
the same file, so ``parity compare`` needs no local training. Without them, compare
and replay train the referee and envelope here and check that the initial weights,
the batch schedule and the data have the recorded digests. Runs trained here start
from the trace's own initial weights (a step-0 checkpoint with the init digest)
and batch schedule, written to a start file for the workers.

``parity record MODEL --data DATA`` records a user's own model instead of a
scenario: layout version 2, with the model, its training settings and the data
described in ``meta`` and the data stored when small (see `parity.record_model`).

A trace is untrusted input. Every field and tensor shape is checked before use,
names from a trace never become paths, and a trace never names code to run:
recorded faults are applied again only when they are catalogue names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from parity import __version__
from parity.config import default_referee, parse_config
from parity.doctor import (
    DoctorOptions,
    DoctorResult,
    default_timeout,
    judge_all,
    plan_doctor,
    plan_referee_runs,
    prepare_output_paths,
    summarize,
)
from parity.env import fingerprint, installed_backends
from parity.errors import ConfigError, InputError, WorkerError
from parity.faults import CATALOGUE
from parity.io import atomic_write_json
from parity.lockstep import SKETCH_SIZE, digest_bytes, steps_per_epoch
from parity.runner import (
    PlannedRun,
    ProgressCallback,
    RunResult,
    default_memory_limit,
    execute,
)
from parity.scenarios import GRID_SIZE, Scenario, get_scenario
from parity.trace import Trace, TraceError, read_trace, write_trace

if TYPE_CHECKING:
    from parity.record_model import ModelSection

log = logging.getLogger("parity")

LOCKSTEP_KIND = "parity-lockstep"
FIT_KIND = "keras-fit"
# Version of the meta layout described above, for each kind. A reader accepts
# versions 1 to KIND_VERSION.
KIND_VERSION = 1
# Lockstep traces of a user's own model are version 2, so that a parity that reads
# only version 1 rejects them by their version rather than as an unknown scenario.
# Scenario traces and fit traces are still written as version 1.
MODEL_KIND_VERSION = 2

# Elements per slice when checkpoints are streamed from a trace: 1 MiB of float32,
# so a comparison keeps a few slices in memory whatever the model size. Slices of
# 2**16 to 2**18 elements kept the float64 temporaries in cache and were the
# fastest in benchmarks/trace_io.py on a 2-core x86-64 CPU.
CHUNK_ELEMENTS = 2**18

# Display limit for values from a trace (environment items, errors) in the
# terminal, so that a hostile or damaged trace cannot flood it.
MAX_DISPLAY_CHARS = 160

# Runs per trace: a candidate, a referee and two envelope runs are four.
MAX_RUNS = 64

_ROLES = ("candidate", "referee", "envelope")
_STATUSES = ("ok", "failed", "not-run")
_RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Fault names as the CLI accepts them: catalogue names, module:function and
# path/file.py:function, optionally @CONFIG.
_FAULT_NAME = re.compile(r"[A-Za-z0-9_.:/@=+-]{1,200}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_ACTIVATION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
DEFAULT_SCENARIO = "circles"
DEFAULT_ACTIVATION = "relu"
_SCENARIO_FIELDS = (
    "name",
    "epochs",
    "batch_size",
    "seed",
    "learning_rate",
    "activation",
)


# ---------------------------------------------------------------------------
# Recording


@dataclasses.dataclass
class RecordOptions:
    """Options of `record_run`: the run to train and the trace to write."""

    output: str
    config: str
    scenario: str | None = None  # a built-in scenario; circles when no model is given
    epochs: int | None = None  # default: the scenario's, or parity.api's for a model
    batch_size: int | None = None
    seed: int = 0
    faults: Sequence[str] = ()
    with_referee: bool = False
    referee: str | None = None
    activation: str | None = None  # of a scenario's hidden layers; relu by default
    jobs: int | None = None
    timeout: float | None = None
    # A user model instead of a scenario, with its data and the training options of
    # parity.api.RunOptions.
    model: str | os.PathLike[str] | None = None
    data: str | os.PathLike[str] | None = None
    x_name: str = "x"
    y_name: str = "y"
    target: str | None = None
    imports: Sequence[str] = ()
    validation_split: float = 0.0
    loss: str | None = None
    from_logits: bool | None = None
    optimizer: str | None = None
    learning_rate: float | None = None
    metrics: Sequence[str] | str | None = None
    allow_nonfinite: bool = False


@dataclasses.dataclass
class RecordResult:
    """The runs that `record_run` trained and the trace it wrote."""

    url: str
    results: list[RunResult]

    @property
    def candidate(self) -> RunResult:
        """The recorded configuration's run."""
        return next(r for r in self.results if r.run.role == "candidate")


def record_run(
    options: RecordOptions, progress: ProgressCallback | None = None
) -> RecordResult:
    """Train one configuration in lockstep and write its trace to ``options.output``.

    The trace is written even when the run fails, so that the failure can be
    compared with other machines' traces. With ``options.model`` the user's model
    is recorded (`parity.record_model.record_model`).
    """
    _check_model_options(options)
    if "," in str(options.config):
        raise InputError(
            f"--config {options.config!r} names several configurations, but a trace "
            "records one (Python: config=). Record each configuration into its own "
            "file, then compare the files."
        )
    if options.model is not None:
        from parity.record_model import record_model

        return record_model(options, progress)
    check_writable(options.output)
    runs, common, scenario = plan_record(options)
    jobs = options.jobs or max(1, min(4, os.cpu_count() or 1))
    timeout = options.timeout or default_timeout(
        scenario, common["epochs"], common["batch_size"]
    )
    with tempfile.TemporaryDirectory(prefix="parity-record-") as work:
        results = execute(
            runs,
            Path(work),
            common,
            jobs=jobs,
            timeout=timeout,
            memory_limit=default_memory_limit(jobs),
            progress=progress,
        )

    meta, tensors = trace_contents(scenario, common, results)
    write_recording(options.output, meta, tensors)
    log.info("recorded %d runs into %s", len(results), options.output)
    return RecordResult(os.fspath(options.output), results)


def write_recording(
    output: str | os.PathLike[str],
    meta: dict[str, Any],
    tensors: dict[str, np.ndarray],
) -> None:
    """Write a recorded trace; raise InputError naming the path when that fails."""
    try:
        write_trace(output, meta, tensors)
    except OSError as error:
        raise InputError(
            f"Cannot write the trace to {output}: {error}. Choose another "
            "-o path (Python: output=)."
        ) from error


def _check_model_options(options: RecordOptions) -> None:
    """Reject a scenario given with a model, and model options given without one."""
    if options.model is not None:
        if options.scenario is not None:
            raise InputError(
                f"Give either MODEL ({str(options.model)!r}) or --scenario "
                f"({options.scenario!r}), not both: MODEL records your own model, "
                "--scenario a built-in one (Python: model= or scenario=)."
            )
        if options.activation is not None:
            raise InputError(
                f"--activation {options.activation!r} (Python: activation=) sets a "
                "built-in scenario's hidden layers; a model given as MODEL keeps "
                "its own. Drop --activation."
            )
        return
    model_flags = {
        "--data": options.data is not None,
        "--x": options.x_name != "x",
        "--y": options.y_name != "y",
        "--target": options.target is not None,
        "--import": bool(options.imports),
        "--validation-split": bool(options.validation_split),
        "--loss": options.loss is not None,
        "--from-logits": options.from_logits is not None,
        "--optimizer": options.optimizer is not None,
        "--lr": options.learning_rate is not None,
        "--metrics": options.metrics is not None,
        "--allow-nonfinite": options.allow_nonfinite,
    }
    flags = [flag for flag, present in model_flags.items() if present]
    if flags:
        verb = "applies" if len(flags) == 1 else "apply"
        raise InputError(
            f"{', '.join(flags)} {verb} to your own model, but no MODEL is given "
            "(Python: model=). Record it as parity record MODEL --data DATA "
            "--config CONFIG -o FILE, or drop them to record a --scenario."
        )


def plan_record(
    options: RecordOptions,
) -> tuple[list[PlannedRun], dict[str, Any], Scenario]:
    """Plan the recorded configuration's run, with the referee and envelope if asked."""
    scenario = get_scenario(options.scenario or DEFAULT_SCENARIO)
    activation = options.activation or DEFAULT_ACTIVATION
    doctor_options = DoctorOptions(
        scenario=scenario.name,
        configs=[options.config],
        epochs=options.epochs,
        batch_size=options.batch_size,
        seed=options.seed,
        faults=list(options.faults),
        jobs=options.jobs,
        timeout=options.timeout,
        referee=options.referee,
        activation=activation,
    )
    runs = plan_doctor(doctor_options)
    if not options.with_referee:
        runs = [run for run in runs if run.role == "candidate"]
    check_runnable(runs)
    common = _common_spec(
        scenario,
        options.epochs or scenario.epochs,
        options.batch_size or scenario.batch_size,
        options.seed,
        activation,
    )
    return runs, common, scenario


def check_runnable(runs: Sequence[PlannedRun]) -> None:
    """Raise InputError when a run to record cannot run here."""
    for run in runs:
        if run.not_run_reason is not None:
            raise InputError(
                f"Cannot record {run.config} as {run.role}: {run.not_run_reason}. "
                "Install it, or choose another --config or --referee."
            )


def _common_spec(
    scenario: Scenario, epochs: int, batch_size: int, seed: int, activation: str
) -> dict[str, Any]:
    return {
        "scenario": scenario.name,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "learning_rate": scenario.learning_rate,
        "activation": activation,
    }


def check_writable(url: str | os.PathLike[str]) -> None:
    """Reject an output URL that cannot be written before hours of training."""
    url = os.fspath(url)
    try:
        filesystem, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as error:
        raise InputError(
            f"Cannot write a trace to {url!r}: {error}. Pass a local path or an "
            "fsspec URL such as s3://bucket/run.parity to -o (Python: output=)."
        ) from error
    if isinstance(filesystem, fsspec.implementations.local.LocalFileSystem):
        if os.path.isdir(path):
            raise InputError(
                f"Cannot write the trace {url}: it is a directory. Name a file, "
                "such as -o run.parity (Python: output=)."
            )
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise InputError(
                f"Cannot write the trace {url}: the directory {directory} does not "
                "exist. Create it first."
            )
        # Writing a probe file is the one check that holds for permissions,
        # read-only mounts and pseudo file systems such as /proc alike.
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".parity-probe-"):
                pass
        except OSError as error:
            raise InputError(
                f"Cannot write the trace {url}: the directory {directory} is not "
                f"writable ({error.strerror or error}). Choose another -o path "
                "(Python: output=)."
            ) from None


def trace_contents(
    scenario: Scenario, common: Mapping[str, Any], results: Sequence[RunResult]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return the meta and the tensors of a lockstep trace of ``results``."""
    finished = [result for result in results if result.ok]
    tensors: dict[str, np.ndarray] = {}
    if finished:
        tensors["schedule"] = finished[0].arrays["schedule"]
    runs = []
    for index, result in enumerate(results):
        runs.append(_run_entry(result))
        for name, array in result.arrays.items():
            if name != "schedule":
                tensors[f"run/{index}/{name}"] = array
    meta = {
        "kind": LOCKSTEP_KIND,
        "kind_version": KIND_VERSION,
        "parity_version": __version__,
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "scenario": {
            "name": scenario.name,
            **{key: common[key] for key in _SCENARIO_FIELDS[1:]},
        },
        "digests": _shared_digests(finished),
        "environment": fingerprint(),
        "runs": runs,
    }
    return meta, tensors


def _run_entry(result: RunResult) -> dict[str, Any]:
    run = result.run
    return {
        "key": run.key,
        "role": run.role,
        "config": str(run.config),
        "faults": list(run.faults),
        "perturb_seed": run.perturb_seed,
        "status": result.status,
        "error": result.error,
        "stderr_tail": result.stderr_tail,
        "wall_seconds": result.wall_seconds,
        "result": result.meta,
    }


def _shared_digests(finished: Sequence[RunResult]) -> dict[str, str | None]:
    """Return the digests that every finished run reports, which must agree."""
    digests: dict[str, str | None] = {"init": None, "schedule": None, "data": None}
    for result in finished:
        for name in digests:
            value = result.meta.get(f"{name}_digest")
            if digests[name] is None:
                digests[name] = value
            elif value != digests[name]:
                raise WorkerError(
                    f"The runs recorded together disagree on the {name} digest "
                    f"({digests[name]} and {value} from {result.run.label}), so the "
                    "workers did not train from the same start. Report this as a bug."
                )
    return digests


# ---------------------------------------------------------------------------
# Reading and validating traces


def open_trace(url: str | os.PathLike[str]) -> Trace:
    """Open a trace and turn every way of failing into a TraceError naming the file."""
    url = os.fspath(url)
    try:
        return read_trace(url)
    except FileNotFoundError:
        raise TraceError(f"Trace {url} not found. Check the path or URL.") from None
    except (OSError, ValueError, ImportError) as error:
        # fsspec raises ValueError for an unknown protocol and ImportError when the
        # protocol's package is missing, as for s3:// without s3fs.
        raise TraceError(f"Cannot read trace {url}: {error}") from error


def _invalid(url: str, problem: str) -> TraceError:
    return TraceError(
        f"Trace {url} is not a valid parity recording: {problem}. Record it again "
        "with parity record or parity.keras.Recorder."
    )


def _field(url: str, mapping: Any, key: str, where: str, kind: str) -> Any:
    """Return ``mapping[key]`` after checking that it is of ``kind``.

    Kinds: ``int`` (not bool), ``count`` (an int of at least 1), ``number`` (a
    finite int or float), ``str``, ``dict``, ``list`` and ``bool``. A kind ending
    in ``?``, such as ``str?``, also accepts null.
    """
    if not isinstance(mapping, dict):
        raise _invalid(url, f"{where} is not an object")
    value = mapping.get(key)
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if value is None and optional:
        return None
    checks = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "number": _is_finite_number,
        "str": lambda v: isinstance(v, str),
        "dict": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
        "bool": lambda v: isinstance(v, bool),
    }
    if not checks[base](value):
        expected = {
            "int": "an integer",
            "count": "a positive integer",
            "number": "a finite number",
            "str": "a string",
            "dict": "an object",
            "list": "an array",
            "bool": "true or false",
        }[base]
        found = "missing" if key not in mapping else _short(repr(value))
        raise _invalid(url, f"{where}.{key} is {found}, expected {expected}")
    return value


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond the float range
        return False


def _is_float(dtype: np.dtype) -> bool:
    """Return whether a tensor's dtype is a float type, bfloat16 included."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_kind(url: str, meta: Mapping[str, Any], expected: str | None) -> str:
    """Return the trace's kind after checking it and its layout version."""
    kind = meta.get("kind")
    if kind not in (LOCKSTEP_KIND, FIT_KIND):
        raise _invalid(
            url,
            f"its meta has kind {_short(repr(kind))}, expected {LOCKSTEP_KIND!r} or "
            f"{FIT_KIND!r}",
        )
    version = _field(url, meta, "kind_version", "meta", "count")
    newest = MODEL_KIND_VERSION if kind == LOCKSTEP_KIND else KIND_VERSION
    if version > newest:
        raise TraceError(
            f"Trace {url} has {kind} layout version {version}, but this version of "
            f"parity reads versions 1 to {newest}. Upgrade parity to read it."
        )
    if expected is not None and kind != expected:
        raise _invalid(url, f"it is a {kind} trace, expected a {expected} trace")
    return kind


@dataclasses.dataclass
class RecordedTrace:
    """An open lockstep trace: its settings, and its runs as worker results.

    The small per-step arrays are loaded into the results. Checkpoints stay in
    the file and are streamed by `checkpoint_distances`.
    """

    url: str
    trace: Trace
    scenario: Scenario
    settings: dict[str, Any]
    digests: dict[str, str]
    results: list[RunResult]
    tensor_prefix: dict[str, str]
    # The model, training and data sections of a trace of a user's own model.
    model: ModelSection | None = None

    @property
    def name(self) -> str:
        """The file name, used to label the trace's runs."""
        return posixpath_basename(self.url)

    @property
    def referee(self) -> RunResult | None:
        """The trace's referee run, if it has one that finished."""
        return next((r for r in self.results if r.run.role == "referee" and r.ok), None)

    @property
    def candidates(self) -> list[RunResult]:
        """The runs of the recorded configurations."""
        return [r for r in self.results if r.run.role == "candidate"]


def posixpath_basename(url: str) -> str:
    """Return the last part of a path or URL, such as ``run.parity``."""
    return url.rstrip("/").rsplit("/", 1)[-1] or url


def load_lockstep_trace(url: str | os.PathLike[str], index: int = 0) -> RecordedTrace:
    """Open and validate a lockstep trace; ``index`` makes run keys unique.

    The caller closes ``result.trace``.
    """
    url = os.fspath(url)
    trace = open_trace(url)
    try:
        meta = trace.meta
        check_kind(url, meta, LOCKSTEP_KIND)
        model = None
        if meta["kind_version"] >= MODEL_KIND_VERSION:
            from parity.record_model import read_model_settings

            scenario, settings, model = read_model_settings(url, trace)
        else:
            scenario, settings = _read_settings(url, meta)
        entries = _field(url, meta, "runs", "meta", "list")
        if not entries:
            raise _invalid(url, "meta.runs is empty")
        if len(entries) > MAX_RUNS:
            raise _invalid(
                url, f"meta.runs has {len(entries)} runs, more than {MAX_RUNS}"
            )
        finished = any(isinstance(e, dict) and e.get("status") == "ok" for e in entries)
        # A trace of runs that all failed has no digests and no schedule.
        digests = _read_digests(url, meta) if finished else {}
        samples = _check_schedule(url, trace, settings, digests) if finished else 0
        results = []
        prefixes = {}
        for position, entry in enumerate(entries):
            result = _read_run(
                url, trace, entry, position, {**settings, "samples": samples}, digests
            )
            if any(r.run.key == result.run.key for r in results):
                raise _invalid(url, f"run key {result.run.key!r} appears twice")
            results.append(result)
        for position, result in enumerate(results):
            result.run.key = f"t{index}-{result.run.key}"
            prefixes[result.run.key] = f"run/{position}/"
    except BaseException:
        trace.close()
        raise
    return RecordedTrace(
        url, trace, scenario, settings, digests, results, prefixes, model
    )


def _read_settings(url: str, meta: Mapping[str, Any]) -> tuple[Scenario, dict]:
    recorded = _field(url, meta, "scenario", "meta", "dict")
    name = _field(url, recorded, "name", "meta.scenario", "str")
    try:
        scenario = get_scenario(name)
    except InputError:
        raise _invalid(
            url, f"it records the scenario {_short(repr(name))}, which is not built in"
        ) from None
    settings = {
        "name": scenario.name,
        "epochs": _field(url, recorded, "epochs", "meta.scenario", "count"),
        "batch_size": _field(url, recorded, "batch_size", "meta.scenario", "count"),
        "seed": _field(url, recorded, "seed", "meta.scenario", "int"),
        "learning_rate": float(
            _field(url, recorded, "learning_rate", "meta.scenario", "number")
        ),
        "activation": _field(url, recorded, "activation", "meta.scenario", "str"),
    }
    if not _ACTIVATION.fullmatch(settings["activation"]):
        raise _invalid(
            url,
            f"meta.scenario.activation {_short(repr(settings['activation']))} is not "
            "an activation name",
        )
    if not (0 <= settings["seed"] < 2**63 and math.isfinite(settings["learning_rate"])):
        raise _invalid(url, "meta.scenario.seed or learning_rate is out of range")
    return scenario, settings


def _read_digests(url: str, meta: Mapping[str, Any]) -> dict[str, str]:
    recorded = _field(url, meta, "digests", "meta", "dict")
    digests = {}
    for name in ("init", "schedule", "data"):
        value = _field(url, recorded, name, "meta.digests", "str")
        if not _DIGEST.fullmatch(value):
            raise _invalid(
                url, f"meta.digests.{name} is not a SHA-256 hex digest: {_short(value)}"
            )
        digests[name] = value
    return digests


def _check_schedule(
    url: str, trace: Trace, settings: Mapping[str, Any], digests: Mapping[str, str]
) -> int:
    """Check the recorded batch schedule and return the number of samples."""
    info = _tensor_info(url, trace, "schedule")
    epochs = settings["epochs"]
    if info.dtype.kind not in "iu" or len(info.shape) != 2 or info.shape[0] != epochs:
        raise _invalid(
            url,
            f"tensor 'schedule' is {info.dtype} {list(info.shape)}, expected integers "
            f"of shape [{epochs}, samples]",
        )
    schedule = trace.tensor("schedule")
    if digest_bytes([schedule]) != digests["schedule"]:
        raise _invalid(url, "tensor 'schedule' does not match meta.digests.schedule")
    return info.shape[1]


def _tensor_info(url: str, trace: Trace, name: str) -> Any:
    if name not in trace.tensor_names():
        raise _invalid(url, f"tensor {name!r} is missing")
    return trace.tensor_info(name)


def _read_run(
    url: str,
    trace: Trace,
    entry: Any,
    position: int,
    settings: Mapping[str, Any],
    digests: Mapping[str, str],
) -> RunResult:
    """Read one entry of ``meta.runs``; ``settings`` includes the sample count."""
    where = f"meta.runs[{position}]"
    key = _field(url, entry, "key", where, "str")
    if not _RUN_KEY.fullmatch(key) or ".." in key:
        raise _invalid(
            url,
            f"{where}.key {_short(repr(key))} is not a plain run name (letters, digits, "
            "'.', '_' and '-'); it may be an attempt to reach a path outside the trace",
        )
    role = _field(url, entry, "role", where, "str")
    status = _field(url, entry, "status", where, "str")
    if role not in _ROLES or status not in _STATUSES:
        raise _invalid(url, f"{where} has role {role!r} and status {status!r}")
    try:
        config = parse_config(_field(url, entry, "config", where, "str"))
    except ConfigError as error:
        raise _invalid(url, f"{where}.config is invalid: {error}") from None
    faults = _field(url, entry, "faults", where, "list")
    for fault in faults:
        if not isinstance(fault, str) or not _FAULT_NAME.fullmatch(fault):
            raise _invalid(url, f"{where}.faults has {_short(repr(fault))}")
    perturb_seed = _field(url, entry, "perturb_seed", where, "int?")
    if role == "envelope" and not isinstance(perturb_seed, int):
        raise _invalid(url, f"{where} is an envelope run without an integer seed")

    run = PlannedRun(
        key,
        config,
        role,
        tuple(faults),
        perturb_seed if role == "envelope" else None,
    )
    error = _field(url, entry, "error", where, "str?")
    stderr_tail = _field(url, entry, "stderr_tail", where, "str?") or ""
    wall = _field(url, entry, "wall_seconds", where, "number?") or 0.0
    if status != "ok":
        return RunResult(
            run,
            status,
            error=error or status,
            stderr_tail=stderr_tail,
            wall_seconds=wall,
        )
    meta = _read_run_result(url, entry, where, settings, digests)
    # A user model's predictions are on its held-out rows when it has any.
    rows = settings.get("eval_rows") or settings["samples"]
    arrays = _read_run_arrays(url, trace, f"run/{position}/", meta, rows)
    return RunResult(run, "ok", meta, arrays, wall_seconds=float(wall))


def _read_run_result(
    url: str,
    entry: Mapping[str, Any],
    where: str,
    settings: Mapping[str, Any],
    digests: Mapping[str, str],
) -> dict[str, Any]:
    meta = _field(url, entry, "result", where, "dict")
    where = f"{where}.result"
    steps = _field(url, meta, "steps", where, "count")
    per_epoch = _field(url, meta, "steps_per_epoch", where, "count")

    for name in ("epochs", "batch_size"):
        if _field(url, meta, name, where, "count") != settings[name]:
            raise _invalid(url, f"{where}.{name} differs from meta.scenario.{name}")
    if per_epoch != steps_per_epoch(settings["samples"], settings["batch_size"]):
        raise _invalid(
            url,
            f"{where}.steps_per_epoch is {per_epoch}, but {settings['samples']} "
            f"samples in batches of {settings['batch_size']} make "
            f"{steps_per_epoch(settings['samples'], settings['batch_size'])}",
        )
    if steps != settings["epochs"] * per_epoch:
        raise _invalid(
            url,
            f"{where} has {steps} steps, but {settings['epochs']} epochs of "
            f"{per_epoch} steps",
        )
    for name in ("init", "schedule", "data"):
        if _field(url, meta, f"{name}_digest", where, "str") != digests[name]:
            raise _invalid(url, f"{where}.{name}_digest differs from meta.digests")

    _field(url, meta, "final_loss", where, "number?")
    _field(url, meta, "final_accuracy", where, "number?")
    _field(url, meta, "environment", where, "dict")

    names = _field(url, meta, "variable_names", where, "list")
    shapes = _field(url, meta, "variable_shapes", where, "list")
    if len(names) != len(shapes) or not all(isinstance(n, str) for n in names):
        raise _invalid(url, f"{where}.variable_names and variable_shapes do not match")
    for shape in shapes:
        if not _is_shape(shape):
            raise _invalid(url, f"{where}.variable_shapes has {_short(repr(shape))}")
    num_params = _field(url, meta, "num_params", where, "int")
    if num_params != sum(math.prod(shape) for shape in shapes):
        raise _invalid(url, f"{where}.num_params does not match variable_shapes")

    checkpoints = _field(url, meta, "checkpoint_steps", where, "list")
    if not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= steps
        for s in checkpoints
    ) or len(set(checkpoints)) != len(checkpoints):
        raise _invalid(url, f"{where}.checkpoint_steps are not distinct steps")
    return meta


def _is_shape(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= 32
        and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value
        )
    )


def _read_run_arrays(
    url: str, trace: Trace, prefix: str, meta: Mapping[str, Any], samples: int
) -> dict[str, np.ndarray]:
    """Load a run's per-step arrays and predictions after checking their shapes.

    ``samples`` is the number of rows predicted in ``predictions/data``.
    Checkpoint shapes are checked too, but their values are left in the file.
    """
    steps = meta["steps"]
    shapes = meta["variable_shapes"]
    expected = {
        "steps/loss": (steps,),
        "steps/accuracy": (steps,),
        "steps/digest": (steps + 1, min(meta["num_params"], SKETCH_SIZE)),
        "steps/norms": (steps + 1, len(shapes)),
    }
    arrays = {}
    for name, shape in expected.items():
        arrays[name] = _load_float(url, trace, prefix + name, shape)
    for name, rows in (
        ("predictions/data", samples),
        ("predictions/grid", GRID_SIZE * GRID_SIZE),
    ):
        if prefix + name in trace.tensor_names():
            info = trace.tensor_info(prefix + name)
            if len(info.shape) != 2 or info.shape[0] != rows:
                raise _invalid(
                    url, f"tensor {prefix + name!r} has the shape {list(info.shape)}"
                )
            arrays[name] = _load_float(url, trace, prefix + name, info.shape)
    for step in meta["checkpoint_steps"]:
        for j, shape in enumerate(shapes):
            name = f"{prefix}checkpoint/{step}/param/{j}"
            info = _tensor_info(url, trace, name)
            if not _is_float(info.dtype) or list(info.shape) != shape:
                raise _invalid(
                    url,
                    f"tensor {name!r} is {info.dtype} {list(info.shape)}, expected "
                    f"floats of shape {shape}",
                )
    return arrays


def _load_float(
    url: str, trace: Trace, name: str, shape: tuple[int, ...]
) -> np.ndarray:
    info = _tensor_info(url, trace, name)
    if not _is_float(info.dtype) or tuple(info.shape) != tuple(shape):
        raise _invalid(
            url,
            f"tensor {name!r} is {info.dtype} {list(info.shape)}, expected floats of "
            f"shape {list(shape)}",
        )
    return trace.tensor(name).astype(np.float64)


# ---------------------------------------------------------------------------
# Streaming checkpoints


class TensorSource:
    """Named tensors that can be read in slices along axis 0: a trace or arrays."""

    def __init__(
        self,
        trace: Trace | None = None,
        prefix: str = "",
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.trace = trace
        self.prefix = prefix
        self.arrays = arrays or {}

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Return the tensor's shape, or None when there is no such tensor."""
        if self.trace is not None:
            full = self.prefix + name
            if full not in self.trace.tensor_names():
                return None
            return self.trace.tensor_info(full).shape
        array = self.arrays.get(name)
        return None if array is None else array.shape

    def chunks(self, name: str, chunk_elements: int) -> Iterator[np.ndarray]:
        """Yield the tensor in slices of whole rows, as `Trace.iter_chunks` does."""
        if self.trace is not None:
            yield from self.trace.iter_chunks(self.prefix + name, chunk_elements)
            return
        array = np.asarray(self.arrays[name])
        if array.ndim == 0 or array.shape[0] == 0:
            yield array
            return
        row = math.prod(array.shape[1:])
        rows = max(1, chunk_elements // row) if row else array.shape[0]
        for start in range(0, array.shape[0], rows):
            yield array[start : start + rows]


def streamed_distance(
    pairs: Sequence[tuple[TensorSource, str, TensorSource, str]],
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[float, float]:
    """Return ``(|a - b|, |b|)`` in the L2 norm over all pairs of tensors, in float64.

    Both sides are read slice by slice, so memory stays bounded by a few slices.
    A pair whose shapes differ raises InputError.
    """
    difference_squared = 0.0
    reference_squared = 0.0
    for source_a, name_a, source_b, name_b in pairs:
        shape_a, shape_b = source_a.shape(name_a), source_b.shape(name_b)
        if shape_a != shape_b:
            raise InputError(
                f"Cannot compare tensor {name_a} of shape {shape_a} with {name_b} of "
                f"shape {shape_b}: the models differ."
            )
        for a, b in zip(
            source_a.chunks(name_a, chunk_elements),
            source_b.chunks(name_b, chunk_elements),
            strict=True,
        ):
            reference = b.astype(np.float64).ravel()
            difference = np.subtract(a.ravel(), reference, dtype=np.float64)
            # einsum rather than a BLAS dot: on small slices, BLAS threads cost
            # more to wake than the sum takes.
            difference_squared += float(np.einsum("i,i->", difference, difference))
            reference_squared += float(np.einsum("i,i->", reference, reference))
    return math.sqrt(difference_squared), math.sqrt(reference_squared)


def checkpoint_distances(
    candidate: RunResult,
    candidate_source: TensorSource,
    referee: RunResult,
    referee_source: TensorSource,
) -> dict[int, float]:
    """Return the relative parameter distance to the referee at each shared checkpoint.

    The distance is ``|c - t| / |t|`` over all parameters, computed from the full
    checkpoints rather than the per-step digests.
    """
    shapes = candidate.meta["variable_shapes"]
    if shapes != referee.meta["variable_shapes"]:
        return {}
    shared = sorted(
        set(candidate.meta["checkpoint_steps"]) & set(referee.meta["checkpoint_steps"])
    )
    distances = {}
    for step in shared:
        names = [f"checkpoint/{step}/param/{j}" for j in range(len(shapes))]
        pairs = [(candidate_source, n, referee_source, n) for n in names]
        difference, scale = streamed_distance(pairs)
        if scale > 0:
            distances[step] = difference / scale
        else:
            distances[step] = math.inf if difference > 0 else 0.0
    return distances


# ---------------------------------------------------------------------------
# Environment differences

# Order of the groups in the table of environment differences.
ENVIRONMENT_GROUPS = (
    "backend",
    "versions",
    "plugins",
    "devices",
    "flags",
    "threads",
    "cpu",
    "platform",
    "other",
)
_GROUP_OF_ITEM = {
    "backend": "backend",
    "dtype_policy": "backend",
    "floatx": "backend",
    "x64": "backend",
    "tf32_matmul": "backend",
    "tf32_cudnn": "backend",
    "devices": "devices",
    "cpu": "cpu",
    "cpu_count": "cpu",
    "machine": "cpu",
    "platform": "platform",
    "python": "platform",
}


@dataclasses.dataclass
class EnvironmentDifference:
    """One environment item, such as ``versions.jax``, that differs between runs."""

    item: str
    group: str
    values: list[str | None]


def flatten_environment(environment: Mapping[str, Any]) -> dict[str, str]:
    """Flatten a fingerprint into ``dotted.item -> text``, such as ``flags.XLA_FLAGS``."""
    items: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and all(
            not isinstance(item, (list, dict)) for item in value
        ):
            items[prefix] = ", ".join(str(item) for item in value)
        elif isinstance(value, (list, dict)):
            items[prefix] = str(value)
        elif isinstance(value, bool) or value is None:
            items[prefix] = str(value).lower() if value is not None else "null"
        else:
            items[prefix] = str(value)

    visit("", environment)
    return items


def environment_group(item: str) -> str:
    """Return the group of an environment item: versions, flags, cpu and so on."""
    head = item.split(".", 1)[0]
    if head in ("versions", "plugins", "flags", "threads"):
        return head
    return _GROUP_OF_ITEM.get(head, "other")


def environment_differences(
    environments: Sequence[Mapping[str, Any]],
) -> tuple[list[EnvironmentDifference], int]:
    """Return the items whose values differ between environments, and how many agree.

    An item that one environment lacks has the value None there, so an extra
    plugin or an unset flag shows up as a difference.
    """
    flat = [flatten_environment(environment) for environment in environments]
    items = sorted(
        {item for values in flat for item in values},
        key=lambda item: (ENVIRONMENT_GROUPS.index(environment_group(item)), item),
    )
    differences = []
    for item in items:
        values = [values.get(item) for values in flat]
        if len(set(values)) > 1:
            differences.append(
                EnvironmentDifference(item, environment_group(item), values)
            )
    return differences, len(items) - len(differences)


def _display(value: Any, limit: int = MAX_DISPLAY_CHARS) -> str:
    """Return text from a trace made safe for the terminal: printable, short, escaped."""
    from rich.markup import escape

    text = str(value)
    text = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return escape(text)


def print_environment_differences(
    labels: Sequence[str],
    differences: Sequence[EnvironmentDifference],
    same: int,
    console: Any = None,
) -> None:
    """Print the environment items that differ, one row per item."""
    from rich.table import Table

    from parity.terminal import output_console

    console = console or output_console()
    if not differences:
        console.print(f"environments: all {same} items are the same")
        return
    table = Table(title=f"environment differences ({same} other items are the same)")
    table.add_column("group")
    table.add_column("item", overflow="fold")
    for label in labels:
        table.add_column(_display(label), overflow="fold")
    for difference in differences:
        cells = ["-" if v is None else _display(v) for v in difference.values]
        table.add_row(difference.group, _display(difference.item), *cells)
    console.print(table)


def environment_html(
    labels: Sequence[str], differences: Sequence[EnvironmentDifference], same: int
) -> str:
    """Return the environment differences as an HTML section for the report."""
    import html

    title = "<h2>Environment differences</h2>"
    if not differences:
        return f"{title}<p>All {same} environment items are the same.</p>"
    header = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = [f"<tr><th>group</th><th>item</th>{header}</tr>"]
    for difference in differences:
        cells = "".join(
            "<td>–</td>" if v is None else f"<td><code>{html.escape(v)}</code></td>"
            for v in difference.values
        )
        rows.append(
            f"<tr><td>{html.escape(difference.group)}</td>"
            f"<td><code>{html.escape(difference.item)}</code></td>{cells}</tr>"
        )
    return (
        f"{title}<p>Items that differ between the runs; {same} other items are the "
        f"same. A dash marks an item that the run does not have.</p>"
        f"<table>{''.join(rows)}</table>"
    )


def _differences_json(
    labels: Sequence[str], differences: Sequence[EnvironmentDifference]
) -> list[dict[str, Any]]:
    return [
        {
            "item": difference.item,
            "group": difference.group,
            "values": dict(zip(labels, difference.values, strict=True)),
        }
        for difference in differences
    ]


# ---------------------------------------------------------------------------
# Comparing lockstep traces


@dataclasses.dataclass
class CompareOptions:
    """Options of `compare_traces`: the traces, and the paths of the JSON and report."""

    traces: Sequence[str]
    out: str | os.PathLike[str] = "parity-report"
    json_path: str | os.PathLike[str] | None = None
    referee: str | None = None
    jobs: int | None = None
    timeout: float | None = None
    report: bool = True


@dataclasses.dataclass
class CompareResult:
    """Verdicts on recorded (and replayed) runs, in the doctor's form, with extras.

    ``doctor.summary`` is the JSON document: the doctor's fields, plus per
    configuration its trace, label and checkpoint distances, and ``traces``,
    ``referee_source``, ``environment_differences`` and ``notes``.
    """

    doctor: DoctorResult
    labels: dict[str, str]
    environment_labels: list[str]
    differences: list[EnvironmentDifference]
    same_items: int
    notes: list[str]

    @property
    def summary(self) -> dict[str, Any]:
        """The JSON document."""
        return self.doctor.summary

    @property
    def bad(self) -> bool:
        """Whether any configuration is divergent or failed."""
        return any(
            entry["verdict"] in ("divergent", "failed")
            for entry in self.summary["configs"]
        )


def trace_kind(url: str) -> str:
    """Return the kind of the trace at ``url`` after checking it."""
    with open_trace(url) as trace:
        return check_kind(url, trace.meta, None)


def compare_traces(
    options: CompareOptions, progress: ProgressCallback | None = None
) -> CompareResult | FitComparison:
    """Give each recorded run its verdict, as ``parity compare`` does.

    Lockstep traces are judged against the referee of the first trace that has
    one, or a referee trained here. Traces from `parity.keras.Recorder` are
    compared with the first of them (see `compare_fit_traces`).
    """
    if not options.traces:
        raise InputError("No trace given: pass one or more .parity files.")
    prepare_output_paths(DoctorOptions(out=options.out, json_path=options.json_path))
    kinds = {url: trace_kind(os.fspath(url)) for url in options.traces}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{url} ({kind})" for url, kind in kinds.items())
        raise InputError(
            f"Cannot compare traces of different kinds: {listed}. Compare traces of "
            "parity record with each other, and traces of parity.keras.Recorder with "
            "each other."
        )
    if next(iter(kinds.values())) == FIT_KIND:
        return compare_fit_traces(options)

    with contextlib.ExitStack() as stack:
        traces = []
        for index, url in enumerate(options.traces):
            recorded = load_lockstep_trace(url, index)
            stack.callback(recorded.trace.close)
            traces.append(recorded)
        _check_compatible(traces)
        out = Path(options.out)
        referee_runs, referee_source, source_text = _referee_runs(
            traces, options.referee, options.jobs, options.timeout, out, progress
        )
        judged = _Judged(referee_source, source_text)
        for recorded in traces:
            for candidate in recorded.candidates:
                judged.add(
                    candidate,
                    f"{candidate.run.config} ({recorded.name})",
                    recorded.url,
                    _trace_source(recorded, candidate),
                    _environment_of(candidate, recorded),
                )
        judged.results += referee_runs
        judged.notes += _unused_referee_notes(traces, referee_runs)
        output = _OutputOptions(out, options.json_path, options.report)
        return _conclude(traces[0], judged, output)


def _trace_source(recorded: RecordedTrace, result: RunResult) -> TensorSource:
    return TensorSource(recorded.trace, recorded.tensor_prefix[result.run.key])


def _environment_of(result: RunResult, recorded: RecordedTrace) -> dict[str, Any]:
    """Return the worker's environment, or the recording process's for a failed run."""
    environment = result.meta.get("environment")
    if isinstance(environment, dict):
        return environment
    recording = recorded.trace.meta.get("environment")
    return recording if isinstance(recording, dict) else {}


def _unused_referee_notes(
    traces: Sequence[RecordedTrace], referee_runs: Sequence[RunResult]
) -> list[str]:
    used = {result.run.key for result in referee_runs}
    return [
        f"{recorded.url} also contains a referee run, which is not used: verdicts "
        "use one referee."
        for recorded in traces
        if recorded.referee is not None and recorded.referee.run.key not in used
    ]


def _check_compatible(traces: Sequence[RecordedTrace]) -> None:
    """Check that every trace recorded the same scenario or model, seed and start."""
    first = traces[0]
    scenario_fields: Sequence[str] = _SCENARIO_FIELDS
    if any(recorded.model is not None for recorded in traces):
        from parity.record_model import check_same_model

        # Model traces are checked by their model, data and training settings.
        check_same_model(traces)
        scenario_fields = ()
    for other in traces[1:]:
        for field in scenario_fields:
            ours, theirs = first.settings[field], other.settings[field]
            if ours != theirs:
                raise InputError(
                    f"Traces {first.url} and {other.url} record different runs: "
                    f"{field} is {ours!r} in the first and {theirs!r} in the second. "
                    "Compare traces recorded with the same --scenario, --epochs, "
                    "--batch-size, --seed and --activation."
                )
        for name in ("init", "schedule", "data"):
            ours, theirs = first.digests.get(name), other.digests.get(name)
            if ours and theirs and ours != theirs:
                raise InputError(
                    f"Traces {first.url} and {other.url} record the same settings "
                    f"but different {name} digests ({ours[:12]}... and "
                    f"{theirs[:12]}...), so they did not train from the same start. "
                    f"{_DIGEST_HINTS[name]}"
                )


# Descriptions of a referee trained here. It starts from the trace's own initial
# weights unless no recorded run's step-0 checkpoint has the init digest.
_TRAINED_HERE = "trained here from the trace's initial weights and batch schedule"
_TRAINED_FROM_SEED = "trained here from the recorded seed"

_DIGEST_HINTS = {
    "init": "The seeded initial weights differ, which points to different numpy "
    "versions or variable shapes.",
    "schedule": "The seeded batch order differs, which points to different numpy "
    "versions.",
    "data": "The scenario's data differ, which points to different scikit-learn "
    "versions.",
}


def _referee_runs(
    traces: Sequence[RecordedTrace],
    referee: str | None,
    jobs: int | None,
    timeout: float | None,
    out: Path,
    progress: ProgressCallback | None,
) -> tuple[list[RunResult], TensorSource | None, str]:
    """Return the referee and envelope runs, from a trace or trained here.

    Also returns where the referee's checkpoints can be read and a description of
    where the referee comes from.
    """
    for recorded in traces:
        if recorded.referee is not None:
            envelope = [r for r in recorded.results if r.run.role == "envelope"]
            source = _trace_source(recorded, recorded.referee)
            return [recorded.referee, *envelope], source, recorded.url

    first = traces[0]
    if first.model is not None:
        raise InputError(
            f"No trace contains a referee, and {first.url} records a user model, "
            "which parity does not load from a trace. Record one of the traces with "
            "--with-referee, or rerun one here with parity replay TRACE MODEL, which "
            "trains the referee from your model."
        )
    for recorded in traces:
        verify_checksums(recorded)
    installed = installed_backends()
    config = parse_config(referee) if referee else default_referee(installed)
    runs = plan_referee_runs(config, installed)
    for run in runs:
        if run.not_run_reason is not None:
            raise InputError(
                f"No trace contains a referee, and the {run.role} {run.config} cannot "
                f"run here: {run.not_run_reason}. Pass --referee with an installed "
                "backend, or compare with a trace recorded with --with-referee."
            )
    from parity.record_model import start_file_spec

    # A trace whose runs all failed has no initial weights or schedule to give.
    finished = next((recorded for recorded in traces if recorded.digests), first)
    start, note = start_file_spec(finished, out / "runs")
    common = {**_settings_spec(first.settings), **start}
    log.info("no trace contains a referee, so it is trained here")
    if note:
        log.warning("%s", note)
    results = _execute_here(runs, common, first, jobs, timeout, out, progress)
    check_reproduced(results, first)
    referee_result = next(r for r in results if r.run.role == "referee")
    source = TensorSource(arrays=referee_result.arrays) if referee_result.ok else None
    return results, source, _TRAINED_HERE if note is None else _TRAINED_FROM_SEED


def verify_checksums(recorded: RecordedTrace) -> None:
    """Check every tensor of a trace against its CRC-32, one slice at a time.

    Loading reads only the per-step records, so this runs before any training
    here, which would otherwise find damaged checkpoints only when it is done.
    """
    for name in recorded.trace.tensor_names():
        for _ in recorded.trace.iter_chunks(name, CHUNK_ELEMENTS):
            pass


def _settings_spec(settings: Mapping[str, Any]) -> dict[str, Any]:
    spec = {key: settings[key] for key in _SCENARIO_FIELDS[1:]}
    return {"scenario": settings["name"], **spec}


def _execute_here(
    runs: list[PlannedRun],
    common: dict[str, Any],
    recorded: RecordedTrace,
    jobs: int | None,
    timeout: float | None,
    out: Path,
    progress: ProgressCallback | None,
) -> list[RunResult]:
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    timeout = timeout or default_timeout(
        recorded.scenario, common["epochs"], common["batch_size"]
    )
    return execute(
        runs,
        out / "runs",
        common,
        jobs=jobs,
        timeout=timeout,
        memory_limit=default_memory_limit(jobs),
        progress=progress,
    )


def check_reproduced(results: Sequence[RunResult], recorded: RecordedTrace) -> None:
    """Check that runs trained here started as the recorded run did.

    Raises InputError when a finished run's initial weights, batch schedule or data
    differ from the digests in the trace, because its verdicts would then compare
    different trainings.
    """
    for result in results:
        if not result.ok:
            continue
        for name in ("init", "schedule", "data"):
            recorded_digest = recorded.digests.get(name)
            here = result.meta.get(f"{name}_digest")
            if recorded_digest and here != recorded_digest:
                raise InputError(
                    f"The {result.run.role} run {result.run.label} here does not "
                    f"reproduce the recording {recorded.url}: its {name} digest is "
                    f"{str(here)[:12]}..., the trace records {recorded_digest[:12]}.... "
                    f"{_DIGEST_HINTS[name]} Compare with a trace recorded with "
                    "--with-referee instead."
                )


@dataclasses.dataclass
class _OutputOptions:
    out: Path
    json_path: str | os.PathLike[str] | None
    report: bool


@dataclasses.dataclass
class _Judged:
    """The runs to judge, and for each candidate its label, origin and tensors."""

    referee_source: TensorSource | None
    referee_text: str
    results: list[RunResult] = dataclasses.field(default_factory=list)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    origins: dict[str, str] = dataclasses.field(default_factory=dict)
    sources: dict[str, TensorSource] = dataclasses.field(default_factory=dict)
    environments: list[tuple[str, dict[str, Any]]] = dataclasses.field(
        default_factory=list
    )
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(
        self,
        result: RunResult,
        label: str,
        origin: str,
        source: TensorSource,
        environment: dict[str, Any],
    ) -> None:
        """Add a candidate run: its label, its trace (or "here") and its tensors.

        A label already in use, as for one configuration in two traces of the
        same file name, gets a number so that the JSON keeps both.
        """
        if label in self.labels.values():
            label = f"{label} #{len(self.labels) + 1}"
        self.results.append(result)
        self.labels[result.run.key] = label
        self.origins[result.run.key] = origin
        self.sources[result.run.key] = source
        self.environments.append((label, environment))


def _conclude(
    first: RecordedTrace, judged: _Judged, output: _OutputOptions
) -> CompareResult:
    """Judge, summarize, and write the JSON and the report."""
    settings = first.settings
    results = judged.results
    judgements = judge_all(results)
    common = _settings_spec(settings)
    if first.model is not None:
        common.update(first.model.summary_fields())
    summary = summarize(first.scenario, common, results, judgements)
    candidates = [r for r in results if r.run.role == "candidate"]
    referee = next((r for r in results if r.run.role == "referee" and r.ok), None)
    for entry, result in zip(summary["configs"], candidates, strict=True):
        key = result.run.key
        entry["label"] = judged.labels[key]
        entry["trace"] = judged.origins[key]
        distances = {}
        if referee is not None and judged.referee_source is not None and result.ok:
            distances = checkpoint_distances(
                result, judged.sources[key], referee, judged.referee_source
            )
        entry["checkpoint_distance"] = {str(k): v for k, v in distances.items()}

    env_labels = [label for label, _ in judged.environments]
    differences, same = environment_differences([e for _, e in judged.environments])
    summary["referee_source"] = judged.referee_text
    summary["environment_differences"] = _differences_json(env_labels, differences)
    summary["notes"] = judged.notes
    options = DoctorOptions(
        scenario=settings["name"],
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
        activation=settings["activation"],
        out=output.out,
        json_path=output.json_path,
        report=output.report,
    )
    doctor = DoctorResult(options, first.scenario, results, judgements, summary)
    result = CompareResult(
        doctor, judged.labels, env_labels, differences, same, judged.notes
    )
    _write_outputs(result, output)
    return result


def _write_outputs(result: CompareResult, output: _OutputOptions) -> None:
    doctor = result.doctor
    json_path = (
        Path(output.json_path) if output.json_path else output.out / "results.json"
    )
    atomic_write_json(json_path, doctor.summary)
    doctor.json_path = json_path
    if output.report:
        from parity.report import write_report

        shown = dataclasses.replace(doctor, summary=_labelled(doctor.summary, False))
        sections = [
            environment_html(
                result.environment_labels, result.differences, result.same_items
            ),
            checkpoint_html(doctor.summary),
        ]
        if doctor.localizations:
            from parity.localize import localization_html

            sections += localization_html(doctor)
        doctor.report_path = write_report(shown, output.out / "report.html", sections)


def _labelled(summary: dict[str, Any], for_terminal: bool) -> dict[str, Any]:
    """Return a copy of the summary whose configurations show their labels.

    For the terminal, text from traces is also escaped, so that it cannot carry
    rich markup or control characters.
    """
    shown = dict(summary)
    if for_terminal:
        scenario = summary["scenario"]
        shown["scenario"] = {**scenario, "name": _display(scenario["name"])}
    configs = []
    for entry in summary["configs"]:
        entry = dict(entry)
        entry["config"] = entry.get("label", entry["config"])
        if for_terminal:
            entry["config"] = _display(entry["config"])
            entry["reason"] = _display(entry["reason"], 4 * MAX_DISPLAY_CHARS)
        configs.append(entry)
    shown["configs"] = configs
    return shown


def checkpoint_html(summary: Mapping[str, Any]) -> str:
    """Return the checkpoint distances to the referee as an HTML section."""
    import html

    rows = []
    for entry in summary["configs"]:
        distances = entry.get("checkpoint_distance") or {}
        if distances:
            cells = ", ".join(
                f"step {step}: {value:.3g}" for step, value in distances.items()
            )
            rows.append(
                f"<tr><td><code>{html.escape(entry['label'])}</code></td>"
                f"<td>{html.escape(cells)}</td></tr>"
            )
    if not rows:
        return ""
    return (
        "<h2>Checkpoints</h2><p>Relative distance of all parameters to the "
        "referee's, |c - t| / |t|, at each checkpoint, from the full checkpoints "
        "rather than the per-step digests.</p><table><tr><th>run</th>"
        f"<th>distance</th></tr>{''.join(rows)}</table>"
    )


def print_comparison(
    result: CompareResult | FitComparison, console: Any = None
) -> None:
    """Print verdicts, notes and environment differences to the terminal."""
    from parity.terminal import output_console, print_summary

    console = console or output_console()
    if isinstance(result, FitComparison):
        print_fit_comparison(result, console)
        return
    shown = dataclasses.replace(result.doctor, summary=_labelled(result.summary, True))
    print_summary(shown, console)
    console.print(f"referee: {_display(result.summary['referee_source'])}")
    for entry in result.summary["configs"]:
        distances = entry.get("checkpoint_distance") or {}
        if distances:
            step, value = list(distances.items())[-1]
            console.print(
                f"  {_display(entry['label'])}: parameter distance to the referee "
                f"at step {step}: {value:.3g}",
                highlight=False,
            )
    for note in result.notes:
        console.print(f"note: {_display(note, 4 * MAX_DISPLAY_CHARS)}")
    if result.doctor.localizations:
        from parity.localize import print_localization

        print_localization(result.doctor)
    print_environment_differences(
        result.environment_labels, result.differences, result.same_items, console
    )


# ---------------------------------------------------------------------------
# Replaying a lockstep trace


@dataclasses.dataclass
class ReplayOptions:
    """Options of `replay_trace`: the trace, the configurations and the output paths."""

    trace: str
    configs: Sequence[str] | str | None = None
    faults: Sequence[str] = ()
    referee: str | None = None
    out: str | os.PathLike[str] = "parity-report"
    json_path: str | os.PathLike[str] | None = None
    jobs: int | None = None
    timeout: float | None = None
    report: bool = True
    # Localize the replayed configurations that diverge (parity.localize).
    localize: bool = False
    # One-dimension setting changes tried per localized configuration, at most
    # (default: parity.localize's).
    max_variants: int | None = None
    # For a trace of a user model: the model (never taken from the trace), its
    # data (default: the data stored in the trace) and modules to import first.
    model: str | os.PathLike[str] | None = None
    data: str | os.PathLike[str] | None = None
    imports: Sequence[str] = ()


def replay_trace(
    options: ReplayOptions, progress: ProgressCallback | None = None
) -> CompareResult:
    """Rerun a recorded run here on other configurations and judge all of them.

    The replayed runs start from the trace's initial weights and batch schedule,
    and their initial weights, batch schedule and data must match the trace's
    digests. The trace's referee is used when it has one, otherwise one is trained
    here. Faults recorded with a configuration are applied again when that
    configuration is replayed, if they are catalogue faults. A trace of a user
    model is replayed with ``options.model`` (`parity.record_model.replay_model`).
    """
    from parity.record_model import replay_model, start_file_spec

    prepare_output_paths(DoctorOptions(out=options.out, json_path=options.json_path))
    recorded = load_lockstep_trace(options.trace)
    with contextlib.closing(recorded.trace):
        if recorded.model is not None:
            return replay_model(recorded, options, progress)
        for value, flag in ((options.model, "MODEL"), (options.data, "--data")):
            if value is not None:
                raise InputError(
                    f"Trace {recorded.url} records the built-in scenario "
                    f"{recorded.settings['name']!r}, so {flag} ({os.fspath(value)!r}) "
                    "does not apply. Drop it, or replay a trace recorded with "
                    "parity record MODEL --data DATA."
                )
        configs, faults, notes = _replay_plan_inputs(recorded, options)
        settings = recorded.settings
        plan = plan_doctor(
            DoctorOptions(
                scenario=settings["name"],
                configs=configs,
                epochs=settings["epochs"],
                batch_size=settings["batch_size"],
                seed=settings["seed"],
                faults=faults,
                referee=options.referee,
                activation=settings["activation"],
                jobs=options.jobs,
                timeout=options.timeout,
            )
        )
        for run in plan:
            run.key = f"here-{run.key}"
        if recorded.referee is not None:
            plan = [run for run in plan if run.role == "candidate"]
        elif any(r.not_run_reason for r in plan if r.role != "candidate"):
            raise InputError(
                f"The trace {recorded.url} contains no referee, and the referee "
                "cannot run here: pass --referee with an installed backend."
            )
        verify_checksums(recorded)
        out = Path(options.out)
        start, note = start_file_spec(recorded, out / "runs")
        notes += [note] if note else []
        here = _execute_here(
            plan,
            {**_settings_spec(settings), **start},
            recorded,
            options.jobs,
            options.timeout,
            out,
            progress,
        )
        check_reproduced(here, recorded)
        text = _TRAINED_HERE if note is None else _TRAINED_FROM_SEED
        result = _conclude_replay(recorded, here, notes, out, options, text)
        if options.localize:
            localize_replayed(result, recorded, options)
        return result


def _replay_plan_inputs(
    recorded: RecordedTrace, options: ReplayOptions
) -> tuple[list[str], list[str], list[str]]:
    """Return the configurations and faults to replay, with notes for the output."""
    if options.configs:
        configs = [str(parse_config(c)) for c in _split(options.configs)]
    else:
        configs = list(dict.fromkeys(str(c.run.config) for c in recorded.candidates))
    faults = list(dict.fromkeys(options.faults))
    notes = []
    for candidate in recorded.candidates:
        config = str(candidate.run.config)
        for fault in candidate.run.faults:
            name = fault.split("@", 1)[0]
            if name not in CATALOGUE:
                notes.append(
                    f"The fault {fault} recorded with {config} is not a catalogue "
                    "fault, so replay does not run it: code named by a trace never "
                    "runs. Pass it with --fault to run it."
                )
            elif config in configs and f"{name}@{config}" not in faults:
                faults.append(f"{name}@{config}")
                notes.append(f"The recorded fault {name} is applied again to {config}.")
    return configs, faults, notes


def _split(configs: Sequence[str] | str) -> list[str]:
    items = configs.split(",") if isinstance(configs, str) else list(configs)
    return [item.strip() for item in items if item.strip()]


def _conclude_replay(
    recorded: RecordedTrace,
    here: list[RunResult],
    notes: list[str],
    out: Path,
    options: ReplayOptions,
    referee_text: str = _TRAINED_FROM_SEED,
) -> CompareResult:
    """Judge the recorded runs and those replayed here.

    ``referee_text`` describes where a referee trained here started.
    """
    if recorded.referee is not None:
        envelope = [r for r in recorded.results if r.run.role == "envelope"]
        referee_runs = [recorded.referee, *envelope]
        referee_source = _trace_source(recorded, recorded.referee)
        referee_text = recorded.url
    else:
        referee_runs = [r for r in here if r.run.role != "candidate"]
        referee_result = next(r for r in referee_runs if r.run.role == "referee")
        referee_source = (
            TensorSource(arrays=referee_result.arrays) if referee_result.ok else None
        )
    judged = _Judged(referee_source, referee_text, notes=notes)
    for candidate in recorded.candidates:
        judged.add(
            candidate,
            f"{candidate.run.config} (recorded in {recorded.name})",
            recorded.url,
            _trace_source(recorded, candidate),
            _environment_of(candidate, recorded),
        )
    for result in here:
        if result.run.role == "candidate":
            judged.add(
                result,
                f"{result.run.config} (replayed here)",
                "here",
                TensorSource(arrays=result.arrays),
                result.meta.get("environment") or {},
            )
    judged.results += referee_runs
    output = _OutputOptions(out, options.json_path, options.report)
    return _conclude(recorded, judged, output)


def localize_replayed(
    result: CompareResult,
    recorded: RecordedTrace,
    options: ReplayOptions,
    common: dict[str, Any] | None = None,
) -> None:
    """Localize the divergent configurations replayed here, with `parity.localize`.

    Localization reruns steps in worker processes from the run directories under
    ``OUT/runs``, so a referee that comes from the trace is written there first.
    Recorded runs are not localized: their machine is not here. The JSON and the
    report are written again with the localizations. ``common`` is the worker spec
    of the runs here, for a user model, whose spec the trace does not contain.
    """
    from parity.localize import localize_doctor

    doctor = result.doctor
    out = Path(options.out)
    referee = doctor.referee
    if referee is None or not referee.ok:
        result.notes.append("Not localized: the referee did not finish.")
        return
    if referee.run.key in recorded.tensor_prefix:
        _write_run_directory(recorded, referee, out / "runs" / referee.run.key, common)
    here = [
        r
        for r in doctor.results
        if r.run.role != "candidate" or r.run.key.startswith("here-")
    ]
    local = DoctorResult(
        dataclasses.replace(doctor.options, jobs=options.jobs),
        doctor.scenario,
        here,
        {key: doctor.judgements[key] for key in doctor.judgements},
        {"configs": []},
    )
    limits = (
        {} if options.max_variants is None else {"max_variants": options.max_variants}
    )
    found = localize_doctor(local, jobs=options.jobs, timeout=options.timeout, **limits)
    doctor.localizations.update(found)
    for entry, candidate in zip(
        doctor.summary["configs"], doctor.candidates, strict=True
    ):
        if candidate.run.key in found:
            entry["localization"] = found[candidate.run.key].to_dict()
    _write_outputs(result, _OutputOptions(out, options.json_path, options.report))


def _write_run_directory(
    recorded: RecordedTrace,
    result: RunResult,
    directory: Path,
    common: dict[str, Any] | None = None,
) -> None:
    """Write a recorded run as a worker's run directory: spec, result and arrays.

    The spec is ``common`` (default: the scenario's settings) with the run's own
    fields.
    """
    from parity.io import atomic_write_tensors
    from parity.worker import ARRAYS_FILE, RESULT_FILE

    prefix = recorded.tensor_prefix[result.run.key]
    trace = recorded.trace
    arrays = {"schedule": trace.tensor("schedule")}
    for name in trace.tensor_names():
        if name.startswith(prefix):
            arrays[name[len(prefix) :]] = trace.tensor(name)
    spec = {
        **(common if common is not None else _settings_spec(recorded.settings)),
        "config": str(result.run.config),
        "role": result.run.role,
        "faults": [],
        "perturb_seed": None,
        "out_dir": str(directory.resolve()),
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "spec.json", spec)
    atomic_write_json(directory / RESULT_FILE, result.meta)
    atomic_write_tensors(directory / ARRAYS_FILE, arrays)


# ---------------------------------------------------------------------------
# Traces of a user's own model.fit (parity.keras.Recorder)

# A fit trace is divergent from the baseline when, after its first recorded epoch,
# its weights are farther from the baseline's than this fraction of the distance
# that the baseline's weights moved from their initial values in that epoch. No
# referee is involved, so this is a threshold on the distance between two runs.
# Evidence from benchmarks/fit_threshold.py (circles and blobs, 2 epochs of 32
# batches, Adam, shuffle=False, same initial weights, TensorFlow graph baseline,
# 2-core x86-64 CPU): correct TensorFlow, JAX and PyTorch configurations reach at
# most 3.4e-7, and the faults that change results at least 4.6e-5 (adam-epsilon on
# blobs). The threshold sits between them.
# NOTE: measured on small models only. Chaotic drift grows with the number of
# steps per epoch, so a long first epoch may need a larger threshold.
FIT_DIVERGENT_RATIO = 1e-5

_METRIC = re.compile(r"[A-Za-z0-9_.-]{1,100}")


@dataclasses.dataclass
class FitRecording:
    """An open trace of ``model.fit`` with its validated fields."""

    url: str
    trace: Trace
    label: str
    environment: dict[str, Any]
    shapes: list[list[int]]
    init_digest: str
    data_digest: str | None
    shuffle: bool
    replay_note: str
    steps_per_epoch: int | None
    weight_epochs: list[int]
    final_logs: dict[str, float]


@dataclasses.dataclass
class FitRow:
    """The verdict on one fit trace, compared with the baseline (the first trace)."""

    label: str
    url: str
    verdict: str
    level: str
    reason: str
    first_epoch_ratio: float | None = None
    distances: dict[int, float] | None = None
    final_logs: dict[str, float] | None = None


@dataclasses.dataclass
class FitComparison:
    """Verdicts on traces of ``model.fit``, with the environment differences."""

    rows: list[FitRow]
    labels: list[str]
    differences: list[EnvironmentDifference]
    same_items: int
    summary: dict[str, Any]
    json_path: Path | None = None
    report_path: Path | None = None

    @property
    def bad(self) -> bool:
        """Whether any trace is divergent from the baseline."""
        return any(row.verdict == "divergent" for row in self.rows)


def load_fit_trace(url: str | os.PathLike[str]) -> FitRecording:
    """Open and validate a trace written by `parity.keras.Recorder`.

    The caller closes ``result.trace``.
    """
    url = os.fspath(url)
    trace = open_trace(url)
    try:
        return _read_fit(url, trace)
    except BaseException:
        trace.close()
        raise


def _read_fit(url: str, trace: Trace) -> FitRecording:
    """Validate a fit trace's meta and tensor shapes; tensor values stay in the file."""
    meta = trace.meta
    check_kind(url, meta, FIT_KIND)
    model = _field(url, meta, "model", "meta", "dict")
    shapes = _field(url, model, "variable_shapes", "meta.model", "list")
    if not all(_is_shape(shape) for shape in shapes):
        raise _invalid(url, "meta.model.variable_shapes has an invalid shape")

    fit = _field(url, meta, "fit", "meta", "dict")
    shuffle = _field(url, fit, "shuffle", "meta.fit", "bool")
    steps = _field(url, fit, "steps_per_epoch", "meta.fit", "int?")
    init_digest = _field(url, meta, "init_digest", "meta", "str")
    data = _field(url, meta, "data", "meta", "dict") if meta.get("data") else None
    data_digest = _field(url, data, "digest", "meta.data", "str") if data else None
    epochs = _field(url, meta, "weight_epochs", "meta", "list")
    if not all(
        isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in epochs
    ):
        raise _invalid(url, "meta.weight_epochs are not positive epoch numbers")
    logs = _field(url, meta, "final_logs", "meta", "dict")
    final_logs = {
        str(key): float(value)
        for key, value in logs.items()
        if _is_finite_number(value) or isinstance(value, float)
    }

    for name in ("initial", *(f"epoch/{e}" for e in epochs)):
        for j, shape in enumerate(shapes):
            info = _tensor_info(url, trace, f"{name}/param/{j}")
            if not _is_float(info.dtype) or list(info.shape) != shape:
                raise _invalid(
                    url,
                    f"tensor '{name}/param/{j}' is {info.dtype} {list(info.shape)}, "
                    f"expected floats of shape {shape}",
                )

    label = _field(url, meta, "label", "meta", "str")
    environment = _field(url, meta, "environment", "meta", "dict")
    note = _field(url, fit, "replay_note", "meta.fit", "str")
    return FitRecording(
        url,
        trace,
        f"{label} ({posixpath_basename(url)})",
        environment,
        shapes,
        init_digest,
        data_digest,
        shuffle,
        note,
        steps,
        sorted(set(epochs)),
        final_logs,
    )


def compare_fit_traces(options: CompareOptions) -> FitComparison:
    """Compare traces of ``model.fit`` with the first of them, the baseline.

    Unshuffled runs from the same initial weights are compared at the trajectory
    level, on their weights at epoch ends. Others are compared only by their
    final metrics, and get the verdict ``inconclusive``.
    """
    with contextlib.ExitStack() as stack:
        recordings = []
        for url in options.traces:
            recording = load_fit_trace(url)
            stack.callback(recording.trace.close)
            recordings.append(recording)
        baseline = recordings[0]
        rows = [
            FitRow(
                baseline.label,
                baseline.url,
                "baseline",
                "-",
                "the run that the others are compared with",
                final_logs=baseline.final_logs,
            )
        ]
        rows += [judge_fit(baseline, other) for other in recordings[1:]]

    labels = [recording.label for recording in recordings]
    differences, same = environment_differences([r.environment for r in recordings])
    summary = {
        "parity_version": __version__,
        "kind": FIT_KIND,
        "baseline": baseline.url,
        "thresholds": {"fit_divergent_ratio": FIT_DIVERGENT_RATIO},
        "traces": [dataclasses.asdict(row) for row in rows],
        "environment_differences": _differences_json(labels, differences),
    }
    for entry in summary["traces"]:
        if entry["distances"] is not None:
            entry["distances"] = {str(k): v for k, v in entry["distances"].items()}
    result = FitComparison(rows, labels, differences, same, summary)
    out = Path(options.out)
    result.json_path = (
        Path(options.json_path) if options.json_path else out / "results.json"
    )
    atomic_write_json(result.json_path, summary)
    if options.report:
        from parity.io import atomic_write_text

        result.report_path = out / "report.html"
        atomic_write_text(result.report_path, fit_report_html(result))
    return result


def _lockstep_problems(baseline: FitRecording, other: FitRecording) -> list[str]:
    """Return why the two fits cannot be compared epoch by epoch, if they cannot."""
    problems = []
    if baseline.shuffle or other.shuffle:
        shuffled = [r.label for r in (baseline, other) if r.shuffle]
        problems.append(
            f"{' and '.join(shuffled)} shuffled the data, so the runs saw different "
            "batches"
        )
    if baseline.shapes != other.shapes:
        problems.append("the models have different variables")
    elif baseline.init_digest != other.init_digest:
        problems.append("the runs started from different initial weights")
    if (
        baseline.data_digest
        and other.data_digest
        and (baseline.data_digest != other.data_digest)
    ):
        problems.append("the runs trained on different data")
    if baseline.steps_per_epoch != other.steps_per_epoch:
        problems.append(
            f"the runs took {baseline.steps_per_epoch} and {other.steps_per_epoch} "
            "steps per epoch"
        )
    if not set(baseline.weight_epochs) & set(other.weight_epochs):
        problems.append("no epoch has recorded weights in both traces")
    return problems


def judge_fit(baseline: FitRecording, other: FitRecording) -> FitRow:
    """Compare one fit trace with the baseline at the levels that apply."""
    outcome = _outcome_text(baseline, other)
    problems = _lockstep_problems(baseline, other)
    if problems:
        return FitRow(
            other.label,
            other.url,
            "inconclusive",
            "outcome",
            f"no step-by-step comparison: {'; '.join(problems)}. {outcome}",
            final_logs=other.final_logs,
        )

    distances = {}
    baseline_source = TensorSource(baseline.trace)
    other_source = TensorSource(other.trace)
    count = len(baseline.shapes)
    for epoch in sorted(set(baseline.weight_epochs) & set(other.weight_epochs)):
        names = [f"epoch/{epoch}/param/{j}" for j in range(count)]
        difference, _ = streamed_distance(
            [(other_source, n, baseline_source, n) for n in names]
        )
        moved, _ = streamed_distance(
            [
                (baseline_source, n, baseline_source, f"initial/param/{j}")
                for j, n in enumerate(names)
            ]
        )
        if moved > 0:
            distances[epoch] = difference / moved
        else:
            distances[epoch] = math.inf if difference > 0 else 0.0
    first_epoch = min(distances)
    ratio = distances[first_epoch]
    row = FitRow(
        other.label,
        other.url,
        "roundoff",
        "trajectory",
        "",
        first_epoch_ratio=ratio,
        distances=distances,
        final_logs=other.final_logs,
    )
    if all(value == 0 for value in distances.values()):
        row.verdict = "consistent"
        row.reason = f"the weights are identical at every recorded epoch end. {outcome}"
    elif not math.isfinite(ratio) or ratio > FIT_DIVERGENT_RATIO:
        row.verdict = "divergent"
        row.reason = (
            f"after epoch {first_epoch} the weights differ from the baseline by "
            f"{ratio:.3g} of the baseline's own update (> {FIT_DIVERGENT_RATIO:g}). "
            f"{outcome}"
        )
    else:
        row.reason = (
            f"after epoch {first_epoch} the weights differ from the baseline by "
            f"{ratio:.3g} of the baseline's own update (at most "
            f"{FIT_DIVERGENT_RATIO:g}; no referee, so not calibrated in units of "
            f"round-off). {outcome}"
        )
    return row


def _outcome_text(baseline: FitRecording, other: FitRecording) -> str:
    shared = [key for key in baseline.final_logs if key in other.final_logs]
    if not shared:
        return "Outcome: no final metric in both traces."
    parts = [
        f"{key} {other.final_logs[key]:.4g} (baseline {baseline.final_logs[key]:.4g})"
        for key in shared
    ]
    return f"Outcome: {', '.join(parts)}."


def print_fit_comparison(result: FitComparison, console: Any = None) -> None:
    """Print the fit traces' verdicts and environment differences."""
    from rich.table import Table

    from parity.terminal import VERDICT_STYLES, output_console

    console = console or output_console()
    table = Table(title="parity compare: model.fit recordings")
    for column in ("run", "verdict", "level", "distance ratio", "final loss"):
        table.add_column(column, overflow="fold")
    for row in result.rows:
        style = VERDICT_STYLES.get(row.verdict, "")
        loss = (row.final_logs or {}).get("loss")
        table.add_row(
            _display(row.label),
            f"[{style}]{row.verdict}" if style else row.verdict,
            row.level,
            "-" if row.first_epoch_ratio is None else f"{row.first_epoch_ratio:.3g}",
            "-" if loss is None else f"{loss:.4g}",
        )
    console.print(table)
    for row in result.rows:
        console.print(
            f"  {_display(row.label)}: {row.verdict}, "
            f"{_display(row.reason, 4 * MAX_DISPLAY_CHARS)}",
            highlight=False,
        )
    print_environment_differences(
        result.labels, result.differences, result.same_items, console
    )
    if result.report_path:
        console.print(f"report: {result.report_path}")
    if result.json_path:
        console.print(f"results: {result.json_path}")


def fit_report_html(result: FitComparison) -> str:
    """Return the HTML report of a comparison of fit traces."""
    import html

    from parity.report import STYLE, VERDICT_COLORS

    rows = ["<tr><th>run</th><th>verdict</th><th>level</th><th>reason</th></tr>"]
    for row in result.rows:
        color = VERDICT_COLORS.get(row.verdict, "#222")
        rows.append(
            f"<tr><td><code>{html.escape(row.label)}</code></td>"
            f'<td class="verdict" style="color:{color}">{html.escape(row.verdict)}</td>'
            f"<td>{html.escape(row.level)}</td><td>{html.escape(row.reason)}</td></tr>"
        )
    body = (
        "<h1>parity report: model.fit recordings</h1>"
        f"<p>Baseline: <code>{html.escape(result.summary['baseline'])}</code>. "
        "Trajectory: weights at epoch ends, for unshuffled runs from the same "
        "initial weights. Outcome: final metrics only.</p>"
        f"<h2>Verdicts</h2><table>{''.join(rows)}</table>"
        + environment_html(result.labels, result.differences, result.same_items)
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>parity report"
        f"</title><style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def print_recording(result: RecordResult, console: Any = None) -> None:
    """Print each recorded run's status and where the trace was written."""
    from parity.terminal import output_console

    console = console or output_console()
    for run in result.results:
        status = "ok" if run.ok else f"{run.status}: {run.error}"
        loss = run.meta.get("final_loss")
        shown = f", final loss {loss:.4g}" if isinstance(loss, float) else ""
        console.print(
            f"  {_display(run.run.label)} ({run.run.role}): {_display(status)}{shown}",
            highlight=False,
        )
    console.print(f"trace: {_display(result.url)}")
