"""Built-in experiments: data from scikit-learn and a small Keras model for each.

Data is built with numpy and scikit-learn only, so the parent process can plot it
without importing a deep learning framework. Models are built inside a worker,
from the ``keras`` module that the worker imported for its backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from parity.errors import InputError

# Points per side of the grid on which decision boundaries are compared and drawn.
GRID_SIZE = 100


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A dataset, a model, a loss and an optimizer setting, trained for some epochs."""

    name: str
    description: str
    task: str  # "binary" or "multiclass"
    num_classes: int
    epochs: int
    batch_size: int
    learning_rate: float
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    build: Callable[[Any, str], Any]  # (keras module, hidden activation) -> model

    @property
    def loss(self) -> str:
        """The Keras loss name for this task."""
        if self.task == "binary":
            return "binary_crossentropy"
        return "sparse_categorical_crossentropy"

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """Return float32 inputs and labels (float32 for binary, int32 otherwise)."""
        x, y = self.load()
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32 if self.task == "binary" else np.int32)
        if self.task == "binary":
            y = y.reshape(-1, 1)
        return x, y


def _circles() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_circles

    return make_circles(n_samples=1000, noise=0.03, random_state=42)


def _moons() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    return make_moons(n_samples=1000, noise=0.1, random_state=42)


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_blobs

    return make_blobs(n_samples=1000, centers=3, cluster_std=1.5, random_state=42)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixels are 0..16; scale to 0..1 and keep the 8x8 image shape with one channel.
    return digits.images[..., None] / 16.0, digits.target


def _large_circles() -> tuple[np.ndarray, np.ndarray]:
    x, y = _circles()
    return 1000.0 * x, y


def _two_relu_layers(keras: Any, activation: str, units_out: int, out_act: str) -> Any:
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(12, activation=activation),
            keras.layers.Dense(8, activation=activation),
            keras.layers.Dense(units_out, activation=out_act),
        ]
    )


def _binary_mlp(keras: Any, activation: str) -> Any:
    return _two_relu_layers(keras, activation, 1, "sigmoid")


def _blobs_mlp(keras: Any, activation: str) -> Any:
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(16, activation=activation),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _digits_cnn(keras: Any, activation: str) -> Any:
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation=activation),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation=activation),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def _wide_mlp(keras: Any, activation: str) -> Any:
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(1100, activation=activation),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )


def _radius_mlp(keras: Any, activation: str) -> Any:
    # The squared radius is the natural feature for circles. On coordinates of about
    # 1e3 it is about 1e6, beyond float16's largest finite value of 65,504.
    def append_squared_radius(x: Any) -> Any:
        squared = keras.ops.sum(keras.ops.square(x), axis=-1, keepdims=True)
        return keras.ops.concatenate([x, squared], axis=-1)

    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Lambda(append_squared_radius, name="squared_radius"),
            keras.layers.Dense(12, activation=activation),
            keras.layers.Dense(8, activation=activation),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "circles",
            "make_circles(1000, noise=0.03): Dense 12 relu, Dense 8 relu, Dense 1 sigmoid",
            "binary",
            2,
            100,
            32,
            0.01,
            _circles,
            _binary_mlp,
        ),
        Scenario(
            "moons",
            "make_moons(1000, noise=0.1): Dense 12 relu, Dense 8 relu, Dense 1 sigmoid",
            "binary",
            2,
            100,
            32,
            0.01,
            _moons,
            _binary_mlp,
        ),
        Scenario(
            "blobs",
            "make_blobs(1000, 3 centers): Dense 16 relu, Dense 3 softmax",
            "multiclass",
            3,
            50,
            32,
            0.01,
            _blobs,
            _blobs_mlp,
        ),
        Scenario(
            "digits",
            "load_digits 8x8 images: Conv2D 8, max pool, Dense 32 relu, Dense 10 softmax",
            "multiclass",
            10,
            20,
            32,
            0.003,
            _digits,
            _digits_cnn,
        ),
        Scenario(
            "wide",
            "make_moons(1000, noise=0.1): Dense 1100 relu, Dense 1 sigmoid; a layer "
            "wider than 1024 units",
            "binary",
            2,
            20,
            32,
            0.01,
            _moons,
            _wide_mlp,
        ),
        Scenario(
            "large-circles",
            "make_circles(1000, noise=0.03) scaled by 1000: squared radius appended, "
            "Dense 12 relu, Dense 8 relu, Dense 1 sigmoid",
            "binary",
            2,
            20,
            32,
            0.01,
            _large_circles,
            _radius_mlp,
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    """Look up a built-in scenario by name."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise InputError(
            f"Unknown scenario {name!r}. Use one of: {', '.join(SCENARIOS)} "
            "(--scenario NAME, Python: scenario=NAME)."
        ) from None


def decision_grid(
    x: np.ndarray, size: int = GRID_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the axes and the points of a size x size grid over 2-feature data.

    The grid spans the data with a margin of a tenth of its range on each side.
    Points are float32 in row-major order: ``points[i * size + j] = (xs[j], ys[i])``.
    """
    low = x.min(axis=0).astype(np.float64)
    high = x.max(axis=0).astype(np.float64)
    margin = 0.1 * (high - low)
    xs = np.linspace(low[0] - margin[0], high[0] + margin[0], size)
    ys = np.linspace(low[1] - margin[1], high[1] + margin[1], size)
    grid_x, grid_y = np.meshgrid(xs, ys)
    points = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.float32)
    return xs, ys, points
