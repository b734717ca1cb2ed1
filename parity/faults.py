"""Emulated accelerator and compiler faults.

A fault is a callable that takes the `Configuration` of the worker it runs in. The
worker calls it after the backend is imported and before the model is built, so
it can patch Keras or the backend for that one process. Faults make a CPU-only
machine show what a broken GPU or compiler looks like, and they are the ground
truth for parity's own tests.

On the command line a fault is named by its catalogue name (``parity faults``
lists them), by ``module:function`` or by ``path/to/file.py:function``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

from parity.config import Configuration
from parity.errors import InputError

FaultFunction = Callable[[Configuration], None]


@dataclasses.dataclass(frozen=True)
class Fault:
    """A catalogued fault: its name, what it does, the public bug class it stands for."""

    name: str
    summary: str
    stands_for: str
    apply: FaultFunction


CATALOGUE: dict[str, Fault] = {}


def register(
    name: str, summary: str, stands_for: str
) -> Callable[[FaultFunction], FaultFunction]:
    """Add a function to the catalogue under ``name``; use as a decorator."""

    def decorate(function: FaultFunction) -> FaultFunction:
        CATALOGUE[name] = Fault(name, summary, stands_for, function)
        return function

    return decorate


def in_compiled_trace(config: Configuration) -> bool:
    """Return whether the code calling this runs inside a compiled trace right now.

    TensorFlow and PyTorch can tell at trace time. For JAX the configuration's mode
    decides, because under ``jax.grad`` even eager values are tracers.
    """
    if config.backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    if config.backend == "torch":
        import torch

        return bool(torch.compiler.is_compiling())
    return config.compiled


@register(
    "fused-dense-relu",
    "Dense layers with a ReLU activation skip the activation when compiled.",
    "A fused MatMul+BiasAdd+ReLU kernel that is wrong only in graph mode, as reported "
    "for the TensorFlow Metal plugin on Apple GPUs: eager mode and the CPU are right, "
    "and small ReLU networks end up nearly linear.",
)
def fused_dense_relu(config: Configuration) -> None:
    import keras
    from keras.src.layers.core.dense import Dense

    original_call = Dense.call

    def call(self: Any, inputs: Any, training: Any = None) -> Any:
        if self.activation is keras.activations.relu and in_compiled_trace(config):
            outputs = keras.ops.matmul(inputs, self.kernel)
            if self.bias is not None:
                outputs = keras.ops.add(outputs, self.bias)
            return outputs
        return original_call(self, inputs, training=training)

    Dense.call = call


def resolve_fault(spec: str) -> FaultFunction:
    """Return the fault function named by a catalogue name, module:function or file.py:function."""
    if spec in CATALOGUE:
        return CATALOGUE[spec].apply
    if ":" not in spec:
        raise InputError(
            f"Unknown fault {spec!r}. Use a name from `parity faults` "
            f"({', '.join(CATALOGUE)}), or module:function, or path/to/file.py:function."
        )
    target, _, function_name = spec.rpartition(":")
    if target.endswith(".py"):
        module = _load_file(target, spec)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise InputError(
                f"Cannot import module {target!r} for fault {spec!r}: {error}. "
                "Check the module name and that it is on PYTHONPATH."
            ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(
            f"Fault {spec!r}: {target!r} has no callable named {function_name!r}."
        )
    return function


def _load_file(path: str, spec: str) -> Any:
    if not os.path.isfile(path):
        raise InputError(f"Fault file {path!r} of fault {spec!r} not found.")
    module_spec = importlib.util.spec_from_file_location("parity_user_fault", path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"Fault file {path!r} cannot be loaded as a Python module.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def validate_fault_name(spec: str) -> None:
    """Check a fault name in the parent process without running user code.

    Catalogue names must exist; module and file forms are checked for shape and,
    for files, existence. The worker imports them.
    """
    if spec in CATALOGUE:
        return
    target, sep, function_name = spec.rpartition(":")
    if not sep or not target or not function_name.isidentifier():
        raise InputError(
            f"Unknown fault {spec!r}. Use a name from `parity faults` "
            f"({', '.join(CATALOGUE)}), or module:function, or path/to/file.py:function."
        )
    if target.endswith(".py") and not os.path.isfile(target):
        raise InputError(f"Fault file {target!r} of fault {spec!r} not found.")
