"""DECTRIS SIMPLON Stream V2: CBOR start, image and end messages; pure functions, no I/O.

A Stream V2 detector sends one CBOR data item per ZeroMQ message, wrapped
in the self-describe tag 55799, whose ``type`` is ``"start"``, ``"image"``
or ``"end"``.  Arrays are written with

* tag 40 (RFC 8746 multi-dimensional array, row major): ``[dims, array]``
  (tag 1040: the same, column major);
* a typed-array tag (RFC 8746, tags 64-87) naming the element type, whose
  byte string holds the elements, or
* DECTRIS's tag 56500 in place of that byte string, for a compressed array:
  ``[algorithm, element size, compressed bytes]`` with ``"lz4"`` or
  ``"bslz4"`` (:mod:`._compression`).

An image message carries one array per threshold (``data`` maps channel
names from the start message's ``channels``, e.g. ``"threshold_1"``, to the
frame), the ``image_id``, ``series_id``, and ``real_time``/``start_time``/
``stop_time`` as rationals ``[numerator, denominator]`` in seconds.

:func:`decode_message` parses the message structure only: arrays stay
compressed (:class:`EncodedArray`), so a bridge can read the ids without
decompressing; :meth:`EncodedArray.decode` (run in the ranks) decompresses.
Every failure raises :class:`~sparkmpi.stream.frames.FrameError` whose
``code`` names what was wrong: ``bad_cbor``, ``truncated``, ``trailing_bytes``, ``bad_message``,
``unknown_tag``, ``unknown_compression``, ``bad_compressed_data``,
``size_mismatch``, ``shape_mismatch``, ``dtype_mismatch``,
``unknown_series``, ``unknown_channel``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..frames import FrameError
from ...errors import InvalidArgument, InvalidArgumentType
from . import _compression

TAG_SELF_DESCRIBE = 55799
TAG_MULTI_DIM = 40
TAG_MULTI_DIM_COLUMN_MAJOR = 1040
TAG_DECTRIS_COMPRESSION = 56500

#: RFC 8746 typed-array tags -> NumPy dtype strings (64 and 68 are both uint8; 68 is "clamped").
TYPED_ARRAY_TAGS = {
    64: "|u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "|u1", 69: "<u2", 70: "<u4", 71: "<u8",
    72: "|i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
    80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8",
}
_TAG_FOR_DTYPE = {np.dtype(v).str: k for k, v in TYPED_ARRAY_TAGS.items() if k != 68}

#: dtypes an image array may have (what Eigers send, and floats for simulated data).
IMAGE_DTYPES = ("uint8", "uint16", "uint32", "float32")
MAX_NDIM = 4


def _fail(message: str, code: str):
    raise FrameError(message, code)


# ---------------------------------------------------------------- arrays

@dataclass(frozen=True)
class EncodedArray:
    """An array as it travels: shape, dtype and the (possibly compressed) bytes.

    ``compression`` is None, ``"lz4"`` or ``"bslz4"``.  :meth:`decode`
    returns the NumPy array; an uncompressed array is a view of ``data``.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    data: bytes
    compression: str | None = None
    elem_size: int | None = None
    order: str = "C"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def decode(self, where: str = "array") -> np.ndarray:
        if self.compression is None:
            if len(self.data) != self.nbytes:
                _fail(f"{where}: shape {list(self.shape)} x {self.dtype.str} needs {self.nbytes} bytes, "
                      f"got {len(self.data)}", "size_mismatch")
            raw = self.data
        else:
            raw = _compression.decompress(self.data, self.compression, self.elem_size or self.dtype.itemsize,
                                          self.nbytes, where)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.shape, order=self.order)


@dataclass(frozen=True)
class _Typed:
    dtype: np.dtype
    data: bytes
    compression: str | None
    elem_size: int | None


@dataclass(frozen=True)
class _Compressed:
    algorithm: str
    elem_size: int
    data: bytes


class _TagError(Exception):
    """Carries a FrameError out of cbor2's tag hook (which wraps what a hook raises)."""

    def __init__(self, error: FrameError):
        super().__init__(str(error))
        self.error = error


def _tag_hook(first, second):
    import cbor2

    # cbor2 5 calls hook(decoder, tag), cbor2 6 calls hook(tag, immutable)
    tag = first if isinstance(first, cbor2.CBORTag) else second
    try:
        return _decode_tag(tag.tag, tag.value)
    except FrameError as exc:
        raise _TagError(exc) from None


def _decode_tag(number: int, value: Any):
    if number == TAG_DECTRIS_COMPRESSION:
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], str)
                and isinstance(value[1], int) and not isinstance(value[1], bool) and isinstance(value[2], bytes)):
            _fail(f"tag {TAG_DECTRIS_COMPRESSION} must hold [algorithm, element size, bytes], "
                  f"got {type(value).__name__}", "bad_message")
        algorithm = _compression.check_algorithm(value[0], f"tag {TAG_DECTRIS_COMPRESSION}")
        if value[1] not in (1, 2, 4, 8):
            _fail(f"tag {TAG_DECTRIS_COMPRESSION}: element size must be 1, 2, 4 or 8, got {value[1]}",
                  "bad_message")
        return _Compressed(algorithm, value[1], value[2])
    if number in TYPED_ARRAY_TAGS:
        dtype = np.dtype(TYPED_ARRAY_TAGS[number])
        if isinstance(value, _Compressed):
            if value.elem_size != dtype.itemsize:
                _fail(f"typed array tag {number} ({dtype.str}) holds compressed data of element size "
                      f"{value.elem_size}", "dtype_mismatch")
            return _Typed(dtype, value.data, value.algorithm, value.elem_size)
        if not isinstance(value, bytes):
            _fail(f"typed array tag {number} must hold a byte string or tag {TAG_DECTRIS_COMPRESSION}, "
                  f"got {type(value).__name__}", "bad_message")
        if len(value) % dtype.itemsize:
            _fail(f"typed array tag {number} ({dtype.str}): {len(value)} bytes is not a whole number of "
                  f"elements", "size_mismatch")
        return _Typed(dtype, value, None, None)
    if number in (TAG_MULTI_DIM, TAG_MULTI_DIM_COLUMN_MAJOR):
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], (list, tuple))):
            _fail(f"tag {number} must hold [dimensions, array], got {type(value).__name__}", "bad_message")
        dims, inner = value
        if not 1 <= len(dims) <= MAX_NDIM or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                 for n in dims):
            _fail(f"tag {number}: dimensions must be 1 to {MAX_NDIM} integers >= 1, got {list(dims)!r:.80}",
                  "bad_message")
        if not isinstance(inner, _Typed):
            _fail(f"tag {number}: only typed arrays are supported as contents, got {type(inner).__name__}",
                  "bad_message")
        shape = tuple(int(n) for n in dims)
        order = "C" if number == TAG_MULTI_DIM else "F"
        arr = EncodedArray(shape, inner.dtype, inner.data, inner.compression, inner.elem_size, order)
        if inner.compression is None and len(inner.data) != arr.nbytes:
            _fail(f"tag {number}: shape {list(shape)} x {inner.dtype.str} needs {arr.nbytes} bytes, "
                  f"got {len(inner.data)}", "size_mismatch")
        return arr
    _fail(f"unknown CBOR tag {number}; Stream V2 uses tags {TAG_MULTI_DIM}, {TAG_MULTI_DIM_COLUMN_MAJOR}, "
          f"64-87 and {TAG_DECTRIS_COMPRESSION}", "unknown_tag")


def _loads(data) -> Any:
    import cbor2

    try:
        view = bytes(data) if not isinstance(data, bytes) else data
    except TypeError:
        _fail(f"expected a bytes-like message, got {type(data).__name__}", "bad_cbor")
    if not view:
        _fail("empty message", "truncated")
    try:
        stream = io.BytesIO(view)
        obj = cbor2.CBORDecoder(stream, tag_hook=_tag_hook).decode()
    except _TagError as exc:
        raise exc.error from None
    except cbor2.CBORDecodeEOF as exc:
        _fail(f"truncated CBOR message ({len(view)} bytes): {exc}", "truncated")
    except (cbor2.CBORDecodeError, ValueError, RecursionError, OverflowError) as exc:
        cause = exc.__cause__ or exc.__context__
        while cause is not None:
            if isinstance(cause, _TagError):
                raise cause.error from None
            if isinstance(cause, cbor2.CBORDecodeEOF):
                _fail(f"truncated CBOR message ({len(view)} bytes): {cause}", "truncated")
            cause = cause.__cause__ or cause.__context__
        text = str(exc)
        code = "truncated" if "premature end" in text or "truncated" in text.lower() else "bad_cbor"
        _fail(f"not a CBOR message ({len(view)} bytes): {text}", code)
    if stream.tell() != len(view):
        _fail(f"{len(view) - stream.tell()} trailing bytes after the CBOR message", "trailing_bytes")
    return obj


# ---------------------------------------------------------------- messages

@dataclass(frozen=True)
class StartMessage:
    """A series' start message: geometry, pixel size, energy, thresholds, masks.

    ``fields`` holds every key as decoded (arrays such as ``pixel_mask`` as
    :class:`EncodedArray`); the attributes are the ones the pipeline uses.
    """

    series_id: int
    series_unique_id: str | None
    channels: tuple[str, ...]
    image_shape: tuple[int, int] | None
    image_dtype: np.dtype | None
    number_of_images: int | None
    fields: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def threshold_energy(self) -> dict:
        value = self.fields.get("threshold_energy")
        return dict(value) if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class ImageMessage:
    """One image: its ids, times (seconds) and one still-encoded array per channel."""

    series_id: int
    series_unique_id: str | None
    image_id: int
    data: Mapping[str, EncodedArray]
    real_time: float | None = None
    start_time: float | None = None
    stop_time: float | None = None
    fields: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def decode(self) -> dict[str, np.ndarray]:
        """Decompress every channel: ``{channel: (H, W) array}``."""
        return {name: arr.decode(f"image {self.image_id} of series {self.series_id}, {name}")
                for name, arr in self.data.items()}


@dataclass(frozen=True)
class EndMessage:
    series_id: int
    series_unique_id: str | None
    fields: Mapping[str, Any] = field(default_factory=dict, repr=False)


Message = StartMessage | ImageMessage | EndMessage


def _int(obj: Mapping, key: str, where: str, minimum: int = 0) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(f"{where}: {key!r} must be an integer >= {minimum}, got {value!r:.80}", "bad_message")
    return value


def _optional_str(obj: Mapping, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        _fail(f"{where}: {key!r} must be a string, got {type(value).__name__}", "bad_message")
    return value


def _rational(value, key: str, where: str) -> float | None:
    if value is None:
        return None
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                       for v in value) and value[1] > 0):
        return value[0] / value[1]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    _fail(f"{where}: {key!r} must be a rational [numerator, denominator > 0] in seconds, got {value!r:.80}",
          "bad_message")


def _start(obj: Mapping) -> StartMessage:
    where = "start message"
    series = _int(obj, "series_id", where)
    channels = obj.get("channels", ["threshold_1"])
    if not isinstance(channels, (list, tuple)) or not channels or not all(isinstance(c, str) for c in channels):
        _fail(f"{where}: 'channels' must be a non-empty list of names, got {channels!r:.80}", "bad_message")
    shape = None
    if "image_size_x" in obj or "image_size_y" in obj:
        shape = (_int(obj, "image_size_y", where, 1), _int(obj, "image_size_x", where, 1))
    dtype = None
    if obj.get("image_dtype") is not None:
        name = obj["image_dtype"]
        if name not in IMAGE_DTYPES:
            _fail(f"{where}: 'image_dtype' must be one of {', '.join(IMAGE_DTYPES)}, got {name!r:.40}", "bad_dtype")
        dtype = np.dtype(name)
    count = _int(obj, "number_of_images", where) if obj.get("number_of_images") is not None else None
    return StartMessage(series, _optional_str(obj, "series_unique_id", where), tuple(channels), shape, dtype,
                        count, dict(obj))


def _image(obj: Mapping) -> ImageMessage:
    series = _int(obj, "series_id", "image message")
    image_id = _int(obj, "image_id", "image message")
    where = f"image {image_id} of series {series}"
    data = obj.get("data")
    if not isinstance(data, Mapping) or not data:
        _fail(f"{where}: 'data' must map channel names to arrays, got {type(data).__name__}", "bad_message")
    for name, arr in data.items():
        if not isinstance(name, str):
            _fail(f"{where}: channel names must be strings, got {name!r:.40}", "bad_message")
        if not isinstance(arr, EncodedArray):
            _fail(f"{where}: channel {name!r} is not a tag-{TAG_MULTI_DIM} array (got {type(arr).__name__})",
                  "bad_message")
    return ImageMessage(series, _optional_str(obj, "series_unique_id", where), image_id, dict(data),
                        _rational(obj.get("real_time"), "real_time", where),
                        _rational(obj.get("start_time"), "start_time", where),
                        _rational(obj.get("stop_time"), "stop_time", where),
                        {k: v for k, v in obj.items() if k != "data"})


def decode_message(data) -> Message:
    """Parse one Stream V2 message (arrays stay compressed).

    Raises
    ------
    FrameError
        Not a valid Stream V2 message; ``code`` says what (module docstring).
    """
    obj = _loads(data)
    if not isinstance(obj, Mapping):
        _fail(f"a Stream V2 message is a CBOR map, got {type(obj).__name__}", "bad_message")
    kind = obj.get("type")
    if kind == "start":
        return _start(obj)
    if kind == "image":
        return _image(obj)
    if kind == "end":
        return EndMessage(_int(obj, "series_id", "end message"), _optional_str(obj, "series_unique_id",
                                                                              "end message"), dict(obj))
    _fail(f"unknown message type {kind!r:.40}; expected 'start', 'image' or 'end'", "bad_message")


def check_image(image: ImageMessage, start: StartMessage | None) -> None:
    """Does ``image`` belong to the series ``start`` opened, with its channels, shape and dtype?"""
    where = f"image {image.image_id} of series {image.series_id}"
    if start is None or start.series_id != image.series_id or (
            start.series_unique_id and image.series_unique_id and start.series_unique_id != image.series_unique_id):
        known = "none" if start is None else f"{start.series_id}"
        _fail(f"{where}: no start message for this series (the open series is {known})", "unknown_series")
    for name, arr in image.data.items():
        if name not in start.channels:
            _fail(f"{where}: channel {name!r} is not among the start message's {list(start.channels)}",
                  "unknown_channel")
        if start.image_shape is not None and arr.shape != start.image_shape:
            _fail(f"{where}, {name}: shape {list(arr.shape)} disagrees with the start message's "
                  f"{list(start.image_shape)} (image_size_y, image_size_x)", "shape_mismatch")
        if start.image_dtype is not None and (arr.dtype.kind, arr.dtype.itemsize) != (
                start.image_dtype.kind, start.image_dtype.itemsize):
            _fail(f"{where}, {name}: dtype {arr.dtype.str} disagrees with the start message's image_dtype "
                  f"{start.image_dtype.name}", "dtype_mismatch")


# ---------------------------------------------------------------- encoding

def _dumps(obj: dict) -> bytes:
    import cbor2

    return cbor2.dumps(cbor2.CBORTag(TAG_SELF_DESCRIBE, obj))


def encode_array(array: np.ndarray, compression: str | None = "bslz4"):
    """The CBOR item (tags 40 + typed array [+ 56500]) for ``array``."""
    import cbor2

    if not isinstance(array, np.ndarray):
        raise InvalidArgumentType(f"array: expected numpy.ndarray, got {type(array).__name__}")
    if not 1 <= array.ndim <= MAX_NDIM or array.size == 0:
        raise InvalidArgument(f"array: expected 1 to {MAX_NDIM} dimensions and some elements, got {array.shape}")
    tag = _TAG_FOR_DTYPE.get(array.dtype.str)
    if tag is None:
        raise InvalidArgument(f"array: dtype {array.dtype.str} has no RFC 8746 typed-array tag")
    if compression is None:
        content = np.ascontiguousarray(array).tobytes()
    else:
        if compression not in _compression.ALGORITHMS:
            raise InvalidArgument(f"compression: expected one of {_compression.ALGORITHMS} or None, "
                                  f"got {compression!r}")
        content = cbor2.CBORTag(TAG_DECTRIS_COMPRESSION,
                                [compression, array.dtype.itemsize, _compression.compress(array, compression)])
    return cbor2.CBORTag(TAG_MULTI_DIM, [list(array.shape), cbor2.CBORTag(tag, content)])


def _check_series(series_id) -> int:
    if isinstance(series_id, bool) or not isinstance(series_id, (int, np.integer)) or series_id < 0:
        raise InvalidArgument(f"series_id: expected an integer >= 0, got {series_id!r}")
    return int(series_id)


def encode_start(series_id: int, *, image_shape, image_dtype="uint16", channels=("threshold_1",),
                 number_of_images: int | None = None, series_unique_id: str | None = None,
                 threshold_energy: Mapping[str, float] | None = None, extra: Mapping[str, Any] | None = None) -> bytes:
    """A start message.  ``extra`` adds keys (``incident_energy``, ``pixel_size_x``, masks as arrays...)."""
    series_id = _check_series(series_id)
    shape = tuple(image_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise InvalidArgument(f"image_shape: expected (H, W) with sizes >= 1, got {image_shape!r}")
    if np.dtype(image_dtype).name not in IMAGE_DTYPES:
        raise InvalidArgument(f"image_dtype: expected one of {IMAGE_DTYPES}, got {image_dtype!r}")
    channels = list(channels)
    if not channels or not all(isinstance(c, str) and c for c in channels):
        raise InvalidArgument(f"channels: expected a non-empty list of names, got {channels!r}")
    obj: dict[str, Any] = {"type": "start", "series_id": series_id, "channels": channels,
                           "image_size_x": int(shape[1]), "image_size_y": int(shape[0]),
                           "image_dtype": np.dtype(image_dtype).name}
    if series_unique_id is not None:
        obj["series_unique_id"] = str(series_unique_id)
    if number_of_images is not None:
        obj["number_of_images"] = int(number_of_images)
    obj["threshold_energy"] = dict(threshold_energy or {c: 0.0 for c in channels})
    for key, value in (extra or {}).items():
        if key in obj:
            raise InvalidArgument(f"extra: key {key!r} is set by encode_start itself")
        obj[key] = encode_array(value, None) if isinstance(value, np.ndarray) else value
    return _dumps(obj)


def _rational_out(seconds: float | None, key: str):
    if seconds is None:
        return None
    if not math.isfinite(float(seconds)) or seconds < 0:
        raise InvalidArgument(f"{key}: expected seconds >= 0, got {seconds!r}")
    return [int(round(float(seconds) * 1_000_000_000)), 1_000_000_000]


def encode_image(series_id: int, image_id: int, arrays, *, compression: str | None = "bslz4",
                 series_unique_id: str | None = None, real_time: float | None = None,
                 start_time: float | None = None, stop_time: float | None = None,
                 extra: Mapping[str, Any] | None = None) -> bytes:
    """An image message; ``arrays`` is one (H, W) array (channel ``threshold_1``) or ``{channel: array}``."""
    series_id = _check_series(series_id)
    if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)) or image_id < 0:
        raise InvalidArgument(f"image_id: expected an integer >= 0, got {image_id!r}")
    if isinstance(arrays, np.ndarray):
        arrays = {"threshold_1": arrays}
    if not isinstance(arrays, Mapping) or not arrays:
        raise InvalidArgumentType(f"arrays: expected an array or a non-empty mapping channel -> array, "
                                  f"got {type(arrays).__name__}")
    obj: dict[str, Any] = {"type": "image", "series_id": series_id, "image_id": int(image_id)}
    if series_unique_id is not None:
        obj["series_unique_id"] = str(series_unique_id)
    for key, value in (("real_time", real_time), ("start_time", start_time), ("stop_time", stop_time)):
        if value is not None:
            obj[key] = _rational_out(value, key)
    obj.update(extra or {})
    obj["data"] = {str(name): encode_array(arr, compression) for name, arr in arrays.items()}
    return _dumps(obj)


def encode_end(series_id: int, *, series_unique_id: str | None = None,
               extra: Mapping[str, Any] | None = None) -> bytes:
    obj: dict[str, Any] = {"type": "end", "series_id": _check_series(series_id)}
    if series_unique_id is not None:
        obj["series_unique_id"] = str(series_unique_id)
    obj.update(extra or {})
    return _dumps(obj)


def _encoded_item(arr: EncodedArray):
    import cbor2

    tag = _TAG_FOR_DTYPE.get(arr.dtype.str)
    if tag is None:
        raise InvalidArgument(f"array: dtype {arr.dtype.str} has no RFC 8746 typed-array tag")
    content = arr.data if arr.compression is None else cbor2.CBORTag(
        TAG_DECTRIS_COMPRESSION, [arr.compression, arr.elem_size or arr.dtype.itemsize, arr.data])
    number = TAG_MULTI_DIM if arr.order == "C" else TAG_MULTI_DIM_COLUMN_MAJOR
    return cbor2.CBORTag(number, [list(arr.shape), cbor2.CBORTag(tag, content)])


#: Uncompressed arrays of a start message above this size are bslz4-compressed by :func:`to_stream2`
#: (a V1 start at header detail "all" carries flat field and pixel mask uncompressed, over Kafka's limit).
COMPRESS_START_ARRAYS_ABOVE = 1 << 20


def _plain(value, compress_large: bool = False):
    if isinstance(value, EncodedArray):
        if compress_large and value.compression is None and value.nbytes > COMPRESS_START_ARRAYS_ABOVE \
                and value.dtype.str in _TAG_FOR_DTYPE:
            return encode_array(np.ascontiguousarray(value.decode()), "bslz4")
        return _encoded_item(value)
    if isinstance(value, Mapping):
        return {k: _plain(v, compress_large) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, compress_large) for v in value]
    return value


def to_stream2(message: Message) -> bytes:
    """Write a decoded message (from Stream V1 or V2) as a Stream V2 message; arrays are not recompressed."""
    if isinstance(message, StartMessage):
        obj = _plain(dict(message.fields), compress_large=True)
        obj.update(type="start", series_id=message.series_id, channels=list(message.channels))
        if message.image_shape is not None:
            obj.update(image_size_y=message.image_shape[0], image_size_x=message.image_shape[1])
        if message.image_dtype is not None:
            obj["image_dtype"] = message.image_dtype.name
        if message.number_of_images is not None:
            obj["number_of_images"] = message.number_of_images
    elif isinstance(message, ImageMessage):
        obj = _plain(dict(message.fields))
        obj.update(type="image", series_id=message.series_id, image_id=message.image_id,
                   data={k: _encoded_item(v) for k, v in message.data.items()})
        for key in ("real_time", "start_time", "stop_time"):
            value = getattr(message, key)
            if value is not None:
                obj[key] = _rational_out(value, key)
    elif isinstance(message, EndMessage):
        obj = _plain(dict(message.fields))
        obj.update(type="end", series_id=message.series_id)
    else:
        raise InvalidArgumentType(f"message: expected a Stream V2 message, got {type(message).__name__}")
    if message.series_unique_id is not None:
        obj["series_unique_id"] = message.series_unique_id
    obj.pop("htype", None)
    return _dumps(obj)
