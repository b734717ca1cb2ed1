"""Attribution: the error each layer and phase of a training step introduces.

A candidate configuration computes every phase of one step twice. The
*isolated* run gives each layer the referee's input and upstream gradient, which
shows the error the phase introduces. The *chained* run feeds each phase the
configuration's own values, which shows the error that reaches and leaves it. The float64 referee and a trusted float32 reference
compute the same tensors, and `parity.tensors.compare_tensors` turns each
difference into an excess over round-off. The tensors come from the workers of
`parity.localize_worker`, keyed ``{step}/{source}/{phase}/...``.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from parity.tensors import TensorComparison, compare_tensors

# Compute dtype of each mixed precision policy, whose variables stay float32.
MIXED_COMPUTE_DTYPES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


@dataclasses.dataclass
class Row:
    """One phase of one layer at one step: the error it introduces and inherits.

    Excess values are `compare_tensors` excesses (the largest over the phase's
    tensors): ``introduced`` from the referee's inputs, ``inherited`` of the inputs
    that the configuration's own chain fed to the phase, ``total`` of the phase's
    outputs in that chain.
    """

    step: int
    phase: str  # forward, loss, gradient, update or step
    layer: str | None
    layer_index: int | None
    layer_class: str | None
    introduced: float | None
    introduced_verdict: str
    inherited: float | None
    total: float | None
    nonfinite: bool
    tensor: str  # the tensor with the largest introduced excess
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Return the row as JSON fields."""
        return dataclasses.asdict(self)


class _Tensors:
    """Lookup of one step's tensors in the referee's and a candidate's files."""

    def __init__(
        self,
        referee: dict[str, np.ndarray],
        candidate: dict[str, np.ndarray],
        step: int,
        meta: dict[str, Any],
        errors: Sequence[dict[str, Any]] = (),
        compute_dtype: str | None = None,
    ):
        self.referee, self.candidate, self.step = referee, candidate, step
        self.trainable_to_weight: list[int] = meta["trainable_to_weight"]
        self.compute_dtype = compute_dtype
        self.errors = [e for e in errors if e.get("step") == step]

    def error(self, source: str, phase: str, layer: int | None) -> str | None:
        """Return the error a candidate phase raised, if it raised one."""
        for record in self.errors:
            if record["source"] != source or record["phase"] != phase:
                continue
            if source == "isolated" and phase in ("forward", "gradient"):
                if record["layer"] != layer:
                    continue
            return str(record["error"])
        return None

    def get(self, source: str, key: str) -> np.ndarray | None:
        """Return a tensor; source is referee, reference, reference/chained, isolated, chained or own."""
        if source in ("isolated", "chained", "own", ""):
            name = f"{self.step}/{source}/{key}" if source else f"{self.step}/{key}"
            return self.candidate.get(name)
        return self.referee.get(f"{self.step}/{source}/{key}")

    def start(self, trainable: int) -> np.ndarray:
        """Return the referee's value of a trainable variable before the step."""
        weight = self.trainable_to_weight[trainable]
        return self.referee[f"{self.step}/state/param/{weight}"]


def _in_compute_dtype(value: np.ndarray, dtype: str) -> np.ndarray:
    """Return a float tensor in the lower compute dtype it was computed in."""
    if value.dtype.kind != "f" or value.dtype.itemsize <= 2:
        return value
    import ml_dtypes

    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    return value.astype(target)


def _delta(new: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Return new - start computed in float64, in the dtype of ``new``.

    ``start`` is rounded to ``new``'s dtype first, because that is the value the
    configuration started from.
    """
    begin = np.asarray(start).astype(new.dtype).astype(np.float64)
    return (new.astype(np.float64) - begin).astype(new.dtype)


def _compare(
    name: str,
    candidate: np.ndarray | None,
    reference: np.ndarray | None,
    referee: np.ndarray | None,
    reduction_length: int | None = None,
    scale: np.ndarray | None = None,
) -> TensorComparison | None:
    if candidate is None or reference is None or referee is None:
        return None
    with np.errstate(all="ignore"):
        return compare_tensors(
            candidate,
            reference,
            referee.astype(np.float64),
            name=name,
            reduction_length=reduction_length,
            scale=scale,
        )


def _worst(
    results: Sequence[TensorComparison | None],
) -> tuple[float | None, TensorComparison | None]:
    found = [r for r in results if r is not None]
    if not found:
        return None, None
    worst = max(found, key=lambda r: r.excess if not math.isnan(r.excess) else -1.0)
    return float(worst.excess), worst


def _nonfinite(result: TensorComparison | None) -> bool:
    if result is None:
        return False
    referee = result.nonfinite.get("referee") or result.nonfinite["reference"]
    return result.nonfinite["candidate"].total > 0 and referee.total == 0


def _kernel_shape(layer: dict[str, Any]) -> list[int] | None:
    for shape in layer.get("shapes", []):
        if len(shape) >= 2:
            return shape
    return None


def _rows_length(shape: Sequence[int] | None) -> int | None:
    """Return the number of rows summed over: every dimension but the last."""
    if shape is None or len(shape) < 2:
        return None
    return max(1, int(np.prod(shape[:-1])))


def _phase_row(
    tensors: _Tensors,
    phase: str,
    layer: dict[str, Any] | None,
    introduced: list[TensorComparison | None],
    inherited: list[TensorComparison | None],
    total: list[TensorComparison | None],
) -> Row:
    excess, worst = _worst(introduced)
    verdicts = [r.verdict for r in introduced if r is not None]
    verdict = (
        "divergent"
        if "divergent" in verdicts
        else "roundoff"
        if "roundoff" in verdicts
        else "consistent"
        if verdicts
        else "not-compared"
    )
    index = layer["index"] if layer else None
    error = tensors.error("isolated" if phase != "step" else "step", phase, index)
    if error is not None:
        return Row(
            tensors.step,
            phase,
            layer["name"] if layer else None,
            index,
            layer["class"] if layer else None,
            None,
            "failed",
            _worst(inherited)[0],
            _worst(total)[0],
            False,
            "",
            f"the configuration raised {error}",
        )
    nonfinite = any(_nonfinite(r) for r in introduced)
    if nonfinite:
        excess = math.inf
    return Row(
        step=tensors.step,
        phase=phase,
        layer=layer["name"] if layer else None,
        layer_index=layer["index"] if layer else None,
        layer_class=layer["class"] if layer else None,
        introduced=excess,
        introduced_verdict=verdict,
        inherited=_worst(inherited)[0],
        total=_worst(total)[0],
        nonfinite=nonfinite,
        tensor=worst.name if worst else "",
        message=worst.message if worst else "",
    )


def attribute(
    referee: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    meta: dict[str, Any],
    step: int,
    errors: Sequence[dict[str, Any]] = (),
    precision: str = "float32",
) -> list[Row]:
    """Return the attribution table of one step, in the order a training step runs.

    ``meta`` is the referee worker's result: layer descriptions and the map from
    trainable variables to model weights. ``errors`` are the exceptions that the
    candidate's phases raised; such a phase's row has the verdict ``failed``.
    ``precision`` is the candidate's dtype policy. Under a mixed policy the
    forward, loss and gradient tensors are judged in the compute dtype's
    round-off, because they were computed in it even where they are stored in
    float32.
    """
    compute_dtype = MIXED_COMPUTE_DTYPES.get(precision)
    tensors = _Tensors(referee, candidate, step, meta, errors, compute_dtype)
    layers: list[dict[str, Any]] = meta["layers"]
    rows = [_forward_row(tensors, layer) for layer in layers]
    rows.append(_loss_row(tensors, layers))
    rows += [_gradient_row(tensors, layer) for layer in reversed(layers)]
    rows += [_update_row(tensors, layer) for layer in layers if layer["trainable"]]
    rows.append(_step_row(tensors))
    return rows


def _three(
    tensors: _Tensors, source: str, key: str, **kw: Any
) -> TensorComparison | None:
    """Compare the candidate's isolated or chained tensor with reference and referee."""
    reference_source = (
        "reference/isolated" if source == "isolated" else "reference/chained"
    )
    candidate = tensors.get(source, key)
    if candidate is not None and tensors.compute_dtype is not None:
        candidate = _in_compute_dtype(candidate, tensors.compute_dtype)
    return _compare(
        key,
        candidate,
        tensors.get(reference_source, key),
        tensors.get("referee", key),
        **kw,
    )


def _forward_row(tensors: _Tensors, layer: dict[str, Any]) -> Row:
    index = layer["index"]
    kernel = _kernel_shape(layer)
    length = _rows_length(kernel)
    key = f"forward/{index}/output"
    return _phase_row(
        tensors,
        "forward",
        layer,
        [_three(tensors, "isolated", key, reduction_length=length)],
        [_three(tensors, "chained", f"forward/{index}/input")],
        [_three(tensors, "chained", key, reduction_length=length)],
    )


def _loss_row(tensors: _Tensors, layers: list[dict[str, Any]]) -> Row:
    last = f"forward/{layers[-1]['index']}/output"
    prediction = tensors.get("referee", last)
    batch = None if prediction is None else int(prediction.shape[0])
    keys = (("loss/value", batch), ("loss/gradient", None))
    return _phase_row(
        tensors,
        "loss",
        None,
        [_three(tensors, "isolated", k, reduction_length=n) for k, n in keys],
        [_three(tensors, "chained", last)],
        [_three(tensors, "chained", k, reduction_length=n) for k, n in keys],
    )


def _gradient_keys(
    tensors: _Tensors, layer: dict[str, Any]
) -> list[tuple[str, int | None]]:
    index = layer["index"]
    upstream = tensors.get("referee", f"gradient/{index}/upstream")
    inputs = tensors.get("referee", f"forward/{index}/input")
    kernel = _kernel_shape(layer)
    keys = [
        (
            f"gradient/{index}/weight/{j}",
            _rows_length(None if inputs is None else inputs.shape),
        )
        for j in layer["trainable"]
    ]
    input_length = None
    if kernel is not None:
        input_length = (
            int(kernel[-1] * np.prod(kernel[:-2])) if len(kernel) > 2 else kernel[-1]
        )
    elif upstream is not None and inputs is not None and upstream.ndim >= 1:
        input_length = None
    keys.append((f"gradient/{index}/input", input_length))
    return keys


def _gradient_row(tensors: _Tensors, layer: dict[str, Any]) -> Row:
    index = layer["index"]
    keys = _gradient_keys(tensors, layer)
    return _phase_row(
        tensors,
        "gradient",
        layer,
        [_three(tensors, "isolated", k, reduction_length=n) for k, n in keys],
        [
            _three(tensors, "chained", f"gradient/{index}/upstream"),
            _three(tensors, "chained", f"forward/{index}/input"),
        ],
        [_three(tensors, "chained", k, reduction_length=n) for k, n in keys],
    )


def _update_comparison(
    tensors: _Tensors, source: str, trainable: int, key: str
) -> TensorComparison | None:
    """Compare the change a parameter receives, with the parameter's size as scale.

    The new value is stored in the parameter's dtype, so its rounding (about one
    unit round-off of the parameter, not of the much smaller change) is part of a
    correct update's error.
    """
    reference_source = {
        "isolated": "reference/isolated",
        "chained": "reference/chained",
        "": "reference",
    }[source]
    candidate = tensors.get(source, key)
    reference = tensors.get(reference_source, key)
    referee = tensors.get("referee", key)
    if candidate is None or reference is None or referee is None:
        return None
    start = tensors.start(trainable)
    change = _delta(candidate, start)
    if source != "isolated" and tensors.compute_dtype is not None:
        # Under a mixed policy the chain's and the trainer's updates apply
        # gradients computed in the compute dtype, so they are judged in it too.
        change = _in_compute_dtype(change, tensors.compute_dtype)
    return _compare(
        key,
        change,
        _delta(reference.astype(candidate.dtype), start),
        referee.astype(np.float64) - start,
        scale=np.abs(start.astype(np.float64)),
    )


def _update_row(tensors: _Tensors, layer: dict[str, Any]) -> Row:
    index = layer["index"]
    trainable = layer["trainable"]
    return _phase_row(
        tensors,
        "update",
        layer,
        [_update_comparison(tensors, "isolated", j, f"update/{j}") for j in trainable],
        [_three(tensors, "chained", f"gradient/{index}/weight/{j}") for j in trainable],
        [_update_comparison(tensors, "chained", j, f"update/{j}") for j in trainable],
    )


def _step_row(tensors: _Tensors) -> Row:
    count = len(tensors.trainable_to_weight)
    results = [_update_comparison(tensors, "", j, f"step/{j}") for j in range(count)]
    return _phase_row(tensors, "step", None, results, [], results)


def guilty_row(rows: Sequence[Row], prefer_nonfinite: bool) -> Row | None:
    """Return the row that introduces the divergence, or None when no phase does.

    Rows are in the order the step runs them. With ``prefer_nonfinite`` the first
    row that turns finite inputs into NaN or inf wins; otherwise the first row
    whose introduced error is divergent. The whole-step row counts only when no
    single phase explains the divergence, as when compilation fuses across layers.
    """
    phases = [row for row in rows if row.phase != "step"]
    if prefer_nonfinite:
        found = next((row for row in phases if row.nonfinite), None)
        if found is not None:
            return found
    bad = ("divergent", "failed")
    found = next((row for row in phases if row.introduced_verdict in bad), None)
    if found is not None:
        return found
    return next(
        (row for row in rows if row.phase == "step" and row.introduced_verdict in bad),
        None,
    )


def first_nonfinite_phase(
    candidate: dict[str, np.ndarray], meta: dict[str, Any], step: int
) -> tuple[str, dict[str, Any] | None] | None:
    """Return the first (phase, layer) whose value is NaN or inf in the own-state chain."""
    layers: list[dict[str, Any]] = meta["layers"]
    prefix = f"{step}/own/"

    def bad(key: str) -> bool:
        value = candidate.get(prefix + key)
        return (
            value is not None
            and value.dtype.kind == "f"
            and not np.all(np.isfinite(value))
        )

    for layer in layers:
        if bad(f"forward/{layer['index']}/output"):
            return "forward", layer
    if bad("loss/value") or bad("loss/gradient"):
        return "loss", None
    for layer in reversed(layers):
        keys = [f"gradient/{layer['index']}/weight/{j}" for j in layer["trainable"]]
        if any(bad(key) for key in [*keys, f"gradient/{layer['index']}/input"]):
            return "gradient", layer
    for layer in layers:
        if any(bad(f"update/{j}") for j in layer["trainable"]):
            return "update", layer
    return None


def format_excess(value: float | None) -> str:
    """Return an excess for a table: three significant digits, inf, or a dash."""
    if value is None:
        return "–"
    return "inf" if math.isinf(value) else f"{value:.3g}"


def attribution_table(rows: Sequence[Row]) -> str:
    """Return an attribution table as HTML: one row per layer and phase."""
    header = (
        "<tr><th>step</th><th>phase</th><th>layer</th><th>introduced excess</th>"
        "<th>verdict</th><th>inherited excess</th><th>total excess</th></tr>"
    )
    body = []
    for row in rows:
        layer = f"{row.layer} ({row.layer_class})" if row.layer else "–"
        verdict = row.introduced_verdict + (", non-finite" if row.nonfinite else "")
        body.append(
            "<tr>"
            f"<td>{row.step}</td><td>{row.phase}</td><td>{html.escape(layer)}</td>"
            f"<td>{format_excess(row.introduced)}</td><td>{html.escape(verdict)}</td>"
            f"<td>{format_excess(row.inherited)}</td><td>{format_excess(row.total)}</td>"
            "</tr>"
        )
    return "<table>" + header + "".join(body) + "</table>"
