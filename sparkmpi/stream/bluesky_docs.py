"""Bluesky documents in, ptychography frames out: a pure state object (no I/O).

A Bluesky RunEngine emits, per run (scan), a ``start`` document, one
``descriptor`` per data stream, ``event`` (or ``event_page``) documents, for
detectors that write files ``resource`` and ``datum`` (or ``datum_page``)
documents, and a ``stop`` document.  :class:`DocumentStream` follows any
number of runs at once, keyed by their start document's ``uid``, and turns
each primary-stream event into a :class:`FrameOut` (the scan uid, the frame
index, its position in object pixels, the image or the datum to read it
from).  Anything wrong becomes a :class:`Rejected` action with a ``code`` and a
reason naming what was wrong; the stream goes on.

Geometry: the start document's ``ptycho`` metadata (written by
:func:`sparkmpi.bluesky.scan.scan_metadata`)::

    {"pixel_size": p,            # motor units (e.g. um) per object pixel
     "origin": [y0, x0],         # motor position whose frame's top-left is object pixel (0, 0)
     "object_shape": [H, W],     # pixels
     "x_motor": "x", "y_motor": "y",   # event data keys of the motor readbacks
     "image_key": "ptycho_det_image",  # event data key of the detector image
     "planned_positions": [[y, x], ...]}   # motor units, the plan's points in order (optional)

A frame at motor position ``(x, y)`` covers object rows
``[row, row + h)`` and columns ``[col, col + w)`` with
``row = (y - y0) / p`` and ``col = (x - x0) / p`` (floats; rounded by the
reconstruction).  The frame shape and dtype come from the descriptor's data
key (``shape``, ``dtype_numpy``); a primary descriptor that announces another
shape than the scan's first one is refused (``shape_changed``) with all its
events.

Rejection codes: ``undecodable``, ``bad_document``, ``duplicate_start``,
``no_geometry``, ``unknown_scan``, ``unknown_descriptor``, ``unknown_resource``,
``after_stop``, ``no_image_key``, ``shape_changed``, ``out_of_order``,
``bad_event``, ``missing_datum``, ``position_out_of_range``, ``scan_aborted``
(the stop document of a run whose exit status is not ``success``: its frames
so far are kept, the stop document is kept aside with the reason).  The
adapter adds ``unreadable_datum`` when a datum's file cannot be read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import InvalidArgument, SparkMPIError

__all__ = ["DocumentError", "DocumentStream", "ScanGeometry", "ScanOpened", "FrameOut", "ScanClosed", "Rejected",
           "decode_document", "encode_document", "DOCUMENT_NAMES"]

DOCUMENT_NAMES = ("start", "descriptor", "event", "event_page", "resource", "datum", "datum_page", "stop")
PRIMARY = "primary"


class DocumentError(SparkMPIError, ValueError):
    """A Kafka message that is not a ``(name, document)`` pair; ``code`` says what."""

    def __init__(self, message: str, code: str = "undecodable"):
        super().__init__(message)
        self.code = code


def encode_document(name: str, doc: Mapping) -> bytes:
    """``(name, doc)`` as bluesky-kafka's default serializer writes it (msgpack, NumPy arrays inline)."""
    import msgpack
    import msgpack_numpy

    return msgpack.packb((name, doc), default=msgpack_numpy.encode)


def decode_document(value) -> tuple[str, dict]:
    """A bluesky-kafka message value back to ``(name, doc)``; :class:`DocumentError` if it is not one."""
    import msgpack
    import msgpack_numpy

    if value is None:
        raise DocumentError("message has no value (tombstone)", "undecodable")
    try:
        obj = msgpack.unpackb(value, object_hook=msgpack_numpy.decode, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise DocumentError(f"message is not msgpack: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(obj, (list, tuple)) or len(obj) != 2 or not isinstance(obj[0], str) \
            or not isinstance(obj[1], dict):
        raise DocumentError(f"expected a (name, document) pair, got {type(obj).__name__} {str(obj)[:80]!r}")
    if obj[0] not in DOCUMENT_NAMES:
        raise DocumentError(f"unknown document name {obj[0]!r}; expected one of {', '.join(DOCUMENT_NAMES)}",
                            "bad_document")
    return obj[0], obj[1]


# ---------------------------------------------------------------- actions

@dataclass(frozen=True)
class ScanGeometry:
    """What the start and primary descriptor documents say about a scan."""

    uid: str
    pixel_size: float
    origin: tuple[float, float]
    object_shape: tuple[int, int]
    x_motor: str
    y_motor: str
    image_key: str
    planned_positions: np.ndarray | None = None   # (n, 2) object pixels (row, col) of frame top-lefts
    frame_shape: tuple[int, int] | None = None
    dtype: str | None = None
    external: bool = False
    probe_diameter: float | None = None   # pixels, when the start document says
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def points_planned(self) -> int | None:
        return None if self.planned_positions is None else int(len(self.planned_positions))

    def to_pixels(self, x: float, y: float) -> tuple[float, float]:
        """Motor position (x, y) to the frame's top-left (row, col) in object pixels."""
        return (y - self.origin[0]) / self.pixel_size, (x - self.origin[1]) / self.pixel_size


@dataclass(frozen=True)
class ScanOpened:
    uid: str
    geometry: ScanGeometry


@dataclass(frozen=True)
class FrameOut:
    """One frame of a scan: the image inline (``array``) or where to read it (``datum``)."""

    uid: str
    index: int
    position: tuple[float, float]   # (row, col) object pixels
    time: float
    array: np.ndarray | None = None
    datum: tuple[dict, dict] | None = None   # (resource document, datum document)


@dataclass(frozen=True)
class ScanClosed:
    uid: str
    exit_status: str
    reason: str
    frames: int   # frames this stream turned out for the scan


@dataclass(frozen=True)
class Rejected:
    """A document (or one event of a page) that could not be used: kept aside with the reason."""

    code: str
    reason: str
    name: str
    doc: Any
    uid: str | None = None


# ---------------------------------------------------------------- state

@dataclass
class _Run:
    geometry: ScanGeometry
    descriptors: dict = field(default_factory=dict)   # uid -> (stream name, accepted)
    resources: dict = field(default_factory=dict)
    datums: dict = field(default_factory=dict)
    last_seq: dict = field(default_factory=dict)      # descriptor uid -> last seq_num
    frames: int = 0
    stopped: bool = False


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _geometry(doc: dict) -> ScanGeometry:
    """The start document's ``ptycho`` metadata; InvalidArgument naming the bad field."""
    md = doc.get("ptycho")
    if not isinstance(md, Mapping):
        raise InvalidArgument("start document has no 'ptycho' geometry metadata (pixel_size, origin, "
                              "object_shape, x_motor, y_motor, image_key)")
    p = _number(md.get("pixel_size"))
    if p is None or p <= 0:
        raise InvalidArgument(f"ptycho.pixel_size: expected motor units per pixel > 0, got {md.get('pixel_size')!r}")
    origin = md.get("origin")
    if not isinstance(origin, (list, tuple)) or len(origin) != 2 or any(_number(v) is None for v in origin):
        raise InvalidArgument(f"ptycho.origin: expected [y0, x0] in motor units, got {origin!r}")
    shape = md.get("object_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise InvalidArgument(f"ptycho.object_shape: expected [H, W] positive integers, got {shape!r}")
    names = {}
    for key in ("x_motor", "y_motor", "image_key"):
        if not isinstance(md.get(key), str) or not md[key]:
            raise InvalidArgument(f"ptycho.{key}: expected a data key name, got {md.get(key)!r}")
        names[key] = md[key]
    planned = md.get("planned_positions")
    pixels = None
    if planned is not None:
        arr = np.asarray(planned, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
            raise InvalidArgument(f"ptycho.planned_positions: expected [[y, x], ...], got shape {arr.shape}")
        pixels = (arr - np.asarray(origin, np.float64)) / p
    diameter = _number(md.get("probe_diameter"))
    return ScanGeometry(doc["uid"], p, (float(origin[0]), float(origin[1])), (int(shape[0]), int(shape[1])),
                        names["x_motor"], names["y_motor"], names["image_key"], pixels,
                        probe_diameter=diameter if diameter and diameter > 0 else None,
                        metadata={k: v for k, v in doc.items() if k != "ptycho"})


class DocumentStream:
    """Follows Bluesky runs by start uid and turns their events into frames.

    ``feed(name, doc)`` returns a list of actions (:class:`ScanOpened`,
    :class:`FrameOut`, :class:`ScanClosed`, :class:`Rejected`); it never raises
    for bad documents.  ``scans`` maps each known uid to its
    :class:`ScanGeometry`, ``closed`` each finished uid to its
    :class:`ScanClosed`.
    """

    def __init__(self):
        self._runs: dict[str, _Run] = {}
        self._descriptor_run: dict[str, str] = {}
        self._resource_run: dict[str, str] = {}
        self.closed: dict[str, ScanClosed] = {}
        self.counts: dict[str, int] = {}

    @property
    def scans(self) -> dict[str, ScanGeometry]:
        return {uid: run.geometry for uid, run in self._runs.items()}

    def open_scans(self) -> list[str]:
        return [uid for uid, run in self._runs.items() if not run.stopped]

    def frames_of(self, uid: str) -> int:
        run = self._runs.get(uid)
        return 0 if run is None else run.frames

    def feed(self, name: str, doc: Any) -> list:
        """One document in, the actions it causes out."""
        if name not in DOCUMENT_NAMES:
            return [Rejected("bad_document", f"unknown document name {name!r}", str(name), doc)]
        if not isinstance(doc, Mapping):
            return [Rejected("bad_document", f"{name} document is a {type(doc).__name__}, not a mapping", name, doc)]
        out = getattr(self, f"_{name}")(doc)
        for action in out:
            key = type(action).__name__ if not isinstance(action, Rejected) else f"rejected.{action.code}"
            self.counts[key] = self.counts.get(key, 0) + 1
        return out

    # -- each document kind ---------------------------------------------------
    def _start(self, doc):
        uid = doc.get("uid")
        if not isinstance(uid, str) or not uid:
            return [Rejected("bad_document", "start document has no uid", "start", doc)]
        if uid in self._runs:
            return [Rejected("duplicate_start", f"a start document with uid {uid} was seen already", "start",
                             doc, uid)]
        try:
            geometry = _geometry(doc)
        except InvalidArgument as exc:
            return [Rejected("no_geometry", f"scan {uid}: {exc}", "start", doc, uid)]
        self._runs[uid] = _Run(geometry)
        return [ScanOpened(uid, geometry)]

    def _run_of(self, name, doc, key):
        uid = doc.get(key)
        run = self._runs.get(uid) if isinstance(uid, str) else None
        if run is None:
            return None, [Rejected("unknown_scan", f"{name} document refers to scan {uid!r}, whose start "
                                   f"document was not seen (out of order, or another stream's)", name, doc,
                                   uid if isinstance(uid, str) else None)]
        if run.stopped:
            return None, [Rejected("after_stop", f"{name} document for scan {uid} after its stop document",
                                   name, doc, uid)]
        return run, None

    def _descriptor(self, doc):
        run, bad = self._run_of("descriptor", doc, "run_start")
        if bad:
            return bad
        uid, geo = doc.get("uid"), run.geometry
        if not isinstance(uid, str) or not isinstance(doc.get("data_keys"), Mapping):
            return [Rejected("bad_document", f"scan {geo.uid}: descriptor without uid or data_keys", "descriptor",
                             doc, geo.uid)]
        stream = doc.get("name", PRIMARY)
        self._descriptor_run[uid] = geo.uid
        if stream != PRIMARY:
            run.descriptors[uid] = (stream, False)   # baseline, monitors: not frames
            return []
        key = doc["data_keys"].get(geo.image_key)
        if not isinstance(key, Mapping):
            run.descriptors[uid] = (stream, False)
            return [Rejected("no_image_key", f"scan {geo.uid}: primary descriptor has no data key "
                             f"{geo.image_key!r} (has {sorted(doc['data_keys'])})", "descriptor", doc, geo.uid)]
        shape = key.get("shape")
        if not isinstance(shape, (list, tuple)) or len([s for s in shape if s not in (0, 1)]) != 2:
            run.descriptors[uid] = (stream, False)
            return [Rejected("bad_document", f"scan {geo.uid}: image {geo.image_key!r} has shape {shape!r}; "
                             f"expected a 2-D frame", "descriptor", doc, geo.uid)]
        frame_shape = tuple(int(s) for s in shape if s not in (0, 1))
        if geo.frame_shape is not None and geo.frame_shape != frame_shape:
            run.descriptors[uid] = (stream, False)
            return [Rejected("shape_changed", f"scan {geo.uid}: a new primary descriptor announces frames of "
                             f"shape {list(frame_shape)}, the scan's frames are {list(geo.frame_shape)}; its events "
                             f"are refused", "descriptor", doc, geo.uid)]
        dtype = key.get("dtype_numpy") or "<f4"
        external = bool(key.get("external"))
        if geo.frame_shape is None:
            geo = run.geometry = ScanGeometry(**{**geo.__dict__, "frame_shape": frame_shape, "dtype": str(dtype),
                                                 "external": external})
        run.descriptors[uid] = (stream, True)
        return []

    def _resource(self, doc):
        run, bad = self._run_of("resource", doc, "run_start")
        if bad:
            return bad
        if not isinstance(doc.get("uid"), str):
            return [Rejected("bad_document", "resource document without uid", "resource", doc, run.geometry.uid)]
        run.resources[doc["uid"]] = dict(doc)
        self._resource_run[doc["uid"]] = run.geometry.uid
        return []

    def _datum(self, doc):
        res = doc.get("resource")
        uid = self._resource_run.get(res) if isinstance(res, str) else None
        if uid is None:
            return [Rejected("unknown_resource", f"datum {doc.get('datum_id')!r} refers to resource {res!r}, "
                             f"which was not seen", "datum", doc)]
        run = self._runs[uid]
        if run.stopped:
            return [Rejected("after_stop", f"datum for scan {uid} after its stop document", "datum", doc, uid)]
        if not isinstance(doc.get("datum_id"), str):
            return [Rejected("bad_document", "datum document without datum_id", "datum", doc, uid)]
        run.datums[doc["datum_id"]] = (run.resources[res], dict(doc))
        return []

    def _datum_page(self, doc):
        ids = doc.get("datum_id")
        kwargs = doc.get("datum_kwargs") or {}
        if not isinstance(ids, (list, tuple)):
            return [Rejected("bad_document", "datum_page without a datum_id list", "datum_page", doc)]
        out = []
        for i, datum_id in enumerate(ids):
            one = {k: v[i] for k, v in kwargs.items()} if isinstance(kwargs, Mapping) else {}
            out += self._datum({"resource": doc.get("resource"), "datum_id": datum_id, "datum_kwargs": one})
        return out

    def _event_page(self, doc):
        seq = doc.get("seq_num")
        data, times = doc.get("data"), doc.get("time")
        if not isinstance(seq, (list, tuple)) or not isinstance(data, Mapping) or not isinstance(times, (list, tuple)):
            return [Rejected("bad_document", "event_page without seq_num, time or data columns", "event_page", doc)]
        out = []
        for i in range(len(seq)):
            try:
                event = {"descriptor": doc.get("descriptor"), "seq_num": seq[i], "time": times[i],
                         "uid": (doc.get("uid") or [None] * len(seq))[i],
                         "data": {k: v[i] for k, v in data.items()}}
            except (IndexError, TypeError):
                out.append(Rejected("bad_document", f"event_page columns shorter than its {len(seq)} seq_nums",
                                    "event_page", doc))
                break
            out += self._event(event)
        return out

    def _event(self, doc):
        desc = doc.get("descriptor")
        uid = self._descriptor_run.get(desc) if isinstance(desc, str) else None
        if uid is None:
            return [Rejected("unknown_descriptor", f"event {doc.get('seq_num')!r} refers to descriptor {desc!r}, "
                             f"which was not seen (out of order, or another stream's)", "event", doc)]
        run = self._runs[uid]
        geo = run.geometry
        if run.stopped:
            return [Rejected("after_stop", f"event for scan {uid} after its stop document", "event", doc, uid)]
        stream, accepted = run.descriptors[desc]
        if stream != PRIMARY:
            return []
        seq = doc.get("seq_num")
        if not accepted:
            return [Rejected("shape_changed", f"scan {uid}: event {seq!r} belongs to a refused descriptor",
                             "event", doc, uid)]
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 1:
            return [Rejected("bad_event", f"scan {uid}: event seq_num {seq!r} is not an integer >= 1", "event",
                             doc, uid)]
        last = run.last_seq.get(desc, 0)
        if seq <= last:
            return [Rejected("out_of_order", f"scan {uid}: event seq_num {seq} after {last} (repeated or out "
                             f"of order)", "event", doc, uid)]
        data = doc.get("data")
        if not isinstance(data, Mapping):
            return [Rejected("bad_event", f"scan {uid}: event {seq} has no data", "event", doc, uid)]
        x, y = _number(data.get(geo.x_motor)), _number(data.get(geo.y_motor))
        if x is None or y is None:
            return [Rejected("bad_event", f"scan {uid}: event {seq} lacks finite motor readings "
                             f"{geo.x_motor!r}, {geo.y_motor!r}", "event", doc, uid)]
        row, col = geo.to_pixels(x, y)
        h, w = geo.frame_shape
        if not (-0.5 <= row <= geo.object_shape[0] - h + 0.5 and -0.5 <= col <= geo.object_shape[1] - w + 0.5):
            return [Rejected("position_out_of_range", f"scan {uid}: event {seq} at x={x:g}, y={y:g} puts the frame "
                             f"at pixel ({row:.1f}, {col:.1f}), outside the object {list(geo.object_shape)}",
                             "event", doc, uid)]
        t = _number(doc.get("time")) or 0.0
        value = data.get(geo.image_key)
        if geo.external:
            found = run.datums.get(value) if isinstance(value, str) else None
            if found is None:
                return [Rejected("missing_datum", f"scan {uid}: event {seq} refers to datum {value!r}, which was "
                                 f"not seen", "event", doc, uid)]
            run.frames += 1
            run.last_seq[desc] = int(seq)
            return [FrameOut(uid, int(seq) - 1, (row, col), t, datum=found)]
        array = np.asarray(value) if value is not None else None
        if array is not None and array.shape != geo.frame_shape and array.size == h * w:
            array = array.reshape(geo.frame_shape)   # a (1, H, W) image from an area detector
        if array is None or array.dtype.kind not in "uif" or array.shape != geo.frame_shape:
            got = None if array is None else (array.shape, array.dtype.str)
            return [Rejected("bad_event", f"scan {uid}: event {seq} image is {got}, expected shape "
                             f"{list(geo.frame_shape)} numbers", "event", doc, uid)]
        run.frames += 1
        run.last_seq[desc] = int(seq)
        return [FrameOut(uid, int(seq) - 1, (row, col), t, array=array)]

    def _stop(self, doc):
        run, bad = self._run_of("stop", doc, "run_start")
        if bad:
            return bad
        uid = run.geometry.uid
        run.stopped = True
        status = str(doc.get("exit_status", "success"))
        reason = str(doc.get("reason", ""))
        closed = ScanClosed(uid, status, reason, run.frames)
        self.closed[uid] = closed
        # a finished run's datum table is no longer needed
        run.datums.clear()
        out = [closed]
        if status != "success":
            out.append(Rejected("scan_aborted", f"scan {uid} ended with exit status {status!r}"
                                f"{': ' + reason if reason else ''}; its {run.frames} frames are kept", "stop",
                                doc, uid))
        return out
