"""Benchmark: the size and cost of trace files, and the speed of comparing them.

Three measurements, one at a time, in one invocation:

1. Bytes per recorded step: the size of the trace that ``parity record`` writes
   for one configuration, divided by the training steps. It is split into the
   per-step records and the rest (checkpoints every epoch, predictions, the batch
   schedule, the header).
2. Recording overhead: the wall time of ``parity record`` (worker run, then the
   trace written) over the wall time of the same unrecorded lockstep run (the
   worker run alone, as ``parity doctor`` starts it). Target at most 1.1. The
   two alternate which goes first, and the medians are compared. The part that
   gathers and writes the trace is also timed on its own, because the wall
   times vary by seconds with the machine's load.
3. Comparison throughput: two traces with large checkpoints (several float32
   tensors) are compared the way ``parity compare`` compares checkpoints,
   streaming both files slice by slice (`parity.record.streamed_distance`),
   against plain numpy computing the same distance on the same arrays already
   in memory. Target: at least half of numpy's speed, with the peak memory of
   the streamed comparison bounded by a few slices rather than the file size.
   The trace files are read from the page cache, since they were just written.

Usage: python benchmarks/trace_io.py [--config C] [--epochs N] [--repeats R]
       [--checkpoint-mib M] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from parity.config import parse_config
from parity.env import cpu_model
from parity.record import (
    CHUNK_ELEMENTS,
    RecordOptions,
    TensorSource,
    plan_record,
    record_run,
    streamed_distance,
    trace_contents,
)
from parity.runner import PlannedRun, default_memory_limit, execute
from parity.scenarios import get_scenario
from parity.trace import read_trace, write_trace

# Tensors per synthetic checkpoint; each gets an equal share of --checkpoint-mib.
CHECKPOINT_TENSORS = 4


def unrecorded_seconds(config: str, epochs: int, work: Path) -> float:
    """Time one lockstep run in a worker, as the doctor runs it, without a trace."""
    run = PlannedRun("unrecorded", parse_config(config))
    common = {"scenario": "circles", "epochs": epochs, "batch_size": 32, "seed": 0}
    started = time.perf_counter()
    (result,) = execute(
        [run],
        work,
        common,
        jobs=1,
        timeout=3600,
        memory_limit=default_memory_limit(1),
    )
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"{config} failed: {result.error}\n{result.stderr_tail}")
    return elapsed


def recorded_seconds(config: str, epochs: int, path: Path) -> tuple[float, float]:
    """Time ``parity record`` of the same run, and the part that writes the trace.

    The writing is timed again on its own (contents gathered, file written), since
    it is a small part of a wall time that varies with the machine's load.
    """
    options = RecordOptions(str(path), config, epochs=epochs, jobs=1)
    started = time.perf_counter()
    result = record_run(options)
    elapsed = time.perf_counter() - started
    if not result.candidate.ok:
        raise RuntimeError(f"{config} failed: {result.candidate.error}")

    started = time.perf_counter()
    _, common, scenario = plan_record(options)
    meta, tensors = trace_contents(scenario, common, result.results)
    write_trace(path, meta, tensors)
    return elapsed, time.perf_counter() - started


def trace_sizes(path: Path) -> dict[str, int]:
    """Return the trace's size in bytes, split into per-step records and the rest."""
    with read_trace(path) as trace:
        steps = trace.meta["runs"][0]["result"]["steps"]
        per_step = sum(
            trace.tensor_info(name).nbytes
            for name in trace.tensor_names()
            if "/steps/" in name
        )
    return {"total": path.stat().st_size, "steps": steps, "per_step_records": per_step}


def write_checkpoint_traces(directory: Path, mebibytes: int) -> tuple[Path, Path]:
    """Write two traces whose checkpoints differ by round-off-sized noise."""
    elements = mebibytes * 2**20 // 4 // CHECKPOINT_TENSORS
    rng = np.random.default_rng(0)
    first, second = {}, {}
    for index in range(CHECKPOINT_TENSORS):
        values = rng.standard_normal((elements // 1024, 1024)).astype(np.float32)
        first[f"checkpoint/{index}"] = values
        noise = rng.standard_normal(values.shape).astype(np.float32) * 1e-7
        second[f"checkpoint/{index}"] = values + noise * values
        del values, noise
    paths = directory / "a.parity", directory / "b.parity"
    write_trace(paths[0], {"benchmark": "checkpoints"}, first)
    write_trace(paths[1], {"benchmark": "checkpoints"}, second)
    return paths


def streamed_comparison(paths: tuple[Path, Path]) -> tuple[float, float]:
    """Return the distance from streaming both traces, and the seconds it took."""
    with read_trace(paths[0]) as first, read_trace(paths[1]) as second:
        names = first.tensor_names()
        pairs = [(TensorSource(second), n, TensorSource(first), n) for n in names]
        started = time.perf_counter()
        difference, scale = streamed_distance(pairs)
        elapsed = time.perf_counter() - started
    return difference / scale, elapsed


def streamed_peak_bytes(paths: tuple[Path, Path]) -> int:
    """Return the peak of memory allocated while streaming, traced by tracemalloc."""
    with read_trace(paths[0]) as first, read_trace(paths[1]) as second:
        names = first.tensor_names()
        pairs = [(TensorSource(second), n, TensorSource(first), n) for n in names]
        tracemalloc.start()
        streamed_distance(pairs)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def numpy_comparison(paths: tuple[Path, Path]) -> tuple[float, float]:
    """Return the same distance from whole arrays in memory, and the compute seconds.

    The baseline is the faster of ``np.linalg.norm`` and an einsum sum of squares.
    """
    with read_trace(paths[0]) as first, read_trace(paths[1]) as second:
        names = first.tensor_names()
        a = [second.tensor(name) for name in names]
        b = [first.tensor(name) for name in names]
    timings = []
    # Two ways to write it in plain numpy; the faster one is the baseline.
    for norm in (np.linalg.norm, lambda x: np.sqrt(np.einsum("i,i->", x, x))):
        started = time.perf_counter()
        difference_squared = 0.0
        reference_squared = 0.0
        for candidate, reference in zip(a, b, strict=True):
            reference64 = reference.astype(np.float64).ravel()
            difference = candidate.ravel() - reference64
            difference_squared += float(norm(difference)) ** 2
            reference_squared += float(norm(reference64)) ** 2
        timings.append(time.perf_counter() - started)
    return float(np.sqrt(difference_squared / reference_squared)), min(timings)


def measure_recording(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Run measurements 1 and 2: trace size and recording overhead."""
    plain, recorded, writing = [], [], []
    path = work / "recorded.parity"
    # Warm-up: the first record_run in a process imports scikit-learn for the
    # default timeout, a one-time cost that parity doctor pays as well.
    get_scenario("circles").data()
    for repeat in range(args.repeats):
        # Alternate which run goes first, so that a trend in the machine's load
        # does not favour one of them.
        if repeat % 2:
            seconds, write_seconds = recorded_seconds(args.config, args.epochs, path)
            plain.append(unrecorded_seconds(args.config, args.epochs, work / "runs"))
        else:
            plain.append(unrecorded_seconds(args.config, args.epochs, work / "runs"))
            seconds, write_seconds = recorded_seconds(args.config, args.epochs, path)
        recorded.append(seconds)
        writing.append(write_seconds)
        print(
            f"repeat {repeat + 1}: unrecorded {plain[-1]:.2f} s, recorded "
            f"{recorded[-1]:.2f} s, of which writing the trace {writing[-1]:.3f} s",
            flush=True,
        )
    sizes = trace_sizes(path)
    return {
        "unrecorded": statistics.median(plain),
        "recorded": statistics.median(recorded),
        "writing": statistics.median(writing),
        "slowest": max(plain + recorded),
        "fastest": min(plain + recorded),
        **sizes,
    }


def measure_comparison(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Run measurement 3: streamed comparison against numpy."""
    paths = write_checkpoint_traces(work, args.checkpoint_mib)
    compared_bytes = 2 * args.checkpoint_mib * 2**20
    streamed_times, numpy_times = [], []
    for _ in range(args.repeats):
        streamed_distance_value, seconds = streamed_comparison(paths)
        streamed_times.append(seconds)
        numpy_distance_value, seconds = numpy_comparison(paths)
        numpy_times.append(seconds)
    if not np.isclose(streamed_distance_value, numpy_distance_value, rtol=1e-9):
        raise RuntimeError(
            f"streamed distance {streamed_distance_value} differs from numpy's "
            f"{numpy_distance_value}"
        )
    streamed = statistics.median(streamed_times)
    plain = statistics.median(numpy_times)
    return {
        "streamed_gbps": compared_bytes / streamed / 1e9,
        "numpy_gbps": compared_bytes / plain / 1e9,
        "speed_ratio": plain / streamed,
        "peak_mib": streamed_peak_bytes(paths) / 2**20,
        "chunk_mib": CHUNK_ELEMENTS * 4 / 2**20,
    }


def markdown(args: argparse.Namespace, recording: dict, comparison: dict) -> str:
    """Return the "Traces" section of docs/benchmarks.md."""
    steps = recording["steps"]
    ratio = recording["recorded"] / recording["unrecorded"]
    command = (
        f"python benchmarks/trace_io.py --config {args.config} --epochs {args.epochs} "
        f"--repeats {args.repeats} --checkpoint-mib {args.checkpoint_mib} --write"
    )
    return "\n".join(
        [
            "## Traces",
            "",
            f"Command: `{command}`, run on {time.strftime('%Y-%m-%d')}.",
            f"Machine: {cpu_model()}, {os.cpu_count()} cores (shared with other "
            f"work while measured), {platform.platform()}, Python "
            f"{platform.python_version()}.",
            "",
            f"Recording `{args.config}` on circles, {args.epochs} epochs "
            f"({steps} steps), medians of {args.repeats} runs:",
            "",
            "| measurement | value |",
            "|---|---|",
            f"| trace size | {recording['total']:,} bytes |",
            f"| bytes per recorded step, whole trace | {recording['total'] / steps:,.0f} |",
            "| bytes per recorded step, per-step records only (loss, accuracy, "
            f"norms, parameter digest) | {recording['per_step_records'] / steps:,.0f} |",
            f"| unrecorded lockstep run (worker process, wall) | {recording['unrecorded']:.2f} s |",
            f"| `parity record` of the same run (wall) | {recording['recorded']:.2f} s |",
            f"| recording overhead ratio (target at most 1.1) | {ratio:.3f} |",
            f"| of which gathering and writing the trace | {recording['writing']:.3f} s "
            f"(ratio from it: {1 + recording['writing'] / recording['unrecorded']:.3f}) |",
            "",
            f"Single runs took {recording['fastest']:.1f} to {recording['slowest']:.1f} s "
            "of wall time on this shared machine, so the ratio of wall times is "
            "within noise. Recording adds the gathering and writing of the trace "
            "after the worker ends, and the ratio in the last row is computed from "
            "that time. Once per process, parity record (like parity doctor) also "
            "imports scikit-learn for its default timeout (5.7 s, measured once "
            "under load on this machine); the benchmark imports it before timing.",
            "",
            f"Comparing two traces of {args.checkpoint_mib} MiB of float32 checkpoints "
            f"each ({CHECKPOINT_TENSORS} tensors), relative L2 distance in float64, "
            f"medians of {args.repeats} runs, files in the page cache:",
            "",
            "| measurement | value |",
            "|---|---|",
            f"| streamed from both traces (`streamed_distance`) | {comparison['streamed_gbps']:.2f} GB/s |",
            f"| plain numpy on the same arrays in memory | {comparison['numpy_gbps']:.2f} GB/s |",
            f"| speed relative to numpy (target at least 0.5) | {comparison['speed_ratio']:.2f} |",
            f"| peak memory allocated while streaming (tracemalloc) | {comparison['peak_mib']:.0f} MiB, "
            f"for slices of {comparison['chunk_mib']:.0f} MiB and "
            f"{2 * args.checkpoint_mib} MiB of traces |",
            "",
            "Throughput counts the bytes of both traces' tensors. The numpy "
            "baseline excludes reading the files; the streamed comparison includes "
            "reading them and checking their CRC-32.",
            "",
        ]
    )


def write_section(text: str) -> None:
    """Replace the "Traces" section of docs/benchmarks.md, or append it."""
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    start = existing.find("\n## Traces\n")
    if start < 0:
        path.write_text(existing.rstrip("\n") + "\n\n" + text)
        return
    end = existing.find("\n## ", start + 1)
    before = existing[: start + 1]
    after = existing[end + 1 :] if end >= 0 else ""
    path.write_text(before + text + ("\n" + after if after else ""))


def main() -> None:
    """Run the benchmark and print (and optionally write) the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tensorflow:cpu:graph:float32")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--checkpoint-mib",
        type=int,
        default=256,
        help="size of each synthetic trace's checkpoints in MiB",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="write the Traces section of docs/benchmarks.md",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        recording = measure_recording(args, Path(work))
        comparison = measure_comparison(args, Path(work))
    text = markdown(args, recording, comparison)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
