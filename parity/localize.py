"""Localization: the step, layer, phase and setting at which a configuration diverges.

For each divergent configuration of a doctor run:

1. **Where.** A referee worker replays the float64 referee from its last
   checkpoint to the first divergent step and records every phase of that step,
   layer by layer. A candidate worker starts from the same state and computes the
   same phases in the configuration's own mode. Each layer runs once from the
   referee's input and upstream gradient (the error it *introduces*), and once in
   the chain of the configuration's own values (the error it *inherits* and
   passes on). Every tensor is compared
   with `parity.tensors.compare_tensors` against the float64 referee, in units of
   the round-off of a trusted float32 reference. The first phase, in the order a
   step runs, whose introduced error is divergent (or, for a non-finite verdict,
   the first that produces NaN or inf) is the localized one.
2. **Setting.** The configuration is changed in one dimension at a time (mode,
   device, precision policy, thread count, oneDNN, backend, optimizer
   implementation) and the attribution is repeated. The first change that makes
   the divergence vanish is the setting that triggers it.
3. **What now.** A standalone reproducer for the guilty layer and phase
   (`parity.reproducer`), and a workaround from `parity.workarounds`. The
   workaround is tested on a short lockstep segment around the divergent step,
   then by rerunning the whole configuration with it, which gets a verdict of
   the same kind as the doctor's table.

Worker processes exchange tensors through safetensors files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.attribution import (
    Row,
    attribute,
    attribution_table,
    first_nonfinite_phase,
    format_excess,
    guilty_row,
)
from parity.env import installed_backends
from parity.faults import CATALOGUE
from parity.localize_jobs import TENSORS_FILE, Job, Outcome, read_outcome, run_jobs
from parity.setting import (
    Setting,
    Variant,
    WorkaroundCheck,
    check_workaround,
    rerun_workaround,
    search_setting,
    segment_bounds,
    shares_process,
    slug,
    variant_job,
    variants,
)
from parity.tensors import DIVERGENT_EXCESS as TENSOR_DIVERGENT_EXCESS
from parity.verdict import envelope_curve

if TYPE_CHECKING:
    from parity.doctor import DoctorResult
    from parity.runner import RunResult
    from parity.verdict import Judgement

log = logging.getLogger("parity")

# One-dimension changes tried per divergent configuration, at most. Each one is a
# worker process (about 10 to 20 s on a busy two-core CPU, mostly the import of
# the framework), and the search stops at the first change that helps.
DEFAULT_MAX_VARIANTS = 3


@dataclasses.dataclass
class Localization:
    """Localization of one divergent configuration: where, which setting, what to do."""

    config: str
    status: str  # localized, not-localized or failed
    summary: str
    step: int | None = None
    layer: str | None = None
    layer_index: int | None = None
    layer_class: str | None = None
    phase: str | None = None
    nonfinite: bool = False
    excess: float | None = None
    setting: Setting | None = None
    reproducer: str | None = None
    reproducer_data: str | None = None
    reproducer_error: str | None = None  # why no reproducer was written
    workaround: WorkaroundCheck | None = None
    attribution: list[Row] = dataclasses.field(default_factory=list)
    steps_examined: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form, as it appears under ``localization`` in results.json."""
        return {
            "status": self.status,
            "summary": self.summary,
            "step": self.step,
            "layer": self.layer,
            "layer_index": self.layer_index,
            "layer_class": self.layer_class,
            "phase": self.phase,
            "nonfinite": self.nonfinite,
            "excess": self.excess,
            "setting": self.setting.to_dict() if self.setting else None,
            "reproducer": self.reproducer,
            "reproducer_data": self.reproducer_data,
            "reproducer_error": self.reproducer_error,
            "workaround": self.workaround.to_dict() if self.workaround else None,
            "steps_examined": self.steps_examined,
            "attribution": [row.to_dict() for row in self.attribution],
            "seconds": round(self.seconds, 3),
        }


# Orchestration.


@dataclasses.dataclass
class LocalizeContext:
    """Shared state of the localizations of one doctor run."""

    doctor: DoctorResult
    work: Path
    referee: RunResult
    referee_outcome: Outcome
    envelope: np.ndarray | None
    parallel: int
    timeout: float
    max_variants: int
    installed: list[str]
    # The signal that stopped a full workaround rerun. Later localizations are skipped.
    stopped: str | None = None


def examined_steps(judgement: Judgement) -> list[int]:
    """Return the training steps (0-based batch indices) to attribute for a verdict.

    A trajectory verdict names the first parameter row outside the envelope: row k
    contains the parameters after k updates, so step k - 1 produced it. A non-finite
    verdict names the step itself. Step 0 is always examined as well, because a
    fault present from the start can take many steps to leave the envelope. A run
    that raised recorded no steps, so only step 0 is examined.
    """
    if judgement.verdict == "failed":
        return [0]
    if judgement.first_nonfinite_step is not None:
        step = judgement.first_nonfinite_step
    else:
        step = max(0, (judgement.first_divergent_step or 1) - 1)
    return sorted({0, step})


def localizable(result: RunResult, judgement: Judgement) -> bool:
    """Return whether a configuration gets localized: divergent, or failed by raising.

    A worker that raised an exception (exit status 1), such as PyTorch's binary
    cross-entropy rejecting NaN, can be localized from step 0. Crashes, timeouts
    and memory kills cannot: the same kernel would stop the localization worker.
    """
    if judgement.verdict == "divergent":
        return result.ok
    return judgement.verdict == "failed" and result.returncode == 1


def localize_doctor(
    doctor: DoctorResult,
    *,
    jobs: int | None = None,
    timeout: float | None = None,
    max_variants: int = DEFAULT_MAX_VARIANTS,
    diagnose: bool = False,
) -> dict[str, Localization]:
    """Localize every divergent configuration of a doctor run; return them by run key.

    Each localization is also stored in the run's entry of ``doctor.summary``
    under ``localization``, and in ``doctor.localizations``. With ``diagnose``
    the model diagnosis (`parity.diagnose`) goes to ``model_diagnosis`` in the
    summary. Work files go to ``OUT/localize``; reproducers to ``OUT/reproducers``.
    """
    started = time.perf_counter()
    out = Path(doctor.options.out)
    targets = [
        (result, doctor.judgements[result.run.key])
        for result in doctor.candidates
        if localizable(result, doctor.judgements[result.run.key])
    ]
    referee = doctor.referee
    if not targets and not diagnose:
        return {}
    if referee is None or not referee.ok:
        failed = {
            result.run.key: Localization(
                str(result.run.config),
                "failed",
                "not localized: the referee did not finish",
            )
            for result, _ in targets
        }
        _attach(doctor, failed)
        return failed

    work = out / "localize"
    steps = sorted({s for _, judgement in targets for s in examined_steps(judgement)})
    parallel = jobs or doctor.options.jobs or max(1, min(4, os.cpu_count() or 1))
    limit = timeout or 600.0
    installed = installed_backends()
    plans = [
        _plan(doctor, referee, work, result, judgement, max_variants, installed)
        for result, judgement in targets
    ]
    # Candidates that can share the referee's process run in it after the referee,
    # which saves a framework import. Their time then counts in the referee's.
    riding = [
        plan
        for plan in plans
        if plan.cases_spec is not None
        and shares_process(plan.result.run.config, referee.run.config)
    ]
    spec = {
        **_run_spec(out, referee),
        "role": "referee",
        "steps": steps,
        "arrays": str(_arrays_path(out, referee)),
        "candidates": [plan.cases_spec for plan in riding],
    }
    if diagnose:
        spec["activity"] = _activity_spec(doctor, out, work)
    for plan in riding:
        (plan.directory / "candidate").mkdir(parents=True, exist_ok=True)
        (plan.directory / "candidate" / "result.json").unlink(missing_ok=True)
    referee_outcome = run_jobs(
        [Job("referee", spec, work / "referee")], 1, limit * (1 + len(riding))
    )["referee"]
    for plan in riding:
        plan.ran = read_outcome("candidate", plan.directory / "candidate")
    if diagnose:
        _attach_diagnosis(doctor, referee_outcome)
    per_epoch = int(referee.meta.get("steps_per_epoch", 1))
    context = LocalizeContext(
        doctor,
        work,
        referee,
        referee_outcome,
        envelope_curve(doctor.envelope_runs, referee, per_epoch),
        parallel,
        limit,
        max_variants,
        installed,
    )
    localizations = {}
    for plan in plans:
        began = time.perf_counter()
        if context.stopped is not None:
            found = Localization(
                str(plan.result.run.config),
                "failed",
                f"not localized: stopped by {context.stopped}",
            )
        elif not referee_outcome.ok:
            found = Localization(
                str(plan.result.run.config),
                "failed",
                "not localized: the referee's localization worker failed: "
                f"{referee_outcome.error}",
            )
        else:
            found = _localize_one(context, plan)
        found.seconds = time.perf_counter() - began
        localizations[plan.result.run.key] = found
    _attach(doctor, localizations)
    seconds = time.perf_counter() - started
    doctor.summary["localization_seconds"] = round(seconds, 3)
    log.info("localization took %.1f s", seconds)
    return localizations


def localize_and_diagnose(
    doctor: DoctorResult, *, timeout: float | None = None
) -> dict[str, Localization]:
    """Localize divergent configurations and diagnose the model, as ``--localize`` does."""
    return localize_doctor(doctor, timeout=timeout, diagnose=True)


def localize_result(
    doctor: DoctorResult, *, timeout: float | None = None
) -> dict[str, Localization]:
    """Localize and diagnose a finished run, then rewrite its JSON and report.

    For runs started without ``localize``, such as `parity.api.run_model`.
    """
    from parity.io import atomic_write_json

    found = localize_and_diagnose(doctor, timeout=timeout)
    if doctor.json_path is not None:
        atomic_write_json(doctor.json_path, doctor.summary)
    if doctor.report_path is not None:
        from parity.report import write_report

        write_report(doctor, doctor.report_path)
    return found


def _activity_spec(doctor: DoctorResult, out: Path, work: Path) -> dict[str, Any]:
    """Write the evaluation points; return the referee worker's ``activity`` request."""
    from parity.diagnose import evaluation_points
    from parity.io import atomic_write_tensors

    points = work / "points.safetensors"
    atomic_write_tensors(points, {"points": evaluation_points(doctor)})
    finished = [
        r for r in [doctor.referee, *doctor.candidates] if r is not None and r.ok
    ]
    return {
        "points": str(points),
        "runs": [
            {
                "key": r.run.key,
                "arrays": str(_arrays_path(out, r)),
                "step": int(r.meta["steps"]),
            }
            for r in finished
        ],
    }


def _attach_diagnosis(doctor: DoctorResult, referee: Outcome) -> None:
    from parity.diagnose import diagnose_model

    activity: dict[str, dict[int, np.ndarray]] = {}
    meta: dict[str, Any] = {}
    if referee.ok:
        meta = referee.meta
        for key, value in referee.tensors.items():
            if key.startswith("activity/"):
                _, run_key, index = key.split("/")
                activity.setdefault(run_key, {})[int(index)] = value
    else:
        log.error("no unit activity for the model diagnosis: %s", referee.error)
    diagnosis = diagnose_model(
        doctor, activity, meta.get("layers", []), meta.get("activations", [])
    )
    doctor.summary["model_diagnosis"] = diagnosis.to_dict()


def _attach(doctor: DoctorResult, localizations: dict[str, Localization]) -> None:
    doctor.localizations.update(localizations)
    by_config = {found.config: found for found in localizations.values()}
    for entry in doctor.summary.get("configs", []):
        found = by_config.get(entry.get("config"))
        if found is not None:
            entry["localization"] = found.to_dict()


def _run_spec(out: Path, result: RunResult) -> dict[str, Any]:
    """Return the spec the doctor gave a run's worker (scenario or user model)."""
    path = out / "runs" / result.run.key / "spec.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    for key in ("out_dir", "resume_key", "perturb_seed"):
        spec.pop(key, None)
    return spec


def _arrays_path(out: Path, result: RunResult) -> Path:
    from parity.worker import ARRAYS_FILE

    return out / "runs" / result.run.key / ARRAYS_FILE


@dataclasses.dataclass
class _Plan:
    """Localization plan of one divergent configuration, made before any worker runs."""

    result: RunResult
    judgement: Judgement
    steps: list[int]
    directory: Path
    base: dict[str, Any]  # spec shared by the candidate and its variants
    candidate_spec: dict[str, Any]
    first: Variant | None  # the mode variant started with the candidate
    cases_spec: dict[str, Any] | None  # candidate and first variant in one worker
    ran: Outcome | None = None  # that worker's outcome, when it ran with the referee


def _plan(
    doctor: DoctorResult,
    referee: RunResult,
    work: Path,
    result: RunResult,
    judgement: Judgement,
    max_variants: int,
    installed: list[str],
) -> _Plan:
    """Write the specs of a configuration's candidate worker and its first variant.

    Most faults that a mode change avoids are compiler faults, so the first mode
    variant starts with the candidate. When it differs only in mode and the faults
    are catalogued (so that they can be undone), both run as cases of one worker.
    """
    out = Path(doctor.options.out)
    steps = examined_steps(judgement)
    directory = work / result.run.key
    base = {
        **_run_spec(out, result),
        "role": "candidate",
        "steps": steps,
        "referee_tensors": str((work / "referee" / TENSORS_FILE).resolve()),
    }
    candidate_spec = dict(base)
    if judgement.first_nonfinite_step is not None:
        candidate_spec["own_state"] = {
            "arrays": str(_arrays_path(out, result)),
            "step": judgement.first_nonfinite_step,
        }
    start, end = segment_bounds(referee, steps[-1])
    base["segment"] = {
        "arrays": str(_arrays_path(out, referee)),
        "start": start,
        "end": end,
    }

    config = result.run.config
    faults = list(result.run.faults)
    modes = [v for v in variants(config, installed, None) if v.dimension == "mode"]
    first = modes[0] if modes and max_variants >= 1 else None
    cases_spec = None
    catalogued = all(fault in CATALOGUE for fault in faults)
    if first is not None and catalogued and shares_process(first.config, config):
        cases_spec = {
            **candidate_spec,
            "segment": base["segment"],
            "out_dir": str((directory / "candidate").resolve()),
            "cases": {
                "candidate": {"faults": faults, "own_state": True},
                first.key: {
                    "faults": faults,
                    "config": str(first.config),
                    "optimizer": first.optimizer,
                    "segment": True,
                },
            },
        }
    return _Plan(
        result, judgement, steps, directory, base, candidate_spec, first, cases_spec
    )


def _localize_one(context: LocalizeContext, plan: _Plan) -> Localization:
    result, judgement, steps = plan.result, plan.judgement, plan.steps
    config = result.run.config
    nonfinite = (
        judgement.first_nonfinite_step is not None or judgement.verdict == "failed"
    )
    candidate, speculative, variant_outcomes = _first_round(context, plan)
    if not candidate.ok:
        return Localization(
            str(config),
            "failed",
            f"not localized: the candidate's worker failed: {candidate.error}",
            steps_examined=steps,
        )

    referee_tensors = context.referee_outcome.tensors
    meta = context.referee_outcome.meta
    errors = candidate.meta.get("errors", [])
    tables = {
        step: attribute(
            referee_tensors, candidate.tensors, meta, step, errors, config.precision
        )
        for step in steps
    }
    step, guilty = _first_guilty(tables, nonfinite)
    localization = _describe(str(config), step, guilty, tables, steps)
    if guilty is None and judgement.first_nonfinite_step is not None:
        localization = _own_state(localization, candidate, meta, judgement)
    if localization.status != "localized":
        return localization

    ordered = variants(config, context.installed, localization.phase)
    setting, vanished = search_setting(
        context,
        plan.base,
        plan.directory,
        ordered,
        speculative,
        variant_outcomes,
        localization,
    )
    localization.setting = setting
    localization.workaround = check_workaround(
        context,
        plan.base,
        plan.directory,
        config,
        localization,
        vanished,
        variant_outcomes,
    )
    if localization.workaround is not None and context.doctor.options.rerun_workaround:
        localization.workaround.full = rerun_workaround(
            context,
            result,
            _run_spec(Path(context.doctor.options.out), result),
            localization.workaround,
            plan.directory,
        )
    _write_reproducer(context, result, localization, meta, candidate.meta.get("layers"))
    return localization


def _first_round(
    context: LocalizeContext, plan: _Plan
) -> tuple[Outcome, list[Variant], dict[str, Outcome]]:
    """Run the candidate and the first mode variant, unless they ran with the referee.

    Without a shared worker the variant gets a worker of its own when two workers
    may run at once, and waits for the setting search otherwise.
    """
    first = plan.first
    if plan.cases_spec is not None:
        outcome = plan.ran
        if outcome is None:
            job = Job("candidate", plan.cases_spec, plan.directory / "candidate")
            outcome = run_jobs([job], 1, context.timeout)["candidate"]
        return outcome.case("candidate"), [first], {first.key: outcome.case(first.key)}  # type: ignore[union-attr]

    speculative = [first] if first is not None and context.parallel >= 2 else []
    jobs = [Job("candidate", plan.candidate_spec, plan.directory / "candidate")]
    jobs += [variant_job(plan.base, v, plan.directory) for v in speculative]
    outcomes = run_jobs(jobs, context.parallel, context.timeout)
    found = {v.key: outcomes[v.key] for v in speculative if v.key in outcomes}
    return outcomes["candidate"], speculative, found


def _first_guilty(
    tables: dict[int, list[Row]], nonfinite: bool
) -> tuple[int | None, Row | None]:
    for step in sorted(tables):
        row = guilty_row(tables[step], nonfinite)
        if row is not None:
            return step, row
    return None, None


def _describe(
    config: str,
    step: int | None,
    guilty: Row | None,
    tables: dict[int, list[Row]],
    steps: list[int],
) -> Localization:
    if guilty is None or step is None:
        last = max(tables)
        return Localization(
            config,
            "not-localized",
            f"no phase of steps {', '.join(map(str, steps))} exceeds round-off when "
            "started from the referee's state; the divergence builds up over steps",
            attribution=tables[last],
            steps_examined=steps,
        )
    where = (
        f"layer {guilty.layer} ({guilty.layer_class})" if guilty.layer else "the model"
    )
    if guilty.phase == "loss":
        where = "the loss"
    effect = (
        "produces a non-finite value" if guilty.nonfinite else "introduces the error"
    )
    excess = (
        "inf"
        if guilty.introduced is None or math.isinf(guilty.introduced)
        else f"{guilty.introduced:.3g}"
    )
    return Localization(
        config,
        "localized",
        f"step {step}: the {guilty.phase} phase of {where} {effect} "
        f"(excess {excess} over round-off, threshold {TENSOR_DIVERGENT_EXCESS:g})",
        step=step,
        layer=guilty.layer,
        layer_index=guilty.layer_index,
        layer_class=guilty.layer_class,
        phase=guilty.phase,
        nonfinite=guilty.nonfinite,
        excess=guilty.introduced,
        attribution=tables[step],
        steps_examined=steps,
    )


def _own_state(
    localization: Localization,
    candidate: Outcome,
    meta: dict[str, Any],
    judgement: Judgement,
) -> Localization:
    step = judgement.first_nonfinite_step
    found = first_nonfinite_phase(candidate.tensors, meta, step)  # type: ignore[arg-type]
    if found is None:
        return localization
    phase, layer = found
    where = f"layer {layer['name']} ({layer['class']})" if layer else "the loss"
    localization.status = "localized"
    localization.step = step
    localization.phase = phase
    localization.nonfinite = True
    localization.layer = layer["name"] if layer else None
    localization.layer_index = layer["index"] if layer else None
    localization.layer_class = layer["class"] if layer else None
    localization.summary = (
        f"step {step}: the {phase} phase of {where} produces the first non-finite value "
        "on the configuration's own state; from the referee's state every phase stays "
        "finite, so the state that triggers it built up in earlier steps"
    )
    return localization


def _write_reproducer(
    context: LocalizeContext,
    result: RunResult,
    localization: Localization,
    meta: dict[str, Any],
    candidate_layers: list[dict[str, Any]] | None,
) -> None:
    from parity.reproducer import ReproducerError, write_reproducer

    out = Path(context.doctor.options.out) / "reproducers"
    try:
        script, data = write_reproducer(
            out / slug(str(result.run.config)),
            localization,
            context.referee_outcome.tensors,
            meta,
            result.run.config,
            list(result.run.faults),
            candidate_layers,
        )
    except ReproducerError as error:
        log.warning("no reproducer for %s: %s", result.run.config, error)
        localization.reproducer_error = str(error)
        return
    localization.reproducer = str(script)
    localization.reproducer_data = str(data)


def print_localization(doctor: DoctorResult) -> None:
    """Print each localization and the model diagnosis under the verdict table."""
    for found in doctor.localizations.values():
        print(f"\nlocalization of {found.config}: {found.summary}")
        if found.setting is not None:
            print(f"  setting: {found.setting.summary}")
        check = found.workaround
        if check is not None:
            print(f"  workaround {check.workaround.name}: {check.workaround.summary}")
            print(f"    segment rerun{segment_details(check)}")
            if check.full is not None:
                verdict, details = full_rerun_verdict(check)
                print(f"    full rerun with it: {verdict}{details}")
            else:
                print("    (--rerun-workaround also reruns the whole configuration)")
        if found.reproducer:
            print(f"  reproducer: python {found.reproducer}")
        elif found.reproducer_error:
            print(f"  no reproducer: {found.reproducer_error}")
    diagnosis = doctor.summary.get("model_diagnosis")
    if diagnosis:
        print(f"\nmodel diagnosis ({diagnosis['verdict']}): {diagnosis['summary']}")


def full_rerun_verdict(check: WorkaroundCheck) -> tuple[str, str]:
    """Return the full rerun's verdict and the text that follows it in the output.

    The text gives the excess and final accuracy, the verdict's reason, what ran
    and the run directory.
    """
    full = check.full
    if full is None:
        return "not-run", ": it was not started"
    ran = check.config + (f" with {check.optimizer}" if check.optimizer else "")
    if full.epochs is not None:
        ran = f"all {full.epochs} epochs of {ran}"
    measured = ""
    if full.verdict in ("consistent", "roundoff", "divergent"):
        excess = "not finite" if full.excess is None else f"{full.excess:.3g}x"
        measured = f", excess {excess}"
        if full.final_accuracy is not None:
            measured += f", final accuracy {full.final_accuracy:.3f}"
    where = f" in {full.run_directory}" if full.run_directory else ""
    return full.verdict, f"{measured}; {full.reason} ({ran}{where})"


def segment_details(check: WorkaroundCheck) -> str:
    """Return the segment check of a workaround as text: its verdict and why."""
    return f": {check.segment.verdict}, {check.segment.reason}"


def localization_html(doctor: DoctorResult) -> list[str]:
    """Return the report's localization and model-diagnosis sections as HTML parts."""
    import html

    parts: list[str] = []
    if doctor.localizations:
        parts += [
            "<h2>Localization</h2>",
            "<p>Each phase is run from the referee's inputs (introduced) and on the "
            "configuration's own chain of values (total); inherited is the excess of "
            "the inputs that the chain fed to the phase. Excess is in units of the "
            "round-off of a float32 reference, and a phase is divergent above "
            f"{TENSOR_DIVERGENT_EXCESS:g}.</p>",
        ]
    for found in doctor.localizations.values():
        parts.append(
            f"<h3><code>{html.escape(found.config)}</code></h3>"
            f"<p>{html.escape(found.summary)}</p>"
        )
        items = []
        if found.setting is not None:
            items.append(f"Setting: {html.escape(found.setting.summary)}")
        if found.workaround is not None:
            check = found.workaround
            text = (
                f"Workaround <b>{html.escape(check.workaround.name)}</b>: "
                f"{html.escape(check.workaround.summary)} "
                f"<code>{html.escape(check.workaround.code)}</code>. "
                f"Segment rerun{html.escape(segment_details(check))}."
            )
            if check.full is not None:
                verdict, details = full_rerun_verdict(check)
                text += (
                    f"<br>Full rerun with it: <b>{html.escape(verdict)}</b>"
                    f"{html.escape(details)}."
                )
            items.append(text)
        if found.reproducer:
            items.append(
                f"Reproducer: <code>python {html.escape(found.reproducer)}</code> "
                "(exits 1 when the disagreement reproduces)"
            )
        elif found.reproducer_error:
            items.append(f"No reproducer: {html.escape(found.reproducer_error)}")
        if items:
            parts.append(
                "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"
            )
        if found.attribution:
            parts.append(attribution_table(found.attribution))
    diagnosis = doctor.summary.get("model_diagnosis")
    if diagnosis:
        parts += [
            "<h2>Is it the model?</h2>",
            f"<p><b>{html.escape(diagnosis['verdict'])}</b>: "
            f"{html.escape(diagnosis['summary'])}</p>",
            _diagnosis_table(diagnosis),
        ]
    return parts


def _diagnosis_table(diagnosis: dict[str, Any]) -> str:
    import html

    rows = [
        "<tr><th>configuration</th><th>R squared of the logits on the inputs</th>"
        "<th>hidden layers: dead / always-active units</th></tr>"
    ]
    for run in diagnosis["runs"]:
        layers = "; ".join(
            f"{layer['layer']} ({layer['activation']}): {100 * layer['dead']:.0f}% / "
            f"{100 * layer['always_active']:.0f}%"
            for layer in run["layers"]
        )
        rows.append(
            f"<tr><td><code>{html.escape(run['config'])}</code> ({run['role']})</td>"
            f"<td>{format_excess(run['r_squared'])}</td><td>{html.escape(layers or '–')}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"
