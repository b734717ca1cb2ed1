"""Read and write ``.parity`` trace files, one recorded training run per file.

A trace stores a run's metadata (a JSON object that the caller chooses: scenario,
configuration, environment fingerprint, batch seeds, per-step losses) and its
tensors (initial weights, checkpoints, predictions). Traces are recorded on one
machine and compared on another, often after a trip through object storage, so the
reader treats every byte as untrusted. Nothing is unpickled or evaluated, and every
declared size and offset is checked against the limits and the file size before
memory is allocated for it.

File layout
-----------
A trace is a standard safetensors file:

- bytes 0 to 8: the header length N, a little-endian unsigned 64-bit integer;
- the next N bytes: the header, a UTF-8 JSON object that maps each tensor name to
  ``{"dtype": "F32", "shape": [12, 8], "data_offsets": [begin, end]}``, plus a
  ``__metadata__`` object of string values. The writer pads it with spaces so that
  the tensor data starts at a multiple of 8 bytes;
- the rest of the file: the tensor data, little-endian and in C order, with no gaps.
  ``data_offsets`` count from the first byte after the header.

Parity's own fields are two entries of ``__metadata__``:

- ``parity.trace``: a JSON document ``{"format": "parity-trace", "format_version":
  1, "meta": {...}, "tensors": {name: {"dtype": ..., "shape": [...], "crc32":
  ...}}}``. Safetensors allows only string values in ``__metadata__``, so the
  document is stored as JSON text inside the header's JSON;
- ``parity.trace.crc32``: the CRC-32 of that document's UTF-8 bytes, in decimal.

The reader checks the document's CRC-32 when it opens a trace and each tensor's
CRC-32 when it reads the tensor. The document repeats each tensor's dtype and shape,
so a damaged tensor entry is caught as well. CRC-32 detects accidental damage (a
flipped bit, an interrupted copy), not deliberate edits.

Why one safetensors file rather than a ZIP archive of ``meta.json`` and
``tensors.safetensors``: reading a tensor takes the 8-byte length, the header and
then one ranged read, which fsspec turns into a few range requests on s3, gs or
https. A ZIP archive keeps its directory at the end of the file. A reader would
fetch the tail, parse the central directory and a local header before reaching the
safetensors header, and would have to validate member names, duplicate members,
compression methods and declared sizes on top. Any safetensors reader
(``safetensors.safe_open``, for example) also opens a trace as it is. The cost is
the JSON-in-JSON document and a header size limit: this module writes at most
``DEFAULT_MAX_META_BYTES``, and safetensors 0.8 itself rejects headers over
100,000,000 bytes.

Versions
--------
``format_version`` is 1. A reader accepts versions 1 to ``FORMAT_VERSION`` and
rejects a bigger one with an error that names both. Keys that a reader does not
know are ignored in ``__metadata__``, in the document and in tensor entries, so a
writer may add optional fields without a new version. A change that an older reader
would misread raises ``FORMAT_VERSION``.

JSON has no NaN or infinity, so ``write_trace`` stores a non-finite float in
``meta`` as ``{"$float": "nan"}``, ``"inf"`` or ``"-inf"``, and ``read_trace``
turns it back into a float. That is why no object in ``meta`` may use the key
``"$float"``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import secrets
import struct
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import IO, Any, NamedTuple

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from parity.errors import ParityError

__all__ = [
    "DEFAULT_MAX_META_BYTES",
    "DEFAULT_MAX_TENSORS",
    "DEFAULT_MAX_TENSOR_BYTES",
    "DEFAULT_MAX_TOTAL_BYTES",
    "FORMAT_VERSION",
    "MAX_NAME_LENGTH",
    "MAX_NDIM",
    "TRACE_SUFFIX",
    "TensorInfo",
    "Trace",
    "TraceError",
    "read_trace",
    "write_trace",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TRACE_SUFFIX = ".parity"
FORMAT_NAME = "parity-trace"

# Default limits of read_trace. They bound what a hostile or damaged file can make
# the reader allocate, and they are judgment calls, not measurements. For scale, a
# 64 MiB header fits about 400,000 tensor entries with 20-character names of 2-d
# float32 tensors, or about 3.5 million per-step losses written as random float64
# values, and a 16 GiB tensor is 4 billion float32 values. A caller that trusts a
# bigger file passes bigger limits.
DEFAULT_MAX_META_BYTES = 64 * 2**20
DEFAULT_MAX_TENSORS = 100_000
DEFAULT_MAX_TENSOR_BYTES = 16 * 2**30
DEFAULT_MAX_TOTAL_BYTES = 2**40

MAX_NAME_LENGTH = 256
# NumPy 1.x supports at most 32 dimensions (2.x: 64), so traces keep to 32.
MAX_NDIM = 32
# Writing deeper meta is rejected, which also catches reference cycles. It keeps
# json.loads on the reading side far below Python's default recursion limit.
MAX_META_DEPTH = 100

_DOCUMENT_KEY = "parity.trace"
_CHECKSUM_KEY = "parity.trace.crc32"
_METADATA_KEY = "__metadata__"
_FLOAT_TAG = "$float"
_NON_FINITE_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_CHECKSUM_PATTERN = re.compile(r"[0-9]{1,10}")
_LENGTH_BYTES = 8
# Tensor bytes are hashed and written in pieces of this size, so a writer needs no
# second copy of a large tensor.
_IO_CHUNK_BYTES = 64 * 2**20

# safetensors dtype code -> NumPy dtype. The format stores little-endian values.
# "BF16" joins when ml_dtypes is installed (see _numpy_dtype).
_NUMPY_DTYPES = {
    "BOOL": np.dtype("|b1"),
    "U8": np.dtype("|u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "I8": np.dtype("|i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_CODES_BY_KIND = {
    (dtype.kind, dtype.itemsize): code for code, dtype in _NUMPY_DTYPES.items()
}

# First bytes of files that people may pass by mistake. Used only to explain a
# failed read, because a valid header length can start with the same bytes.
_FOREIGN_SIGNATURES = (
    (
        b"PK\x03\x04",
        "a ZIP archive (PyTorch .pt and Keras .keras files are ZIP archives)",
    ),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file, such as a Keras .h5 file"),
    (b"\x1f\x8b", "a gzip file"),
)


class TraceError(ParityError):
    """A trace file that is damaged, hostile, too large or not a parity trace."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and size in bytes of one tensor in a trace."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


class _TensorEntry(NamedTuple):
    """A tensor's place in the file, with absolute byte offsets."""

    info: TensorInfo
    start: int
    stop: int
    crc32: int


class _Limits(NamedTuple):
    max_tensor_bytes: int
    max_total_bytes: int
    max_tensors: int
    max_meta_bytes: int


class _PreparedTensor(NamedTuple):
    name: str
    code: str
    array: np.ndarray
    crc32: int


# ---------------------------------------------------------------------------
# Writing


def write_trace(
    url: str | os.PathLike[str],
    meta: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
) -> None:
    """Write a trace with the given metadata and tensors to ``url``.

    ``url`` is a local path or an fsspec URL (``file://``, ``memory://``, ``s3://``
    and so on). ``meta`` must be a JSON-compatible mapping with string keys. NumPy
    scalars become Python numbers, and NaN and infinities are tagged as the module
    docstring describes. Tensors keep the order of ``tensors``.

    Everything is validated before a file is created. A local write goes to a
    temporary file in the target's directory, which is flushed, fsynced and then
    renamed over ``url``, so ``url`` never contains a partial trace. Other filesystems
    get a temporary file that is then moved to ``url``, or a direct write where the
    filesystem cannot move files.

    Raises:
        ValueError: ``meta`` or ``tensors`` cannot be stored. The message names the
            key or tensor and the fix.
        OSError: the filesystem failed, for example a missing directory.
    """
    url = os.fspath(url)
    if not isinstance(meta, Mapping):
        raise ValueError(
            f"Cannot write trace {url}: meta must be a mapping with string keys, "
            f"got {type(meta).__name__}."
        )
    encoded_meta = _encode_meta_value(url, meta, "meta", 0)
    prepared = _prepare_tensors(url, tensors)
    header = _encode_header(url, encoded_meta, prepared)
    filesystem, path = fsspec.core.url_to_fs(url)

    if isinstance(filesystem, LocalFileSystem):
        _write_local(path, header, prepared)
    else:
        _write_with_filesystem(filesystem, path, header, prepared)


def _prepare_tensors(
    url: str, tensors: Mapping[str, np.ndarray]
) -> list[_PreparedTensor]:
    if not isinstance(tensors, Mapping):
        raise ValueError(
            f"Cannot write trace {url}: tensors must be a mapping from name to "
            f"numpy.ndarray, got {type(tensors).__name__}."
        )

    prepared = []
    for name, array in tensors.items():
        problem = _name_problem(name)
        if problem is not None:
            raise ValueError(
                f"Cannot write trace {url}: tensor name {name!r} {problem}."
            )
        if not isinstance(array, np.ndarray):
            raise ValueError(
                f"Cannot write trace {url}: tensor {name!r} is a "
                f"{type(array).__name__}, not a numpy.ndarray. Convert it with "
                "numpy.asarray() first."
            )
        code = _dtype_code(array.dtype)
        if code is None:
            raise ValueError(
                f"Cannot write trace {url}: tensor {name!r} has dtype {array.dtype}, "
                f"which traces cannot store. Supported dtypes: {_supported_dtypes()}. "
                "Convert the tensor with .astype() first."
            )
        if array.ndim > MAX_NDIM:
            raise ValueError(
                f"Cannot write trace {url}: tensor {name!r} has {array.ndim} "
                f"dimensions, more than the maximum of {MAX_NDIM}. Reshape it first."
            )
        checksum = 0
        for chunk in _iter_byte_chunks(array):
            checksum = zlib.crc32(chunk, checksum)
        prepared.append(_PreparedTensor(name, code, array, checksum))
    return prepared


def _name_problem(name: object) -> str | None:
    """Return why ``name`` cannot name a tensor, or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"has {len(name)} characters, more than the maximum of {MAX_NAME_LENGTH}"
    if "\0" in name:
        return "contains a NUL character"
    if name == _METADATA_KEY:
        return f"is reserved by safetensors for {_METADATA_KEY}"
    if not _is_valid_unicode(name):
        return "contains a lone surrogate, which UTF-8 cannot encode"
    return None


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@cache
def _bfloat16() -> np.dtype | None:
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _dtype_code(dtype: np.dtype) -> str | None:
    """Return the safetensors code of ``dtype``, or None when traces cannot store it."""
    bfloat16 = _bfloat16()
    # NumPy evaluates `dtype == None` as `dtype == float64`, so compare only with a
    # real dtype.
    if bfloat16 is not None and dtype == bfloat16:
        return "BF16"
    return _CODES_BY_KIND.get((dtype.kind, dtype.itemsize))


def _numpy_dtype(code: str) -> np.dtype | None:
    if code == "BF16":
        return _bfloat16()
    return _NUMPY_DTYPES.get(code)


def _supported_dtypes() -> str:
    names = [str(dtype) for dtype in _NUMPY_DTYPES.values()]
    if _bfloat16() is not None:
        names.append("bfloat16")
    return ", ".join(names)


def _iter_byte_chunks(array: np.ndarray) -> Iterator[memoryview]:
    """Yield the tensor's bytes as the file stores them: little-endian, C order."""
    dtype = (
        array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    )
    # astype copies only when the order or the byte order has to change.
    flat = array.astype(dtype, order="C", copy=False).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _IO_CHUNK_BYTES):
        yield memoryview(flat[start : start + _IO_CHUNK_BYTES])


def _encode_header(
    url: str, encoded_meta: dict, prepared: list[_PreparedTensor]
) -> bytes:
    """Return the length field and the padded JSON header for the prepared tensors."""
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meta": encoded_meta,
        "tensors": {
            tensor.name: {
                "dtype": tensor.code,
                "shape": list(tensor.array.shape),
                "crc32": tensor.crc32,
            }
            for tensor in prepared
        },
    }
    document_text = _dump_json(document)
    document_checksum = zlib.crc32(document_text.encode("utf-8"))
    header: dict[str, Any] = {
        _METADATA_KEY: {
            _DOCUMENT_KEY: document_text,
            _CHECKSUM_KEY: str(document_checksum),
        }
    }

    offset = 0
    for tensor in prepared:
        stop = offset + tensor.array.nbytes
        header[tensor.name] = {
            "dtype": tensor.code,
            "shape": list(tensor.array.shape),
            "data_offsets": [offset, stop],
        }
        offset = stop

    header_bytes = _dump_json(header).encode("utf-8")
    header_bytes += b" " * (-(_LENGTH_BYTES + len(header_bytes)) % 8)
    if len(header_bytes) > DEFAULT_MAX_META_BYTES:
        raise ValueError(
            f"Cannot write trace {url}: its header would be {len(header_bytes)} bytes, "
            f"more than the maximum of {DEFAULT_MAX_META_BYTES}. Store large arrays "
            "as tensors rather than in meta, or write fewer tensors per trace."
        )
    return struct.pack("<Q", len(header_bytes)) + header_bytes


def _dump_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _encode_meta_value(url: str, value: Any, where: str, depth: int) -> Any:
    """Return ``value`` as plain JSON data, with non-finite floats tagged.

    ``where`` locates the value for error messages, as in ``meta["losses"][3]``.
    """
    if depth > MAX_META_DEPTH:
        raise ValueError(
            f"Cannot write trace {url}: {where} is nested more than {MAX_META_DEPTH} "
            "levels deep or contains a reference cycle. Flatten it."
        )
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if math.isnan(value):
            return {_FLOAT_TAG: "nan"}
        return {_FLOAT_TAG: "inf" if value > 0 else "-inf"}
    if isinstance(value, str):
        if not _is_valid_unicode(value):
            raise ValueError(
                f"Cannot write trace {url}: the string at {where} contains a lone "
                "surrogate, which UTF-8 cannot encode."
            )
        return value
    if isinstance(value, (np.bool_, np.integer)) or (
        isinstance(value, np.floating) and value.dtype.itemsize <= 8
    ):
        return _encode_meta_value(url, value.item(), where, depth)
    if isinstance(value, Mapping):
        return _encode_meta_mapping(url, value, where, depth)
    if isinstance(value, (list, tuple)):
        return [
            _encode_meta_value(url, item, f"{where}[{index}]", depth + 1)
            for index, item in enumerate(value)
        ]
    raise ValueError(
        f"Cannot write trace {url}: {where} is a {type(value).__name__}, which JSON "
        "cannot store. Use None, bool, int, float, str, list or dict, and store "
        "arrays as tensors."
    )


def _encode_meta_mapping(
    url: str, value: Mapping[Any, Any], where: str, depth: int
) -> dict:
    encoded = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(
                f"Cannot write trace {url}: {where} has the key {key!r} of type "
                f"{type(key).__name__}. JSON keys must be strings, so convert it with "
                "str()."
            )
        if key == _FLOAT_TAG:
            raise ValueError(
                f"Cannot write trace {url}: {where} uses the key {_FLOAT_TAG!r}, which "
                "traces reserve for NaN and infinity. Rename the key."
            )
        if not _is_valid_unicode(key):
            raise ValueError(
                f"Cannot write trace {url}: a key in {where} contains a lone "
                "surrogate, which UTF-8 cannot encode."
            )
        encoded[key] = _encode_meta_value(url, item, f"{where}[{key!r}]", depth + 1)
    return encoded


def _write_tensor_file(
    file: IO[bytes], header: bytes, prepared: list[_PreparedTensor]
) -> None:
    file.write(header)
    for tensor in prepared:
        for chunk in _iter_byte_chunks(tensor.array):
            file.write(chunk)


def _write_local(path: str, header: bytes, prepared: list[_PreparedTensor]) -> None:
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Cannot write trace {path}: the directory {directory} does not exist. "
            "Create it first."
        )
    temporary = os.path.join(
        directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp"
    )

    # os.open with mode 0o666 lets the umask set the permissions, as open() would.
    # tempfile.mkstemp would make the trace readable by its owner only.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            _write_tensor_file(file, header, prepared)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove_local_file(temporary)
        raise

    _fsync_directory(directory)


def _remove_local_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning("Could not remove the temporary file %s: %s", path, error)


def _fsync_directory(directory: str) -> None:
    """Make a finished rename survive a power cut, where the platform allows it."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        logger.warning("Could not open %s to fsync the rename: %s", directory, error)
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        logger.warning("Could not fsync the directory %s: %s", directory, error)
    finally:
        os.close(descriptor)


def _write_with_filesystem(
    filesystem: fsspec.AbstractFileSystem,
    path: str,
    header: bytes,
    prepared: list[_PreparedTensor],
) -> None:
    directory, name = posixpath.split(path)
    temporary = posixpath.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    try:
        with filesystem.open(temporary, "wb") as file:
            _write_tensor_file(file, header, prepared)
        filesystem.mv(temporary, path)
        return
    except NotImplementedError:
        _remove_remote_file(filesystem, temporary)
    except BaseException:
        _remove_remote_file(filesystem, temporary)
        raise

    # NOTE: without a move, an error removes the partial file, but a crash of the
    # process can leave one at path.
    logger.info(
        "%s cannot move files, so the trace %s is written in place", filesystem, path
    )
    try:
        with filesystem.open(path, "wb") as file:
            _write_tensor_file(file, header, prepared)
    except BaseException:
        _remove_remote_file(filesystem, path)
        raise


def _remove_remote_file(filesystem: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if filesystem.exists(path):
            filesystem.rm(path)
    # Broad on purpose: fsspec backends raise their own error types, and a failed
    # clean-up must not hide the error that caused it.
    except Exception as error:
        logger.warning("Could not remove the temporary file %s: %s", path, error)


# ---------------------------------------------------------------------------
# Reading


class Trace:
    """An open trace file, with its metadata in memory and its tensors read on request.

    Create one with ``read_trace`` and use it as a context manager, so the file is
    closed. Every tensor read seeks to the tensor's bytes and reads only them, and
    checks them against the CRC-32 recorded at write time.

    NOTE: one file position serves all reads, so a Trace must not be shared between
    threads.
    """

    def __init__(
        self,
        url: str,
        file: IO[bytes],
        meta: dict[str, Any],
        format_version: int,
        entries: dict[str, _TensorEntry],
    ) -> None:
        self._url = url
        self._file = file
        self._meta = meta
        self._format_version = format_version
        self._entries = entries
        self._closed = False

    @property
    def url(self) -> str:
        """URL or path that the trace was read from."""
        return self._url

    @property
    def meta(self) -> dict[str, Any]:
        """Metadata that the caller of ``write_trace`` stored."""
        return self._meta

    @property
    def format_version(self) -> int:
        """Format version of the file, from 1 to ``FORMAT_VERSION``."""
        return self._format_version

    @property
    def closed(self) -> bool:
        """Whether the file is closed. ``meta`` stays available after closing."""
        return self._closed

    def tensor_names(self) -> list[str]:
        """Return the tensor names in the order they were written."""
        return list(self._entries)

    def tensor_info(self, name: str) -> TensorInfo:
        """Return the shape, dtype and size in bytes of tensor ``name``."""
        return self._entry(name).info

    def tensor(self, name: str) -> np.ndarray:
        """Read tensor ``name`` into a new writable array.

        Raises:
            TraceError: the tensor's bytes are missing or fail their CRC-32 check.
            ValueError: the trace has no such tensor, or it is closed.
        """
        entry = self._entry(name)
        data = self._read_range(entry.start, entry.info.nbytes)
        if _crc32(data) != entry.crc32:
            raise _damaged(
                self._url, f"tensor {name!r} does not match its CRC-32 checksum"
            )
        return self._to_array(name, data, entry.info.shape, entry.info.dtype)

    def iter_chunks(self, name: str, chunk_elements: int) -> Iterator[np.ndarray]:
        """Yield tensor ``name`` in consecutive slices along axis 0.

        Each slice contains as many whole rows as fit in ``chunk_elements`` elements,
        and at least one row, so it contains at most ``max(chunk_elements, row
        size)`` elements. Only one slice is in memory at a time. A 0-d tensor is
        yielded once as it is, and a tensor without rows as one empty slice, so that
        the slices always concatenate to the tensor.

        The CRC-32 check runs before the last slice is yielded. Damaged data raises
        TraceError then, after the earlier slices were already yielded, and a loop
        that stops early skips the check.

        Raises:
            ValueError: ``chunk_elements`` is not a positive integer, the trace has no
                such tensor, or it is closed.
        """
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int):
            raise ValueError(
                f"chunk_elements must be a positive integer, got {chunk_elements!r}."
            )
        if chunk_elements < 1:
            raise ValueError(
                f"chunk_elements must be at least 1, got {chunk_elements}."
            )
        entry = self._entry(name)
        return self._generate_chunks(name, entry, chunk_elements)

    def _generate_chunks(
        self, name: str, entry: _TensorEntry, chunk_elements: int
    ) -> Iterator[np.ndarray]:
        shape = entry.info.shape
        if not shape or shape[0] == 0:
            yield self.tensor(name)
            return

        row_shape = shape[1:]
        row_elements = math.prod(row_shape)
        row_bytes = row_elements * entry.info.dtype.itemsize
        rows_per_chunk = (
            max(1, chunk_elements // row_elements) if row_elements else shape[0]
        )
        checksum = 0
        for first_row in range(0, shape[0], rows_per_chunk):
            rows = min(rows_per_chunk, shape[0] - first_row)
            data = self._read_range(
                entry.start + first_row * row_bytes, rows * row_bytes
            )
            checksum = _crc32(data, checksum)
            if first_row + rows == shape[0] and checksum != entry.crc32:
                raise _damaged(
                    self._url, f"tensor {name!r} does not match its CRC-32 checksum"
                )
            yield self._to_array(name, data, (rows, *row_shape), entry.info.dtype)

    def close(self) -> None:
        """Close the file. Reading tensors afterwards raises ValueError."""
        if not self._closed:
            self._closed = True
            self._file.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<Trace {self._url!r} format_version={self._format_version} "
            f"tensors={len(self._entries)} {state}>"
        )

    def _entry(self, name: str) -> _TensorEntry:
        entry = self._entries.get(name)
        if entry is None:
            names = list(self._entries)
            listed = ", ".join(repr(known) for known in names[:10])
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            raise ValueError(
                f"Trace {self._url} has no tensor named {name!r}. It contains "
                f"{len(names)} tensors: {listed}{more}. Trace.tensor_names() lists "
                "them."
            )
        return entry

    def _read_range(self, start: int, size: int) -> bytearray:
        if self._closed:
            raise ValueError(
                f"Trace {self._url} is closed. Open it again with read_trace."
            )
        return _read_exact(self._url, self._file, start, size)

    def _to_array(
        self, name: str, data: bytearray, shape: tuple[int, ...], dtype: np.dtype
    ) -> np.ndarray:
        array = np.frombuffer(data, dtype=dtype)
        if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
            # safetensors stores bool as one byte that is 0 or 1. Other bytes would
            # give NumPy bools that compare unequal to True.
            raise _damaged(
                self._url, f"bool tensor {name!r} contains bytes other than 0 and 1"
            )
        if sys.byteorder == "big":
            array = array.astype(dtype.newbyteorder("="))
        return array.reshape(shape)


def read_trace(
    url: str | os.PathLike[str],
    *,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
    max_meta_bytes: int = DEFAULT_MAX_META_BYTES,
) -> Trace:
    """Open the trace at ``url`` and validate its header.

    ``url`` is a local path or an fsspec URL (``file://``, ``memory://``, ``s3://``,
    ``gs://``, ``https://``). The metadata is read and checked at once, while tensors
    are read only on request. Before anything is allocated, the declared sizes must
    fit the file and these limits:

    - ``max_meta_bytes``: the JSON header, which contains the metadata and the index
      of tensors;
    - ``max_tensors``: the number of tensors;
    - ``max_tensor_bytes``: any one tensor;
    - ``max_total_bytes``: all tensors together.

    Raises:
        TraceError: the file is damaged, exceeds a limit, has a newer
            ``format_version``, or is not a parity trace.
        ValueError: a limit is not a non-negative integer.
        OSError: the file cannot be opened or read, for example FileNotFoundError.
    """
    url = os.fspath(url)
    limits = _Limits(max_tensor_bytes, max_total_bytes, max_tensors, max_meta_bytes)
    for argument, value in limits._asdict().items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{argument} must be a non-negative integer, got {value!r}."
            )

    filesystem, path = fsspec.core.url_to_fs(url)
    file = filesystem.open(path, "rb")
    try:
        return _open_trace(url, file, limits)
    except BaseException:
        file.close()
        raise


def _open_trace(url: str, file: IO[bytes], limits: _Limits) -> Trace:
    # NOTE: this needs a seekable file of known size. For an https URL whose server
    # sends no Content-Length, fsspec returns a streaming file that cannot seek, and
    # the error is fsspec's. Untested, because the tests use no network.
    file.seek(0, os.SEEK_END)
    file_size = file.tell()
    header_bytes = _read_header_bytes(url, file, file_size, limits.max_meta_bytes)
    header = _parse_header(url, header_bytes)
    document = _read_document(url, header)

    data_start = _LENGTH_BYTES + len(header_bytes)
    entries = _read_tensor_entries(url, header, document["tensors"], limits.max_tensors)
    # The layout check comes first, so that a damaged size is reported as damage
    # rather than as a limit to raise.
    _check_layout(url, entries, file_size - data_start)
    _check_size_limits(url, entries, limits)
    absolute = {
        name: entry._replace(
            start=data_start + entry.start, stop=data_start + entry.stop
        )
        for name, entry in entries.items()
    }
    return Trace(url, file, document["meta"], document["format_version"], absolute)


def _read_exact(url: str, file: IO[bytes], start: int, size: int) -> bytearray:
    """Read exactly ``size`` bytes at ``start`` into a new buffer."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    file.seek(start)
    filled = 0
    while filled < size:
        count = file.readinto(view[filled:])
        if not count:
            raise _damaged(
                url,
                f"the file ended at byte {start + filled}, but {size} bytes were "
                f"expected from byte {start}. It is truncated or changed while being "
                "read",
            )
        filled += count
    return buffer


def _crc32(data: bytes | bytearray, checksum: int = 0) -> int:
    view = memoryview(data)
    for start in range(0, len(view), _IO_CHUNK_BYTES):
        checksum = zlib.crc32(view[start : start + _IO_CHUNK_BYTES], checksum)
    return checksum


def _read_header_bytes(
    url: str, file: IO[bytes], file_size: int, max_meta_bytes: int
) -> bytes:
    if file_size < _LENGTH_BYTES:
        raise _damaged(
            url, f"the file has {file_size} bytes, fewer than the 8-byte header length"
        )
    prefix = bytes(_read_exact(url, file, 0, min(file_size, 16)))
    (length,) = struct.unpack("<Q", prefix[:_LENGTH_BYTES])
    if length > file_size - _LENGTH_BYTES:
        raise _damaged(
            url,
            f"the header length is {length} bytes, but only "
            f"{file_size - _LENGTH_BYTES} bytes follow it"
            f"{_describe_foreign_format(prefix)}",
        )
    if length > max_meta_bytes:
        raise _over_limit(
            url, f"has a {length}-byte header", "max_meta_bytes", max_meta_bytes
        )

    header_bytes = bytes(_read_exact(url, file, _LENGTH_BYTES, length))
    if not header_bytes.startswith(b"{"):
        raise _damaged(
            url,
            f"the header does not start with '{{'{_describe_foreign_format(prefix)}",
        )
    return header_bytes


def _describe_foreign_format(prefix: bytes) -> str:
    """Return a clause that names the file type ``prefix`` starts, or ''."""
    for signature, description in _FOREIGN_SIGNATURES:
        if prefix.startswith(signature):
            return f". The file looks like {description}"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return ". The file looks like a Python pickle, which parity never loads"
    return ""


def _parse_header(url: str, header_bytes: bytes) -> dict[str, Any]:
    try:
        header = _load_json(header_bytes.decode("utf-8"), _reject_duplicate_keys)
    except (ValueError, RecursionError) as error:
        raise _damaged(url, f"the header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise _damaged(url, "the header is not a JSON object")
    return header


def _load_json(
    text: str, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any]
) -> Any:
    return json.loads(
        text, object_pairs_hook=object_pairs_hook, parse_constant=_reject_constant
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key[:80]!r} appears more than once")
        result[key] = value
    return result


def _decode_document_object(pairs: list[tuple[str, Any]]) -> Any:
    """Build an object of the trace document, turning tagged floats back into floats."""
    result = _reject_duplicate_keys(pairs)
    if _FLOAT_TAG not in result:
        return result
    value = result[_FLOAT_TAG]
    if len(result) != 1 or value not in _NON_FINITE_FLOATS:
        raise ValueError(
            f"an object with the key {_FLOAT_TAG!r} must be exactly "
            f'{{"{_FLOAT_TAG}": "nan"}}, "inf" or "-inf", got {result!r}'
        )
    return _NON_FINITE_FLOATS[value]


def _read_document(url: str, header: dict[str, Any]) -> dict[str, Any]:
    """Return the validated parity document stored in the header's ``__metadata__``."""
    metadata = header.get(_METADATA_KEY)
    if not isinstance(metadata, dict) or _DOCUMENT_KEY not in metadata:
        raise TraceError(
            f"Trace {url} is a safetensors file but not a parity trace, because its "
            f"{_METADATA_KEY} has no {_DOCUMENT_KEY!r} entry. Record traces with "
            "parity.trace.write_trace."
        )
    text = metadata[_DOCUMENT_KEY]
    if not isinstance(text, str):
        raise _damaged(
            url, f"{_DOCUMENT_KEY!r} is a {type(text).__name__}, not a string"
        )

    checksum = metadata.get(_CHECKSUM_KEY)
    if checksum is not None:
        expected = zlib.crc32(text.encode("utf-8", errors="surrogatepass"))
        if not (
            isinstance(checksum, str)
            and _CHECKSUM_PATTERN.fullmatch(checksum)
            and int(checksum) == expected
        ):
            raise _damaged(
                url, f"the {_DOCUMENT_KEY!r} document does not match its CRC-32"
            )

    try:
        document = _load_json(text, _decode_document_object)
    except (ValueError, RecursionError) as error:
        raise _damaged(
            url, f"the {_DOCUMENT_KEY!r} document cannot be parsed ({error})"
        ) from error
    if not isinstance(document, dict):
        raise _damaged(url, f"the {_DOCUMENT_KEY!r} document is not a JSON object")

    _check_format_version(url, document)
    if checksum is None:
        raise _damaged(url, f"the {_CHECKSUM_KEY!r} entry is missing")
    for key in ("meta", "tensors"):
        if not isinstance(document.get(key), dict):
            found = _json_type_name(document.get(key, _MISSING))
            raise _damaged(url, f"{key!r} in the {_DOCUMENT_KEY!r} document is {found}")
    return document


_MISSING = object()


def _json_type_name(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return repr(value)[:80]


def _check_format_version(url: str, document: dict[str, Any]) -> None:
    format_name = document.get("format")
    if format_name != FORMAT_NAME:
        raise TraceError(
            f"Trace {url} is not a parity trace: its format is "
            f"{_json_type_name(document.get('format', _MISSING))}, expected "
            f"{FORMAT_NAME!r}. Record traces with parity.trace.write_trace."
        )
    version = document.get("format_version", _MISSING)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _damaged(
            url, f"format_version is {_json_type_name(version)}, not a positive integer"
        )
    if version > FORMAT_VERSION:
        raise TraceError(
            f"Trace {url} has format_version {version}, but this version of parity "
            f"reads format versions 1 to {FORMAT_VERSION}. Upgrade parity to read it."
        )


def _read_tensor_entries(
    url: str, header: dict[str, Any], listed: dict[str, Any], max_tensors: int
) -> dict[str, _TensorEntry]:
    """Validate each tensor entry of the header against the document's list.

    Offsets in the result count from the start of the tensor data.
    """
    names = [key for key in header if key != _METADATA_KEY]
    if len(names) > max_tensors:
        raise _over_limit(url, f"has {len(names)} tensors", "max_tensors", max_tensors)

    entries = {
        name: _parse_tensor_entry(url, name, header[name], listed.get(name, _MISSING))
        for name in names
    }
    unlisted = [name for name in listed if name not in entries]
    if unlisted:
        raise _damaged(
            url,
            f"the document lists tensor {unlisted[0]!r}, which the header does not "
            "contain",
        )
    return entries


def _check_size_limits(
    url: str, entries: dict[str, _TensorEntry], limits: _Limits
) -> None:
    total_bytes = 0
    for name, entry in entries.items():
        if entry.info.nbytes > limits.max_tensor_bytes:
            raise _over_limit(
                url,
                f"has the {entry.info.nbytes}-byte tensor {name!r}",
                "max_tensor_bytes",
                limits.max_tensor_bytes,
            )
        total_bytes += entry.info.nbytes
    if total_bytes > limits.max_total_bytes:
        raise _over_limit(
            url,
            f"has {total_bytes} bytes of tensors",
            "max_total_bytes",
            limits.max_total_bytes,
        )


def _parse_tensor_entry(url: str, name: str, raw: Any, listed: Any) -> _TensorEntry:
    problem = _name_problem(name)
    if problem is not None:
        raise _damaged(url, f"the tensor name {name[:80]!r} {problem}")
    if not isinstance(raw, dict):
        raise _damaged(
            url, f"the header entry of tensor {name!r} is {_json_type_name(raw)}"
        )

    code = raw.get("dtype", _MISSING)
    if not isinstance(code, str):
        raise _damaged(url, f"the dtype of tensor {name!r} is {_json_type_name(code)}")
    dtype = _numpy_dtype(code)
    if dtype is None and code == "BF16":
        raise TraceError(
            f"Trace {url} contains the bfloat16 tensor {name!r}, and NumPy needs the "
            "ml_dtypes package to read bfloat16. Install it with: pip install ml-dtypes"
        )
    if dtype is None:
        raise _damaged(
            url,
            f"tensor {name!r} has the dtype {code[:40]!r}, which traces do not use "
            f"(valid: {', '.join(_NUMPY_DTYPES)}, BF16)",
        )

    shape = raw.get("shape", _MISSING)
    if not _is_int_list(shape) or len(shape) > MAX_NDIM:
        raise _damaged(
            url,
            f"the shape of tensor {name!r} is {_json_type_name(shape)[:80]}, not a "
            f"list of at most {MAX_NDIM} non-negative integers",
        )
    offsets = raw.get("data_offsets", _MISSING)
    if not _is_int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _damaged(
            url,
            f"the data_offsets of tensor {name!r} are {_json_type_name(offsets)[:80]}, "
            "not [begin, end] with 0 <= begin <= end",
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != offsets[1] - offsets[0]:
        raise _damaged(
            url,
            f"tensor {name!r} has shape {shape} and dtype {code}, which take {nbytes} "
            f"bytes, but its data_offsets {offsets} span {offsets[1] - offsets[0]} "
            "bytes",
        )

    checksum = _check_listed_tensor(url, name, code, shape, listed)
    info = TensorInfo(shape=tuple(shape), dtype=dtype, nbytes=nbytes)
    return _TensorEntry(info=info, start=offsets[0], stop=offsets[1], crc32=checksum)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 0
        for item in value
    )


def _check_listed_tensor(
    url: str, name: str, code: str, shape: list[int], listed: Any
) -> int:
    """Check the document's record of a tensor against its header entry.

    Returns the tensor's CRC-32.
    """
    if listed is _MISSING:
        raise _damaged(
            url, f"the {_DOCUMENT_KEY!r} document does not list tensor {name!r}"
        )
    if not isinstance(listed, dict):
        raise _damaged(
            url, f"the document's record of tensor {name!r} is not an object"
        )
    if listed.get("dtype") != code or listed.get("shape") != shape:
        raise _damaged(
            url,
            f"tensor {name!r} is {code} {shape} in the header but "
            f"{listed.get('dtype')!r} {listed.get('shape')!r} in the document",
        )
    checksum = listed.get("crc32")
    if (
        isinstance(checksum, bool)
        or not isinstance(checksum, int)
        or not 0 <= checksum < 2**32
    ):
        raise _damaged(
            url, f"the CRC-32 of tensor {name!r} is {_json_type_name(checksum)}"
        )
    return checksum


def _check_layout(url: str, entries: dict[str, _TensorEntry], data_size: int) -> None:
    """Check that the tensors fill the data section exactly, with no gap or overlap."""
    ordered = sorted(entries.items(), key=lambda item: (item[1].start, item[1].stop))
    position = 0
    for name, entry in ordered:
        if entry.start < position:
            raise _damaged(
                url,
                f"tensor {name!r} starts at data byte {entry.start} and so overlaps the "
                f"tensor before it, which ends at data byte {position}",
            )
        if entry.start > position:
            raise _damaged(
                url,
                f"data bytes {position} to {entry.start} before tensor {name!r} belong "
                "to no tensor",
            )
        position = entry.stop

    if position > data_size:
        raise _damaged(
            url,
            f"the tensors need {position} bytes of data, but the file has {data_size} "
            "after the header. It is truncated",
        )
    if position < data_size:
        raise _damaged(
            url,
            f"{data_size - position} bytes after the last tensor belong to no tensor",
        )


def _damaged(url: str, problem: str) -> TraceError:
    return TraceError(
        f"Trace {url} is damaged or is not a parity trace: {problem}. Copy the file "
        "again, or record the run again."
    )


def _over_limit(url: str, finding: str, argument: str, limit: int) -> TraceError:
    return TraceError(
        f"Trace {url} {finding}, more than the limit {argument}={limit}. If you trust "
        f"the file, call read_trace with a larger {argument}."
    )
