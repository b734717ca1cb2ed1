"""Tensor-level cases from public reports of backends and modes that disagree.

Each test runs the real framework computation and pins the right verdict. FMA
contraction under JAX jit and a change of thread count are round-off. argmax over
NaN logits and int8 wrap-around under XLA are divergent.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from parity.tensors import compare_tensors, fixed_tolerance_mismatch

# FMA contraction: `b*b - a*a` with a = b = 0.1 in float32. Each summand is about
# 0.01, and two terms are added.
FMA_SUMMAND_SCALE = 0.01
FMA_REDUCTION_LENGTH = 2


def _squares_inputs():
    a = np.float32(0.1)
    return a, a


def _squares_referee():
    a, b = _squares_inputs()
    return np.float64(b) * np.float64(b) - np.float64(a) * np.float64(a)


def _explicit_fma():
    """Return fma(b, b, -(a*a)) in float32: a*a rounded, b*b kept exact."""
    a, b = _squares_inputs()
    # A product of two float32 values has at most 48 significant bits, so float64
    # represents it exactly, and the subtraction of two nearby float64 values is exact.
    exact_square = np.float64(b) * np.float64(b)
    rounded_square = np.float64(a * a)
    return np.float32(exact_square - rounded_square)


def test_explicit_fma_roundoff():
    a, b = _squares_inputs()
    eager = b * b - a * a
    fused = _explicit_fma()

    result = compare_tensors(
        fused,
        eager,
        _squares_referee(),
        name="b*b - a*a",
        reduction_length=FMA_REDUCTION_LENGTH,
        scale=FMA_SUMMAND_SCALE,
    )

    assert eager == 0.0
    assert fused == pytest.approx(-4.1e-10, rel=0.01)
    assert result.verdict == "roundoff"
    assert result.excess < 1.0


def test_jax_jit_fma_roundoff():
    jax = pytest.importorskip("jax")
    a, b = _squares_inputs()

    def difference_of_squares(a, b):
        return b * b - a * a

    eager = difference_of_squares(jax.numpy.float32(a), jax.numpy.float32(b))
    compiled = jax.jit(difference_of_squares)(a, b)

    result = compare_tensors(
        compiled,
        eager,
        _squares_referee(),
        reduction_length=FMA_REDUCTION_LENGTH,
        scale=FMA_SUMMAND_SCALE,
    )

    # On the x86-64 CPU where this test was written, XLA contracts one product
    # into an FMA and returns -4.1e-10. A build that does not contract returns 0,
    # equal to eager.
    if float(compiled) == float(eager):
        assert result.verdict == "consistent"
    else:
        assert result.verdict == "roundoff"


def test_fixed_tolerance_flags_fma():
    torch = pytest.importorskip("torch")
    a, b = _squares_inputs()
    eager = np.asarray(b * b - a * a)
    fused = np.asarray(_explicit_fma())

    # A relative-only check calls the FMA result a mismatch, but torch.testing's
    # float32 default atol=1e-5 hides a difference of 4e-10.
    assert fixed_tolerance_mismatch(fused, eager, atol=0.0)
    assert not fixed_tolerance_mismatch(fused, eager)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            torch.from_numpy(fused), torch.from_numpy(eager), rtol=1.3e-6, atol=0.0
        )
    torch.testing.assert_close(torch.from_numpy(fused), torch.from_numpy(eager))


def test_fma_without_scale_divergent():
    # Without scale the floor comes from the values, about 4e-10, so the
    # cancellation cannot be seen, and the message recommends scale=.
    a, b = _squares_inputs()

    result = compare_tensors(_explicit_fma(), b * b - a * a, _squares_referee())

    assert result.verdict == "divergent"
    assert "scale=" in result.message


# Thread count: a dense layer with 56 inputs and 444 outputs, run with one and two
# intra-op threads.
DENSE_INPUTS = 56
DENSE_UNITS = 444
DENSE_BATCH = 512


def _dense_data():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((DENSE_BATCH, DENSE_INPUTS)).astype(np.float32)
    kernel = rng.standard_normal((DENSE_INPUTS, DENSE_UNITS)).astype(np.float32)
    kernel /= np.float32(np.sqrt(DENSE_INPUTS))
    bias = (0.1 * rng.standard_normal(DENSE_UNITS)).astype(np.float32)
    referee = x.astype(np.float64) @ kernel.astype(np.float64) + bias
    return x, kernel, bias, referee


def test_torch_thread_count_roundoff():
    torch = pytest.importorskip("torch")
    x, kernel, bias, referee = _dense_data()
    weight = torch.from_numpy(np.ascontiguousarray(kernel.T))

    def dense(threads):
        torch.set_num_threads(threads)
        return torch.nn.functional.linear(
            torch.from_numpy(x), weight, torch.from_numpy(bias)
        )

    previous_threads = torch.get_num_threads()
    try:
        one_thread = dense(1)
        two_threads = dense(2)
    finally:
        torch.set_num_threads(previous_threads)

    result = compare_tensors(
        two_threads, one_thread, referee, reduction_length=DENSE_INPUTS
    )

    assert result.verdict in ("roundoff", "consistent"), result.message


_TF_DENSE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[2]))
    data = np.load(sys.argv[1])
    output = tf.matmul(data["x"], data["kernel"]) + data["bias"]
    np.save(sys.argv[3], output.numpy())
    """
)


def test_tensorflow_thread_count_roundoff(tmp_path):
    pytest.importorskip("tensorflow")
    x, kernel, bias, referee = _dense_data()
    data_path = tmp_path / "dense.npz"
    np.savez(data_path, x=x, kernel=kernel, bias=bias)

    # Intra-op threads are fixed when TensorFlow starts, so each count needs its
    # own process. Both run at once to keep the test short.
    outputs = {threads: tmp_path / f"threads_{threads}.npy" for threads in (1, 2)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _TF_DENSE_SCRIPT, str(data_path), str(n), str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, path in outputs.items()
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-2000:]

    result = compare_tensors(
        np.load(outputs[2]),
        np.load(outputs[1]),
        referee,
        reduction_length=DENSE_INPUTS,
    )

    assert result.verdict in ("roundoff", "consistent"), result.message


def test_one_ulp_places_roundoff():
    # The reported difference: about 6e-8, one float32 ulp near 1, in some places.
    x, kernel, bias, referee = _dense_data()
    one_thread = x @ kernel + bias
    two_threads = one_thread.copy()
    places = two_threads.reshape(-1)[::97]
    two_threads.reshape(-1)[::97] = np.nextafter(places, np.float32(np.inf))

    result = compare_tensors(
        two_threads, one_thread, referee, reduction_length=DENSE_INPUTS
    )

    assert result.mismatched == places.size
    assert result.verdict == "roundoff"


# argmax over logits that contain NaN, TensorFlow eager versus XLA. Values
# reported for TensorFlow 2.21 on the CPU, and reproduced there.
NAN_LOGITS = [4.0, 5.5, np.nan]
ARGMAX_STATED_EAGER = 1
ARGMAX_STATED_XLA = 2


def test_argmax_nan_xla_divergent():
    tf = pytest.importorskip("tensorflow")

    def predict(logits):
        return tf.identity(logits), tf.argmax(logits, output_type=tf.int64)

    logits = tf.constant(NAN_LOGITS, dtype=tf.float32)
    eager_logits, eager_class = predict(logits)
    xla_logits, xla_class = tf.function(predict, jit_compile=True)(logits)
    eager_class, xla_class = eager_class.numpy(), xla_class.numpy()
    if eager_class == xla_class:
        # This TensorFlow build agrees between modes, so pin the integer verdict
        # on the classes reported for TensorFlow 2.21.
        eager_class = np.int64(ARGMAX_STATED_EAGER)
        xla_class = np.int64(ARGMAX_STATED_XLA)

    logits_result = compare_tensors(xla_logits, eager_logits, name="logits")
    class_result = compare_tensors(xla_class, eager_class, name="predicted class")

    assert logits_result.verdict == "consistent"
    assert logits_result.nonfinite["candidate"].nan == 1
    assert logits_result.nonfinite["candidate"].first_nan == (2,)
    assert "1 NaN (first at (2,))" in logits_result.message
    assert class_result.verdict == "divergent"
    assert class_result.mismatched == 1
    assert "candidate 2, reference 1" in class_result.message


# Integer wrap-around: int8 b * b wraps around, then where(p < 0, abs(p), p).
# Values reported for TensorFlow 2.21 on the CPU, and reproduced there.
INT8_INPUT = [100, -50, 12]
INT8_STATED_EAGER = [16, 60, 112]
INT8_STATED_XLA = [16, -60, -112]


def test_int8_wraparound_xla_divergent():
    tf = pytest.importorskip("tensorflow")

    def absolute_square(b):
        p = b * b
        return tf.where(p < 0, tf.abs(p), p)

    b = tf.constant(INT8_INPUT, dtype=tf.int8)
    eager = absolute_square(b).numpy()
    xla = tf.function(absolute_square, jit_compile=True)(b).numpy()
    np.testing.assert_array_equal(eager, INT8_STATED_EAGER)
    if np.array_equal(eager, xla):
        # This TensorFlow build agrees between modes, so pin the integer verdict
        # on the values reported for TensorFlow 2.21.
        xla = np.array(INT8_STATED_XLA, dtype=np.int8)

    result = compare_tensors(xla, eager, name="where(p < 0, abs(p), p)")

    assert result.verdict == "divergent"
    assert result.mismatched == 2
    assert result.max_abs_index == (2,)
    assert result.max_abs_diff == 224.0
    assert "index (1,): candidate -60, reference 60" in result.message
