"""Tests of the .parity trace file: round trips, validation and hostile files."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import uuid
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parity.trace as trace_module
from parity.errors import ParityError
from parity.trace import (
    FORMAT_VERSION,
    TRACE_SUFFIX,
    Trace,
    TraceError,
    read_trace,
    write_trace,
)

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

# The file format as the module docstring specifies it. Tests spell it out rather
# than import private names, so that a change to the format fails here.
DOCUMENT_KEY = "parity.trace"
CHECKSUM_KEY = "parity.trace.crc32"

FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def sample_meta() -> dict[str, Any]:
    return {
        "scenario": "circles-2-12-8-1",
        "configuration": "tensorflow:cpu:graph:float32",
        "seeds": [0, 1, 2],
        "losses": [0.69, 0.5, float("nan"), float("inf"), float("-inf")],
        "environment": {
            "TF_ENABLE_ONEDNN_OPTS": "0",
            "threads": 4,
            "nested": [[1], []],
        },
        "learning_rate": np.float32(0.001),
        "steps": np.int64(3),
        "shuffle": np.bool_(False),
        "note": None,
        "unicode": "réseau ✓",
    }


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": rng.standard_normal((3, 4)).astype(np.float32),
        "dense/bias": np.zeros(4, dtype=np.float32),
        "mask": np.array([True, False, True]),
        "step": np.array(7, dtype=np.int64),
        "predictions": rng.standard_normal((5, 2)),
        "empty": np.zeros((0, 3), dtype=np.float16),
    }


def assert_meta_equal(actual: Any, expected: Any) -> None:
    """Compare JSON-like values, with NaN equal to NaN and NumPy scalars as numbers."""
    if isinstance(expected, np.generic):
        expected = expected.item()
    if isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict)
        assert list(actual) == list(expected)
        for key in expected:
            assert_meta_equal(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, list)
        assert len(actual) == len(expected)
        for actual_item, expected_item in zip(actual, expected, strict=True):
            assert_meta_equal(actual_item, expected_item)
    else:
        assert type(actual) is type(expected)
        assert actual == expected


def assert_trace_matches(
    trace: Trace, meta: dict, tensors: dict[str, np.ndarray]
) -> None:
    assert trace.format_version == FORMAT_VERSION
    assert_meta_equal(trace.meta, meta)
    assert trace.tensor_names() == list(tensors)
    for name, expected in tensors.items():
        info = trace.tensor_info(name)
        assert info.shape == expected.shape
        assert info.dtype == expected.dtype.newbyteorder("=")
        assert info.nbytes == expected.nbytes
        actual = trace.tensor(name)
        assert actual.shape == expected.shape
        assert actual.dtype == info.dtype
        np.testing.assert_array_equal(actual, expected)


def read_everything(url: str, **limits: int) -> None:
    """Open a trace and read every tensor whole and in chunks."""
    with read_trace(url, **limits) as trace:
        for name in trace.tensor_names():
            trace.tensor(name)
            for _ in trace.iter_chunks(name, 3):
                pass


@pytest.fixture
def memory_url():
    """A fresh memory:// URL, removed after the test."""
    directory = f"memory://parity-tests/{uuid.uuid4().hex}"
    yield f"{directory}/run{TRACE_SUFFIX}"
    filesystem = fsspec.filesystem("memory")
    if filesystem.exists(directory):
        filesystem.rm(directory, recursive=True)


def trace_bytes(meta: dict | None = None, tensors: dict | None = None) -> bytes:
    url = f"memory://parity-tests/{uuid.uuid4().hex}{TRACE_SUFFIX}"
    write_trace(
        url, sample_meta() if meta is None else meta, tensors or sample_tensors()
    )
    filesystem = fsspec.filesystem("memory")
    data = filesystem.cat(url)
    filesystem.rm(url)
    return data


# ---------------------------------------------------------------------------
# Crafting files: split a valid trace, edit it, and join it with valid checksums


@dataclass
class TraceParts:
    header: dict[str, Any]
    document: dict[str, Any]
    data: bytearray


def split_trace(data: bytes) -> TraceParts:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    document = json.loads(header["__metadata__"][DOCUMENT_KEY])
    return TraceParts(header, document, bytearray(data[8 + length :]))


def join_header(header_text: str, data: bytes) -> bytes:
    encoded = header_text.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded + bytes(data)


def join_trace(parts: TraceParts, *, document_text: str | None = None) -> bytes:
    """Serialize edited parts, with the document's CRC-32 recomputed."""
    if document_text is None:
        document_text = json.dumps(parts.document)
    metadata = parts.header.setdefault("__metadata__", {})
    metadata[DOCUMENT_KEY] = document_text
    metadata[CHECKSUM_KEY] = str(zlib.crc32(document_text.encode("utf-8")))
    return join_header(json.dumps(parts.header), parts.data)


def set_tensor_crc(parts: TraceParts, name: str) -> None:
    start, stop = parts.header[name]["data_offsets"]
    parts.document["tensors"][name]["crc32"] = zlib.crc32(parts.data[start:stop])


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Round trips


def test_round_trip_local(tmp_path):
    path = tmp_path / f"run{TRACE_SUFFIX}"
    meta, tensors = sample_meta(), sample_tensors()

    write_trace(path, meta, tensors)

    with read_trace(path) as trace:
        assert_trace_matches(trace, meta, tensors)
    assert os.listdir(tmp_path) == [path.name]


def test_round_trip_file_url(tmp_path):
    url = (tmp_path / f"run{TRACE_SUFFIX}").as_uri()
    meta, tensors = sample_meta(), sample_tensors()

    write_trace(url, meta, tensors)

    with read_trace(url) as trace:
        assert_trace_matches(trace, meta, tensors)


def test_round_trip_memory(memory_url):
    meta, tensors = sample_meta(), sample_tensors()

    write_trace(memory_url, meta, tensors)

    with read_trace(memory_url) as trace:
        assert_trace_matches(trace, meta, tensors)
    leftovers = fsspec.filesystem("memory").ls(
        memory_url.rsplit("/", 1)[0], detail=False
    )
    assert [path.rsplit("/", 1)[1] for path in leftovers] == [f"run{TRACE_SUFFIX}"]


def test_round_trip_empty_trace(memory_url):
    write_trace(memory_url, {}, {})

    with read_trace(memory_url) as trace:
        assert trace.meta == {}
        assert trace.tensor_names() == []


DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: np.dtype(dtype).name)
def test_round_trip_each_dtype(memory_url, dtype):
    values = np.arange(-6, 6).reshape(3, 4)
    tensors = {
        "values": values.astype(dtype),
        "extremes": np.array([np.iinfo(dtype).min, np.iinfo(dtype).max], dtype=dtype)
        if np.issubdtype(dtype, np.integer)
        else values.astype(dtype)[:1],
    }
    if np.issubdtype(dtype, np.floating):
        special = [
            np.nan,
            np.inf,
            -np.inf,
            -0.0,
            np.finfo(dtype).tiny,
            np.finfo(dtype).max,
        ]
        tensors["special"] = np.array(special, dtype=dtype)

    write_trace(memory_url, {}, tensors)

    with read_trace(memory_url) as trace:
        for name, expected in tensors.items():
            actual = trace.tensor(name)
            assert actual.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(actual, expected)
            assert actual.tobytes() == expected.tobytes()


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
def test_round_trip_bfloat16(memory_url):
    bfloat16 = np.dtype(ml_dtypes.bfloat16)
    expected = np.array([[1.0, -2.5, np.nan], [np.inf, 0.0, 3e38]], dtype=bfloat16)

    write_trace(memory_url, {}, {"kernel": expected})

    with read_trace(memory_url) as trace:
        assert trace.tensor_info("kernel").dtype == bfloat16
        actual = trace.tensor("kernel")
        assert actual.dtype == bfloat16
        assert actual.tobytes() == expected.tobytes()


def test_bfloat16_needs_ml_dtypes(memory_url, monkeypatch):
    if ml_dtypes is None:
        pytest.skip("writing bfloat16 needs ml_dtypes")
    write_trace(memory_url, {}, {"kernel": np.ones(2, dtype=ml_dtypes.bfloat16)})
    monkeypatch.setattr(trace_module, "_bfloat16", lambda: None)

    with pytest.raises(TraceError, match="pip install ml-dtypes"):
        read_trace(memory_url)
    # Without ml_dtypes, float64 must still be stored as F64 and not taken for BF16.
    write_trace(memory_url, {}, {"kernel": np.ones(2, dtype=np.float64)})
    with read_trace(memory_url) as trace:
        assert trace.tensor("kernel").dtype == np.float64


def test_big_endian_and_strided_inputs(memory_url):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    tensors = {
        "big_endian": base.astype(">f8"),
        "transposed": base.T,
        "strided": base[::2, ::3],
        "big_endian_int": np.arange(5, dtype=">i4"),
    }

    write_trace(memory_url, {}, tensors)

    with read_trace(memory_url) as trace:
        for name, expected in tensors.items():
            actual = trace.tensor(name)
            assert actual.dtype == expected.dtype.newbyteorder("=")
            np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4), ()])
def test_zero_size_and_scalar(memory_url, shape):
    expected = np.full(shape, 1.5, dtype=np.float32)

    write_trace(
        memory_url, {}, {"before": np.ones(2), "tensor": expected, "after": np.ones(1)}
    )

    with read_trace(memory_url) as trace:
        info = trace.tensor_info("tensor")
        assert info.shape == shape
        assert info.nbytes == expected.nbytes
        actual = trace.tensor("tensor")
        assert actual.shape == shape
        np.testing.assert_array_equal(actual, expected)
        np.testing.assert_array_equal(trace.tensor("after"), np.ones(1))


def test_tensor_is_writable(memory_url):
    write_trace(memory_url, {}, {"kernel": np.zeros((2, 2))})

    with read_trace(memory_url) as trace:
        kernel = trace.tensor("kernel")
        kernel[0, 0] = 1.0
        assert kernel[0, 0] == 1.0


def test_meta_float_tag_round_trip(memory_url):
    meta = {
        "values": [float("nan"), 1e308, -0.0, 5e-324],
        "nested": {"x": [float("-inf")]},
    }

    write_trace(memory_url, meta, {})

    with read_trace(memory_url) as trace:
        assert_meta_equal(trace.meta, meta)
        assert math.copysign(1.0, trace.meta["values"][2]) == -1.0


def test_readable_by_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load

    path = tmp_path / f"run{TRACE_SUFFIX}"
    tensors = sample_tensors()
    write_trace(path, sample_meta(), tensors)

    loaded = load(path.read_bytes())
    assert set(loaded) == set(tensors)
    for name, expected in tensors.items():
        np.testing.assert_array_equal(loaded[name], expected)
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    assert set(metadata) == {DOCUMENT_KEY, CHECKSUM_KEY}
    assert json.loads(metadata[DOCUMENT_KEY])["format_version"] == FORMAT_VERSION


def test_data_starts_aligned(memory_url):
    write_trace(memory_url, {"odd": "x"}, {"a": np.ones(3, dtype=np.int8)})

    (length,) = struct.unpack("<Q", fsspec.filesystem("memory").cat(memory_url)[:8])
    assert (8 + length) % 8 == 0


# ---------------------------------------------------------------------------
# Chunked reads


@pytest.mark.parametrize("chunk_elements", [1, 5, 6, 7, 29, 60, 1000])
def test_iter_chunks_matches_tensor(memory_url, chunk_elements):
    expected = np.arange(60, dtype=np.float32).reshape(10, 3, 2)
    write_trace(memory_url, {}, {"head": np.ones(3), "kernel": expected})

    with read_trace(memory_url) as trace:
        chunks = list(trace.iter_chunks("kernel", chunk_elements))

    assert all(chunk.size <= max(chunk_elements, 6) for chunk in chunks)
    assert all(chunk.shape[1:] == (3, 2) for chunk in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), expected)


@pytest.mark.parametrize("shape", [(), (0,), (0, 4), (4, 0), (1,), (7,)])
def test_iter_chunks_edge_shapes(memory_url, shape):
    expected = np.arange(math.prod(shape), dtype=np.int16).reshape(shape)
    write_trace(memory_url, {}, {"tensor": expected})

    with read_trace(memory_url) as trace:
        chunks = list(trace.iter_chunks("tensor", 2))

    assert len(chunks) >= 1
    if shape == ():
        assert len(chunks) == 1
        np.testing.assert_array_equal(chunks[0], expected)
    else:
        rebuilt = np.concatenate(chunks)
        assert rebuilt.shape == shape
        np.testing.assert_array_equal(rebuilt, expected)


def test_iter_chunks_reads_bounded_ranges(memory_url, monkeypatch):
    expected = np.arange(4000, dtype=np.float64).reshape(1000, 4)
    write_trace(memory_url, {}, {"kernel": expected})
    read_sizes = []
    original_readinto = MemoryFile.readinto

    def recording_readinto(self, buffer):
        read_sizes.append(len(buffer))
        return original_readinto(self, buffer)

    with read_trace(memory_url) as trace:
        monkeypatch.setattr(MemoryFile, "readinto", recording_readinto, raising=False)
        total = sum(chunk.sum() for chunk in trace.iter_chunks("kernel", 40))

    assert total == expected.sum()
    assert read_sizes
    assert max(read_sizes) == 40 * 8


def test_iter_chunks_detects_damage(memory_url):
    write_trace(
        memory_url, {}, {"kernel": np.arange(20, dtype=np.float32).reshape(10, 2)}
    )
    filesystem = fsspec.filesystem("memory")
    data = bytearray(filesystem.cat(memory_url))
    data[-1] ^= 0x01
    filesystem.pipe(memory_url, bytes(data))

    with read_trace(memory_url) as trace:
        chunks = trace.iter_chunks("kernel", 4)
        next(chunks)
        with pytest.raises(TraceError, match="'kernel' does not match its CRC-32"):
            list(chunks)


@pytest.mark.parametrize("chunk_elements", [0, -1, 1.5, True, "4"])
def test_iter_chunks_rejects_bad_size(memory_url, chunk_elements):
    write_trace(memory_url, {}, {"kernel": np.ones((2, 2))})

    with read_trace(memory_url) as trace:
        with pytest.raises(ValueError, match="chunk_elements"):
            trace.iter_chunks("kernel", chunk_elements)


# ---------------------------------------------------------------------------
# The Trace object


def test_unknown_tensor_name(memory_url):
    write_trace(memory_url, {}, {"kernel": np.ones(2)})

    with read_trace(memory_url) as trace:
        with pytest.raises(ValueError, match="no tensor named 'bias'.*'kernel'"):
            trace.tensor("bias")
        with pytest.raises(ValueError, match="no tensor named 'bias'"):
            trace.tensor_info("bias")


def test_closed_trace_rejects_reads(memory_url):
    write_trace(memory_url, {"step": 1}, {"kernel": np.ones(2)})

    with read_trace(memory_url) as trace:
        pass

    assert trace.closed
    assert trace.meta == {"step": 1}
    assert trace.tensor_info("kernel").shape == (2,)
    with pytest.raises(ValueError, match="is closed"):
        trace.tensor("kernel")
    with pytest.raises(ValueError, match="is closed"):
        list(trace.iter_chunks("kernel", 1))
    trace.close()


def test_trace_repr_names_file(memory_url):
    write_trace(memory_url, {}, {"kernel": np.ones(2)})

    with read_trace(memory_url) as trace:
        assert memory_url in repr(trace)
        assert trace.url == memory_url


def test_trace_error_is_parity_error():
    assert issubclass(TraceError, ParityError)


def test_unknown_keys_ignored(memory_url):
    parts = split_trace(trace_bytes())
    parts.header["__metadata__"]["written_by"] = "a future parity"
    parts.document["future_field"] = {"anything": [1, 2]}
    parts.document["tensors"]["mask"]["future_field"] = 3
    parts.header["mask"]["future_field"] = "x"
    fsspec.filesystem("memory").pipe(memory_url, join_trace(parts))

    with read_trace(memory_url) as trace:
        assert_trace_matches(trace, sample_meta(), sample_tensors())


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / f"missing{TRACE_SUFFIX}")


@pytest.mark.parametrize(
    "argument", ["max_tensor_bytes", "max_total_bytes", "max_tensors", "max_meta_bytes"]
)
@pytest.mark.parametrize("value", [-1, 1.5, None, True])
def test_limit_arguments_validated(memory_url, argument, value):
    write_trace(memory_url, {}, {})

    with pytest.raises(ValueError, match=argument):
        read_trace(memory_url, **{argument: value})


# ---------------------------------------------------------------------------
# Writing: validation and atomicity


def test_write_creates_no_file_on_bad_meta(tmp_path):
    path = tmp_path / f"run{TRACE_SUFFIX}"

    with pytest.raises(ValueError, match=r"meta\['callback'\] is a function"):
        write_trace(path, {"callback": lambda: None}, sample_tensors())

    assert os.listdir(tmp_path) == []


def test_write_keeps_old_file_on_bad_tensor(tmp_path):
    path = tmp_path / f"run{TRACE_SUFFIX}"
    write_trace(path, {"version": "old"}, {"kernel": np.ones(2)})
    old_bytes = path.read_bytes()

    with pytest.raises(ValueError, match="tensor 'objects' has dtype object"):
        write_trace(
            path, {"version": "new"}, {"a": np.ones(2), "objects": np.array([{}])}
        )

    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == [path.name]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / f"run{TRACE_SUFFIX}"
    write_trace(path, {"version": "old"}, {"kernel": np.ones(2)})
    old_bytes = path.read_bytes()

    def failing_fsync(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_trace(path, {"version": "new"}, {"kernel": np.zeros(1000)})

    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == [path.name]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / f"run{TRACE_SUFFIX}"
    calls = []
    original = trace_module._iter_byte_chunks

    def interrupting_chunks(array):
        calls.append(array.shape)
        if len(calls) > 2:
            raise KeyboardInterrupt
        yield from original(array)

    monkeypatch.setattr(trace_module, "_iter_byte_chunks", interrupting_chunks)
    with pytest.raises(KeyboardInterrupt):
        write_trace(path, {}, {"kernel": np.ones(3), "bias": np.ones(2)})

    assert os.listdir(tmp_path) == []


def test_write_missing_directory(tmp_path):
    path = tmp_path / "absent" / f"run{TRACE_SUFFIX}"

    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_trace(path, {}, {})


def test_memory_write_without_move(memory_url, monkeypatch):
    def unsupported_move(self, *args, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(MemoryFileSystem, "mv", unsupported_move)
    write_trace(memory_url, {"step": 1}, {"kernel": np.ones(2)})

    with read_trace(memory_url) as trace:
        assert trace.meta == {"step": 1}
    directory = memory_url.rsplit("/", 1)[0]
    assert len(fsspec.filesystem("memory").ls(directory)) == 1


def test_direct_write_failure_cleans_up(memory_url, monkeypatch):
    def unsupported_move(self, *args, **kwargs):
        raise NotImplementedError

    writes = []
    original = trace_module._write_tensor_file

    def failing_second_write(file, header, prepared):
        writes.append(file)
        if len(writes) == 2:
            file.write(header)
            raise OSError("connection reset")
        original(file, header, prepared)

    monkeypatch.setattr(MemoryFileSystem, "mv", unsupported_move)
    monkeypatch.setattr(trace_module, "_write_tensor_file", failing_second_write)
    with pytest.raises(OSError, match="connection reset"):
        write_trace(memory_url, {}, {"kernel": np.ones(2)})

    assert len(writes) == 2
    directory = memory_url.rsplit("/", 1)[0]
    filesystem = fsspec.filesystem("memory")
    assert not filesystem.exists(directory) or filesystem.ls(directory) == []


def test_memory_write_replaces_old(memory_url):
    write_trace(memory_url, {"version": "old"}, {"kernel": np.ones(2)})
    write_trace(memory_url, {"version": "new"}, {"bias": np.zeros(3)})

    with read_trace(memory_url) as trace:
        assert trace.meta == {"version": "new"}
        assert trace.tensor_names() == ["bias"]


def test_memory_write_failure_cleans_up(memory_url, monkeypatch):
    def failing_move(self, *args, **kwargs):
        raise OSError("move failed")

    monkeypatch.setattr(MemoryFileSystem, "mv", failing_move)
    with pytest.raises(OSError, match="move failed"):
        write_trace(memory_url, {}, {"kernel": np.ones(2)})

    directory = memory_url.rsplit("/", 1)[0]
    filesystem = fsspec.filesystem("memory")
    assert not filesystem.exists(directory) or filesystem.ls(directory) == []


class Unserializable:
    pass


cycle: list[Any] = []
cycle.append(cycle)

BAD_META = [
    pytest.param([1, 2], "meta must be a mapping", id="not a mapping"),
    pytest.param({1: "a"}, "key 1 of type int", id="int key"),
    pytest.param(
        {"a": {"$float": "nan"}}, r"uses the key '\$float'", id="reserved key"
    ),
    pytest.param({"a": {1, 2}}, r"meta\['a'\] is a set", id="set value"),
    pytest.param({"a": np.ones(2)}, "is a ndarray", id="array value"),
    pytest.param({"a": Unserializable()}, "is a Unserializable", id="custom object"),
    pytest.param({"a": b"bytes"}, "is a bytes", id="bytes value"),
    pytest.param({"a": 1 + 2j}, "is a complex", id="complex value"),
    pytest.param({"a": np.longdouble(1)}, "is a longdouble", id="long double"),
    pytest.param({"a": "\ud800"}, "lone surrogate", id="lone surrogate"),
    pytest.param({"\udc00": 1}, "lone surrogate", id="surrogate key"),
    pytest.param({"a": cycle}, "reference cycle", id="reference cycle"),
]


@pytest.mark.parametrize("meta, message", BAD_META)
def test_write_rejects_bad_meta(tmp_path, meta, message):
    path = tmp_path / f"run{TRACE_SUFFIX}"

    with pytest.raises(ValueError, match=message) as excinfo:
        write_trace(path, meta, {"kernel": np.ones(2)})

    assert str(path) in str(excinfo.value)
    assert os.listdir(tmp_path) == []


BAD_TENSORS = [
    pytest.param({"": np.ones(1)}, "is empty", id="empty name"),
    pytest.param({"a\0b": np.ones(1)}, "NUL", id="nul in name"),
    pytest.param({"x" * 257: np.ones(1)}, "257 characters", id="long name"),
    pytest.param({"__metadata__": np.ones(1)}, "reserved", id="reserved name"),
    pytest.param({"\ud800": np.ones(1)}, "lone surrogate", id="surrogate name"),
    pytest.param({1: np.ones(1)}, "is a int", id="int name"),
    pytest.param({"a": [1.0, 2.0]}, "not a numpy.ndarray", id="list tensor"),
    pytest.param({"a": np.float32(1)}, "not a numpy.ndarray", id="numpy scalar"),
    pytest.param({"a": np.array(["text"])}, "dtype <U4", id="string dtype"),
    pytest.param(
        {"a": np.ones(2, np.complex64)}, "dtype complex64", id="complex dtype"
    ),
    pytest.param({"a": np.array([None])}, "dtype object", id="object dtype"),
    pytest.param({"a": np.ones(2, np.longdouble)}, "dtype float128", id="long double"),
    pytest.param({"a": np.zeros(2, "i4,f4")}, "dtype", id="structured dtype"),
    pytest.param({"a": np.zeros(2, "M8[s]")}, "datetime64", id="datetime dtype"),
    pytest.param({"a": np.zeros((1,) * 33)}, "33 dimensions", id="too many dims"),
]


@pytest.mark.parametrize("tensors, message", BAD_TENSORS)
def test_write_rejects_bad_tensor(tmp_path, tensors, message):
    path = tmp_path / f"run{TRACE_SUFFIX}"

    with pytest.raises(ValueError, match=message):
        write_trace(path, {}, tensors)

    assert os.listdir(tmp_path) == []


def test_write_rejects_non_mapping_tensors(tmp_path):
    with pytest.raises(ValueError, match="tensors must be a mapping"):
        write_trace(tmp_path / f"run{TRACE_SUFFIX}", {}, [np.ones(2)])


def test_write_rejects_huge_header(tmp_path, monkeypatch):
    monkeypatch.setattr(trace_module, "DEFAULT_MAX_META_BYTES", 1000)

    with pytest.raises(ValueError, match="header would be .* bytes"):
        write_trace(tmp_path / f"run{TRACE_SUFFIX}", {"losses": [0.5] * 1000}, {})

    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Versions and hostile files


def test_newer_version_rejected(memory_url):
    parts = split_trace(trace_bytes())
    parts.document["format_version"] = FORMAT_VERSION + 1
    parts.document["meta"] = "a layout this reader does not know"
    fsspec.filesystem("memory").pipe(memory_url, join_trace(parts))

    with pytest.raises(TraceError) as excinfo:
        read_trace(memory_url)

    message = str(excinfo.value)
    assert f"format_version {FORMAT_VERSION + 1}" in message
    assert f"1 to {FORMAT_VERSION}" in message
    assert "Upgrade parity" in message
    assert memory_url in message


def test_newer_version_without_checksum(memory_url):
    parts = split_trace(trace_bytes())
    parts.document["format_version"] = FORMAT_VERSION + 1
    data = join_trace(parts)
    parts = split_trace(data)
    del parts.header["__metadata__"][CHECKSUM_KEY]
    fsspec.filesystem("memory").pipe(
        memory_url, join_header(json.dumps(parts.header), parts.data)
    )

    with pytest.raises(TraceError, match=f"format_version {FORMAT_VERSION + 1}"):
        read_trace(memory_url)


def edit_parts(edit: Callable[[TraceParts], None]) -> Callable[[bytes], bytes]:
    """Return a maker that applies ``edit`` to a valid trace and fixes the checksum."""

    def make(valid: bytes) -> bytes:
        parts = split_trace(valid)
        edit(parts)
        return join_trace(parts)

    return make


def edit_entry(name: str, **fields: Any) -> Callable[[bytes], bytes]:
    """Return a maker that changes header fields of one tensor, in the document too."""

    def edit(parts: TraceParts) -> None:
        parts.header[name].update(fields)
        listed = parts.document["tensors"][name]
        listed.update({key: value for key, value in fields.items() if key in listed})

    return edit_parts(edit)


def constant(data: bytes) -> Callable[[bytes], bytes]:
    return lambda valid: data


def header_only(text: str | bytes) -> Callable[[bytes], bytes]:
    encoded = text.encode("utf-8") if isinstance(text, str) else text
    return constant(struct.pack("<Q", len(encoded)) + encoded)


def duplicate_tensor_name(valid: bytes) -> bytes:
    parts = split_trace(valid)
    text = json.dumps(parts.header)
    copy = json.dumps(parts.header["dense/bias"])
    return join_header(text[:-1] + f', "dense/bias": {copy}}}', parts.data)


def duplicate_meta_key(valid: bytes) -> bytes:
    parts = split_trace(valid)
    text = json.dumps(parts.document).replace(
        '"meta": {', '"meta": {"a": 1, "a": 2, ', 1
    )
    return join_trace(parts, document_text=text)


def flip_data_byte(valid: bytes) -> bytes:
    data = bytearray(valid)
    data[-30] ^= 0x10
    return bytes(data)


def bool_byte_two(parts: TraceParts) -> None:
    start, _ = parts.header["mask"]["data_offsets"]
    parts.data[start] = 2
    set_tensor_crc(parts, "mask")


def overlapping_offsets(parts: TraceParts) -> None:
    start, stop = parts.header["dense/bias"]["data_offsets"]
    parts.header["dense/bias"]["data_offsets"] = [start - 4, stop - 4]


def gap_before_tensor(parts: TraceParts) -> None:
    for name, entry in parts.header.items():
        if name != "__metadata__" and name != "dense/kernel":
            entry["data_offsets"] = [offset + 4 for offset in entry["data_offsets"]]
    kernel_stop = parts.header["dense/kernel"]["data_offsets"][1]
    parts.data[kernel_stop:kernel_stop] = b"\0" * 4


def terabyte_tensor(parts: TraceParts) -> None:
    # "empty" is the last tensor, a float16 array of shape (0, 3).
    start, _ = parts.header["empty"]["data_offsets"]
    rows = 2**39
    parts.header["empty"].update(
        shape=[rows, 1], data_offsets=[start, start + rows * 2]
    )
    parts.document["tensors"]["empty"]["shape"] = [rows, 1]


def rename_tensor(new_name: str) -> Callable[[TraceParts], None]:
    def edit(parts: TraceParts) -> None:
        parts.header[new_name] = parts.header.pop("mask")
        parts.document["tensors"][new_name] = parts.document["tensors"].pop("mask")

    return edit


def set_document(**fields: Any) -> Callable[[TraceParts], None]:
    return lambda parts: parts.document.update(fields)


def drop_document(valid: bytes) -> bytes:
    parts = split_trace(valid)
    del parts.header["__metadata__"][DOCUMENT_KEY]
    return join_header(json.dumps(parts.header), parts.data)


def drop_checksum(valid: bytes) -> bytes:
    parts = split_trace(valid)
    del parts.header["__metadata__"][CHECKSUM_KEY]
    return join_header(json.dumps(parts.header), parts.data)


def set_checksum(value: Any) -> Callable[[bytes], bytes]:
    def make(valid: bytes) -> bytes:
        parts = split_trace(valid)
        parts.header["__metadata__"][CHECKSUM_KEY] = value
        return join_header(json.dumps(parts.header), parts.data)

    return make


def edit_without_checksum(valid: bytes) -> bytes:
    parts = split_trace(valid)
    document = json.loads(parts.header["__metadata__"][DOCUMENT_KEY])
    document["meta"]["steps"] = 4
    parts.header["__metadata__"][DOCUMENT_KEY] = json.dumps(document)
    return join_header(json.dumps(parts.header), parts.data)


def plain_safetensors(valid: bytes) -> bytes:
    from safetensors.numpy import save

    return save({"kernel": np.ones((2, 2), dtype=np.float32)})


def npy_with_objects(valid: bytes) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


HOSTILE_FILES = [
    pytest.param(constant(b""), "fewer than the 8-byte header length", id="empty file"),
    pytest.param(constant(b"12345"), "fewer than the 8-byte", id="five bytes"),
    pytest.param(lambda valid: valid[:20], "header length is", id="truncated header"),
    pytest.param(lambda valid: valid[:-1], "truncated", id="truncated data"),
    pytest.param(
        lambda valid: valid + b"\0" * 8, "8 bytes after the last", id="trailing bytes"
    ),
    pytest.param(constant(b"\xff" * 64), "header length is", id="random bytes"),
    pytest.param(
        constant(b"format_version = 1\nmeta = {}\n" * 4),
        "header length is",
        id="text file",
    ),
    pytest.param(
        constant(pickle.dumps({"kernel": [1.0, 2.0]}, protocol=4)),
        "Python pickle",
        id="pickle",
    ),
    pytest.param(npy_with_objects, "NumPy .npy file", id="npy object dtype"),
    pytest.param(
        constant(zip_bytes({"meta.json": b"{}", "tensors.pkl": pickle.dumps([1])})),
        "ZIP archive",
        id="zip with pickle member",
    ),
    pytest.param(
        constant(zip_bytes({"../escape.json": b"{}", "/etc/absolute": b"x"})),
        "ZIP archive",
        id="zip with escaping paths",
    ),
    pytest.param(
        constant(zip_bytes({"bomb.bin": bytes(20 * 2**20)})),
        "ZIP archive",
        id="zip bomb",
    ),
    pytest.param(
        constant(b"\x89HDF\r\n\x1a\n" + bytes(64)), "HDF5 file", id="hdf5 file"
    ),
    pytest.param(
        header_only("[1, 2]"), "does not start with '{'", id="header is array"
    ),
    pytest.param(header_only('{"a": '), "not valid JSON", id="header cut off"),
    pytest.param(header_only(b'{"\xff": 1}'), "not valid JSON", id="header not utf-8"),
    pytest.param(header_only('{"a": NaN}'), "NaN is not valid JSON", id="nan literal"),
    pytest.param(
        header_only('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "not valid JSON",
        id="deep nesting",
    ),
    pytest.param(
        header_only('{"a": ' + "9" * 5000 + "}"), "not valid JSON", id="huge integer"
    ),
    pytest.param(header_only("{}"), "not a parity trace", id="empty header"),
    pytest.param(
        plain_safetensors, "safetensors file but not a parity trace", id="safetensors"
    ),
    pytest.param(
        duplicate_tensor_name,
        "'dense/bias' appears more than once",
        id="duplicate tensor",
    ),
    pytest.param(
        duplicate_meta_key, "'a' appears more than once", id="duplicate meta key"
    ),
    pytest.param(drop_document, "has no 'parity.trace' entry", id="document missing"),
    pytest.param(
        set_checksum("0x1234"), "does not match its CRC-32", id="checksum not decimal"
    ),
    pytest.param(
        set_checksum(12345), "does not match its CRC-32", id="checksum not string"
    ),
    pytest.param(
        drop_checksum, "'parity.trace.crc32' entry is missing", id="checksum missing"
    ),
    pytest.param(edit_without_checksum, "does not match its CRC-32", id="meta edited"),
    pytest.param(
        edit_parts(set_document(format_version="1")),
        "format_version is the string '1'",
        id="version string",
    ),
    pytest.param(
        edit_parts(set_document(format_version=True)),
        "format_version is True",
        id="version bool",
    ),
    pytest.param(
        edit_parts(set_document(format_version=0)),
        "format_version is 0",
        id="version 0",
    ),
    pytest.param(
        edit_parts(set_document(format_version=1.0)),
        "format_version is 1.0",
        id="version float",
    ),
    pytest.param(
        edit_parts(lambda parts: parts.document.pop("format_version")),
        "format_version is missing",
        id="version missing",
    ),
    pytest.param(
        edit_parts(set_document(format="safetensors")),
        "format is the string 'safetensors'",
        id="wrong format name",
    ),
    pytest.param(
        edit_parts(set_document(meta=[1, 2])),
        "'meta' in the 'parity.trace' document is an array",
        id="meta is array",
    ),
    pytest.param(
        edit_parts(set_document(meta="text")),
        "'meta' .* is the string 'text'",
        id="meta is string",
    ),
    pytest.param(
        edit_parts(lambda parts: parts.document.pop("tensors")),
        "'tensors' .* is missing",
        id="tensor list missing",
    ),
    pytest.param(
        edit_parts(set_document(meta={"x": {"$float": "NaN", "y": 1}})),
        r"key '\$float' must be exactly",
        id="bad float tag",
    ),
    pytest.param(
        edit_parts(lambda parts: parts.header.update(mask=[1, 2])),
        "header entry of tensor 'mask' is an array",
        id="entry not object",
    ),
    pytest.param(edit_entry("mask", dtype="O"), "dtype 'O'", id="object dtype code"),
    pytest.param(
        edit_entry("mask", dtype="C64"), "dtype 'C64'", id="complex dtype code"
    ),
    pytest.param(
        edit_entry("mask", dtype="float32"), "dtype 'float32'", id="numpy dtype name"
    ),
    pytest.param(
        edit_entry("mask", dtype=4),
        "dtype of tensor 'mask' is 4",
        id="dtype not string",
    ),
    pytest.param(
        edit_parts(lambda parts: parts.header["mask"].pop("dtype")),
        "dtype of tensor 'mask' is missing",
        id="dtype missing",
    ),
    pytest.param(
        edit_entry("mask", shape=[-3]), "shape of tensor 'mask'", id="negative dim"
    ),
    pytest.param(
        edit_entry("mask", shape=[3.0]), "shape of tensor 'mask'", id="float dim"
    ),
    pytest.param(
        edit_entry("mask", shape=[True] * 3), "shape of tensor", id="bool dims"
    ),
    pytest.param(
        edit_entry("mask", shape="3"), "shape of tensor 'mask'", id="shape string"
    ),
    pytest.param(edit_entry("mask", shape=[1] * 33), "at most 32", id="too many dims"),
    pytest.param(
        edit_entry("mask", shape=[4]), "take 4 bytes", id="shape size mismatch"
    ),
    pytest.param(
        edit_entry("mask", data_offsets=[5, 1]),
        "not \\[begin, end\\]",
        id="offsets reversed",
    ),
    pytest.param(
        edit_entry("mask", data_offsets=[0, 1, 2]),
        "not \\[begin, end\\]",
        id="three offsets",
    ),
    pytest.param(
        edit_entry("mask", data_offsets=None), "data_offsets", id="offsets null"
    ),
    pytest.param(
        edit_parts(overlapping_offsets), "overlaps the tensor before", id="overlap"
    ),
    pytest.param(edit_parts(gap_before_tensor), "belong to no tensor", id="gap"),
    pytest.param(edit_parts(terabyte_tensor), "truncated", id="terabyte tensor"),
    pytest.param(
        edit_parts(lambda parts: parts.document["tensors"].pop("mask")),
        "does not list tensor 'mask'",
        id="tensor not listed",
    ),
    pytest.param(
        edit_parts(lambda parts: parts.document["tensors"].update(ghost={})),
        "lists tensor 'ghost'",
        id="listed tensor absent",
    ),
    pytest.param(
        edit_parts(
            lambda parts: parts.document["tensors"]["mask"].update(shape=[1, 3])
        ),
        "in the header but",
        id="listed shape differs",
    ),
    pytest.param(
        edit_parts(lambda parts: parts.document["tensors"]["mask"].update(crc32=-1)),
        "CRC-32 of tensor 'mask' is -1",
        id="negative checksum",
    ),
    pytest.param(
        edit_parts(lambda parts: parts.document["tensors"].update(mask=[1])),
        "record of tensor 'mask' is not an object",
        id="listed tensor array",
    ),
    pytest.param(
        edit_parts(rename_tensor("")), "name '' is empty", id="empty tensor name"
    ),
    pytest.param(
        edit_parts(rename_tensor("a\0b")), "NUL character", id="nul tensor name"
    ),
    pytest.param(
        edit_parts(rename_tensor("n" * 300)), "300 characters", id="long tensor name"
    ),
    pytest.param(
        flip_data_byte, "does not match its CRC-32 checksum", id="data bit flip"
    ),
    pytest.param(
        edit_parts(bool_byte_two), "bytes other than 0 and 1", id="bool byte 2"
    ),
]


@pytest.mark.parametrize("make, message", HOSTILE_FILES)
def test_hostile_file_rejected(tmp_path, make, message):
    path = tmp_path / f"hostile{TRACE_SUFFIX}"
    path.write_bytes(make(trace_bytes()))

    with pytest.raises(TraceError, match=message) as excinfo:
        read_everything(str(path))

    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"max_meta_bytes": 100}, "header, more than the limit max_meta_bytes=100"),
        ({"max_tensors": 2}, "has 6 tensors, more than the limit max_tensors=2"),
        (
            {"max_tensor_bytes": 47},
            "48-byte tensor 'dense/kernel'.*max_tensor_bytes=47",
        ),
        ({"max_total_bytes": 100}, "max_total_bytes=100"),
    ],
    ids=["meta", "count", "tensor", "total"],
)
def test_limits_reject_large_files(memory_url, limits, message):
    fsspec.filesystem("memory").pipe(memory_url, trace_bytes())

    with pytest.raises(TraceError, match=message) as excinfo:
        read_trace(memory_url, **limits)

    assert "call read_trace with a larger" in str(excinfo.value)


def test_limits_at_exact_size(memory_url):
    data = trace_bytes()
    fsspec.filesystem("memory").pipe(memory_url, data)
    (header_length,) = struct.unpack("<Q", data[:8])
    tensors = sample_tensors()
    total = sum(tensor.nbytes for tensor in tensors.values())

    limits = {
        "max_meta_bytes": header_length,
        "max_tensors": len(tensors),
        "max_tensor_bytes": max(tensor.nbytes for tensor in tensors.values()),
        "max_total_bytes": total,
    }
    read_everything(memory_url, **limits)


# ---------------------------------------------------------------------------
# Fuzzing


def small_trace_bytes() -> bytes:
    tensors = {
        "k": np.arange(6, dtype=np.float32).reshape(2, 3),
        "m": np.array([True, False]),
        "i": np.array([-1, 2], dtype=np.int16),
        "e": np.zeros((0, 2), dtype=np.float64),
        "s": np.array(0.5, dtype=np.float16),
    }
    return trace_bytes({"loss": [0.25, float("nan")], "run": "a"}, tensors)


SMALL_TRACE = small_trace_bytes()


def read_or_trace_error(url: str) -> bool:
    """Return whether the trace reads completely. Any error but TraceError fails."""
    try:
        read_everything(url)
    except TraceError:
        return False
    return True


def test_every_bit_flip_detected(memory_url):
    filesystem = fsspec.filesystem("memory")
    undetected = []
    for index in range(len(SMALL_TRACE)):
        for bit in range(8):
            damaged = bytearray(SMALL_TRACE)
            damaged[index] ^= 1 << bit
            filesystem.pipe(memory_url, bytes(damaged))
            if read_or_trace_error(memory_url):
                undetected.append((index, bit))

    assert undetected == []


@st.composite
def mutated_traces(draw: st.DrawFn) -> bytes:
    data = bytearray(SMALL_TRACE)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 16))]
    return bytes(data)


@settings(FUZZ_SETTINGS, max_examples=2500)
@given(data=mutated_traces())
def test_fuzz_byte_mutations(memory_url, data):
    fsspec.filesystem("memory").pipe(memory_url, data)

    read_or_trace_error(memory_url)


# Keys exclude "$float", which write_trace reserves for NaN and infinity.
json_keys = st.text(max_size=8).filter(lambda key: key != "$float")
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(json_keys, children, max_size=4)
    ),
    max_leaves=12,
)

HEADER_PATHS = [
    ("header", "k"),
    ("header", "k", "dtype"),
    ("header", "k", "shape"),
    ("header", "k", "data_offsets"),
    ("header", "e", "shape"),
    ("header", "e", "data_offsets"),
    ("header", "__metadata__"),
    ("document", "format"),
    ("document", "format_version"),
    ("document", "meta"),
    ("document", "meta", "loss"),
    ("document", "tensors"),
    ("document", "tensors", "m"),
    ("document", "tensors", "m", "crc32"),
    ("document", "tensors", "m", "shape"),
]


@settings(FUZZ_SETTINGS, max_examples=1500)
@given(
    path=st.sampled_from(HEADER_PATHS),
    value=json_values,
    fix_checksum=st.booleans(),
)
def test_fuzz_header_values(memory_url, path, value, fix_checksum):
    parts = split_trace(SMALL_TRACE)
    if path[0] == "document":
        set_nested(parts.document, path[1:], value)
    metadata = parts.header["__metadata__"]
    metadata[DOCUMENT_KEY] = json.dumps(parts.document)
    if fix_checksum:
        metadata[CHECKSUM_KEY] = str(zlib.crc32(metadata[DOCUMENT_KEY].encode("utf-8")))
    if path[0] == "header":
        set_nested(parts.header, path[1:], value)
    fsspec.filesystem("memory").pipe(
        memory_url, join_header(json.dumps(parts.header), parts.data)
    )

    read_or_trace_error(memory_url)


def set_nested(target: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value


@settings(FUZZ_SETTINGS, max_examples=300)
@given(
    meta=st.dictionaries(json_keys, json_values, max_size=4),
    values=st.lists(st.floats(width=32), max_size=20),
)
def test_fuzz_meta_round_trip(memory_url, meta, values):
    tensors = {"values": np.array(values, dtype=np.float32)}

    write_trace(memory_url, meta, tensors)

    with read_trace(memory_url) as trace:
        assert_meta_equal(trace.meta, meta)
        assert trace.tensor("values").tobytes() == tensors["values"].tobytes()
