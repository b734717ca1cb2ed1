"""Crashing, hanging and interrupted workers, resume keys and defensive result parsing.

The end-to-end tests run `parity doctor` in subprocesses on JAX, the quickest
backend to start, with the float64 referee on JAX too. User faults are written
to a temporary file and named as ``file.py:function@CONFIG``. The clean run
serves three purposes: the uninterrupted verdicts that a resumed run must
reproduce, the verdict that faulty neighbours must not change, and the referee
and envelope results that the fault run reuses through ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from parity.config import parse_config
from parity.env import installed_backends
from parity.io import atomic_write_json, atomic_write_tensors
from parity.resume import key_inputs, key_of
from parity.runner import (
    PlannedRun,
    check_result_arrays,
    find_reusable,
    load_result_arrays,
    load_result_meta,
    parse_memory_limit,
    resident_bytes,
)

INSTALLED = installed_backends()
needs_jax = pytest.mark.skipif("jax" not in INSTALLED, reason="needs jax")
needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to find processes"
)

CLEAN = "jax:cpu:jit:float32"
SECOND = "jax:cpu:jit:float32:threads=1"
INTERRUPT_CONFIGS = [CLEAN, SECOND]
COMMON_ARGS = ["--epochs", "1", "--referee", "jax:cpu:jit:float64"]

# (configuration, fault function, text the failure reason must contain)
FAULTED = [
    ("jax:cpu:eager:float32", "hang", "timed out after 45 s"),
    ("jax:cpu:jit:float16", "abort", "killed by SIGABRT"),
    ("jax:cpu:jit:bfloat16", "segfault", "killed by SIGSEGV"),
    ("jax:cpu:jit:mixed_float16", "allocate", "exceeded the memory limit"),
    (
        "jax:cpu:jit:mixed_bfloat16",
        "raise_error",
        "RuntimeError: emulated kernel failure",
    ),
    ("jax:cpu:eager:float16", "garbage_exit", "exited with status 3"),
    ("jax:cpu:eager:bfloat16", "invalid_result", "invalid result file"),
]

USER_FAULTS = textwrap.dedent(
    """
    import json
    import os
    import signal
    import sys
    import time
    from pathlib import Path


    def abort(config):
        os.abort()


    def segfault(config):
        os.kill(os.getpid(), signal.SIGSEGV)


    def hang(config):
        while True:
            time.sleep(1)


    def allocate(config):
        import numpy as np

        blocks = []
        # 50 MiB every 50 ms, up to 8 GiB, so that a broken limit cannot take
        # all of the machine's memory before the timeout stops this worker.
        for _ in range(160):
            blocks.append(np.ones(50 * 2**20 // 8))
            time.sleep(0.05)
        time.sleep(3600)


    def raise_error(config):
        raise RuntimeError(f"emulated kernel failure in {config}")


    def garbage_exit(config):
        sys.stdout.buffer.write(bytes(range(256)) * 16)
        sys.stderr.buffer.write(b"\\xff\\xfe\\x00 garbage from the worker\\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)


    def invalid_result(config):
        spec = json.loads(Path(sys.argv[1]).read_text())
        truncated = '{"format": 1, "status": "ok", '
        Path(spec["out_dir"], "result.json").write_text(truncated)
        os._exit(0)
    """
)


def _doctor_command(configs: list[str], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "parity.cli",
        "-q",
        "doctor",
        "--configs",
        ",".join(configs),
        "--out",
        str(out),
        *COMMON_ARGS,
        *extra,
    ]


def _run_doctor(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


def _summary(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _by_config(summary: dict) -> dict[str, dict]:
    return {entry["config"]: entry for entry in summary["configs"]}


def _wait_for(path: Path, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"parity exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.1)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            command = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in command:
            found.append(int(name))
    return found


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted run of the two configurations of the interrupt test."""
    directory = tmp_path_factory.mktemp("clean")
    out = directory / "out"
    command = _doctor_command(INTERRUPT_CONFIGS, out, "--jobs", "1", "--no-report")
    completed = _run_doctor(command, directory)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, _summary(out)


@needs_jax
def test_interrupt_then_resume(clean_run, tmp_path):
    clean_out, clean_summary = clean_run
    out = tmp_path / "out"
    command = _doctor_command(INTERRUPT_CONFIGS, out, "--jobs", "1")
    first_result = out / "runs" / "00-jax-cpu-jit-float32" / "result.json"
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            _wait_for(first_result, process, 300)
            finished_at = first_result.stat().st_mtime_ns
            process.send_signal(signal.SIGINT)
            status = process.wait(60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    err = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert status == 130, err[-3000:]
    assert "--resume" in err
    assert "Traceback" not in err

    partial = _summary(out)
    assert partial["interrupted"] == "SIGINT"
    entries = _by_config(partial)
    assert entries[CLEAN]["status"] == "ok"
    assert entries[SECOND]["verdict"] == "not-run"
    assert "SIGINT" in entries[SECOND]["reason"]
    assert (out / "report.html").exists()

    resumed = _run_doctor(command + ["--resume", "-v"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert first_result.stat().st_mtime_ns == finished_at, resumed.stderr[-3000:]
    final = _summary(out)
    assert final["interrupted"] is None
    entries = _by_config(final)
    assert entries[CLEAN]["reused"] is True
    assert entries[SECOND]["reused"] is False
    for config, expected in _by_config(clean_summary).items():
        assert entries[config]["verdict"] == expected["verdict"], config
        assert entries[config]["final_loss"] == expected["final_loss"], config
        assert entries[config]["excess"] == pytest.approx(expected["excess"], rel=1e-6)


@needs_jax
@needs_linux
def test_sigterm_stops_workers(tmp_path):
    out = tmp_path / "out"
    command = _doctor_command([CLEAN], out, "--jobs", "1", "--no-report")
    spec = out / "runs" / "00-jax-cpu-jit-float32" / "spec.json"
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait_for(spec, process, 120)
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert b"Traceback" not in err
    assert _processes_mentioning(str(spec)) == []
    summary = _summary(out)
    assert summary["interrupted"] == "SIGTERM"
    entry = _by_config(summary)[CLEAN]
    assert entry["verdict"] == "not-run"
    assert "SIGTERM" in entry["reason"]


@pytest.fixture(scope="module")
def fault_run(clean_run, tmp_path_factory):
    """Run every user fault beside one clean configuration, reusing the referee."""
    clean_out, _ = clean_run
    directory = tmp_path_factory.mktemp("faults")
    faults_file = directory / "user_faults.py"
    faults_file.write_text(USER_FAULTS)
    out = directory / "out"
    for source in (clean_out / "runs").iterdir():
        if source.name.startswith(("referee-", "envelope-")):
            shutil.copytree(source, out / "runs" / source.name)
    configs = [config for config, _, _ in FAULTED] + [CLEAN]
    fault_args = []
    for config, function, _ in FAULTED:
        fault_args += ["--fault", f"{faults_file}:{function}@{config}"]
    # Two jobs: the hanging worker takes one slot until its timeout while the
    # others run in the second.
    command = _doctor_command(
        configs,
        out,
        "--jobs",
        "2",
        "--timeout",
        "45",
        "--memory-limit",
        "1.5GiB",
        "--resume",
        *fault_args,
    )
    completed = _run_doctor(command, directory)
    return completed, out, _by_config(_summary(out))


@needs_jax
def test_fault_run_exits_one_and_writes_files(fault_run):
    completed, out, entries = fault_run
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    page = (out / "report.html").read_text()
    for config in entries:
        assert config in page


@needs_jax
@pytest.mark.parametrize(
    ("config", "reason"),
    [pytest.param(config, reason, id=function) for config, function, reason in FAULTED],
)
def test_user_fault_fails_with_reason(fault_run, config, reason):
    _, _, entries = fault_run
    entry = entries[config]
    assert entry["status"] == "failed"
    assert entry["verdict"] == "failed"
    assert reason in entry["reason"]


@needs_jax
def test_crash_exit_statuses_recorded(fault_run):
    _, _, entries = fault_run
    assert entries["jax:cpu:jit:float16"]["returncode"] == -signal.SIGABRT
    assert entries["jax:cpu:jit:bfloat16"]["returncode"] == -signal.SIGSEGV
    assert entries["jax:cpu:eager:float16"]["returncode"] == 3


@needs_jax
def test_failed_worker_stderr_kept(fault_run):
    _, _, entries = fault_run
    assert "RuntimeError" in entries["jax:cpu:jit:mixed_bfloat16"]["stderr_tail"]
    assert "garbage from the worker" in entries["jax:cpu:eager:float16"]["stderr_tail"]


@needs_jax
def test_memory_fault_peak_recorded(fault_run):
    _, _, entries = fault_run
    peak = entries["jax:cpu:jit:mixed_float16"]["peak_resident_mib"]
    assert peak > 1.5 * 1024


@needs_jax
def test_clean_verdict_unchanged_beside_faults(clean_run, fault_run):
    _, clean_summary = clean_run
    _, _, entries = fault_run
    expected = _by_config(clean_summary)[CLEAN]
    assert entries[CLEAN]["status"] == "ok"
    assert entries[CLEAN]["reused"] is False
    assert entries[CLEAN]["verdict"] == expected["verdict"]
    assert entries[CLEAN]["final_loss"] == expected["final_loss"]


# Unit tests below use files written here, not workers.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", 512 * 2**20),
        ("512M", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("2 gb", 2 * 10**9),
        ("none", None),
        (None, None),
        (3 * 2**30, 3 * 2**30),
    ],
)
def test_memory_limit_parsed(text, expected):
    assert parse_memory_limit(text) == expected


def _write_finished_run(directory: Path, config: str, resume_key: str) -> None:
    steps = 2
    atomic_write_json(
        directory / "result.json",
        {
            "format": 1,
            "status": "ok",
            "config": config,
            "steps": steps,
            "steps_per_epoch": 1,
            "final_loss": 0.25,
            "final_accuracy": 1.0,
            "environment": {},
            "resume_key": resume_key,
        },
    )
    atomic_write_tensors(
        directory / "arrays.safetensors",
        {
            "steps/loss": np.ones(steps),
            "steps/accuracy": np.ones(steps),
            "steps/norms": np.ones((steps + 1, 3)),
            "steps/digest": np.ones((steps + 1, 4)),
            "predictions/data": np.ones((5, 1)),
        },
    )


def _spec(**changes) -> dict:
    spec = {
        "scenario": "circles",
        "data_digest": "d" * 64,
        "epochs": 2,
        "batch_size": 32,
        "seed": 0,
        "learning_rate": 0.01,
        "activation": "relu",
        "config": CLEAN,
        "role": "candidate",
        "faults": [],
        "perturb_seed": None,
        "out_dir": "/somewhere",
    }
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    "change",
    [
        {"epochs": 3},
        {"batch_size": 16},
        {"seed": 1},
        {"activation": "tanh"},
        {"scenario": "moons"},
        {"data_digest": "e" * 64},
        {"config": "jax:cpu:eager:float32"},
        {"role": "envelope", "perturb_seed": 1},
        {"faults": ["fused-dense-relu"]},
    ],
    ids=lambda change: ",".join(change),
)
def test_resume_key_changes_with_inputs(change):
    assert key_of(key_inputs(_spec(**change))) != key_of(key_inputs(_spec()))


def test_resume_key_ignores_output_directory():
    assert key_of(key_inputs(_spec(out_dir="/elsewhere"))) == key_of(
        key_inputs(_spec())
    )


def test_resume_key_follows_fault_file(tmp_path):
    fault = tmp_path / "fault.py"
    fault.write_text("def inject(config):\n    pass\n")
    spec = _spec(faults=[f"{fault}:inject"])
    before = key_of(key_inputs(spec))
    fault.write_text("def inject(config):\n    raise RuntimeError\n")
    assert key_of(key_inputs(spec)) != before


def test_resume_key_follows_environment(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    before = key_of(key_inputs(_spec()))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert key_of(key_inputs(_spec())) != before


def test_resume_reuses_matching_result(tmp_path):
    run = PlannedRun("00", parse_config(CLEAN))
    spec = _spec(resume_key="k1")
    _write_finished_run(tmp_path, CLEAN, "k1")
    reused = find_reusable(run, tmp_path, spec)
    assert reused is not None
    assert reused.reused
    assert reused.meta["final_loss"] == 0.25


def test_resume_rejects_other_key(tmp_path):
    run = PlannedRun("00", parse_config(CLEAN))
    _write_finished_run(tmp_path, CLEAN, "k1")
    assert find_reusable(run, tmp_path, _spec(resume_key="k2")) is None


def test_resume_rejects_other_config(tmp_path):
    run = PlannedRun("00", parse_config(CLEAN))
    _write_finished_run(tmp_path, "jax:cpu:eager:float32", "k1")
    assert find_reusable(run, tmp_path, _spec(resume_key="k1")) is None


def test_resume_reruns_failed_result(tmp_path):
    run = PlannedRun("00", parse_config(CLEAN))
    _write_finished_run(tmp_path, CLEAN, "k1")
    atomic_write_json(
        tmp_path / "result.json",
        {"format": 1, "status": "failed", "error": "boom", "resume_key": "k1"},
    )
    assert find_reusable(run, tmp_path, _spec(resume_key="k1")) is None


def test_resume_reruns_damaged_arrays(tmp_path):
    run = PlannedRun("00", parse_config(CLEAN))
    _write_finished_run(tmp_path, CLEAN, "k1")
    (tmp_path / "arrays.safetensors").write_bytes(b"\x00" * 100)
    assert find_reusable(run, tmp_path, _spec(resume_key="k1")) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[" * 100000,
        b"[]",
        b'{"format": 99, "status": "ok"}',
        b'{"format": 1, "status": "maybe"}',
        b'{"format": 1, "status": "ok"}',
        b'{"format": 1, "status": "ok", "config": "x", "steps": true, '
        b'"steps_per_epoch": 1, "final_loss": 1.0, "final_accuracy": 1.0, '
        b'"environment": {}}',
        b'{"format": 1, "status": "ok", "config": "x", "steps": -1, '
        b'"steps_per_epoch": 1, "final_loss": 1.0, "final_accuracy": 1.0, '
        b'"environment": {}}',
    ],
    ids=[
        "empty",
        "truncated",
        "binary",
        "deep nesting",
        "list",
        "unknown format",
        "unknown status",
        "missing fields",
        "bool steps",
        "negative steps",
    ],
)
def test_invalid_result_file_rejected(tmp_path, content):
    (tmp_path / "result.json").write_bytes(content)
    with pytest.raises(ValueError, match="result file"):
        load_result_meta(tmp_path)


def test_missing_result_file_rejected(tmp_path):
    with pytest.raises(ValueError, match="no result file"):
        load_result_meta(tmp_path)


def test_garbage_arrays_file_rejected(tmp_path):
    (tmp_path / "arrays.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="invalid arrays file"):
        load_result_arrays(tmp_path)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("steps/digest", None),
        ("steps/digest", np.ones((2, 4))),
        ("steps/loss", np.ones((2, 2))),
        ("steps/loss", np.ones(2, np.int64)),
    ],
    ids=["missing", "wrong rows", "wrong rank", "integer dtype"],
)
def test_result_arrays_checked_against_steps(tmp_path, name, value):
    _write_finished_run(tmp_path, CLEAN, "k1")
    arrays = load_result_arrays(tmp_path)
    if value is None:
        del arrays[name]
    else:
        arrays[name] = value
    with pytest.raises(ValueError, match=name):
        check_result_arrays(arrays, {"steps": 2}, tmp_path)


@needs_linux
def test_resident_bytes_of_own_group():
    group = os.getpgrp()
    measured = resident_bytes({group})
    assert measured[group] > 2**20
