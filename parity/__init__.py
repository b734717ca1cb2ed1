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
    from parity.compare import TensorComparison, compare_tensors
    from parity.doctor import DoctorOptions, DoctorResult

__all__ = [
    "ConfigError",
    "Configuration",
    "DoctorOptions",
    "DoctorResult",
    "InputError",
    "ParityError",
    "TensorComparison",
    "WorkerError",
    "compare_tensors",
    "doctor",
    "parse_config",
    "parse_configs",
]


def doctor(**options: Any) -> DoctorResult:
    """Run the doctor from Python; keyword arguments are the fields of `DoctorOptions`."""
    from parity.doctor import DoctorOptions, run_doctor

    return run_doctor(DoctorOptions(**options))


def __getattr__(name: str) -> Any:
    if name in ("DoctorOptions", "DoctorResult"):
        from parity import doctor as doctor_module

        return getattr(doctor_module, name)
    if name in ("compare_tensors", "TensorComparison"):
        from parity import compare

        return getattr(compare, name)
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
