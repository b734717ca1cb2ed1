"""Invalid command lines: each exits with status 2 and a message naming the bad value.

Every case runs `parity.cli.main` in this process, which is fast because no
backend is imported before the input is checked. A few cases run the installed
entry point in a subprocess to cover what only a real process shows: the exit
status, argument bytes that are not UTF-8, and stderr as the user sees it.

To add a case, add a row to CASES: an id, the argument list, and a piece of text
that the error message must contain. ``{tmp}`` in an argument or in the expected
text is replaced by a directory that contains the files made by `_make_files`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.cli import main

# Options of `parity run` around a bad model: valid data small enough for one batch.
_RUN_DATA = ["--data", "data.npz", "--batch-size", "4", "--configs", "jax:cpu:jit"]

# (id, arguments, text the message must contain)
CASES: list[tuple[str, list[str], str]] = [
    # Arguments and commands.
    ("unknown command", ["frobnicate"], "frobnicate"),
    ("unknown option", ["doctor", "--colour", "red"], "--colour"),
    ("option without value", ["doctor", "--configs"], "--configs"),
    ("unknown top-level option", ["--fast", "doctor"], "--fast"),
    # Numbers.
    ("epochs not a number", ["doctor", "--epochs", "abc"], "'abc'"),
    ("epochs zero", ["doctor", "--epochs", "0"], "--epochs 0"),
    ("epochs negative", ["doctor", "--epochs", "-3"], "--epochs -3"),
    ("epochs float", ["doctor", "--epochs", "2.5"], "'2.5'"),
    ("batch size zero", ["doctor", "--batch-size", "0"], "--batch-size 0"),
    ("batch size text", ["doctor", "--batch-size", "big"], "'big'"),
    ("jobs zero", ["doctor", "--jobs", "0"], "--jobs 0"),
    ("jobs negative", ["doctor", "--jobs", "-2"], "--jobs -2"),
    ("timeout zero", ["doctor", "--timeout", "0"], "--timeout 0"),
    ("timeout negative", ["doctor", "--timeout", "-5"], "--timeout -5"),
    ("timeout nan", ["doctor", "--timeout", "nan"], "--timeout nan"),
    ("timeout text", ["doctor", "--timeout", "soon"], "'soon'"),
    ("seed negative", ["doctor", "--seed", "-1"], "--seed -1"),
    ("seed text", ["doctor", "--seed", "x1"], "'x1'"),
    ("memory limit unit", ["doctor", "--memory-limit", "12XB"], "'12XB'"),
    ("memory limit zero", ["doctor", "--memory-limit", "0"], "'0'"),
    ("memory limit negative", ["doctor", "--memory-limit=-4GiB"], "'-4GiB'"),
    ("memory limit tiny", ["doctor", "--memory-limit", "10KiB"], "'10KiB'"),
    # Scenarios and model options.
    ("unknown scenario", ["doctor", "--scenario", "spirals"], "'spirals'"),
    ("empty scenario", ["doctor", "--scenario", ""], "''"),
    ("unknown activation", ["doctor", "--activation", "rleu"], "'rleu'"),
    # Configuration strings.
    ("unknown backend", ["doctor", "--configs", "pytorch:cpu"], "'pytorch'"),
    ("unknown device", ["doctor", "--configs", "jax:tpu"], "'tpu'"),
    ("unknown mode", ["doctor", "--configs", "jax:cpu:graph"], "'graph'"),
    (
        "unknown precision",
        ["doctor", "--configs", "tensorflow:cpu:graph:float128"],
        "'float128'",
    ),
    ("cpu index", ["doctor", "--configs", "jax:cpu:1"], "jax:cpu:1"),
    (
        "extra part",
        ["doctor", "--configs", "jax:cpu:jit:float32:extra"],
        "'extra'",
    ),
    (
        "unknown flag",
        ["doctor", "--configs", "jax:cpu:jit:float32:color=red"],
        "'color'",
    ),
    (
        "threads zero",
        ["doctor", "--configs", "jax:cpu:jit:float32:threads=0"],
        "threads='0'",
    ),
    (
        "onednn on jax",
        ["doctor", "--configs", "jax:cpu:jit:float32:onednn=on"],
        "onednn",
    ),
    (
        "flag before precision",
        ["doctor", "--configs", "jax:cpu:threads=1:float32"],
        "jax:cpu:threads=1:float32",
    ),
    ("only commas", ["doctor", "--configs", ",,,"], "',,,'"),
    (
        "duplicate configuration",
        ["doctor", "--configs", "jax:cpu:jit,jax:cpu:jit:float32"],
        "jax:cpu:jit,jax:cpu:jit:float32",
    ),
    (
        "referee not float64",
        ["doctor", "--configs", "jax:cpu:jit", "--referee", "jax:cpu:jit:float32"],
        "jax:cpu:jit:float32",
    ),
    (
        "referee unknown backend",
        ["doctor", "--configs", "jax:cpu:jit", "--referee", "mxnet:cpu"],
        "'mxnet'",
    ),
    # Fault names.
    ("unknown fault", ["doctor", "--fault", "cosmic-rays"], "'cosmic-rays'"),
    ("fault without name", ["doctor", "--fault", "@jax:cpu:jit"], "'@jax:cpu:jit'"),
    (
        "fault file missing",
        ["doctor", "--fault", "{tmp}/missing.py:inject"],
        "{tmp}/missing.py",
    ),
    (
        "fault function not an identifier",
        ["doctor", "--fault", "{tmp}/fault.py:not-a-name"],
        "not-a-name",
    ),
    (
        "fault target invalid",
        [
            "doctor",
            "--configs",
            "jax:cpu:jit",
            "--fault",
            "fused-dense-relu@jax:gpu:9:x",
        ],
        "jax:gpu:9:x",
    ),
    (
        "fault target not run",
        [
            "doctor",
            "--configs",
            "jax:cpu:jit",
            "--fault",
            "fused-dense-relu@jax:cpu:eager",
        ],
        "jax:cpu:eager",
    ),
    # Output paths.
    (
        "out is a file",
        ["doctor", "--configs", "jax:cpu:jit", "--out", "{tmp}/file.txt"],
        "{tmp}/file.txt",
    ),
    (
        "out below a file",
        ["doctor", "--configs", "jax:cpu:jit", "--out", "{tmp}/file.txt/report"],
        "{tmp}/file.txt/report",
    ),
    (
        "out not writable",
        ["doctor", "--configs", "jax:cpu:jit", "--out", "/sys/parity-report"],
        "/sys/parity-report",
    ),
    (
        "json is a directory",
        ["doctor", "--configs", "jax:cpu:jit", "--out", "{tmp}/out", "--json", "{tmp}"],
        "{tmp}",
    ),
    (
        "json below a file",
        [
            "doctor",
            "--configs",
            "jax:cpu:jit",
            "--out",
            "{tmp}/out",
            "--json",
            "{tmp}/file.txt/results.json",
        ],
        "{tmp}/file.txt",
    ),
    # Data files (`parity run`). The data is checked before the model, so the damaged
    # model.keras is never read.
    ("data missing", ["run", "model.keras", "--data", "missing.npz"], "'missing.npz'"),
    ("data not npz", ["run", "model.keras", "--data", "garbage.npz"], "'garbage.npz'"),
    (
        "data array missing",
        ["run", "model.keras", "--data", "data.npz", "--x", "inputs"],
        "'inputs'",
    ),
    (
        "data rows mismatch",
        ["run", "model.keras", "--data", "mismatch.npz"],
        "mismatch.npz",
    ),
    ("data with nan", ["run", "model.keras", "--data", "nan.npz"], "nan.npz"),
    (
        "table without target",
        ["run", "model.keras", "--data", "table.csv"],
        "'table.csv'",
    ),
    (
        "validation split too large",
        ["run", "model.keras", "--data", "data.npz", "--validation-split", "1.5"],
        "--validation-split 1.5",
    ),
    (
        "batch larger than data",
        ["run", "model.keras", "--data", "data.npz", "--batch-size", "64"],
        "64",
    ),
    # Model files (`parity run`), with data that is valid.
    ("model missing", ["run", "missing.keras", *_RUN_DATA], "'missing.keras'"),
    ("model not a zip", ["run", "file.txt", *_RUN_DATA], "'file.txt'"),
    ("model damaged archive", ["run", "model.keras", *_RUN_DATA], "'model.keras'"),
    (
        "model factory module missing",
        ["run", "no_such_module_here:build", *_RUN_DATA],
        "'no_such_module_here'",
    ),
    (
        "model factory file missing",
        ["run", "missing.py:build", *_RUN_DATA],
        "'missing.py'",
    ),
    (
        "learning rate negative",
        ["run", "model.keras", *_RUN_DATA, "--lr", "-1"],
        "--lr -1",
    ),
    # Traces (`parity compare`, `parity replay`, `parity record`).
    ("trace missing", ["compare", "missing.parity"], "missing.parity"),
    ("trace empty", ["compare", "empty.parity"], "empty.parity"),
    ("trace not a trace", ["compare", "file.txt"], "file.txt"),
    ("trace bad header", ["compare", "garbage.parity"], "garbage.parity"),
    ("replay bad header", ["replay", "garbage.parity"], "garbage.parity"),
    (
        "record bad configuration",
        ["record", "--config", "jax:cpu:nope", "-o", "x.parity"],
        "'nope'",
    ),
    (
        "record several configurations",
        ["record", "--config", "jax:cpu:jit,torch:cpu:eager", "-o", "x.parity"],
        "several configurations",
    ),
    (
        "epochs too many",
        ["doctor", "--epochs", "99999999999999999999"],
        "--epochs 99999999999999999999",
    ),
    (
        "record output below a file",
        ["record", "--config", "jax:cpu:jit", "-o", "file.txt/x.parity"],
        "file.txt",
    ),
]


def _make_files(directory: Path) -> None:
    rng = np.random.default_rng(0)
    (directory / "file.txt").write_text("not a directory\n")
    (directory / "fault.py").write_text("def inject(config):\n    pass\n")
    x, y = rng.random((20, 2)), (rng.random(20) > 0.5).astype(np.float32)
    np.savez(directory / "data.npz", x=x, y=y)
    np.savez(directory / "mismatch.npz", x=x, y=y[:19])
    x_nan = x.copy()
    x_nan[3, 1] = np.nan
    np.savez(directory / "nan.npz", x=x_nan, y=y)
    (directory / "garbage.npz").write_bytes(b"\x00garbage" * 10)
    (directory / "table.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    (directory / "model.keras").write_bytes(b"PK\x03\x04 a damaged zip archive")
    (directory / "empty.parity").write_bytes(b"")
    (directory / "garbage.parity").write_bytes(b"\x08" + b"\x00" * 7 + b"{}garbage")


def _fill(text: str, directory: Path) -> str:
    return text.replace("{tmp}", str(directory))


def _run_in_process(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    try:
        status = main(arguments)
    except SystemExit as exit_:  # argparse exits on its own errors
        status = exit_.code if isinstance(exit_.code, int) else 1
    return status, capsys.readouterr().err


def test_corpus_has_thirty_cases():
    assert len(CASES) >= 30
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        pytest.param(arguments, expected, id=case_id)
        for case_id, arguments, expected in CASES
    ],
)
def test_bad_input_exits_two(arguments, expected, tmp_path, capsys, monkeypatch):
    _make_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    status, err = _run_in_process([_fill(a, tmp_path) for a in arguments], capsys)
    assert status == 2, err
    assert _fill(expected, tmp_path) in err
    assert "Traceback" not in err
    assert not (tmp_path / "parity-report" / "runs").exists()


def test_bad_input_starts_no_worker(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _ = _run_in_process(
        ["doctor", "--configs", "jax:cpu:jit", "--epochs", "0", "--out", "o"], capsys
    )
    assert status == 2
    assert not (tmp_path / "o").exists()


def _run_cli(
    arguments: list[str | bytes], cwd: Path
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "parity.cli", *arguments],
        cwd=cwd,
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def test_subprocess_bad_config_message(tmp_path):
    completed = _run_cli(["doctor", "--configs", "jax:cpu:warp"], tmp_path)
    err = completed.stderr.decode()
    assert completed.returncode == 2
    assert "'warp'" in err
    assert "Traceback" not in err


def test_subprocess_argparse_error(tmp_path):
    completed = _run_cli(["doctor", "--jobs", "many"], tmp_path)
    err = completed.stderr.decode()
    assert completed.returncode == 2
    assert "'many'" in err
    assert "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX argument bytes")
def test_subprocess_non_utf8_argument(tmp_path):
    completed = _run_cli([b"doctor", b"--configs", b"jax:\xff\xfe"], tmp_path)
    err = completed.stderr.decode("utf-8", errors="replace")
    assert completed.returncode == 2
    assert "jax:" in err
    assert "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX argument bytes")
def test_subprocess_non_utf8_fault_name(tmp_path):
    completed = _run_cli([b"doctor", b"--fault", b"\xff.py:inject"], tmp_path)
    err = completed.stderr.decode("utf-8", errors="replace")
    assert completed.returncode == 2
    assert ".py:inject" in err
    assert "Traceback" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_record_output_checked_before_training(capsys):
    # /proc rejects new files even for root, which permission bits do not stop.
    status, err = _run_in_process(
        ["record", "--config", "jax:cpu:jit", "-o", "/proc/parity-test.parity"], capsys
    )
    assert status == 2, err
    assert "/proc is not writable" in err
    assert ".tmp" not in err


def test_table_without_rows_is_named(tmp_path):
    from parity.errors import InputError
    from parity.sources import read_data

    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b,label\n")
    with pytest.raises(InputError, match="no data rows"):
        read_data(str(header_only), target="label")
