"""Standalone reproducers: one layer's phase on the candidate and on the CPU in float64.

`write_reproducer` writes ``reproducer.py`` and ``reproducer.npz`` into a folder.
The ``.npz`` contains the exact inputs and weights of the guilty layer at the
localized step, in float64 as the referee had them. The script rounds them to
the candidate's dtypes as localization did. The script needs only numpy, the
framework, and ``parity.faults`` when the fault is emulated. It computes the
phase in float64 and in float32 on the CPU in eager mode, before any emulated
fault is applied, and then on the candidate configuration in its own mode. It
prints the values and the excess over round-off. It exits with status 1 when the
disagreement reproduces, 0 when it does not and 2 when it fails.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity import __version__, phases
from parity.config import Configuration
from parity.errors import ParityError
from parity.io import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from parity.localize import Localization

SCRIPT_NAME = "reproducer.py"
DATA_NAME = "reproducer.npz"

# Phases a reproducer can run on one layer. The whole-step phase spans layers.
SUPPORTED_PHASES = ("forward", "gradient", "loss", "update")


class ReproducerError(ParityError):
    """A reproducer cannot be written for this localization."""


def write_reproducer(
    directory: Path,
    localization: Localization,
    referee: dict[str, np.ndarray],
    meta: dict[str, Any],
    config: Configuration,
    faults: Sequence[str],
    candidate_layers: Sequence[dict[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write the script and its data for a localized layer and phase; return both paths.

    ``referee`` and ``meta`` are the referee localization worker's tensors and
    result. ``candidate_layers`` are the layer descriptions of the candidate's
    worker, whose compute dtypes the script uses. Raises ReproducerError when the
    phase spans layers or the layer cannot be serialized.
    """
    phase = localization.phase
    if phase not in SUPPORTED_PHASES:
        raise ReproducerError(
            f"the {phase} phase spans several layers; rerun the doctor with the "
            "configuration to reproduce it"
        )
    step = localization.step or 0
    data, settings = _phase_data(phase, localization.layer_index, referee, meta, step)
    settings.update(
        {
            "config": str(config),
            "backend": config.backend,
            "device": config.device,
            "device_index": config.device_index,
            "mode": config.mode,
            "precision": config.precision,
            "threads": config.threads,
            "onednn": config.onednn,
            "faults": list(faults),
            "phase": phase,
            "step": step,
            "summary": localization.summary,
            "threshold": phases.REPRODUCER_DIVERGENT_EXCESS,
            "output_dtype": (candidate_layers or meta["layers"])[-1]["compute_dtype"],
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    data_path = directory / DATA_NAME
    atomic_write(data_path, lambda stream: np.savez(stream, **data))
    script_path = directory / SCRIPT_NAME
    atomic_write_text(script_path, render_script(settings))
    script_path.chmod(0o755)
    return script_path, data_path


def _phase_data(
    phase: str,
    layer_index: int | None,
    referee: dict[str, np.ndarray],
    meta: dict[str, Any],
    step: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    prefix = f"{step}/"

    def state(index: int) -> np.ndarray:
        return np.asarray(referee[f"{prefix}state/param/{index}"], np.float64)

    if phase == "loss":
        layers = meta["layers"]
        last = layers[-1]["index"]
        return (
            {
                "y_true": referee[prefix + "labels"],
                "y_pred": referee[f"{prefix}referee/forward/{last}/output"],
            },
            {"loss": meta["loss"]},
        )
    if phase == "update":
        to_weight = meta["trainable_to_weight"]
        count = sum(1 for key in referee if key.startswith(prefix + "state/optimizer/"))
        data = {f"param_{j}": state(w) for j, w in enumerate(to_weight)}
        data.update(
            {f"slot_{i}": referee[f"{prefix}state/optimizer/{i}"] for i in range(count)}
        )
        for layer in meta["layers"]:
            for j in layer["trainable"]:
                data[f"grad_{j}"] = referee[
                    f"{prefix}referee/gradient/{layer['index']}/weight/{j}"
                ]
        guilty = next(
            (x for x in meta["layers"] if x["index"] == layer_index), meta["layers"][0]
        )
        if meta.get("optimizer") is None:
            raise ReproducerError("the optimizer cannot be serialized")
        return data, {
            "optimizer": meta["optimizer"],
            "num_params": len(to_weight),
            "num_slots": count,
            "compared": guilty["trainable"],
        }

    layer = next(x for x in meta["layers"] if x["index"] == layer_index)
    if layer.get("serialized") is None:
        raise ReproducerError(f"layer {layer['name']} cannot be serialized")
    if layer["class"] == "Lambda":
        raise ReproducerError(
            f"layer {layer['name']} is a Lambda layer, whose Python function a "
            "standalone script cannot rebuild from the layer's config"
        )
    index = layer["index"]
    data = {
        "x": referee[f"{prefix}referee/forward/{index}/input"],
        **{f"weight_{i}": state(w) for i, w in enumerate(layer["weights"])},
    }
    if phase == "gradient":
        data["upstream"] = referee[f"{prefix}referee/gradient/{index}/upstream"]
    kernel = next((s for s in layer["shapes"] if len(s) >= 2), None)
    forward_length = int(np.prod(kernel[:-1])) if kernel else 1
    input_length = int(kernel[-1] * np.prod(kernel[:-2])) if kernel else 1
    x = data["x"]
    rows = int(np.prod(x.shape[:-1])) if x.ndim >= 2 else 1
    return data, {
        "layer": layer["serialized"],
        "layer_name": layer["name"],
        "num_weights": len(layer["weights"]),
        "lengths": {"forward": forward_length, "input": input_length, "weight": rows},
    }


def render_script(settings: dict[str, Any]) -> str:
    """Return the reproducer script's source for the given settings."""
    source = inspect.getsource(phases)
    source = source.replace("from __future__ import annotations\n", "")
    body = _TEMPLATE.replace("@@PHASES@@", source)
    body = body.replace("@@SETTINGS@@", json.dumps(settings, indent=1, sort_keys=True))
    body = body.replace("@@SUMMARY@@", settings["summary"])
    body = body.replace("@@VERSION@@", __version__)
    return body


_TEMPLATE = r'''#!/usr/bin/env python3
"""Reproducer written by parity @@VERSION@@.

@@SUMMARY@@

It runs that phase from the inputs in reproducer.npz next to this file, on the
configuration below and on the CPU in float64 and float32 (eager mode). It
prints the values and the excess over round-off. The exit status is 1 when the
disagreement reproduces, 0 when it does not, and 2 when the script fails. It needs numpy and the
framework, and parity only when the fault is one of parity's emulated faults.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

SETTINGS = json.loads(
    r"""
@@SETTINGS@@
"""
)


def configure_environment() -> None:
    """Set the variables that the backend reads when it is imported."""
    os.environ["KERAS_BACKEND"] = SETTINGS["backend"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if SETTINGS["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if SETTINGS["backend"] == "jax":
            os.environ["JAX_PLATFORMS"] = "cpu"
    if SETTINGS["backend"] == "jax":
        # The float64 referee needs JAX's 64-bit mode; float32 values stay float32.
        os.environ["JAX_ENABLE_X64"] = "1"
    if SETTINGS["onednn"] is not None:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if SETTINGS["onednn"] else "0"
    if SETTINGS["threads"] is not None:
        os.environ["OMP_NUM_THREADS"] = str(SETTINGS["threads"])


configure_environment()

import numpy as np  # noqa: E402
import keras  # noqa: E402

# --- parity.phases, copied so that this script needs no parity install ---
@@PHASES@@
# --- end of parity.phases ---


def device_name(on_cpu: bool) -> str:
    """Return the keras.device name of the candidate's device, or of the CPU."""
    backend, device = SETTINGS["backend"], SETTINGS["device"]
    if on_cpu or device == "cpu":
        return "cpu" if backend == "torch" else "cpu:0"
    if device == "mps":
        return "mps"
    if backend == "torch":
        return "cuda:0"
    if backend == "tensorflow":
        return "gpu:0"
    return f"{device}:0"


def set_threads() -> None:
    threads = SETTINGS["threads"]
    if threads is None:
        return
    if SETTINGS["backend"] == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif SETTINGS["backend"] == "torch":
        import torch

        torch.set_num_threads(threads)


def make_layer(policy: str, x: np.ndarray, weights: list) -> object:
    serialized = copy.deepcopy(SETTINGS["layer"])
    serialized["config"]["dtype"] = policy
    layer = keras.saving.deserialize_keras_object(serialized)
    if not layer.built:
        layer.build(tuple(x.shape))
    if len(layer.weights) != len(weights):
        layer(keras.ops.convert_to_tensor(x, dtype=layer.compute_dtype))
    layer.set_weights(
        [np.asarray(w).astype(v.dtype) for v, w in zip(layer.weights, weights)]
    )
    return layer


def make_optimizer(dtype: str, data: dict) -> tuple:
    optimizer = keras.optimizers.deserialize(copy.deepcopy(SETTINGS["optimizer"]))
    params = [data[f"param_{j}"] for j in range(SETTINGS["num_params"])]
    variables = [keras.Variable(np.zeros(p.shape), dtype=dtype) for p in params]
    optimizer.build(variables)
    return optimizer, params


def run_phase(runner: PhaseRunner, policy: str, data: dict) -> dict:
    """Run the phase with ``runner`` under the dtype policy; return named outputs."""
    phase = SETTINGS["phase"]
    if phase == "loss":
        loss = loss_from_identifier(keras, SETTINGS["loss"])
        dtype = policy if policy in ("float32", "float64") else SETTINGS["output_dtype"]
        value, gradient = runner.loss(loss, data["y_true"], data["y_pred"], dtype)
        return {"loss value": value, "loss gradient": gradient}
    if phase == "update":
        dtype = "float64" if policy == "float64" else "float32"
        optimizer, params = make_optimizer(dtype, data)
        slots = [data[f"slot_{i}"] for i in range(SETTINGS["num_slots"])]
        grads = [data[f"grad_{j}"] for j in range(SETTINGS["num_params"])]
        new, _ = runner.update(optimizer, params, slots, grads)
        return {
            f"update of variable {j}": np.asarray(new[j], np.float64)
            - np.asarray(params[j]).astype(new[j].dtype).astype(np.float64)
            for j in SETTINGS["compared"]
        }
    weights = [data[f"weight_{i}"] for i in range(SETTINGS["num_weights"])]
    layer = make_layer(policy, data["x"], weights)
    if phase == "forward":
        return {"output": runner.forward(layer, data["x"])}
    weight_grads, input_grad = runner.vjp(layer, data["x"], data["upstream"])
    outputs = {f"gradient of weight {j}": g for j, g in enumerate(weight_grads)}
    if input_grad is not None:
        outputs["gradient of the input"] = input_grad
    return outputs


def reduction_length(name: str) -> int:
    lengths = SETTINGS.get("lengths", {})
    if name == "output":
        return lengths.get("forward", 1)
    if name == "gradient of the input":
        return lengths.get("input", 1)
    if name.startswith("gradient of weight"):
        return lengths.get("weight", 1)
    return 1


def scale_of(name: str, data: dict) -> np.ndarray | None:
    if name.startswith("update of variable"):
        j = int(name.rsplit(" ", 1)[1])
        return np.abs(np.asarray(data[f"param_{j}"], np.float64))
    return None


def apply_faults() -> None:
    if not SETTINGS["faults"]:
        return
    from parity.config import parse_config
    from parity.faults import resolve_fault

    config = parse_config(SETTINGS["config"])
    for name in SETTINGS["faults"]:
        resolve_fault(name)(config)


def main() -> int:
    data = dict(np.load(Path(__file__).with_name("reproducer.npz")))
    set_threads()
    eager = PhaseRunner(keras, SETTINGS["backend"], "eager")
    # The referee and the float32 reference run before any emulated fault exists.
    with keras.device(device_name(on_cpu=True)):
        referee = run_phase(eager, "float64", data)
        reference = run_phase(eager, "float32", data)
    apply_faults()
    runner = PhaseRunner(keras, SETTINGS["backend"], SETTINGS["mode"])
    with keras.device(device_name(on_cpu=False)):
        candidate = run_phase(runner, SETTINGS["precision"], data)

    print(f"configuration: {SETTINGS['config']}, phase: {SETTINGS['phase']}")
    reproduced = False
    np.set_printoptions(precision=8, threshold=12, edgeitems=3)
    for name, value in candidate.items():
        value = np.asarray(value)
        unit = unit_roundoff(value.dtype)
        excess = simple_excess(
            value,
            reference[name],
            referee[name],
            reduction_length(name),
            scale_of(name, data),
            unit,
        )
        bad = not excess <= SETTINGS["threshold"]
        reproduced = reproduced or bad
        print(f"\n{name} {value.shape}")
        print(f"  candidate ({SETTINGS['mode']}, {SETTINGS['precision']}): {value.ravel()}")
        print(f"  CPU float64 (eager):  {np.asarray(referee[name]).ravel()}")
        print(
            f"  excess over round-off: {excess:.3g} "
            f"({'above' if bad else 'within'} the threshold {SETTINGS['threshold']:g})"
        )
    print(
        "\nThe disagreement reproduces."
        if reproduced
        else "\nThe disagreement does not reproduce here."
    )
    return 1 if reproduced else 0


if __name__ == "__main__":
    try:
        status = main()
    except Exception:  # exit 2, so that a broken script never reads as "reproduces"
        import traceback

        traceback.print_exc()
        print("The reproducer itself failed (exit status 2).", file=sys.stderr)
        status = 2
    sys.exit(status)
'''
