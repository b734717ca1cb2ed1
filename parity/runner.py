"""Run planned configurations in worker processes and collect their results.

Each run gets a directory of its own with the spec, the worker's stdout and stderr,
its progress file and its result files. Workers run in parallel up to a job count.
A worker that crashes, hangs past its timeout or writes an unreadable result is
recorded as failed, and the other runs go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from parity.config import Configuration
from parity.io import atomic_write_json
from parity.worker import ARRAYS_FILE, PROGRESS_FILE, RESULT_FILE, RESULT_FORMAT

log = logging.getLogger("parity")

# Lines of a failed worker's stderr kept in its result.
STDERR_TAIL_LINES = 12

# Seconds between checks of the running workers.
POLL_SECONDS = 0.2


@dataclasses.dataclass
class PlannedRun:
    """One worker to start: a configuration, its role, and what to change in it."""

    key: str
    config: Configuration
    role: str = "candidate"  # candidate, referee or envelope
    faults: tuple[str, ...] = ()
    perturb_seed: int | None = None
    not_run_reason: str | None = None

    @property
    def label(self) -> str:
        """The configuration string, with the perturbation of envelope runs."""
        text = str(self.config)
        if self.perturb_seed is not None:
            text += f" (+1 ulp, seed {self.perturb_seed})"
        return text


@dataclasses.dataclass
class RunResult:
    """What one worker produced, or why it produced nothing."""

    run: PlannedRun
    status: str  # ok, failed or not-run
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    error: str | None = None
    stderr_tail: str = ""
    returncode: int | None = None
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the worker finished and its result was read."""
        return self.status == "ok"


@dataclasses.dataclass
class _Active:
    run: PlannedRun
    process: subprocess.Popen[bytes]
    directory: Path
    started: float
    stdout: Any
    stderr: Any


ProgressCallback = Callable[[PlannedRun, int, int, str | None], None]


def execute(
    runs: list[PlannedRun],
    work_dir: Path,
    common_spec: dict[str, Any],
    *,
    jobs: int,
    timeout: float,
    progress: ProgressCallback | None = None,
) -> list[RunResult]:
    """Run every planned run that can run, ``jobs`` at a time, and return all results.

    ``progress(run, step, total, status)`` is called as workers advance; status is
    None while a run is going and its final status when it ends.
    """
    results: dict[str, RunResult] = {}
    pending = []
    for run in runs:
        if run.not_run_reason is not None:
            results[run.key] = RunResult(run, "not-run", error=run.not_run_reason)
        else:
            pending.append(run)
    active: list[_Active] = []
    try:
        while pending or active:
            while pending and len(active) < max(1, jobs):
                active.append(_start(pending.pop(0), work_dir, common_spec))
            time.sleep(POLL_SECONDS)
            for item in list(active):
                finished = _poll(item, timeout, progress)
                if finished is not None:
                    active.remove(item)
                    results[item.run.key] = finished
                    if progress:
                        progress(item.run, 0, 0, finished.status)
    finally:
        for item in active:
            _stop(item)
    return [results[run.key] for run in runs if run.key in results]


def _start(run: PlannedRun, work_dir: Path, common_spec: dict[str, Any]) -> _Active:
    directory = work_dir / run.key
    directory.mkdir(parents=True, exist_ok=True)
    for name in (RESULT_FILE, ARRAYS_FILE, PROGRESS_FILE):
        (directory / name).unlink(missing_ok=True)
    spec = {
        **common_spec,
        "config": str(run.config),
        "role": run.role,
        "faults": list(run.faults),
        "perturb_seed": run.perturb_seed,
        "out_dir": str(directory),
    }
    atomic_write_json(directory / "spec.json", spec)
    stdout = open(directory / "stdout.log", "wb")
    stderr = open(directory / "stderr.log", "wb")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log.info("starting %s as %s", run.label, run.role)
    process = subprocess.Popen(
        [sys.executable, "-m", "parity.worker", str(directory / "spec.json")],
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    return _Active(run, process, directory, time.monotonic(), stdout, stderr)


def _poll(
    item: _Active, timeout: float, progress: ProgressCallback | None
) -> RunResult | None:
    returncode = item.process.poll()
    elapsed = time.monotonic() - item.started
    if returncode is None:
        if elapsed > timeout:
            _stop(item)
            log.error("%s timed out after %.0f s", item.run.label, timeout)
            return _failed(
                item,
                f"timed out after {timeout:.0f} s (raise --timeout)",
                None,
                elapsed,
            )
        if progress:
            step, total = _read_progress(item.directory)
            progress(item.run, step, total, None)
        return None
    item.stdout.close()
    item.stderr.close()
    return _collect(item, returncode, elapsed)


def _stop(item: _Active) -> None:
    """Stop a worker and its children: SIGTERM, then SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        if item.process.poll() is not None:
            break
        try:
            os.killpg(item.process.pid, sig)
        except ProcessLookupError:
            break
        try:
            item.process.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    for stream in (item.stdout, item.stderr):
        if not stream.closed:
            stream.close()


def _read_progress(directory: Path) -> tuple[int, int]:
    try:
        data = json.loads((directory / PROGRESS_FILE).read_text(encoding="utf-8"))
        return int(data["step"]), int(data["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


def _stderr_tail(directory: Path) -> str:
    try:
        data = (directory / "stderr.log").read_bytes()[-65536:]
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-STDERR_TAIL_LINES:])


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


def _failed(
    item: _Active, error: str, returncode: int | None, elapsed: float
) -> RunResult:
    return RunResult(
        item.run,
        "failed",
        error=error,
        stderr_tail=_stderr_tail(item.directory),
        returncode=returncode,
        wall_seconds=elapsed,
    )


def _collect(item: _Active, returncode: int, elapsed: float) -> RunResult:
    try:
        meta = load_result_meta(item.directory)
    except ValueError as error:
        reason = _describe_exit(returncode) if returncode else str(error)
        log.error("%s failed: %s", item.run.label, reason)
        return _failed(item, reason, returncode, elapsed)
    if meta.get("status") != "ok":
        error = str(meta.get("error") or _describe_exit(returncode))
        log.error("%s failed: %s", item.run.label, error)
        return _failed(item, error, returncode, elapsed)
    try:
        arrays = load_result_arrays(item.directory)
    except ValueError as error:
        log.error("%s wrote unreadable arrays: %s", item.run.label, error)
        return _failed(item, str(error), returncode, elapsed)
    log.info("%s finished in %.1f s", item.run.label, elapsed)
    return RunResult(
        item.run, "ok", meta, arrays, returncode=returncode, wall_seconds=elapsed
    )


def load_result_meta(directory: Path) -> dict[str, Any]:
    """Read and check a worker's result.json; raise ValueError when it is unusable."""
    path = directory / RESULT_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no result file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"invalid result file {path}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != RESULT_FORMAT:
        raise ValueError(f"invalid result file {path}: not a parity worker result")
    if meta.get("status") == "ok":
        required = {
            "config": str,
            "steps": int,
            "final_loss": (float, type(None)),
            "environment": dict,
        }
        for key, kind in required.items():
            if not isinstance(meta.get(key), kind):
                raise ValueError(
                    f"invalid result file {path}: field {key!r} is missing or has the wrong type"
                )
    return meta


def load_result_arrays(directory: Path) -> dict[str, np.ndarray]:
    """Read a worker's arrays; raise ValueError when the file is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = directory / ARRAYS_FILE
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as error:
        raise ValueError(f"invalid arrays file {path}: {error}") from None
