"""DECTRIS SIMPLON Stream V1 (the ``legacy`` format): multipart JSON headers and binary blobs; pure, no I/O.

A series, as parts of ZeroMQ messages (one message per group below; a
simulator may join groups into one message, so this decoder reads parts,
not messages)::

    {"htype": "dheader-1.0", "series": S, "header_detail": "none"|"basic"|"all"}
    detail basic/all:  the detector configuration (JSON object)
    detail all:        {"htype": "flatfield-1.0", "shape": [x, y], "type": "float32"}, blob
                       {"htype": "dpixelmask-1.0", ...}, blob
                       {"htype": "dcountrate_table-1.0", ...}, blob
    per image:         {"htype": "dimage-1.0", "series": S, "frame": I, "hash": ...}
                       {"htype": "dimage_d-1.0", "shape": [x, y], "type": "uint16",
                        "encoding": "bs16-lz4<" | "bs32-lz4<" | "bs8-lz4<" | "lz4<" | "<", "size": N}
                       the blob (N bytes)
                       {"htype": "dconfig-1.0", "start_time": ns, "stop_time": ns, "real_time": ns}
    end:               {"htype": "dseries_end-1.0", "series": S}

``shape`` is ``[x, y]`` (width first); the frames here are (y, x) arrays.
:class:`Stream1Decoder` turns the parts into the Stream V2 message classes
of :mod:`.stream2` (a start, images with the blob still compressed, an end),
so everything downstream (the bridge, the ranks) handles one kind.  A V1
``lz4<`` blob (one raw LZ4 block) is given the HDF5 framing of V2's ``lz4``
without being decompressed; a ``bs*-lz4<`` blob already has it.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from ..frames import FrameError
from .stream2 import EncodedArray, EndMessage, ImageMessage, StartMessage

HEADER = "dheader-1.0"
IMAGE = "dimage-1.0"
IMAGE_D = "dimage_d-1.0"
CONFIG = "dconfig-1.0"
END = "dseries_end-1.0"
DETAIL_ARRAYS = ("flatfield-1.0", "dpixelmask-1.0", "dcountrate_table-1.0")
DTYPES = ("uint8", "uint16", "uint32", "float32")
CHANNEL = "threshold_1"


def _json(part: bytes, expected: str) -> dict:
    try:
        obj = json.loads(bytes(part))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FrameError(f"expected the {expected} JSON part, got {len(part)} bytes that are not JSON",
                         "bad_header") from None
    if not isinstance(obj, dict):
        raise FrameError(f"expected the {expected} JSON object, got {type(obj).__name__}", "bad_header")
    return obj


def _int(obj: dict, key: str, where: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FrameError(f"{where}: {key!r} must be an integer >= 0, got {value!r:.60}", "bad_header")
    return value


def _array(desc: dict, blob: bytes, where: str) -> EncodedArray:
    shape = desc.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n >= 1 for n in shape)):
        raise FrameError(f"{where}: 'shape' must be [x, y] with sizes >= 1, got {shape!r:.60}", "bad_header")
    name = desc.get("type")
    if name not in DTYPES:
        raise FrameError(f"{where}: 'type' must be one of {', '.join(DTYPES)}, got {name!r:.40}", "bad_dtype")
    dtype = np.dtype(name).newbyteorder("<")
    encoding = desc.get("encoding", "<")
    size = desc.get("size")
    if size is not None and size != len(blob):
        raise FrameError(f"{where}: 'size' says {size} bytes, the data part has {len(blob)}", "size_mismatch")
    y_x = (shape[1], shape[0])
    nbytes = math.prod(y_x) * dtype.itemsize
    if encoding == "<":
        if len(blob) != nbytes:
            raise FrameError(f"{where}: uncompressed {list(y_x)} x {dtype.str} needs {nbytes} bytes, got {len(blob)}",
                             "size_mismatch")
        return EncodedArray(y_x, dtype, bytes(blob))
    if encoding in ("bs8-lz4<", "bs16-lz4<", "bs32-lz4<"):
        bits = int(encoding[2:encoding.index("-")])
        if bits != dtype.itemsize * 8:
            raise FrameError(f"{where}: encoding {encoding} disagrees with type {name}", "dtype_mismatch")
        return EncodedArray(y_x, dtype, bytes(blob), "bslz4", dtype.itemsize)
    if encoding == "lz4<":
        framed = struct.pack(">QII", nbytes, nbytes, len(blob)) + bytes(blob)
        return EncodedArray(y_x, dtype, framed, "lz4", dtype.itemsize)
    raise FrameError(f"{where}: unknown encoding {encoding!r:.40}; expected '<', 'lz4<' or 'bs8/16/32-lz4<'",
                     "unknown_compression")


class Stream1Decoder:
    """Feed it the parts of a Stream V1 connection in order; it returns messages as they complete.

    :meth:`feed` returns a list of :class:`~.stream2.StartMessage`,
    :class:`~.stream2.ImageMessage`, :class:`~.stream2.EndMessage` or
    :class:`~sparkmpi.stream.frames.FrameError` (a part that does not fit:
    the decoder then waits for the next header part).
    """

    def __init__(self):
        self._reset()
        self.series: int | None = None

    def _reset(self) -> None:
        self._want = "header"
        self._pending: dict = {}

    def feed(self, part: bytes) -> list:
        try:
            out = self._step(bytes(part))
        except FrameError as exc:
            self._reset()
            return [exc]
        return [out] if out is not None else []

    def _step(self, part: bytes):
        want, p = self._want, self._pending
        if want == "header":
            obj = _json(part, "header")
            htype = obj.get("htype")
            if htype == HEADER:
                detail = obj.get("header_detail", "basic")
                if detail not in ("none", "basic", "all"):
                    raise FrameError(f"dheader-1.0: 'header_detail' must be none, basic or all, got {detail!r:.40}",
                                     "bad_header")
                self._pending = {"series": _int(obj, "series", "dheader-1.0"), "detail": detail, "config": {},
                                 "arrays": {}}
                if detail == "none":
                    return self._start()
                self._want = "config"
                return None
            if htype == IMAGE:
                self._pending = {"series": _int(obj, "series", IMAGE), "frame": _int(obj, "frame", IMAGE)}
                self._want = "image_d"
                return None
            if htype == END:
                series = _int(obj, "series", END)
                return EndMessage(series, None, obj)
            raise FrameError(f"unexpected part with htype {htype!r:.40}; expected {HEADER}, {IMAGE} or {END}",
                             "bad_kind")
        if want == "config":
            p["config"] = _json(part, "detector configuration")
            if p["detail"] == "basic":
                return self._start()
            self._want = "detail_header"
            return None
        if want == "detail_header":
            obj = _json(part, "detail array header")
            if obj.get("htype") not in DETAIL_ARRAYS:
                raise FrameError(f"expected a {', '.join(DETAIL_ARRAYS)} header, got htype "
                                 f"{obj.get('htype')!r:.40}", "bad_kind")
            p["detail_header"] = obj
            self._want = "detail_blob"
            return None
        if want == "detail_blob":
            obj = p.pop("detail_header")
            p["arrays"][obj["htype"]] = _array(obj, part, obj["htype"])
            if len(p["arrays"]) == len(DETAIL_ARRAYS):
                return self._start()
            self._want = "detail_header"
            return None
        if want == "image_d":
            obj = _json(part, IMAGE_D)
            if obj.get("htype") != IMAGE_D:
                raise FrameError(f"image {p['frame']}: expected {IMAGE_D}, got htype {obj.get('htype')!r:.40}",
                                 "bad_kind")
            p["desc"] = obj
            self._want = "blob"
            return None
        if want == "blob":
            p["array"] = _array(p["desc"], part, f"image {p['frame']} of series {p['series']}")
            self._want = "dconfig"
            return None
        if want == "dconfig":
            obj = _json(part, CONFIG)
            if obj.get("htype") != CONFIG:
                raise FrameError(f"image {p['frame']}: expected {CONFIG}, got htype {obj.get('htype')!r:.40}",
                                 "bad_kind")
            self._reset()
            times = {k: (obj[k] / 1e9 if isinstance(obj.get(k), (int, float)) else None)
                     for k in ("real_time", "start_time", "stop_time")}
            return ImageMessage(p["series"], None, p["frame"], {CHANNEL: p["array"]}, times["real_time"],
                                times["start_time"], times["stop_time"], {"hash": p.get("hash"), "v1": True})
        raise AssertionError(want)

    def _start(self) -> StartMessage:
        p = self._pending
        self._reset()
        config = p["config"]
        x, y = config.get("x_pixels_in_detector"), config.get("y_pixels_in_detector")
        shape = (y, x) if isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0 else None
        depth = config.get("bit_depth_image")
        dtype = {8: np.dtype("uint8"), 16: np.dtype("uint16"), 32: np.dtype("uint32")}.get(depth)
        count = config.get("nimages")
        fields = dict(config, type="start", series_id=p["series"], header_detail=p["detail"])
        for name, arr in p["arrays"].items():
            fields[name] = arr
        self.series = p["series"]
        return StartMessage(p["series"], None, (CHANNEL,), shape, dtype,
                            count * config.get("ntrigger", 1) if isinstance(count, int) else None, fields)
