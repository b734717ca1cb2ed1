"""Benchmark: parity's recorded lockstep run against a plain `model.fit`.

For each configuration, in one invocation and one at a time:

1. a plain fit: a fresh process imports Keras for the backend, builds the
   scenario's model and calls `model.fit` for the same epochs and batch size;
2. parity's recorded lockstep run of the same configuration (one worker process,
   per-step records and checkpoints included).

It prints the ratio of training times (lockstep / fit, target at most 1.1) and
the ratio of the whole `parity doctor` run (referee and envelope runs included,
workers in parallel) to the sum of the plain fits' process wall times (target at
most 1.2), and appends a Markdown table to docs/benchmarks.md with --write.

Usage: python benchmarks/lockstep_overhead.py [--epochs N] [--configs A,B] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from parity.config import parse_configs
from parity.discover import default_configs
from parity.doctor import DoctorOptions, run_doctor
from parity.env import cpu_model
from parity.runner import PlannedRun, execute

PLAIN_FIT = r"""
import json, os, sys, time
started = time.perf_counter()
from parity.config import parse_config
from parity.scenarios import get_scenario
from parity.worker import compile_model, configure_backend, keras_device_name, set_environment
config = parse_config(sys.argv[1])
scenario = get_scenario(sys.argv[2])
epochs = int(sys.argv[3])
set_environment(config)
keras = configure_backend(config)
x, y = scenario.data()
with keras.device(keras_device_name(config)):
    model = scenario.build(keras, "relu")
    compile_model(keras, model, scenario, config, scenario.learning_rate)
    fit_started = time.perf_counter()
    model.fit(x, y, epochs=epochs, batch_size=scenario.batch_size, shuffle=True, verbose=0)
    fit_seconds = time.perf_counter() - fit_started
print(json.dumps({"fit": fit_seconds, "process": time.perf_counter() - started}))
"""


def plain_fit(config: str, scenario: str, epochs: int) -> dict[str, float]:
    """Time a plain fit in a fresh process; return fit and whole-process seconds."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", PLAIN_FIT, config, scenario, str(epochs)],
        capture_output=True,
        text=True,
        check=True,
    )
    timing = json.loads(completed.stdout.strip().splitlines()[-1])
    timing["wall"] = time.perf_counter() - started
    return timing


def lockstep(config: str, scenario: str, epochs: int, work: Path) -> dict[str, float]:
    """Time parity's recorded lockstep run of one configuration in one worker."""
    run = PlannedRun(config.replace(":", "-"), parse_configs(config)[0])
    common = {"scenario": scenario, "epochs": epochs, "batch_size": 32, "seed": 0}
    (result,) = execute([run], work, common, jobs=1, timeout=3600)
    if not result.ok:
        raise RuntimeError(f"{config} failed: {result.error}\n{result.stderr_tail}")
    return {"train": result.meta["timing"]["train"], "wall": result.wall_seconds}


def main() -> None:
    """Run the benchmark and print (and optionally write) the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="circles")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--configs", help="default: the CPU configurations doctor runs here"
    )
    parser.add_argument(
        "--write", action="store_true", help="append results to docs/benchmarks.md"
    )
    args = parser.parse_args()
    configs = (
        [str(c) for c in parse_configs(args.configs)]
        if args.configs
        else [str(c) for c in default_configs()[0] if c.device == "cpu"]
    )

    rows = []
    fit_wall_total = 0.0
    with tempfile.TemporaryDirectory() as work:
        for config in configs:
            fit = plain_fit(config, args.scenario, args.epochs)
            recorded = lockstep(config, args.scenario, args.epochs, Path(work))
            fit_wall_total += fit["wall"]
            ratio = recorded["train"] / fit["fit"]
            rows.append((config, fit["fit"], recorded["train"], ratio))
            print(
                f"{config}: fit {fit['fit']:.2f} s, lockstep {recorded['train']:.2f} s, ratio {ratio:.2f}",
                flush=True,
            )

        started = time.perf_counter()
        run_doctor(
            DoctorOptions(
                scenario=args.scenario,
                configs=configs,
                epochs=args.epochs,
                out=Path(work) / "doctor",
                report=True,
            )
        )
        doctor_wall = time.perf_counter() - started
    doctor_ratio = doctor_wall / fit_wall_total
    print(
        f"doctor {doctor_wall:.1f} s, sum of plain fits {fit_wall_total:.1f} s, ratio {doctor_ratio:.2f}"
    )

    if args.write:
        write(args, rows, doctor_wall, fit_wall_total, doctor_ratio)


def write(
    args: argparse.Namespace, rows: list, doctor_wall: float, fits: float, ratio: float
) -> None:
    """Append the results to docs/benchmarks.md as a Markdown section."""
    lines = [
        "",
        f"## Lockstep overhead ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/lockstep_overhead.py --scenario {args.scenario} --epochs {args.epochs}"
        + (f" --configs {args.configs}" if args.configs else "")
        + " --write`",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}.",
        "",
        "| configuration | plain fit (s) | recorded lockstep (s) | ratio (target <= 1.1) |",
        "|---|---|---|---|",
        *(f"| `{c}` | {f:.2f} | {r:.2f} | {q:.2f} |" for c, f, r, q in rows),
        "",
        f"Whole `parity doctor` run of these configurations (referee and two envelope runs included, "
        f"workers in parallel): {doctor_wall:.1f} s; sum of the plain fits' process wall times, "
        f"imports included: {fits:.1f} s; ratio {ratio:.2f} (target <= 1.2).",
        "",
    ]
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(existing + "\n".join(lines))


if __name__ == "__main__":
    main()
