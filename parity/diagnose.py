"""Is it the model? Dead and always-active ReLU units, and how linear the model is.

The usual advice for a near-linear decision boundary is to swap ReLU for sigmoid.
That advice cannot tell a device that computes ReLU wrong from a network that is
nearly linear by construction. parity measures both sides:

- per hidden layer, the fraction of *dead* units (pre-activation never positive
  over the data and the plotting grid) and of *always-active* units (always
  positive, so ReLU passes them through linearly), from each configuration's final
  parameters evaluated in float64;
- per configuration, the R squared of a least-squares fit of the logits on the
  inputs, from the predictions that the configuration itself computed.

When the float64 referee is nearly linear too, the model is the problem; when
only some configurations are, the device or compiler is. `ablate_activation`
reruns the doctor with other hidden activations and reports whether the
difference follows the activation or the configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.scenarios import decision_grid

if TYPE_CHECKING:
    from parity.doctor import DoctorResult
    from parity.runner import RunResult

log = logging.getLogger("parity")

# A configuration whose logits a linear function of the inputs explains with at
# least this R squared is called nearly linear. Evidence (circles, seed 0, CPU):
# a network whose hidden ReLU units are all always active gives R squared 1.0 up
# to round-off, and so does the fused dense+ReLU fault. The float64 referee,
# which draws a circle, gives 0.27 after 2 epochs. The threshold between is a
# choice: a fit that leaves under 5 percent of the variance looks straight.
NEARLY_LINEAR_R2 = 0.95

# Probabilities are clipped to [p, 1 - p] before taking logits, because a float32
# sigmoid returns exactly 1 once the logit passes about 17, and its logit is inf.
PROBABILITY_CLIP = 1e-7

# The ablation reports that the boundary follows the activation when the
# referee's classes under two activations differ on more than this fraction of
# points. That is ten times the fraction by which two correct float32 runs may
# differ (CONSISTENT_MAX_DISAGREEMENT in parity.verdict is 0.001).
ACTIVATION_CHANGE_FRACTION = 0.01

# Activations for which dead and always-active units are meaningful: they are
# zero or nearly so for negative inputs and the identity or nearly so for large
# positive ones.
RECTIFIERS = frozenset({"relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu"})

ABLATION_ACTIVATIONS = ("relu", "sigmoid", "tanh", "elu")


@dataclasses.dataclass
class LayerActivity:
    """Dead and always-active unit fractions of one hidden layer."""

    layer: str
    activation: str | None
    units: int
    dead: float
    always_active: float

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON fields."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunDiagnosis:
    """Linearity measurements of one configuration's model."""

    config: str
    role: str
    r_squared: float | None
    nearly_linear: bool
    layers: list[LayerActivity]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON fields."""
        return {
            "config": self.config,
            "role": self.role,
            "r_squared": self.r_squared,
            "nearly_linear": self.nearly_linear,
            "layers": [layer.to_dict() for layer in self.layers],
        }


@dataclasses.dataclass
class ModelDiagnosis:
    """The model diagnosis: a verdict, its summary and the measurements behind it."""

    verdict: str  # model, configuration, neither or unknown
    summary: str
    runs: list[RunDiagnosis]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form, as it appears under ``model_diagnosis``."""
        return {
            "verdict": self.verdict,
            "summary": self.summary,
            "nearly_linear_r2": NEARLY_LINEAR_R2,
            "runs": [run.to_dict() for run in self.runs],
        }


def evaluation_points(doctor: DoctorResult) -> np.ndarray:
    """Return the data points plus, for two-feature data, the plotting grid."""
    x, _ = doctor.scenario.data()
    x = np.asarray(x, np.float32)
    if x.ndim == 2 and x.shape[1] == 2:
        return np.concatenate([x, decision_grid(x)[2]])
    return x


def logits_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Return logits from sigmoid (one column) or softmax outputs, in float64.

    Softmax logits are known up to a constant per point, so the log-probabilities
    are centered per point.
    """
    p = np.clip(
        np.asarray(probabilities, np.float64), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP
    )
    if p.ndim == 1 or p.shape[-1] == 1:
        p = p.reshape(len(p), 1)
        return np.log(p) - np.log1p(-p)
    log_p = np.log(p)
    return log_p - log_p.mean(axis=1, keepdims=True)


def linear_r_squared(points: np.ndarray, values: np.ndarray) -> float | None:
    """Return the R squared of a least-squares fit of ``values`` on [points, 1].

    Returns None when the values do not vary (a constant model has no boundary)
    or are not finite.
    """
    x = np.asarray(points, np.float64).reshape(len(points), -1)
    y = np.asarray(values, np.float64).reshape(len(values), -1)
    if not np.all(np.isfinite(y)):
        return None
    design = np.hstack([x, np.ones((len(x), 1))])
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = float(np.sum((y - design @ coefficients) ** 2))
    total = float(np.sum((y - y.mean(axis=0)) ** 2))
    if total <= 0:
        return None
    return 1.0 - residual / total


def run_predictions(result: RunResult) -> np.ndarray | None:
    """Return a run's predictions on the data followed by those on the grid, if any."""
    data = result.arrays.get("predictions/data")
    if data is None:
        return None
    grid = result.arrays.get("predictions/grid")
    return data if grid is None else np.concatenate([data, grid])


def diagnose_model(
    doctor: DoctorResult,
    activity: dict[str, dict[int, np.ndarray]] | None = None,
    layer_meta: Sequence[dict[str, Any]] = (),
    activations: Sequence[str | None] = (),
) -> ModelDiagnosis:
    """Diagnose whether near-linearity comes from the model or from a configuration.

    ``activity`` maps a run key to the per-unit fraction of points with a positive
    pre-activation for each hidden layer, as the referee's localization worker
    computes it. ``layer_meta`` and ``activations`` name those layers.
    """
    points = evaluation_points(doctor)
    runs = []
    finished = [
        r for r in [doctor.referee, *doctor.candidates] if r is not None and r.ok
    ]
    for result in finished:
        predictions = run_predictions(result)
        r_squared = None
        if predictions is not None and len(predictions) == len(points):
            r_squared = linear_r_squared(points, logits_from_probabilities(predictions))
        layers = _layer_activity(
            (activity or {}).get(result.run.key, {}), layer_meta, activations
        )
        runs.append(
            RunDiagnosis(
                str(result.run.config),
                result.run.role,
                r_squared,
                r_squared is not None and r_squared >= NEARLY_LINEAR_R2,
                layers,
            )
        )
    return ModelDiagnosis(*_conclude(runs), runs)


def _layer_activity(
    fractions: dict[int, np.ndarray],
    layer_meta: Sequence[dict[str, Any]],
    activations: Sequence[str | None],
) -> list[LayerActivity]:
    found = []
    for index, positive in sorted(fractions.items()):
        name = layer_meta[index]["name"] if index < len(layer_meta) else str(index)
        activation = activations[index] if index < len(activations) else None
        found.append(
            LayerActivity(
                name,
                activation,
                int(positive.size),
                float(np.mean(positive == 0)),
                float(np.mean(positive == 1)),
            )
        )
    return found


def _conclude(runs: list[RunDiagnosis]) -> tuple[str, str]:
    referee = next((run for run in runs if run.role == "referee"), None)
    if referee is None or referee.r_squared is None:
        return (
            "unknown",
            "no diagnosis: the referee's predictions are missing or constant",
        )
    units = _describe_units(referee)
    if referee.nearly_linear:
        return (
            "model",
            f"the float64 referee is nearly linear too (R squared of the logits on the "
            f"inputs {referee.r_squared:.3f} >= {NEARLY_LINEAR_R2:g}){units}: the network "
            "or its training makes a near-linear function, so this is a model problem, "
            "not a device problem",
        )
    linear = [run for run in runs if run.role != "referee" and run.nearly_linear]
    if linear:
        names = ", ".join(
            f"{run.config} (R squared {run.r_squared:.3f})" for run in linear
        )
        return (
            "configuration",
            f"{names} nearly linear while the float64 referee is not (R squared "
            f"{referee.r_squared:.3f}){units}: the configuration, not the model, "
            "makes the function linear",
        )
    return (
        "neither",
        f"no configuration is nearly linear (referee R squared {referee.r_squared:.3f} "
        f"< {NEARLY_LINEAR_R2:g}){units}",
    )


def _describe_units(run: RunDiagnosis) -> str:
    parts = [
        f"{layer.layer}: {100 * layer.dead:.0f}% dead, "
        f"{100 * layer.always_active:.0f}% always active"
        for layer in run.layers
        if layer.activation in RECTIFIERS
    ]
    return f"; referee ReLU units {'; '.join(parts)}" if parts else ""


# Activation ablation.


@dataclasses.dataclass
class AblationRow:
    """One activation's doctor run: verdicts, linearity and boundary change."""

    activation: str
    verdicts: dict[str, str]
    r_squared: dict[str, float | None]
    boundary_disagreement: dict[str, float | None]
    change_from_first: (
        float | None
    )  # referee's class change against the first activation
    out: str

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON fields."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Ablation:
    """Doctor runs of one model under several hidden activations, and the conclusion."""

    rows: list[AblationRow]
    follows: str  # activation, configuration, both or neither
    summary: str

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form written to ``ablation.json``."""
        return {
            "follows": self.follows,
            "summary": self.summary,
            "activation_change_fraction": ACTIVATION_CHANGE_FRACTION,
            "rows": [row.to_dict() for row in self.rows],
        }


def ablate_activation(
    run: Callable[[str, Path], DoctorResult],
    out: Path,
    activations: Sequence[str] = ABLATION_ACTIVATIONS,
) -> Ablation:
    """Run ``run(activation, out_dir)`` for each activation and compare the outcomes.

    The difference follows the configuration when, for some activation, a
    configuration is divergent or fails. It follows the activation when the
    referee's own classes change between activations.
    """
    from parity.verdict import predicted_classes

    rows = []
    first: np.ndarray | None = None
    for activation in activations:
        directory = out / activation
        log.info("ablation: running with activation %s in %s", activation, directory)
        doctor = run(activation, directory)
        referee = doctor.referee
        classes = None
        if referee is not None and referee.ok:
            predictions = run_predictions(referee)
            classes = None if predictions is None else predicted_classes(predictions)
        change = None
        if classes is not None:
            first = classes if first is None else first
            change = (
                float(np.mean(classes != first))
                if first.shape == classes.shape
                else None
            )
        diagnosis = diagnose_model(doctor)
        rows.append(
            AblationRow(
                activation,
                {
                    str(r.run.config): doctor.judgements[r.run.key].verdict
                    for r in doctor.candidates
                },
                {run.config: run.r_squared for run in diagnosis.runs},
                {
                    str(r.run.config): doctor.judgements[
                        r.run.key
                    ].boundary_disagreement
                    for r in doctor.candidates
                },
                change,
                str(directory),
            )
        )
    follows, summary = _ablation_conclusion(rows)
    ablation = Ablation(rows, follows, summary)
    from parity.io import atomic_write_json

    atomic_write_json(out / "ablation.json", ablation.to_dict())
    return ablation


def _ablation_conclusion(rows: list[AblationRow]) -> tuple[str, str]:
    device = [
        f"{config} with {row.activation}"
        for row in rows
        for config, verdict in row.verdicts.items()
        if verdict in ("divergent", "failed")
    ]
    changed = [
        f"{row.activation} ({100 * row.change_from_first:.1f}% of points)"
        for row in rows[1:]
        if row.change_from_first is not None
        and row.change_from_first > ACTIVATION_CHANGE_FRACTION
    ]
    first = rows[0].activation if rows else "the first activation"
    by_activation = (
        f"the referee's boundary changes with the activation: against {first}, "
        f"{', '.join(changed)} classify differently"
    )
    by_device = f"configurations differ from the referee: {', '.join(device)}"
    if changed and device:
        return "both", f"{by_activation}; and {by_device}"
    if changed:
        return (
            "activation",
            f"{by_activation}, while every configuration agrees with the referee under "
            "each activation: the difference follows the activation, not the device",
        )
    if device:
        return (
            "configuration",
            f"{by_device}, while the referee's boundary stays the same across "
            "activations: the difference follows the configuration",
        )
    return (
        "neither",
        "neither the activation nor the configuration changes the boundary",
    )


def rewrite_activation(model_path: Path, activation: str, target: Path) -> Path:
    """Copy a ``.keras`` archive with every hidden ``relu`` replaced by ``activation``.

    The output layer keeps its activation; weights are copied unchanged. Only the
    archive's JSON config is rewritten, so no model code runs.
    """
    with zipfile.ZipFile(model_path) as archive:
        config = json.loads(archive.read("config.json"))
        members = {name: archive.read(name) for name in archive.namelist()}
    layers = config.get("config", {}).get("layers", [])
    dense = [layer for layer in layers if "activation" in layer.get("config", {})]
    for layer in dense[:-1]:
        if layer["config"]["activation"] == "relu":
            layer["config"]["activation"] = activation
    members["config.json"] = json.dumps(config).encode()
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def with_activation(options: Any, activation: str, out: Path) -> Any:
    """Return a copy of doctor options with another activation and output folder."""
    changed = copy.copy(options)
    changed.activation = activation
    changed.out = out
    changed.json_path = None
    changed.localize = False
    return changed


def ablate_doctor(options: Any) -> int:
    """Run ``parity doctor --ablate-activation``: print the table, return the exit status."""
    from parity.doctor import run_doctor

    out = Path(options.out) / "ablation"

    def run(activation: str, directory: Path) -> DoctorResult:
        return run_doctor(with_activation(options, activation, directory))

    return print_ablation(ablate_activation(run, out), out)


def print_ablation(ablation: Ablation, out: Path) -> int:
    """Print one line per activation and the conclusion; return the exit status.

    The exit status is 1 when any configuration is divergent or failed under any
    activation, as for the doctor, and 0 otherwise.
    """
    for row in ablation.rows:
        cells = ", ".join(
            f"{config} {verdict} (R squared {_format(row.r_squared.get(config))})"
            for config, verdict in row.verdicts.items()
        )
        referee = next(
            (
                value
                for config, value in row.r_squared.items()
                if config not in row.verdicts
            ),
            None,
        )
        change = (
            ""
            if row.change_from_first is None
            else f", {100 * row.change_from_first:.1f}% of points change class"
        )
        print(
            f"{row.activation}: referee R squared {_format(referee)}{change}; {cells}"
        )
    print(f"\nablation ({ablation.follows}): {ablation.summary}")
    print(f"details: {out / 'ablation.json'}")
    bad = any(
        verdict in ("divergent", "failed")
        for row in ablation.rows
        for verdict in row.verdicts.values()
    )
    return 1 if bad else 0


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def ablate_model_file(
    options: Any, activations: Sequence[str] = ABLATION_ACTIVATIONS
) -> Ablation:
    """Run `parity.api.run_model` once per hidden activation of a ``.keras`` model.

    ``options`` is a `parity.api.RunOptions` whose ``model`` is a ``.keras`` file;
    each run trains a copy whose hidden ``relu`` layers use another activation
    (`rewrite_activation`), in ``OUT/ablation/ACTIVATION``.
    """
    from parity.api import run_model
    from parity.errors import InputError

    model = Path(str(options.model))
    if model.suffix != ".keras":
        raise InputError(
            f"--ablate-activation needs a .keras model file, received {str(model)!r}: "
            "a factory's activations cannot be rewritten."
        )
    out = Path(options.out) / "ablation"

    def run(activation: str, directory: Path) -> DoctorResult:
        copied = rewrite_activation(model, activation, directory / "model.keras")
        changed = copy.copy(options)
        changed.model = str(copied)
        changed.out = directory
        changed.json_path = None
        return run_model(changed)

    return ablate_activation(run, out, activations)
