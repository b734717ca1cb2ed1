"""Benchmark: the threshold that judges traces of a user's own `model.fit`.

`parity.keras.Recorder` records the weights at epoch ends, and `parity compare`
calls a fit trace divergent when, after the first recorded epoch, its weights
differ from the baseline's by more than `FIT_DIVERGENT_RATIO` of the distance the
baseline's weights moved in that epoch. There is no referee, so the threshold is a
plain ratio. This benchmark measures that ratio for correct configurations and for
every catalogued fault, all against a TensorFlow graph-mode baseline, so that the
threshold sits between the two groups.

Each run is a fresh process that builds a scenario's model, loads parity's seeded
initial weights, applies the faults (if any) and calls `model.fit` with
`shuffle=False` and the Recorder.

Usage: python benchmarks/fit_threshold.py [--scenarios circles,blobs] [--epochs 2] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from parity.env import cpu_model, installed_backends
from parity.faults import CATALOGUE
from parity.record import FIT_DIVERGENT_RATIO, judge_fit, load_fit_trace

FIT = r"""
import sys
from parity import lockstep
from parity.config import parse_config
from parity.faults import resolve_fault
from parity.scenarios import get_scenario
from parity.worker import compile_model, configure_backend, set_environment
config = parse_config(sys.argv[1])
scenario = get_scenario(sys.argv[2])
epochs, path = int(sys.argv[3]), sys.argv[4]
faults = [name for name in sys.argv[5].split(",") if name]
set_environment(config)
keras = configure_backend(config)
from parity.keras import Recorder
for name in faults:
    resolve_fault(name)(config)
x, y = scenario.data()
model = scenario.build(keras, "relu")
compile_model(keras, model, scenario, config, scenario.learning_rate)
names = [v.path for v in model.weights]
shapes = [tuple(v.shape) for v in model.weights]
model.set_weights(lockstep.initial_weights(names, shapes, 0))
recorder = Recorder(path, shuffle=False, data=(x, y), label=sys.argv[1])
model.fit(x, y, epochs=epochs, batch_size=scenario.batch_size, shuffle=False,
          verbose=0, callbacks=[recorder])
"""

BASELINE = "tensorflow:cpu:graph:float32"
CORRECT = (
    "tensorflow:cpu:graph:float32:threads=1",
    "tensorflow:cpu:eager:float32",
    "tensorflow:cpu:xla:float32",
    "jax:cpu:jit:float32",
    "jax:cpu:eager:float32",
    "torch:cpu:eager:float32",
)
FAULTED_ON = ("tensorflow:cpu:graph:float32", "jax:cpu:jit:float32")


def record(config: str, scenario: str, epochs: int, path: Path, faults: str) -> None:
    """Record one fit in a fresh process; raise with its stderr when it fails."""
    completed = subprocess.run(
        [sys.executable, "-c", FIT, config, scenario, str(epochs), str(path), faults],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{config} {faults}: {completed.stderr[-2000:]}")


def main() -> None:
    """Record the runs, print each ratio and verdict, and optionally write them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="circles,blobs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--write", action="store_true", help="append to docs/benchmarks.md"
    )
    args = parser.parse_args()
    installed = set(installed_backends())
    started = time.perf_counter()
    rows = []  # (scenario, group, config, faults, ratio, verdict)
    with tempfile.TemporaryDirectory() as work:
        for scenario in args.scenarios.split(","):
            base_path = Path(work) / f"{scenario}-baseline.parity"
            record(BASELINE, scenario, args.epochs, base_path, "")
            baseline = load_fit_trace(str(base_path))
            runs = [("correct", config, "") for config in CORRECT]
            runs += [
                ("fault", config, name) for name in CATALOGUE for config in FAULTED_ON
            ]
            for index, (group, config, faults) in enumerate(runs):
                if config.split(":")[0] not in installed:
                    continue
                path = Path(work) / f"{scenario}-{index}.parity"
                try:
                    record(config, scenario, args.epochs, path, faults)
                except RuntimeError as error:
                    print(f"{scenario} {config} {faults}: failed: {error}", flush=True)
                    rows.append((scenario, group, config, faults, None, "failed"))
                    continue
                row = judge_fit(baseline, load_fit_trace(str(path)))
                ratio = row.first_epoch_ratio
                rows.append((scenario, group, config, faults, ratio, row.verdict))
                print(
                    f"{scenario} {config} {faults or '-'}: {ratio} {row.verdict}",
                    flush=True,
                )
    wall = time.perf_counter() - started
    correct = [r[4] for r in rows if r[1] == "correct" and r[4] is not None]
    faulted = [r[4] for r in rows if r[1] == "fault" and r[4] is not None]
    print(
        f"largest correct ratio {max(correct):.3g}; threshold {FIT_DIVERGENT_RATIO:g}"
    )
    print(f"fault ratios from {min(faulted):.3g}; wall {wall:.0f} s")
    if args.write:
        write(args, rows, wall)


def write(args: argparse.Namespace, rows: list, wall: float) -> None:
    """Append the table of ratios to docs/benchmarks.md."""
    lines = [
        "",
        f"## Fit-trace threshold ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/fit_threshold.py --scenarios {args.scenarios} "
        f"--epochs {args.epochs} --write`, {wall:.0f} s.",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}, "
        f"Python {platform.python_version()}.",
        "",
        f"Ratio after the first epoch against a `{BASELINE}` baseline; "
        f"`FIT_DIVERGENT_RATIO` = {FIT_DIVERGENT_RATIO:g}.",
        "",
        "| scenario | group | configuration | fault | ratio | verdict |",
        "|---|---|---|---|---|---|",
        *(
            f"| {s} | {g} | `{c}` | {f or '-'} | "
            f"{'-' if r is None else f'{r:.3g}'} | {v} |"
            for s, g, c, f, r, v in rows
        ),
        "",
    ]
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    path.write_text(path.read_text() + "\n".join(lines))


if __name__ == "__main__":
    main()
