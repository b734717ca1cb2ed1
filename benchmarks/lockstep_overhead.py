"""Benchmark: parity's recorded lockstep run against a plain `model.fit`.

For each configuration, in one invocation and one at a time:

1. a plain fit: a fresh process imports Keras for the backend, builds the
   scenario's model and calls `model.fit` for the same epochs and batch size;
2. parity's recorded lockstep run of the same configuration (one worker process,
   per-step records and checkpoints included).

It prints the ratio of training times (lockstep / fit, target at most 1.1) and
the ratio of the whole `parity doctor` run (workers in parallel) to the sum of the
plain fits' process wall times (target at most 1.2). The doctor runs twice with an
empty run store: the first run trains the referee and envelope runs, the second
reuses them (`parity.cache`). With --write it appends a Markdown table to
docs/benchmarks.md.

Usage: python benchmarks/lockstep_overhead.py [--epochs N] [--configs A,B] [--repeats N] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
        "--repeats",
        type=int,
        default=3,
        help="measurements of each figure; the median is reported (default 3)",
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
    fit_walls = []
    with tempfile.TemporaryDirectory() as work:
        for config in configs:
            # Fit and lockstep alternate, so that a load that comes and goes on a
            # shared machine falls on both; each figure is the median.
            fits, trains, walls = [], [], []
            for _ in range(args.repeats):
                fit = plain_fit(config, args.scenario, args.epochs)
                recorded = lockstep(config, args.scenario, args.epochs, Path(work))
                fits.append(fit["fit"])
                walls.append(fit["wall"])
                trains.append(recorded["train"])
            fit_walls.append(statistics.median(walls))
            fit_time, train_time = statistics.median(fits), statistics.median(trains)
            ratio = train_time / fit_time
            rows.append((config, fit_time, train_time, ratio))
            print(
                f"{config}: fit {fit_time:.2f} s, lockstep {train_time:.2f} s, "
                f"ratio {ratio:.2f} (fits {fits}, lockstep {trains})",
                flush=True,
            )

        # The first doctor run on a machine trains the referee and envelope runs
        # and stores them; a second run with the same options reuses them. Each
        # repeat starts from an empty store.
        first, second = [], []
        for repeat in range(args.repeats):
            os.environ["PARITY_CACHE_DIR"] = str(Path(work) / f"store-{repeat}")
            for attempt, walls in (("first", first), ("second", second)):
                started = time.perf_counter()
                run_doctor(
                    DoctorOptions(
                        scenario=args.scenario,
                        configs=configs,
                        epochs=args.epochs,
                        out=Path(work) / f"doctor-{repeat}-{attempt}",
                        report=True,
                    )
                )
                walls.append(time.perf_counter() - started)
    fit_wall_total = sum(fit_walls)
    doctor_walls = [statistics.median(first), statistics.median(second)]
    ratios = [wall / fit_wall_total for wall in doctor_walls]
    print(
        f"doctor {doctor_walls[0]:.1f} s (first run), {doctor_walls[1]:.1f} s (second "
        f"run), sum of plain fits {fit_wall_total:.1f} s, ratios {ratios[0]:.2f} and "
        f"{ratios[1]:.2f} (first {first}, second {second})"
    )

    if args.write:
        write(args, rows, doctor_walls, fit_wall_total, ratios)


def write(
    args: argparse.Namespace,
    rows: list,
    doctor_walls: list[float],
    fits: float,
    ratios: list[float],
) -> None:
    """Append the results to docs/benchmarks.md as a Markdown section."""
    lines = [
        "",
        f"## Lockstep overhead ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/lockstep_overhead.py --scenario {args.scenario} --epochs {args.epochs} --repeats {args.repeats}"
        + (f" --configs {args.configs}" if args.configs else "")
        + " --write`",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}.",
        "",
        f"Medians of {args.repeats} measurements; fit and lockstep runs alternate.",
        "",
        "| configuration | plain fit (s) | recorded lockstep (s) | ratio (target <= 1.1) |",
        "|---|---|---|---|",
        *(f"| `{c}` | {f:.2f} | {r:.2f} | {q:.2f} |" for c, f, r, q in rows),
        "",
        "| whole `parity doctor` run of these configurations | wall (s) | ratio to the sum of the plain fits' process wall times, imports included, "
        f"{fits:.1f} s (target <= 1.2) |",
        "|---|---|---|",
        f"| first run: trains the referee and both envelope runs | {doctor_walls[0]:.1f} | {ratios[0]:.2f} |",
        f"| second run: reuses them from the run store | {doctor_walls[1]:.1f} | {ratios[1]:.2f} |",
        "",
    ]
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(existing + "\n".join(lines))


if __name__ == "__main__":
    main()
