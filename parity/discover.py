"""Find the configurations this machine can run, without importing any framework.

Installed backends are found from their import specs. Accelerators are probed
only where a driver or platform suggests one: a worker process imports the
backend and lists its devices.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from parity.config import BACKENDS, MODES, Configuration
from parity.env import installed_backends, package_version

log = logging.getLogger("parity")

INSTALL_HINTS = {
    "tensorflow": "pip install tensorflow",
    "jax": "pip install jax",
    "torch": "pip install torch",
}

# Seconds a device probe may take: importing TensorFlow alone can take ten.
PROBE_TIMEOUT = 120.0

# Modes left out of the default set, with the reason.
SLOW_MODES = {("torch", "compile"): "torch.compile takes minutes to compile on the CPU"}


def nvidia_driver_present() -> bool:
    """Return whether an NVIDIA kernel driver is loaded (Linux) or nvidia-smi exists."""
    return os.path.exists("/proc/driver/nvidia/version") or bool(_which("nvidia-smi"))


def _which(name: str) -> str | None:
    from shutil import which

    return which(name)


def apple_silicon() -> bool:
    """Return whether this is macOS on Apple silicon, where Metal and MPS exist."""
    return sys.platform == "darwin" and platform.machine() == "arm64"


def accelerator_kinds(backend: str) -> list[tuple[str, str | None]]:
    """Return (device kind, reason it cannot exist here or None) for a backend."""
    kinds: list[tuple[str, str | None]] = []
    if apple_silicon():
        plugin = {"tensorflow": "tensorflow-metal", "jax": "jax-metal"}.get(backend)
        kind = {"tensorflow": "gpu", "jax": "metal", "torch": "mps"}[backend]
        missing = plugin and not package_version(plugin)
        kinds.append((kind, f"{plugin} is not installed" if missing else None))
    else:
        kind = "gpu" if backend == "tensorflow" else "cuda"
        reason = None if nvidia_driver_present() else "no NVIDIA driver found"
        kinds.append((kind, reason))
    return kinds


def probe_devices(backend: str) -> tuple[list[str], str | None]:
    """List the accelerator devices visible to a backend, in a subprocess; return (devices, error)."""
    command = [sys.executable, "-m", "parity.probe", backend]
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            timeout=PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [], f"probing {backend} devices timed out after {PROBE_TIMEOUT:.0f} s"
    try:
        devices = json.loads(completed.stdout.decode().strip().splitlines()[-1])[
            "accelerators"
        ]
        return [str(device) for device in devices], None
    except (IndexError, ValueError, KeyError, TypeError):
        tail = completed.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return [], f"probing {backend} failed: {' '.join(tail) or 'no output'}"


def default_configs() -> tuple[list[Configuration], list[tuple[str, str]]]:
    """Return the configurations to run here and (name, reason) for those that cannot run.

    Every installed backend runs on the CPU in each of its modes. Every accelerator
    visible to a backend runs in its compiled mode and in eager mode.
    """
    installed = installed_backends()
    configs: list[Configuration] = []
    not_run: list[tuple[str, str]] = []
    to_probe = []
    for backend in BACKENDS:
        if backend not in installed:
            not_run.append(
                (
                    f"{backend}:cpu",
                    f"{backend} is not installed ({INSTALL_HINTS[backend]})",
                )
            )
            continue
        for mode in MODES[backend]:
            if (backend, mode) in SLOW_MODES:
                continue
            configs.append(Configuration(backend, "cpu", None, mode, "float32"))
        for kind, reason in accelerator_kinds(backend):
            if reason:
                not_run.append((f"{backend}:{kind}", reason))
            else:
                to_probe.append((backend, kind))

    with ThreadPoolExecutor(max_workers=3) as pool:
        probed = list(pool.map(lambda item: (item, probe_devices(item[0])), to_probe))
    for (backend, kind), (devices, error) in probed:
        if error or not devices:
            not_run.append(
                (f"{backend}:{kind}", error or f"{backend} sees no {kind} device")
            )
            continue
        for index, _ in enumerate(devices):
            device_index = None if kind in ("mps", "metal") else index
            for mode in MODES[backend]:
                if (backend, mode) not in SLOW_MODES:
                    configs.append(
                        Configuration(backend, kind, device_index, mode, "float32")
                    )
    return configs, not_run


def absent_device_reason(config: Configuration) -> str | None:
    """Return why a configuration's accelerator cannot exist here, or None.

    Only the platform and the NVIDIA driver are checked, without importing the
    backend. A present driver with a CPU-only build still fails in
    the worker, with the framework's message.
    """
    if config.device == "cpu":
        return None
    apple_kinds = ("mps", "metal") + (
        ("gpu",) if config.backend == "tensorflow" else ()
    )
    if apple_silicon():
        for kind, reason in accelerator_kinds(config.backend):
            if kind == config.device:
                return reason
        if config.device not in apple_kinds:
            return f"{config.device} devices do not exist on macOS"
        return None
    if config.device in ("mps", "metal"):
        return f"{config.device} needs macOS on Apple silicon"
    if not nvidia_driver_present():
        return "no NVIDIA driver found"
    return None
