"""Training cases from public bug reports, run through the doctor on the real backends.

Each fixture is one doctor run that packs several cases into its configurations,
so that the referee and the envelope runs are shared. Epochs are reduced from the
scenarios' defaults: every fault here acts from the first steps.
"""

from __future__ import annotations

from typing import Any

import pytest

from parity.doctor import DoctorOptions, DoctorResult, run_doctor
from parity.verdict import DIVERGENT_EXCESS

# Workers run at once. One keeps a shared two-core machine usable during tests.
JOBS = 1

# Circles epochs: enough for the referee to start bending its boundary, so that a
# nearly linear faulty model disagrees with it on a visible share of the grid.
CIRCLES_EPOCHS = 3

TF_GRAPH = "tensorflow:cpu:graph:float32"
TF_EAGER = "tensorflow:cpu:eager:float32"
JAX_JIT = "jax:cpu:jit:float32"
TF_GRAPH_1_THREAD = "tensorflow:cpu:graph:float32:threads=1"
JAX_JIT_1_THREAD = "jax:cpu:jit:float32:threads=1"

# Within round-off: `consistent` when the predicted classes also agree with the
# referee's, `roundoff` when chaotic drift changed a few of them.
WITHIN_ROUNDOFF = ("consistent", "roundoff")


def _doctor(**options: Any) -> DoctorResult:
    return run_doctor(DoctorOptions(**options))


def _entries(result: Any) -> dict[str, dict[str, Any]]:
    return {entry["config"]: entry for entry in result.summary["configs"]}


def _meta(result: Any, config: str) -> dict[str, Any]:
    return next(r.meta for r in result.candidates if str(r.run.config) == config)


@pytest.fixture(scope="module")
def circles(tmp_path_factory) -> dict[str, dict[str, Any]]:
    result = _doctor(
        scenario="circles",
        configs=[TF_GRAPH, TF_EAGER, JAX_JIT, TF_GRAPH_1_THREAD, JAX_JIT_1_THREAD],
        faults=[
            f"fused-dense-relu@{TF_GRAPH}",
            f"fused-dense-relu@{TF_EAGER}",
            f"fused-dense-relu@{JAX_JIT}",
            f"adam-epsilon@{TF_GRAPH_1_THREAD}",
            f"unordered-reduction@{JAX_JIT_1_THREAD}",
        ],
        epochs=CIRCLES_EPOCHS,
        jobs=JOBS,
        out=tmp_path_factory.mktemp("circles"),
        report=False,
    )
    assert result.referee is not None and result.referee.ok
    return _entries(result)


def test_c1_fused_relu_graph_divergent(circles):
    entry = circles[TF_GRAPH]
    assert entry["verdict"] == "divergent", entry["reason"]
    assert entry["first_divergent_step"] in (0, 1)
    assert entry["excess"] > 100 * DIVERGENT_EXCESS


def test_c1_fused_relu_boundary_nearly_linear(circles):
    # The referee's circle and a nearly straight boundary disagree on a large
    # share of the grid, while round-off flips at most a few boundary points.
    entry = circles[TF_GRAPH]
    assert entry["boundary_disagreement"] > 0.1


def test_c1_fused_relu_eager_unaffected(circles):
    entry = circles[TF_EAGER]
    assert entry["verdict"] in WITHIN_ROUNDOFF, entry["reason"]
    assert entry["excess"] < DIVERGENT_EXCESS


def test_c1_fused_relu_jax_jit_divergent(circles):
    entry = circles[JAX_JIT]
    assert entry["verdict"] == "divergent", entry["reason"]
    assert entry["first_divergent_step"] in (0, 1)
    assert entry["boundary_disagreement"] > 0.1


def test_c5_adam_epsilon_divergent(circles):
    entry = circles[TF_GRAPH_1_THREAD]
    assert entry["faults"] == ["adam-epsilon"]
    assert entry["verdict"] == "divergent", entry["reason"]
    assert entry["first_divergent_step"] in (0, 1)
    assert entry["first_nonfinite_step"] is None


def test_unordered_reduction_within_roundoff(circles):
    entry = circles[JAX_JIT_1_THREAD]
    assert entry["faults"] == ["unordered-reduction"]
    assert entry["verdict"] in WITHIN_ROUNDOFF, entry["reason"]
    assert entry["excess"] < DIVERGENT_EXCESS


TF_MIXED = "tensorflow:cpu:graph:mixed_float16"


@pytest.fixture(scope="module")
def large_circles(tmp_path_factory) -> Any:
    return _doctor(
        scenario="large-circles",
        configs=[TF_GRAPH, TF_MIXED],
        epochs=2,
        jobs=JOBS,
        out=tmp_path_factory.mktemp("large-circles"),
        report=False,
    )


def test_c6_float32_trains_finite(large_circles):
    entry = _entries(large_circles)[TF_GRAPH]
    assert entry["verdict"] in WITHIN_ROUNDOFF, entry["reason"]
    assert entry["first_nonfinite_step"] is None


def test_c6_float16_overflow_divergent(large_circles):
    entry = _entries(large_circles)[TF_MIXED]
    assert entry["verdict"] == "divergent", entry["reason"]
    # The squared radius overflows float16 on every batch, from the first step.
    assert entry["first_nonfinite_step"] == 0
    assert entry["first_divergent_step"] == 0


def test_c6_names_first_nonfinite_layer(large_circles):
    meta = _meta(large_circles, TF_MIXED)
    assert meta["first_nonfinite_step"] == 0
    assert meta["first_nonfinite_layer"] == "squared_radius"
    assert meta["first_nonfinite_phase"] == "forward"
    entry = _entries(large_circles)[TF_MIXED]
    assert entry["first_nonfinite_layer"] == "squared_radius"
    assert entry["first_nonfinite_phase"] == "forward"


def test_c6_float32_has_no_nonfinite_layer(large_circles):
    meta = _meta(large_circles, TF_GRAPH)
    assert meta["first_nonfinite_step"] is None
    assert meta["first_nonfinite_layer"] is None
