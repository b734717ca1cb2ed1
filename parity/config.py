"""Configurations: backend x device x execution mode x precision policy x flags.

A configuration has a short string form used on the command line::

    tensorflow:cpu:graph:float32
    jax:cpu:jit:float32:threads=1
    torch:cuda:0:eager:mixed_bfloat16

The parts are, in order: backend, device (with an optional index), mode and
precision policy, then any number of ``key=value`` flags. Trailing parts may be
left out; they take the backend's defaults (``cpu``, its compiled mode, ``float32``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from parity.errors import ConfigError

Backend = Literal["tensorflow", "jax", "torch"]

BACKENDS: tuple[str, ...] = ("tensorflow", "jax", "torch")

# Execution modes each backend offers through Keras 3, compiled mode first.
MODES: dict[str, tuple[str, ...]] = {
    "tensorflow": ("graph", "xla", "eager"),
    "jax": ("jit", "eager"),
    "torch": ("eager", "compile"),
}

# Modes that trace the model into a graph that a compiler may rewrite.
COMPILED_MODES = frozenset({"graph", "xla", "jit", "compile"})

# Device kinds each backend can address. TensorFlow calls CUDA and Metal GPUs "gpu".
DEVICES: dict[str, tuple[str, ...]] = {
    "tensorflow": ("cpu", "gpu"),
    "jax": ("cpu", "cuda", "gpu", "metal"),
    "torch": ("cpu", "cuda", "mps"),
}

# Keras dtype policies. "float64" sets floatx to float64 and is what the referee uses.
PRECISIONS: tuple[str, ...] = (
    "float32",
    "float64",
    "mixed_float16",
    "mixed_bfloat16",
    "float16",
    "bfloat16",
)

# Flags read at process start-up, so they are part of the configuration.
FLAGS: dict[str, str] = {
    "threads": "intra-op thread count, a positive integer",
    "onednn": "TensorFlow oneDNN kernels, on or off (TF_ENABLE_ONEDNN_OPTS)",
}


@dataclasses.dataclass(frozen=True, order=True)
class Configuration:
    """One way of running a model: backend, device, execution mode, precision, flags."""

    backend: str
    device: str = "cpu"
    device_index: int | None = None
    mode: str = ""
    precision: str = "float32"
    flags: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.mode:
            object.__setattr__(self, "mode", MODES.get(self.backend, ("",))[0])
        _validate(self)

    @property
    def compiled(self) -> bool:
        """Whether the training step is traced and compiled."""
        return self.mode in COMPILED_MODES

    @property
    def device_string(self) -> str:
        """The device part of the string form, such as ``cpu`` or ``cuda:0``."""
        if self.device_index is None:
            return self.device
        return f"{self.device}:{self.device_index}"

    @property
    def threads(self) -> int | None:
        """The intra-op thread count set by the ``threads`` flag, if any."""
        value = dict(self.flags).get("threads")
        return int(value) if value is not None else None

    @property
    def onednn(self) -> bool | None:
        """The ``onednn`` flag: True for on, False for off, None when not set."""
        value = dict(self.flags).get("onednn")
        return None if value is None else value == "on"

    def replace(self, **changes: object) -> Configuration:
        """Return a copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def with_flag(self, key: str, value: str | None) -> Configuration:
        """Return a copy with one flag set, or removed when ``value`` is None."""
        flags = {k: v for k, v in self.flags if k != key}
        if value is not None:
            flags[key] = value
        return self.replace(flags=tuple(sorted(flags.items())))

    def __str__(self) -> str:
        parts = [self.backend, self.device_string, self.mode, self.precision]
        parts += [f"{key}={value}" for key, value in self.flags]
        return ":".join(parts)


def parse_config(text: str) -> Configuration:
    """Parse a configuration string such as ``jax:cpu:jit:float32``.

    Raises ConfigError naming the unknown part and the accepted values.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            f"Invalid configuration {text!r}: expected a string such as "
            "'tensorflow:cpu:graph:float32'."
        )
    parts = [part.strip() for part in text.strip().split(":")]
    flags = {}
    while parts and "=" in parts[-1]:
        key, _, value = parts.pop().partition("=")
        flags[key.strip()] = value.strip()
    if any("=" in part for part in parts):
        raise ConfigError(
            f"Invalid configuration {text!r}: key=value flags must come after the "
            "precision, as in 'jax:cpu:jit:float32:threads=1'."
        )

    backend = parts.pop(0).lower()
    if backend not in BACKENDS:
        raise ConfigError(
            f"Unknown backend {backend!r} in configuration {text!r}. "
            f"Use one of: {', '.join(BACKENDS)}."
        )
    fields: dict[str, object] = {"backend": backend}
    if parts:
        fields["device"] = parts.pop(0).lower()
    if parts and parts[0].isdigit():
        fields["device_index"] = int(parts.pop(0))
    if parts:
        fields["mode"] = parts.pop(0).lower()
    if parts:
        fields["precision"] = parts.pop(0).lower()
    if parts:
        raise ConfigError(
            f"Invalid configuration {text!r}: unexpected extra part(s) "
            f"{':'.join(parts)!r}. The form is backend:device[:index]:mode:precision"
            "[:key=value...]."
        )
    fields["flags"] = tuple(sorted(flags.items()))
    try:
        return Configuration(**fields)  # type: ignore[arg-type]
    except ConfigError as error:
        raise ConfigError(f"Invalid configuration {text!r}: {error}") from None


def parse_configs(text: str | list[str] | tuple[str, ...]) -> list[Configuration]:
    """Parse a comma-separated list of configuration strings, or a list of them."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [item for item in (i.strip() for i in items) if item]
    if not items:
        raise ConfigError(
            f"No configuration given in {text!r}: pass at least one, such as "
            "--configs tensorflow:cpu:graph:float32 (Python: configs=[...])."
        )
    return [parse_config(item) for item in items]


def _validate(config: Configuration) -> None:
    backend = config.backend
    if backend not in BACKENDS:
        raise ConfigError(
            f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}."
        )
    if config.device not in DEVICES[backend]:
        raise ConfigError(
            f"unknown device {config.device!r} for {backend}; "
            f"use one of {', '.join(DEVICES[backend])}."
        )
    if config.device == "cpu" and config.device_index not in (None, 0):
        raise ConfigError("the CPU takes no device index; write 'cpu'.")
    if config.device_index is not None and config.device_index < 0:
        raise ConfigError(f"device index {config.device_index} must be 0 or more.")
    if config.mode not in MODES[backend]:
        raise ConfigError(
            f"unknown mode {config.mode!r} for {backend}; "
            f"use one of {', '.join(MODES[backend])}."
        )
    if config.precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision policy {config.precision!r}; "
            f"use one of {', '.join(PRECISIONS)}."
        )
    for key, value in config.flags:
        _validate_flag(backend, key, value)


def _validate_flag(backend: str, key: str, value: str) -> None:
    if key not in FLAGS:
        known = "; ".join(f"{name}: {meaning}" for name, meaning in FLAGS.items())
        raise ConfigError(f"unknown flag {key!r}. Known flags are {known}.")
    if key == "threads" and not (value.isdigit() and int(value) > 0):
        raise ConfigError(
            f"threads={value!r} must be a positive integer, as in threads=1."
        )
    if key == "onednn":
        if value not in ("on", "off"):
            raise ConfigError(f"onednn={value!r} must be 'on' or 'off'.")
        if backend != "tensorflow":
            raise ConfigError(
                f"the onednn flag applies to tensorflow only, not {backend}."
            )


def default_referee(installed: list[str]) -> Configuration | None:
    """Choose the float64 referee among the installed backends.

    TensorFlow's graph mode is preferred because it runs float64 on the CPU
    quickly; JAX needs x64 mode, which the worker turns on; PyTorch is slowest
    step for step through Keras.
    """
    for backend, mode in (("tensorflow", "graph"), ("jax", "jit"), ("torch", "eager")):
        if backend in installed:
            return Configuration(backend, "cpu", None, mode, "float64")
    return None
