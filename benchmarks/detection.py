"""Detection benchmark: parity's trajectory verdicts on correct and on faulted runs.

For each scenario, one float64 referee and its envelope runs judge two groups of
candidates, all trained in lockstep from the same initial weights:

- correct configurations (`CORRECT_CONFIGS`): TensorFlow graph, XLA and eager,
  JAX jit and eager and PyTorch eager, with 1 or 2 threads and, for TensorFlow,
  oneDNN on or off;
- every catalogued fault on every scenario it applies to. On circles each fault
  runs on TensorFlow graph, JAX jit and PyTorch eager; on the other scenarios on
  one of them, in turns. `fused-dense-relu` acts in compiled modes only, so it
  never runs on PyTorch eager. `wide-matmul` needs a layer wider than 1024 units,
  so it runs on the `wide` scenario only, on all three.

`unordered-reduction` changes sums by round-off only, so it belongs with the
correct configurations: it must not be flagged. Every other fault changes results
beyond round-off and must be flagged `divergent`.

The benchmark reports the false alarm rate (correct runs called divergent, target
0) and the detection rate (faulted runs called divergent, target 1.0). It also
reports the excess distribution of each group and the gap between the largest
excess of a correct run and the smallest excess of a detected fault. That gap is
the evidence for `parity.verdict.DIVERGENT_EXCESS`. Runs that went non-finite are detected by the
non-finite rule and have no meaningful excess, so the gap leaves them out.

Usage::

    python benchmarks/detection.py [--quick] [--jobs N] [--out DIR] [--write]

``--quick`` runs a small corpus (a few minutes) to check the set-up; ``--write``
replaces the "Detection" section of docs/benchmarks.md with the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from parity.config import default_referee, parse_config
from parity.doctor import (
    DoctorOptions,
    default_timeout,
    plan_referee_runs,
    run_planned,
)
from parity.env import cpu_model, installed_backends
from parity.faults import CATALOGUE
from parity.lockstep import digest_bytes
from parity.runner import PlannedRun
from parity.scenarios import get_scenario
from parity.verdict import DIVERGENT_EXCESS

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION_TITLE = "## Detection"

# Files written in --out: one row per judged run, and how the corpus was run.
ROWS_FILE = "rows.json"
RUN_FILE = "run.json"

# Epochs per scenario, reduced from the scenarios' defaults so that the corpus of
# 94 workers runs in about 20 minutes with one worker at a time on two CPU cores.
# Importing a framework alone takes 3 to 12 seconds of each worker there. Every fault acts
# from the first steps, so short runs suffice for detection, but the late chaotic
# drift of correct runs is not covered.
EPOCHS = {"circles": 3, "moons": 3, "blobs": 3, "digits": 2, "wide": 2}
QUICK_EPOCHS = {"circles": 3, "wide": 2}

CORRECT_SCENARIOS = ("circles", "moons", "blobs", "digits")

# Correct configurations: a part of the product TensorFlow (graph, XLA, eager) x
# threads (1, 2) x oneDNN (on, off), JAX (jit, eager) x threads and PyTorch eager
# x threads, in which every mode, thread count and oneDNN setting occurs.
CORRECT_CONFIGS = (
    "tensorflow:cpu:graph:float32:onednn=on:threads=1",
    "tensorflow:cpu:graph:float32:onednn=off:threads=2",
    "tensorflow:cpu:xla:float32:onednn=off:threads=1",
    "tensorflow:cpu:eager:float32:onednn=on:threads=2",
    "jax:cpu:jit:float32:threads=1",
    "jax:cpu:eager:float32:threads=2",
    "torch:cpu:eager:float32:threads=1",
    "torch:cpu:eager:float32:threads=2",
)
QUICK_CORRECT_CONFIGS = (
    "tensorflow:cpu:graph:float32:threads=1",
    "tensorflow:cpu:eager:float32",
    "jax:cpu:jit:float32:threads=2",
    "torch:cpu:eager:float32",
)

# Faults whose effect stays within round-off. They count with the correct runs.
ROUNDOFF_FAULTS = frozenset({"unordered-reduction"})

# Configurations that faults run on: compiled TensorFlow and JAX, eager PyTorch.
FAULT_CONFIGS = (
    "tensorflow:cpu:graph:float32",
    "jax:cpu:jit:float32",
    "torch:cpu:eager:float32",
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One judged run: a configuration, the faults applied to it, its group."""

    scenario: str
    config: str
    faults: tuple[str, ...]
    group: str  # "correct", "roundoff fault" or "fault"


def correct_configs(quick: bool) -> list[str]:
    """Return the correct configurations of the corpus."""
    return list(QUICK_CORRECT_CONFIGS if quick else CORRECT_CONFIGS)


def fault_applies(fault: str, scenario: str, config: str) -> bool:
    """Return whether a fault changes anything for this scenario and configuration."""
    if fault == "wide-matmul":
        return scenario == "wide"
    if fault == "fused-dense-relu":
        return parse_config(config).compiled
    return True


def fault_targets(fault: str, scenario: str, turn: int, quick: bool) -> list[str]:
    """Return the configurations that a fault runs on in a scenario.

    A fault runs on every configuration it applies to on the circles scenario and,
    for `wide-matmul`, on the wide one. Elsewhere, and everywhere in the quick
    corpus, it runs on one of them, and ``turn`` rotates which.
    """
    targets = [c for c in FAULT_CONFIGS if fault_applies(fault, scenario, c)]
    every = fault == "wide-matmul" or (scenario == "circles" and not quick)
    if every or not targets:
        return targets
    return [targets[turn % len(targets)]]


def plan_corpus(quick: bool) -> list[Candidate]:
    """Return every candidate of the benchmark, scenario by scenario."""
    scenarios = QUICK_EPOCHS if quick else EPOCHS
    candidates = []
    for scenario_index, scenario in enumerate(scenarios):
        if scenario in CORRECT_SCENARIOS:
            configs = correct_configs(quick)
        else:
            configs = list(FAULT_CONFIGS)
        candidates += [Candidate(scenario, c, (), "correct") for c in configs]
        for fault_index, fault in enumerate(CATALOGUE):
            turn = fault_index + scenario_index
            group = "roundoff fault" if fault in ROUNDOFF_FAULTS else "fault"
            candidates += [
                Candidate(scenario, config, (fault,), group)
                for config in fault_targets(fault, scenario, turn, quick)
            ]
    return candidates


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def planned_runs(candidates: list[Candidate], installed: list[str]) -> list[PlannedRun]:
    """Return a worker run per candidate, then the referee and envelope runs."""
    runs = []
    for index, candidate in enumerate(candidates):
        config = parse_config(candidate.config)
        faults = "-".join(candidate.faults)
        missing = None if config.backend in installed else "backend not installed"
        runs.append(
            PlannedRun(
                f"{index:03d}-{_slug(candidate.config)}-{_slug(faults)}",
                config,
                "candidate",
                candidate.faults,
                None,
                missing,
            )
        )
    return runs + plan_referee_runs(default_referee(installed), installed)


def run_scenario(
    scenario_name: str,
    candidates: list[Candidate],
    epochs: int,
    out: Path,
    jobs: int,
) -> list[dict[str, Any]]:
    """Run one scenario's candidates against one referee and return a row per candidate."""
    scenario = get_scenario(scenario_name)
    runs = planned_runs(candidates, installed_backends())
    options = DoctorOptions(
        scenario=scenario_name, epochs=epochs, out=out, jobs=jobs, report=False
    )
    common = {
        "scenario": scenario.name,
        "data_digest": digest_bytes(scenario.data()),
        "epochs": epochs,
        "batch_size": scenario.batch_size,
        "seed": 0,
        "learning_rate": scenario.learning_rate,
        "activation": "relu",
    }
    timeout = default_timeout(scenario, epochs, scenario.batch_size)
    result = run_planned(options, scenario, runs, common, timeout)

    by_key = {run_result.run.key: run_result for run_result in result.results}
    rows = []
    for candidate, run in zip(candidates, runs, strict=False):
        judgement = result.judgements[run.key]
        rows.append(
            {
                "scenario": candidate.scenario,
                "config": candidate.config,
                "faults": list(candidate.faults),
                "group": candidate.group,
                "epochs": epochs,
                "verdict": judgement.verdict,
                "excess": judgement.excess,
                "first_divergent_step": judgement.first_divergent_step,
                "first_nonfinite_step": judgement.first_nonfinite_step,
                "boundary_disagreement": judgement.boundary_disagreement,
                "wall_seconds": round(by_key[run.key].wall_seconds, 1),
                "reason": judgement.reason,
            }
        )
    return rows


def describe(values: list[float]) -> dict[str, float | int | None]:
    """Return count, min, median, 90th percentile and max of finite values."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)])
    if finite.size == 0:
        return {"count": 0, "min": None, "median": None, "p90": None, "max": None}
    return {
        "count": int(finite.size),
        "min": float(finite.min()),
        "median": float(np.median(finite)),
        "p90": float(np.percentile(finite, 90)),
        "max": float(finite.max()),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Compute rates, excess distributions and the gap from the rows."""
    judged = [row for row in rows if row["verdict"] not in ("failed", "not-run")]
    correct = [row for row in judged if row["group"] == "correct"]
    roundoff = [row for row in judged if row["group"] == "roundoff fault"]
    faulty = [row for row in judged if row["group"] == "fault"]
    detected = [row for row in faulty if row["verdict"] == "divergent"]
    finite_detected = [row for row in detected if row["first_nonfinite_step"] is None]

    def rate(hits: list[Any], total: list[Any]) -> float | None:
        return len(hits) / len(total) if total else None

    largest_correct = describe([r["excess"] for r in correct + roundoff])["max"]
    smallest_detected = describe([r["excess"] for r in finite_detected])["min"]
    gap = (
        smallest_detected / largest_correct
        if largest_correct and smallest_detected
        else None
    )
    per_fault = {}
    for name in CATALOGUE:
        rows_of_fault = [r for r in judged if r["faults"] == [name]]
        per_fault[name] = {
            "runs": len(rows_of_fault),
            "divergent": sum(r["verdict"] == "divergent" for r in rows_of_fault),
            "non_finite": sum(
                r["first_nonfinite_step"] is not None for r in rows_of_fault
            ),
            "excess": describe(
                [
                    r["excess"]
                    for r in rows_of_fault
                    if r["first_nonfinite_step"] is None
                ]
            ),
        }
    return {
        "runs": len(rows),
        "failed": [
            f"{r['scenario']} {r['config']} {r['faults']}: {r['reason']}"
            for r in rows
            if r["verdict"] in ("failed", "not-run")
        ],
        "false_alarm_rate": rate(
            [r for r in correct if r["verdict"] == "divergent"], correct
        ),
        "roundoff_fault_false_alarm_rate": rate(
            [r for r in roundoff if r["verdict"] == "divergent"], roundoff
        ),
        "detection_rate": rate(detected, faulty),
        "missed": [
            f"{r['scenario']} {r['config']} {r['faults']}"
            for r in faulty
            if r["verdict"] != "divergent"
        ],
        "excess": {
            "correct": describe([r["excess"] for r in correct]),
            "roundoff fault": describe([r["excess"] for r in roundoff]),
            "fault (finite)": describe([r["excess"] for r in finite_detected]),
        },
        "largest_correct_excess": largest_correct,
        "smallest_detected_excess": smallest_detected,
        "gap": gap,
        "per_fault": per_fault,
        "divergent_excess_threshold": DIVERGENT_EXCESS,
    }


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return _number(numerator / denominator if numerator and denominator else None)


def render_markdown(summary: dict[str, Any], run: dict[str, Any]) -> str:
    """Return the "Detection" section of docs/benchmarks.md.

    ``run`` contains the command, the date, the wall time in minutes, the epochs per
    scenario and, if recorded, the one-minute load average when the run ended and a
    note on the machine.
    """
    cores = os.cpu_count()
    threshold = summary["divergent_excess_threshold"]
    largest = summary["largest_correct_excess"]
    smallest = summary["smallest_detected_excess"]
    rate = summary["false_alarm_rate"]
    lines = [
        SECTION_TITLE,
        "",
        "Do parity's trajectory verdicts flag every emulated fault and no correct run? "
        "Each scenario has one float64 referee (TensorFlow graph) and two envelope runs. "
        "The correct runs are TensorFlow graph, XLA and eager, JAX jit and eager and "
        "PyTorch eager, with 1 or 2 threads and, for TensorFlow, oneDNN on or off. "
        "Every fault runs on each scenario it applies to: on circles on TensorFlow "
        "graph, JAX jit and PyTorch eager, elsewhere on one of them in turns "
        "(`benchmarks/detection.py` lists the corpus).",
        "",
        f"- Command: `{run['command']}`, run on {run.get('date', 'an unrecorded date')}",
        f"- Machine: {cpu_model() or platform.processor() or 'unknown CPU'}, "
        f"{cores} cores, {platform.platform()}, Python {platform.python_version()}"
        + (f" ({run['note']})" if run.get("note") else ""),
        f"- Wall time: {run['minutes']:.1f} minutes"
        + (
            f", with a load average of {run['load_average']:.1f} at the end"
            if run.get("load_average") is not None
            else ""
        ),
        "- Epochs: "
        + ", ".join(f"{name} {count}" for name, count in run["epochs"].items())
        + " (reduced from the scenarios' defaults)",
        f"- Threshold: `DIVERGENT_EXCESS` = {summary['divergent_excess_threshold']:g}",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| runs judged | {summary['runs'] - len(summary['failed'])} of {summary['runs']} | all |",
        f"| false alarm rate, correct runs | {_number(rate)} | 0 |",
        "| false alarm rate, unordered-reduction | "
        f"{_number(summary['roundoff_fault_false_alarm_rate'])} | 0 |",
        f"| detection rate, faults above round-off | {_number(summary['detection_rate'])} | 1.0 |",
        f"| largest excess of a correct run | {_number(summary['largest_correct_excess'])} | |",
        "| smallest excess of a detected finite fault | "
        f"{_number(summary['smallest_detected_excess'])} | |",
        f"| gap (smallest fault / largest correct) | {_number(summary['gap'])} | > 1 |",
        f"| threshold / largest correct | {_ratio(threshold, largest)} | > 1 |",
        f"| smallest fault / threshold | {_ratio(smallest, threshold)} | > 1 |",
        "",
        "Excess distribution of each group (runs that went non-finite have no excess):",
        "",
        "| group | runs | min | median | 90th percentile | max |",
        "|---|---|---|---|---|---|",
    ]
    for group, stats in summary["excess"].items():
        lines.append(
            f"| {group} | {stats['count']} | {_number(stats['min'])} | "
            f"{_number(stats['median'])} | {_number(stats['p90'])} | {_number(stats['max'])} |"
        )
    lines += [
        "",
        "| fault | runs | divergent | non-finite | min excess | max excess |",
        "|---|---|---|---|---|---|",
    ]
    for name, stats in summary["per_fault"].items():
        excess = stats["excess"]
        lines.append(
            f"| {name} | {stats['runs']} | {stats['divergent']} | {stats['non_finite']} | "
            f"{_number(excess['min'])} | {_number(excess['max'])} |"
        )
    if summary["missed"]:
        lines += ["", "Missed faults:", ""] + [
            f"- {item}" for item in summary["missed"]
        ]
    if summary["failed"]:
        lines += [
            "",
            "Runs without a verdict. A faulted run that crashes gets the verdict "
            "`failed`, which flags it too, but these runs are left out of the rates:",
            "",
        ] + [f"- {item}" for item in summary["failed"]]
    return "\n".join(lines) + "\n"


def write_section(section: str, page: Path = DOCS_PAGE) -> None:
    """Replace the "Detection" section of the page, or append it, and keep the rest."""
    text = page.read_text(encoding="utf-8") if page.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def run_corpus(quick: bool, out: Path, jobs: int) -> list[dict[str, Any]]:
    """Run every scenario of the corpus, saving the rows as they come, and return them."""
    epochs = QUICK_EPOCHS if quick else EPOCHS
    corpus = plan_corpus(quick)
    rows: list[dict[str, Any]] = []
    for scenario, count in epochs.items():
        candidates = [c for c in corpus if c.scenario == scenario]
        print(f"{scenario}: {len(candidates)} candidates, {count} epochs", flush=True)
        rows += run_scenario(scenario, candidates, count, out / scenario, jobs)
        (out / ROWS_FILE).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and with --write, record) its summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="run a small corpus")
    parser.add_argument(
        "--jobs", type=int, default=2, help="workers run at once (default 2)"
    )
    parser.add_argument(
        "--out",
        default="detection-benchmark",
        help="directory for the runs, rows.json, run.json and summary.json "
        "(default detection-benchmark)",
    )
    parser.add_argument(
        "--write", action="store_true", help="record the results in docs/benchmarks.md"
    )
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="summarize rows.json and run.json from an earlier run in --out instead of "
        "running",
    )
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.from_results:
        rows = json.loads((out / ROWS_FILE).read_text(encoding="utf-8"))
        run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    else:
        started = time.perf_counter()
        rows = run_corpus(args.quick, out, args.jobs)
        run = {
            "command": "python benchmarks/detection.py"
            + (" --quick" if args.quick else "")
            + f" --jobs {args.jobs}",
            "minutes": (time.perf_counter() - started) / 60,
            # Other work on the machine slows the run, so its load is recorded.
            "load_average": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d"),
            "epochs": QUICK_EPOCHS if args.quick else EPOCHS,
        }
        (out / RUN_FILE).write_text(json.dumps(run, indent=1), encoding="utf-8")

    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    section = render_markdown(summary, run)
    print(section)
    if args.write:
        write_section(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
