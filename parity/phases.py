"""One layer's forward output and gradients, a loss, or one optimizer update, per mode.

Localization runs each phase of a training step on its own, from inputs that it
chooses (the referee's), so that the error a phase introduces can be separated
from the error it inherits. Every phase is a pure function of numpy arrays. The
layer is called with its variables mapped to given values in a
``keras.StatelessScope``, and the optimizer through ``stateless_apply``. So the
same function can be compiled with ``tf.function``, ``jax.jit`` or
``torch.compile`` the way the configuration's trainer compiles its step.

This module imports only numpy, Keras and the backend, because its source is
copied into the standalone reproducer scripts that localization writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Phase excess above which a reproducer reports that the disagreement reproduces.
# It is the divergence threshold of parity.tensors.compare_tensors, restated here
# because a reproducer script cannot import parity.
REPRODUCER_DIVERGENT_EXCESS = 50.0


class PhaseRunner:
    """Run layer, loss and optimizer phases in one backend and execution mode.

    ``mode`` is a Keras execution mode as parity names it: ``eager``, ``graph`` or
    ``xla`` for TensorFlow, ``eager`` or ``jit`` for JAX, ``eager`` or ``compile``
    for PyTorch. Compiled functions are cached per layer and phase, so a phase run
    twice on inputs of one shape is traced once.
    """

    def __init__(self, keras: Any, backend: str, mode: str):
        self.keras = keras
        self.backend = backend
        self.mode = mode
        self._cache: dict[tuple[int, str], Callable[..., Any]] = {}

    def compile(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap ``function`` the way the mode compiles a training step."""
        if self.mode == "eager":
            return function
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.function(function, jit_compile=self.mode == "xla")
        if self.backend == "jax":
            import jax

            return jax.jit(function)
        if self.backend == "torch":
            import torch

            return torch.compile(function)
        raise ValueError(f"unknown backend {self.backend!r}")

    def _cached(
        self, owner: Any, phase: str, make: Callable[[], Callable[..., Any]]
    ) -> Callable[..., Any]:
        key = (id(owner), phase)
        if key not in self._cache:
            self._cache[key] = self.compile(make())
        return self._cache[key]

    def tensor(self, value: np.ndarray, dtype: str) -> Any:
        """Convert a numpy array to a backend tensor of ``dtype`` on the current device."""
        return self.keras.ops.convert_to_tensor(np.asarray(value), dtype=dtype)

    def _like(
        self, values: Sequence[np.ndarray], variables: Sequence[Any]
    ) -> list[Any]:
        """Convert values to tensors of the variables' dtypes and shapes.

        safetensors files store scalars with shape (1,), so each value is reshaped.
        """
        return [
            self.tensor(
                np.asarray(value).reshape(tuple(variable.shape)), variable.dtype
            )
            for value, variable in zip(values, variables, strict=True)
        ]

    def forward(self, layer: Any, x: np.ndarray) -> np.ndarray:
        """Return the layer's output for input ``x``, in training mode."""
        params, state = layer_values(layer)

        def make() -> Callable[..., Any]:
            def forward(params: list[Any], state: list[Any], x: Any) -> Any:
                return call_layer(layer, params, state, x)

            return forward

        function = self._cached(layer, "forward", make)
        x_tensor = self.tensor(x, input_dtype(layer, x))
        return to_numpy(function(params, state, x_tensor))

    def vjp(
        self, layer: Any, x: np.ndarray, upstream: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Return the gradients of ``sum(layer(x) * upstream)`` w.r.t. weights and input.

        The input gradient is None when the input is not floating point.
        """
        params, state = layer_values(layer)
        x_tensor = self.tensor(x, input_dtype(layer, x))
        g_tensor = self.tensor(upstream, layer.compute_dtype)
        differentiable_input = np.issubdtype(np.asarray(x).dtype, np.floating)
        function = self._cached(
            layer,
            f"vjp/{differentiable_input}",
            lambda: _make_vjp(self.backend, layer, differentiable_input),
        )
        weight_grads, input_grad = function(params, state, x_tensor, g_tensor)
        weights = [to_numpy(grad) for grad in weight_grads]
        return weights, None if input_grad is None else to_numpy(input_grad)

    def loss(
        self, loss_function: Any, y_true: np.ndarray, y_pred: np.ndarray, dtype: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the mean loss over the batch and its gradient w.r.t. the predictions."""
        function = self._cached(
            loss_function,
            "loss",
            lambda: _make_loss_gradient(self.backend, self.keras, loss_function),
        )
        y_true_tensor = self.tensor(y_true, str(np.asarray(y_true).dtype))
        value, gradient = function(y_true_tensor, self.tensor(y_pred, dtype))
        return to_numpy(value), to_numpy(gradient)

    def update(
        self,
        optimizer: Any,
        params: Sequence[np.ndarray],
        optimizer_values: Sequence[np.ndarray],
        grads: Sequence[np.ndarray],
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Apply one optimizer step to ``params``; return new params and optimizer values.

        Keras' TensorFlow optimizer has no ``stateless_apply``, so on TensorFlow the
        step assigns the values to the variables and applies the gradients to them:
        the model's and the optimizer's variables then hold the new values.
        """
        variables = optimizer._trainable_variables
        param_tensors = self._like(params, variables)
        grad_tensors = self._like(grads, variables)
        optimizer_tensors = self._like(optimizer_values, optimizer.variables)

        def make() -> Callable[..., Any]:
            if self.backend == "tensorflow":
                return _make_stateful_update(optimizer)

            def update(params: list[Any], slots: list[Any], grads: list[Any]) -> Any:
                return optimizer.stateless_apply(slots, grads, params)

            return update

        function = self._cached(optimizer, "update", make)
        new_params, new_slots = function(param_tensors, optimizer_tensors, grad_tensors)
        return [to_numpy(value) for value in new_params], [
            to_numpy(value) for value in new_slots
        ]


def _make_stateful_update(optimizer: Any) -> Callable[..., Any]:
    import tensorflow as tf

    variables = list(optimizer._trainable_variables)
    slots = list(optimizer.variables)

    def update(params: list[Any], values: list[Any], grads: list[Any]) -> Any:
        for variable, value in zip(variables, params, strict=True):
            variable.assign(value)
        for variable, value in zip(slots, values, strict=True):
            variable.assign(value)
        optimizer.apply(grads, variables)
        return (
            [tf.identity(variable.value) for variable in variables],
            [tf.identity(variable.value) for variable in slots],
        )

    return update


def _make_vjp(
    backend: str, layer: Any, differentiable_input: bool
) -> Callable[..., Any]:
    def call(params: list[Any], state: list[Any], x: Any) -> Any:
        return call_layer(layer, params, state, x)

    if backend == "tensorflow":
        import tensorflow as tf

        def vjp(params: list[Any], state: list[Any], x: Any, upstream: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(params)
                if differentiable_input:
                    tape.watch(x)
                y = call(params, state, x)
            sources = [*params, x] if differentiable_input else list(params)
            grads = tape.gradient(y, sources, output_gradients=upstream)
            grads = [
                tf.zeros_like(source) if grad is None else grad
                for grad, source in zip(grads, sources, strict=True)
            ]
            if differentiable_input:
                return grads[:-1], grads[-1]
            return grads, None

        return vjp
    if backend == "jax":
        import jax

        def vjp(params: list[Any], state: list[Any], x: Any, upstream: Any) -> Any:
            if not differentiable_input:
                _, pullback = jax.vjp(lambda p: call(p, state, x), params)
                return pullback(upstream)[0], None
            _, pullback = jax.vjp(lambda p, x: call(p, state, x), params, x)
            weight_grads, input_grad = pullback(upstream)
            return weight_grads, input_grad

        return vjp
    if backend == "torch":
        import torch

        def vjp(params: list[Any], state: list[Any], x: Any, upstream: Any) -> Any:
            params = [p.detach().requires_grad_(True) for p in params]
            sources = list(params)
            if differentiable_input:
                x = x.detach().requires_grad_(True)
                sources.append(x)
            y = call(params, state, x)
            grads = torch.autograd.grad(
                y, sources, grad_outputs=upstream, allow_unused=True
            )
            grads = [
                torch.zeros_like(source) if grad is None else grad
                for grad, source in zip(grads, sources, strict=True)
            ]
            if differentiable_input:
                return grads[:-1], grads[-1]
            return grads, None

        return vjp
    raise ValueError(f"unknown backend {backend!r}")


def _make_loss_gradient(
    backend: str, keras: Any, loss_function: Any
) -> Callable[..., Any]:
    def mean_loss(y_true: Any, y_pred: Any) -> Any:
        return keras.ops.mean(loss_function(y_true, y_pred))

    if backend == "tensorflow":
        import tensorflow as tf

        def loss_gradient(y_true: Any, y_pred: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(y_pred)
                value = mean_loss(y_true, y_pred)
            return value, tape.gradient(value, y_pred)

        return loss_gradient
    if backend == "jax":
        import jax

        def loss_gradient(y_true: Any, y_pred: Any) -> Any:
            return jax.value_and_grad(lambda p: mean_loss(y_true, p))(y_pred)

        return loss_gradient
    if backend == "torch":
        import torch

        def loss_gradient(y_true: Any, y_pred: Any) -> Any:
            y_pred = y_pred.detach().requires_grad_(True)
            value = mean_loss(y_true, y_pred)
            (gradient,) = torch.autograd.grad(value, [y_pred])
            return value, gradient

        return loss_gradient
    raise ValueError(f"unknown backend {backend!r}")


def call_layer(layer: Any, params: list[Any], state: list[Any], x: Any) -> Any:
    """Call a layer in training mode with its variables replaced by given values.

    Unlike ``layer.stateless_call``, which runs ``layer.call`` directly, this goes
    through ``layer.__call__``, so the layer casts its inputs and, under a mixed
    precision policy, its variables to the compute dtype, as it does inside a
    model. Updates of non-trainable state (such as batch statistics) are dropped.
    """
    import keras

    mapping = [
        *zip(layer.trainable_variables, params, strict=True),
        *zip(layer.non_trainable_variables, state, strict=True),
    ]
    with keras.StatelessScope(state_mapping=mapping):
        return layer(x, training=True)


def layer_values(layer: Any) -> tuple[list[Any], list[Any]]:
    """Return copies of a layer's trainable and non-trainable values as tensors."""
    ops = layer_ops(layer)
    return (
        [
            ops.convert_to_tensor(to_numpy(v.value), v.dtype)
            for v in layer.trainable_variables
        ],
        [
            ops.convert_to_tensor(to_numpy(v.value), v.dtype)
            for v in layer.non_trainable_variables
        ],
    )


def layer_ops(layer: Any) -> Any:
    """Return the ``keras.ops`` module (imported lazily so the module stays light)."""
    import keras

    return keras.ops


def input_dtype(layer: Any, x: np.ndarray) -> str:
    """Return the dtype in which the layer receives ``x``: its compute dtype for floats."""
    if np.issubdtype(np.asarray(x).dtype, np.floating):
        return layer.compute_dtype
    return str(np.asarray(x).dtype)


def to_numpy(value: Any) -> np.ndarray:
    """Copy a backend tensor to a numpy array on the host, keeping its dtype."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if hasattr(value, "numpy"):
        return np.asarray(value.numpy())
    return np.asarray(value)


def loss_from_identifier(keras: Any, identifier: Any) -> Any:
    """Return the Keras loss named by a string or a serialized loss."""
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    return keras.losses.get(identifier)


def unit_roundoff(dtype: Any) -> float:
    """Return the unit round-off of a floating-point dtype (2**-24 for float32)."""
    try:
        return float(np.finfo(dtype).eps) / 2
    except (TypeError, ValueError):
        return 2.0**-24


def simple_excess(
    candidate: np.ndarray,
    reference: np.ndarray,
    referee: np.ndarray,
    reduction_length: int = 1,
    scale: np.ndarray | float | None = None,
    unit: float = 2.0**-24,
) -> float:
    """Return err(candidate) / max(err(reference), round-off floor), as compare_tensors does.

    Errors are taken against the float64 referee in two norms (RMS and max) and the
    larger excess is returned. The floor is ``unit * sqrt(reduction_length)`` times
    the magnitude of the values (or ``scale`` where larger). Non-finite values in
    the candidate where the referee is finite give an infinite excess.
    """
    c = np.asarray(candidate, np.float64)
    r = np.asarray(reference, np.float64)
    t = np.asarray(referee, np.float64)
    if c.shape != t.shape:
        return math.inf
    if np.any(~np.isfinite(c) & np.isfinite(t)):
        return math.inf
    finite = np.isfinite(c) & np.isfinite(r) & np.isfinite(t)
    c, r, t = c[finite], r[finite], t[finite]
    if c.size == 0:
        return 0.0
    magnitude = np.maximum(np.maximum(np.abs(c), np.abs(r)), np.abs(t))
    if scale is not None:
        magnitude = np.maximum(magnitude, np.broadcast_to(scale, finite.shape)[finite])
    growth = unit * math.sqrt(reduction_length)
    rms = float(np.sqrt(np.mean(magnitude**2)))
    tiny = np.finfo(np.float64).tiny
    excess_rms = _rms(c - t) / max(_rms(r - t), growth * rms, tiny)
    excess_max = float(np.max(np.abs(c - t))) / max(
        float(np.max(np.abs(r - t))), growth * float(magnitude.max()), tiny
    )
    return max(excess_rms, excess_max)


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values)))) if values.size else 0.0
