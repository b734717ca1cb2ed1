"""Run planned configurations in worker processes and collect their results.

Each run gets a directory of its own with the spec, the resume key, the worker's
stdout and stderr, its progress file and its result files. Workers run in
parallel up to a job count, each in a process group of its own. A worker that
crashes, exits early, hangs past its timeout, grows past the memory limit or
writes an unreadable result is recorded as failed with the reason and the end of
its stderr, and the other runs go on. SIGINT, SIGTERM and SIGHUP stop every
worker; `execute` then raises `Interrupted` with the results so far.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from parity import cache
from parity.cache import CACHED_ROLES
from parity.config import Configuration
from parity.errors import InputError
from parity.io import atomic_write_json
from parity.resume import changed_inputs, key_inputs, key_of, write_key_file
from parity.worker import ARRAYS_FILE, PROGRESS_FILE, RESULT_FILE, RESULT_FORMAT

log = logging.getLogger("parity")

# Lines of a failed worker's stderr kept in its result.
STDERR_TAIL_LINES = 12

# Seconds between checks of the running workers.
POLL_SECONDS = 0.2

# Seconds a worker gets to exit after SIGTERM before it is sent SIGKILL.
STOP_GRACE_SECONDS = 3.0

# A worker's result.json contains metadata only (tens of kilobytes); a larger file is
# rejected before it is parsed.
MAX_RESULT_BYTES = 64 * 2**20

# Default memory limit per worker: this fraction of physical memory, shared among
# the workers that run at once, but at least MIN_DEFAULT_MEMORY_LIMIT. A worker
# of a built-in scenario stays under 1 GiB resident (measured on Linux x86_64 with
# TensorFlow 2.21, JAX 0.10 and PyTorch 2.13 on the CPU).
DEFAULT_MEMORY_FRACTION = 0.75
MIN_DEFAULT_MEMORY_LIMIT = 2 * 2**30

# Seconds between memory checks where they need a `ps` process; on Linux the
# check reads /proc and runs at every poll.
PS_MEMORY_CHECK_SECONDS = 1.0

# Signals that stop a run and keep the results so far.
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP")
    if hasattr(signal, name)
)

_SIZE_UNITS = {
    "": 2**20,
    "k": 2**10,
    "kb": 10**3,
    "kib": 2**10,
    "m": 2**20,
    "mb": 10**6,
    "mib": 2**20,
    "g": 2**30,
    "gb": 10**9,
    "gib": 2**30,
    "t": 2**40,
    "tb": 10**12,
    "tib": 2**40,
}


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
    """The output of one worker, or the reason it produced none."""

    run: PlannedRun
    status: str  # ok, failed or not-run
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    error: str | None = None
    stderr_tail: str = ""
    returncode: int | None = None
    wall_seconds: float = 0.0
    reused: bool = False  # served by --resume or the run store from an earlier run
    cached: bool = False  # served from the run store (parity.cache)
    peak_resident_bytes: int | None = None

    @property
    def ok(self) -> bool:
        """Whether the worker finished and its result was read."""
        return self.status == "ok"


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived while workers ran.

    ``results`` has one entry per planned run: finished runs as they ended, the
    others as not-run. A caller that writes a report from them sets ``outcome``
    to what it wrote before it raises the exception again.
    """

    def __init__(self, signal_number: int, results: list[RunResult]):
        super().__init__(signal_name(signal_number))
        self.signal_number = signal_number
        self.results = results
        self.outcome: Any = None

    @property
    def signal_name(self) -> str:
        """The signal's name, such as SIGINT."""
        return signal_name(self.signal_number)

    @property
    def exit_status(self) -> int:
        """The shell's exit status for a process ended by this signal."""
        return 128 + self.signal_number


@dataclasses.dataclass
class _Active:
    run: PlannedRun
    process: subprocess.Popen[bytes]
    directory: Path
    started: float
    stdout: Any
    stderr: Any
    peak_resident: int = 0


ProgressCallback = Callable[[PlannedRun, int, int, str | None], None]


def signal_name(number: int) -> str:
    """Return a signal's name, such as SIGSEGV, or 'signal N' for an unknown one."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def parse_memory_limit(value: int | str | None) -> int | None:
    """Return a memory limit in bytes from an int of bytes or a size string.

    Strings are a number with an optional unit: ``512M``, ``1.5GiB``, ``2g``, or a
    plain number of MiB. ``none`` turns the limit off (returns None).
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise InputError(
                f"Invalid memory limit {value!r} (Python: memory_limit=): "
                "use a positive number of bytes, a size such as '4GiB', or 'none'."
            )
        return value
    text = str(value).strip().lower().replace(" ", "")
    if text in ("none", "off", "unlimited"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise InputError(
            f"Invalid --memory-limit {value!r} (Python: memory_limit=): write a size "
            "such as 4GiB, 512MiB, 2G or a number of MiB, or 'none' for no limit."
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size < 2**20:
        raise InputError(
            f"Invalid --memory-limit {value!r} (Python: memory_limit=): a worker needs "
            "far more than 1 MiB; write a size such as 4GiB, or 'none' for no limit."
        )
    return size


def default_memory_limit(jobs: int) -> int | None:
    """Return the default memory limit per worker, in bytes, for ``jobs`` workers."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError) as error:
        log.warning(
            "cannot read the size of physical memory (%s), so workers run with no "
            "default memory limit; set one with --memory-limit",
            error,
        )
        return None
    share = int(physical * DEFAULT_MEMORY_FRACTION / max(1, jobs))
    return max(share, min(MIN_DEFAULT_MEMORY_LIMIT, physical))


def format_bytes(size: int) -> str:
    """Return a byte count in MiB or GiB, as in '1.5 GiB'."""
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    return f"{size / 2**20:.0f} MiB"


def prepare_output_directory(
    path: Path, flag: str, argument: str, given: str | os.PathLike[str] | None = None
) -> None:
    """Create the directory ``path`` if needed and check that it is writable.

    ``flag`` and ``argument`` are the CLI flag and the Python argument that named
    it, and ``given`` the value as the user wrote it when that is not ``path``
    itself (a file inside it). Raises InputError when ``path`` is a file or is not
    writable, so that a run does not train for minutes and then fail to write.
    """
    named = (
        f"{flag} {str(given if given is not None else path)!r} (Python: {argument}=)"
    )
    where = "" if given is None else f"{str(path)!r} "
    if path.exists() and not path.is_dir():
        raise InputError(
            f"Invalid {named}: {where or 'it '}is a file, not a directory. "
            + ("Name a directory." if given is None else "Name a file in a directory.")
        )
    probe = path / f".parity-write-check-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(
            f"Cannot write to {named}: {where}{error.strerror or error}. "
            "Choose a writable directory."
        ) from None


# Rough time per training step of each backend and mode relative to TensorFlow's
# graph mode, measured on circles on a 2-core x86_64 CPU (TensorFlow 2.21, JAX 0.10,
# PyTorch 2.13, Keras 3.15). JAX jit and PyTorch eager take about as long, and XLA
# up to twice as long with its recompilations. TensorFlow and JAX eager take seven
# to ten times as long. Only the order matters, because workers start slowest first.
RELATIVE_STEP_COST = {
    ("jax", "jit"): 0.8,
    ("tensorflow", "graph"): 1.0,
    ("torch", "eager"): 1.0,
    ("torch", "compile"): 1.5,
    ("tensorflow", "xla"): 2.0,
    ("tensorflow", "eager"): 7.0,
    ("jax", "eager"): 10.0,
}


def relative_cost(config: Configuration) -> float:
    """Return the rough cost of a configuration's training step (see RELATIVE_STEP_COST)."""
    cost = RELATIVE_STEP_COST.get((config.backend, config.mode), 1.0)
    return cost if config.device == "cpu" else cost / 2


def available_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_threads(jobs: int, runs: int) -> int | None:
    """Return the thread count each of several parallel workers gets, or None.

    Workers that run side by side share the cores: each gets its share, so that
    their thread pools do not oversubscribe the machine. On two cores, PyTorch's
    default pool next to one other worker trained circles five times slower than
    alone. A single worker keeps the backend's default. A configuration's own
    ``threads=`` flag always wins.
    """
    parallel = min(max(1, jobs), runs)
    if parallel <= 1:
        return None
    return max(1, available_cores() // parallel)


def execute(
    runs: list[PlannedRun],
    work_dir: Path,
    common_spec: dict[str, Any],
    *,
    jobs: int,
    timeout: float,
    memory_limit: int | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    cache_dir: Path | None = None,
) -> list[RunResult]:
    """Run every planned run that can run, ``jobs`` at a time, and return all results.

    ``common_spec`` goes to every worker and into every run's resume key, so it
    should identify the data (by digest) as well as the training options. When
    workers run in parallel, each spec also gets the thread count of
    `worker_threads`, unless the run's configuration names one. With
    ``resume``, a run whose directory contains a finished result with the same
    key is not run again. ``memory_limit`` is in bytes of resident memory per
    worker, None for no limit. ``progress(run, step, total, status)`` is called
    as workers advance. Its status is None while a run is going, and the final
    status when it ends. With ``cache_dir``, referee and envelope runs are served
    from that store of earlier results when their key is there, and stored there
    when they finish (`parity.cache`).

    Raises `Interrupted`, after every worker has stopped, when SIGINT, SIGTERM or
    SIGHUP arrives.
    """
    executor = _Executor(jobs, timeout, memory_limit, progress)
    threads = worker_threads(jobs, sum(run.not_run_reason is None for run in runs))
    for run in runs:
        if run.not_run_reason is not None:
            executor.results[run.key] = RunResult(
                run, "not-run", error=run.not_run_reason
            )
            continue
        common = common_spec
        if threads is not None and run.config.threads is None:
            common = {**common_spec, "threads": threads}
        spec, inputs = _make_spec(run, work_dir / run.key, common)
        reused = (
            find_reusable(run, work_dir / run.key, spec, inputs) if resume else None
        )
        if reused is None and cache_dir is not None and run.role in CACHED_ROLES:
            reused = _from_cache(run, work_dir, spec, cache_dir)
        if reused is not None:
            executor.finish(run, reused)
        else:
            executor.pending.append((run, spec, inputs))
    # Longest first: the slowest worker then starts at once instead of last.
    executor.pending.sort(key=lambda item: -relative_cost(item[0].config))

    log.info(
        "running %d workers, %d at a time; timeout %g s, memory limit %s",
        len(executor.pending),
        executor.jobs,
        timeout,
        "none" if memory_limit is None else format_bytes(memory_limit),
    )
    stop = _StopSignals()
    with stop:
        try:
            executor.run_until_done(stop)
        except KeyboardInterrupt:
            stop.request(signal.SIGINT)
        finally:
            _stop_all(executor.active)
    if cache_dir is not None:
        for result in executor.results.values():
            if result.ok and not result.reused and result.run.role in CACHED_ROLES:
                cache.store(
                    cache_dir, result.meta["resume_key"], work_dir / result.run.key
                )
    if stop.received is None:
        return [
            executor.results[run.key] for run in runs if run.key in executor.results
        ]

    raise Interrupted(
        stop.received, _interrupted_results(runs, executor, stop.received)
    )


def _interrupted_results(
    runs: list[PlannedRun], executor: _Executor, signal_number: int
) -> list[RunResult]:
    """Return every run's result after a stop: as it ended, or as not-run."""
    name = signal_name(signal_number)
    for item in executor.active:
        executor.results[item.run.key] = _collect_stopped(item, name)
    return [
        executor.results.get(run.key)
        or RunResult(
            run,
            "not-run",
            error=f"not started: stopped by {name}; run again with --resume",
        )
        for run in runs
    ]


class _Executor:
    """The state of one `execute` call: runs waiting, workers running, results."""

    def __init__(
        self,
        jobs: int,
        timeout: float,
        memory_limit: int | None,
        progress: ProgressCallback | None,
    ):
        self.jobs = max(1, jobs)
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.progress = progress
        # (run, worker spec, resume key inputs) of the runs not started yet
        self.pending: list[tuple[PlannedRun, dict[str, Any], dict[str, Any]]] = []
        self.active: list[_Active] = []
        self.results: dict[str, RunResult] = {}
        self.next_memory_check = 0.0

    def finish(self, run: PlannedRun, result: RunResult) -> None:
        """Record a run's final result and report it to the progress callback."""
        self.results[run.key] = result
        if self.progress:
            self.progress(run, 0, 0, result.status)

    def run_until_done(self, stop: _StopSignals) -> None:
        """Start and poll workers until all have ended or a stop signal arrives."""
        while (self.pending or self.active) and stop.received is None:
            while (
                self.pending and len(self.active) < self.jobs and stop.received is None
            ):
                run, spec, inputs = self.pending.pop(0)
                started = _start(run, spec, inputs)
                if isinstance(started, RunResult):
                    self.finish(run, started)
                else:
                    self.active.append(started)
            time.sleep(POLL_SECONDS)
            resident = self._measure_memory()
            for item in list(self.active):
                if stop.received is not None:
                    return
                finished = self._poll(item, resident.get(item.process.pid))
                if finished is not None:
                    self.active.remove(item)
                    self.finish(item.run, finished)

    def _measure_memory(self) -> dict[int, int]:
        """Return resident bytes per worker process group, at most once per interval."""
        if self.memory_limit is None or not self.active:
            return {}
        now = time.monotonic()
        if now < self.next_memory_check:
            return {}
        linux = sys.platform.startswith("linux")
        self.next_memory_check = now + (
            POLL_SECONDS if linux else PS_MEMORY_CHECK_SECONDS
        )
        return resident_bytes({item.process.pid for item in self.active})

    def _poll(self, item: _Active, resident: int | None) -> RunResult | None:
        """Return the run's result once its worker ended or was stopped, else None."""
        returncode = item.process.poll()
        elapsed = time.monotonic() - item.started
        if returncode is not None:
            _close_streams(item)
            return _collect(item, returncode, elapsed)
        if elapsed > self.timeout:
            reason = (
                f"timed out after {self.timeout:g} s "
                "(raise --timeout, Python: timeout=)"
            )
            return _stop_for(item, reason)
        if resident is not None:
            item.peak_resident = max(item.peak_resident, resident)
            if self.memory_limit is not None and resident > self.memory_limit:
                reason = (
                    f"exceeded the memory limit: {format_bytes(resident)} "
                    "resident, limit "
                    f"{format_bytes(self.memory_limit)} (raise --memory-limit, "
                    "Python: memory_limit=)"
                )
                return _stop_for(item, reason)
        if self.progress:
            step, total = _read_progress(item.directory)
            self.progress(item.run, step, total, None)
        return None


class _StopSignals:
    """Turn SIGINT, SIGTERM and SIGHUP into a stop request while workers run.

    Handlers are installed only in the main thread, where Python delivers signals.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, number: int, frame: object) -> None:
        self.request(number)

    def request(self, number: int) -> None:
        """Record a stop request; a repeated signal only logs, stopping is under way."""
        if self.received is None:
            self.received = number
            log.warning("received %s: stopping all workers", signal_name(number))
        else:
            log.warning(
                "received %s again: workers are already stopping", signal_name(number)
            )


def _make_spec(
    run: PlannedRun, directory: Path, common_spec: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the worker spec of a run, with its resume key, and the key's inputs."""
    spec = {
        **common_spec,
        "config": str(run.config),
        "role": run.role,
        "faults": list(run.faults),
        "perturb_seed": run.perturb_seed,
        "out_dir": str(directory.resolve()),
    }
    inputs = key_inputs(spec)
    spec["resume_key"] = key_of(inputs)
    return spec, inputs


def find_reusable(
    run: PlannedRun,
    directory: Path,
    spec: dict[str, Any],
    inputs: dict[str, Any] | None = None,
) -> RunResult | None:
    """Return the finished result stored in ``directory`` if its key equals the spec's.

    Returns None, and logs why, when the result is missing, failed, unreadable or
    was computed from other inputs. ``inputs`` are the key's inputs, used to name
    the inputs that changed.
    """
    if not (directory / RESULT_FILE).exists():
        log.info("resume: %s has no result yet; running it", run.label)
        return None
    try:
        meta, arrays = read_result(run, directory)
    except ValueError as error:
        log.info(
            "resume: running %s again: its earlier result is unusable: %s",
            run.label,
            error,
        )
        return None
    if meta.get("resume_key") != spec["resume_key"]:
        changed = changed_inputs(directory, inputs or key_inputs(spec))
        log.info(
            "resume: running %s again: its inputs changed (%s)",
            run.label,
            ", ".join(changed) or "no stored key matches",
        )
        return None
    log.info("resume: reusing the result of %s from %s", run.label, directory)
    timing = meta.get("timing")
    total = timing.get("total") if isinstance(timing, dict) else None
    wall = float(total) if isinstance(total, (int, float)) else 0.0
    return RunResult(
        run, "ok", meta, arrays, returncode=0, wall_seconds=wall, reused=True
    )


def _from_cache(
    run: PlannedRun, work_dir: Path, spec: dict[str, Any], cache_dir: Path
) -> RunResult | None:
    """Copy a stored run with the spec's key into the run directory and reuse it."""
    directory = work_dir / run.key
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not cache.fetch(cache_dir, spec["resume_key"], directory):
        return None
    reused = find_reusable(run, directory, spec)
    if reused is None:
        log.info("the stored run of %s is unusable; running it", run.label)
        return None
    log.info("%s: reusing the stored run from %s", run.label, cache_dir)
    return dataclasses.replace(reused, cached=True)


def _start(
    run: PlannedRun, spec: dict[str, Any], inputs: dict[str, Any]
) -> _Active | RunResult:
    """Start a worker; return a failed result when it cannot be started."""
    directory = Path(spec["out_dir"])
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in (RESULT_FILE, ARRAYS_FILE, PROGRESS_FILE):
            (directory / name).unlink(missing_ok=True)
        write_key_file(directory, spec["resume_key"], inputs)
        atomic_write_json(directory / "spec.json", spec)
        stdout = open(directory / "stdout.log", "wb")
        stderr = open(directory / "stderr.log", "wb")
    except OSError as error:
        log.error(
            "%s could not be started: cannot write %s: %s", run.label, directory, error
        )
        return RunResult(
            run, "failed", error=f"cannot write the run directory {directory}: {error}"
        )
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log.info("starting %s as %s in %s", run.label, run.role, directory)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "parity.worker", str(directory / "spec.json")],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except OSError as error:
        stdout.close()
        stderr.close()
        log.error("%s could not be started: %s", run.label, error)
        return RunResult(
            run, "failed", error=f"the worker process could not be started: {error}"
        )
    return _Active(run, process, directory, time.monotonic(), stdout, stderr)


def _stop_for(item: _Active, reason: str) -> RunResult:
    """Stop a worker that broke a limit; keep its result if it had written one."""
    _stop_all([item])
    elapsed = time.monotonic() - item.started
    result = _read_finished(item, elapsed)
    if isinstance(result, RunResult):
        log.warning(
            "%s wrote its result but did not exit; stopped it: %s",
            item.run.label,
            reason,
        )
        return result
    log.error("%s failed: %s", item.run.label, reason)
    return _failed(item, reason, item.process.returncode, elapsed)


def resident_bytes(process_groups: set[int]) -> dict[int, int]:
    """Return the resident memory of each process group: the sum over its processes.

    Groups that cannot be measured are left out. Pages shared between processes of
    a group are counted once per process, so a sum can overstate the total.
    """
    if os.path.isdir("/proc/self"):
        return _proc_resident_bytes(process_groups)
    return _ps_resident_bytes(process_groups)


def _proc_resident_bytes(process_groups: set[int]) -> dict[int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    totals: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stream:
                text = stream.read().decode("ascii", errors="replace")
        except OSError:
            continue  # the process ended since the listing
        # The command name in brackets may contain spaces; fields follow the last ')'.
        # After it come state, ppid, pgrp, ..., and rss in pages as the 22nd.
        fields = text.rpartition(")")[2].split()
        if len(fields) > 21 and fields[2].isdigit() and fields[21].isdigit():
            group = int(fields[2])
            if group in process_groups:
                totals[group] = totals.get(group, 0) + int(fields[21]) * page
    return totals


def _ps_resident_bytes(process_groups: set[int]) -> dict[int, int]:
    try:
        listing = subprocess.run(
            ["ps", "-A", "-o", "pgid=", "-o", "rss="],
            capture_output=True,
            timeout=10,
            check=True,
        ).stdout.decode("ascii", errors="replace")
    except (OSError, subprocess.SubprocessError) as error:
        log.warning(
            "cannot measure resident memory with ps, so the memory limit "
            "is not checked: %s",
            error,
        )
        return {}
    totals: dict[int, int] = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            group = int(parts[0])
            if group in process_groups:
                totals[group] = totals.get(group, 0) + int(parts[1]) * 1024
    return totals


def _stop_all(items: Iterable[_Active]) -> None:
    """Stop workers and their process groups: SIGTERM, then SIGKILL after a grace."""
    items = list(items)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [item for item in items if item.process.poll() is None]
        for item in alive:
            try:
                os.killpg(item.process.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for item in alive:
            try:
                item.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
    for item in items:
        _close_streams(item)
        if item.process.poll() is None:
            log.error(
                "%s (pid %d) did not exit after SIGKILL",
                item.run.label,
                item.process.pid,
            )


def _close_streams(item: _Active) -> None:
    for stream in (item.stdout, item.stderr):
        if not stream.closed:
            stream.close()


def _read_progress(directory: Path) -> tuple[int, int]:
    try:
        data = json.loads((directory / PROGRESS_FILE).read_text(encoding="utf-8"))
        return int(data["step"]), int(data["total"])
    except FileNotFoundError:
        return 0, 0
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.debug("unreadable progress file in %s: %s", directory, error)
        return 0, 0


def _stderr_tail(directory: Path) -> str:
    try:
        with open(directory / "stderr.log", "rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 65536))
            data = stream.read()
    except OSError as error:
        log.warning("cannot read the stderr of the worker in %s: %s", directory, error)
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-STDERR_TAIL_LINES:])


def describe_exit(returncode: int) -> str:
    """Describe a worker's exit status or the signal that ended it."""
    if returncode < 0:
        name = signal_name(-returncode)
        if -returncode == signal.SIGKILL:
            return (
                f"killed by {name} "
                "(the kernel's out-of-memory killer sends it, among others)"
            )
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
        peak_resident_bytes=item.peak_resident or None,
    )


def read_result(
    run: PlannedRun, directory: Path
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and check a finished worker's metadata and arrays.

    Raises ValueError saying what is wrong when the worker reported a failure or
    its files are missing, corrupt or belong to another configuration.
    """
    meta = load_result_meta(directory)
    if meta.get("status") != "ok":
        raise ValueError(str(meta.get("error") or "the worker reported a failure"))
    check_result_meta(meta, run, directory)
    arrays = load_result_arrays(directory)
    check_result_arrays(arrays, meta, directory)
    return meta, arrays


def _read_finished(item: _Active, elapsed: float) -> RunResult | str:
    """Return the run's result if the worker wrote a valid one, else the reason."""
    try:
        meta, arrays = read_result(item.run, item.directory)
    except ValueError as error:
        return str(error)
    return RunResult(
        item.run,
        "ok",
        meta,
        arrays,
        returncode=item.process.returncode,
        wall_seconds=elapsed,
        peak_resident_bytes=item.peak_resident or None,
    )


def _collect(item: _Active, returncode: int, elapsed: float) -> RunResult:
    """Turn an ended worker's files into its result; any problem makes it failed."""
    result = _read_finished(item, elapsed)
    if isinstance(result, RunResult):
        if returncode != 0:
            log.warning(
                "%s %s after writing a complete result; keeping the result",
                item.run.label,
                describe_exit(returncode),
            )
        log.info("%s finished in %.1f s", item.run.label, elapsed)
        return result
    if not (item.directory / RESULT_FILE).exists():
        # Crashes (signals, os._exit) leave no result: the exit status is the reason.
        reason = f"{describe_exit(returncode)} without writing a result"
    else:
        reason = result
    exit_text = describe_exit(returncode)
    message = reason if exit_text in reason else f"{reason} ({exit_text})"
    log.error("%s failed: %s", item.run.label, message)
    return _failed(item, reason, returncode, elapsed)


def _collect_stopped(item: _Active, signal_text: str) -> RunResult:
    """Return the result of a worker stopped by an interruption."""
    elapsed = time.monotonic() - item.started
    result = _read_finished(item, elapsed)
    if isinstance(result, RunResult):
        log.info("%s finished just before the stop; keeping its result", item.run.label)
        return result
    log.warning("%s stopped by %s after %.1f s", item.run.label, signal_text, elapsed)
    return RunResult(
        item.run,
        "not-run",
        error=f"stopped by {signal_text} before it finished; run again with --resume",
        stderr_tail=_stderr_tail(item.directory),
        returncode=item.process.returncode,
        wall_seconds=elapsed,
        peak_resident_bytes=item.peak_resident or None,
    )


def load_result_meta(directory: Path) -> dict[str, Any]:
    """Read a worker's result.json and check its format.

    Raises ValueError when the file is missing, too large, not JSON or not a result.
    """
    path = directory / RESULT_FILE
    try:
        size = path.stat().st_size
        if size > MAX_RESULT_BYTES:
            raise ValueError(
                f"invalid result file {path}: {size} bytes, more than the "
                f"{MAX_RESULT_BYTES} that a worker writes"
            )
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no result file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"invalid result file {path}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != RESULT_FORMAT:
        raise ValueError(f"invalid result file {path}: not a parity worker result")
    if meta.get("status") not in ("ok", "failed"):
        raise ValueError(f"invalid result file {path}: status {meta.get('status')!r}")
    if meta["status"] == "ok":
        _check_fields(meta, path)
    return meta


def _check_fields(meta: dict[str, Any], path: Path) -> None:
    required = {
        "config": (str,),
        "steps": (int,),
        "steps_per_epoch": (int,),
        "final_loss": (float, int, type(None)),
        "final_accuracy": (float, int, type(None)),
        "environment": (dict,),
    }
    for key, kinds in required.items():
        value = meta.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(
                f"invalid result file {path}: field {key!r} is missing or has "
                "the wrong type"
            )
    if meta["steps"] < 0 or meta["steps_per_epoch"] < 1:
        raise ValueError(
            f"invalid result file {path}: steps {meta['steps']} and steps_per_epoch "
            f"{meta['steps_per_epoch']} are out of range"
        )


def check_result_meta(meta: dict[str, Any], run: PlannedRun, directory: Path) -> None:
    """Check that a finished result belongs to ``run``; raise ValueError if not."""
    if meta.get("config") != str(run.config):
        raise ValueError(
            f"invalid result file {directory / RESULT_FILE}: it is for "
            f"{meta.get('config')!r}, not {str(run.config)!r}"
        )


# Arrays every finished worker writes, with their number of dimensions and the
# number of rows as an offset from the step count (None: any).
_REQUIRED_ARRAYS = {
    "steps/loss": (1, 0),
    "steps/accuracy": (1, 0),
    "steps/norms": (2, 1),
    "steps/digest": (2, 1),
    "predictions/data": (None, None),
}


def check_result_arrays(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], directory: Path
) -> None:
    """Check that the arrays that verdicts and reports read exist and fit the steps."""
    path = directory / ARRAYS_FILE
    steps = meta["steps"]
    for name, (ndim, extra_rows) in _REQUIRED_ARRAYS.items():
        array = arrays.get(name)
        if array is None:
            raise ValueError(f"invalid arrays file {path}: {name!r} is missing")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"invalid arrays file {path}: {name!r} has dtype {array.dtype}"
            )
        if ndim is not None and array.ndim != ndim:
            raise ValueError(
                f"invalid arrays file {path}: {name!r} has shape {array.shape}"
            )
        if extra_rows is not None and array.shape[0] != steps + extra_rows:
            raise ValueError(
                f"invalid arrays file {path}: {name!r} has {array.shape[0]} rows for "
                f"{steps} steps"
            )


def load_result_arrays(directory: Path) -> dict[str, np.ndarray]:
    """Read a worker's arrays; raise ValueError when the file is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = directory / ARRAYS_FILE
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"invalid arrays file {path}: {error}") from None
