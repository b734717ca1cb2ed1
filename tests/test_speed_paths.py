"""The paths that make lockstep runs cheap: JAX stepping, batched records, thread
shares for parallel workers, and the store of referee and envelope runs."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import parity
from parity import cache, lockstep
from parity.config import parse_config
from parity.env import installed_backends
from parity.errors import InputError
from parity.runner import PlannedRun, available_cores, execute, worker_threads
from parity.worker import ARRAYS_FILE

INSTALLED = installed_backends()
needs_jax = pytest.mark.skipif("jax" not in INSTALLED, reason="needs jax")
needs_tf_and_jax = pytest.mark.skipif(
    not {"jax", "tensorflow"} <= set(INSTALLED), reason="needs tensorflow and jax"
)
needs_all = pytest.mark.skipif(
    len(INSTALLED) < 3, reason=f"needs tensorflow, jax and torch; found {INSTALLED}"
)

# Runs train_on_batch and JaxStepper from the same weights on the same batches and
# prints whether every loss, accuracy, weight and optimizer value is bit-identical.
COMPARE_STEPPERS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from parity import lockstep, stepping
    from parity.config import parse_config
    from parity.scenarios import get_scenario
    from parity.worker import compile_model, configure_backend, set_environment

    config = parse_config("jax:cpu:jit:float32")
    set_environment(config)
    keras = configure_backend(config)
    scenario = get_scenario(sys.argv[1])
    x, y = scenario.data()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 32 * 20, 32)]
    found = {}
    for stepper_class in (stepping.KerasStepper, stepping.JaxStepper):
        model = scenario.build(keras, "relu")
        compile_model(keras, model, scenario, config, scenario.learning_rate)
        model.set_weights(lockstep.initial_weights(
            [v.path for v in model.weights], [tuple(v.shape) for v in model.weights], 0
        ))
        stepper = stepper_class(model)
        first, rest = stepper.run(batches[:7]), stepper.run(batches[7:])
        stepper.finish()
        found[stepper_class.__name__] = (
            np.concatenate([first.loss, rest.loss]),
            np.concatenate([first.accuracy, rest.accuracy]),
            first.weights + rest.weights,
            stepper.optimizer_values(),
            [np.asarray(v.numpy()) for v in model.weights],
        )
    keras_run, jax_run = found["KerasStepper"], found["JaxStepper"]
    same = lambda a, b: all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    print(json.dumps({
        "loss": bool(np.array_equal(keras_run[0], jax_run[0])),
        "accuracy": bool(np.array_equal(keras_run[1], jax_run[1])),
        "weights": all(same(p, q) for p, q in zip(keras_run[2], jax_run[2], strict=True)),
        "optimizer": same(keras_run[3], jax_run[3]),
        "synced": same(jax_run[2][-1], jax_run[4]),
        "steps": len(jax_run[2]),
        "accuracy_varies": bool(np.unique(jax_run[1]).size > 1),
    }))
    """
)


@needs_jax
@pytest.mark.parametrize("scenario", ["blobs", "digits"])
def test_jax_stepper_matches_train_on_batch(scenario):
    completed = subprocess.run(
        [sys.executable, "-c", COMPARE_STEPPERS, scenario],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found == {
        "loss": True,
        "accuracy": True,
        "weights": True,
        "optimizer": True,
        "synced": True,
        "steps": 20,
        # Per-batch accuracies, not a running mean that would hide a bad batch.
        "accuracy_varies": True,
    }


def test_sketch_of_many_rows_equals_row_by_row():
    rng = np.random.default_rng(0)
    for num_params in (40, 1000):
        sketch = lockstep.Sketch(num_params, seed=3)
        rows = rng.normal(size=(5, num_params))
        expected = np.stack([sketch(row) for row in rows])
        assert np.array_equal(sketch.many(rows), expected)


@needs_all
def test_per_step_records_match_checkpoints(tmp_path):
    """Norms and sketches recorded in chunks equal those of the checkpointed weights."""
    runs = [
        PlannedRun("jax", parse_config("jax:cpu:jit:float32")),
        PlannedRun("tf", parse_config("tensorflow:cpu:eager:float32")),
        PlannedRun("torch", parse_config("torch:cpu:eager:float32")),
    ]
    common = {"scenario": "digits", "epochs": 2, "batch_size": 64, "seed": 0}
    results = execute(runs, tmp_path, common, jobs=1, timeout=600)
    for result in results:
        assert result.ok, result.error
        arrays, meta = result.arrays, result.meta
        sketch = lockstep.Sketch(meta["num_params"], seed=0)
        assert sketch.buckets is not None  # digits is large enough to be sketched
        for step in meta["checkpoint_steps"]:
            values = [
                arrays[f"checkpoint/{step}/param/{i}"]
                for i in range(len(meta["variable_names"]))
            ]
            norms = [np.linalg.norm(v.astype(np.float64)) for v in values]
            np.testing.assert_allclose(arrays["steps/norms"][step], norms, rtol=1e-12)
            flat = np.concatenate([v.astype(np.float64).ravel() for v in values])
            np.testing.assert_allclose(
                arrays["steps/digest"][step], sketch(flat), rtol=1e-12, atol=1e-12
            )
        assert np.isfinite(arrays["steps/loss"]).all()
        assert meta["checkpoint_steps"] == [0, 29, 58]
        # Snapshots kept through a chunk are copies: a view of the variables would
        # make every step of the chunk record the chunk's last weights.
        steps_changed = np.any(np.diff(arrays["steps/norms"], axis=0) != 0, axis=1)
        assert steps_changed.all()


def test_worker_threads_share_the_cores():
    cores = available_cores()
    assert worker_threads(jobs=1, runs=6) is None
    assert worker_threads(jobs=4, runs=1) is None
    assert worker_threads(jobs=2, runs=6) == max(1, cores // 2)
    assert worker_threads(jobs=4, runs=2) == max(1, cores // 2)


@needs_jax
def test_parallel_workers_get_their_share_unless_configured(tmp_path):
    runs = [
        PlannedRun("shared", parse_config("jax:cpu:jit:float32")),
        PlannedRun("own", parse_config("jax:cpu:jit:float32:threads=1")),
    ]
    common = {"scenario": "circles", "epochs": 1, "batch_size": 32, "seed": 0}
    execute(runs, tmp_path, common, jobs=2, timeout=600)
    share = json.loads((tmp_path / "shared" / "spec.json").read_text())
    own = json.loads((tmp_path / "own" / "spec.json").read_text())
    assert share["threads"] == max(1, available_cores() // 2)
    assert "threads" not in own


@pytest.fixture
def run_store(tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("PARITY_CACHE_DIR", str(store))
    return store


def _doctor(out, **options):
    return parity.check(
        configs=["jax:cpu:jit:float32"], epochs=2, out=out, jobs=2, **options
    )


def _calibration(result):
    summary = result.summary
    return [summary["referee"], *summary["envelope"]]


@needs_tf_and_jax
def test_second_doctor_run_reuses_the_stored_referee(tmp_path, run_store):
    first = _doctor(tmp_path / "first")
    assert [entry["cached"] for entry in _calibration(first)] == [False] * 3
    assert len([p for p in run_store.iterdir() if not p.name.startswith(".")]) == 3

    second = _doctor(tmp_path / "second")
    assert [entry["cached"] for entry in _calibration(second)] == [True] * 3
    before, after = first.summary["configs"][0], second.summary["configs"][0]
    assert (after["verdict"], after["excess"]) == (before["verdict"], before["excess"])
    # The stored runs are copied, so the second output directory is complete.
    referee_dir = tmp_path / "second" / "runs" / second.referee.run.key
    assert (referee_dir / ARRAYS_FILE).is_file()
    assert (tmp_path / "second" / "report.html").is_file()

    third = _doctor(tmp_path / "third", cache=False)
    assert [entry["cached"] for entry in _calibration(third)] == [False] * 3


@needs_tf_and_jax
def test_damaged_store_entry_is_trained_again(tmp_path, run_store):
    first = _doctor(tmp_path / "first")
    key = first.referee.meta["resume_key"]
    (run_store / key / ARRAYS_FILE).write_bytes(b"not safetensors")
    second = _doctor(tmp_path / "second")
    assert second.summary["referee"]["cached"] is False
    assert second.summary["referee"]["status"] == "ok"
    assert second.summary["configs"][0]["verdict"] in ("consistent", "roundoff")


@needs_tf_and_jax
def test_unwritable_store_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PARITY_CACHE_DIR", str(blocker / "store"))
    # CLI tests in the same process may have raised parity's log level with -q.
    caplog.set_level(logging.WARNING, logger="parity")
    result = _doctor(tmp_path / "out")
    assert result.summary["referee"]["status"] == "ok"
    assert result.summary["configs"][0]["verdict"] in ("consistent", "roundoff")
    assert "cannot store run" in caplog.text


def test_store_keeps_the_most_recent_entries(tmp_path):
    source = tmp_path / "run"
    source.mkdir()
    (source / "result.json").write_text("{}")
    store = tmp_path / "store"
    for index in range(5):
        cache.store(store, f"key{index}", source)
        os.utime(store / f"key{index}", (1000.0 * (index + 1),) * 2)
    cache.prune(store, keep=2)
    assert sorted(p.name for p in store.iterdir()) == ["key3", "key4"]
    assert (store / "key4" / "result.json").read_text() == "{}"


def test_empty_cache_variable_turns_the_store_off(monkeypatch, tmp_path):
    monkeypatch.setenv("PARITY_CACHE_DIR", "")
    assert cache.default_cache_dir() is None
    monkeypatch.delenv("PARITY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "parity" / "runs"


def test_store_path_that_is_a_file_is_rejected(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PARITY_CACHE_DIR", str(blocker))
    with pytest.raises(InputError, match="is not a directory"):
        cache.default_cache_dir()
