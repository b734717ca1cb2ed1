"""Environment fingerprints: what software and hardware produced a result.

Package versions come from installed metadata, so a fingerprint can be taken
without importing any framework. Devices are listed only for the backend that the
calling process has already imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Any

PACKAGES = (
    "parity-ml",
    "numpy",
    "keras",
    "tensorflow",
    "tensorflow-cpu",
    "jax",
    "jaxlib",
    "torch",
    "scikit-learn",
    "pandas",
)

# Accelerator plugins that change which kernels a backend runs.
PLUGINS = (
    "tensorflow-metal",
    "jax-metal",
    "intel-extension-for-tensorflow",
    "tensorflow-directml-plugin",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "nvidia-cudnn-cu12",
)

# Environment variables that change numerics or device placement.
NUMERIC_FLAGS = (
    "KERAS_BACKEND",
    "TF_ENABLE_ONEDNN_OPTS",
    "XLA_FLAGS",
    "JAX_PLATFORMS",
    "JAX_ENABLE_X64",
    "JAX_DEFAULT_MATMUL_PRECISION",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "NVIDIA_TF32_OVERRIDE",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "OPENBLAS_CORETYPE",
)

BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def package_version(name: str) -> str | None:
    """Return the installed version of a distribution, or None when it is absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_backends() -> list[str]:
    """Return the backends whose Python package can be found, without importing it."""
    found = []
    for name, module in BACKEND_MODULES.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(name)
        except (ImportError, ValueError):
            continue
    return found


def cpu_model() -> str:
    """Return the CPU model name, read from /proc/cpuinfo where it exists."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(backend_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe this process: platform, CPU, versions, plugins, flags and devices."""
    versions = {name: package_version(name) for name in PACKAGES}
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": {name: version for name, version in versions.items() if version},
        "plugins": {name: v for name in PLUGINS if (v := package_version(name))},
        "flags": {
            name: os.environ[name] for name in NUMERIC_FLAGS if name in os.environ
        },
        **(backend_info or {}),
    }


def backend_details(backend: str) -> dict[str, Any]:
    """Describe the already imported backend: visible devices, threads, dtype policy."""
    import keras

    info: dict[str, Any] = {
        "backend": backend,
        "dtype_policy": keras.config.dtype_policy().name,
        "floatx": keras.config.floatx(),
    }
    if backend == "tensorflow":
        import tensorflow as tf

        info["devices"] = [d.name for d in tf.config.list_logical_devices()]
        info["threads"] = {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        }
    elif backend == "jax":
        import jax

        info["devices"] = [str(d) for d in jax.devices()]
        info["x64"] = bool(jax.config.read("jax_enable_x64"))
    elif backend == "torch":
        import torch

        info["devices"] = ["cpu"] + [
            f"cuda:{i}" for i in range(torch.cuda.device_count())
        ]
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            info["devices"].append("mps")
        info["threads"] = {"intra_op": torch.get_num_threads()}
        info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        info["tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    return info
