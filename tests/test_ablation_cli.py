"""`parity doctor --ablate-activation` through the command line.

One doctor run per hidden activation (relu, sigmoid, tanh, elu) on circles for 2
epochs: the JAX candidate, the float64 referee and two envelope runs each, so 16
worker processes. On a busy two-core CPU it takes a few minutes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from parity.diagnose import ABLATION_ACTIVATIONS
from parity.env import installed_backends

CONFIG = "jax:cpu:jit:float32"

pytestmark = pytest.mark.skipif(
    "jax" not in installed_backends(), reason="needs jax for the candidate"
)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """Run the ablation as a user would; return the process and the output folder."""
    out = tmp_path_factory.mktemp("ablation")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity.cli",
            "doctor",
            "--ablate-activation",
            "--configs",
            CONFIG,
            "--epochs",
            "2",
            "--jobs",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    return completed, out


def _output(completed: subprocess.CompletedProcess[str]) -> str:
    lines = (completed.stdout + completed.stderr).splitlines()
    return "\n".join(line for line in lines if "I0000" not in line)[-3000:]


@pytest.mark.slow
def test_ablation_exit_status(ablation):
    completed, _ = ablation
    assert completed.returncode == 0, _output(completed)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ABLATION_ACTIVATIONS)
def test_ablation_row_per_activation(ablation, activation):
    completed, out = ablation
    rows = [
        line
        for line in completed.stdout.splitlines()
        if line.startswith(f"{activation}: referee R squared ")
    ]
    assert len(rows) == 1, _output(completed)
    assert f"{CONFIG} " in rows[0]
    results = json.loads((out / "ablation" / activation / "results.json").read_text())
    assert results["scenario"]["activation"] == activation
    assert [entry["config"] for entry in results["configs"]] == [CONFIG]


@pytest.mark.slow
def test_ablation_json_lists_activations(ablation):
    _, out = ablation
    saved = json.loads((out / "ablation" / "ablation.json").read_text())
    activations = [row["activation"] for row in saved["rows"]]
    assert activations == list(ABLATION_ACTIVATIONS)


@pytest.mark.slow
def test_ablation_conclusion_names_cause(ablation):
    """A correct configuration leaves only the activation to change the boundary."""
    completed, out = ablation
    found = re.search(r"^ablation \((\w+)\): (.*)$", completed.stdout, re.MULTILINE)
    assert found is not None, _output(completed)
    follows, summary = found.groups()
    assert follows == "activation", summary
    assert "the difference follows the activation, not the device" in summary
    saved = json.loads((out / "ablation" / "ablation.json").read_text())
    assert saved["follows"] == follows
