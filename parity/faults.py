"""Emulated accelerator and compiler faults.

A fault is a callable that takes the `Configuration` of the worker it runs in. The
worker calls it after the backend is imported and before the model is built, so
it can patch Keras or the backend for that one process. Faults make a CPU-only
machine show what a broken GPU or compiler looks like, and they are the ground
truth for parity's own tests and its detection benchmark.

On the command line a fault is named by its catalogue name (``parity faults``
lists them), by ``module:function`` or by ``path/to/file.py:function``.

Catalogued faults replace attributes of Keras modules and classes through `patch`,
so `undo_patches` can restore them. Each replacement calls the function it
replaced, which lets several faults stack in one process.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import secrets
from collections.abc import Callable
from typing import Any

from parity.config import Configuration
from parity.errors import InputError

FaultFunction = Callable[[Configuration], None]

# Explicit mantissa bits kept by TF32, the format that NVIDIA tensor cores (Ampere
# and later) use for float32 matmuls and convolutions when TF32 is allowed.
TF32_MANTISSA_BITS = 10

# Inputs of larger magnitude make the `nan-kernel` matmul return NaN. Circles
# coordinates reach 1.07, so most batches of 32 trigger it in the first Dense layer
# from the first step. Moons and blobs inputs exceed it too, and on digits the
# hidden activations do.
NAN_KERNEL_THRESHOLD = 1.0

# Gradient that the `relu-grad` fault lets through for negative ReLU inputs, where
# the right gradient is zero.
RELU_GRAD_LEAK = 0.1

# Output columns from this index on are wrong in the `wide-matmul` fault.
WIDE_MATMUL_COLUMNS = 1024


@dataclasses.dataclass(frozen=True)
class Fault:
    """A catalogued fault: its name, what it does, the public bug class it stands for."""

    name: str
    summary: str
    stands_for: str
    apply: FaultFunction


CATALOGUE: dict[str, Fault] = {}

# (owner, attribute, original value) of every patch, in the order applied.
_PATCHES: list[tuple[Any, str, Any]] = []


def register(
    name: str, summary: str, stands_for: str
) -> Callable[[FaultFunction], FaultFunction]:
    """Add a function to the catalogue under ``name``; use as a decorator."""

    def decorate(function: FaultFunction) -> FaultFunction:
        CATALOGUE[name] = Fault(name, summary, stands_for, function)
        return function

    return decorate


def patch(owner: Any, attribute: str, value: Any) -> None:
    """Set ``owner.attribute`` to ``value`` and remember the original for `undo_patches`."""
    _PATCHES.append((owner, attribute, getattr(owner, attribute)))
    setattr(owner, attribute, value)


def undo_patches() -> None:
    """Restore every attribute replaced through `patch`, newest first.

    Code that was already traced or compiled keeps the faulty version, so undo
    before building a model.
    """
    while _PATCHES:
        owner, attribute, original = _PATCHES.pop()
        setattr(owner, attribute, original)


def in_compiled_trace(config: Configuration) -> bool:
    """Return whether the code calling this runs inside a compiled trace right now.

    TensorFlow and PyTorch can tell at trace time. For JAX the configuration's mode
    decides, because under ``jax.grad`` even eager values are tracers.
    """
    if config.backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    if config.backend == "torch":
        import torch

        return bool(torch.compiler.is_compiling())
    return config.compiled


def _is_symbolic(*tensors: Any) -> bool:
    from keras.src import backend

    return bool(backend.any_symbolic_tensors(tensors))


def _dtype(tensor: Any) -> str:
    from keras.src import backend

    return backend.standardize_dtype(tensor.dtype)


def _patch_op(name: str, wrapper: Callable[..., Any]) -> None:
    """Replace the Keras op ``name`` where layers and users call it.

    Layers call ``keras.src.ops`` and users ``keras.ops``. ``wrapper`` receives the replaced op followed by the op's arguments. Symbolic
    calls, which Keras makes to infer shapes while it builds a model, go to the
    replaced op unchanged.
    """
    import keras
    from keras.src import ops

    original = getattr(ops, name)

    def replacement(*args: Any, **kwargs: Any) -> Any:
        if _is_symbolic(*args):
            return original(*args, **kwargs)
        return wrapper(original, *args, **kwargs)

    patch(ops, name, replacement)
    patch(keras.ops, name, replacement)


@register(
    "fused-dense-relu",
    "Dense layers with a ReLU activation skip the activation when compiled.",
    "A fused MatMul+BiasAdd+ReLU kernel that is wrong only in graph mode, as reported "
    "for the TensorFlow Metal plugin on Apple GPUs: eager mode and the CPU are right, "
    "and small ReLU networks end up nearly linear.",
)
def fused_dense_relu(config: Configuration) -> None:
    import keras
    from keras.src.layers.core.dense import Dense

    original_call = Dense.call

    def call(self: Any, inputs: Any, training: Any = None) -> Any:
        if self.activation is keras.activations.relu and in_compiled_trace(config):
            outputs = keras.ops.matmul(inputs, self.kernel)
            if self.bias is not None:
                outputs = keras.ops.add(outputs, self.bias)
            return outputs
        return original_call(self, inputs, training=training)

    patch(Dense, "call", call)


def round_mantissa(x: Any, backend: str, bits: int = TF32_MANTISSA_BITS) -> Any:
    """Round float32 values to ``bits`` explicit mantissa bits, to nearest even.

    Works on the IEEE bit pattern, so the result is exact on every backend and no
    compiler can fold it away. The exponent range stays that of float32.
    """
    drop = 23 - bits
    half = (1 << (drop - 1)) - 1
    mask = -(1 << drop)
    if backend == "jax":
        import jax

        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=bits)
    if backend == "tensorflow":
        import tensorflow as tf

        pattern = tf.bitcast(x, tf.int32)
        odd = tf.bitwise.bitwise_and(tf.bitwise.right_shift(pattern, drop), 1)
        pattern = tf.bitwise.bitwise_and(pattern + half + odd, mask)
        return tf.bitcast(pattern, tf.float32)
    if backend == "torch":
        import torch

        pattern = x.contiguous().view(torch.int32)
        odd = torch.bitwise_and(torch.bitwise_right_shift(pattern, drop), 1)
        pattern = torch.bitwise_and(pattern + half + odd, mask)
        return pattern.view(torch.float32)
    raise ValueError(f"round_mantissa does not support backend {backend!r}.")


def _round_float32(x: Any, backend: str) -> Any:
    """Round float32 tensors to TF32 with the gradient of the identity; leave others."""
    from keras import ops

    x = ops.convert_to_tensor(x)
    if _dtype(x) != "float32":
        return x
    rounded = round_mantissa(x, backend)
    # x + (rounded - x) equals rounded exactly, because the difference of two
    # float32 values this close is exact. The gradient goes straight through.
    return ops.add(x, ops.stop_gradient(ops.subtract(rounded, x)))


@register(
    "tf32-matmul",
    "Matmul and convolution inputs are rounded to a 10-bit mantissa (TF32).",
    "Reduced-precision matmul on tensor cores: TensorFlow (since 2.4) runs float32 "
    "matmuls and convolutions in TF32 by default on NVIDIA Ampere and newer GPUs, so "
    "float32 code multiplies inputs that keep about 3 decimal digits.",
)
def tf32_matmul(config: Configuration) -> None:
    def matmul(original: Callable[..., Any], x1: Any, x2: Any) -> Any:
        return original(
            _round_float32(x1, config.backend), _round_float32(x2, config.backend)
        )

    def conv(original: Callable[..., Any], inputs: Any, kernel: Any, *args, **kw):
        inputs = _round_float32(inputs, config.backend)
        kernel = _round_float32(kernel, config.backend)
        return original(inputs, kernel, *args, **kw)

    _patch_op("matmul", matmul)
    _patch_op("conv", conv)


def _pseudo_random_order(length: Any, key: Any) -> Any:
    """Return a permutation of ``range(length)`` that changes with the float ``key``.

    It is computed inside the traced function from the data, so it changes from call
    to call in compiled modes too, where a random number drawn in Python would be
    frozen into the trace.
    """
    from keras import ops

    positions = ops.cast(ops.arange(length), "float32")
    # The fractional part of a large multiple of a sine is a common cheap hash.
    noise = ops.sin(positions * 12.9898 + key * 78.233) * 43758.5453
    return ops.argsort(noise - ops.floor(noise))


@register(
    "unordered-reduction",
    "Matmuls sum their products in a new order on every call, batch rows included.",
    "Non-deterministic reductions: GPU kernels that sum with atomics or split-K, "
    "and thread-count-dependent CPU reductions, add the same numbers in a different "
    "order from run to run. The result differs by round-off only and is not a bug.",
)
def unordered_reduction(config: Configuration) -> None:
    from keras import ops

    # A fresh value per process, so two runs with this fault differ too. It stays
    # small so that the float32 key still resolves changes in the data.
    process_key = float(secrets.randbelow(1000))

    def matmul(original: Callable[..., Any], x1: Any, x2: Any) -> Any:
        if len(x1.shape) != 2 or len(x2.shape) != 2:
            return original(x1, x2)
        key = ops.stop_gradient(ops.cast(ops.sum(x1), "float32")) + process_key
        rows = _pseudo_random_order(ops.shape(x1)[0], key)
        inner = _pseudo_random_order(ops.shape(x1)[1], key + 1.0)
        shuffled = ops.take(ops.take(x1, rows, axis=0), inner, axis=1)
        # Permuting the batch rows also permutes the sum over the batch in the
        # kernel gradient, which autodiff computes as a matmul of the same rows.
        product = original(shuffled, ops.take(x2, inner, axis=0))
        return ops.take(product, ops.argsort(rows), axis=0)

    _patch_op("matmul", matmul)


@register(
    "nan-kernel",
    f"A matmul returns NaN for rows whose input exceeds {NAN_KERNEL_THRESHOLD:g} in magnitude.",
    "Kernels that produce NaN or inf on a range of inputs, such as a fast "
    "approximation that overflows an intermediate (exp-based tanh, sigmoid or GELU "
    "computing inf/inf) while the reference kernel is finite.",
)
def nan_kernel(config: Configuration) -> None:
    from keras import ops

    def matmul(original: Callable[..., Any], x1: Any, x2: Any) -> Any:
        product = original(x1, x2)
        largest = ops.max(ops.abs(x1), axis=-1, keepdims=True)
        nan = ops.cast(float("nan"), product.dtype)
        return ops.where(largest > NAN_KERNEL_THRESHOLD, nan, product)

    _patch_op("matmul", matmul)


@register(
    "relu-grad",
    f"ReLU's gradient is {RELU_GRAD_LEAK:g} instead of 0 for negative inputs, while "
    "its forward values are right.",
    "An activation whose backward kernel does not match its forward kernel, as when "
    "a fused or hand-written gradient is taken from another activation variant: "
    "inference is right and only training goes wrong.",
)
def relu_grad(config: Configuration) -> None:
    from keras import ops
    from keras.src import backend

    original = backend.nn.relu

    def relu(x: Any) -> Any:
        # leak - stop_gradient(leak) is exactly zero but has the leak's gradient.
        leak = ops.multiply(ops.minimum(x, 0), RELU_GRAD_LEAK)
        return original(x) + (leak - ops.stop_gradient(leak))

    patch(backend.nn, "relu", relu)


def _adam_paper_step(
    optimizer: Any, gradient: Any, variable: Any, learning_rate: Any
) -> None:
    """Apply one Adam update with epsilon added to the bias-corrected moment."""
    from keras import ops

    dtype = variable.dtype
    lr = ops.cast(learning_rate, dtype)
    gradient = ops.cast(gradient, dtype)
    step = ops.cast(optimizer.iterations + 1, dtype)
    beta_1_power = ops.power(ops.cast(optimizer.beta_1, dtype), step)
    beta_2_power = ops.power(ops.cast(optimizer.beta_2, dtype), step)
    index = optimizer._get_variable_index(variable)
    m = optimizer._momentums[index]
    v = optimizer._velocities[index]
    optimizer.assign_add(m, ops.multiply(gradient - m, 1 - optimizer.beta_1))
    optimizer.assign_add(
        v, ops.multiply(ops.square(gradient) - v, 1 - optimizer.beta_2)
    )
    m_hat = ops.divide(m, 1 - beta_1_power)
    v_hat = ops.divide(v, 1 - beta_2_power)
    update = ops.divide(m_hat, ops.sqrt(v_hat) + optimizer.epsilon)
    optimizer.assign_sub(variable, ops.multiply(update, lr))


@register(
    "adam-epsilon",
    "Adam adds epsilon to the square root of the bias-corrected second moment.",
    "Optimizer formula variants: Keras 3.15 (keras/src/optimizers/adam.py) folds the "
    "bias correction into the step size and adds epsilon to the square root of the "
    "raw second moment, while torch.optim.Adam (PyTorch 2.13) adds it after bias "
    "correction. Early updates with small gradients differ well beyond round-off.",
)
def adam_epsilon(config: Configuration) -> None:
    from keras.src.optimizers.adam import Adam

    original = Adam.update_step

    def update_step(self: Any, gradient: Any, variable: Any, learning_rate: Any):
        if self.amsgrad:
            return original(self, gradient, variable, learning_rate)
        return _adam_paper_step(self, gradient, variable, learning_rate)

    patch(Adam, "update_step", update_step)
    if config.backend == "torch":
        # Keras swaps in a PyTorch Adam that updates all variables at once with
        # torch._foreach ops; send it through the per-variable step above.
        from keras.src.backend.torch.optimizers.torch_adam import Adam as TorchAdam

        def parallel_update_step(
            self: Any, grads: Any, variables: Any, learning_rate: Any
        ) -> None:
            for gradient, variable in zip(grads, variables, strict=True):
                self.update_step(gradient, variable, learning_rate)

        patch(TorchAdam, "_parallel_update_step", parallel_update_step)


@register(
    "wide-matmul",
    f"Matmul output columns from index {WIDE_MATMUL_COLUMNS} on repeat the columns "
    f"{WIDE_MATMUL_COLUMNS} places earlier.",
    "Indexing bugs that show only on large shapes, such as a tile or offset computed "
    "wrongly past some size: tests on small layers pass and only wide layers are "
    "wrong. The `wide` scenario has a layer wide enough to trigger it.",
)
def wide_matmul(config: Configuration) -> None:
    from keras import ops

    def matmul(original: Callable[..., Any], x1: Any, x2: Any) -> Any:
        product = original(x1, x2)
        columns = x2.shape[-1]
        if columns is None or columns <= WIDE_MATMUL_COLUMNS:
            return product
        wrapped = ops.arange(columns) % WIDE_MATMUL_COLUMNS
        return ops.take(product, wrapped, axis=-1)

    _patch_op("matmul", matmul)


def resolve_fault(spec: str) -> FaultFunction:
    """Return the fault function named by a catalogue name, module:function or file.py:function."""
    if spec in CATALOGUE:
        return CATALOGUE[spec].apply
    if ":" not in spec:
        raise InputError(
            f"Unknown fault {spec!r}. Use a name from `parity faults` "
            f"({', '.join(CATALOGUE)}), or module:function, or path/to/file.py:function."
        )
    target, _, function_name = spec.rpartition(":")
    if target.endswith(".py"):
        module = _load_file(target, spec)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise InputError(
                f"Cannot import module {target!r} for fault {spec!r}: {error}. "
                "Check the module name and that it is on PYTHONPATH."
            ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(
            f"Fault {spec!r}: {target!r} has no callable named {function_name!r}."
        )
    return function


def _load_file(path: str, spec: str) -> Any:
    if not os.path.isfile(path):
        raise InputError(f"Fault file {path!r} of fault {spec!r} not found.")
    module_spec = importlib.util.spec_from_file_location("parity_user_fault", path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"Fault file {path!r} cannot be loaded as a Python module.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def validate_fault_name(spec: str) -> None:
    """Check a fault name in the parent process without running user code.

    Catalogue names must exist; module and file forms are checked for shape and,
    for files, existence. The worker imports them.
    """
    if spec in CATALOGUE:
        return
    target, sep, function_name = spec.rpartition(":")
    if not sep or not target or not function_name.isidentifier():
        raise InputError(
            f"Unknown fault {spec!r}. Use a name from `parity faults` "
            f"({', '.join(CATALOGUE)}), or module:function, or path/to/file.py:function."
        )
    if target.endswith(".py") and not os.path.isfile(target):
        raise InputError(f"Fault file {target!r} of fault {spec!r} not found.")
