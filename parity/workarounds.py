"""Workarounds for classes of faults, keyed by the phase at fault and the setting.

Localization names the phase that introduces an error: forward, loss, gradient,
update, a whole compiled step, or a non-finite value. It also names the one
setting whose change makes the error vanish: execution mode, device, precision
policy, oneDNN, thread count, backend, or the optimizer implementation.
`choose_workaround` picks the catalogue entry for that pair. Each entry states
what to change in the user's own Keras code. parity reruns the configuration
with the change, and the verdict of that rerun is the evidence that it helps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from parity.config import Configuration

# Phases a fault can be attributed to, in the order a training step runs them.
PHASES = ("forward", "loss", "gradient", "update", "step")

# Value of a localize worker's ``optimizer`` option that swaps in `reference_adam`.
REFERENCE_ADAM = "reference-adam"


@dataclasses.dataclass(frozen=True)
class Workaround:
    """A catalogued way to avoid a class of fault, and how parity tests it."""

    name: str
    dimension: str  # the setting it changes, as in Setting.dimension
    phases: tuple[str, ...]  # phases (or "nonfinite") that it is known to avoid
    summary: str
    code: str  # what to write in the user's own Keras program

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON fields of the entry."""
        return {
            "name": self.name,
            "dimension": self.dimension,
            "summary": self.summary,
            "code": self.code,
        }


_ALL = (*PHASES, "nonfinite")

CATALOGUE: tuple[Workaround, ...] = (
    Workaround(
        "run-eagerly",
        "mode",
        _ALL,
        "Run the model eagerly, so that no compiler fuses or rewrites its kernels.",
        "model.compile(..., run_eagerly=True, jit_compile=False)",
    ),
    Workaround(
        "jit-off",
        "mode",
        _ALL,
        "Turn XLA or jit compilation off and keep the traced graph.",
        "model.compile(..., jit_compile=False)",
    ),
    Workaround(
        "reference-adam",
        "optimizer",
        ("update",),
        "Use an Adam implemented from plain Keras ops with the same formula as "
        "keras.optimizers.Adam, instead of the backend's optimizer kernel.",
        "from parity.workarounds import reference_adam\n"
        "model.compile(optimizer=reference_adam(keras, learning_rate=...), ...)",
    ),
    Workaround(
        "cpu",
        "device",
        _ALL,
        "Run the model (or the layer at fault) on the CPU.",
        "with keras.device('cpu'):\n    model = build_model(); model.fit(...)",
    ),
    Workaround(
        "float32-policy",
        "precision",
        _ALL,
        "Compute in float32: set the dtype policy to float32.",
        "keras.config.set_dtype_policy('float32')",
    ),
    Workaround(
        "pin-threads",
        "threads",
        _ALL,
        "Pin the intra-op thread count, so that reductions add in a fixed order.",
        "OMP_NUM_THREADS=1, and tf.config.threading.set_intra_op_parallelism_threads(1) "
        "or torch.set_num_threads(1) before the first op",
    ),
    Workaround(
        "onednn-off",
        "onednn",
        _ALL,
        "Turn TensorFlow's oneDNN kernels off.",
        "TF_ENABLE_ONEDNN_OPTS=0 in the environment before TensorFlow is imported",
    ),
    Workaround(
        "other-backend",
        "backend",
        _ALL,
        "Run the same Keras model on another backend.",
        "KERAS_BACKEND=<backend> in the environment before Keras is imported",
    ),
)


def choose_workaround(
    phase: str | None, nonfinite: bool, dimension: str | None, to: str | None
) -> Workaround | None:
    """Return the catalogue entry for a fault's phase and the setting that avoids it.

    ``dimension`` and ``to`` describe the smallest change that made the fault
    vanish (None when no change did). Without such a change an update fault gets
    the reference Adam, which parity then tests like any other workaround.
    """
    kind = "nonfinite" if nonfinite else phase
    if dimension is None:
        if kind == "update":
            return _by_name("reference-adam")
        return None
    if dimension == "mode":
        name = "run-eagerly" if to == "eager" else "jit-off"
        return _by_name(name)
    for entry in CATALOGUE:
        if entry.dimension == dimension and kind in entry.phases:
            return entry
    return None


def workaround_change(
    workaround: Workaround, config: Configuration, variant: Configuration | None
) -> tuple[Configuration, str | None]:
    """Return the configuration and the optimizer option that apply ``workaround``.

    A workaround found by changing one setting reruns the variant that showed it;
    the reference Adam keeps the configuration and swaps the optimizer.
    """
    if workaround.name == "reference-adam":
        return config, REFERENCE_ADAM
    return (variant or config), None


def _by_name(name: str) -> Workaround:
    return next(entry for entry in CATALOGUE if entry.name == name)


def reference_adam(keras: Any, **options: Any) -> Any:
    """Return an Adam optimizer written with plain Keras ops, for any backend.

    It computes what ``keras.optimizers.Adam`` computes in Keras 3.15: epsilon is
    added to the square root of the raw second moment, and the bias correction is
    folded into the step size. It runs through the generic per-variable update of
    ``keras.optimizers.Optimizer``, not a backend's own Adam kernel such as Keras'
    PyTorch Adam built on ``torch._foreach`` ops. Its variables are laid out
    as Adam's are, so Adam checkpoints load into it. ``amsgrad`` is not supported.
    """
    if options.pop("amsgrad", False):
        raise ValueError("reference_adam does not implement amsgrad=True.")
    beta_1 = float(options.pop("beta_1", 0.9))
    beta_2 = float(options.pop("beta_2", 0.999))
    epsilon = float(options.pop("epsilon", 1e-7))
    ops = keras.ops

    class ReferenceAdam(keras.optimizers.Optimizer):
        def build(self, var_list: list[Any]) -> None:
            if self.built:
                return
            super().build(var_list)
            self._momentums, self._velocities = self.add_optimizer_variables(
                var_list, ["momentum", "velocity"]
            )

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            dtype = variable.dtype
            lr = ops.cast(learning_rate, dtype)
            gradient = ops.cast(gradient, dtype)
            step = ops.cast(self.iterations + 1, dtype)
            beta_1_power = ops.power(ops.cast(beta_1, dtype), step)
            beta_2_power = ops.power(ops.cast(beta_2, dtype), step)
            index = self._get_variable_index(variable)
            m = self._momentums[index]
            v = self._velocities[index]
            alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
            self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - beta_1))
            self.assign_add(
                v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - beta_2)
            )
            self.assign_sub(
                variable,
                ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), epsilon)),
            )

    options.setdefault("name", "adam")
    return ReferenceAdam(**options)


def swap_optimizer(keras: Any, model: Any, option: str | None) -> None:
    """Recompile a compiled model with the optimizer that ``option`` names.

    None keeps the model's optimizer, and so does a model already compiled with
    the reference Adam (the lockstep worker compiles a scenario with it when its
    spec names it). Only Adam can be swapped for the reference Adam; other
    optimizers raise ValueError.
    """
    if option is None:
        return
    if option != REFERENCE_ADAM:
        raise ValueError(f"unknown optimizer option {option!r}; use {REFERENCE_ADAM!r}")
    current = model.optimizer
    if type(current).__name__ == "ReferenceAdam":
        return
    config = current.get_config()
    if type(current).__name__ != "Adam" or config.get("amsgrad"):
        raise ValueError(
            f"the reference Adam replaces Adam without amsgrad only, not "
            f"{type(current).__name__} {config}"
        )
    learning_rate = float(keras.ops.convert_to_numpy(current.learning_rate))
    optimizer = reference_adam(
        keras,
        learning_rate=learning_rate,
        beta_1=config["beta_1"],
        beta_2=config["beta_2"],
        epsilon=config["epsilon"],
    )
    model.compile(
        optimizer=optimizer,
        loss=model.loss,
        run_eagerly=model.run_eagerly,
        jit_compile=model.jit_compile,
    )
