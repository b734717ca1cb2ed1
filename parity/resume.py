"""Resume keys: a hash of everything that can change a worker's result.

`--resume` serves a run from an earlier result only when the stored key equals
the key of the run about to start. The key covers the worker spec: scenario,
data digest, configuration, role, faults, epochs, batch size, seed, activation,
learning rate, envelope perturbation and worker thread count. It also covers
parity's version and the source of the modules a worker imports, the versions of
the numerical packages, the environment variables that change numerics, the
machine (CPU model and platform), and the content of user fault files. Options that cannot change a result (the timeout, the memory limit, the
output directory) are left out, so changing them does not force a rerun.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import platform
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity import __version__
from parity.env import NUMERIC_FLAGS, PACKAGES, PLUGINS, cpu_model, package_version
from parity.faults import CATALOGUE

log = logging.getLogger("parity")

# The file in each run directory that stores the key and the inputs it was made from.
KEY_FILE = "key.json"

# Spec fields that name where files go rather than what is computed.
SPEC_FIELDS_NOT_IN_KEY = frozenset({"out_dir", "resume_key"})


def key_inputs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Collect what a run's result depends on, as a JSON-serializable dict."""
    fields = {
        name: value
        for name, value in spec.items()
        if name not in SPEC_FIELDS_NOT_IN_KEY
    }
    return {
        "spec": fields,
        "parity": {"version": __version__, "source": parity_source_digest()},
        "packages": {name: package_version(name) for name in PACKAGES + PLUGINS},
        "environment": {name: os.environ.get(name) for name in NUMERIC_FLAGS},
        "machine": machine_identity(),
        "faults": {name: fault_digest(name) for name in spec.get("faults", [])},
    }


@functools.cache
def machine_identity() -> dict[str, str]:
    """Return the CPU model and platform, which results stored per machine depend on."""
    return {"cpu": cpu_model(), "platform": platform.platform()}


def key_of(inputs: Mapping[str, Any]) -> str:
    """Return the SHA-256 hex digest of the canonical JSON form of ``inputs``."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.cache
def parity_source_digest() -> str:
    """Return a digest of the parity modules that a worker imports.

    The version number alone would let an edited development checkout serve
    results computed by older code. Modules that only the parent uses (the
    report, the CLI) are left out, so editing them keeps results reusable.
    """
    hasher = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(worker_source_files(package)):
        hasher.update(str(path.relative_to(package)).encode("utf-8"))
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


def worker_source_files(package: Path) -> set[Path]:
    """Return parity's source files that ``parity.worker`` imports, directly or not.

    Imports are read with `ast`, without importing anything: every import in the
    worker module, and the module-level imports of the modules it reaches. Imports
    inside functions of those modules are not followed, because parity uses them
    for code that only the parent process runs.
    """
    found: set[Path] = set()
    waiting = [package / "__init__.py", package / "worker.py"]
    while waiting:
        path = waiting.pop()
        if path in found or not path.is_file():
            continue
        found.add(path)
        tree = ast.parse(path.read_bytes(), filename=str(path))
        nodes = ast.walk(tree) if path.name == "worker.py" else tree.body
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "parity" and len(parts) > 1:
                    base = package.joinpath(*parts[1:])
                    waiting += [base.with_suffix(".py"), base / "__init__.py"]
    return found


def fault_digest(name: str) -> str:
    """Return a digest of the code behind a fault name.

    Catalogue faults are part of parity's source. For ``file.py:function`` and
    ``module:function`` the file is hashed without importing it. When the file
    cannot be found, the digest is unique to this call, so a result that used the
    fault is never reused.
    """
    if name in CATALOGUE:
        return "catalogue"
    target = name.rpartition(":")[0]
    path = Path(target) if target.endswith(".py") else _module_file(target)
    if path is None:
        log.info(
            "cannot find the file of fault %s, so its result is never reused", name
        )
        return f"unreadable-{uuid.uuid4().hex}"
    try:
        # NOTE: only the file that defines the fault is hashed. A change in a
        # module that it imports is not seen, so a stale result can be reused.
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        log.info("cannot read fault file %s of fault %s: %s", path, name, error)
    return f"unreadable-{uuid.uuid4().hex}"


def _module_file(module: str) -> Path | None:
    """Find the source file of a module on sys.path without importing anything."""
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    for entry in ["", *sys.path]:
        base = Path(entry or os.getcwd()).joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def write_key_file(directory: Path, key: str, inputs: Mapping[str, Any]) -> None:
    """Store a run's key and its inputs in the run directory."""
    from parity.io import atomic_write_json

    atomic_write_json(directory / KEY_FILE, {"key": key, "inputs": inputs})


def changed_inputs(directory: Path, inputs: Mapping[str, Any]) -> list[str]:
    """Return the dotted names of inputs that differ from those stored in ``directory``.

    Returns an empty list when no readable key file is there.
    """
    try:
        stored = json.loads((directory / KEY_FILE).read_text(encoding="utf-8"))
        old = stored["inputs"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return []
    new = json.loads(json.dumps(inputs, default=str))
    old_flat, new_flat = _flatten(old), _flatten(new)
    names = set(old_flat) | set(new_flat)
    return sorted(name for name in names if old_flat.get(name) != new_flat.get(name))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for name, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{name}" if prefix else str(name)))
    return flat
