"""parity: does a model compute and train the same on every backend, device and compiler?

The public API is named here. Deep learning frameworks are imported only inside
worker processes, so ``import parity`` stays fast and works with none installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from parity.config import Configuration, parse_config, parse_configs
from parity.errors import ConfigError, InputError, ParityError, WorkerError

if TYPE_CHECKING:
    from parity.api import Report, RunOptions
    from parity.doctor import DoctorOptions, DoctorResult
    from parity.tensors import TensorComparison, compare_tensors

__all__ = [
    "ConfigError",
    "Configuration",
    "DoctorOptions",
    "DoctorResult",
    "InputError",
    "ParityError",
    "Report",
    "RunOptions",
    "TensorComparison",
    "WorkerError",
    "check",
    "compare",
    "compare_tensors",
    "parse_config",
    "parse_configs",
]

# Lazily imported names: the module that defines each one.
_LAZY = {
    "DoctorOptions": "parity.doctor",
    "DoctorResult": "parity.doctor",
    "Report": "parity.api",
    "RunOptions": "parity.api",
    "TensorComparison": "parity.tensors",
    "compare_tensors": "parity.tensors",
}


def check(**options: Any) -> DoctorResult:
    """Run a built-in scenario in lockstep, as ``parity doctor`` does, and return the result.

    Keyword arguments are the fields of `DoctorOptions`, such as ``scenario``,
    ``configs``, ``epochs``, ``faults`` and ``out``.
    """
    from parity.doctor import DoctorOptions, run_doctor

    return run_doctor(DoctorOptions(**options))


def compare(model: Any, x: Any, y: Any, **options: Any) -> Report:
    """Train ``model`` on ``x``, ``y`` in lockstep on each configuration and judge it.

    ``model`` is a Keras model, a ``.keras`` path or a factory string
    (``module:function``). Keyword arguments are ``configs``, ``epochs``,
    ``batch_size`` and the other fields of `RunOptions`. Returns a `Report`.
    """
    from parity.api import compare as compare_model

    return compare_model(model, x, y, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
