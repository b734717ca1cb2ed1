"""Outcome-level evidence: final metrics over several seeds, with a confidence interval.

Runs that cannot be compared step by step can still be compared by what they end
with. Each configuration and the referee train from several seeds (each seed
changes the initial weights and the batch order), and the difference of their
mean final accuracies gets a Welch confidence interval from scipy. A difference
whose interval excludes zero is beyond seed-to-seed variation.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.runner import ProgressCallback, RunResult, execute

if TYPE_CHECKING:
    from parity.doctor import DoctorResult

log = logging.getLogger("parity")

# Confidence level of the interval for the difference of mean final accuracies.
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class OutcomeComparison:
    """A configuration's final accuracies over seeds next to the referee's."""

    seeds: list[int]
    accuracies: list[float | None]
    referee_accuracies: list[float | None]
    mean_difference: float | None
    interval: tuple[float, float] | None
    beyond_seed_variation: bool | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON fields."""
        fields = dataclasses.asdict(self)
        fields["interval"] = list(self.interval) if self.interval else None
        fields["confidence"] = CONFIDENCE
        return fields


def compare_outcomes(
    seeds: list[int], ours: list[float | None], theirs: list[float | None]
) -> OutcomeComparison:
    """Compare two samples of final accuracies with a Welch confidence interval."""
    from scipy import stats

    a = np.array([v for v in ours if v is not None], np.float64)
    b = np.array([v for v in theirs if v is not None], np.float64)
    if len(a) < 2 or len(b) < 2:
        message = (
            f"outcome: only {len(a)} and {len(b)} finished seeds; need at least 2 "
            "on each side (--seeds N, Python: seeds=N)"
        )
        return OutcomeComparison(seeds, ours, theirs, None, None, None, message)

    difference = float(a.mean() - b.mean())
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        # Both sides give the same accuracy from every seed: the difference is exact.
        interval = (difference, difference)
    else:
        test = stats.ttest_ind(a, b, equal_var=False)
        low, high = test.confidence_interval(CONFIDENCE)
        interval = (float(low), float(high))
    beyond = not (interval[0] <= 0.0 <= interval[1])
    where = "beyond" if beyond else "within"
    message = (
        f"mean final accuracy differs from the referee's by {difference:+.4f} "
        f"({100 * CONFIDENCE:.0f}% CI {interval[0]:+.4f} to {interval[1]:+.4f}, "
        f"{len(a)} seeds): {where} seed-to-seed variation"
    )
    return OutcomeComparison(seeds, ours, theirs, difference, interval, beyond, message)


def run_seeds(
    doctor: DoctorResult,
    seeds: int,
    common: dict[str, Any],
    *,
    jobs: int,
    timeout: float,
    memory_limit: int | None,
    progress: ProgressCallback | None = None,
) -> dict[str, OutcomeComparison]:
    """Train candidates and referee from more seeds; return comparisons by run key.

    The doctor's own run is the first seed. Envelope runs are not repeated,
    because outcome comparisons need no round-off envelope.
    """
    first = int(common["seed"])
    seed_list = list(range(first, first + seeds))
    referee = doctor.referee
    if referee is None:
        return {}
    planned = [r.run for r in doctor.candidates if r.status != "not-run"]
    planned.append(referee.run)
    finals: dict[str, list[float | None]] = {
        run.key: [_accuracy(r)]
        for run in planned
        for r in doctor.results
        if r.run.key == run.key
    }
    out = Path(doctor.options.out) / "runs"
    for seed in seed_list[1:]:
        runs = [
            dataclasses.replace(run, key=f"seed-{seed}-{run.key}") for run in planned
        ]
        log.info("training %d runs from seed %d", len(runs), seed)
        results = execute(
            runs,
            out,
            {**common, "seed": seed},
            jobs=jobs,
            timeout=timeout,
            memory_limit=memory_limit,
            resume=doctor.options.resume,
            progress=progress,
        )
        for run, result in zip(planned, results, strict=True):
            finals[run.key].append(_accuracy(result))

    referee_finals = finals[referee.run.key]
    return {
        run.key: compare_outcomes(seed_list, finals[run.key], referee_finals)
        for run in planned
        if run.role == "candidate"
    }


def _accuracy(result: RunResult) -> float | None:
    if not result.ok:
        return None
    value = result.meta.get("final_accuracy")
    return float(value) if value is not None else None


__all__ = ["CONFIDENCE", "OutcomeComparison", "compare_outcomes", "run_seeds"]
