"""Record a user's own ``model.fit`` into a trace: the `Recorder` callback.

Usage::

    from parity.keras import Recorder

    model.fit(x, y, epochs=20, shuffle=False,
              callbacks=[Recorder("laptop.parity", shuffle=False, data=(x, y))])

and then ``parity compare laptop.parity cloud.parity``. The recorder cannot drive
training step by step as ``parity record`` does, so it records what a callback
receives: the initial weights, the logs after every batch and every epoch, the
weights at epoch ends and the environment. It never changes the training.

Contents of a keras-fit trace
-----------------------------
``meta``: ``kind`` ``"keras-fit"``, ``kind_version`` 1, ``parity_version``,
``recorded_at``, ``label``, ``backend``, ``environment`` (the fingerprint of this
process), ``model`` (name, class, variable paths and shapes), ``fit`` (planned
epochs, steps per epoch, epochs completed, ``shuffle``, ``replayable`` and
``replay_note``), ``init_digest``, ``data`` (digest and sample count, or null),
``weight_epochs``, ``epoch_metrics``, ``batch_metrics`` and ``final_logs``.

Tensors: ``initial/param/{j}``, ``epoch/{e}/param/{j}`` (weights after epoch
``e``, counted from 1), ``epochs/{metric}`` (epoch logs), ``batches/epoch``,
``batches/batch`` and ``batches/{metric}`` (batch logs). Keras 3 reports a
batch's logs as running means over the epoch so far, and they are stored as
reported.

Exact replay needs the same batches in the same order. ``model.fit`` shuffles by
default, and a callback cannot see the ``shuffle`` argument, so the recorder
assumes ``shuffle=True`` unless told otherwise. A shuffled recording states that
it cannot be compared step by step, and ``parity compare`` then compares only
the final metrics.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from parity import __version__
from parity.env import backend_details, fingerprint
from parity.errors import InputError
from parity.lockstep import digest_bytes
from parity.record import FIT_KIND, KIND_VERSION
from parity.trace import write_trace

__all__ = ["Recorder"]

log = logging.getLogger("parity")

_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]")

SHUFFLED_NOTE = (
    "model.fit shuffled the data (shuffle=True, its default), so two runs see "
    "different batches and cannot be compared step by step: compare falls back to "
    "the final metrics. Pass shuffle=False to model.fit and to Recorder for a "
    "comparison of the weights at every epoch end."
)
ORDERED_NOTE = (
    "model.fit took batches in data order (shuffle=False), so the weights at epoch "
    "ends can be compared with a run that starts from the same initial weights."
)


class Recorder(keras.callbacks.Callback):
    """A Keras callback that writes what ``model.fit`` did to a ``.parity`` trace.

    Args:
        path: where to write the trace, a local path or an fsspec URL. It is
            written once, when training ends.
        shuffle: the ``shuffle`` argument given to ``model.fit``. It decides
            whether the recording can be compared step by step.
        data: the training inputs and targets, ``(x, y)``, as numpy arrays. Only
            their digest and size are recorded, so that compare can check that
            both runs trained on the same data.
        weights_every: keep the weights every this many epochs (and after the
            last). Weights are held in memory until training ends.
        label: a name for the run in compare's output (default: the backend).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shuffle: bool = True,
        data: Sequence[Any] | None = None,
        weights_every: int = 1,
        label: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(weights_every, bool) or not isinstance(weights_every, int):
            raise InputError(
                f"Recorder(weights_every={weights_every!r}) is invalid: pass a "
                "positive integer."
            )
        if weights_every < 1:
            raise InputError(
                f"Recorder(weights_every={weights_every}) is invalid: pass 1 or more."
            )
        self.path = os.fspath(path)
        self.shuffle = bool(shuffle)
        self.weights_every = weights_every
        self.label = label
        self.data = _describe_data(data)
        self._reset()

    def _reset(self) -> None:
        self._initial: list[np.ndarray] = []
        self._weights: dict[int, list[np.ndarray]] = {}
        self._epoch_logs: list[dict[str, float]] = []
        self._batch_logs: list[tuple[int, int, dict[str, float]]] = []
        self._epoch = 0
        self._environment: dict[str, Any] = {}

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._reset()
        self._initial = self._current_weights()
        self._environment = fingerprint(backend_details(keras.backend.backend()))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        self._batch_logs.append((self._epoch, batch, _floats(logs)))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_logs.append(_floats(logs))
        if (epoch + 1) % self.weights_every == 0:
            self._weights[epoch + 1] = self._current_weights()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        completed = len(self._epoch_logs)
        if completed and completed not in self._weights:
            self._weights[completed] = self._current_weights()
        meta, tensors = self._contents()
        write_trace(self.path, meta, tensors)
        log.info("recorded model.fit into %s", self.path)

    def _current_weights(self) -> list[np.ndarray]:
        return [
            np.array(keras.ops.convert_to_numpy(variable))
            for variable in self.model.weights
        ]

    def _contents(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        variables = self.model.weights
        tensors: dict[str, np.ndarray] = {}
        for j, value in enumerate(self._initial):
            tensors[f"initial/param/{j}"] = value
        for epoch, values in sorted(self._weights.items()):
            for j, value in enumerate(values):
                tensors[f"epoch/{epoch}/param/{j}"] = value
        epoch_metrics = _columns(self._epoch_logs, "epochs", tensors)
        batch_metrics = _columns(
            [logs for _, _, logs in self._batch_logs], "batches", tensors
        )
        tensors["batches/epoch"] = np.array(
            [e for e, _, _ in self._batch_logs], np.int64
        )
        tensors["batches/batch"] = np.array(
            [b for _, b, _ in self._batch_logs], np.int64
        )
        backend = keras.backend.backend()
        meta = {
            "kind": FIT_KIND,
            "kind_version": KIND_VERSION,
            "parity_version": __version__,
            "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "label": self.label or backend,
            "backend": backend,
            "environment": self._environment,
            "model": {
                "name": self.model.name,
                "class": type(self.model).__name__,
                "variable_names": [variable.path for variable in variables],
                "variable_shapes": [list(value.shape) for value in self._initial],
            },
            "fit": {
                "epochs": self.params.get("epochs"),
                "steps_per_epoch": self.params.get("steps"),
                "epochs_completed": len(self._epoch_logs),
                "shuffle": self.shuffle,
                "replayable": not self.shuffle,
                "replay_note": SHUFFLED_NOTE if self.shuffle else ORDERED_NOTE,
            },
            "init_digest": digest_bytes(self._initial),
            "data": self.data,
            "weight_epochs": sorted(self._weights),
            "epoch_metrics": epoch_metrics,
            "batch_metrics": batch_metrics,
            "final_logs": self._epoch_logs[-1] if self._epoch_logs else {},
        }
        return meta, tensors


def _describe_data(data: Sequence[Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    arrays = [np.asarray(item) for item in data]
    if not arrays or any(array.ndim == 0 for array in arrays):
        raise InputError(
            "Recorder(data=...) is invalid: pass the training arrays with one row "
            "per sample, such as data=(x, y)."
        )
    return {"digest": digest_bytes(arrays), "samples": len(arrays[0])}


def metric_name(key: str) -> str:
    """Return a log key as a name that tensor names can contain."""
    return _UNSAFE_NAME_CHARACTERS.sub("_", key)[:100] or "_"


def _floats(logs: dict[str, Any] | None) -> dict[str, float]:
    values = {}
    for key, value in (logs or {}).items():
        try:
            values[metric_name(str(key))] = float(value)
        except (TypeError, ValueError):
            continue
    return values


def _columns(
    rows: list[dict[str, float]], prefix: str, tensors: dict[str, np.ndarray]
) -> list[str]:
    """Store each metric of ``rows`` as a float64 column; return the metric names.

    A row without a metric has NaN there.
    """
    names = sorted({name for row in rows for name in row})
    for name in names:
        tensors[f"{prefix}/{name}"] = np.array(
            [row.get(name, np.nan) for row in rows], np.float64
        )
    return names
