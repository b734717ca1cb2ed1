"""The setting search: which single change of a configuration makes a divergence vanish.

A divergent configuration is changed in one dimension at a time (execution mode,
device, precision policy, thread count, oneDNN, backend, optimizer
implementation). Each variant runs the same attribution as the configuration in
a worker of its own, with the same emulated faults, and a short lockstep
segment. The first variant, in order, whose attribution has no divergent phase
names the setting that triggers the fault. `parity.workarounds` picks a
workaround for that setting. Its segment's verdict is the quick evidence, and a
rerun of the whole configuration with the workaround, judged as the doctor judges
its own runs, is the final one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.attribution import attribute, guilty_row
from parity.config import MODES, Configuration, parse_config
from parity.localize_jobs import Job, Outcome, run_jobs
from parity.lockstep import relative_distance
from parity.runner import (
    Interrupted,
    PlannedRun,
    default_memory_limit,
    execute,
    parse_memory_limit,
)
from parity.verdict import (
    DIVERGENT_EXCESS,
    ENVELOPE_FLOOR_UNITS,
    FLOAT32_UNIT_ROUNDOFF,
    UNIT_ROUNDOFF,
    judge,
)
from parity.workarounds import (
    REFERENCE_ADAM,
    Workaround,
    choose_workaround,
    workaround_change,
)

if TYPE_CHECKING:
    from parity.localize import Localization, LocalizeContext
    from parity.runner import RunResult

log = logging.getLogger("parity")

# Modes whose compilation takes minutes on the CPU, left out of the setting search.
SLOW_MODES = frozenset({("torch", "compile")})

# Words for each setting, used in the sentence that names the trigger.
MODE_WORDS = {
    "graph": "compiled graph mode",
    "xla": "XLA-compiled mode",
    "jit": "jit-compiled mode",
    "compile": "torch.compile mode",
    "eager": "eager mode",
}


@dataclasses.dataclass
class Variant:
    """A configuration that differs from the divergent one in one setting."""

    dimension: str
    changed_from: str
    changed_to: str
    config: Configuration
    optimizer: str | None = None

    @property
    def key(self) -> str:
        """A directory name for the variant's worker."""
        return f"variant-{self.dimension}-{slug(self.changed_to)}"


@dataclasses.dataclass
class Setting:
    """The smallest change found that makes the divergence vanish, and what was tried."""

    dimension: str | None
    changed_from: str | None
    changed_to: str | None
    config: str | None
    optimizer: str | None
    summary: str
    tried: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Return the setting as JSON fields."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SegmentCheck:
    """The verdict of a short lockstep segment rerun with a workaround."""

    verdict: str  # roundoff, divergent or failed
    excess: float | None
    steps: tuple[int, int] | None  # first and last step of the segment
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return the segment's check as JSON fields."""
        return {
            "verdict": self.verdict,
            "excess": self.excess,
            "steps": list(self.steps) if self.steps else None,
            "reason": self.reason,
        }


@dataclasses.dataclass
class FullRerun:
    """The doctor's verdict on the whole configuration rerun with a workaround.

    The fields are those of the doctor's table (`parity.verdict.Judgement`).
    """

    verdict: str  # one of parity.verdict.VERDICTS
    reason: str
    excess: float | None = None
    first_divergent_step: int | None = None
    boundary_disagreement: float | None = None
    final_accuracy: float | None = None
    epochs: int | None = None
    run_directory: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the rerun's verdict and measured values as JSON fields."""
        fields = dataclasses.asdict(self)
        fields["seconds"] = round(self.seconds, 3)
        return fields


@dataclasses.dataclass
class WorkaroundCheck:
    """A workaround, the segment rerun with it, and the whole run rerun with it."""

    workaround: Workaround
    config: str
    optimizer: str | None
    segment: SegmentCheck
    full: FullRerun | None = None  # None until `rerun_workaround` has run

    def to_dict(self) -> dict[str, Any]:
        """Return the workaround and its checks as JSON fields.

        The top-level verdict and measured values are the segment's. The full
        rerun's are under ``full_rerun``, null unless it was requested.
        """
        return {
            **self.workaround.to_dict(),
            "config": self.config,
            "optimizer": self.optimizer,
            **self.segment.to_dict(),
            "full_rerun": None if self.full is None else self.full.to_dict(),
        }


def shares_process(case: Configuration, process: Configuration) -> bool:
    """Return whether ``case`` can run in ``process``'s worker: only mode or precision differ.

    Backend, device and flags are read when a process starts, so changing them
    needs a process of its own.
    """
    return (
        case.backend == process.backend
        and case.device == process.device
        and case.device_index == process.device_index
        and case.flags == process.flags
    )


def variants(
    config: Configuration, installed: Sequence[str], phase: str | None
) -> list[Variant]:
    """List one-dimension changes of ``config``, most likely trigger first.

    An optimizer update fault tries the reference Adam first. Every other fault
    tries the execution mode first, then the device, precision policy, thread
    count, oneDNN and the backend.
    """
    found: list[Variant] = []
    modes = [m for m in MODES[config.backend] if m != config.mode]
    modes.sort(key=lambda m: m != "eager")
    for mode in modes:
        if (config.backend, mode) not in SLOW_MODES:
            found.append(Variant("mode", config.mode, mode, config.replace(mode=mode)))
    if config.device != "cpu":
        cpu = config.replace(device="cpu", device_index=None)
        found.append(Variant("device", config.device_string, "cpu", cpu))
    if config.precision != "float32":
        found.append(
            Variant(
                "precision",
                config.precision,
                "float32",
                config.replace(precision="float32"),
            )
        )
    if config.threads != 1:
        before = "default" if config.threads is None else str(config.threads)
        found.append(Variant("threads", before, "1", config.with_flag("threads", "1")))
    if config.backend == "tensorflow":
        if config.onednn is None:
            before, after = "default", "off"
        elif config.onednn:
            before, after = "on", "off"
        else:
            before, after = "off", "on"
        found.append(
            Variant("onednn", before, after, config.with_flag("onednn", after))
        )
    for backend in installed:
        if backend == config.backend:
            continue
        mode = "eager" if config.mode == "eager" else MODES[backend][0]
        flags = tuple((k, v) for k, v in config.flags if k != "onednn")
        device = config.device if config.device == "cpu" else "cpu"
        try:
            other = Configuration(backend, device, None, mode, config.precision, flags)
        except ValueError:
            continue
        found.append(Variant("backend", config.backend, backend, other))
    adam = Variant("optimizer", "keras", REFERENCE_ADAM, config, REFERENCE_ADAM)
    if phase == "update":
        found.insert(0, adam)
    elif phase in (None, "step"):
        found.append(adam)
    return found


def describe_setting(variant: Variant, config: Configuration) -> tuple[str, str]:
    """Return the phrases for the divergent setting and the one that is right."""
    if variant.dimension == "mode":
        return MODE_WORDS[variant.changed_from], MODE_WORDS[variant.changed_to]
    if variant.dimension == "device":
        return f"device {variant.changed_from}", "the CPU"
    if variant.dimension == "precision":
        return (
            f"precision policy {variant.changed_from}",
            f"precision policy {variant.changed_to}",
        )
    if variant.dimension == "threads":
        before = (
            "the default intra-op thread count"
            if variant.changed_from == "default"
            else f"{variant.changed_from} intra-op threads"
        )
        return before, f"{variant.changed_to} intra-op thread"
    if variant.dimension == "onednn":
        return f"oneDNN {variant.changed_from}", f"oneDNN {variant.changed_to}"
    if variant.dimension == "backend":
        return (
            f"the {variant.changed_from} backend",
            f"the {variant.changed_to} backend",
        )
    return "Keras' Adam", "the reference Adam written in plain Keras ops"


# Segments: short lockstep reruns that test a workaround.


def segment_bounds(referee: RunResult, step: int) -> tuple[int, int]:
    """Return (start, end): from the referee's last checkpoint at or before ``step``
    to the end of the epoch after the one that contains it."""
    per_epoch = int(referee.meta.get("steps_per_epoch", 1))
    total = int(referee.meta.get("steps", per_epoch))
    checkpoints = sorted(
        {int(k.split("/")[1]) for k in referee.arrays if k.startswith("checkpoint/")}
    )
    start = max([c for c in checkpoints if c <= step] or [0])
    end = min(total, (step // per_epoch + 2) * per_epoch)
    return start, max(end, min(total, start + 1))


def segment_verdict(
    digest: np.ndarray,
    referee: RunResult,
    envelope: np.ndarray | None,
    start: int,
    precision: str,
) -> tuple[str, float | None, str]:
    """Judge a segment's parameter digests against the referee and the envelope.

    This is the trajectory verdict of `parity.verdict.judge` restricted to the
    segment's steps, without the boundary comparison, which needs a whole run.
    """
    end = start + len(digest) - 1
    theirs = referee.arrays["steps/digest"][start : end + 1]
    if envelope is None or theirs.shape != digest.shape:
        return "failed", None, "no envelope or referee digests for the segment"
    if not np.all(np.isfinite(digest)):
        bad = int(np.argmax(~np.all(np.isfinite(digest), axis=1))) + start
        return "divergent", math.inf, f"non-finite parameters at step {bad}"
    distance = relative_distance(digest, theirs)
    scale = UNIT_ROUNDOFF.get(precision, FLOAT32_UNIT_ROUNDOFF) / FLOAT32_UNIT_ROUNDOFF
    allowed = np.maximum(
        envelope[start : end + 1], ENVELOPE_FLOOR_UNITS * FLOAT32_UNIT_ROUNDOFF
    )
    excess = distance / (allowed * scale)
    largest = float(np.max(excess))
    above = np.flatnonzero(excess > DIVERGENT_EXCESS)
    if above.size:
        step = int(above[0]) + start
        return (
            "divergent",
            largest,
            f"passes {DIVERGENT_EXCESS:g}x the round-off envelope at step {step} "
            f"(max excess {largest:.3g}x)",
        )
    return (
        "roundoff",
        largest,
        f"below {DIVERGENT_EXCESS:g}x the round-off envelope over steps {start} to "
        f"{end} (max excess {largest:.3g}x)",
    )


def variant_job(base: dict[str, Any], variant: Variant, directory: Path) -> Job:
    spec = {**base, "config": str(variant.config)}
    if variant.optimizer:
        spec["optimizer"] = variant.optimizer
    return Job(variant.key, spec, directory / variant.key)


def _vanished(
    outcome: Outcome | None, referee: Outcome, step: int, nonfinite: bool
) -> bool:
    """Return whether a variant's attribution at ``step`` has no guilty phase."""
    if outcome is None or not outcome.ok:
        return False
    rows = attribute(
        referee.tensors,
        outcome.tensors,
        referee.meta,
        step,
        outcome.meta.get("errors", []),
        _precision(outcome),
    )
    return guilty_row(rows, nonfinite) is None


def _precision(outcome: Outcome) -> str:
    """Return the precision policy of the configuration a worker ran."""
    return parse_config(outcome.meta["config"]).precision


def search_setting(
    context: LocalizeContext,
    base: dict[str, Any],
    directory: Path,
    ordered: list[Variant],
    speculative: list[Variant],
    outcomes: dict[str, Outcome],
    localization: Localization,
) -> tuple[Setting, Variant | None]:
    """Try one-dimension changes in order until one makes the divergence vanish.

    ``outcomes`` contains the workers of ``speculative`` variants, started
    before the phase was known, and receives the new workers. At most
    ``context.max_variants`` variants are judged, ``context.parallel`` at a time.
    """
    tried: list[dict[str, Any]] = []
    queue = list(ordered)
    started = {v.key for v in speculative}
    found: Variant | None = None
    while True:
        finished = [v for v in queue if v.key in outcomes]
        for variant in finished:
            queue.remove(variant)
            entry = _judge_variant(
                context, variant, outcomes[variant.key], localization
            )
            tried.append(entry)
            if entry["vanished"] and found is None:
                found = variant

        budget = context.max_variants - len(tried)
        pending = [v for v in queue if v.key not in started]
        if found is not None or budget <= 0 or not pending:
            break
        wave = pending[: min(context.parallel, budget)]
        started.update(v.key for v in wave)
        jobs = [variant_job(base, v, directory) for v in wave]
        outcomes.update(run_jobs(jobs, context.parallel, context.timeout))
    return _setting(found, tried, localization), found


def _judge_variant(
    context: LocalizeContext,
    variant: Variant,
    outcome: Outcome,
    localization: Localization,
) -> dict[str, Any]:
    """Return the JSON entry of a variant that ran: whether the divergence vanished."""
    vanished = _vanished(
        outcome, context.referee_outcome, localization.step or 0, localization.nonfinite
    )
    return {
        "config": str(variant.config),
        "dimension": variant.dimension,
        "changed_from": variant.changed_from,
        "changed_to": variant.changed_to,
        "optimizer": variant.optimizer,
        "status": outcome.status,
        "vanished": vanished,
        "excess": _guilty_excess(outcome, context, localization),
        "error": outcome.error,
    }


def _setting(
    found: Variant | None, tried: list[dict[str, Any]], localization: Localization
) -> Setting:
    if found is None:
        names = ", ".join(f"{t['dimension']} -> {t['changed_to']}" for t in tried)
        summary = (
            "no single change tried makes the divergence vanish "
            f"(tried: {names or 'none'})"
        )
        return Setting(None, None, None, None, None, summary, tried)

    wrong, right = describe_setting(found, parse_config(localization.config))
    changed = str(found.config)
    if found.optimizer:
        changed += f" with {found.optimizer}"
    summary = (
        f"{wrong} is wrong and {right} is right, with everything else the same "
        f"({localization.config} against {changed})"
    )
    return Setting(
        found.dimension,
        found.changed_from,
        found.changed_to,
        str(found.config),
        found.optimizer,
        summary,
        tried,
    )


def _guilty_excess(
    outcome: Outcome, context: LocalizeContext, localization: Localization
) -> float | None:
    """Return the variant's introduced excess in the localized layer and phase."""
    if not outcome.ok:
        return None
    rows = attribute(
        context.referee_outcome.tensors,
        outcome.tensors,
        context.referee_outcome.meta,
        localization.step or 0,
        outcome.meta.get("errors", []),
        _precision(outcome),
    )
    for row in rows:
        if (
            row.phase == localization.phase
            and row.layer_index == localization.layer_index
        ):
            return row.introduced
    return None


def check_workaround(
    context: LocalizeContext,
    base: dict[str, Any],
    directory: Path,
    config: Configuration,
    localization: Localization,
    vanished: Variant | None,
    outcomes: dict[str, Outcome],
) -> WorkaroundCheck | None:
    """Pick a workaround and judge the segment that the configuration ran with it.

    A variant that already ran with the same change supplies the segment;
    otherwise a worker runs the segment alone.
    """
    setting = localization.setting
    workaround = choose_workaround(
        localization.phase,
        localization.nonfinite,
        setting.dimension if setting else None,
        setting.changed_to if setting else None,
    )
    if workaround is None:
        return None
    applied, optimizer = workaround_change(
        workaround, config, vanished.config if vanished else None
    )

    outcome = _rerun_with(outcomes, applied, optimizer)
    if outcome is None:
        variant = Variant(workaround.dimension, "", workaround.name, applied, optimizer)
        segment_only = {**base, "steps": [], "referee_tensors": None}
        job = variant_job(segment_only, variant, directory)
        job.key = f"workaround-{workaround.name}"
        job.directory = directory / job.key
        outcome = run_jobs([job], 1, context.timeout)[job.key]

    bounds = (base["segment"]["start"], base["segment"]["end"])
    if not outcome.ok or "segment/digest" not in outcome.tensors:
        reason = f"the rerun with the workaround failed: {outcome.error}"
        segment = SegmentCheck("failed", None, bounds, reason)
    else:
        verdict, excess, reason = segment_verdict(
            outcome.tensors["segment/digest"],
            context.referee,
            context.envelope,
            bounds[0],
            applied.precision,
        )
        segment = SegmentCheck(verdict, excess, bounds, reason)
    return WorkaroundCheck(workaround, str(applied), optimizer, segment)


def rerun_workaround(
    context: LocalizeContext,
    result: RunResult,
    common: dict[str, Any],
    check: WorkaroundCheck,
    directory: Path,
) -> FullRerun:
    """Rerun a whole configuration with a workaround and judge it as the doctor does.

    The rerun is an ordinary lockstep worker (`parity.runner.execute`) with the
    doctor's spec ``common``, the same emulated faults, and the workaround's
    configuration and optimizer, in ``directory/workaround-NAME-full``. It is
    judged against the doctor's referee and envelope. A failed worker gives the
    verdict failed. A stop signal gives not-run and sets ``context.stopped``, so
    that the rest of the localization is skipped.
    """
    key = f"workaround-{check.workaround.name}-full"
    run_directory = str(directory / key)
    if context.stopped is not None:
        return FullRerun(
            "not-run",
            f"not started: stopped by {context.stopped}",
            run_directory=None,
        )
    spec = {
        name: value
        for name, value in common.items()
        if name not in ("config", "role", "faults", "perturb_seed")
    }
    if check.optimizer is not None:
        if "scenario" not in spec:
            # NOTE: the lockstep worker swaps the optimizer only when it compiles
            # a built-in scenario, and compiles a user model as the user wrote it.
            return FullRerun(
                "not-run",
                f"the full rerun with {check.optimizer} runs for built-in scenarios "
                "only; a user model keeps the optimizer it was compiled with",
            )
        spec["optimizer"] = check.optimizer
    run = PlannedRun(
        key, parse_config(check.config), "candidate", tuple(result.run.faults)
    )
    options = context.doctor.options
    memory_limit = (
        default_memory_limit(1)
        if options.memory_limit is None
        else parse_memory_limit(options.memory_limit)
    )
    log.info(
        "rerunning all of %s with workaround %s in %s",
        check.config,
        check.workaround.name,
        run_directory,
    )
    try:
        (rerun,) = execute(
            [run],
            directory,
            spec,
            jobs=1,
            timeout=context.timeout,
            memory_limit=memory_limit,
            resume=options.resume,
        )
    except Interrupted as interruption:
        (rerun,) = interruption.results
        context.stopped = interruption.signal_name
        log.warning(
            "the full rerun of %s with workaround %s was stopped by %s; "
            "the localization so far is kept",
            check.config,
            check.workaround.name,
            interruption.signal_name,
        )
    judgement = judge(rerun, context.referee, context.envelope)
    epochs = rerun.meta.get("epochs")
    return FullRerun(
        judgement.verdict,
        judgement.reason,
        excess=judgement.excess,
        first_divergent_step=judgement.first_divergent_step,
        boundary_disagreement=judgement.boundary_disagreement,
        final_accuracy=rerun.meta.get("final_accuracy"),
        epochs=int(epochs) if epochs is not None else None,
        run_directory=run_directory,
        seconds=rerun.wall_seconds,
    )


def _rerun_with(
    outcomes: dict[str, Outcome], config: Configuration, optimizer: str | None
) -> Outcome | None:
    """Return a finished worker that ran ``config`` with ``optimizer``, if any."""
    for outcome in outcomes.values():
        ran = outcome.meta.get("config"), outcome.meta.get("optimizer")
        if outcome.ok and ran == (str(config), optimizer):
            return outcome
    return None


def slug(text: str) -> str:
    """Return ``text`` with every character but letters, digits, "-", "_" and "." as "-"."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")
