"""Recording runs into traces, comparing and replaying them, and hostile traces.

The first part uses synthetic traces, written with `trace_contents` from made-up
worker results, so that it runs in seconds: loading, verdicts with a referee
trained "here" (a stub of `execute`), environment differences, and the CLI on
damaged and hostile files. The tests marked slow record real runs with
TensorFlow and JAX in worker processes: about five minutes on two busy cores,
most of it framework imports in the workers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity import record
from parity.cli import main
from parity.config import parse_config
from parity.doctor import judge_all
from parity.env import installed_backends
from parity.lockstep import batch_schedule, digest_bytes, initial_weights
from parity.record import (
    CompareOptions,
    RecordedTrace,
    ReplayOptions,
    TensorSource,
    environment_differences,
    load_lockstep_trace,
    streamed_distance,
    trace_contents,
)
from parity.runner import PlannedRun, RunResult
from parity.scenarios import get_scenario
from parity.trace import TraceError, read_trace, write_trace

SCENARIO = get_scenario("circles")
NAMES = ["dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias"]
NAMES += ["dense_2/kernel", "dense_2/bias"]
SHAPES = [(2, 12), (12,), (12, 8), (8,), (8, 1), (1,)]
EPOCHS = 2
BATCH_SIZE = 250
STEPS = EPOCHS * 4
CHECKPOINTS = (0, 4, 8)
COMMON = {
    "scenario": "circles",
    "epochs": EPOCHS,
    "batch_size": BATCH_SIZE,
    "seed": 0,
    "learning_rate": SCENARIO.learning_rate,
    "activation": "relu",
}
ENVIRONMENT = {
    "platform": "Linux-6.1-x86_64",
    "machine": "x86_64",
    "cpu": "AMD EPYC",
    "cpu_count": 2,
    "python": "3.11.7",
    "versions": {"numpy": "2.1.0", "keras": "3.15.1", "tensorflow-cpu": "2.21.0"},
    "plugins": {},
    "flags": {"KERAS_BACKEND": "tensorflow"},
    "backend": "tensorflow",
    "devices": ["/device:CPU:0"],
    "threads": {"intra_op": 0, "inter_op": 0},
}


# ---------------------------------------------------------------------------
# Synthetic traces


def trajectory(noise: float, seed: int) -> np.ndarray:
    """Return (steps + 1, parameters) values: a shared walk plus relative noise."""
    init = initial_weights(NAMES, SHAPES, 0)
    flat = np.concatenate([w.ravel() for w in init]).astype(np.float64)
    walk = np.random.default_rng(99).standard_normal((STEPS + 1, flat.size))
    base = flat + 1e-2 * np.cumsum(walk, axis=0)
    base[0] = flat
    relative = np.random.default_rng(seed).standard_normal(base.shape)
    values = base * (1 + noise * relative)
    values[0] = flat
    return values


def synthetic_run(
    key: str,
    config: str = "tensorflow:cpu:graph:float32",
    role: str = "candidate",
    *,
    noise: float = 1e-7,
    seed: int = 1,
    faults: tuple[str, ...] = (),
    perturb_seed: int | None = None,
    environment: dict[str, Any] | None = None,
) -> RunResult:
    """Return a worker result with the shapes and digests that a real one has."""
    x, _ = SCENARIO.data()
    values = trajectory(noise, seed)
    arrays: dict[str, np.ndarray] = {
        "steps/loss": np.linspace(0.7, 0.3, STEPS),
        "steps/accuracy": np.linspace(0.5, 0.9, STEPS),
        "steps/norms": np.ones((STEPS + 1, len(SHAPES))),
        "steps/digest": values,
        "predictions/data": (x[:, :1] > 0).astype(np.float32),
        "schedule": batch_schedule(len(x), EPOCHS, 0),
    }
    for step in CHECKPOINTS:
        offset = 0
        for j, shape in enumerate(SHAPES):
            size = int(np.prod(shape))
            part = values[step, offset : offset + size].reshape(shape)
            arrays[f"checkpoint/{step}/param/{j}"] = part.astype(np.float32)
            offset += size
    meta = {
        "format": 1,
        "status": "ok",
        "config": config,
        "role": role,
        "scenario": "circles",
        "epochs": EPOCHS,
        "batch_size": BATCH_SIZE,
        "steps": STEPS,
        "steps_per_epoch": STEPS // EPOCHS,
        "checkpoint_steps": list(CHECKPOINTS),
        "variable_names": NAMES,
        "variable_shapes": [list(shape) for shape in SHAPES],
        "num_params": values.shape[1],
        "init_digest": digest_bytes(initial_weights(NAMES, SHAPES, 0)),
        "schedule_digest": digest_bytes([arrays["schedule"]]),
        "data_digest": digest_bytes([x]),
        "perturb_seed": perturb_seed,
        "faults": list(faults),
        "final_loss": 0.3,
        "final_accuracy": 0.9,
        "environment": environment or ENVIRONMENT,
    }
    run = PlannedRun(key, parse_config(config), role, faults, perturb_seed)
    return RunResult(run, "ok", meta, arrays)


def referee_runs() -> list[RunResult]:
    return [
        synthetic_run("referee", "tensorflow:cpu:graph:float64", "referee", noise=0),
        synthetic_run("envelope-1", role="envelope", seed=11, perturb_seed=1),
        synthetic_run(
            "envelope-2", "jax:cpu:jit:float32", "envelope", seed=12, perturb_seed=2
        ),
    ]


def write_synthetic(url: str | os.PathLike[str], results: list[RunResult]) -> str:
    meta, tensors = trace_contents(SCENARIO, COMMON, results)
    write_trace(url, meta, tensors)
    return os.fspath(url)


def rewrite(source: str, target: str, edit_meta=None, edit_tensors=None) -> str:
    """Copy a trace with its meta or tensors edited, as a hostile writer would."""
    with read_trace(source) as trace:
        meta = json.loads(json.dumps(trace.meta))
        tensors = {name: trace.tensor(name) for name in trace.tensor_names()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    write_trace(target, meta, tensors)
    return target


@pytest.fixture(scope="module", autouse=True)
def wide_terminal():
    """Let rich print table cells unwrapped, so that tests can find whole items."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "300")
        yield


@pytest.fixture
def candidate_trace(tmp_path) -> str:
    return write_synthetic(tmp_path / "candidate.parity", [synthetic_run("c")])


@pytest.fixture
def referee_trace(tmp_path) -> str:
    runs = [synthetic_run("c", seed=2), *referee_runs()]
    return write_synthetic(tmp_path / "with-referee.parity", runs)


@pytest.fixture
def memory_dir():
    directory = f"memory://record-{uuid.uuid4().hex}"
    yield directory
    filesystem = fsspec.filesystem("memory")
    if filesystem.exists(directory):
        filesystem.rm(directory, recursive=True)


def compare_cli(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["-q", "compare", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------
# Loading and judging synthetic traces


def test_synthetic_trace_loads(candidate_trace):
    recorded = load_lockstep_trace(candidate_trace, 3)
    with recorded.trace:
        (result,) = recorded.results
        assert result.run.key == "t3-c"
        assert result.run.role == "candidate"
        assert result.meta["steps"] == STEPS
        assert result.arrays["steps/digest"].shape == (STEPS + 1, 149)
        assert recorded.referee is None


def test_referee_from_trace_gives_verdicts(tmp_path, candidate_trace, referee_trace):
    faulty = write_synthetic(
        tmp_path / "faulty.parity",
        [synthetic_run("c", noise=1e-2, faults=("fused-dense-relu",))],
    )
    result = record.compare_traces(
        CompareOptions(
            [candidate_trace, referee_trace, faulty], out=tmp_path / "out", report=False
        )
    )
    verdicts = [entry["verdict"] for entry in result.summary["configs"]]
    assert verdicts == ["consistent", "consistent", "divergent"]
    assert result.summary["referee_source"] == referee_trace
    assert result.bad


def test_checkpoint_distances_streamed(tmp_path, referee_trace, candidate_trace):
    result = record.compare_traces(
        CompareOptions([candidate_trace, referee_trace], out=tmp_path, report=False)
    )
    distances = result.summary["configs"][0]["checkpoint_distance"]
    assert list(distances) == ["0", "4", "8"]
    assert distances["0"] == 0.0
    assert 0 < distances["8"] < 1e-5


def test_local_referee_when_no_trace_has_one(tmp_path, candidate_trace, monkeypatch):
    planned = []

    def fake_execute(runs, work_dir, common, **options):
        planned.extend(runs)
        by_role = {r.run.role: r for r in referee_runs()}
        envelopes = [r for r in referee_runs() if r.run.role == "envelope"]
        results = []
        for run in runs:
            source = by_role[run.role] if run.role != "envelope" else envelopes.pop(0)
            results.append(RunResult(run, "ok", source.meta, source.arrays))
        return results

    monkeypatch.setattr(record, "execute", fake_execute)
    result = record.compare_traces(
        CompareOptions([candidate_trace], out=tmp_path, report=False)
    )
    assert [run.role for run in planned] == ["referee", "envelope", "envelope"]
    assert result.summary["referee_source"].startswith("trained here")
    assert result.summary["configs"][0]["verdict"] == "consistent"


def test_local_referee_digest_mismatch_rejected(
    tmp_path, candidate_trace, monkeypatch, capsys
):
    def fake_execute(runs, work_dir, common, **options):
        results = []
        for run, source in zip(runs, referee_runs(), strict=True):
            meta = {**source.meta, "data_digest": "0" * 64}
            results.append(RunResult(run, "ok", meta, source.arrays))
        return results

    monkeypatch.setattr(record, "execute", fake_execute)
    status, _, err = compare_cli(capsys, candidate_trace, "--out", str(tmp_path))
    assert status == 2
    assert "does not reproduce the recording" in err
    assert candidate_trace in err
    assert "data digest" in err


def test_failed_run_trace_compares_as_failed(tmp_path, referee_trace):
    crashed = RunResult(
        PlannedRun("c", parse_config("jax:cpu:jit:float32")),
        "failed",
        error="killed by SIGKILL",
        stderr_tail="Fatal Python error: Segmentation fault",
    )
    path = write_synthetic(tmp_path / "crashed.parity", [crashed])
    recorded = load_lockstep_trace(path)
    with recorded.trace:
        assert recorded.digests == {}
        assert recorded.results[0].status == "failed"
    result = record.compare_traces(
        CompareOptions([referee_trace, path], out=tmp_path / "out", report=False)
    )
    entry = result.summary["configs"][1]
    assert entry["verdict"] == "failed"
    assert entry["reason"] == "killed by SIGKILL"
    assert result.bad


def test_same_labels_kept_apart(tmp_path, referee_trace):
    copy = tmp_path / "copy"
    copy.mkdir()
    other = write_synthetic(copy / "with-referee.parity", [synthetic_run("c", seed=3)])
    result = record.compare_traces(
        CompareOptions([referee_trace, other], out=tmp_path / "out", report=False)
    )
    labels = [entry["label"] for entry in result.summary["configs"]]
    assert len(set(labels)) == 2
    assert labels[1].endswith("#2")


def test_incompatible_traces_rejected(tmp_path, candidate_trace, capsys):
    other = rewrite(
        candidate_trace,
        str(tmp_path / "other-seed.parity"),
        lambda meta: meta["scenario"].update(seed=5),
    )
    status, _, err = compare_cli(capsys, candidate_trace, other)
    assert status == 2
    assert "seed is 0 in the first and 5 in the second" in err
    assert other in err


def test_compare_reads_memory_urls(memory_dir, referee_trace, capsys, tmp_path):
    url = f"{memory_dir}/copy.parity"
    with open(referee_trace, "rb") as source, fsspec.open(url, "wb") as target:
        target.write(source.read())
    status, out, _ = compare_cli(capsys, url, "--out", str(tmp_path))
    assert status == 0
    assert "consistent" in out


def test_record_rejects_missing_directory(tmp_path, capsys):
    status = main(
        ["record", "--config", "tensorflow:cpu", "-o", str(tmp_path / "no/dir/x")]
    )
    assert status == 2
    assert "does not exist" in capsys.readouterr().err


def test_compare_rejects_unwritable_out(tmp_path, referee_trace, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    status, _, err = compare_cli(capsys, referee_trace, "--out", str(blocker))
    assert status == 2
    assert str(blocker) in err


def test_record_rejects_bad_config(tmp_path, capsys):
    status = main(["record", "--config", "tensorflow:tpu", "-o", str(tmp_path / "x")])
    assert status == 2
    assert "tpu" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Environment differences


def environment(**changes: Any) -> dict[str, Any]:
    value = json.loads(json.dumps(ENVIRONMENT))
    for dotted, item in changes.items():
        *path, leaf = dotted.split("__")
        target = value
        for part in path:
            target = target.setdefault(part, {})
        target[leaf] = item
    return value


def test_environment_differences_item_by_item():
    first = environment()
    second = environment(
        versions__tensorflow_metal="1.1.0",
        versions__numpy="1.26.4",
        plugins__tensorflow_metal="1.1.0",
        devices=["/device:CPU:0", "/device:GPU:0"],
        flags__TF_ENABLE_ONEDNN_OPTS="0",
        threads__intra_op=1,
        cpu="Apple M2",
        platform="macOS-14.5-arm64",
    )
    differences, same = environment_differences([first, second])
    rows = {d.item: (d.group, d.values) for d in differences}
    assert rows["versions.numpy"] == ("versions", ["2.1.0", "1.26.4"])
    assert rows["versions.tensorflow_metal"] == ("versions", [None, "1.1.0"])
    assert rows["plugins.tensorflow_metal"] == ("plugins", [None, "1.1.0"])
    assert rows["devices"] == (
        "devices",
        ["/device:CPU:0", "/device:CPU:0, /device:GPU:0"],
    )
    assert rows["flags.TF_ENABLE_ONEDNN_OPTS"] == ("flags", [None, "0"])
    assert rows["threads.intra_op"] == ("threads", ["0", "1"])
    assert rows["cpu"] == ("cpu", ["AMD EPYC", "Apple M2"])
    assert rows["platform"][0] == "platform"
    assert "versions.keras" not in rows
    # Five items of the first environment differ; three exist only in the second.
    assert same == len(record.flatten_environment(first)) - 5
    groups = [d.group for d in differences]
    assert groups == sorted(groups, key=record.ENVIRONMENT_GROUPS.index)


def test_environment_differences_in_output_and_report(tmp_path, referee_trace, capsys):
    mac = write_synthetic(
        tmp_path / "mac.parity",
        [
            synthetic_run(
                "c",
                environment=environment(
                    cpu="Apple M2", flags__OMP_NUM_THREADS="1", versions__numpy="1.26.4"
                ),
            )
        ],
    )
    out = tmp_path / "report"
    status, printed, _ = compare_cli(
        capsys,
        referee_trace,
        mac,
        "--out",
        str(out),
        "--json",
        str(tmp_path / "r.json"),
    )
    assert status == 0
    for text in ("Apple M2", "AMD EPYC", "flags.OMP_NUM_THREADS", "1.26.4"):
        assert text in printed
    page = (out / "report.html").read_text()
    assert "Environment differences" in page
    assert "Apple M2" in page
    summary = json.loads((tmp_path / "r.json").read_text())
    rows = {row["item"]: row for row in summary["environment_differences"]}
    assert set(rows["cpu"]["values"].values()) == {"AMD EPYC", "Apple M2"}


def test_terminal_escapes_trace_text(tmp_path, referee_trace, capsys):
    hostile = write_synthetic(
        tmp_path / "markup.parity",
        [synthetic_run("c", environment=environment(cpu="[bold red]x\x1b[31m[/]"))],
    )
    status, printed, _ = compare_cli(capsys, referee_trace, hostile)
    assert status == 0
    assert "\x1b" not in printed
    assert "bold red" in printed


# ---------------------------------------------------------------------------
# Replay planning (no training)


def test_replay_applies_only_catalogue_faults(tmp_path):
    path = write_synthetic(
        tmp_path / "faulted.parity",
        [synthetic_run("c", faults=("fused-dense-relu", "os:system"))],
    )
    recorded = load_lockstep_trace(path)
    with recorded.trace:
        configs, faults, notes = record._replay_plan_inputs(
            recorded,
            ReplayOptions(path, configs="tensorflow:cpu:graph:float32,jax:cpu:jit"),
        )
    assert configs == ["tensorflow:cpu:graph:float32", "jax:cpu:jit:float32"]
    assert faults == ["fused-dense-relu@tensorflow:cpu:graph:float32"]
    assert any("os:system" in note and "never runs" in note for note in notes)


# ---------------------------------------------------------------------------
# Streaming


def test_streamed_distance_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    a = {"x": rng.standard_normal((300, 7)).astype(np.float32), "s": np.float32(2.0)}
    b = {"x": a["x"] * 1.001, "s": np.float32(2.5)}
    a["s"], b["s"] = np.asarray(a["s"]), np.asarray(b["s"])
    write_trace(tmp_path / "a.parity", {}, a)
    with read_trace(tmp_path / "a.parity") as trace:
        pairs = [
            (TensorSource(trace), n, TensorSource(arrays=b), n) for n in ("x", "s")
        ]
        difference, scale = streamed_distance(pairs, chunk_elements=50)
    expected = np.sqrt(np.sum((a["x"] - b["x"].astype(np.float64)) ** 2) + 0.25)
    assert difference == pytest.approx(expected, rel=1e-12)
    assert scale == pytest.approx(
        np.sqrt(np.sum(b["x"].astype(np.float64) ** 2) + 6.25), rel=1e-12
    )


# ---------------------------------------------------------------------------
# Hostile and damaged traces through the CLI


def flip_in_tensor(name: str):
    """Flip one bit in the middle of a tensor's bytes, found from the header."""

    def edit(data: bytes) -> bytes:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        begin, end = header[name]["data_offsets"]
        position = 8 + length + (begin + end) // 2
        return data[:position] + bytes([data[position] ^ 0x10]) + data[position + 1 :]

    return edit


def flip_header_byte(data: bytes) -> bytes:
    position = data.index(b'"kind')
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


RAW_CASES = [
    pytest.param(lambda data: data[: len(data) // 2], "truncated", id="truncated"),
    pytest.param(lambda data: data[:20], "header length", id="truncated header"),
    pytest.param(
        flip_in_tensor("run/0/steps/digest"), "CRC-32", id="bit flip in steps"
    ),
    pytest.param(
        flip_in_tensor("run/0/checkpoint/8/param/2"),
        "CRC-32",
        id="bit flip in checkpoint",
    ),
    pytest.param(flip_header_byte, "damaged", id="bit flip in header"),
    pytest.param(
        lambda data: pickle.dumps({"kernel": [1.0]}, protocol=4),
        "pickle",
        id="pickle",
    ),
    pytest.param(
        lambda data: zip_bytes({"../escape.json": b"{}", "/etc/x": b"x"}),
        "ZIP archive",
        id="zip with paths outside the archive",
    ),
    pytest.param(lambda data: b"", "fewer than the 8-byte", id="empty"),
]


@pytest.mark.parametrize("command", ["compare", "replay"])
@pytest.mark.parametrize(("damage", "message"), RAW_CASES)
def test_damaged_trace_exits_2(
    tmp_path, referee_trace, capsys, command, damage, message
):
    path = tmp_path / "damaged.parity"
    path.write_bytes(damage(Path(referee_trace).read_bytes()))
    status = main(["-q", command, str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert str(path) in err
    assert message in err
    assert "Traceback" not in err


def test_oversized_header_exits_2(tmp_path, capsys):
    path = tmp_path / "huge.parity"
    length = 65 * 2**20
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", length))
        file.truncate(8 + length)  # sparse: nothing is written
    status, _, err = compare_cli(capsys, str(path))
    assert status == 2
    assert str(path) in err
    assert "max_meta_bytes" in err


def set_in(path: tuple, value: Any):
    def edit(meta: dict) -> None:
        target = meta
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return edit


META_CASES = [
    pytest.param(set_in(("kind",), "something-else"), "kind", id="unknown kind"),
    pytest.param(set_in(("kind_version",), 99), "layout version 99", id="newer layout"),
    pytest.param(
        set_in(("scenario", "epochs"), "2"), "epochs is '2'", id="epochs string"
    ),
    pytest.param(
        set_in(("scenario", "name"), "../../x"), "not built in", id="scenario"
    ),
    pytest.param(set_in(("runs",), {"0": {}}), "meta.runs is", id="runs object"),
    pytest.param(set_in(("runs",), [{}] * 65), "more than 64", id="too many runs"),
    pytest.param(set_in(("runs", 0, "config"), 5), "config is 5", id="config int"),
    pytest.param(
        set_in(("runs", 0, "config"), "tensorflow:cpu:graph:float32:evil=1"),
        "unknown flag",
        id="config flag",
    ),
    pytest.param(
        set_in(("runs", 0, "key"), "../../outside"),
        "path outside the trace",
        id="run key is a path",
    ),
    pytest.param(
        set_in(("runs", 0, "faults"), ["[red]x[/red]"]), "faults has", id="fault markup"
    ),
    pytest.param(set_in(("runs", 0, "role"), "referee!"), "role", id="role"),
    pytest.param(
        set_in(("runs", 0, "result", "steps"), -1), "steps is -1", id="negative steps"
    ),
    pytest.param(
        set_in(("runs", 0, "result", "steps"), 10**9), "steps", id="steps too large"
    ),
    pytest.param(
        set_in(("runs", 0, "result", "variable_shapes"), [["a"]]),
        "variable_shapes",
        id="shape strings",
    ),
    pytest.param(
        set_in(("runs", 0, "result", "checkpoint_steps"), [0, 999]),
        "checkpoint_steps",
        id="checkpoint beyond the run",
    ),
    pytest.param(set_in(("digests", "init"), "ab"), "SHA-256", id="digest not hex"),
    pytest.param(
        set_in(("digests", "schedule"), "0" * 64), "schedule", id="schedule digest"
    ),
    pytest.param(
        set_in(("runs", 0, "result", "environment"), [1]), "environment", id="env"
    ),
]


@pytest.mark.parametrize(("edit", "message"), META_CASES)
def test_invalid_meta_exits_2(tmp_path, candidate_trace, capsys, edit, message):
    path = rewrite(candidate_trace, str(tmp_path / "edited.parity"), edit)
    status, _, err = compare_cli(capsys, path, "--out", str(tmp_path / "out"))
    assert status == 2
    assert path in err
    assert message in err
    assert "Traceback" not in err


def replace_tensor(name: str, value: np.ndarray):
    def edit(tensors: dict) -> None:
        tensors[name] = value

    return edit


def drop_tensor(name: str):
    return lambda tensors: tensors.pop(name)


TENSOR_CASES = [
    pytest.param(
        replace_tensor("run/0/steps/digest", np.zeros((3, 149))),
        "steps/digest",
        id="digest rows",
    ),
    pytest.param(
        replace_tensor("run/0/steps/loss", np.zeros(STEPS, np.int64)),
        "expected floats",
        id="loss integers",
    ),
    pytest.param(drop_tensor("run/0/steps/loss"), "is missing", id="loss missing"),
    pytest.param(
        replace_tensor("run/0/checkpoint/4/param/0", np.zeros((3, 3), np.float32)),
        "checkpoint/4/param/0",
        id="checkpoint shape",
    ),
    pytest.param(
        replace_tensor("run/0/predictions/data", np.zeros((7, 1))),
        "predictions/data",
        id="predictions rows",
    ),
    pytest.param(
        replace_tensor("schedule", np.zeros((EPOCHS, 1000), np.float32)),
        "schedule",
        id="schedule floats",
    ),
]


@pytest.mark.parametrize(("edit", "message"), TENSOR_CASES)
def test_invalid_tensors_exit_2(tmp_path, candidate_trace, capsys, edit, message):
    path = rewrite(candidate_trace, str(tmp_path / "edited.parity"), None, edit)
    status, _, err = compare_cli(capsys, path)
    assert status == 2
    assert path in err
    assert message in err


def test_missing_trace_exits_2(tmp_path, capsys):
    path = str(tmp_path / "absent.parity")
    status, _, err = compare_cli(capsys, path)
    assert status == 2
    assert f"Trace {path} not found" in err


def test_unknown_protocol_exits_2(capsys):
    status, _, err = compare_cli(capsys, "nosuchprotocol://bucket/run.parity")
    assert status == 2
    assert "nosuchprotocol://bucket/run.parity" in err


def test_mixed_kinds_exit_2(tmp_path, candidate_trace, capsys):
    fit = write_fit_trace(tmp_path / "fit.parity")
    status, _, err = compare_cli(capsys, candidate_trace, fit)
    assert status == 2
    assert "different kinds" in err


# ---------------------------------------------------------------------------
# Traces of model.fit, written without Keras


def write_fit_trace(path: Path, *, shuffle: bool = False, scale: float = 0.0) -> str:
    init = initial_weights(NAMES, SHAPES, 0)
    tensors = {f"initial/param/{j}": w for j, w in enumerate(init)}
    for epoch in (1, 2):
        for j, w in enumerate(init):
            moved = w + 0.1 * epoch
            tensors[f"epoch/{epoch}/param/{j}"] = moved * (1 + scale)
    tensors["epochs/loss"] = np.array([0.6, 0.5])
    meta = {
        "kind": "keras-fit",
        "kind_version": 1,
        "label": "tensorflow",
        "backend": "tensorflow",
        "environment": ENVIRONMENT,
        "model": {
            "variable_names": NAMES,
            "variable_shapes": [list(s) for s in SHAPES],
        },
        "fit": {"steps_per_epoch": 32, "shuffle": shuffle, "replay_note": "note"},
        "init_digest": digest_bytes(init),
        "data": None,
        "weight_epochs": [1, 2],
        "final_logs": {"loss": 0.5},
    }
    write_trace(path, meta, tensors)
    return str(path)


def test_fit_traces_judged(tmp_path):
    baseline = write_fit_trace(tmp_path / "a.parity")
    close = write_fit_trace(tmp_path / "b.parity", scale=1e-6)
    far = write_fit_trace(tmp_path / "c.parity", scale=0.1)
    shuffled = write_fit_trace(tmp_path / "d.parity", shuffle=True)
    result = record.compare_traces(
        CompareOptions([baseline, close, far, shuffled], out=tmp_path / "out")
    )
    verdicts = [row.verdict for row in result.rows]
    assert verdicts == ["baseline", "roundoff", "divergent", "inconclusive"]
    assert result.rows[3].level == "outcome"
    assert "shuffled" in result.rows[3].reason
    assert (tmp_path / "out" / "report.html").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_in(("fit", "shuffle"), "no"), "shuffle"),
        (set_in(("weight_epochs",), [0]), "weight_epochs"),
        (set_in(("model", "variable_shapes"), [[3, 12]]), "initial/param/0"),
    ],
)
def test_invalid_fit_trace_exits_2(tmp_path, capsys, edit, message):
    good = write_fit_trace(tmp_path / "a.parity")
    path = rewrite(good, str(tmp_path / "b.parity"), edit)
    status, _, err = compare_cli(capsys, good, path)
    assert status == 2
    assert path in err
    assert message in err


# ---------------------------------------------------------------------------
# Fuzzing the loader with edited meta and tensors

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400), 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def meta_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += meta_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            paths += meta_paths(item, (*prefix, index))
    return paths


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("fuzz") / "base.parity"
    write_synthetic(path, [synthetic_run("c"), *referee_runs()])
    with read_trace(path) as trace:
        meta = json.loads(json.dumps(trace.meta))
        tensors = {name: trace.tensor(name) for name in trace.tensor_names()}
    return meta, tensors


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzz_loader_rejects_cleanly(fuzz_base, data):
    meta = json.loads(json.dumps(fuzz_base[0]))
    tensors = dict(fuzz_base[1])
    paths = meta_paths(meta)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        value = data.draw(JSON_VALUES)
        try:
            target = meta
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced a container on this path
    if data.draw(st.booleans()):
        name = data.draw(st.sampled_from(sorted(tensors)))
        shape = data.draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = data.draw(st.sampled_from([np.float32, np.float64, np.int64, np.bool_]))
        tensors[name] = np.zeros(shape, dtype)
    url = f"memory://fuzz-{uuid.uuid4().hex}.parity"
    try:
        write_trace(url, meta, tensors)
    except ValueError:
        return  # the writer refused the edit, so nothing reaches the reader
    try:
        recorded: RecordedTrace = load_lockstep_trace(url)
    except TraceError:
        return
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://"))
    with recorded.trace:
        judge_all(recorded.results)
        environment_differences(
            [r.meta.get("environment", {}) for r in recorded.candidates]
        )


# ---------------------------------------------------------------------------
# Real runs with TensorFlow and JAX, recorded in worker processes

INSTALLED = installed_backends()
needs_tf_and_jax = pytest.mark.skipif(
    not {"tensorflow", "jax"} <= set(INSTALLED),
    reason=f"needs tensorflow and jax; found {INSTALLED}",
)
RECORD_EPOCHS = "2"
FAULTY = "tensorflow:cpu:graph:float32"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[str, str]:
    """Record TensorFlow (one thread), JAX, and TensorFlow with the fused-ReLU fault.

    The faulty run is recorded with a JAX float64 referee and envelope runs, so
    that comparing needs no training.
    """
    directory = tmp_path_factory.mktemp("recorded")
    paths = {name: str(directory / f"{name}.parity") for name in ("tf", "jax", "fault")}
    common = ["--epochs", RECORD_EPOCHS, "--jobs", "1"]
    statuses = [
        main(["-q", "record", "--config", "tensorflow:cpu:graph:float32:threads=1",
              "-o", paths["tf"], *common]),
        main(["-q", "record", "--config", "jax:cpu:jit:float32", "-o", paths["jax"],
              *common]),
        main(["-q", "record", "--config", FAULTY, "--fault", "fused-dense-relu",
              "--with-referee", "--referee", "jax:cpu:jit:float64",
              "-o", paths["fault"], *common]),
    ]  # fmt: skip
    assert statuses == [0, 0, 0]
    return paths


@pytest.mark.slow
@needs_tf_and_jax
def test_recorded_trace_contents(recorded):
    with read_trace(recorded["fault"]) as trace:
        meta = trace.meta
        roles = [run["role"] for run in meta["runs"]]
        assert roles == ["candidate", "referee", "envelope", "envelope"]
        assert meta["runs"][0]["faults"] == ["fused-dense-relu"]
        assert meta["scenario"]["epochs"] == int(RECORD_EPOCHS)
        assert set(meta["digests"]) == {"init", "schedule", "data"}
        assert "versions" in meta["environment"]
        names = trace.tensor_names()
        assert "schedule" in names
        for name in ("steps/loss", "steps/digest", "checkpoint/0/param/0"):
            assert f"run/0/{name}" in names
        assert "run/0/predictions/grid" in names


@pytest.fixture(scope="module")
def compared(recorded, tmp_path_factory) -> tuple[int, str, dict, Path]:
    """Run `parity compare` once on the three recorded traces."""
    out = tmp_path_factory.mktemp("compared")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(
            ["-q", "compare", recorded["tf"], recorded["jax"], recorded["fault"],
             "--out", str(out)]
        )  # fmt: skip
    summary = json.loads((out / "results.json").read_text())
    return status, printed.getvalue(), summary, out


TF_LABEL = "tensorflow:cpu:graph:float32:threads=1 (tf.parity)"
JAX_LABEL = "jax:cpu:jit:float32 (jax.parity)"
FAULT_LABEL = f"{FAULTY} (fault.parity)"


@pytest.mark.slow
@needs_tf_and_jax
def test_tf_and_jax_traces_compare_roundoff(recorded, compared):
    status, printed, summary, out = compared
    verdicts = {entry["label"]: entry for entry in summary["configs"]}
    assert verdicts[TF_LABEL]["verdict"] in ("consistent", "roundoff")
    assert verdicts[JAX_LABEL]["verdict"] in ("consistent", "roundoff")
    assert verdicts[FAULT_LABEL]["verdict"] == "divergent"
    assert verdicts[FAULT_LABEL]["first_divergent_step"] == 1
    assert status == 1
    assert summary["referee_source"] == recorded["fault"]
    assert "report.html" in printed
    assert (out / "report.html").exists()


@pytest.mark.slow
@needs_tf_and_jax
def test_checkpoint_distance_separates_fault(compared):
    _, _, summary, _ = compared
    final = {
        entry["label"]: list(entry["checkpoint_distance"].values())[-1]
        for entry in summary["configs"]
    }
    assert final[TF_LABEL] < 1e-4
    assert final[JAX_LABEL] < 1e-4
    assert final[FAULT_LABEL] > 1e-2


@pytest.mark.slow
@needs_tf_and_jax
def test_recorded_environments_differ_item_by_item(compared):
    _, printed, summary, out = compared
    rows = {row["item"]: row["values"] for row in summary["environment_differences"]}
    assert rows["backend"] == {
        TF_LABEL: "tensorflow",
        JAX_LABEL: "jax",
        FAULT_LABEL: "tensorflow",
    }
    assert rows["flags.OMP_NUM_THREADS"] == {
        TF_LABEL: "1",
        JAX_LABEL: None,
        FAULT_LABEL: None,
    }
    assert rows["threads.intra_op"][TF_LABEL] == "1"
    assert "flags.KERAS_BACKEND" in rows
    assert "versions.numpy" not in rows
    assert "environment differences" in printed
    assert "flags.OMP_NUM_THREADS" in (out / "report.html").read_text()


@pytest.mark.slow
@needs_tf_and_jax
def test_replay_of_faulty_trace_localizes(recorded, tmp_path):
    options = ReplayOptions(
        recorded["fault"],
        configs=f"{FAULTY},jax:cpu:jit:float32",
        out=tmp_path,
        jobs=1,
        localize=True,
        max_variants=0,  # no setting search: it costs worker runs, not needed here
    )
    result = record.replay_trace(options)
    verdicts = {entry["label"]: entry for entry in result.summary["configs"]}
    recorded_entry = verdicts[f"{FAULTY} (recorded in fault.parity)"]
    replayed = verdicts[f"{FAULTY} (replayed here)"]
    clean = verdicts["jax:cpu:jit:float32 (replayed here)"]
    assert recorded_entry["verdict"] == "divergent"
    assert replayed["verdict"] == "divergent"
    assert clean["verdict"] in ("consistent", "roundoff")
    assert result.bad
    assert any("fused-dense-relu is applied again" in note for note in result.notes)

    localization = replayed["localization"]
    assert localization["status"] == "localized"
    assert localization["layer_index"] == 0
    assert localization["layer_class"] == "Dense"
    assert localization["phase"] == "forward"
    assert "localization" not in recorded_entry
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["configs"][1]["localization"]["layer_class"] == "Dense"
    assert "Localization" in (tmp_path / "report.html").read_text()


FIT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["KERAS_BACKEND"] = sys.argv[1]
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import keras
    from parity.config import parse_config
    from parity.faults import CATALOGUE
    from parity.keras import Recorder
    from parity.lockstep import initial_weights
    from parity.scenarios import get_scenario

    scenario = get_scenario("circles")
    x, y = scenario.data()
    # Each job: output path, shuffle (0 or 1), fault (0 or 1). Faulted jobs come
    # last, because the fault patches Dense for the rest of the process.
    for out, shuffle, fault in zip(*[iter(sys.argv[2:])] * 3):
        if fault == "1":
            CATALOGUE["fused-dense-relu"].apply(parse_config(sys.argv[1]))
        model = scenario.build(keras, "relu")
        paths = [v.path for v in model.weights]
        shapes = [tuple(v.shape) for v in model.weights]
        model.set_weights(initial_weights(paths, shapes, 0))
        model.compile(optimizer=keras.optimizers.Adam(0.01),
                      loss="binary_crossentropy", metrics=["accuracy"])
        recorder = Recorder(out, shuffle=shuffle == "1", data=(x, y))
        model.fit(x, y, epochs=2, batch_size=32, shuffle=shuffle == "1",
                  verbose=0, callbacks=[recorder])
    """
)


@pytest.fixture(scope="module")
def fit_traces(tmp_path_factory) -> dict[str, str]:
    """Record model.fit with JAX (plain, shuffled, faulty) and with TensorFlow."""
    directory = tmp_path_factory.mktemp("fit")
    paths = {
        name: str(directory / f"{name}.parity")
        for name in ("jax", "shuffled", "fault", "tf")
    }
    jobs = {
        "jax": [paths["jax"], "0", "0", paths["shuffled"], "1", "0",
                paths["fault"], "0", "1"],
        "tensorflow": [paths["tf"], "0", "0"],
    }  # fmt: skip
    for backend, arguments in jobs.items():
        subprocess.run(
            [sys.executable, "-c", FIT_SCRIPT, backend, *arguments],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return paths


@pytest.mark.slow
@needs_tf_and_jax
def test_recorder_traces_compare(fit_traces, tmp_path, capsys):
    status, printed, _ = compare_cli(
        capsys,
        fit_traces["jax"],
        fit_traces["tf"],
        fit_traces["fault"],
        fit_traces["shuffled"],
        "--out",
        str(tmp_path),
    )
    summary = json.loads((tmp_path / "results.json").read_text())
    verdicts = [entry["verdict"] for entry in summary["traces"]]
    assert verdicts == ["baseline", "roundoff", "divergent", "inconclusive"]
    ratios = [entry["first_epoch_ratio"] for entry in summary["traces"]]
    assert ratios[1] < 1e-4
    assert ratios[2] > 0.1
    assert status == 1
    assert "shuffled the data" in printed


@pytest.mark.slow
@needs_tf_and_jax
def test_recorder_trace_contents(fit_traces):
    with read_trace(fit_traces["shuffled"]) as trace:
        meta = trace.meta
        assert meta["kind"] == "keras-fit"
        assert meta["fit"]["replayable"] is False
        assert "shuffle" in meta["fit"]["replay_note"]
        assert meta["weight_epochs"] == [1, 2]
        assert meta["data"]["samples"] == 1000
        assert trace.tensor("batches/loss").shape == (64,)
        assert list(trace.tensor("batches/epoch")[[0, 63]]) == [0, 1]
        assert "epoch/2/param/0" in trace.tensor_names()
