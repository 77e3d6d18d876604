"""The detector-frame message format: pure functions over bytes, no I/O.

One Kafka message value (or one ZeroMQ message) carries one frame::

    offset  size  field
    0       4     magic  b"SMPF"
    4       1     format version (1)
    5       1     kind: 0 = frame, 1 = end-of-scan marker
    6       4     header length H, unsigned little-endian
    10      H     header: UTF-8 JSON object
    10+H    ...   payload: the frame's raw bytes in C order (frames only)

Frame header keys: ``scan`` (str), ``index`` (int >= 0), ``shape`` (list of
int >= 1), ``dtype`` (NumPy type string with byte order, e.g. ``"<u2"``),
``pos`` ([x, y], float, motor units), ``ts`` (producer time, Unix seconds).
Unknown keys are kept in :attr:`FrameHeader.extra`.  The payload length must
equal ``prod(shape) * itemsize`` exactly; anything else is an error.

End-of-scan header keys: ``scan``, ``frames`` (frames in the whole scan),
``partition`` (the partition the marker was written to, or -1), ``ts``.

Every decoding failure raises :class:`FrameError` whose :attr:`~FrameError.code`
names the kind of failure (used to count dead letters) and whose message says
what was expected and what came.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import InvalidArgument, InvalidArgumentType, SparkMPIError

MAGIC = b"SMPF"
VERSION = 1
KIND_FRAME = 0
KIND_END = 1
_PREFIX = struct.Struct("<4sBBI")
PREFIX_SIZE = _PREFIX.size  # 10 bytes
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 4
MAX_SCAN_ID = 256

#: dtypes a frame may have (NumPy kind + item size; either byte order).
SUPPORTED_DTYPES = ("u1", "u2", "u4", "i1", "i2", "i4", "f4", "f8")


class FrameError(SparkMPIError, ValueError):
    """Bytes that are not a valid frame message.

    Attributes
    ----------
    code : str
        Short machine-readable kind of failure, one of ``bad_magic``,
        ``bad_version``, ``bad_kind``, ``truncated_header``, ``header_too_large``,
        ``bad_header``, ``bad_dtype``, ``truncated_payload``, ``trailing_bytes``,
        ``not_finite``, ``not_a_frame``, ``key_mismatch``.
    """

    def __init__(self, message: str, code: str = "bad_header"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FrameHeader:
    """Metadata of one detector frame.

    ``shape`` and ``dtype`` may be left ``None`` when encoding: they are then
    taken from the array.
    """

    scan_id: str
    index: int
    position: tuple[float, float] = (0.0, 0.0)
    timestamp: float = 0.0
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EndOfScan:
    """The marker a producer writes after the last frame of a scan."""

    scan_id: str
    frames: int
    partition: int = -1
    timestamp: float = 0.0


# ---------------------------------------------------------------- validation

def _fail(message: str, code: str = "bad_header"):
    raise FrameError(message, code)


def _check_scan_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_SCAN_ID:
        _fail(f"{where}: 'scan' must be a non-empty string of at most {MAX_SCAN_ID} characters, got {value!r:.80}")
    return value


def _check_int(value: Any, name: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(f"{where}: {name!r} must be an integer >= {minimum}, got {value!r:.80}")
    return value


def _check_float(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(f"{where}: {name!r} must be a finite number, got {value!r:.80}")
    return float(value)


def _check_dtype(value: Any, where: str) -> np.dtype:
    if not isinstance(value, str) or len(value) != 3 or value[0] not in "<>|" or value[1:] not in SUPPORTED_DTYPES:
        _fail(f"{where}: unsupported dtype {value!r:.40}; expected one of "
              f"{', '.join('<' + d for d in SUPPORTED_DTYPES)} (or '>' byte order)", "bad_dtype")
    if value[0] == "|" and value[2] != "1":
        _fail(f"{where}: dtype {value!r} needs a byte order ('<' or '>')", "bad_dtype")
    return np.dtype(value)


def _check_shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_NDIM:
        _fail(f"{where}: 'shape' must be a list of 1 to {MAX_NDIM} integers, got {value!r:.80}")
    for n in value:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            _fail(f"{where}: 'shape' entries must be integers >= 1, got {value!r:.80}")
    return tuple(value)


def header_from_dict(obj: Any, where: str = "frame header") -> tuple[FrameHeader, np.dtype]:
    """Validate a decoded JSON frame header; return it and its dtype.

    Shared by the Kafka format and the ZeroMQ multipart format.
    """
    if not isinstance(obj, dict):
        _fail(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("scan", "index", "shape", "dtype", "pos", "ts") if k not in obj]
    if missing:
        _fail(f"{where}: missing key(s) {missing}")
    scan = _check_scan_id(obj["scan"], where)
    index = _check_int(obj["index"], "index", where, 0)
    shape = _check_shape(obj["shape"], where)
    dtype = _check_dtype(obj["dtype"], where)
    pos = obj["pos"]
    if not isinstance(pos, list) or len(pos) != 2:
        _fail(f"{where}: 'pos' must be [x, y], got {pos!r:.80}")
    position = (_check_float(pos[0], "pos[0]", where), _check_float(pos[1], "pos[1]", where))
    ts = _check_float(obj["ts"], "ts", where)
    extra = {k: v for k, v in obj.items() if k not in ("scan", "index", "shape", "dtype", "pos", "ts")}
    return FrameHeader(scan, index, position, ts, shape, dtype.str, extra), dtype


def payload_to_array(payload, shape: tuple[int, ...], dtype: np.dtype, *,
                     check_finite: bool = True, where: str = "frame") -> np.ndarray:
    """View ``payload`` (bytes-like) as an array of ``shape``/``dtype`` without copying."""
    view = memoryview(payload).cast("B")
    expected = math.prod(shape) * dtype.itemsize
    got = view.nbytes
    if got < expected:
        _fail(f"{where}: truncated payload: shape {list(shape)} x {dtype.str} needs {expected} bytes, "
              f"got {got}", "truncated_payload")
    if got > expected:
        _fail(f"{where}: payload has {got - expected} trailing bytes: shape {list(shape)} x {dtype.str} "
              f"needs {expected} bytes, got {got}", "trailing_bytes")
    array = np.frombuffer(view, dtype=dtype).reshape(shape)
    if check_finite and dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        _fail(f"{where}: {bad} of {array.size} values are NaN or infinite", "not_finite")
    return array


# ---------------------------------------------------------------- encoding

def _prefix(kind: int, header: bytes) -> bytes:
    return _PREFIX.pack(MAGIC, VERSION, kind, len(header))


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def frame_header_dict(header: FrameHeader | Mapping[str, Any], array: np.ndarray) -> dict:
    """The JSON header object for ``array`` (validates both arguments)."""
    if isinstance(header, Mapping):
        known = {"scan_id", "index", "position", "timestamp", "shape", "dtype", "extra"}
        unknown = set(header) - known
        if unknown:
            raise InvalidArgument(f"header: unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}")
        header = FrameHeader(**header)
    if not isinstance(header, FrameHeader):
        raise InvalidArgumentType(f"header: expected FrameHeader or mapping, got {type(header).__name__}")
    if not isinstance(array, np.ndarray):
        raise InvalidArgumentType(f"array: expected numpy.ndarray, got {type(array).__name__}")
    if not 1 <= array.ndim <= MAX_NDIM or array.size == 0:
        raise InvalidArgument(f"array: expected 1 to {MAX_NDIM} dimensions and at least one element, "
                         f"got shape {array.shape}")
    dtype = array.dtype.str
    if dtype[1:] not in SUPPORTED_DTYPES:
        raise InvalidArgument(f"array: unsupported dtype {array.dtype} ({dtype}); expected one of {SUPPORTED_DTYPES}")
    if header.shape is not None and tuple(header.shape) != array.shape:
        raise InvalidArgument(f"header.shape {tuple(header.shape)} does not match array shape {array.shape}")
    if header.dtype is not None and np.dtype(header.dtype) != array.dtype:
        raise InvalidArgument(f"header.dtype {header.dtype!r} does not match array dtype {dtype!r}")
    if not isinstance(header.scan_id, str) or not header.scan_id or len(header.scan_id) > MAX_SCAN_ID:
        raise InvalidArgument(f"header.scan_id must be a non-empty string of at most {MAX_SCAN_ID} characters, "
                         f"got {header.scan_id!r}")
    if isinstance(header.index, bool) or not isinstance(header.index, (int, np.integer)) or header.index < 0:
        raise InvalidArgument(f"header.index must be an integer >= 0, got {header.index!r}")
    if len(header.position) != 2 or not all(math.isfinite(float(v)) for v in header.position):
        raise InvalidArgument(f"header.position must be two finite numbers (x, y), got {header.position!r}")
    if not math.isfinite(float(header.timestamp)):
        raise InvalidArgument(f"header.timestamp must be finite, got {header.timestamp!r}")
    obj = dict(header.extra)
    obj.update(scan=header.scan_id, index=int(header.index), shape=list(array.shape), dtype=dtype,
               pos=[float(header.position[0]), float(header.position[1])], ts=float(header.timestamp))
    return obj


def encode_frame(header: FrameHeader | Mapping[str, Any], array: np.ndarray) -> bytes:
    """Encode one frame as a message value.

    Parameters
    ----------
    header : FrameHeader or mapping
        Scan id, frame index, position (x, y) and producer timestamp (Unix
        seconds).  ``shape``/``dtype``, when given, must match ``array``.
    array : numpy.ndarray, shape (H, W) (1 to 4 dimensions)
        The frame; any supported dtype, copied once into the message.

    Returns
    -------
    bytes
        ``prefix + JSON header + raw C-order bytes``.
    """
    head = _dumps(frame_header_dict(header, array))
    data = np.ascontiguousarray(array)
    return b"".join((_prefix(KIND_FRAME, head), head, memoryview(data).cast("B")))


def encode_end_of_scan(scan_id: str, frames: int, partition: int = -1, timestamp: float = 0.0) -> bytes:
    """Encode the end-of-scan marker (no payload)."""
    if not isinstance(scan_id, str) or not scan_id or len(scan_id) > MAX_SCAN_ID:
        raise InvalidArgument(f"scan_id must be a non-empty string of at most {MAX_SCAN_ID} characters, got {scan_id!r}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
        raise InvalidArgument(f"frames must be an integer >= 0, got {frames!r}")
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < -1:
        raise InvalidArgument(f"partition must be an integer >= -1, got {partition!r}")
    head = _dumps({"scan": scan_id, "frames": frames, "partition": partition, "ts": float(timestamp)})
    return _prefix(KIND_END, head) + head


# ---------------------------------------------------------------- decoding

def _split(data) -> tuple[int, memoryview, memoryview]:
    """Check the prefix; return (kind, header bytes, payload) as views."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise FrameError(f"expected a bytes-like message, got {type(data).__name__}", "bad_header") from None
    if view.nbytes < PREFIX_SIZE:
        if bytes(view[:4]) != MAGIC[:min(4, view.nbytes)]:
            _fail(f"bad magic: expected {MAGIC!r}, got {bytes(view[:4])!r}", "bad_magic")
        _fail(f"truncated header: need {PREFIX_SIZE} prefix bytes, got {view.nbytes}", "truncated_header")
    magic, version, kind, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        _fail(f"bad magic: expected {MAGIC!r}, got {magic!r}", "bad_magic")
    if version != VERSION:
        _fail(f"unsupported format version {version}; this reader knows version {VERSION}", "bad_version")
    if kind not in (KIND_FRAME, KIND_END):
        _fail(f"unknown message kind {kind}; expected {KIND_FRAME} (frame) or {KIND_END} (end of scan)", "bad_kind")
    if hlen > MAX_HEADER_BYTES:
        _fail(f"header length {hlen} exceeds the limit of {MAX_HEADER_BYTES} bytes", "header_too_large")
    if view.nbytes < PREFIX_SIZE + hlen:
        _fail(f"truncated header: header length says {hlen} bytes, got {view.nbytes - PREFIX_SIZE}",
              "truncated_header")
    return kind, view[PREFIX_SIZE:PREFIX_SIZE + hlen], view[PREFIX_SIZE + hlen:]


def _loads(head: memoryview) -> Any:
    try:
        return json.loads(bytes(head).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"header is not valid UTF-8 JSON: {exc}", "bad_header") from None


def _decode_end(head: memoryview, payload: memoryview) -> EndOfScan:
    obj = _loads(head)
    where = "end-of-scan header"
    if not isinstance(obj, dict):
        _fail(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("scan", "frames", "partition", "ts") if k not in obj]
    if missing:
        _fail(f"{where}: missing key(s) {missing}")
    if payload.nbytes:
        _fail(f"{where}: {payload.nbytes} trailing bytes after the header (a marker has no payload)",
              "trailing_bytes")
    return EndOfScan(_check_scan_id(obj["scan"], where), _check_int(obj["frames"], "frames", where, 0),
                     _check_int(obj["partition"], "partition", where, -1), _check_float(obj["ts"], "ts", where))


def decode_message(data, *, check_finite: bool = True) -> tuple[FrameHeader, np.ndarray] | EndOfScan:
    """Decode a frame (``(header, array)``) or an end-of-scan marker (:class:`EndOfScan`).

    Raises
    ------
    FrameError
        For anything that is not a valid message; ``code`` says what.
    """
    kind, head, payload = _split(data)
    if kind == KIND_END:
        return _decode_end(head, payload)
    header, dtype = header_from_dict(_loads(head))
    array = payload_to_array(payload, header.shape, dtype, check_finite=check_finite,
                             where=f"frame {header.index} of scan {header.scan_id!r}")
    return header, array


def decode_frame(data, *, check_finite: bool = True) -> tuple[FrameHeader, np.ndarray]:
    """Decode a frame message into ``(header, array)``.

    The array is a read-only view of ``data`` (no copy) when ``data`` is
    ``bytes``.  Float frames with NaN or infinite values are rejected unless
    ``check_finite=False``.

    Raises
    ------
    FrameError
        Bad magic, unsupported version, truncated header or payload (with
        expected and actual byte counts), bad JSON, missing or ill-typed keys,
        unsupported dtype, trailing bytes, non-finite values, or an
        end-of-scan marker where a frame was expected.
    """
    result = decode_message(data, check_finite=check_finite)
    if isinstance(result, EndOfScan):
        _fail(f"expected a frame, got the end-of-scan marker of scan {result.scan_id!r}", "not_a_frame")
    return result


def is_end_of_scan(data) -> bool:
    """True when ``data`` starts like an end-of-scan marker (cheap; does not validate)."""
    view = memoryview(data).cast("B")
    return view.nbytes >= PREFIX_SIZE and bytes(view[:4]) == MAGIC and view[5] == KIND_END
