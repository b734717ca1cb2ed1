"""The doctor end to end, on the real backends installed here.

These tests train real models in worker processes, so they take minutes. The
default run is the README's main job: `parity doctor` with no arguments.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import parity
from parity.discover import apple_silicon, nvidia_driver_present
from parity.doctor import DoctorOptions, plan_doctor
from parity.env import installed_backends
from parity.runner import load_result_arrays
from parity.scenarios import decision_grid, get_scenario
from parity.verdict import predicted_classes

INSTALLED = installed_backends()
FAULTY = "tensorflow:cpu:graph:float32"
CONFIG_FIELDS = {
    "config",
    "backend",
    "device",
    "mode",
    "precision",
    "status",
    "verdict",
    "reason",
    "first_divergent_step",
    "final_loss",
    "final_accuracy",
    "boundary_disagreement",
    "max_distance",
    "excess",
}

needs_all = pytest.mark.skipif(
    len(INSTALLED) < 3, reason=f"needs tensorflow, jax and torch; found {INSTALLED}"
)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """Run `parity doctor` with no arguments in a fresh directory, as a user would."""
    directory = tmp_path_factory.mktemp("doctor")
    completed = subprocess.run(
        [sys.executable, "-m", "parity.cli", "doctor"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    summary = json.loads((directory / "parity-report" / "results.json").read_text())
    return completed, summary, directory


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """Run circles with the fused dense+ReLU fault on TensorFlow's graph mode only."""
    out = tmp_path_factory.mktemp("faulty")
    result = parity.check(
        configs=[
            FAULTY,
            "tensorflow:cpu:eager:float32",
            "jax:cpu:jit:float32",
            "tensorflow:cpu:graph:float32:threads=1",
            "tensorflow:cpu:graph:float32:threads=2",
        ],
        faults=[f"fused-dense-relu@{FAULTY}"],
        epochs=30,
        out=out,
    )
    return result, {entry["config"]: entry for entry in result.summary["configs"]}


@needs_all
def test_default_doctor_exits_zero(default_run):
    completed, _, _ = default_run
    assert completed.returncode == 0, completed.stderr[-3000:]


@needs_all
def test_default_doctor_cpu_verdicts(default_run):
    _, summary, _ = default_run
    cpu = [entry for entry in summary["configs"] if entry["device"] == "cpu"]
    assert {entry["backend"] for entry in cpu} == {"tensorflow", "jax", "torch"}
    modes = {(entry["backend"], entry["mode"]) for entry in cpu}
    for expected in [
        ("tensorflow", "graph"),
        ("tensorflow", "xla"),
        ("jax", "jit"),
        ("torch", "eager"),
    ]:
        assert expected in modes
    for entry in cpu:
        assert entry["verdict"] in ("consistent", "roundoff"), entry
        assert entry["final_accuracy"] == 1.0, entry
        assert entry["first_divergent_step"] is None


@needs_all
def test_default_doctor_writes_report(default_run):
    _, summary, directory = default_run
    page = (directory / "parity-report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    for entry in summary["configs"]:
        assert entry["config"] in page
    assert "Decision boundaries" in page
    assert "round-off envelope" in page or "envelope" in page


@needs_all
def test_absent_devices_are_not_run(default_run):
    _, summary, _ = default_run
    for entry in summary["configs"]:
        if entry["device"] != "cpu":
            assert entry["verdict"] in ("not-run", "consistent", "roundoff")
            if entry["verdict"] == "not-run":
                assert entry["reason"]


@needs_all
def test_json_contract(default_run):
    _, summary, _ = default_run
    for key in ("scenario", "referee", "environment", "configs"):
        assert key in summary
    assert summary["referee"]["precision"] == "float64"
    for entry in summary["configs"]:
        assert CONFIG_FIELDS <= entry.keys()
    environment = summary["configs"][0]["environment"]
    for key in ("platform", "cpu", "python", "versions", "plugins", "flags", "devices"):
        assert key in environment
    assert environment["flags"]["KERAS_BACKEND"] == summary["configs"][0]["backend"]


@needs_all
def test_same_initial_weights_and_batches(default_run):
    _, summary, directory = default_run
    runs = summary["configs"] + summary["envelope"] + [summary["referee"]]
    finished = [run for run in runs if run["status"] == "ok"]
    assert len({run["init_digest"] for run in finished}) == 1
    assert len({run["schedule_digest"] for run in finished}) == 1

    # The weights each backend actually loaded, read back before the first step.
    loaded = []
    for run_dir in sorted((directory / "parity-report" / "runs").iterdir()):
        if run_dir.name.startswith(("envelope", "na-")):
            continue
        arrays = load_result_arrays(run_dir)
        loaded.append([arrays[f"checkpoint/0/param/{i}"] for i in range(6)])
    assert len(loaded) >= 4
    for other in loaded[1:]:
        for ours, theirs in zip(loaded[0], other, strict=True):
            np.testing.assert_array_equal(
                ours.astype(np.float64), theirs.astype(np.float64)
            )


@pytest.mark.skipif(
    "tensorflow" not in INSTALLED or "jax" not in INSTALLED,
    reason="needs tensorflow and jax",
)
def test_fused_relu_fault_is_divergent(faulty_run):
    _, entries = faulty_run
    faulty = entries[FAULTY]
    assert faulty["verdict"] == "divergent"
    assert faulty["first_divergent_step"] in (0, 1)
    assert faulty["excess"] > 1e3
    assert faulty["boundary_disagreement"] > 0.2
    assert "excess" in faulty["reason"]


@pytest.mark.skipif(
    "tensorflow" not in INSTALLED or "jax" not in INSTALLED,
    reason="needs tensorflow and jax",
)
def test_fault_spares_other_configs(faulty_run):
    _, entries = faulty_run
    for config, entry in entries.items():
        if config != FAULTY:
            assert entry["verdict"] in ("consistent", "roundoff"), entry
            assert entry["faults"] == []


@pytest.mark.skipif("tensorflow" not in INSTALLED, reason="needs tensorflow")
def test_faulty_boundary_is_nearly_linear(faulty_run):
    result, _ = faulty_run
    faulty = next(r for r in result.candidates if str(r.run.config) == FAULTY)
    x, _ = get_scenario("circles").data()
    _, _, grid = decision_grid(x)
    classes = predicted_classes(faulty.arrays["predictions/grid"])
    referee = predicted_classes(result.referee.arrays["predictions/grid"])
    # A straight line separates the faulty model's classes on the grid, not the referee's.
    assert _linear_separability(grid, classes) > 0.99
    assert _linear_separability(grid, referee) < 0.9


def _linear_separability(points, classes):
    if len(set(classes)) < 2:
        return 1.0
    model = LogisticRegression(C=1e4, max_iter=2000).fit(points, classes)
    return model.score(points, classes)


@pytest.mark.skipif("tensorflow" not in INSTALLED, reason="needs tensorflow")
def test_thread_count_is_roundoff(faulty_run):
    _, entries = faulty_run
    for threads in (1, 2):
        entry = entries[f"tensorflow:cpu:graph:float32:threads={threads}"]
        assert entry["verdict"] in ("consistent", "roundoff"), entry
        assert entry["excess"] < 30
        assert entry["environment"]["threads"]["intra_op"] == threads


def _hide_backend_site(directory: Path, name: str) -> Path:
    """Write a sitecustomize that makes `import NAME` fail as if it were not installed."""
    site = directory / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys

            class _Hide:
                def find_spec(self, fullname, path=None, target=None):
                    if fullname == {name!r} or fullname.startswith({name!r} + "."):
                        raise ModuleNotFoundError(f"No module named {{fullname!r}}")
                    return None

            sys.meta_path.insert(0, _Hide())
            """
        )
    )
    return site


@pytest.mark.skipif("jax" not in INSTALLED, reason="needs jax")
def test_missing_backend_is_not_run(tmp_path):
    site = _hide_backend_site(tmp_path, "torch")
    env = {**os.environ, "PYTHONPATH": str(site)}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity.cli",
            "doctor",
            "--configs",
            "jax:cpu:jit,torch:cpu:eager",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--no-report",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    entries = {entry["config"]: entry for entry in summary["configs"]}
    assert entries["torch:cpu:eager:float32"]["verdict"] == "not-run"
    assert "not installed" in entries["torch:cpu:eager:float32"]["reason"]
    assert entries["jax:cpu:jit:float32"]["verdict"] in ("consistent", "roundoff")
    assert completed.returncode == 0, completed.stderr[-2000:]


@pytest.mark.skipif(
    nvidia_driver_present() or apple_silicon(), reason="has an accelerator"
)
def test_named_absent_device_is_not_run():
    runs = plan_doctor(
        DoctorOptions(configs=["jax:gpu:jit", "torch:mps", "jax:cpu:jit"])
    )
    reasons = {str(r.config): r.not_run_reason for r in runs if r.role == "candidate"}
    assert reasons["jax:gpu:jit:float32"] == "no NVIDIA driver found"
    assert "macOS" in reasons["torch:mps:eager:float32"]
    assert reasons["jax:cpu:jit:float32"] is None
