"""Localization: attribution of a divergence to a step, layer, phase and setting.

The fast tests check the pieces on synthetic tensors. The slow ones run real
workers: the whole `parity doctor --localize` path on the fused dense+ReLU fault,
the attribution of the gradient, optimizer and NaN faults on all three backends,
and the model diagnosis of a network that is linear by construction. On a busy
two-core CPU they take about five minutes, most of it importing frameworks in
worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import parity
from parity.attribution import Row, attribute, first_nonfinite_phase, guilty_row
from parity.config import parse_config
from parity.diagnose import (
    AblationRow,
    RunDiagnosis,
    _ablation_conclusion,
    _conclude,
    linear_r_squared,
    logits_from_probabilities,
    rewrite_activation,
)
from parity.env import installed_backends
from parity.io import atomic_write_tensors
from parity.localize import LocalizeContext, examined_steps, print_localization
from parity.localize_jobs import Job, Outcome, run_jobs
from parity.lockstep import initial_weights, relative_distance
from parity.phases import REPRODUCER_DIVERGENT_EXCESS, simple_excess
from parity.reproducer import render_script
from parity.runner import PlannedRun, RunResult, execute
from parity.setting import rerun_workaround, segment_verdict, variants
from parity.tensors import DIVERGENT_EXCESS, compare_tensors
from parity.verdict import DIVERGENT_EXCESS as VERDICT_DIVERGENT_EXCESS
from parity.verdict import Judgement, envelope_curve
from parity.workarounds import choose_workaround

INSTALLED = installed_backends()
FUSED = "tensorflow:cpu:graph:float32"
CIRCLES_SHAPES = [(2, 12), (12,), (12, 8), (8,), (8, 1), (1,)]

needs_all = pytest.mark.skipif(
    len(INSTALLED) < 3, reason=f"needs tensorflow, jax and torch; found {INSTALLED}"
)


# Steps, variants and workarounds.


@pytest.mark.parametrize(
    ("judgement", "expected"),
    [
        (Judgement("divergent", "", first_divergent_step=1), [0]),
        (Judgement("divergent", "", first_divergent_step=40), [0, 39]),
        (
            Judgement("divergent", "", first_divergent_step=5, first_nonfinite_step=5),
            [0, 5],
        ),
        (Judgement("failed", "RuntimeError: NaN"), [0]),
    ],
)
def test_examined_steps(judgement, expected):
    assert examined_steps(judgement) == expected


def test_variants_try_eager_first():
    found = variants(parse_config(FUSED), ["tensorflow", "jax", "torch"], "forward")
    assert (found[0].dimension, found[0].changed_to) == ("mode", "eager")
    assert str(found[0].config) == "tensorflow:cpu:eager:float32"
    dimensions = [variant.dimension for variant in found]
    assert dimensions.index("mode") < dimensions.index("threads")
    assert "onednn" in dimensions
    backends = {v.changed_to for v in found if v.dimension == "backend"}
    assert backends == {"jax", "torch"}
    assert "optimizer" not in dimensions


def test_variants_update_fault_tries_optimizer_first():
    found = variants(parse_config("jax:cpu:jit:float32"), ["jax"], "update")
    assert found[0].dimension == "optimizer"
    assert found[0].config == parse_config("jax:cpu:jit:float32")
    assert found[0].optimizer == "reference-adam"


def test_variants_skip_torch_compile():
    found = variants(parse_config("torch:cpu:eager:float32"), ["torch"], "gradient")
    assert all(v.changed_to != "compile" for v in found)


def test_variants_lower_precision_first_tries_float32():
    found = variants(parse_config("jax:cpu:jit:mixed_float16"), ["jax"], "forward")
    precision = [v for v in found if v.dimension == "precision"]
    assert precision[0].config.precision == "float32"


@pytest.mark.parametrize(
    ("phase", "nonfinite", "dimension", "to", "expected"),
    [
        ("forward", False, "mode", "eager", "run-eagerly"),
        ("forward", False, "mode", "graph", "jit-off"),
        ("update", False, None, None, "reference-adam"),
        ("update", False, "optimizer", "reference-adam", "reference-adam"),
        ("forward", True, "precision", "float32", "float32-policy"),
        ("gradient", False, "device", "cpu", "cpu"),
        ("gradient", False, "threads", "1", "pin-threads"),
        ("gradient", False, None, None, None),
    ],
)
def test_choose_workaround(phase, nonfinite, dimension, to, expected):
    found = choose_workaround(phase, nonfinite, dimension, to)
    assert (found.name if found else None) == expected


# Attribution on synthetic tensors: one Dense layer, x @ w + b.


def _dense_tensors(forward_error: float = 0.0, nan_row: bool = False):
    """Return referee, candidate and meta files for one Dense layer at step 0."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4))
    w, b = rng.normal(size=(4, 3)), rng.normal(size=3)
    g = rng.normal(size=(32, 3))
    y = x @ w + b
    referee = {
        "0/state/param/0": w,
        "0/state/param/1": b,
        "0/labels": np.zeros((32, 1), np.float32),
        "0/referee/forward/0/input": x,
        "0/referee/forward/0/output": y,
        "0/referee/loss/value": np.array([1.0]),
        "0/referee/loss/gradient": g,
        "0/referee/gradient/0/upstream": g,
        "0/referee/gradient/0/weight/0": x.T @ g,
        "0/referee/gradient/0/weight/1": g.sum(0),
        "0/referee/gradient/0/input": g @ w.T,
    }

    def f32(value):
        return np.asarray(value, np.float64).astype(np.float32)

    x32, w32, b32, g32 = f32(x), f32(w), f32(b), f32(g)
    out = x32 @ w32 + b32
    phases = {
        "forward/0/output": out,
        "loss/value": f32([1.0]),
        "loss/gradient": g32,
        "gradient/0/weight/0": x32.T @ g32,
        "gradient/0/weight/1": g32.sum(0),
        "gradient/0/input": g32 @ w32.T,
    }
    for key, value in phases.items():
        referee[f"0/reference/isolated/{key}"] = value
        referee[f"0/reference/chained/{key}"] = value
    referee["0/reference/chained/forward/0/input"] = x32
    referee["0/reference/chained/gradient/0/upstream"] = g32
    candidate = {f"0/isolated/{k}": v.copy() for k, v in phases.items()}
    candidate.update({f"0/chained/{k}": v.copy() for k, v in phases.items()})
    candidate["0/chained/forward/0/input"] = x32
    candidate["0/chained/gradient/0/upstream"] = g32
    wrong = out * (1 + forward_error)
    if nan_row:
        wrong = wrong.copy()
        wrong[3] = np.nan
    candidate["0/isolated/forward/0/output"] = wrong.astype(np.float32)
    meta = {
        "trainable_to_weight": [0, 1],
        "layers": [
            {
                "index": 0,
                "name": "dense",
                "class": "Dense",
                "trainable": [0, 1],
                "weights": [0, 1],
                "shapes": [[4, 3], [3]],
                "compute_dtype": "float32",
            }
        ],
    }
    return referee, candidate, meta


def _row(rows, phase):
    return next(row for row in rows if row.phase == phase)


def test_attribute_correct_layer_is_roundoff():
    referee, candidate, meta = _dense_tensors()
    rows = attribute(referee, candidate, meta, 0)
    assert [row.phase for row in rows] == [
        "forward",
        "loss",
        "gradient",
        "update",
        "step",
    ]
    assert _row(rows, "update").introduced_verdict == "not-compared"
    forward = _row(rows, "forward")
    assert forward.introduced_verdict in ("consistent", "roundoff")
    assert forward.introduced < 50
    assert guilty_row(rows, prefer_nonfinite=False) is None


def test_attribute_finds_wrong_forward():
    referee, candidate, meta = _dense_tensors(forward_error=1e-3)
    rows = attribute(referee, candidate, meta, 0)
    forward = _row(rows, "forward")
    assert forward.introduced_verdict == "divergent"
    assert forward.introduced > 1e3
    assert forward.layer == "dense"
    assert forward.inherited < 1
    assert _row(rows, "gradient").introduced_verdict != "divergent"
    assert guilty_row(rows, prefer_nonfinite=False) is forward


def test_attribute_flags_nonfinite():
    referee, candidate, meta = _dense_tensors(nan_row=True)
    rows = attribute(referee, candidate, meta, 0)
    forward = _row(rows, "forward")
    assert forward.nonfinite
    assert math.isinf(forward.introduced)
    assert guilty_row(rows, prefer_nonfinite=True) is forward


def test_attribute_reports_raised_phase():
    referee, candidate, meta = _dense_tensors()
    del candidate["0/isolated/loss/value"]
    del candidate["0/isolated/loss/gradient"]
    errors = [
        {
            "step": 0,
            "source": "isolated",
            "phase": "loss",
            "layer": None,
            "error": "RuntimeError: boom",
        }
    ]
    rows = attribute(referee, candidate, meta, 0, errors)
    loss = _row(rows, "loss")
    assert loss.introduced_verdict == "failed"
    assert "RuntimeError: boom" in loss.message
    assert guilty_row(rows, prefer_nonfinite=False) is loss


def test_first_nonfinite_phase_follows_step_order():
    meta = {
        "layers": [
            {"index": 0, "name": "dense", "class": "Dense", "trainable": [0, 1]},
            {"index": 1, "name": "dense_1", "class": "Dense", "trainable": [2, 3]},
        ]
    }
    finite = np.ones((4, 2), np.float32)
    own = {
        "7/own/forward/0/output": finite,
        "7/own/forward/1/output": finite,
        "7/own/loss/value": np.ones(1, np.float32),
        "7/own/gradient/1/weight/2": finite,
        "7/own/gradient/0/weight/0": np.full((4, 2), np.inf, np.float32),
    }
    phase, layer = first_nonfinite_phase(own, meta, 7)
    assert phase == "gradient"
    assert layer["name"] == "dense"
    own["7/own/forward/1/output"] = np.full((4, 2), np.nan, np.float32)
    phase, layer = first_nonfinite_phase(own, meta, 7)
    assert (phase, layer["name"]) == ("forward", "dense_1")
    assert first_nonfinite_phase({"7/own/loss/value": np.ones(1)}, meta, 7) is None


def _plain_row(phase, verdict, nonfinite=False, layer="dense"):
    return Row(0, phase, layer, 0, "Dense", 1.0, verdict, None, None, nonfinite, "", "")


def test_guilty_row_prefers_first_in_step_order():
    rows = [
        _plain_row("forward", "roundoff"),
        _plain_row("gradient", "divergent"),
        _plain_row("update", "divergent"),
        _plain_row("step", "divergent", layer=None),
    ]
    assert guilty_row(rows, prefer_nonfinite=False).phase == "gradient"


def test_guilty_row_whole_step_only_as_last_resort():
    rows = [
        _plain_row("forward", "roundoff"),
        _plain_row("step", "divergent", layer=None),
    ]
    assert guilty_row(rows, prefer_nonfinite=False).phase == "step"


def test_guilty_row_nonfinite_first_when_preferred():
    rows = [
        _plain_row("forward", "divergent"),
        _plain_row("gradient", "divergent", nonfinite=True),
    ]
    assert guilty_row(rows, prefer_nonfinite=True).phase == "gradient"
    assert guilty_row(rows, prefer_nonfinite=False).phase == "forward"


# Segments that test a workaround.


def _referee_result(digest):
    run = PlannedRun("referee", parse_config("tensorflow:cpu:graph:float64"), "referee")
    meta = {"steps_per_epoch": 4, "steps": len(digest) - 1}
    return RunResult(run, "ok", meta, {"steps/digest": digest})


def test_segment_verdict_roundoff_and_divergent():
    rng = np.random.default_rng(1)
    digest = rng.normal(size=(9, 5))
    referee = _referee_result(digest)
    envelope = np.full(9, 1e-6)
    close = digest[2:7] * (1 + 1e-7)
    verdict, excess, _ = segment_verdict(close, referee, envelope, 2, "float32")
    assert verdict == "roundoff"
    assert excess < 1
    far = digest[2:7] * (1 + 1e-3)
    verdict, excess, reason = segment_verdict(far, referee, envelope, 2, "float32")
    assert verdict == "divergent"
    assert "step 2" in reason
    broken = close.copy()
    broken[3, 0] = np.nan
    verdict, _, reason = segment_verdict(broken, referee, envelope, 2, "float32")
    assert verdict == "divergent"
    assert "step 5" in reason


# Model diagnosis.


def test_linear_r_squared_separates_linear_and_circle():
    rng = np.random.default_rng(2)
    points = rng.uniform(-1, 1, size=(500, 2))
    assert linear_r_squared(points, 3 * points[:, 0] - points[:, 1] + 2) > 0.999999
    radius = np.sum(points**2, axis=1)
    assert linear_r_squared(points, radius - 0.5) < 0.05
    assert linear_r_squared(points, np.ones(500)) is None


def test_logits_from_probabilities_inverts_sigmoid():
    logits = np.array([-3.0, 0.0, 2.5])
    probabilities = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(
        logits_from_probabilities(probabilities)[:, 0], logits, rtol=1e-9
    )


def _run(config, role, r_squared):
    return RunDiagnosis(config, role, r_squared, r_squared >= 0.95, [])


def test_conclude_model_configuration_neither():
    referee = "tensorflow:cpu:graph:float64"
    verdict, summary = _conclude(
        [_run(referee, "referee", 0.99), _run(FUSED, "candidate", 1.0)]
    )
    assert verdict == "model"
    assert "model problem" in summary
    verdict, summary = _conclude(
        [_run(referee, "referee", 0.2), _run(FUSED, "candidate", 1.0)]
    )
    assert verdict == "configuration"
    assert FUSED in summary
    verdict, _ = _conclude(
        [_run(referee, "referee", 0.2), _run(FUSED, "candidate", 0.3)]
    )
    assert verdict == "neither"


def _ablation_row(activation, verdicts, change):
    return AblationRow(activation, verdicts, {}, {}, change, "")


def test_ablation_follows_activation_or_configuration():
    agree = {FUSED: "roundoff", "jax:cpu:jit:float32": "consistent"}
    rows = [
        _ablation_row("relu", agree, 0.0),
        _ablation_row("sigmoid", agree, 0.2),
        _ablation_row("tanh", agree, 0.1),
    ]
    follows, summary = _ablation_conclusion(rows)
    assert follows == "activation"
    assert "sigmoid" in summary
    rows = [
        _ablation_row(
            "relu", {FUSED: "divergent", "jax:cpu:jit:float32": "roundoff"}, 0.0
        ),
        _ablation_row("sigmoid", agree, 0.0),
    ]
    follows, summary = _ablation_conclusion(rows)
    assert follows == "configuration"
    assert f"{FUSED} with relu" in summary


def test_rewrite_activation_keeps_output_layer(tmp_path):
    config = {
        "class_name": "Sequential",
        "config": {
            "layers": [
                {"class_name": "InputLayer", "config": {}},
                {"class_name": "Dense", "config": {"activation": "relu"}},
                {"class_name": "Dense", "config": {"activation": "relu"}},
                {"class_name": "Dense", "config": {"activation": "sigmoid"}},
            ]
        },
    }
    source = tmp_path / "model.keras"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", b"weights")
    target = rewrite_activation(source, "tanh", tmp_path / "tanh" / "model.keras")
    with zipfile.ZipFile(target) as archive:
        rewritten = json.loads(archive.read("config.json"))
        assert archive.read("model.weights.h5") == b"weights"
    activations = [
        layer["config"].get("activation") for layer in rewritten["config"]["layers"]
    ]
    assert activations == [None, "tanh", "tanh", "sigmoid"]


def test_reproducer_threshold_matches_compare():
    assert REPRODUCER_DIVERGENT_EXCESS == DIVERGENT_EXCESS


@pytest.mark.parametrize("error", [0.0, 1e-6, 1e-3])
def test_simple_excess_matches_compare_tensors(error):
    rng = np.random.default_rng(3)
    referee = rng.normal(size=(16, 8))
    reference = referee.astype(np.float32)
    candidate = (referee * (1 + error)).astype(np.float32)
    expected = compare_tensors(candidate, reference, referee, reduction_length=4)
    found = simple_excess(candidate, reference, referee, 4, None, 2.0**-24)
    assert found == pytest.approx(expected.excess, rel=1e-9, abs=1e-12)


def test_reproducer_script_is_valid_python():
    settings = {
        "summary": "step 0: the forward phase of layer dense",
        "phase": "forward",
    }
    source = render_script(settings)
    compile(source, "reproducer.py", "exec")
    assert "class PhaseRunner" in source
    assert "from parity" not in source.split("def apply_faults")[0]


# Real workers.


def _clean_output(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "I0000" not in line)[-3000:]


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    """Run `parity doctor --localize` on circles with the fused dense+ReLU fault."""
    out = tmp_path_factory.mktemp("fused")
    result = parity.check(
        configs=[FUSED],
        faults=[f"fused-dense-relu@{FUSED}"],
        epochs=2,
        jobs=1,
        out=out,
        localize=True,
        rerun_workaround=True,
    )
    entry = next(e for e in result.summary["configs"] if e["config"] == FUSED)
    return result, entry, out


@pytest.mark.slow
def test_fused_fault_localized_to_first_dense_forward(fused_run):
    _, entry, _ = fused_run
    assert entry["verdict"] == "divergent"
    localization = entry["localization"]
    assert localization["status"] == "localized", localization["summary"]
    assert localization["step"] in (0, 1)
    assert localization["layer"] == "dense"
    assert localization["layer_index"] == 0
    assert localization["phase"] == "forward"
    assert localization["excess"] > 1e3


@pytest.mark.slow
def test_fused_fault_setting_is_graph_mode(fused_run):
    _, entry, _ = fused_run
    setting = entry["localization"]["setting"]
    assert setting["dimension"] == "mode"
    assert setting["changed_from"] == "graph"
    assert setting["changed_to"] == "eager"
    assert setting["config"] == "tensorflow:cpu:eager:float32"
    assert "eager mode is right" in setting["summary"]


@pytest.mark.slow
def test_fused_fault_workaround_segment_roundoff(fused_run):
    _, entry, _ = fused_run
    workaround = entry["localization"]["workaround"]
    assert workaround["name"] == "run-eagerly"
    assert workaround["verdict"] == "roundoff", workaround["reason"]
    assert workaround["excess"] < VERDICT_DIVERGENT_EXCESS


@pytest.mark.slow
def test_fused_fault_workaround_full_rerun(fused_run):
    """The whole 2-epoch run with the workaround gets the doctor's own verdict."""
    result, entry, out = fused_run
    assert (
        entry["localization"]["workaround"]["config"] == "tensorflow:cpu:eager:float32"
    )
    workaround = entry["localization"]["workaround"]["full_rerun"]
    assert workaround["verdict"] in ("roundoff", "consistent"), workaround["reason"]
    assert workaround["excess"] is not None
    assert workaround["excess"] < VERDICT_DIVERGENT_EXCESS
    assert workaround["first_divergent_step"] is None
    assert workaround["boundary_disagreement"] is not None
    referee_accuracy = result.referee.meta["final_accuracy"]
    assert workaround["final_accuracy"] == pytest.approx(referee_accuracy, abs=0.01)
    assert workaround["epochs"] == 2
    directory = Path(workaround["run_directory"])
    assert directory.parent.parent == out / "localize"
    saved = json.loads((directory / "result.json").read_text())
    assert saved["steps"] == result.referee.meta["steps"]
    assert saved["faults"] == ["fused-dense-relu"]


@pytest.mark.slow
def test_fused_fault_full_rerun_printed(fused_run, capsys):
    result, entry, out = fused_run
    workaround = entry["localization"]["workaround"]["full_rerun"]
    print_localization(result)
    printed = capsys.readouterr().out
    expected = f"full rerun with it: {workaround['verdict']}, excess "
    assert expected + f"{workaround['excess']:.3g}x" in printed
    assert "segment rerun: roundoff" in printed
    page = (out / "report.html").read_text()
    assert f"Full rerun with it: <b>{workaround['verdict']}</b>, excess " in page


@pytest.mark.slow
def test_fused_fault_reproducer_exits_one(fused_run):
    _, entry, out = fused_run
    script = Path(entry["localization"]["reproducer"])
    assert script.parent.parent == out / "reproducers"
    assert (script.parent / "reproducer.npz").exists()
    completed = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 1, _clean_output(completed.stdout + completed.stderr)
    assert "The disagreement reproduces." in completed.stdout


@pytest.mark.slow
def test_fused_fault_report_and_diagnosis(fused_run):
    result, _, out = fused_run
    page = (out / "report.html").read_text()
    assert "<h2>Localization</h2>" in page
    assert "introduced excess" in page
    assert "Is it the model?" in page
    diagnosis = result.summary["model_diagnosis"]
    assert diagnosis["verdict"] == "configuration", diagnosis["summary"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["configs"][0]["localization"]["phase"] == "forward"


def _rerun_context(result, out, timeout):
    """Return a localization context of the fused run, for `rerun_workaround`."""
    referee = result.referee
    envelope = envelope_curve(
        result.envelope_runs, referee, referee.meta["steps_per_epoch"]
    )
    referee_outcome = Outcome("referee", "ok", {}, out / "localize" / "referee")
    return LocalizeContext(
        result, out, referee, referee_outcome, envelope, 1, timeout, 1, INSTALLED
    )


def _rerun_inputs(result, out):
    """Return the divergent run, its doctor spec and its workaround check."""
    candidate = result.candidates[0]
    spec = json.loads((out / "runs" / candidate.run.key / "spec.json").read_text())
    check = result.localizations[candidate.run.key].workaround
    return candidate, spec, dataclasses.replace(check, full=None)


@pytest.mark.slow
def test_full_rerun_timeout_is_failed(fused_run, tmp_path):
    result, _, out = fused_run
    context = _rerun_context(result, out, timeout=0.5)
    candidate, spec, check = _rerun_inputs(result, out)
    check.full = rerun_workaround(context, candidate, spec, check, tmp_path)
    assert check.full.verdict == "failed"
    assert "timed out after 0.5 s" in check.full.reason
    saved = check.to_dict()
    assert saved["full_rerun"]["verdict"] == "failed"
    assert saved["verdict"] == "roundoff"
    assert context.stopped is None


@pytest.mark.slow
def test_full_rerun_interrupted_is_not_run(fused_run, tmp_path):
    """SIGINT during the rerun stops it; the check reports it and is kept."""
    result, _, out = fused_run
    context = _rerun_context(result, out, timeout=600)
    candidate, spec, check = _rerun_inputs(result, out)
    # The worker imports TensorFlow for longer than this, so it is still running.
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        check.full = rerun_workaround(context, candidate, spec, check, tmp_path)
    finally:
        timer.cancel()
    assert check.full.verdict == "not-run"
    assert "stopped by SIGINT" in check.full.reason
    assert context.stopped == "SIGINT"
    assert check.to_dict()["verdict"] == "roundoff"
    skipped = rerun_workaround(context, candidate, spec, check, tmp_path)
    assert skipped.verdict == "not-run"
    assert skipped.run_directory is None


@pytest.mark.slow
def test_referee_replay_matches_recorded_step(fused_run, tmp_path):
    """A step inside an epoch is reached by replaying from the epoch's checkpoint."""
    result, _, out = fused_run
    referee = result.referee
    run_directory = out / "runs" / referee.run.key
    spec = json.loads((run_directory / "spec.json").read_text())
    for key in ("out_dir", "resume_key", "perturb_seed"):
        spec.pop(key, None)
    spec.update(
        role="referee",
        steps=[40],
        arrays=str(run_directory / "arrays.safetensors"),
    )
    outcome = run_jobs([Job("referee", spec, tmp_path / "referee")], 1, 600)["referee"]
    assert outcome.ok, outcome.error
    count = len(referee.meta["variable_names"])
    params = [outcome.tensors[f"40/state/param/{i}"] for i in range(count)]
    replayed = np.concatenate([p.ravel() for p in params])
    recorded = referee.arrays["steps/digest"][40]
    assert replayed.shape == recorded.shape
    np.testing.assert_allclose(replayed, recorded, rtol=1e-12, atol=0)
    batch = outcome.tensors["40/batch"]
    np.testing.assert_array_equal(batch, referee.arrays["schedule"][1][8 * 32 : 9 * 32])


@pytest.mark.slow
@pytest.mark.skipif("jax" not in INSTALLED, reason="needs jax")
def test_lockstep_worker_swaps_in_reference_adam(tmp_path):
    """The reference Adam avoids the adam-epsilon fault, which patches Keras' Adam.

    A full workaround rerun passes the optimizer option to the lockstep worker.
    """
    config = parse_config("jax:cpu:jit:float32")
    common = {
        "scenario": "circles",
        "epochs": 1,
        "batch_size": 32,
        "seed": 0,
        "learning_rate": 0.01,
        "activation": "relu",
    }
    runs = [
        PlannedRun("plain", config),
        PlannedRun("faulty", config, faults=("adam-epsilon",)),
    ]
    plain, faulty = execute(runs, tmp_path, common, jobs=2, timeout=600)
    (swapped,) = execute(
        [PlannedRun("swapped", config, faults=("adam-epsilon",))],
        tmp_path,
        {**common, "optimizer": "reference-adam"},
        jobs=1,
        timeout=600,
    )
    for result in (plain, faulty, swapped):
        assert result.ok, f"{result.run.key}: {result.error}"
    digest = plain.arrays["steps/digest"]
    faulty_distance = relative_distance(faulty.arrays["steps/digest"], digest)
    swapped_distance = relative_distance(swapped.arrays["steps/digest"], digest)
    assert np.max(faulty_distance) > 1e-3
    assert np.max(swapped_distance) < 1e-6


@pytest.fixture(scope="module")
def fault_attributions(tmp_path_factory):
    """Attribute step 0 of circles for three faults on three backends.

    The referee's state before step 0 is parity's initial weights, so a
    checkpoint is written directly and no doctor run is needed. One worker per
    backend runs the three faults one after the other.
    """
    work = tmp_path_factory.mktemp("faults")
    names = [f"layer{i // 2}/{'kernel' if i % 2 == 0 else 'bias'}" for i in range(6)]
    weights = initial_weights(names, CIRCLES_SHAPES, 0)
    arrays = {
        f"checkpoint/0/param/{i}": w.astype(np.float64) for i, w in enumerate(weights)
    }
    arrays["checkpoint/0/optimizer/0"] = np.array([0], np.int64)
    arrays["checkpoint/0/optimizer/1"] = np.array([0.01], np.float64)
    atomic_write_tensors(work / "arrays.safetensors", arrays)
    base = {
        "scenario": "circles",
        "epochs": 1,
        "batch_size": 32,
        "seed": 0,
        "learning_rate": 0.01,
        "activation": "relu",
        "steps": [0],
    }
    referee_spec = {
        **base,
        "config": "tensorflow:cpu:graph:float64",
        "role": "referee",
        "arrays": str(work / "arrays.safetensors"),
    }
    referee = run_jobs([Job("referee", referee_spec, work / "referee")], 1, 600)[
        "referee"
    ]
    assert referee.ok, referee.error
    configs = [
        "tensorflow:cpu:graph:float32",
        "jax:cpu:jit:float32",
        "torch:cpu:eager:float32",
    ]
    faults = ("relu-grad", "adam-epsilon", "nan-kernel")
    jobs = [
        Job(
            config.split(":")[0],
            {
                **base,
                "config": config,
                "role": "candidate",
                "cases": {fault: [fault] for fault in faults},
                "referee_tensors": str(referee.directory / "tensors.safetensors"),
            },
            work / config.split(":")[0],
        )
        for config in configs
    ]
    outcomes = run_jobs(jobs, 1, 600)
    tables = {}
    for backend, outcome in outcomes.items():
        assert outcome.ok, f"{backend}: {outcome.error}"
        for fault in faults:
            prefix = f"case/{fault}/"
            tensors = {
                key[len(prefix) :]: value
                for key, value in outcome.tensors.items()
                if key.startswith(prefix)
            }
            errors = outcome.meta["cases"][fault]["errors"]
            tables[f"{fault}-{backend}"] = attribute(
                referee.tensors, tensors, referee.meta, 0, errors
            )
    return tables


@needs_all
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_relu_grad_localized_to_gradient(fault_attributions, backend):
    rows = fault_attributions[f"relu-grad-{backend}"]
    guilty = guilty_row(rows, prefer_nonfinite=False)
    assert guilty is not None
    assert guilty.phase == "gradient"
    assert guilty.layer_class == "Dense"
    forward = [row for row in rows if row.phase == "forward"]
    assert all(row.introduced_verdict != "divergent" for row in forward)


@needs_all
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_adam_epsilon_localized_to_update(fault_attributions, backend):
    rows = fault_attributions[f"adam-epsilon-{backend}"]
    guilty = guilty_row(rows, prefer_nonfinite=False)
    assert guilty is not None
    assert guilty.phase == "update"
    early = [row for row in rows if row.phase in ("forward", "loss", "gradient")]
    assert all(row.introduced_verdict != "divergent" for row in early)


@needs_all
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_nan_kernel_localized_to_first_nonfinite(fault_attributions, backend):
    rows = fault_attributions[f"nan-kernel-{backend}"]
    guilty = guilty_row(rows, prefer_nonfinite=True)
    assert guilty is not None
    assert guilty.nonfinite
    assert (guilty.phase, guilty.layer_index) == ("forward", 0)


POOR_MODEL = """
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
import keras

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [
        keras.Input((2,)),
        # Two units whose biases keep them active on every point: ReLU passes its
        # input through, so the whole network is linear.
        keras.layers.Dense(
            2, activation="relu", bias_initializer=keras.initializers.Constant(5.0)
        ),
        keras.layers.Dense(1, activation="sigmoid"),
    ]
)
model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
model.save(sys.argv[1])
"""


@pytest.mark.slow
def test_poor_relu_network_is_a_model_problem(tmp_path):
    from sklearn.datasets import make_circles

    from parity.api import RunOptions, run_model
    from parity.localize import localize_result

    x, y = make_circles(n_samples=1000, noise=0.03, random_state=42)
    np.savez(tmp_path / "circles.npz", x=x.astype(np.float32), y=y.astype(np.float32))
    model = tmp_path / "poor.keras"
    subprocess.run(
        [sys.executable, "-c", POOR_MODEL, str(model)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = run_model(
        RunOptions(
            model=str(model),
            data=str(tmp_path / "circles.npz"),
            configs=["jax:cpu:jit:float32"],
            epochs=2,
            jobs=1,
            out=tmp_path / "out",
        )
    )
    assert result.summary["configs"][0]["verdict"] in ("consistent", "roundoff")
    localize_result(result)
    diagnosis = result.summary["model_diagnosis"]
    assert diagnosis["verdict"] == "model", diagnosis["summary"]
    assert "model problem" in diagnosis["summary"]
    for run in diagnosis["runs"]:
        assert run["nearly_linear"], run
        (hidden,) = run["layers"]
        assert hidden["activation"] == "relu"
        assert hidden["always_active"] == 1.0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["model_diagnosis"]["verdict"] == "model"
