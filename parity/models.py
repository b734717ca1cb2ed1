"""User models for ``parity run`` and ``parity.compare``: references, inspection, building.

A model is named by a ``.keras`` file or by a factory, ``module:function`` or
``path/to/file.py:function``, that returns a Keras model. The parent checks the
reference without importing a framework (`parse_model_reference`), then inspects
the model once in a subprocess (`inspect_model`) to learn its output shape and how
to train it. Every worker builds the model again for its own configuration
(`user_experiment`).

Initial weights: a ``.keras`` file's stored weights, rounded to float32, are the
shared initial weights of every configuration, so the float64 referee starts from
exactly the same values, upcast. A factory's model gets parity's seeded
initializer, as the built-in scenarios do.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import traceback
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.config import Configuration
from parity.errors import InputError, WorkerError
from parity.sources import loss_task, read_stored_data

MODEL_SUFFIX = ".keras"

# Seconds the inspection subprocess may take. Importing Keras with TensorFlow takes
# 10 to 30 s on a busy two-core machine; loading or building the model adds little.
INSPECT_TIMEOUT_SECONDS = 300.0

# Keras dtype names that a configuration's precision policy replaces.
FLOAT_DTYPES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "mixed_float16", "mixed_bfloat16"}
)

# Optimizer used for an uncompiled model when no --optimizer is given.
DEFAULT_OPTIMIZER = "adam"

# Characters kept of each message in a condensed error.
MESSAGE_LINE_CHARS = 300

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

# First lines that Keras puts around a layer's own error message.
_KERAS_FRAMING = (
    "Exception encountered when calling",
    "Exception encountered in",
    "Arguments received by",
    "Could not automatically infer the output shape",
    "Error encountered:",
)


@dataclasses.dataclass(frozen=True)
class ModelReference:
    """The source of a user model: a ``.keras`` file or a factory function."""

    kind: str  # "file" or "factory"
    text: str  # as the user wrote it
    path: str | None = None  # the .keras file, or the factory's .py file
    module: str | None = None
    function: str | None = None
    root: str | None = None  # directory that makes ``module`` importable
    sha256: str | None = None  # of the file, so a changed model changes the spec
    # (module, directory that makes it importable) of modules that register the
    # model's custom layers, imported before the model is loaded or built.
    imports: Sequence[tuple[str, str | None]] = ()

    def to_spec(self) -> dict[str, Any]:
        """Return the JSON form written into worker specs."""
        return dataclasses.asdict(self)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ModelReference:
        """Read the JSON form written by `to_spec`."""
        imports = tuple(tuple(item) for item in spec.get("imports", ()))
        return cls(**{**spec, "imports": imports})

    def with_imports(self, modules: Sequence[str]) -> ModelReference:
        """Return a copy that imports ``modules`` first; raise InputError if one is missing."""
        found = [(name, locate_module(name, f"--import {name}")[1]) for name in modules]
        return dataclasses.replace(self, imports=tuple(found))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_model_reference(text: str | os.PathLike[str]) -> ModelReference:
    """Check a model reference without importing a framework; raise InputError if bad."""
    text = os.fspath(text)
    path = Path(text)
    if text.endswith(MODEL_SUFFIX) or (path.exists() and ":" not in path.name):
        check_keras_archive(path)
        resolved = path.resolve()
        return ModelReference("file", text, str(resolved), sha256=_sha256(resolved))
    if ":" in text:
        return _parse_factory(text)
    raise InputError(
        f"Model {text!r} not found. Give a .keras file, or a factory as "
        "module:function or path/to/file.py:function that returns a Keras model."
    )


def check_keras_archive(path: Path) -> None:
    """Raise InputError unless ``path`` is a readable Keras 3 ``.keras`` archive."""
    shown = str(path)
    if not path.exists():
        raise InputError(f"Model file {shown!r} not found. Check the path.")
    if path.is_dir():
        raise InputError(
            f"Model path {shown!r} is a directory, not a .keras file. A TensorFlow "
            "SavedModel cannot be trained by other backends: load it in Keras and "
            "save it with model.save('model.keras')."
        )
    if not os.access(path, os.R_OK):
        raise InputError(
            f"Model file {shown!r} cannot be read: permission denied. Fix its "
            "permissions."
        )
    fix = "Save the model with Keras 3: model.save('model.keras')."
    if not zipfile.is_zipfile(path):
        kind = "an HDF5 file (legacy .h5 format)" if _is_hdf5(path) else "not a zip"
        raise InputError(
            f"Model file {shown!r} is not a Keras archive: it is {kind}. {fix}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as error:
        raise InputError(
            f"Model file {shown!r} cannot be read: {error}. {fix}"
        ) from None
    if "config.json" not in names:
        raise InputError(
            f"Model file {shown!r} is a zip but not a Keras archive: it has no "
            f"config.json. {fix}"
        )


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(8) == b"\x89HDF\r\n\x1a\n"


def _parse_factory(text: str) -> ModelReference:
    target, _, function = text.rpartition(":")
    if not target or not function.isidentifier():
        raise InputError(
            f"Invalid model factory {text!r}: write module:function or "
            "path/to/file.py:function, where function returns a Keras model."
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InputError(
                f"Factory file {target!r} of model {text!r} not found. Check the path."
            )
        resolved = path.resolve()
        return ModelReference(
            "factory", text, str(resolved), None, function, None, _sha256(resolved)
        )
    origin, root = locate_module(target, f"model factory {text!r}")
    digest = _sha256(Path(origin)) if os.path.isfile(origin) else None
    return ModelReference("factory", text, None, target, function, root, digest)


def locate_module(name: str, role: str) -> tuple[str, str | None]:
    """Find a module without running it; return its file and the directory to import it from.

    Finding ``a.b`` imports the package ``a``, but not ``a.b`` itself.
    """
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError) as error:
        raise InputError(
            f"Cannot find module {name!r} ({role}): {error}. Check the name and that "
            "its directory is the current one or on PYTHONPATH."
        ) from None
    if found is None or found.origin is None:
        raise InputError(
            f"Module {name!r} ({role}) not found. Check the name and that its "
            "directory is the current one or on PYTHONPATH."
        )
    if not os.path.isfile(found.origin):
        return found.origin, None  # a built-in or frozen module
    depth = len(name.split("."))
    if found.submodule_search_locations is None:
        depth -= 1
    return found.origin, str(Path(found.origin).resolve().parents[depth])


def _import_modules(reference: ModelReference) -> None:
    for name, root in reference.imports:
        if root and root not in sys.path:
            sys.path.insert(0, root)
        importlib.import_module(name)


def _import_factory(reference: ModelReference) -> Any:
    if reference.path is not None:
        spec = importlib.util.spec_from_file_location(
            "parity_user_model", reference.path
        )
        if spec is None or spec.loader is None:
            raise InputError(f"Factory file {reference.path!r} is not a Python module.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        if reference.root and reference.root not in sys.path:
            sys.path.insert(0, reference.root)
        module = importlib.import_module(str(reference.module))
    function = getattr(module, str(reference.function), None)
    if not callable(function):
        raise InputError(
            f"Model factory {reference.text!r}: the module has no function named "
            f"{reference.function!r}."
        )
    return function


def _set_precision(node: Any, policy: str, floatx: str) -> None:
    """Replace float dtype policies in a serialized Keras config, in place.

    A layer's ``dtype`` is a policy, which becomes the configuration's precision.
    An InputLayer's ``dtype`` is the dtype of the tensor it makes, so it follows
    ``floatx``, as ``keras.Input`` does when a model is built in code.
    """
    if isinstance(node, list):
        for item in node:
            _set_precision(item, policy, floatx)
        return
    if not isinstance(node, dict):
        return
    config = node.get("config")
    if isinstance(config, dict) and "dtype" in config:
        dtype = config["dtype"]
        if node.get("class_name") == "InputLayer":
            if dtype in FLOAT_DTYPES:
                config["dtype"] = floatx
        elif isinstance(dtype, str) and dtype in FLOAT_DTYPES:
            config["dtype"] = policy
        elif isinstance(dtype, dict) and dtype.get("class_name") in (
            "DTypePolicy",
            "FloatDTypePolicy",
        ):
            dtype.setdefault("config", {})["name"] = policy
    for value in node.values():
        _set_precision(value, policy, floatx)


def read_archive_config(path: str) -> dict[str, Any]:
    """Return the ``config.json`` document of a ``.keras`` archive."""
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def load_archive(keras: Any, path: str, policy: str | None) -> Any:
    """Load a ``.keras`` file in safe mode, with its layers set to ``policy``.

    Keras stores each layer's dtype policy in the file, so a model saved in float32
    would stay float32 under a float64 global policy. The config is rewritten
    first, and the stored weights are then cast into the new variables.
    """
    config = read_archive_config(path)
    config.pop("compile_config", None)
    if policy is not None:
        _set_precision(config, policy, keras.config.floatx())
    model = keras.saving.deserialize_keras_object(config, safe_mode=True)
    model.load_weights(path)
    return model


def build_model(
    keras: Any, reference: ModelReference, policy: str | None, sample: np.ndarray
) -> tuple[Any, list[np.ndarray] | None]:
    """Build the model for one process; return it with its stored weights, if any."""
    _import_modules(reference)
    if reference.kind == "file":
        model = load_archive(keras, str(reference.path), policy)
        stored = [np.asarray(value, np.float32) for value in model.get_weights()]
        return model, stored
    model = _import_factory(reference)()
    if isinstance(model, keras.Model) and not model.built:
        # A model without keras.Input learns its input shape from the first batch.
        model(sample)
    return model, None


def _loss_name(loss: Any) -> str:
    function = getattr(loss, "fn", loss)
    name = getattr(function, "__name__", None)
    return name if isinstance(name, str) else type(loss).__name__


def _camel_case(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def resolve_loss(
    keras: Any, identifier: Any, from_logits: bool | None, source: str
) -> tuple[Any, str, bool]:
    """Return the loss object, its function name and whether it takes logits."""
    if isinstance(identifier, (list, tuple)) or (
        isinstance(identifier, dict) and "class_name" not in identifier
    ):
        raise InputError(
            f"The model has one loss per output ({source}); parity trains models with "
            "one output and one loss."
        )
    try:
        loss = keras.losses.get(identifier)
    except (ValueError, TypeError) as error:
        raise InputError(
            f"Unknown loss {identifier!r} ({source}): {error}. Use a Keras loss name "
            "such as binary_crossentropy (--loss, Python: loss=)."
        ) from None
    stored = getattr(loss, "get_config", lambda: {})().get("from_logits")
    if from_logits and not stored:
        name = _loss_name(loss)
        try:
            loss = keras.losses.get(
                {"class_name": _camel_case(name), "config": {"from_logits": True}}
            )
        except (ValueError, TypeError):
            raise InputError(
                f"Loss {name!r} takes no from_logits option; drop --from-logits."
            ) from None
    logits = bool(from_logits) if from_logits is not None else bool(stored)
    return loss, _loss_name(loss), logits


def resolve_optimizer(
    keras: Any, identifier: Any, learning_rate: float | None, source: str
) -> dict[str, Any]:
    """Return the serialized optimizer, with the learning rate replaced if given."""
    try:
        optimizer = keras.optimizers.get(copy.deepcopy(identifier))
    except (ValueError, TypeError) as error:
        raise InputError(
            f"Unknown optimizer {identifier!r} ({source}): {error}. Use a Keras "
            "optimizer name such as adam or sgd (--optimizer, Python: optimizer=)."
        ) from None
    serialized = keras.optimizers.serialize(optimizer)
    stored = serialized["config"].get("learning_rate")
    if learning_rate is not None:
        serialized["config"]["learning_rate"] = float(learning_rate)
    elif isinstance(stored, float):
        # Keras keeps the rate in a float32 variable, so 0.01 comes back as
        # 0.009999999776. The shortest decimal with the same float32 value is what
        # the user wrote, and the float64 referee should train with it.
        serialized["config"]["learning_rate"] = float(str(np.float32(stored)))
    return serialized


def resolve_training(
    keras: Any,
    compile_config: dict[str, Any] | None,
    overrides: dict[str, Any],
    model_name: str,
) -> dict[str, Any]:
    """Decide the loss, optimizer and metrics: flags first, then the model's compile.

    Raise InputError when the model is not compiled and no loss is given, or when
    the compiled loss or optimizer cannot be rebuilt by name in another process.
    """
    compiled = compile_config or {}
    if overrides.get("loss") is not None:
        loss_id, loss_source = overrides["loss"], "--loss"
    elif compiled.get("loss") is not None:
        loss_id, loss_source = compiled["loss"], f"compiled into {model_name}"
    else:
        raise InputError(
            f"Model {model_name} is not compiled, so parity cannot tell how to train "
            "it: pass --loss NAME (Python: loss=), such as binary_crossentropy, and "
            "optionally --optimizer and --lr."
        )
    loss, loss_name, from_logits = resolve_loss(
        keras, loss_id, overrides.get("from_logits"), loss_source
    )
    if overrides.get("optimizer") is not None:
        optimizer_id, optimizer_source = overrides["optimizer"], "--optimizer"
    elif compiled.get("optimizer") is not None:
        optimizer_id = compiled["optimizer"]
        optimizer_source = f"compiled into {model_name}"
    else:
        optimizer_id, optimizer_source = DEFAULT_OPTIMIZER, "default"
    optimizer = resolve_optimizer(
        keras, optimizer_id, overrides.get("learning_rate"), optimizer_source
    )
    task = loss_task(loss_name)
    metrics = overrides.get("metrics")
    if metrics is None:
        stored = compiled.get("metrics")
        if isinstance(stored, list) and all(isinstance(m, str) for m in stored):
            metrics = stored
        else:
            metrics = ["accuracy"] if task in ("binary", "multiclass") else []
    learning_rate = optimizer["config"].get("learning_rate")
    return {
        "loss": keras.losses.serialize(loss),
        "loss_name": loss_name,
        "from_logits": from_logits,
        "optimizer": optimizer,
        "optimizer_name": optimizer["class_name"],
        "learning_rate": learning_rate if isinstance(learning_rate, float) else None,
        "metrics": list(metrics),
        "task": task,
    }


def all_layers(model: Any) -> list[Any]:
    """Return the model's layers and, depth first, the layers nested inside them."""
    found = []
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop(0)
        found.append(layer)
        stack[:0] = list(getattr(layer, "layers", []))
    return found


def random_layers(model: Any) -> list[str]:
    """Return the names of layers that draw random numbers while training (Dropout)."""
    return [
        layer.name
        for layer in all_layers(model)
        if getattr(layer, "seed_generator", None) is not None
    ]


def layer_summary(model: Any) -> list[dict[str, Any]]:
    """Return each layer's name, class, parameter count and activation, depth first."""
    layers = []
    for layer in all_layers(model):
        activation = getattr(layer, "activation", None)
        layers.append(
            {
                "name": layer.name,
                "class_name": type(layer).__name__,
                "num_params": int(layer.count_params()) if layer.built else 0,
                "activation": getattr(activation, "__name__", None),
            }
        )
    return layers


def describe_model(
    keras: Any,
    model: Any,
    feature_shape: Sequence[int],
    compile_config: dict[str, Any] | None,
    overrides: dict[str, Any],
    label: str,
) -> dict[str, Any]:
    """Check that ``model`` fits the data and return its shapes and training settings."""
    if not isinstance(model, keras.Model):
        raise InputError(
            f"Model {label} is a {type(model).__name__}, not a keras.Model. A factory "
            "must return a Keras model."
        )
    for attribute in ("inputs", "outputs"):
        tensors = getattr(model, attribute, None) if model.built else None
        if isinstance(tensors, (list, tuple)) and len(tensors) > 1:
            raise InputError(
                f"Model {label} has {len(tensors)} {attribute}; parity trains models "
                "with one input and one output."
            )
    sample = np.zeros((2, *feature_shape), np.float32)
    try:
        output = model(sample)
    except Exception as error:  # any framework error means the shapes do not fit
        expected = getattr(model, "input_shape", None) if model.built else None
        raise InputError(
            f"Model {label} cannot take inputs of shape {tuple(feature_shape)} per "
            f"sample (it expects {expected}): {condense_error(error)}. Make the model's "
            "keras.Input match the data's features, or check --x / --target."
        ) from None
    if isinstance(output, (list, tuple, dict)):
        raise InputError(
            f"Model {label} returns several outputs; parity trains models with one."
        )
    if compile_config is None and getattr(model, "compiled", False):
        compile_config = model.get_compile_config()
    training = resolve_training(keras, compile_config, overrides, label)
    return {
        "name": model.name,
        "class_name": type(model).__name__,
        "feature_shape": list(feature_shape),
        "output_shape": [None, *(int(d) for d in output.shape[1:])],
        "num_params": int(model.count_params()),
        "num_weights": len(model.weights),
        "compiled": compile_config is not None,
        "random_layers": random_layers(model),
        "layers": layer_summary(model),
        "training": training,
    }


def inspect_in_process(
    keras: Any,
    reference: ModelReference,
    feature_shape: Sequence[int],
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """Load or build the model with the imported ``keras`` and describe it."""
    sample = np.zeros((2, *feature_shape), np.float32)
    if reference.kind == "file":
        try:
            model, _ = build_model(keras, reference, None, sample)
        except Exception as error:  # Keras raises many types for a bad archive
            raise InputError(
                f"Model file {reference.text!r} cannot be loaded in safe mode: "
                f"{condense_error(error)}. For a custom layer class, name the module "
                "that registers it with --import MODULE (Python: imports=[...]). A "
                "Lambda layer's code never runs in safe mode: rewrite it as a layer "
                "class, or pass a factory (module:function) that builds the model."
            ) from None
        compile_config = read_archive_config(str(reference.path)).get("compile_config")
    else:
        try:
            model, _ = build_model(keras, reference, None, sample)
        except InputError:
            raise
        except Exception as error:  # user code may raise anything
            raise InputError(
                f"Model factory {reference.text!r} raised {condense_error(error)}. "
                "Fix the factory so that it returns a Keras model."
            ) from None
        compile_config = None
    return describe_model(
        keras, model, feature_shape, compile_config, overrides, repr(reference.text)
    )


def inspect_model(
    reference: ModelReference,
    feature_shape: Sequence[int],
    overrides: dict[str, Any],
    backend: str,
    work_dir: Path,
) -> dict[str, Any]:
    """Describe a model in a subprocess with ``backend``; raise InputError if unfit.

    The subprocess keeps the parent free of any framework and of the user's code.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / "inspect-spec.json"
    out_path = work_dir / "inspect.json"
    out_path.unlink(missing_ok=True)
    spec = {
        "model": reference.to_spec(),
        "feature_shape": list(feature_shape),
        "overrides": overrides,
        "backend": backend,
    }
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    command = [sys.executable, "-m", "parity.models", str(spec_path), str(out_path)]
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            timeout=INSPECT_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise WorkerError(
            f"Inspecting model {reference.text!r} with {backend} timed out after "
            f"{INSPECT_TIMEOUT_SECONDS:.0f} s."
        ) from None
    try:
        answer = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tail = completed.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise WorkerError(
            f"Inspecting model {reference.text!r} with {backend} failed with exit "
            f"status {completed.returncode}: {' '.join(tail) or 'no output'}"
        ) from None
    if answer.get("status") != "ok":
        raise InputError(str(answer.get("message")))
    return answer["description"]


def _inspect_main(spec_path: str, out_path: str) -> int:
    from parity.io import atomic_write_json
    from parity.worker import configure_backend, set_environment

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    config = Configuration(spec["backend"], "cpu")
    set_environment(config)
    keras = configure_backend(config)
    reference = ModelReference.from_spec(spec["model"])
    try:
        description = inspect_in_process(
            keras, reference, spec["feature_shape"], spec["overrides"]
        )
    except InputError as error:
        atomic_write_json(out_path, {"status": "error", "message": str(error)})
        return 0
    atomic_write_json(out_path, {"status": "ok", "description": description})
    return 0


# Worker side: each configuration builds and trains the model in its own process.


def user_experiment(spec: dict[str, Any], config: Configuration) -> Any:
    """Return the worker's `Experiment` for a user model and the run's stored data."""
    from parity.worker import Experiment

    data = read_stored_data(spec["data"]["path"])
    training = spec["training"]
    reference = ModelReference.from_spec(spec["model"])
    policy = config.precision

    def build(keras: Any, sample: np.ndarray) -> tuple[Any, list[np.ndarray] | None]:
        keras.config.disable_traceback_filtering()
        return build_model(keras, reference, policy, sample)

    def compile_model(keras: Any, model: Any) -> None:
        model.compile(
            optimizer=keras.optimizers.get(copy.deepcopy(training["optimizer"])),
            loss=keras.losses.get(copy.deepcopy(training["loss"])),
            metrics=list(training["metrics"]),
            run_eagerly=config.mode == "eager",
            jit_compile=config.mode in ("xla", "jit", "compile"),
        )

    return Experiment(
        name=spec["name"],
        x=data["x"],
        y=data["y"],
        x_eval=data["x_eval"],
        y_eval=data["y_eval"],
        task=training["task"],
        from_logits=bool(training["from_logits"]),
        build=build,
        compile=compile_model,
    )


def condense_error(error: BaseException) -> str:
    """Return an exception as one line: its type and its most telling message line.

    Keras wraps a layer's error in framing lines ("Exception encountered when
    calling ..."), and some of its wrappers fail while formatting, leaving the real
    error as the context. The first exception in the chain whose message is not
    framing is shown. When the chain goes deeper, its last exception is appended
    as the cause, because Keras' deserialization errors hide the missing class there.
    """
    chain = []
    current: BaseException | None = error
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    shown = [
        candidate
        for candidate in chain
        if _message_line(candidate)
        and not (_raised_by_keras_wrapper(candidate) and candidate is not chain[-1])
    ]
    if not shown:
        return type(error).__name__
    text = _one_line(shown[0])
    if shown[-1] is not shown[0]:
        text += f" (cause: {_one_line(shown[-1])})"
    return text


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {_message_line(error)}"[:MESSAGE_LINE_CHARS]


def _raised_by_keras_wrapper(error: BaseException) -> bool:
    """Return whether ``error`` came from code re-raising or wrapping another error.

    Two cases: Keras' traceback utilities, which re-raise with framing lines, and an
    exception class whose own constructor or formatting failed (Keras 3.15 builds
    JAX's TracerArrayConversionError with a string, which raises AttributeError).
    """
    frames = list(traceback.walk_tb(error.__traceback__))
    if not frames:
        return False
    last_frame = frames[-1][0]
    if "traceback_utils" in last_frame.f_code.co_filename:
        return True
    owner = last_frame.f_locals.get("self")
    return error.__context__ is not None and isinstance(owner, BaseException)


def _message_line(error: BaseException) -> str:
    for line in _ANSI_ESCAPE.sub("", str(error)).splitlines():
        line = line.strip().lstrip("•").strip()
        if line and not line.startswith(_KERAS_FRAMING):
            return line
    return ""


def failing_layer(error: BaseException) -> Any | None:
    """Return the innermost Keras layer (not a model) on the error's traceback."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    found = None
    current: BaseException | None = error
    while current is not None and found is None:
        for frame, _ in traceback.walk_tb(current.__traceback__):
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.layers.Layer) and not isinstance(
                owner, keras.Model
            ):
                found = owner
        current = current.__cause__ or current.__context__
    return found


def layer_by_calling(model: Any, sample: np.ndarray) -> Any | None:
    """Return the first layer whose sub-model, from the input to it, raises on ``sample``.

    Works for Sequential and functional models; a subclassed model has no symbolic
    inputs, so None is returned for it.
    """
    keras = sys.modules.get("keras")
    inputs = getattr(model, "inputs", None) if model is not None else None
    if keras is None or not inputs:
        return None
    for layer in model.layers:
        try:
            keras.Model(inputs, layer.output)(sample)
        except Exception:  # any error marks this layer as the first that fails
            return layer
    return None


def describe_failure(
    error: BaseException, model: Any = None, sample: np.ndarray | None = None
) -> str:
    """Return a one-line failure message that names the layer where it happened."""
    message = condense_error(error)
    layer = failing_layer(error)
    if layer is None and sample is not None:
        try:
            layer = layer_by_calling(model, sample)
        except Exception:  # localization must never hide the original error
            layer = None
    if layer is None:
        return message
    return f"in layer {layer.name!r} ({type(layer).__name__}): {message}"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m parity.models SPEC.json OUT.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(_inspect_main(sys.argv[1], sys.argv[2]))
