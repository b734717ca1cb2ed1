"""Tests for parity.tensors: verdicts, hard inputs, framework tensors, messages."""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from parity.errors import ParityError
from parity.tensors import (
    CONSISTENT_EXCESS,
    DIVERGENT_EXCESS,
    TensorComparison,
    compare_tensors,
    fixed_tolerance_mismatch,
)


def _matmul_inputs(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return a, b


def _round_to_10_bit_mantissa(x):
    """Round float32 values to 10 explicit mantissa bits, as TF32 does."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return rounded.view(np.float32)


def test_identical_arrays_consistent():
    a, b = _matmul_inputs(8, 16, 4)
    product = a @ b

    result = compare_tensors(product, product.copy())

    assert result.verdict == "consistent"
    assert result.mismatched == 0
    assert result.excess == 0.0
    assert result.max_abs_diff == 0.0


def test_identical_with_referee_consistent():
    a, b = _matmul_inputs(8, 16, 4)
    product = a @ b
    referee = a.astype(np.float64) @ b.astype(np.float64)

    result = compare_tensors(product, product.copy(), referee, reduction_length=16)

    assert result.verdict == "consistent"
    assert result.excess <= 1.0
    assert result.max_abs_diff > 0.0


def test_nan_one_side_divergent():
    reference = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    candidate = np.array([1.0, np.nan, 3.0], dtype=np.float32)

    result = compare_tensors(candidate, reference, name="logits")

    assert result.verdict == "divergent"
    assert result.excess == float("inf")
    assert result.nonfinite["candidate"].nan == 1
    assert result.nonfinite["candidate"].first_nan == (1,)
    assert result.nonfinite["reference"].nan == 0
    assert "NaN" in result.message
    assert "(1,)" in result.message


def test_nan_same_place_compares_finite():
    reference = np.array([[1.0, np.nan], [3.0, 4.0]], dtype=np.float32)
    candidate = reference.copy()
    candidate[1, 1] = np.nextafter(np.float32(4.0), np.float32(5.0))

    result = compare_tensors(candidate, reference)

    assert result.verdict == "roundoff"
    assert result.compared == 3
    assert result.mismatched == 1
    assert result.max_abs_index == (1, 1)
    assert result.nonfinite["candidate"].first_nan == (0, 1)
    assert result.nonfinite["reference"].first_nan == (0, 1)
    assert "1 NaN (first at (0, 1))" in result.message


def test_nan_both_sides_equal_consistent():
    values = np.array([np.nan, 1.0], dtype=np.float32)

    result = compare_tensors(values, values.copy())

    assert result.verdict == "consistent"
    assert result.mismatched == 0


def test_inf_same_sign_consistent():
    values = np.array([np.inf, -np.inf, 2.0], dtype=np.float32)

    result = compare_tensors(values, values.copy())

    assert result.verdict == "consistent"
    assert result.nonfinite["candidate"].posinf == 1
    assert result.nonfinite["candidate"].neginf == 1
    assert result.nonfinite["candidate"].first_neginf == (1,)


def test_inf_sign_flip_divergent():
    reference = np.array([np.inf, 2.0], dtype=np.float32)
    candidate = np.array([-np.inf, 2.0], dtype=np.float32)

    result = compare_tensors(candidate, reference)

    assert result.verdict == "divergent"
    assert "-inf" in result.message


def test_inf_where_referee_finite():
    # Both float32 sides overflow where the float64 referee does not: the overflow
    # is shared with the trusted reference, so it is reported but not blamed.
    referee = np.array([1e39, 1.0])
    reference = np.array([np.inf, 1.0], dtype=np.float32)
    candidate = reference.copy()

    result = compare_tensors(candidate, reference, referee)

    assert result.verdict == "consistent"
    assert result.compared == 1
    assert result.nonfinite["referee"].total == 0
    assert "+inf" in result.message


def test_zeros_consistent():
    zeros = np.zeros((3, 4), dtype=np.float32)

    result = compare_tensors(zeros, zeros.copy(), zeros.astype(np.float64))

    assert result.verdict == "consistent"
    assert result.excess == 0.0


def test_negative_zero_equals_zero():
    result = compare_tensors(np.array([-0.0], np.float32), np.array([0.0], np.float32))

    assert result.verdict == "consistent"


def test_zeros_against_values_divergent():
    reference = np.array([1.0, 2.0], dtype=np.float32)

    result = compare_tensors(np.zeros(2, np.float32), reference)

    assert result.verdict == "divergent"


def test_empty_tensors_consistent():
    empty = np.zeros((0, 3), dtype=np.float32)

    result = compare_tensors(empty, empty.copy(), empty.astype(np.float64))

    assert result.verdict == "consistent"
    assert result.compared == 0
    assert result.max_abs_index is None
    assert "empty" in result.message


def test_empty_shapes_differ_divergent():
    result = compare_tensors(np.zeros((0, 3)), np.zeros((3, 0)))

    assert result.verdict == "divergent"


def test_shape_mismatch_names_shapes():
    result = compare_tensors(
        np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), name="kernel"
    )

    assert result.verdict == "divergent"
    assert result.excess == float("inf")
    assert "(2, 3)" in result.message
    assert "(3, 2)" in result.message
    assert result.shape == (2, 3)
    assert result.reference_shape == (3, 2)


def test_integer_difference_divergent():
    reference = np.array([1, 2, 3, 4], dtype=np.int64)
    candidate = np.array([1, 2, 0, 4], dtype=np.int64)

    result = compare_tensors(candidate, reference, name="labels")

    assert result.verdict == "divergent"
    assert result.mismatched == 1
    assert result.excess == pytest.approx(0.25)
    assert result.max_abs_diff == 3.0
    assert result.max_abs_index == (2,)
    assert "index (2,)" in result.message


def test_integer_equal_consistent():
    values = np.arange(6, dtype=np.int32).reshape(2, 3)

    result = compare_tensors(values, values.astype(np.int8))

    assert result.verdict == "consistent"
    assert result.excess == 0.0


def test_integer_no_wraparound_in_diff():
    candidate = np.array([127], dtype=np.int8)
    reference = np.array([-128], dtype=np.int8)

    result = compare_tensors(candidate, reference)

    assert result.max_abs_diff == 255.0


def test_uint64_compares_exactly():
    big = np.array([2**63 + 1], dtype=np.uint64)

    result = compare_tensors(big, np.array([2**62], dtype=np.int64))

    assert result.verdict == "divergent"


def test_bool_tensors_exact():
    reference = np.array([True, False, True])

    assert compare_tensors(reference.copy(), reference).verdict == "consistent"
    result = compare_tensors(np.array([True, True, True]), reference)
    assert result.verdict == "divergent"
    assert result.mismatched == 1


def test_float16_inputs_roundoff():
    a, b = _matmul_inputs(16, 64, 8)
    referee = a.astype(np.float64) @ b.astype(np.float64)
    candidate = (a.astype(np.float16) @ b.astype(np.float16)).astype(np.float16)

    result = compare_tensors(candidate, a @ b, referee, reduction_length=64)

    assert result.dtype == "float16"
    assert result.verdict == "roundoff"


def test_bfloat16_inputs_roundoff():
    a, b = _matmul_inputs(16, 64, 8)
    referee = a.astype(np.float64) @ b.astype(np.float64)
    a16 = a.astype(ml_dtypes.bfloat16).astype(np.float32)
    b16 = b.astype(ml_dtypes.bfloat16).astype(np.float32)
    candidate = (a16 @ b16).astype(ml_dtypes.bfloat16)

    result = compare_tensors(candidate, a @ b, referee, reduction_length=64)

    assert result.dtype == "bfloat16"
    assert result.verdict == "roundoff"


def test_bfloat16_nan_counted():
    values = np.array([1.0, np.nan], dtype=ml_dtypes.bfloat16)

    result = compare_tensors(values, values.astype(np.float32))

    assert result.verdict == "consistent"
    assert result.nonfinite["candidate"].first_nan == (1,)


def test_float32_matmul_vs_referee_roundoff():
    a, b = _matmul_inputs(32, 56, 444)
    referee = a.astype(np.float64) @ b.astype(np.float64)

    result = compare_tensors(a @ b, referee, reduction_length=56)

    assert result.verdict == "roundoff"
    assert result.excess < 1.0


def test_tf32_like_matmul_divergent():
    a, b = _matmul_inputs(32, 56, 444)
    referee = a.astype(np.float64) @ b.astype(np.float64)
    candidate = _round_to_10_bit_mantissa(a) @ _round_to_10_bit_mantissa(b)

    result = compare_tensors(candidate, a @ b, referee, reduction_length=56)

    assert result.verdict == "divergent"
    assert result.excess > 5 * DIVERGENT_EXCESS


def test_one_ulp_candidate_roundoff():
    reference = np.linspace(1.0, 2.0, 10, dtype=np.float32)
    candidate = np.nextafter(reference, np.float32(3.0))

    result = compare_tensors(candidate, reference)

    assert result.verdict == "roundoff"
    assert result.excess <= 2.0


def test_tiny_difference_negligible_consistent():
    # One element 1e-6 of the tensor's scale differs by one ulp: far below the
    # round-off of the large elements, in both norms.
    reference = np.array([1e6, 1.0], dtype=np.float32)
    candidate = reference.copy()
    candidate[1] = np.nextafter(candidate[1], np.float32(2.0))

    result = compare_tensors(candidate, reference)

    assert result.verdict == "consistent"
    assert result.mismatched == 1
    assert result.excess < CONSISTENT_EXCESS


def test_message_contains_facts():
    a, b = _matmul_inputs(4, 8, 3)
    referee = a.astype(np.float64) @ b.astype(np.float64)
    candidate = _round_to_10_bit_mantissa(a) @ _round_to_10_bit_mantissa(b)

    result = compare_tensors(candidate, a @ b, referee, name="dense_1/output")

    assert result.message.startswith("dense_1/output: divergent")
    assert "(4, 3)" in result.message
    assert "float32" in result.message
    assert "float64" in result.message
    assert f"Excess over round-off is {result.excess:.3g}" in result.message
    assert f"divergent above {DIVERGENT_EXCESS:g}" in result.message
    assert "elements differ" in result.message
    assert "largest relative difference" in result.message


def test_to_dict_is_strict_json():
    reference = np.array([1.0, np.nan], dtype=np.float32)
    candidate = np.array([1.0, 2.0], dtype=np.float32)
    result = compare_tensors(candidate, reference)

    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))

    assert data["verdict"] == "divergent"
    assert data["excess"] is None
    assert data["nonfinite"]["reference"]["first_nan"] == [1]
    assert data["divergent_excess"] == DIVERGENT_EXCESS


def test_result_is_frozen():
    result = compare_tensors(np.ones(2, np.float32), np.ones(2, np.float32))

    assert isinstance(result, TensorComparison)
    with pytest.raises(AttributeError):
        result.verdict = "divergent"


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    a, b = _matmul_inputs(8, 16, 4)
    candidate = torch.from_numpy(a).requires_grad_() @ torch.from_numpy(b)
    referee = torch.from_numpy(a).double() @ torch.from_numpy(b).double()

    result = compare_tensors(candidate, torch.from_numpy(a @ b), referee)

    assert result.verdict in ("consistent", "roundoff")
    assert result.referee_dtype == "float64"


def test_torch_bfloat16_accepted():
    torch = pytest.importorskip("torch")
    values = torch.tensor([1.0, 2.5, float("nan")], dtype=torch.bfloat16)

    result = compare_tensors(values, values.float())

    assert result.dtype == "bfloat16"
    assert result.verdict == "consistent"
    assert result.nonfinite["candidate"].first_nan == (2,)


def test_tensorflow_tensors_accepted():
    tf = pytest.importorskip("tensorflow")
    a, b = _matmul_inputs(8, 16, 4)
    candidate = tf.matmul(tf.constant(a), tf.constant(b))
    reference = tf.Variable(a @ b)

    result = compare_tensors(candidate, reference, reduction_length=16)

    assert result.verdict in ("consistent", "roundoff")
    assert result.shape == (8, 4)


def test_jax_arrays_accepted():
    jnp = pytest.importorskip("jax.numpy")
    a, b = _matmul_inputs(8, 16, 4)
    candidate = jnp.asarray(a) @ jnp.asarray(b)

    result = compare_tensors(candidate, a @ b, reduction_length=16)

    assert result.verdict in ("consistent", "roundoff")


def test_jax_bfloat16_accepted():
    jnp = pytest.importorskip("jax.numpy")
    values = jnp.asarray([1.0, 2.0], dtype=jnp.bfloat16)

    result = compare_tensors(values, np.array([1.0, 2.0], np.float32))

    assert result.dtype == "bfloat16"
    assert result.verdict == "consistent"


def test_jax_tracer_rejected():
    jax = pytest.importorskip("jax")

    def compare_inside_jit(x):
        compare_tensors(x, np.ones(2, np.float32))
        return x

    with pytest.raises(ParityError, match="symbolic or traced"):
        jax.jit(compare_inside_jit)(np.ones(2, np.float32))


def test_import_loads_no_framework():
    code = (
        "import sys, parity.tensors\n"
        "loaded = [m for m in ('torch', 'tensorflow', 'jax') if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert completed.stdout.strip() == ""


@pytest.mark.parametrize(
    ("candidate", "reference", "match"),
    [
        ([1.0, 2.0], np.ones(2), "Python list"),
        (0.5, np.float32(0.5), "Python float"),
        (np.ones(2, np.complex64), np.ones(2, np.complex64), "complex"),
        (np.array(["a"]), np.array(["a"]), "not numeric"),
        (np.ones(2, np.int32), np.ones(2, np.float32), "Invalid dtypes"),
        (np.ones(2, bool), np.ones(2, np.int32), "Invalid dtypes"),
        (object(), np.ones(2), "expected a numpy array"),
        (np.ma.masked_array([1.0, 2.0], mask=[0, 1]), np.ones(2), "masked arrays"),
    ],
)
def test_invalid_inputs_raise(candidate, reference, match):
    with pytest.raises(ValueError, match=match) as raised:
        compare_tensors(candidate, reference)

    assert isinstance(raised.value, ParityError)


def test_referee_shape_mismatch_raises():
    with pytest.raises(ParityError, match="Invalid referee"):
        compare_tensors(np.ones(3), np.ones(3), np.ones(4))


@pytest.mark.parametrize("length", [0, -1, 2.5, True])
def test_invalid_reduction_length_raises(length):
    with pytest.raises(ValueError, match="reduction_length"):
        compare_tensors(np.ones(3), np.ones(3), reduction_length=length)


@pytest.mark.parametrize(
    ("scale", "match"),
    [(-1.0, "non-negative"), (np.ones(4), "does not broadcast"), ("big", "scale")],
)
def test_invalid_scale_raises(scale, match):
    with pytest.raises(ValueError, match=match):
        compare_tensors(np.ones(3), np.ones(3), scale=scale)


def test_scale_array_broadcasts():
    reference = np.zeros((2, 3), np.float32)
    candidate = np.full((2, 3), 1e-9, np.float32)

    result = compare_tensors(candidate, reference, scale=np.full((1, 3), 0.1))

    assert result.verdict == "roundoff"


def test_fixed_tolerance_rules():
    reference = np.array([1.0, np.inf], dtype=np.float32)

    assert not fixed_tolerance_mismatch(reference.copy(), reference)
    assert fixed_tolerance_mismatch(np.array([1.1, np.inf], np.float32), reference)
    assert fixed_tolerance_mismatch(np.array([1.0, -np.inf], np.float32), reference)
    assert fixed_tolerance_mismatch(np.array([np.nan]), np.array([np.nan]))
    assert fixed_tolerance_mismatch(np.ones(2), np.ones(3))


# Elements at most 1e3 in magnitude, with those under 1e-6 set to zero, so that
# products neither overflow nor fall into float32's subnormal range, where the
# round-off is absolute rather than relative.
_ELEMENTS = st.floats(-1e3, 1e3, width=32, allow_subnormal=False).map(
    lambda x: 0.0 if abs(x) < 1e-6 else x
)


@st.composite
def _matmul_pairs(draw):
    m, k, n = (draw(st.integers(1, 12)) for _ in range(3))
    a = draw(hnp.arrays(np.float32, (m, k), elements=_ELEMENTS))
    b = draw(hnp.arrays(np.float32, (k, n), elements=_ELEMENTS))
    return a, b


@settings(max_examples=200, deadline=None)
@given(_matmul_pairs())
def test_summation_order_never_divergent(pair):
    a, b = pair
    referee = a.astype(np.float64) @ b.astype(np.float64)
    products = a[:, :, None] * b[None, :, :]
    reversed_sum = np.cumsum(products[:, ::-1], axis=1, dtype=np.float32)[:, -1]
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))

    result = compare_tensors(
        reversed_sum, a @ b, referee, reduction_length=a.shape[1], scale=scale
    )

    assert result.verdict != "divergent", result.message
