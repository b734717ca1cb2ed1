"""Benchmark: the time that localization adds to a doctor run, as a ratio.

For each epoch count, one at a time:

`parity doctor --localize` on circles with the fused dense+ReLU fault on
TensorFlow's graph mode and the given configurations. The run records how long
its localization took (``localization_seconds`` in the JSON): the referee's and
the candidate's localization workers, the setting search, the workaround's
segment, the reproducer and the model diagnosis, and with --rerun-workaround the
full rerun of the configuration with the workaround.

It prints the ratio (whole run) / (run without the localization), target at most
1.25 for circles, the part of the localization that the full rerun took, and the
time of each localization worker. With --write it replaces the "Localization"
section of docs/benchmarks.md.

Usage: python benchmarks/localize_overhead.py [--epochs 2,10] [--configs A,B] [--jobs N] [--rerun-workaround] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from parity.doctor import DoctorOptions, run_doctor
from parity.env import cpu_model

FAULTY = "tensorflow:cpu:graph:float32"
DEFAULT_CONFIGS = f"{FAULTY},tensorflow:cpu:eager:float32,jax:cpu:jit:float32"
SECTION = "## Localization"
ABLATION = "### Activation ablation"


def measure(
    epochs: int, configs: list[str], jobs: int, work: Path, rerun_workaround: bool
) -> dict:
    """Run `parity doctor --localize`; return its time, the localization's share, the outcome."""
    options = DoctorOptions(
        scenario="circles",
        configs=configs,
        epochs=epochs,
        faults=[f"fused-dense-relu@{FAULTY}"],
        out=work / f"epochs-{epochs}",
        jobs=jobs,
        localize=True,
        rerun_workaround=rerun_workaround,
    )
    started = time.perf_counter()
    doctor = run_doctor(options)
    total = time.perf_counter() - started
    localize_seconds = doctor.summary["localization_seconds"]
    doctor_seconds = total - localize_seconds

    found = next(iter(doctor.localizations.values()))
    check = found.workaround
    full = check.full if check is not None else None
    workers = {}
    for path in sorted((Path(options.out) / "localize").rglob("result.json")):
        timing = json.loads(path.read_text()).get("timing", {})
        workers[str(path.parent.relative_to(Path(options.out) / "localize"))] = timing
    return {
        "epochs": epochs,
        "steps": doctor.referee.meta["steps"],
        "doctor": doctor_seconds,
        "localize": localize_seconds,
        "ratio": total / doctor_seconds,
        "summary": found.summary,
        "setting": found.setting.summary if found.setting else None,
        "workaround": check.workaround.name if check else None,
        "segment_verdict": check.segment.verdict if check else None,
        "full_rerun_verdict": full.verdict if full else None,
        "full_rerun_excess": full.excess if full else None,
        # Wall seconds of the full rerun's worker, part of "localize".
        "full_rerun": full.seconds if full else 0.0,
        "workers": workers,
    }


def main() -> None:
    """Run the benchmark and print (and optionally write) the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", default="2,10", help="comma-separated epoch counts")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--jobs", type=int, default=1, help="workers run at once")
    parser.add_argument(
        "--rerun-workaround",
        action="store_true",
        help="also rerun the configuration in full with its workaround, as "
        "parity doctor --rerun-workaround does",
    )
    parser.add_argument(
        "--write", action="store_true", help="replace the section in docs/benchmarks.md"
    )
    args = parser.parse_args()
    configs = args.configs.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for epochs in [int(e) for e in args.epochs.split(",")]:
            row = measure(
                epochs, configs, args.jobs, Path(directory), args.rerun_workaround
            )
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
    if args.write:
        write(args, rows)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    """Write the measured rows as the Localization section of docs/benchmarks.md."""
    lines = [
        SECTION,
        "",
        "Command: `python benchmarks/localize_overhead.py "
        f"--epochs {args.epochs} --configs {args.configs} --jobs {args.jobs}"
        + (" --rerun-workaround" if args.rerun_workaround else "")
        + " --write`, "
        f"run on {datetime.date.today().isoformat()}.",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores (shared with other work while "
        f"measured), {platform.platform()}, Python {sys.version.split()[0]}.",
        "",
        "`parity doctor` on circles with `--fault fused-dense-relu@"
        f"{FAULTY}` and configurations `{args.configs}`, then the localization that "
        "`--localize` adds (referee and candidate workers, setting search, workaround "
        "segment, reproducer, model diagnosis, and with --rerun-workaround the full "
        "rerun with the workaround), one run each. The full rerun's column is part "
        "of the localization's:",
        "",
        "| epochs | steps | doctor (s) | localization (s) | of it, full rerun (s) "
        "| full rerun verdict | ratio (target at most 1.25) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        excess = row["full_rerun_excess"]
        verdict = row["full_rerun_verdict"] or "none"
        if excess is not None:
            verdict += f" (excess {excess:.3g})"
        lines.append(
            f"| {row['epochs']} | {row['steps']} | {row['doctor']:.1f} | "
            f"{row['localize']:.1f} | {row['full_rerun']:.1f} | {verdict} | "
            f"{row['ratio']:.2f} |"
        )
    lines += [
        "",
        "Localization workers, and the full rerun's lockstep worker (wall seconds: "
        "import, whole worker):",
        "",
    ]
    lines += ["| epochs | worker | import | total |", "|---|---|---|---|"]
    for row in rows:
        for name, timing in row["workers"].items():
            lines.append(
                f"| {row['epochs']} | {name} | {timing.get('import', 0):.1f} | "
                f"{timing.get('total', 0):.1f} |"
            )
    lines += [
        "",
        "A candidate that shares the referee's backend, device and flags, with "
        "catalogued faults, runs in the referee's localization worker after it (import "
        "0 above), together with its first mode variant, whose lockstep segment tests "
        "the workaround. Other candidates and variants take a worker each, about 5 to "
        "20 s on this machine depending on the load.",
        "",
        "How it grows with the number of steps: localization replays at most one epoch "
        "of the referee, from its last checkpoint before the divergent step, and runs "
        "a workaround segment of at most two epochs; that part does not grow with the "
        "length of the run, while the doctor's grows linearly, so the ratio falls as "
        "runs get longer. The full rerun that --rerun-workaround adds trains every "
        "step of one configuration, so it grows linearly too. Its cost is one more "
        "worker of the workaround's mode, which for eager mode is several times that "
        "of the compiled run.",
        "",
        f"Localization found: {rows[-1]['summary']}.",
        "",
    ]
    replace_section("\n".join(lines))


def replace_section(section: str) -> None:
    """Replace the Localization section of docs/benchmarks.md, or append it."""
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if SECTION in text:
        start = text.index(SECTION)
        # The measured part ends at the next section, or at the ablation record,
        # which a separate command produces and which is kept.
        ends = [
            found
            for found in (
                text.find("\n## ", start + len(SECTION)),
                text.find(f"\n{ABLATION}", start),
            )
            if found >= 0
        ]
        end = min(ends) + 1 if ends else len(text)
        text = text[:start] + section + "\n" + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
