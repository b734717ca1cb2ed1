"""Localization workers: processes of `parity.localize_worker`, run a few at a time.

Each job gets a directory with its spec, stdout and stderr logs, and the
``result.json`` and ``tensors.safetensors`` the worker writes. A worker that fails
or runs past its timeout is recorded as failed with the end of its stderr, and the
other jobs go on.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.io import atomic_write_json

log = logging.getLogger("parity")

# Lines of a failed localization worker's stderr kept in its error message.
STDERR_TAIL_LINES = 8

TENSORS_FILE = "tensors.safetensors"
RESULT_FILE = "result.json"


@dataclasses.dataclass
class Job:
    """A localization worker to run: its spec and its directory."""

    key: str
    spec: dict[str, Any]
    directory: Path


@dataclasses.dataclass
class Outcome:
    """Result of one localization worker: its metadata and tensors, or its error."""

    key: str
    status: str  # ok or failed
    meta: dict[str, Any]
    directory: Path
    error: str | None = None
    seconds: float = 0.0
    _tensors: dict[str, np.ndarray] | None = None

    @property
    def ok(self) -> bool:
        """Whether the worker finished and wrote its result."""
        return self.status == "ok"

    def case(self, name: str) -> Outcome:
        """Return the outcome of one case of a worker that ran several (``cases``)."""
        if not self.ok:
            return Outcome(
                f"{self.key}/{name}", self.status, {}, self.directory, self.error
            )
        prefix = f"case/{name}/"
        tensors = {
            key[len(prefix) :]: value
            for key, value in self.tensors.items()
            if key.startswith(prefix)
        }
        meta = self.meta["cases"][name]
        return Outcome(
            f"{self.key}/{name}",
            "ok",
            meta,
            self.directory,
            None,
            self.seconds,
            tensors,
        )

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        """The worker's tensors, read on first use."""
        if self._tensors is None:
            from safetensors.numpy import load_file

            self._tensors = load_file(str(self.directory / TENSORS_FILE))
        return self._tensors


def run_jobs(jobs: Sequence[Job], parallel: int, timeout: float) -> dict[str, Outcome]:
    """Run localization workers, ``parallel`` at a time; return their outcomes by key.

    A worker that fails or passes ``timeout`` seconds is recorded as failed, with
    the last lines of its stderr, and the others go on.
    """
    pending = list(jobs)
    active: list[tuple[Job, subprocess.Popen[bytes], float]] = []
    outcomes: dict[str, Outcome] = {}
    try:
        while pending or active:
            while pending and len(active) < max(1, parallel):
                job = pending.pop(0)
                active.append((job, _start(job), time.monotonic()))
            time.sleep(0.2)
            for item in list(active):
                job, process, started = item
                elapsed = time.monotonic() - started
                if process.poll() is None and elapsed <= timeout:
                    continue
                active.remove(item)
                if process.poll() is None:
                    _stop(process)
                    error = f"timed out after {timeout:.0f} s (raise --timeout)"
                    log.error("localization worker %s %s", job.key, error)
                    outcomes[job.key] = Outcome(
                        job.key, "failed", {}, job.directory, error, elapsed
                    )
                    continue
                outcomes[job.key] = _collect(job, process.returncode, elapsed)
    finally:
        for _, process, _ in active:
            _stop(process)
    return outcomes


def _start(job: Job) -> subprocess.Popen[bytes]:
    job.directory.mkdir(parents=True, exist_ok=True)
    (job.directory / RESULT_FILE).unlink(missing_ok=True)
    spec = {**job.spec, "out_dir": str(job.directory.resolve())}
    atomic_write_json(job.directory / "spec.json", spec)
    log.info("starting localization worker %s (%s)", job.key, spec["config"])
    with (
        open(job.directory / "stdout.log", "wb") as stdout,
        open(job.directory / "stderr.log", "wb") as stderr,
    ):
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "parity.localize_worker",
                str(job.directory / "spec.json"),
            ],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a worker's process group: SIGTERM, then SIGKILL after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(3.0)
        except subprocess.TimeoutExpired:
            continue


def _collect(job: Job, returncode: int, elapsed: float) -> Outcome:
    try:
        meta = json.loads((job.directory / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    if returncode == 0 and meta.get("status") == "ok":
        log.info("localization worker %s finished in %.1f s", job.key, elapsed)
        return Outcome(job.key, "ok", meta, job.directory, None, elapsed)
    error = meta.get("error") or f"exited with status {returncode}"
    tail = _stderr_tail(job.directory)
    log.error("localization worker %s failed: %s", job.key, error)
    return Outcome(
        job.key, "failed", meta, job.directory, f"{error}\n{tail}".strip(), elapsed
    )


def read_outcome(key: str, directory: Path) -> Outcome:
    """Read the result that a worker wrote into ``directory`` for another job.

    A referee worker writes the results of the candidates that ran in its
    process into their own directories.
    """
    try:
        meta = json.loads((directory / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        message = f"no readable result in {directory}: {error}"
        log.error("localization worker %s failed: %s", key, message)
        return Outcome(key, "failed", {}, directory, message)
    if meta.get("status") != "ok":
        error = str(meta.get("error"))
        log.error("localization worker %s failed: %s", key, error)
        return Outcome(key, "failed", meta, directory, error)
    seconds = float(meta.get("timing", {}).get("total", 0.0))
    return Outcome(key, "ok", meta, directory, None, seconds)


def _stderr_tail(directory: Path) -> str:
    try:
        text = (directory / "stderr.log").read_bytes()[-16384:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])
