"""Calibrated comparison of one tensor computed by two configurations.

`compare_tensors` measures how far a candidate's tensor is from a float64 referee,
in units of the round-off that a trusted float32 reference shows on the same
inputs, and turns that excess into a verdict word:

- ``consistent``: equal to the reference element by element, or off by less than
  a negligible fraction of one round-off;
- ``roundoff``: different, but within the float32 noise of a correct kernel;
- ``divergent``: beyond that noise, a different shape, or non-finite values where
  the reference has none. Integer and bool tensors are compared exactly, so any
  difference is divergent.

The comparison runs in four stages: move each tensor to host memory and read its
metadata (shape, dtype, NaN and infinity counts), upcast to float64, compare the
values, and write a message that is complete without the code. Tensors from torch,
TensorFlow and JAX are converted by duck typing, so importing this module imports
none of those frameworks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

from parity.errors import InputError

__all__ = [
    "CONSISTENT_EXCESS",
    "DIVERGENT_EXCESS",
    "NonFiniteCount",
    "TensorComparison",
    "Verdict",
    "compare_tensors",
    "fixed_tolerance_mismatch",
]

Verdict = Literal["consistent", "roundoff", "divergent"]

# A candidate whose error is below 1/100 of the round-off floor in both norms is
# called consistent even if some elements differ, because such a difference is
# much smaller than one rounding at the tensor's own scale. This is a definition,
# not a measurement. The FMA contraction of `b*b - a*a`, which is one rounding of
# a product, sits at 0.25 to 0.5 of its floor (scale 0.01 to 0.02, reduction
# length 2) and stays roundoff.
CONSISTENT_EXCESS = 0.01

# Excess above which a float tensor is divergent. It was measured with
# compare_tensors on a 2-core x86-64 CPU (numpy 2.4, torch 2.13, TensorFlow 2.21,
# JAX 0.10), with float32 inputs and a float64 referee.
# Correct pairs were dense layers x @ w + b with (batch, inputs, units) from
# (32, 2, 12) to (2, 16384, 4) and (128, 512, 512), on normal and on non-negative
# inputs. They ran on numpy, torch (1 and 2 threads, matmul and F.linear),
# TensorFlow eager and jit_compile, JAX eager and jit, and a sequential float32
# sum. Also measured: tanh, exp, sigmoid and softplus on the same backends, and
# row sums of up to 1e5 terms. The largest excess was 4.3 with a referee and
# reduction_length, 6 with reduction_length only, 38.6 with a referee only (a
# sequential sum of 1e5 terms), and 76 with neither (16384 terms). float16 and
# bfloat16 matmuls against a float32 reference stayed below 1.4.
# Faulty pairs: inputs rounded to bfloat16 gave at least 190. Inputs rounded to a
# 10-bit mantissa (TF32-like) gave at least 108 without reduction_length.
# NOTE: the sqrt(k) floor also covers a sequential float32 sum, so with
# reduction_length given a TF32-like matmul falls to 57 at k=4096 and 16 at
# k=16384, and at k=16384 it is called roundoff. Without a referee and without
# reduction_length, correct reductions of more than about 1e4 terms can exceed 50.
# A single element off by 1e-4 relative stays below 50 once k reaches about 128.
DIVERGENT_EXCESS = 50.0

# Reporting only, never used for the verdict: the relative difference of an
# element is taken against max(|target|, RELATIVE_DIFF_FLOOR * tensor scale), so
# an element that cancelled to nearly zero does not report a huge relative value.
RELATIVE_DIFF_FLOOR = 1e-3

# Comparisons run in float64, so no floor is finer than float64's unit round-off.
_FLOAT64_UNIT_ROUNDOFF = 2.0**-53

_SIDES = ("candidate", "reference", "referee")


@dataclass(frozen=True)
class NonFiniteCount:
    """NaN and infinity counts of one tensor, with the index of the first of each."""

    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    first_nan: tuple[int, ...] | None = None
    first_posinf: tuple[int, ...] | None = None
    first_neginf: tuple[int, ...] | None = None

    @property
    def total(self) -> int:
        """Number of non-finite elements."""
        return self.nan + self.posinf + self.neginf

    def to_dict(self) -> dict[str, Any]:
        """Return the counts as a JSON-ready dict, with indices as lists."""
        return {f.name: _json_value(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class TensorComparison:
    """Outcome of comparing one tensor: the verdict, the numbers behind it, a message.

    Errors are relative RMS values: the RMS of the difference over the elements that
    are finite on every side, divided by the RMS magnitude of the values (or of the
    `scale` given to `compare_tensors`, where larger). For integer and bool tensors
    `err_candidate` and `err_reference` are the fractions of elements that differ
    from the referee, `floor` is 0 and `excess` is the fraction of elements where
    the candidate differs from the reference.
    """

    name: str
    verdict: Verdict
    excess: float
    err_candidate: float
    err_reference: float
    floor: float
    excess_rms: float
    excess_max: float
    max_abs_diff: float
    max_abs_index: tuple[int, ...] | None
    max_rel_diff: float
    max_rel_index: tuple[int, ...] | None
    mismatched: int
    compared: int
    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    dtype: str
    reference_dtype: str
    referee_dtype: str | None
    nonfinite: dict[str, NonFiniteCount]
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Return all fields as a dict that `json.dumps(..., allow_nan=False)` accepts.

        Tuples become lists and non-finite floats become None, because strict JSON
        has no NaN or Infinity; the message still states those values.
        """
        result = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "nonfinite":
                value = {side: count.to_dict() for side, count in value.items()}
            result[field.name] = _json_value(value)
        result["consistent_excess"] = CONSISTENT_EXCESS
        result["divergent_excess"] = DIVERGENT_EXCESS
        return result


@dataclass(frozen=True)
class _Values:
    """Result of the value stage, before the message is written."""

    verdict: Verdict
    reason: str
    excess: float = math.nan
    err_candidate: float = math.nan
    err_reference: float = math.nan
    floor: float = math.nan
    excess_rms: float = math.nan
    excess_max: float = math.nan
    max_abs_diff: float = math.nan
    max_abs_index: tuple[int, ...] | None = None
    max_rel_diff: float = math.nan
    max_rel_index: tuple[int, ...] | None = None
    mismatched: int = 0
    compared: int = 0
    detail: str = ""


def compare_tensors(
    candidate: Any,
    reference: Any,
    referee: Any = None,
    *,
    name: str = "tensor",
    reduction_length: int | None = None,
    scale: Any = None,
) -> TensorComparison:
    """Compare a candidate's tensor with a trusted reference and a float64 referee.

    All three must be computed from the same inputs. The candidate's error is
    ``err(c) = |c - t|`` against the referee `t`, or against the reference when no
    referee is given. It is measured in units of the larger of the reference's own
    error and a round-off floor:

        excess = err(c) / max(err(r), floor)
        floor  = u * sqrt(reduction_length) * magnitude

    `u` is the unit round-off of the candidate's dtype (2**-24 for float32, 2**-11
    for float16, 2**-8 for bfloat16, 2**-53 for float64). The magnitude of each
    element is the largest of |c|, |r|, |t| and `scale`. The excess is the larger
    of two norms: relative RMS over all elements, and the max absolute difference
    against ``u * sqrt(reduction_length) * max(magnitude)``.

    Args:
        candidate: the tensor under test: a numpy array or scalar, or a torch,
            TensorFlow or JAX tensor.
        reference: the same tensor from a trusted float32 configuration.
        referee: the same tensor computed in float64, or None to measure the
            candidate against the reference directly.
        name: tensor name used in the message, such as ``"dense_1/kernel"``.
        reduction_length: number of terms summed into each element (the inner
            dimension of a matmul), or None when unknown, which counts as 1.
            Without a referee, pass it for reductions of more than about 1e4
            terms, whose correct round-off can otherwise exceed DIVERGENT_EXCESS.
        scale: magnitude of the summands or inputs that produced each element: a
            non-negative number or an array broadcastable to the tensor's shape.
            Pass it when the result can cancel to nearly zero, as in ``b*b - a*a``
            with a == b: the values alone cannot show that a difference of 4e-10 is
            one rounding of products of size 0.01. For a matmul ``x @ w``,
            ``abs(x) @ abs(w)`` is a good choice. Ignored for integer and bool
            tensors.

    Returns:
        A TensorComparison. Its `message` names the tensor, shapes and dtypes, how
        many elements differ, the largest differences and their indices, the
        thresholds, the excess and the verdict.

    Raises:
        InputError: a tensor argument is not an array or tensor, or has an
            unsupported dtype. The sides mix integer, bool and floating-point
            dtypes, or the referee's shape differs from the reference's. Or
            `reduction_length` or `scale` is invalid.
    """
    arrays = {
        "candidate": _to_host_array(candidate, "candidate"),
        "reference": _to_host_array(reference, "reference"),
    }
    if referee is not None:
        arrays["referee"] = _to_host_array(referee, "referee")
    kind = _check_dtype_kinds(arrays)
    _check_referee_shape(arrays)
    length = _check_reduction_length(reduction_length)
    scale_array = _check_scale(scale, arrays["reference"].shape)

    nonfinite = {side: _count_nonfinite(array) for side, array in arrays.items()}
    c, r = arrays["candidate"], arrays["reference"]

    if c.shape != r.shape:
        values = _Values(verdict="divergent", reason="shape", excess=math.inf)
    elif kind == "float":
        unit_roundoff = _unit_roundoff(c.dtype)
        values = _compare_floating(
            _to_float64(arrays), scale_array, unit_roundoff, length
        )
    else:
        values = _compare_exact(arrays)

    message = _format_message(name, arrays, nonfinite, values, scale is not None)
    return _assemble_result(name, arrays, nonfinite, values, message)


def fixed_tolerance_mismatch(
    candidate: Any,
    reference: Any,
    rtol: float = 1.3e-6,
    atol: float = 1e-5,
) -> bool:
    """Return True when a fixed-tolerance check would report a mismatch.

    This mirrors the closeness rule documented for `torch.testing.assert_close`:
    finite elements match when ``|candidate - reference| <= atol + rtol *
    |reference|``, infinities match only when equal, and NaN never matches
    (``equal_nan=False``). The defaults are the documented float32 defaults. A
    shape mismatch counts as a mismatch, and dtypes are not checked. It exists to
    show what such a check gets wrong, and it is not used by `compare_tensors`.
    """
    c = _to_float64({"candidate": _to_host_array(candidate, "candidate")})
    r = _to_float64({"reference": _to_host_array(reference, "reference")})
    c, r = c["candidate"], r["reference"]
    if c.shape != r.shape:
        return True

    finite = np.isfinite(c) & np.isfinite(r)
    with np.errstate(invalid="ignore", over="ignore"):
        close = finite & (np.abs(c - r) <= atol + rtol * np.abs(r))
    close |= np.isinf(c) & (c == r)
    return not bool(np.all(close))


# Stage 1: host memory and metadata.


def _to_host_array(value: Any, side: str) -> np.ndarray:
    """Convert a numpy array or scalar or a framework tensor to a host numpy array."""
    if isinstance(value, np.ma.MaskedArray):
        raise InputError(
            f"Invalid {side}: masked arrays are not supported, because the masked "
            f"elements would be compared as values. Pass value.filled(numpy.nan) "
            f"to mark them as NaN."
        )
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, np.generic):
        array = np.asarray(value)
    elif isinstance(value, (bool, int, float, complex, list, tuple, str, bytes)):
        raise InputError(
            f"Invalid {side}: expected an array or tensor, received a Python "
            f"{type(value).__name__} ({_short_repr(value)}). A Python number has "
            f"no float32 or float64 identity, so wrap it with an explicit dtype, "
            f"for example numpy.asarray(value, dtype=numpy.float32)."
        )
    else:
        array = _framework_tensor_to_numpy(value, side)

    if array.dtype.kind in "OSUVmM" and not _is_floating(array.dtype):
        raise InputError(
            f"Invalid {side}: dtype {array.dtype} is not numeric. Pass a tensor of "
            f"a floating-point, integer or bool dtype."
        )
    if array.dtype.kind == "c":
        raise InputError(
            f"Invalid {side}: complex dtype {array.dtype} is not supported. "
            f"Compare the real and imaginary parts as two tensors."
        )
    return array


def _framework_tensor_to_numpy(value: Any, side: str) -> np.ndarray:
    """Copy a torch, TensorFlow or JAX tensor to host memory, keeping its dtype."""
    try:
        if hasattr(value, "detach") and hasattr(value, "cpu"):
            return _torch_to_numpy(value)
        if callable(getattr(value, "numpy", None)):
            return np.asarray(value.numpy())
        if hasattr(value, "__array__") or hasattr(value, "__array_interface__"):
            return np.asarray(value)
    except (TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise InputError(
            f"Invalid {side}: cannot copy the {type(value).__name__} to host "
            f"memory ({error}). Pass a concrete tensor, not a symbolic or traced one; "
            f"for example, call the function eagerly or return the tensor from it."
        ) from error
    raise InputError(
        f"Invalid {side}: expected a numpy array or a torch, TensorFlow or JAX "
        f"tensor, received {type(value).__module__}.{type(value).__qualname__}."
    )


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    """Copy a torch tensor to numpy, including dtypes that torch cannot export."""
    host = tensor.detach().cpu()
    dtype_name = str(host.dtype).removeprefix("torch.")
    if dtype_name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        # torch has no numpy export for these dtypes. Widening to float32 is exact
        # and so is narrowing back, because every value is representable.
        try:
            import ml_dtypes
        except ImportError as error:
            raise InputError(
                f"Cannot read a torch.{dtype_name} tensor without the ml_dtypes "
                f"package. Install it (pip install ml_dtypes) or pass tensor.float()."
            ) from error
        return host.float().numpy().astype(getattr(ml_dtypes, dtype_name))
    return host.numpy()


def _check_dtype_kinds(arrays: dict[str, np.ndarray]) -> str:
    """Return the shared dtype kind: "float", "integer" or "bool".

    Raise InputError when the sides are of different kinds.
    """
    kinds = {side: _dtype_kind(array.dtype) for side, array in arrays.items()}
    if len(set(kinds.values())) > 1:
        described = ", ".join(
            f"{side} {arrays[side].dtype} ({kind})" for side, kind in kinds.items()
        )
        raise InputError(
            f"Invalid dtypes: {described}. Floating-point tensors are compared "
            f"against round-off and integer or bool tensors exactly, so all sides "
            f"must be of one kind. Cast one side, for example "
            f"reference.astype(candidate.dtype), if that is what you intend."
        )
    return kinds["candidate"]


def _check_referee_shape(arrays: dict[str, np.ndarray]) -> None:
    if "referee" not in arrays:
        return
    reference_shape = arrays["reference"].shape
    referee_shape = arrays["referee"].shape
    if referee_shape != reference_shape:
        raise InputError(
            f"Invalid referee: shape {referee_shape} differs from the reference's "
            f"shape {reference_shape}. The referee must be the same tensor "
            f"computed in float64 from the same inputs."
        )


def _check_reduction_length(reduction_length: Any) -> int:
    if reduction_length is None:
        return 1
    is_integer = isinstance(reduction_length, (int, np.integer))
    if isinstance(reduction_length, bool) or not is_integer or reduction_length < 1:
        raise InputError(
            f"Invalid reduction_length={reduction_length!r}: expected a positive "
            f"integer, the number of terms summed into each element (the inner "
            f"dimension of a matmul), or None when unknown."
        )
    return int(reduction_length)


def _check_scale(scale: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """Return `scale` as a float64 array broadcast to `shape`, or None."""
    if scale is None:
        return None
    if isinstance(scale, (bool, complex, str)):
        raise InputError(
            f"Invalid scale={scale!r}: expected a non-negative number or array."
        )
    if isinstance(scale, (int, float)):
        scale_array = np.asarray(scale, dtype=np.float64)
    else:
        scale_array = _to_host_array(scale, "scale").astype(np.float64)
    if not np.all(np.isfinite(scale_array)) or np.any(scale_array < 0):
        raise InputError(
            f"Invalid scale: expected finite non-negative values, received "
            f"{_short_repr(scale_array)}. Pass the magnitude of the summands, for "
            f"example abs(x) @ abs(w) for x @ w."
        )
    try:
        return np.broadcast_to(scale_array, shape)
    except ValueError:
        raise InputError(
            f"Invalid scale: shape {scale_array.shape} does not broadcast to the "
            f"tensor's shape {shape}. Pass a number or an array of a broadcastable "
            f"shape."
        ) from None


def _count_nonfinite(array: np.ndarray) -> NonFiniteCount:
    if not _is_floating(array.dtype):
        return NonFiniteCount()
    nan = np.isnan(array)
    posinf = np.isposinf(array)
    neginf = np.isneginf(array)
    return NonFiniteCount(
        nan=int(nan.sum()),
        posinf=int(posinf.sum()),
        neginf=int(neginf.sum()),
        first_nan=_first_index(nan),
        first_posinf=_first_index(posinf),
        first_neginf=_first_index(neginf),
    )


# Stage 2: make the sides comparable.


def _to_float64(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Upcast every side to float64, which represents float16, bfloat16 and float32 exactly."""
    return {side: array.astype(np.float64) for side, array in arrays.items()}


def _unit_roundoff(dtype: np.dtype) -> float:
    # ml_dtypes registers bfloat16 and the float8 types with np.finfo.
    return max(float(np.finfo(dtype).eps) / 2, _FLOAT64_UNIT_ROUNDOFF)


# Stage 3: compare values.


def _compare_floating(
    arrays: dict[str, np.ndarray],
    scale: np.ndarray | None,
    unit_roundoff: float,
    reduction_length: int,
) -> _Values:
    """Measure the candidate's excess over round-off on the elements finite everywhere."""
    c, r = arrays["candidate"], arrays["reference"]
    t = arrays.get("referee", r)
    mismatched = int(np.count_nonzero(~_equal_or_both_nan(c, r)))
    pattern_detail = _nonfinite_pattern_difference(c, r)

    finite = np.isfinite(c) & np.isfinite(r) & np.isfinite(t)
    cf, rf, tf = c[finite], r[finite], t[finite]
    magnitude = np.maximum(np.maximum(np.abs(cf), np.abs(rf)), np.abs(tf))
    if scale is not None:
        magnitude = np.maximum(magnitude, scale[finite])
    diff_c = np.abs(cf - tf)
    measured = _measure_excess(
        diff_c, np.abs(rf - tf), magnitude, unit_roundoff, reduction_length
    )

    excess = max(measured.excess_rms, measured.excess_max)
    if pattern_detail:
        verdict, reason, excess = "divergent", "nonfinite", math.inf
    elif mismatched == 0:
        verdict, reason = "consistent", "equal"
    elif measured.negligible:
        verdict, reason = "consistent", "negligible"
    elif excess <= DIVERGENT_EXCESS:
        verdict, reason = "roundoff", "excess"
    else:
        verdict, reason = "divergent", "excess"

    abs_index, rel_diff, rel_index = _largest_differences(
        c.shape, finite, diff_c, tf, RELATIVE_DIFF_FLOOR * measured.norm
    )
    return _Values(
        verdict=verdict,
        reason=reason,
        excess=excess,
        err_candidate=measured.err_candidate,
        err_reference=measured.err_reference,
        floor=measured.floor,
        excess_rms=measured.excess_rms,
        excess_max=measured.excess_max,
        max_abs_diff=float(diff_c.max(initial=0.0)),
        max_abs_index=abs_index,
        max_rel_diff=rel_diff,
        max_rel_index=rel_index,
        mismatched=mismatched,
        compared=int(finite.sum()),
        detail=pattern_detail,
    )


@dataclass(frozen=True)
class _Excess:
    """Errors and floor relative to `norm`, and the excess in both norms."""

    err_candidate: float
    err_reference: float
    floor: float
    norm: float
    excess_rms: float
    excess_max: float
    negligible: bool


def _measure_excess(
    diff_c: np.ndarray,
    diff_r: np.ndarray,
    magnitude: np.ndarray,
    unit_roundoff: float,
    reduction_length: int,
) -> _Excess:
    """Compute excess = err(c) / max(err(r), floor) in the RMS norm and the max norm."""
    # Round-off of a sum of k terms grows like sqrt(k) times the summands' size when
    # the rounding errors are independent, the usual probabilistic estimate.
    growth = unit_roundoff * math.sqrt(reduction_length)
    rms_magnitude = _rms(magnitude)
    floor_rms = growth * rms_magnitude
    floor_max = growth * float(magnitude.max(initial=0.0))
    rms_c, rms_r = _rms(diff_c), _rms(diff_r)
    max_c, max_r = float(diff_c.max(initial=0.0)), float(diff_r.max(initial=0.0))
    norm = max(rms_magnitude, float(np.finfo(np.float64).tiny))
    return _Excess(
        err_candidate=rms_c / norm,
        err_reference=rms_r / norm,
        floor=floor_rms / norm,
        norm=rms_magnitude,
        excess_rms=_ratio(rms_c, max(rms_r, floor_rms)),
        excess_max=_ratio(max_c, max(max_r, floor_max)),
        negligible=rms_c <= CONSISTENT_EXCESS * floor_rms
        and max_c <= CONSISTENT_EXCESS * floor_max,
    )


def _largest_differences(
    shape: tuple[int, ...],
    finite: np.ndarray,
    diff_c: np.ndarray,
    target_finite: np.ndarray,
    relative_floor: float,
) -> tuple[tuple[int, ...] | None, float, tuple[int, ...] | None]:
    """Return the index of the largest absolute difference, and the largest relative one."""
    if diff_c.size == 0:
        return None, math.nan, None
    positions = np.flatnonzero(finite)
    abs_index = _unravel(int(positions[int(np.argmax(diff_c))]), shape)
    denominator = np.maximum(np.abs(target_finite), relative_floor)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(denominator > 0, diff_c / denominator, 0.0)
    rel_position = int(np.argmax(relative))
    rel_index = _unravel(int(positions[rel_position]), shape)
    return abs_index, float(relative[rel_position]), rel_index


def _nonfinite_pattern_difference(c: np.ndarray, r: np.ndarray) -> str:
    """Describe the first element where NaN or infinity differ, or return ""."""
    differs = np.zeros(c.shape, dtype=bool)
    for test in (np.isnan, np.isposinf, np.isneginf):
        differs |= test(c) != test(r)
    if not differs.any():
        return ""
    index = _first_index(differs)
    return (
        f"Non-finite values differ in {_count_noun(int(differs.sum()), 'element')}: "
        f"the first is at index {_format_index(index)}, where the candidate is "
        f"{c[index].item()!r} and the reference is {r[index].item()!r}."
    )


def _compare_exact(arrays: dict[str, np.ndarray]) -> _Values:
    """Compare integer or bool tensors exactly, so any difference is divergent."""
    c, r = arrays["candidate"], arrays["reference"]
    t = arrays.get("referee", r)
    differs = _exact_not_equal(c, r)
    mismatched = int(np.count_nonzero(differs))
    size = max(c.size, 1)
    diff = _exact_abs_diff(c, r)

    abs_index = None
    if diff.size and diff.max() > 0:
        abs_index = _unravel(int(np.argmax(diff)), c.shape)
    detail = ""
    if mismatched:
        index = _first_index(differs)
        detail = (
            f"The first difference is at index {_format_index(index)}: candidate "
            f"{c[index].item()!r}, reference {r[index].item()!r}."
        )
    return _Values(
        verdict="divergent" if mismatched else "consistent",
        reason="exact",
        excess=mismatched / size,
        err_candidate=np.count_nonzero(_exact_not_equal(c, t)) / size,
        err_reference=np.count_nonzero(_exact_not_equal(r, t)) / size,
        floor=0.0,
        excess_rms=mismatched / size,
        excess_max=mismatched / size,
        max_abs_diff=float(diff.max(initial=0)),
        max_abs_index=abs_index,
        mismatched=mismatched,
        compared=c.size,
        detail=detail,
    )


def _exact_not_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    common = np.result_type(a.dtype, b.dtype)
    if common.kind == "f":
        # Only uint64 with a signed type promotes to float64, which would round
        # values above 2**53. Python integers compare exactly.
        return a.astype(object) != b.astype(object)
    return a != b


def _exact_abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return |a - b| without integer wrap-around (approximate above 2**53)."""
    small = a.dtype.itemsize <= 4 and b.dtype.itemsize <= 4
    wide = np.int64 if small else np.float64
    return np.abs(a.astype(wide) - b.astype(wide))


# Stage 4: the message.


def _format_message(
    name: str,
    arrays: dict[str, np.ndarray],
    nonfinite: dict[str, NonFiniteCount],
    values: _Values,
    has_scale: bool,
) -> str:
    c, r = arrays["candidate"], arrays["reference"]
    target = "referee" if "referee" in arrays else "reference"
    sides = ", ".join(
        f"{side} {_dtype_name(array.dtype)} {tuple(array.shape)}"
        for side, array in arrays.items()
    )
    lines = [f"{name}: {values.verdict} ({sides})."]

    if values.reason == "shape":
        lines.append(
            f"Shapes differ: candidate {tuple(c.shape)}, reference "
            f"{tuple(r.shape)}. Values were not compared."
        )
        return " ".join(lines + _nonfinite_lines(nonfinite))

    if c.size == 0:
        lines.append("The tensors are empty, so there is nothing to compare.")
    else:
        lines.append(
            f"{values.mismatched} of {_count_noun(c.size, 'element')} differ from the reference."
        )
    if values.reason == "exact":
        lines.append(_exact_lines(values, arrays))
        return " ".join(line for line in lines if line)

    if values.max_abs_diff > 0:
        lines.append(
            f"Largest |candidate - {target}| is {values.max_abs_diff:.3g} at index "
            f"{_format_index(values.max_abs_index)}; largest relative difference is "
            f"{values.max_rel_diff:.3g} at index "
            f"{_format_index(values.max_rel_index)}."
        )
    lines.append(
        f"Excess over round-off is {values.excess:.3g} (relative RMS error of "
        f"candidate {values.err_candidate:.3g}, of reference "
        f"{values.err_reference:.3g}, round-off floor {values.floor:.3g}; RMS "
        f"excess {values.excess_rms:.3g}, max-norm excess {values.excess_max:.3g}). "
        f"Thresholds: divergent above {DIVERGENT_EXCESS:g}, consistent below "
        f"{CONSISTENT_EXCESS:g} of the floor."
    )
    if values.detail:
        lines.append(values.detail)
    if values.reason == "excess" and values.verdict == "divergent" and not has_scale:
        lines.append(
            "If this tensor is a small difference of larger terms, pass scale= with "
            "the magnitude of those terms: without it the floor uses the values' "
            "own magnitude and cannot see cancellation."
        )
    lines.extend(_nonfinite_lines(nonfinite))
    if any(count.total for count in nonfinite.values()):
        lines.append(
            f"Compared the {_count_noun(values.compared, 'element')} that are finite on every side."
        )
    return " ".join(lines)


def _exact_lines(values: _Values, arrays: dict[str, np.ndarray]) -> str:
    text = (
        f"Integer and bool tensors are compared exactly, so any difference is "
        f"divergent; excess is the fraction of elements that differ, "
        f"{values.excess:.3g}."
    )
    if values.detail:
        text += " " + values.detail
    if "referee" in arrays:
        text += (
            f" Fraction differing from the referee: candidate "
            f"{values.err_candidate:.3g}, reference {values.err_reference:.3g}."
        )
    return text


def _nonfinite_lines(nonfinite: dict[str, NonFiniteCount]) -> list[str]:
    lines = []
    for side in _SIDES:
        count = nonfinite.get(side)
        if count is None or count.total == 0:
            continue
        parts = []
        for label, number, index in (
            ("NaN", count.nan, count.first_nan),
            ("+inf", count.posinf, count.first_posinf),
            ("-inf", count.neginf, count.first_neginf),
        ):
            if number:
                parts.append(f"{number} {label} (first at {_format_index(index)})")
        lines.append(f"The {side} contains " + ", ".join(parts) + ".")
    return lines


def _assemble_result(
    name: str,
    arrays: dict[str, np.ndarray],
    nonfinite: dict[str, NonFiniteCount],
    values: _Values,
    message: str,
) -> TensorComparison:
    c, r = arrays["candidate"], arrays["reference"]
    return TensorComparison(
        name=name,
        verdict=values.verdict,
        excess=values.excess,
        err_candidate=values.err_candidate,
        err_reference=values.err_reference,
        floor=values.floor,
        excess_rms=values.excess_rms,
        excess_max=values.excess_max,
        max_abs_diff=values.max_abs_diff,
        max_abs_index=values.max_abs_index,
        max_rel_diff=values.max_rel_diff,
        max_rel_index=values.max_rel_index,
        mismatched=values.mismatched,
        compared=values.compared,
        shape=tuple(c.shape),
        reference_shape=tuple(r.shape),
        dtype=_dtype_name(c.dtype),
        reference_dtype=_dtype_name(r.dtype),
        referee_dtype=_dtype_name(arrays["referee"].dtype)
        if "referee" in arrays
        else None,
        nonfinite=nonfinite,
        message=message,
    )


# Helpers.


def _dtype_kind(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "integer"
    return "float"


def _is_floating(dtype: np.dtype) -> bool:
    """Return True for numpy floats and the ml_dtypes floats such as bfloat16."""
    if dtype.kind == "f":
        return True
    if dtype.kind != "V":
        return False
    try:
        np.finfo(dtype)
    except ValueError:
        return False
    return True


def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype)


def _equal_or_both_nan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _rms(values: np.ndarray) -> float:
    """Return the root mean square, scaled first so that squares cannot overflow."""
    if values.size == 0:
        return 0.0
    largest = float(np.abs(values).max())
    if largest == 0.0:
        return 0.0
    return largest * math.sqrt(float(np.mean(np.square(values / largest))))


def _ratio(numerator: float, denominator: float) -> float:
    if numerator == 0.0:
        return 0.0
    if denominator == 0.0:
        return math.inf
    return numerator / denominator


def _first_index(mask: np.ndarray) -> tuple[int, ...] | None:
    if not mask.any():
        return None
    return _unravel(int(np.argmax(mask)), mask.shape)


def _unravel(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat_index, shape))


def _format_index(index: tuple[int, ...] | None) -> str:
    if index is None:
        return "none"
    return (
        "(" + ", ".join(str(i) for i in index) + ("," if len(index) == 1 else "") + ")"
    )


def _count_noun(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    return value
