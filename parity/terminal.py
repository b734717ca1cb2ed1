"""Terminal output: a progress bar per worker and the verdict table, drawn with rich."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

if TYPE_CHECKING:
    from parity.doctor import DoctorResult
    from parity.faults import Fault
    from parity.runner import PlannedRun

VERDICT_STYLES = {
    "consistent": "green",
    "roundoff": "blue",
    "divergent": "bold red",
    "failed": "magenta",
    "not-run": "dim",
}


class Progress:
    """One progress bar per worker, updated from the workers' progress files."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> Progress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(*exc)

    def update(
        self, run: PlannedRun, step: int, total: int, status: str | None
    ) -> None:
        """Show a worker's step count, or its final status when ``status`` is given."""
        if run.key not in self.tasks:
            label = (
                f"{run.label} [{run.role}]" if run.role != "candidate" else run.label
            )
            self.tasks[run.key] = self.bars.add_task(label, total=None, status="")
        task = self.tasks[run.key]
        if status is not None:
            style = "green" if status == "ok" else "magenta"
            finished = self.bars.tasks[task].total or 1
            self.bars.update(
                task, total=finished, completed=finished, status=f"[{style}]{status}"
            )
        elif total:
            self.bars.update(task, total=total, completed=step, status="")


def _number(value: Any, pattern: str = "{:.3g}") -> str:
    if value is None:
        return "-"
    return pattern.format(value) if isinstance(value, float) else str(value)


# Width of tables written to a file or a pipe, where Rich would otherwise assume
# 80 columns and fold configuration strings over several lines.
PIPE_WIDTH = 120


def output_console() -> Console:
    """Return a console for stdout: the terminal's width, or PIPE_WIDTH when piped."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=PIPE_WIDTH)
    return console


def print_summary(result: DoctorResult, console: Console | None = None) -> None:
    """Print the verdict table and the paths of the report and the JSON."""
    console = console or output_console()
    summary = result.summary
    referee = summary["referee"] or {}
    status = referee.get("status")
    if referee.get("cached"):
        status = f"{status}, stored by an earlier run"
    table = Table(
        title=f"parity: {summary['scenario']['name']}, "
        f"referee {referee.get('config')} ({status})"
    )
    columns = ("configuration", "verdict", "excess", "first div. step")
    columns += ("final acc.", "boundary disagr.")
    for column in columns:
        table.add_column(column, overflow="fold")
    for entry in summary["configs"]:
        verdict = entry["verdict"]
        disagreement = entry["boundary_disagreement"]
        faults = f" +{','.join(entry['faults'])}" if entry["faults"] else ""
        table.add_row(
            entry["config"] + faults,
            f"[{VERDICT_STYLES.get(verdict, '')}]{verdict}",
            "non-finite"
            if entry.get("first_nonfinite_step") is not None
            else _number(entry["excess"]),
            _number(entry["first_divergent_step"]),
            _number(entry["final_accuracy"], "{:.3f}"),
            "-" if disagreement is None else f"{100 * disagreement:.2f}%",
        )
    console.print(table)
    for entry in summary["configs"]:
        style = VERDICT_STYLES.get(entry["verdict"], "")
        console.print(
            f"  {entry['config']}: [{style}]{entry['verdict']}[/], {entry['reason']}",
            highlight=False,
        )
        if entry.get("outcome"):
            console.print(f"    {entry['outcome']['message']}", highlight=False)
    if result.report_path:
        console.print(f"report: {result.report_path}")
    if result.json_path:
        console.print(f"results: {result.json_path}")


def print_faults(catalogue: dict[str, Fault], console: Console | None = None) -> None:
    """Print the catalogue of emulated faults."""
    console = console or output_console()
    table = Table(title="emulated faults (use with --fault NAME or NAME@CONFIG)")
    table.add_column("name", no_wrap=True)
    table.add_column("what it does")
    table.add_column("the public bug class it stands for")
    for fault in catalogue.values():
        table.add_row(fault.name, fault.summary, fault.stands_for)
    console.print(table)
