"""The HTML report: one self-contained file with the figures embedded as PNG.

Sections: the verdict table, decision boundaries side by side (or per-class
disagreement when the input is not two-dimensional), loss curves, distance to the
referee per step with the round-off envelope, and each worker's environment.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.io import atomic_write_text
from parity.scenarios import decision_grid
from parity.verdict import DIVERGENT_EXCESS, predicted_classes

if TYPE_CHECKING:
    from parity.doctor import DoctorResult
    from parity.runner import RunResult

VERDICT_COLORS = {
    "consistent": "#1b7f3b",
    "roundoff": "#3b6fb6",
    "divergent": "#c0392b",
    "failed": "#8e44ad",
    "not-run": "#7f8c8d",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.verdict { font-weight: bold; }
img { max-width: 100%; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; font-size: 0.8em; }
"""


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _title(result: RunResult, verdict: str | None) -> str:
    text = str(result.run.config)
    return f"{text}\n{verdict}" if verdict else text


def boundary_figure(doctor: DoctorResult) -> str | None:
    """Draw each configuration's decision regions over the data; None if not 2-D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [
        r
        for r in [doctor.referee, *doctor.candidates]
        if r is not None and r.ok and "predictions/grid" in r.arrays
    ]
    if not shown:
        return None
    x, y = doctor.scenario.data()
    xs, ys, _ = decision_grid(x)
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 3.6 * rows), squeeze=False
    )
    labels = y.reshape(-1)
    for axis, result in zip(axes.ravel(), shown, strict=False):
        grid = np.asarray(result.arrays["predictions/grid"], np.float64)
        if doctor.scenario.task == "binary":
            # Shade the probability so that a near-linear model shows its gradient.
            probability = grid.reshape(len(ys), len(xs))
            axis.contourf(
                xs,
                ys,
                probability,
                levels=np.linspace(0, 1, 11),
                cmap="coolwarm",
                alpha=0.4,
            )
            if probability.min() < 0.5 < probability.max():
                axis.contour(
                    xs, ys, probability, levels=[0.5], colors="k", linewidths=1
                )
        else:
            classes = predicted_classes(grid).reshape(len(ys), len(xs))
            levels = np.arange(doctor.scenario.num_classes + 1) - 0.5
            axis.contourf(xs, ys, classes, levels=levels, cmap="coolwarm", alpha=0.35)
        axis.scatter(
            x[:, 0], x[:, 1], c=labels, cmap="coolwarm", s=4, edgecolors="none"
        )
        judgement = doctor.judgements.get(result.run.key)
        verdict = judgement.verdict if judgement else "referee (float64)"
        axis.set_title(
            _title(result, verdict),
            fontsize=8,
            color=VERDICT_COLORS.get(verdict, "#222"),
        )
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in axes.ravel()[len(shown) :]:
        axis.axis("off")
    return _png(figure)


def class_disagreement_figure(doctor: DoctorResult) -> str | None:
    """Plot, per class, the fraction of data points classified unlike the referee."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    referee = doctor.referee
    if referee is None or not referee.ok or "predictions/data" not in referee.arrays:
        return None
    if doctor.scenario.task not in ("binary", "multiclass"):
        return None
    _, y = doctor.scenario.data()
    truth = predicted_classes(referee.arrays["predictions/data"])
    labels = (
        y.reshape(-1).astype(int)
        if doctor.scenario.task != "binary"
        else (y.reshape(-1) > 0.5).astype(int)
    )
    figure, axis = plt.subplots(figsize=(9, 3.5))
    classes = np.arange(doctor.scenario.num_classes)
    shown = [r for r in doctor.candidates if r.ok and "predictions/data" in r.arrays]
    width = 0.8 / max(1, len(shown))
    for offset, result in enumerate(shown):
        ours = predicted_classes(result.arrays["predictions/data"])
        rates = [
            np.mean(ours[labels == c] != truth[labels == c])
            if np.any(labels == c)
            else 0
            for c in classes
        ]
        axis.bar(classes + offset * width, rates, width, label=str(result.run.config))
    axis.set_xlabel("true class")
    axis.set_ylabel("fraction classified unlike the referee")
    axis.legend(fontsize=7)
    return _png(figure)


def prediction_disagreement_table(doctor: DoctorResult) -> str | None:
    """Return an HTML matrix: the percentage of data points two runs classify differently."""
    shown = [
        r
        for r in [doctor.referee, *doctor.candidates]
        if r is not None and r.ok and "predictions/data" in r.arrays
    ]
    if len(shown) < 2:
        return None
    classes = [predicted_classes(r.arrays["predictions/data"]) for r in shown]
    names = [
        f"{r.run.config} (referee)" if r.run.role == "referee" else str(r.run.config)
        for r in shown
    ]
    header = "".join(f"<th><code>{html.escape(name)}</code></th>" for name in names)
    rows = [f"<tr><th></th>{header}</tr>"]
    for name, ours in zip(names, classes, strict=True):
        cells = "".join(
            f"<td>{100 * np.mean(ours != theirs):.2f}%</td>"
            if ours.shape == theirs.shape
            else "<td>–</td>"
            for theirs in classes
        )
        rows.append(f"<tr><th><code>{html.escape(name)}</code></th>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def loss_figure(doctor: DoctorResult) -> str | None:
    """Plot the per-epoch mean training loss of every run that finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in [doctor.referee, *doctor.candidates] if r is not None and r.ok]
    if not shown:
        return None
    figure, axis = plt.subplots(figsize=(9, 4))
    for result in shown:
        loss = result.arrays["steps/loss"]
        per_epoch = int(result.meta.get("steps_per_epoch", 1))
        epochs = len(loss) // per_epoch
        curve = loss[: epochs * per_epoch].reshape(epochs, per_epoch).mean(axis=1)
        style = "k--" if result.run.role == "referee" else "-"
        axis.plot(
            np.arange(1, epochs + 1),
            curve,
            style,
            label=str(result.run.config),
            linewidth=1,
        )
    axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss (mean over the epoch)")
    axis.legend(fontsize=7)
    return _png(figure)


def distance_figure(doctor: DoctorResult) -> str | None:
    """Plot each candidate's distance to the referee per step, with the envelope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(r, doctor.judgements[r.run.key]) for r in doctor.candidates if r.ok]
    shown = [(r, j) for r, j in shown if j.distance is not None]
    if not shown:
        return None
    figure, axis = plt.subplots(figsize=(9, 4.5))
    envelope = shown[0][1].envelope
    steps = np.arange(len(envelope))
    axis.fill_between(
        steps, 1e-12, envelope, color="#bbb", alpha=0.5, label="round-off envelope"
    )
    axis.plot(
        steps,
        envelope * DIVERGENT_EXCESS,
        "k:",
        linewidth=1,
        label=f"divergence threshold ({DIVERGENT_EXCESS:g}x)",
    )
    for result, judgement in shown:
        distance = np.where(judgement.distance > 0, judgement.distance, np.nan)
        axis.plot(
            steps,
            distance,
            linewidth=1,
            label=f"{result.run.config} ({judgement.verdict})",
        )
    axis.set_yscale("log")
    axis.set_xlabel("training step")
    axis.set_ylabel("relative parameter distance to the referee")
    axis.legend(fontsize=7)
    return _png(figure)


def _fmt(value: Any, pattern: str = "{:.3g}") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return pattern.format(value)
    return str(value)


def verdict_table(doctor: DoctorResult) -> str:
    """Return the verdict table as HTML rows, one per configuration."""
    header = (
        "<tr><th>configuration</th><th>verdict</th><th>excess</th><th>first divergent step</th>"
        "<th>final loss</th><th>final accuracy</th><th>boundary disagreement</th><th>faults</th><th>reason</th></tr>"
    )
    rows = [header]
    for entry in doctor.summary["configs"]:
        color = VERDICT_COLORS.get(entry["verdict"], "#222")
        disagreement = entry["boundary_disagreement"]
        shown = (
            "–"
            if disagreement is None
            else f"{100 * disagreement:.2f}% ({entry['disagreement_on']})"
        )
        rows.append(
            "<tr>"
            f"<td><code>{html.escape(entry['config'])}</code></td>"
            f'<td class="verdict" style="color:{color}">{html.escape(entry["verdict"])}</td>'
            f"<td>{_fmt(entry['excess'])}</td>"
            f"<td>{_fmt(entry['first_divergent_step'])}</td>"
            f"<td>{_fmt(entry['final_loss'], '{:.4g}')}</td>"
            f"<td>{_fmt(entry['final_accuracy'], '{:.3f}')}</td>"
            f"<td>{shown}</td>"
            f"<td>{html.escape(', '.join(entry['faults']) or '–')}</td>"
            f"<td>{html.escape(entry['reason'])}</td>"
            "</tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def environment_section(doctor: DoctorResult) -> str:
    """Return each worker's environment fingerprint as collapsible JSON blocks."""
    parts = []
    for result in doctor.results:
        environment = result.meta.get("environment")
        if environment is None:
            continue
        text = html.escape(json.dumps(environment, indent=1, sort_keys=True))
        parts.append(
            f"<details><summary><code>{html.escape(result.run.label)}</code> ({result.run.role})</summary><pre>{text}</pre></details>"
        )
    failed = [r for r in doctor.results if r.status == "failed"]
    for result in failed:
        parts.append(
            f"<details open><summary><code>{html.escape(result.run.label)}</code> failed</summary>"
            f"<pre>{html.escape(result.error or '')}\n{html.escape(result.stderr_tail)}</pre></details>"
        )
    return "".join(parts)


def render(doctor: DoctorResult, extra_sections: Sequence[str] = ()) -> str:
    """Return the whole report as an HTML string.

    ``extra_sections`` are HTML fragments placed before the environments, each
    starting with its own ``<h2>`` title.
    """
    summary = doctor.summary
    scenario = summary["scenario"]
    referee = summary["referee"] or {}
    sections = [
        f"<h1>parity report: {html.escape(scenario['name'])}</h1>",
        f"<p>{html.escape(scenario['description'])}; {scenario['epochs']} epochs, batch size "
        f"{scenario['batch_size']}, seed {scenario['seed']}. Referee: <code>{html.escape(str(referee.get('config')))}</code> "
        f"({html.escape(str(referee.get('status')))}). parity {html.escape(summary['parity_version'])}.</p>",
        "<h2>Verdicts</h2>",
        "<p>Excess: the largest ratio, over all steps, of the configuration's parameter distance to the "
        "float64 referee and the distance that correct float32 runs (the envelope) show at that step. "
        f"Above {DIVERGENT_EXCESS:g} the configuration is divergent.</p>",
        verdict_table(doctor),
    ]
    if getattr(doctor, "localizations", None) or "model_diagnosis" in summary:
        from parity.localize import localization_html

        sections += localization_html(doctor)
    boundary = boundary_figure(doctor)
    if boundary:
        sections += [
            "<h2>Decision boundaries</h2>",
            _img(boundary, "decision boundaries"),
        ]
    else:
        figure = class_disagreement_figure(doctor)
        if figure:
            sections += [
                "<h2>Disagreement with the referee per class</h2>",
                _img(figure, "per-class disagreement"),
            ]
    table = prediction_disagreement_table(doctor)
    if table:
        sections += [
            "<h2>Predicted classes compared between configurations</h2>",
            "<p>Percentage of data points that two configurations put in different "
            "classes. Predictions are made on the held-out rows when there are any, "
            "and on the training data otherwise.</p>",
            table,
        ]
    for title, figure in (
        ("Training loss", loss_figure(doctor)),
        ("Distance to the referee", distance_figure(doctor)),
    ):
        if figure:
            sections += [f"<h2>{title}</h2>", _img(figure, title)]
    sections += [*extra_sections, "<h2>Environments</h2>", environment_section(doctor)]
    body = "\n".join(sections)
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>parity report</title><style>{STYLE}</style></head><body>{body}</body></html>\n"


def write_report(
    doctor: DoctorResult, path: Path, extra_sections: Sequence[str] = ()
) -> Path:
    """Render the report and write it atomically to ``path``."""
    atomic_write_text(path, render(doctor, extra_sections))
    return path
