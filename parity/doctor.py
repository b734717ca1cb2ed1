"""The doctor: one scenario in lockstep on many configurations, judged against a referee.

`plan_doctor` turns options into planned worker runs (candidates, the float64
referee and the envelope runs), `run_doctor` executes them, gives verdicts and
writes the JSON and the HTML report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parity import __version__
from parity.cache import default_cache_dir
from parity.config import Configuration, default_referee, parse_config, parse_configs
from parity.discover import absent_device_reason, default_configs
from parity.env import fingerprint, installed_backends
from parity.errors import ConfigError, InputError
from parity.faults import validate_fault_name
from parity.io import atomic_write_json
from parity.lockstep import digest_bytes
from parity.runner import (
    Interrupted,
    PlannedRun,
    ProgressCallback,
    RunResult,
    default_memory_limit,
    execute,
    parse_memory_limit,
    prepare_output_directory,
)
from parity.scenarios import Scenario, get_scenario
from parity.verdict import (
    CONSISTENT_MAX_DISAGREEMENT,
    DIVERGENT_EXCESS,
    ENVELOPE_LOOKAHEAD,
    Judgement,
    envelope_curve,
    judge,
)

log = logging.getLogger("parity")

# Envelope runs: float32 runs from initial weights moved by one ulp, one per seed.
ENVELOPE_SEEDS = (1, 2)

# Upper bound on --epochs. Each worker keeps the batch schedule (8 bytes per sample
# per epoch) and per-step records (about 2 KiB per step) in memory, so 10,000
# epochs of circles take about 700 MiB per worker.
MAX_EPOCHS = 10_000

# Seconds a worker may take before it is stopped: a fixed start-up allowance for
# importing a framework, plus a per-step allowance that covers eager modes, which
# run about 30 ms per step on a two-core CPU for the built-in scenarios.
TIMEOUT_BASE_SECONDS = 180.0
TIMEOUT_SECONDS_PER_STEP = 0.25

# Hidden-layer activations that `keras.activations.get` accepts by name (Keras 3.15).
# NOTE: a name added in a later Keras is rejected until it is added here.
KERAS_ACTIVATIONS = frozenset(
    "celu elu exponential gelu glu hard_shrink hard_sigmoid hard_silu hard_swish "
    "hard_tanh leaky_relu linear log_sigmoid log_softmax mish relu relu6 selu sigmoid "
    "silu soft_shrink softmax softplus softsign sparse_plus sparse_sigmoid sparsemax "
    "squareplus swish tanh tanh_shrink threshold".split()
)


@dataclasses.dataclass
class DoctorOptions:
    """Options of a doctor run. Every field has a default that works on any machine."""

    scenario: str = "circles"
    configs: Sequence[str] | str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    faults: Sequence[str] = ()
    out: str | os.PathLike[str] = "parity-report"
    json_path: str | os.PathLike[str] | None = None
    jobs: int | None = None
    timeout: float | None = None
    referee: str | None = None
    activation: str = "relu"
    report: bool = True
    memory_limit: int | str | None = None  # bytes, or a size such as "4GiB"
    resume: bool = False
    # Reuse the referee and envelope runs of an earlier run on this machine
    # (parity.cache); user models are never cached.
    cache: bool = True
    # Localize divergent configurations and diagnose the model (parity.localize).
    localize: bool = False
    # With localize, also rerun each divergent configuration in full with its
    # workaround and judge it like the doctor's runs (one more worker each).
    rerun_workaround: bool = False
    seeds: int = 1  # more than 1 adds outcome-level comparisons over seeds


@dataclasses.dataclass
class DoctorResult:
    """Everything a doctor run produced: runs, verdicts, and where files were written."""

    options: DoctorOptions
    scenario: Scenario
    results: list[RunResult]
    judgements: dict[str, Judgement]
    summary: dict[str, Any]
    report_path: Path | None = None
    json_path: Path | None = None
    interrupted: str | None = None  # the signal that stopped the run, such as SIGINT
    # parity.localize.Localization per localized run key, when options.localize is set.
    localizations: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def candidates(self) -> list[RunResult]:
        """The results of the configurations under test, in plan order."""
        return [result for result in self.results if result.run.role == "candidate"]

    @property
    def referee(self) -> RunResult | None:
        """The float64 referee's result, if it was planned."""
        return next((r for r in self.results if r.run.role == "referee"), None)

    @property
    def envelope_runs(self) -> list[RunResult]:
        """The envelope runs' results."""
        return [result for result in self.results if result.run.role == "envelope"]


def parse_fault_options(
    faults: Sequence[str],
) -> list[tuple[str, Configuration | None]]:
    """Split ``NAME`` and ``NAME@CONFIG`` fault options into (name, target)."""
    parsed = []
    for text in faults:
        name, at, target = text.rpartition("@") if "@" in text else (text, "", "")
        name = name.strip()
        if not name:
            raise InputError(
                f"Invalid fault {text!r}: write NAME or NAME@CONFIG, as in fused-dense-relu@tensorflow:cpu:graph:float32."
            )
        validate_fault_name(name)
        parsed.append((name, parse_config(target) if at else None))
    return parsed


def _validate_numbers(options: DoctorOptions) -> None:
    for flag, value in (
        ("--epochs", options.epochs),
        ("--batch-size", options.batch_size),
        ("--jobs", options.jobs),
        ("--seeds", options.seeds),
    ):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            name = flag.lstrip("-").replace("-", "_")
            raise InputError(
                f"Invalid {flag} {value!r} (Python: {name}=): use a positive integer."
            )
    if options.epochs is not None and options.epochs > MAX_EPOCHS:
        raise InputError(
            f"Invalid --epochs {options.epochs} (Python: epochs=): at most "
            f"{MAX_EPOCHS} epochs can be recorded step by step. Use fewer epochs."
        )
    if options.timeout is not None and not options.timeout > 0:
        raise InputError(
            f"Invalid --timeout {options.timeout!r} (Python: timeout=): use a positive number of seconds."
        )
    seed = options.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(
            f"Invalid --seed {seed!r} (Python: seed=): use an integer of 0 or more."
        )
    if options.activation not in KERAS_ACTIVATIONS:
        raise InputError(
            f"Unknown activation {options.activation!r} (--activation, Python: "
            f"activation=). Use a Keras activation name: {', '.join(sorted(KERAS_ACTIVATIONS))}."
        )
    parse_memory_limit(options.memory_limit)


def plan_doctor(options: DoctorOptions) -> list[PlannedRun]:
    """Turn options into the list of worker runs: candidates, referee, envelope runs."""
    get_scenario(options.scenario)
    return plan_runs(options)


def plan_runs(options: DoctorOptions) -> list[PlannedRun]:
    """Plan candidates, referee and envelope runs for any experiment, scenario or not."""
    _validate_numbers(options)
    installed = installed_backends()
    not_run: list[tuple[str, str]] = []
    if options.configs is not None:
        candidates = parse_configs(options.configs)
    else:
        candidates, not_run = default_configs()
    if len(set(candidates)) != len(candidates):
        raise ConfigError(
            f"A configuration is listed twice in --configs {options.configs!r}; list each once."
        )

    referee = (
        parse_config(options.referee) if options.referee else default_referee(installed)
    )
    if referee is not None and referee.precision != "float64":
        raise ConfigError(
            f"Invalid referee {str(referee)!r} (--referee, Python: referee=): the referee "
            "computes in float64; write a float64 configuration such as "
            "tensorflow:cpu:graph:float64."
        )
    faults = parse_fault_options(options.faults)
    for name, target in faults:
        if target is not None and target not in candidates:
            raise ConfigError(
                f"Fault target {target} of --fault {name}@{target} is not among the configurations "
                f"run: {', '.join(map(str, candidates))}. Name one of them."
            )

    runs: list[PlannedRun] = []
    for index, config in enumerate(candidates):
        applied = tuple(
            name for name, target in faults if target is None or target == config
        )
        reason = (
            absent_device_reason(config)
            if config.backend in installed
            else f"{config.backend} is not installed"
        )
        runs.append(
            PlannedRun(
                f"{index:02d}-{_slug(config)}",
                config,
                "candidate",
                applied,
                None,
                reason,
            )
        )
    for label, reason in not_run:
        backend = label.split(":", 1)[0]
        config = Configuration(backend, "cpu") if label.endswith(":cpu") else None
        runs.append(_not_run_row(label, reason, config))

    return runs + plan_referee_runs(referee, installed)


def plan_referee_runs(
    referee: Configuration | None, installed: list[str]
) -> list[PlannedRun]:
    """Plan the float64 referee and the envelope runs that calibrate its verdicts."""
    if referee is None:
        raise InputError(
            "No backend is installed, so nothing can run: pip install tensorflow, jax or torch."
        )
    referee_reason = (
        None if referee.backend in installed else f"{referee.backend} is not installed"
    )
    runs = [
        PlannedRun(
            f"referee-{_slug(referee)}", referee, "referee", (), None, referee_reason
        )
    ]
    envelope_config = referee.replace(precision="float32")
    others = [b for b in installed if b != referee.backend]
    for seed in ENVELOPE_SEEDS:
        config = envelope_config
        if seed == ENVELOPE_SEEDS[-1] and others:
            config = default_referee([others[0]]).replace(precision="float32")  # type: ignore[union-attr]
        runs.append(
            PlannedRun(
                f"envelope-{seed}-{_slug(config)}",
                config,
                "envelope",
                (),
                seed,
                referee_reason,
            )
        )
    return runs


def _not_run_row(label: str, reason: str, config: Configuration | None) -> PlannedRun:
    backend, _, device = label.partition(":")
    if config is None:
        device_index = None if device in ("mps", "metal") else 0
        config = Configuration(backend, device, device_index)
    return PlannedRun(
        f"na-{label.replace(':', '-')}", config, "candidate", (), None, reason
    )


def _slug(config: Configuration) -> str:
    return str(config).replace(":", "-").replace("=", "")


def default_timeout(scenario: Scenario, epochs: int, batch_size: int) -> float:
    """Return the default per-worker timeout in seconds for a scenario's size."""
    from parity.lockstep import steps_per_epoch

    steps = epochs * steps_per_epoch(len(scenario.data()[0]), batch_size)
    return TIMEOUT_BASE_SECONDS + TIMEOUT_SECONDS_PER_STEP * steps


def run_doctor(
    options: DoctorOptions, progress: ProgressCallback | None = None
) -> DoctorResult:
    """Plan, run, judge and report; return the result with the paths it wrote.

    On SIGINT, SIGTERM or SIGHUP the workers are stopped, the JSON and the report
    are written with the unfinished runs marked not-run, and `Interrupted` is
    raised with ``outcome`` set to the `DoctorResult`.
    """
    runs = plan_doctor(options)
    scenario = get_scenario(options.scenario)
    epochs = options.epochs or scenario.epochs
    batch_size = options.batch_size or scenario.batch_size
    prepare_output_paths(options)
    common = {
        "scenario": scenario.name,
        "data_digest": digest_bytes(scenario.data()),
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": options.seed,
        "learning_rate": scenario.learning_rate,
        "activation": options.activation,
    }
    timeout = options.timeout or default_timeout(scenario, epochs, batch_size)
    return run_planned(options, scenario, runs, common, timeout, progress)


def prepare_output_paths(options: DoctorOptions) -> Path:
    """Check that the report directory and the JSON file can be written; return the JSON path."""
    out = Path(options.out)
    json_path = Path(options.json_path) if options.json_path else out / "results.json"
    prepare_output_directory(out, "--out", "out")
    if json_path.is_dir():
        raise InputError(
            f"--json {str(json_path)!r} is a directory (Python: json_path=): name a file."
        )
    prepare_output_directory(json_path.parent, "--json", "json_path", json_path)
    return json_path


def run_planned(
    options: DoctorOptions,
    scenario: Scenario,
    runs: list[PlannedRun],
    common: dict[str, Any],
    timeout: float,
    progress: ProgressCallback | None = None,
) -> DoctorResult:
    """Execute planned runs, give verdicts, and write the JSON and the report.

    ``common`` goes into every worker's spec and into the JSON's scenario section.
    """
    out = Path(options.out)
    json_path = prepare_output_paths(options)
    jobs = options.jobs or max(1, min(4, os.cpu_count() or 1))
    memory_limit = (
        default_memory_limit(jobs)
        if options.memory_limit is None
        else parse_memory_limit(options.memory_limit)
    )
    # A user model's key names its file but not the modules that file imports.
    cache_dir = default_cache_dir() if options.cache and "model" not in common else None
    interruption = None
    try:
        results = execute(
            runs,
            out / "runs",
            common,
            jobs=jobs,
            timeout=timeout,
            memory_limit=memory_limit,
            resume=options.resume,
            progress=progress,
            cache_dir=cache_dir,
        )
    except Interrupted as error:
        interruption, results = error, error.results

    judgements = judge_all(results)
    if interruption is not None:
        _mark_unjudged(results, judgements, interruption.signal_name)
    summary = summarize(scenario, common, results, judgements)
    summary["interrupted"] = interruption.signal_name if interruption else None
    doctor = DoctorResult(options, scenario, results, judgements, summary)
    doctor.interrupted = summary["interrupted"]
    if options.seeds > 1 and interruption is None:
        from parity.outcome import run_seeds

        outcomes = run_seeds(
            doctor,
            options.seeds,
            common,
            jobs=jobs,
            timeout=timeout,
            memory_limit=memory_limit,
            progress=progress,
        )
        for entry, result in zip(summary["configs"], doctor.candidates, strict=True):
            if result.run.key in outcomes:
                entry["outcome"] = outcomes[result.run.key].to_dict()
    if options.localize and interruption is None:
        from parity.localize import localize_and_diagnose

        localize_and_diagnose(doctor, timeout=timeout)
    atomic_write_json(json_path, summary)
    doctor.json_path = json_path
    if options.report:
        from parity.report import write_report

        doctor.report_path = write_report(doctor, out / "report.html")
    if interruption is not None:
        interruption.outcome = doctor
        raise interruption
    return doctor


def _mark_unjudged(
    results: list[RunResult], judgements: dict[str, Judgement], signal_name: str
) -> None:
    """Mark finished candidates that lack a verdict because the run was interrupted."""
    if not any(
        r.run.role in ("referee", "envelope") and r.status == "not-run" for r in results
    ):
        return
    for result in results:
        judgement = judgements.get(result.run.key)
        if result.ok and judgement is not None and judgement.verdict == "failed":
            judgements[result.run.key] = Judgement(
                "not-run",
                f"finished, but no verdict: stopped by {signal_name} before the "
                "referee and the envelope runs finished; run again with --resume",
            )


def judge_all(results: list[RunResult]) -> dict[str, Judgement]:
    """Give every candidate its verdict; the key is the run's key."""
    referee = next((r for r in results if r.run.role == "referee"), None)
    envelope_runs = [r for r in results if r.run.role == "envelope"]
    envelope = None
    if referee is not None and referee.ok:
        per_epoch = int(referee.meta.get("steps_per_epoch", 1))
        envelope = envelope_curve(envelope_runs, referee, per_epoch)
    return {
        result.run.key: judge(result, referee, envelope)
        for result in results
        if result.run.role == "candidate"
    }


def _run_fields(result: RunResult) -> dict[str, Any]:
    config = result.run.config
    meta = result.meta
    return {
        "config": result.run.label if result.run.role == "envelope" else str(config),
        "backend": config.backend,
        "device": config.device_string,
        "mode": config.mode,
        "precision": config.precision,
        "flags": dict(config.flags),
        "role": result.run.role,
        "faults": list(result.run.faults),
        "status": result.status,
        "final_loss": meta.get("final_loss"),
        "final_accuracy": meta.get("final_accuracy"),
        "steps": meta.get("steps"),
        "init_digest": meta.get("init_digest"),
        "schedule_digest": meta.get("schedule_digest"),
        "error": result.error,
        "returncode": result.returncode,
        "stderr_tail": result.stderr_tail or None,
        "first_nonfinite_layer": meta.get("first_nonfinite_layer"),
        "first_nonfinite_phase": meta.get("first_nonfinite_phase"),
        "wall_seconds": round(result.wall_seconds, 3),
        "reused": result.reused,
        "cached": result.cached,
        "peak_resident_mib": (
            None
            if result.peak_resident_bytes is None
            else round(result.peak_resident_bytes / 2**20, 1)
        ),
        "timing": meta.get("timing"),
        "environment": meta.get("environment"),
    }


def summarize(
    scenario: Scenario,
    common: dict[str, Any],
    results: list[RunResult],
    judgements: dict[str, Judgement],
) -> dict[str, Any]:
    """Build the JSON document of a doctor run."""
    configs = []
    for result in results:
        if result.run.role != "candidate":
            continue
        fields = _run_fields(result)
        fields.update(judgements[result.run.key].to_dict())
        configs.append(fields)
    referee = next((r for r in results if r.run.role == "referee"), None)
    return {
        "parity_version": __version__,
        "scenario": {
            "name": scenario.name,
            "description": scenario.description,
            **common,
        },
        "referee": _run_fields(referee) if referee else None,
        "envelope": [_run_fields(r) for r in results if r.run.role == "envelope"],
        "thresholds": {
            "divergent_excess": DIVERGENT_EXCESS,
            "consistent_max_disagreement": CONSISTENT_MAX_DISAGREEMENT,
            "envelope_lookahead": ENVELOPE_LOOKAHEAD,
        },
        "environment": fingerprint(),
        "configs": configs,
    }
