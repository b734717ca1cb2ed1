"""pytest support: assert that a model trains the same on several configurations.

``assert_consistent(model, x, y, configs=[...])`` trains in lockstep as
`parity.compare` does and raises AssertionError when a configuration is
divergent or failed. The message is complete on its own, so a CI log shows
which configuration, which verdict, how far beyond round-off, from which step,
and in which layer a configuration failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from parity.api import PASSING_VERDICTS, Report, compare

__all__ = ["assert_consistent", "format_failures"]


def assert_consistent(
    model: Any,
    x: Any,
    y: Any,
    configs: Sequence[str] | str | None = None,
    *,
    allowed: Sequence[str] = PASSING_VERDICTS,
    **options: Any,
) -> Report:
    """Raise AssertionError unless every configuration's verdict is in ``allowed``.

    ``allowed`` is ``("consistent", "roundoff")`` by default. Other keyword
    arguments go to `parity.compare`; the HTML report is skipped unless
    ``report=True``. Returns the `Report` when the assertion holds.
    """
    options.setdefault("report", False)
    report = compare(model, x, y, configs=configs, **options)
    summary = report.to_dict()
    bad = [entry for entry in summary["configs"] if entry["verdict"] not in allowed]
    if bad:
        message = format_failures(summary, bad, allowed)
        raise AssertionError(f"{message}\nResults: {report.json_path}")
    return report


def _describe_entry(entry: dict[str, Any], threshold: float) -> str:
    name = entry["config"]
    if entry.get("faults"):
        name += f" (faults: {', '.join(entry['faults'])})"
    parts = [f"{name}: {entry['verdict']}"]
    if entry.get("excess") is not None:
        parts.append(f"max excess {entry['excess']:.3g}x (threshold {threshold:g}x)")
    if entry.get("first_divergent_step") is not None:
        parts.append(f"first divergent step {entry['first_divergent_step']}")
    if entry.get("first_nonfinite_step") is not None:
        parts.append(f"first non-finite step {entry['first_nonfinite_step']}")
    # Workers localize the first non-finite value to a layer and a phase; the
    # fields appear here once the summary carries them.
    if entry.get("first_nonfinite_layer"):
        phase = entry.get("first_nonfinite_phase")
        where = f"in layer {entry['first_nonfinite_layer']!r}"
        parts.append(
            f"first non-finite value {where}" + (f", {phase}" if phase else "")
        )
    if entry.get("final_accuracy") is not None:
        parts.append(f"final accuracy {entry['final_accuracy']:.3f}")
    text = ", ".join(parts)
    if entry.get("reason"):
        text += f"; {entry['reason']}"
    return text


def format_failures(
    summary: dict[str, Any],
    bad: list[dict[str, Any]],
    allowed: Sequence[str] = PASSING_VERDICTS,
) -> str:
    """Return the assertion message for the configurations whose verdict is not allowed."""
    scenario = summary["scenario"]
    referee = summary.get("referee") or {}
    threshold = summary["thresholds"]["divergent_excess"]
    lines = [
        f"{len(bad)} of {len(summary['configs'])} configurations did not train "
        f"{scenario['name']} like the float64 referee {referee.get('config')} "
        f"({referee.get('status')}); allowed verdicts: {', '.join(allowed)}. "
        f"{scenario['epochs']} epochs, batch size {scenario['batch_size']}, "
        f"seed {scenario['seed']}.",
    ]
    if referee.get("status") != "ok" and referee.get("error"):
        lines.append(f"  referee failed: {referee['error']}")
    lines += [f"  {_describe_entry(entry, threshold)}" for entry in bad]
    passing = [entry for entry in summary["configs"] if entry not in bad]
    if passing:
        lines.append("Passing:")
        lines += [f"  {_describe_entry(entry, threshold)}" for entry in passing]
    return "\n".join(lines)
