"""Print the accelerator devices visible to one backend, as one JSON line.

Run as ``python -m parity.probe BACKEND``. It runs in a process of its own because
importing a backend fixes Keras' choice of backend for the whole process.
"""

from __future__ import annotations

import json
import os
import sys


def accelerators(backend: str) -> list[str]:
    """Return the names of the non-CPU devices visible to ``backend``."""
    if backend == "tensorflow":
        import tensorflow as tf

        return [device.name for device in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [str(device) for device in jax.devices() if device.platform != "cpu"]
    if backend == "torch":
        import torch

        found = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            found.append("mps")
        return found
    raise SystemExit(f"unknown backend {backend!r}")


def main() -> None:
    """Probe the backend named on the command line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(
        json.dumps({"backend": sys.argv[1], "accelerators": accelerators(sys.argv[1])})
    )


if __name__ == "__main__":
    main()
