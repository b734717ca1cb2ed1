"""Atomic file writes: a temporary file in the same directory, then a rename.

A crash in the middle of a write leaves the old file or none, never a half file
under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only. Written files get the mode
# that open() would give them, so that a shared report stays readable.
FILE_MODE = 0o666 & ~_process_umask()


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], None]
) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), FILE_MODE)
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes to ``path`` atomically."""
    atomic_write(path, lambda stream: stream.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 text to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write a JSON document to ``path`` atomically; NaN and inf become null."""
    text = json.dumps(_finite(value), indent=1, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_write_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray]
) -> None:
    """Write named numpy arrays to a safetensors file atomically."""
    from safetensors.numpy import save

    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    atomic_write_bytes(path, save(arrays))


def _finite(value: Any) -> Any:
    """Replace non-finite floats by None, recursively, so the JSON stays standard."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value
