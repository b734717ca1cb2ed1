"""A per-machine store of finished referee and envelope runs.

The float64 referee and the float32 envelope runs of a built-in scenario depend on
nothing the user chooses beyond the scenario's options, so every doctor run on the
same machine would train them again with the same result. The first run stores
them here under their resume key, and later runs copy them into their own output
directory instead of training them. The key covers the spec, parity's worker
source, the package versions, the numeric environment variables and the machine
(CPU model and platform), so a changed input always misses.

Runs of user models are never stored: their key names the model's own file but
not the modules that file imports, which may change between runs.

The store is ``$PARITY_CACHE_DIR`` when set (an empty value turns it off), else
``$XDG_CACHE_HOME/parity/runs``, else ``~/.cache/parity/runs``. Each entry is one
run directory named by its key. At most `MAX_ENTRIES` are kept; the least
recently used go first. Failures to read or write the store are logged and
otherwise ignored: the run is trained as if no store existed.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from parity.errors import InputError

log = logging.getLogger("parity")

# Entries kept before the least recently used are deleted. A 100-epoch circles
# referee run takes 5.3 MiB on disk, mostly its per-step records.
MAX_ENTRIES = 64

# Roles whose runs are stored: parity's own calibration runs.
CACHED_ROLES = frozenset({"referee", "envelope"})


def default_cache_dir() -> Path | None:
    """Return the store's directory, or None when ``PARITY_CACHE_DIR`` is empty.

    Raises `InputError` when the path exists and is not a directory.
    """
    configured = os.environ.get("PARITY_CACHE_DIR")
    if configured is not None:
        if not configured.strip():
            return None
        directory = Path(configured).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        directory = Path(base).expanduser() / "parity" / "runs"
    if directory.exists() and not directory.is_dir():
        raise InputError(
            f"The run store {str(directory)!r} is not a directory. Set "
            "PARITY_CACHE_DIR to a directory, or to an empty value to turn the store "
            "off, or pass --no-cache (Python: cache=False)."
        )
    return directory


def fetch(cache_dir: Path, key: str, destination: Path) -> bool:
    """Copy the stored run ``key`` to ``destination``; return whether it was there."""
    entry = cache_dir / key
    if not entry.is_dir():
        return False
    staging = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}")
    try:
        shutil.copytree(entry, staging)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
        os.utime(entry)
    except OSError as error:
        log.warning("cannot copy the stored run %s from %s: %s", key, cache_dir, error)
        shutil.rmtree(staging, ignore_errors=True)
        return False
    return True


def store(cache_dir: Path, key: str, source: Path) -> None:
    """Store the finished run directory ``source`` under ``key``."""
    entry = cache_dir / key
    if entry.exists():
        return
    staging = cache_dir / f".{key}.{uuid.uuid4().hex}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, staging)
        staging.rename(entry)
    except OSError as error:
        log.warning(
            "cannot store run %s in %s: %s; set PARITY_CACHE_DIR to a writable "
            "directory, or to an empty value to turn the store off",
            source,
            cache_dir,
            error,
        )
        shutil.rmtree(staging, ignore_errors=True)
        return
    log.info("stored %s in %s for later runs", source.name, cache_dir)
    prune(cache_dir)


def prune(cache_dir: Path, keep: int = MAX_ENTRIES) -> None:
    """Delete the least recently used entries beyond ``keep``."""
    try:
        entries = [
            path
            for path in cache_dir.iterdir()
            if path.is_dir() and not path.name.startswith(".")
        ]
        entries.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    except OSError as error:
        log.warning("cannot list the run store %s: %s", cache_dir, error)
        return
    for path in entries[keep:]:
        shutil.rmtree(path, ignore_errors=True)
