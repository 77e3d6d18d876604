"""A detector simulator: frame sources, a Kafka publisher and a ZeroMQ PUSH/PULL pair.

Frame sources yield ``(index, position, array)`` and know their ``scan_id``,
``count``, ``shape`` and ``dtype``:

* :class:`SyntheticScan`: a Gaussian spot moving across a Poisson background,
  seeded, cheap enough to generate thousands of frames per second;
* :class:`NpzScan`: frames from an ``.npz`` file with ``intensities``
  (N, H, W) and ``positions`` (N, 2), the ptychography simulator's output.

:func:`publish_kafka` sends a source to a topic (message key = frame index as
ASCII decimal, partition = index mod P, value = :func:`~.frames.encode_frame`)
at a given rate, then one end-of-scan marker per partition.

:func:`publish_zmq` / :class:`ZmqReceiver` follow the shape of detector stream
interfaces: one series-header message (JSON), one two-part message per frame
(JSON header part + raw bytes part), then an end-of-series message (JSON).
The publisher binds a PUSH socket; receivers connect PULL sockets.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .kafka_client import ErrorTrap, check_broker, client_config, ensure_topic
from ._errors import BrokerUnavailable, StreamTimeout
from .frames import (
    FrameError, FrameHeader, SUPPORTED_DTYPES, encode_end_of_scan, encode_frame, frame_header_dict,
    header_from_dict, payload_to_array,
)
from ..errors import InvalidArgument

ZMQ_SERIES = "sparkmpi-series-1"
ZMQ_FRAME = "sparkmpi-frame-1"
ZMQ_END = "sparkmpi-series-end-1"


def parse_shape(text: str) -> tuple[int, ...]:
    """``"128x128"`` -> ``(128, 128)``."""
    try:
        shape = tuple(int(p) for p in str(text).lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 2 or min(shape) < 4:
        raise InvalidArgument(f"frame shape: expected HxW like '128x128' with sizes >= 4, got {text!r}")
    return shape


# ---------------------------------------------------------------- sources

class SyntheticScan:
    """A raster scan of synthetic frames: a Gaussian spot on a Poisson background.

    Parameters
    ----------
    frames : int
        Number of frames N.
    shape : tuple of int
        Frame shape (H, W).
    dtype : str
        Integer or float dtype of the frames, e.g. ``"uint16"``.
    seed : int
        Seeds the background pool and the spot's intensities (same seed, same frames).
    scan_id : str
        Identifier written into every frame header.
    background : float
        Mean photon count of the background (Poisson).
    spot_counts : float
        Peak height of the spot (counts).
    step : float
        Raster step between positions (motor units, e.g. micrometres).

    Notes
    -----
    A pool of 16 Poisson backgrounds is drawn once; frame ``i`` is pool frame
    ``i mod 16`` plus a Gaussian spot (sigma = 3 % of the width) whose centre
    follows the raster position, so frames differ and generating one costs a
    copy plus a small window update.
    """

    def __init__(self, frames: int, shape=(128, 128), dtype="uint16", *, seed: int = 0,
                 scan_id: str = "scan-0", background: float = 3.0, spot_counts: float = 800.0,
                 step: float = 0.5):
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise InvalidArgument(f"frames: expected an integer >= 1, got {frames!r}")
        shape = tuple(shape)
        if len(shape) != 2 or min(shape) < 4:
            raise InvalidArgument(f"shape: expected (H, W) with H, W >= 4, got {shape}")
        self.dtype = np.dtype(dtype)
        if self.dtype.str[1:] not in SUPPORTED_DTYPES:
            raise InvalidArgument(f"dtype: expected one of {SUPPORTED_DTYPES}, got {dtype!r}")
        self.count, self.shape, self.scan_id = frames, shape, scan_id
        self.step = float(step)
        rng = np.random.default_rng(seed)
        self._pool = rng.poisson(background, size=(16,) + shape).astype(self.dtype)
        self._gain = rng.uniform(0.8, 1.2, size=frames)
        h, w = shape
        sigma = max(1.0, 0.03 * w)
        half = int(math.ceil(3 * sigma))
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
        self._spot = spot_counts * np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
        self._half = half
        self._side = max(1, int(math.ceil(math.sqrt(frames))))

    def position(self, index: int) -> tuple[float, float]:
        """Raster position (x, y) of frame ``index`` (snake order)."""
        row, col = divmod(index, self._side)
        if row % 2:
            col = self._side - 1 - col
        return col * self.step, row * self.step

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` (a new array)."""
        if not 0 <= index < self.count:
            raise IndexError(f"index: expected 0..{self.count - 1}, got {index}")
        out = self._pool[index % len(self._pool)].copy()
        h, w = self.shape
        x, y = self.position(index)
        span = max(self.step * (self._side - 1), 1e-9)
        cy = int(round(self._half + (h - 1 - 2 * self._half) * y / span))
        cx = int(round(self._half + (w - 1 - 2 * self._half) * x / span))
        y0, x0 = max(cy - self._half, 0), max(cx - self._half, 0)
        y1, x1 = min(cy + self._half + 1, h), min(cx + self._half + 1, w)
        spot = self._spot[y0 - cy + self._half:y1 - cy + self._half, x0 - cx + self._half:x1 - cx + self._half]
        window = out[y0:y1, x0:x1]
        info = np.iinfo(self.dtype) if self.dtype.kind in "ui" else None
        value = window + spot * self._gain[index]
        if info is not None:
            value = np.clip(np.rint(value), info.min, info.max)
        window[...] = value.astype(self.dtype)
        return out

    def __iter__(self) -> Iterator[tuple[int, tuple[float, float], np.ndarray]]:
        for i in range(self.count):
            yield i, self.position(i), self.frame(i)


class NpzScan:
    """Frames from an ``.npz`` file: ``intensities`` (N, H, W), ``positions`` (N, 2).

    ``dtype`` converts the intensities (e.g. a simulator's float64 to
    ``"float32"`` or, rounded, ``"uint16"``); None keeps the stored dtype.
    """

    def __init__(self, path, *, dtype=None, scan_id: str | None = None):
        path = Path(path)
        try:
            with np.load(path) as data:
                missing = [k for k in ("intensities", "positions") if k not in data.files]
                if missing:
                    raise InvalidArgument(f"{path}: missing array(s) {missing}; found {data.files}")
                intensities = data["intensities"]
                positions = data["positions"]
        except OSError as exc:
            raise InvalidArgument(f"{path}: cannot read as .npz: {exc}") from None
        if intensities.ndim != 3 or intensities.shape[0] < 1:
            raise InvalidArgument(f"{path}: 'intensities' must be (N, H, W), got shape {intensities.shape}")
        if positions.shape != (intensities.shape[0], 2):
            raise InvalidArgument(f"{path}: 'positions' must be ({intensities.shape[0]}, 2), got {positions.shape}")
        if dtype is not None:
            target = np.dtype(dtype)
            if target.kind in "ui":
                info = np.iinfo(target)
                intensities = np.clip(np.rint(intensities), info.min, info.max)
            intensities = intensities.astype(target)
        if intensities.dtype.str[1:] not in SUPPORTED_DTYPES:
            raise InvalidArgument(f"{path}: intensities dtype {intensities.dtype} unsupported; pass dtype= one of "
                             f"{SUPPORTED_DTYPES}")
        self.intensities, self.positions = intensities, positions.astype(float)
        self.count = intensities.shape[0]
        self.shape = intensities.shape[1:]
        self.dtype = intensities.dtype
        self.scan_id = scan_id or path.stem

    def __iter__(self):
        for i in range(self.count):
            yield i, (float(self.positions[i, 0]), float(self.positions[i, 1])), self.intensities[i]


# ---------------------------------------------------------------- Kafka

@dataclass
class PublishReport:
    """What a publisher sent."""

    target: str
    frames: int
    bytes: int
    seconds: float
    frames_per_s: float
    megabytes_per_s: float
    partitions: int
    end_markers: int


class _Pacer:
    """Spaces events ``1/rate`` seconds apart (no pacing when rate is None)."""

    def __init__(self, rate: float | None):
        if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
            raise InvalidArgument(f"rate: expected frames per second > 0 (or None for as fast as possible), got {rate!r}")
        self.period = 1.0 / rate if rate else 0.0
        self.start = time.monotonic()

    def wait(self, i: int, idle=None) -> None:
        if not self.period:
            return
        due = self.start + i * self.period
        while True:
            left = due - time.monotonic()
            if left <= 0:
                return
            if idle is not None:
                idle(min(left, 0.05))  # serve delivery reports while waiting
            else:
                time.sleep(min(left, 0.05))


PRODUCER_DEFAULTS = {
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "batch.num.messages": 10000,
    "compression.type": "none",
    "queue.buffering.max.kbytes": 262144,
    "queue.buffering.max.messages": 100000,
    "message.max.bytes": 64 * 1024 * 1024,
    "acks": "all",
    "enable.idempotence": True,
    "message.timeout.ms": 60000,
}


class _ProducerIdWatch:
    """A ``stats_cb`` that notes when the idempotent producer has its producer id."""

    def __init__(self) -> None:
        self.assigned = False

    def __call__(self, stats_json: str) -> None:
        if not self.assigned:
            self.assigned = json.loads(stats_json).get("eos", {}).get("idemp_state") == "Assigned"

    def wait(self, producer, timeout: float, bootstrap: str, trap: ErrorTrap) -> None:
        deadline = time.monotonic() + timeout
        while not self.assigned:
            if time.monotonic() > deadline:
                raise StreamTimeout(f"the producer got no producer id from {bootstrap} within {timeout:.1f} s "
                                    f"(needed for idempotent delivery); last client error: {trap.last or 'none'}")
            producer.poll(0.02)


def publish_kafka(source, bootstrap: str, topic: str, *, rate: float | None = None, partitions: int = 1,
                  create_topic: bool = True, timeout: float = 30.0, producer_config: dict | None = None,
                  end_marker: bool = True, progress=None) -> PublishReport:
    """Publish every frame of ``source`` to ``topic``, then end-of-scan markers.

    Parameters
    ----------
    source : SyntheticScan or NpzScan (or any iterable of (index, (x, y), array) with scan_id)
    bootstrap : str
        ``host:port`` of the Kafka cluster.
    topic : str
        Created with ``partitions`` partitions when missing (``create_topic``).
    rate : float or None
        Frames per second; None sends as fast as the broker takes them.
    timeout : float
        Seconds allowed for the broker check at start and for the final flush.

    Raises
    ------
    BrokerUnavailable
        No broker at ``bootstrap`` (within ``min(timeout, 5)`` s).
    StreamTimeout
        Messages still undelivered ``timeout`` s after the last frame.
    """
    from confluent_kafka import Producer

    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise InvalidArgument(f"partitions: expected an integer >= 1, got {partitions!r}")
    pacer = _Pacer(rate)
    check_broker(bootstrap, timeout=min(timeout, 5.0))
    if create_topic:
        ensure_topic(bootstrap, topic, partitions, timeout=timeout)
    trap = ErrorTrap()
    conf = client_config(bootstrap, trap, **PRODUCER_DEFAULTS)
    conf.update(producer_config or {})
    watch = None
    if conf.get("enable.idempotence") and "stats_cb" not in conf:
        watch = _ProducerIdWatch()
        conf["stats_cb"] = watch
        conf.setdefault("statistics.interval.ms", 100)
    producer = Producer(conf)
    try:
        if watch is not None:
            # A detector's publisher is connected before its scan starts.  An
            # idempotent producer gets its producer id only ~0.5 s after it is
            # created (librdkafka retries the request on a 500 ms timer), and
            # frames stamped meanwhile would count that wait as stream latency.
            watch.wait(producer, timeout, bootstrap, trap)
        try:
            # the topic's leaders, also before the first frame
            producer.list_topics(topic, timeout=min(timeout, 5.0))
        except Exception:  # noqa: BLE001  (only a head start: produce() finds them too)
            pass
        failures: list[str] = []

        def delivered(err, msg):
            if err is not None:
                failures.append(f"{msg.topic()}[{msg.partition()}]: {err}")

        sent = nbytes = 0
        t0 = time.monotonic()
        pacer.start = t0
        for i, (index, position, array) in enumerate(source):
            pacer.wait(i, producer.poll)
            value = encode_frame(FrameHeader(source.scan_id, int(index), position, time.time()), array)
            key = str(int(index)).encode()
            while True:
                try:
                    producer.produce(topic, value, key=key, partition=int(index) % partitions, on_delivery=delivered)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.01)
            producer.poll(0)
            if failures:
                break
            sent += 1
            nbytes += len(value)
            if progress is not None and sent % 1000 == 0:
                print(f"\r{sent}/{source.count} frames", end="", file=progress, flush=True)
        markers = 0
        if end_marker and not failures:
            for p in range(partitions):
                producer.produce(topic, encode_end_of_scan(source.scan_id, sent, p, time.time()), key=b"end",
                                 partition=p, on_delivery=delivered)
                markers += 1
        left = producer.flush(timeout)
        seconds = time.monotonic() - t0
        if progress is not None:
            print(f"\r{sent}/{source.count} frames", file=progress, flush=True)
        if failures:
            raise BrokerUnavailable(f"{len(failures)} message(s) to {topic!r} at {bootstrap} failed: {failures[0]}")
        if left:
            raise StreamTimeout(f"{left} message(s) to {topic!r} at {bootstrap} undelivered {timeout:.1f} s after "
                                f"the last frame: {trap.last or 'broker slow or unreachable'}")
        return PublishReport(f"kafka://{bootstrap}/{topic}", sent, nbytes, seconds, sent / seconds,
                             nbytes / seconds / 1e6, partitions, markers)
    finally:
        # Closed here, not when the garbage collector frees it: an error's traceback (kept by
        # the caller) holds this frame, and the producer would keep its broker connections.
        producer.purge()   # what is still undelivered on an error path: close() would wait for it
        producer.close()


# ---------------------------------------------------------------- ZeroMQ

def _zmq_endpoint(endpoint: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise InvalidArgument(f"endpoint: expected tcp://HOST:PORT (or ipc://, inproc://), got {endpoint!r}")
    return endpoint


class _ZmqEndpoint:
    """A ZeroMQ socket and, unless the caller passed one, its own context; closes both."""

    socket: Any
    context: Any
    _own_context: bool

    def close(self) -> None:
        self.socket.close()
        if self._own_context:
            self.context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ZmqPublisher(_ZmqEndpoint):
    """A PUSH socket bound to ``endpoint`` (``tcp://127.0.0.1:0`` picks a free port).

    Sends block for at most ``send_timeout`` seconds when no receiver takes
    the messages; then :class:`StreamTimeout` names the endpoint.
    """

    def __init__(self, endpoint: str, *, send_timeout: float = 10.0, hwm: int = 1000, context=None):
        import zmq

        self._zmq = zmq
        self.send_timeout = float(send_timeout)
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.SNDTIMEO, int(self.send_timeout * 1000))
        self.socket.setsockopt(zmq.LINGER, int(self.send_timeout * 1000))
        self.socket.bind(_zmq_endpoint(endpoint))
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def _send(self, parts, what: str) -> None:
        try:
            self.socket.send_multipart(parts, copy=False)
        except self._zmq.Again:
            raise StreamTimeout(f"no ZeroMQ receiver took the {what} at {self.endpoint} within "
                                f"{self.send_timeout:.1f} s (is a PULL socket connected?)") from None

    def send_series_header(self, scan_id: str, frames: int, shape, dtype) -> None:
        head = {"htype": ZMQ_SERIES, "scan": scan_id, "frames": int(frames), "shape": list(shape),
                "dtype": np.dtype(dtype).str}
        self._send([json.dumps(head).encode()], "series header")

    def send_frame(self, header: FrameHeader, array: np.ndarray) -> None:
        head = frame_header_dict(header, array)
        head["htype"] = ZMQ_FRAME
        self._send([json.dumps(head, separators=(",", ":")).encode(), np.ascontiguousarray(array)],
                   f"frame {header.index}")

    def send_end(self, scan_id: str, frames: int) -> None:
        self._send([json.dumps({"htype": ZMQ_END, "scan": scan_id, "frames": int(frames)}).encode()],
                   "end-of-series message")


def publish_zmq(source, publisher: ZmqPublisher | str, *, rate: float | None = None) -> PublishReport:
    """Send ``source`` over ZeroMQ: series header, one frame message per frame, end of series."""
    own = isinstance(publisher, str)
    pub = ZmqPublisher(publisher) if own else publisher
    pacer = _Pacer(rate)
    try:
        pub.send_series_header(source.scan_id, source.count, source.shape, source.dtype)
        sent = nbytes = 0
        t0 = pacer.start = time.monotonic()
        for i, (index, position, array) in enumerate(source):
            pacer.wait(i)
            pub.send_frame(FrameHeader(source.scan_id, int(index), position, time.time()), array)
            sent += 1
            nbytes += array.nbytes
        pub.send_end(source.scan_id, sent)
        seconds = max(time.monotonic() - t0, 1e-9)
        return PublishReport(pub.endpoint, sent, nbytes, seconds, sent / seconds, nbytes / seconds / 1e6, 1, 1)
    finally:
        if own:
            pub.close()


@dataclass(frozen=True)
class ZmqDeadLetter:
    """A ZeroMQ message that was not a valid frame: its parts and the reason."""

    parts: tuple[bytes, ...]
    reason: str
    code: str


class ZmqReceiver(_ZmqEndpoint):
    """A PULL socket connected to a detector's PUSH endpoint; iterate for frames.

    Iteration yields ``(FrameHeader, array)`` per frame (the array is a view of
    the received bytes) until the end-of-series message, after which
    :attr:`series` and :attr:`end` hold the two JSON objects.  A malformed
    message raises :class:`~.frames.FrameError` (``on_error="raise"``) or is
    yielded as a :class:`ZmqDeadLetter` (``on_error="yield"``).  Waiting more
    than ``timeout`` seconds for any message raises :class:`StreamTimeout`.
    """

    def __init__(self, endpoint: str, *, timeout: float = 10.0, on_error: str = "raise", context=None):
        import zmq

        if on_error not in ("raise", "yield"):
            raise InvalidArgument(f"on_error: expected 'raise' or 'yield', got {on_error!r}")
        if not timeout > 0:
            raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
        self._zmq = zmq
        self.endpoint = _zmq_endpoint(endpoint)
        self.timeout, self.on_error = float(timeout), on_error
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.series: dict | None = None
        self.end: dict | None = None
        self.received = 0

    def _recv(self):
        if not self.socket.poll(int(self.timeout * 1000)):
            raise StreamTimeout(f"no ZeroMQ message from {self.endpoint} within {self.timeout:.1f} s "
                                f"({self.received} frames received so far)")
        return self.socket.recv_multipart(copy=False)

    def _bad(self, parts, exc: FrameError):
        if self.on_error == "raise":
            raise exc
        return ZmqDeadLetter(tuple(p.bytes for p in parts), str(exc), exc.code)

    def __iter__(self):
        while self.end is None:
            parts = self._recv()
            try:
                head = json.loads(parts[0].bytes)
                htype = head.get("htype") if isinstance(head, dict) else None
            except (ValueError, RecursionError) as exc:
                yield self._bad(parts, FrameError(f"ZeroMQ message header is not JSON: {exc}", "bad_header"))
                continue
            try:
                if htype == ZMQ_SERIES:
                    self.series = head
                elif htype == ZMQ_END:
                    self.end = head
                elif htype == ZMQ_FRAME:
                    if len(parts) != 2:
                        raise FrameError(f"frame message must have 2 parts (header, data), got {len(parts)}",
                                         "bad_header")
                    header, dtype = header_from_dict({k: v for k, v in head.items() if k != "htype"},
                                                     "ZeroMQ frame header")
                    array = payload_to_array(parts[1].buffer, header.shape, dtype,
                                             where=f"ZeroMQ frame {header.index}")
                    self.received += 1
                    yield header, array
                else:
                    raise FrameError(f"unknown htype {htype!r}; expected {ZMQ_SERIES}, {ZMQ_FRAME} or {ZMQ_END}",
                                     "bad_kind")
            except FrameError as exc:
                yield self._bad(parts, exc)
