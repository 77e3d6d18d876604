"""The Bluesky source: a document topic in Kafka -> frames in sparkmpi's format -> the micro-batch driver.

A RunEngine's documents reach Kafka through bluesky-kafka's ``Publisher``
(msgpack, one topic, keyed by the beamline so one partition keeps their
order).  :class:`DocumentBridge` follows that topic with the driver's own
readers (:func:`~.offsets.read_offset_range`, a watermark poller), runs every
document through the pure :class:`~.bluesky_docs.DocumentStream`, reads
HDF5 datums where the detector wrote files, and writes each frame to the
frames topic (``<docs>.frames``, one partition) as a sparkmpi frame message:
``scan`` = the start document's uid, ``index`` = ``seq_num - 1``, ``pos`` =
(row, col) in object pixels, ``ts`` = the event's time, and in the header the
document's offset (``doc``) and the frame's place in it (``k``).  The
:class:`~.driver.StreamDriver` then consumes the frames topic with its
exactly-once outputs.  Rejected documents go to ``<docs>.dlq`` with the code
and reason in the headers (the original bytes as the value).

Exactly once, docs -> frames: the bridge is the frames topic's only writer
and writes in document order with an idempotent producer.  It commits its
document offsets (group ``sparkmpi-bluesky-bridge``) after each round's frames
are acknowledged.  On start it takes the last frame message's ``doc``/``k``
and resumes after it, whichever of that and the committed offset is further;
the documents before that point are replayed through the state object with
nothing written, so a restart mid-scan knows the scan's geometry, resources
and datums again.  Dead letters are at-least-once (as the driver's).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from .bluesky_docs import DocumentError, DocumentStream, FrameOut, Rejected, ScanClosed, ScanOpened, decode_document
from .frames import FrameHeader, decode_message, encode_frame
from .kafka_client import ErrorTrap, check_broker, client_config, ensure_topic, topic_partitions
from ._errors import BrokerUnavailable, OffsetError
from .offsets import DeadLetter, DeadLetterWriter, OffsetRange, committed_offsets, read_offset_range
from ..errors import InvalidArgument

__all__ = ["DocumentBridge", "read_datum", "frames_topic_for", "BRIDGE_GROUP"]

log = logging.getLogger("sparkmpi.stream.bluesky_bridge")
BRIDGE_GROUP = "sparkmpi-bluesky-bridge"


def frames_topic_for(docs_topic: str) -> str:
    return f"{docs_topic}.frames"


def read_datum(resource: dict, datum: dict, busy_timeout: float = 1.0) -> np.ndarray:
    """The frame an ``AD_HDF5`` datum points at; OSError/KeyError/ValueError when it cannot be read."""
    import h5py

    from ..bluesky.devices import HDF5_DATASET, HDF5_LOCK, HDF5_SPEC

    if resource.get("spec") != HDF5_SPEC:
        raise ValueError(f"resource spec {resource.get('spec')!r} is not {HDF5_SPEC!r}")
    path = Path(resource.get("root", "")) / resource.get("resource_path", "")
    k = (datum.get("datum_kwargs") or {}).get("point_number")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"datum {datum.get('datum_id')!r}: point_number {k!r} is not an integer >= 0")
    # opened per frame: the detector appends to the same file while the scan runs; a writer in
    # another process may hold it for a moment (HDF5's file lock), so a busy file is retried briefly
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            with HDF5_LOCK, h5py.File(path, "r") as f:
                data = f[HDF5_DATASET]
                if k >= data.shape[0]:
                    raise KeyError(f"{path} holds {data.shape[0]} frames, datum asks for point {k}")
                return np.asarray(data[k], dtype=np.float32)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class DocumentBridge:
    """Documents topic -> :class:`DocumentStream` -> frames topic, exactly once (module docstring).

    Parameters
    ----------
    bootstrap : str
        Kafka ``host:port``.
    docs_topic : str
        Where the RunEngine's documents are published (one partition).
    frames_topic : str, optional
        Default ``<docs_topic>.frames``.
    group : str
        Consumer group of the bridge's document offsets.
    poll_interval : float
        Seconds between watermark polls when idle.
    timeout : float
        Seconds a broker call may take.
    on_action : callable, optional
        ``on_action(action)`` for every :class:`ScanOpened`, :class:`ScanClosed`
        and :class:`Rejected` (after its dead letter is stored).
    """

    def __init__(self, bootstrap: str, docs_topic: str, frames_topic: str | None = None, *,
                 group: str = BRIDGE_GROUP, poll_interval: float = 0.01, timeout: float = 10.0,
                 topic_timeout: float = 30.0, on_action=None):
        if not isinstance(docs_topic, str) or not docs_topic:
            raise InvalidArgument(f"docs_topic: expected a topic name, got {docs_topic!r}")
        if not poll_interval > 0 or not timeout > 0:
            raise InvalidArgument(f"poll_interval, timeout: expected seconds > 0, got {poll_interval!r}, {timeout!r}")
        self.bootstrap, self.docs_topic = bootstrap, docs_topic
        self.frames_topic = frames_topic or frames_topic_for(docs_topic)
        self.group, self.poll_interval, self.timeout = group, float(poll_interval), float(timeout)
        self.topic_timeout = float(topic_timeout)
        self.on_action = on_action
        self.state = DocumentStream()
        self.next_offset = 0
        self.frames_written = 0
        self.frames_high = 0   # next offset of the frames topic once every frame so far is stored
        self.dead_letters: dict[str, int] = {}
        self.start_offsets: dict[str, int] = {}   # scan uid -> its start document's offset (docs topic)
        self._skip_through: tuple[int, int] | None = None   # (doc offset, k): already written
        self._producer = None
        self._dlq: DeadLetterWriter | None = None
        self._trap = ErrorTrap()
        self._failures: list[str] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()   # held while the state changes (readers: the live reconstruction)

    # -- start: topics, resume point, replay --------------------------------------
    def start(self) -> "DocumentBridge":
        from confluent_kafka import Producer

        check_broker(self.bootstrap, timeout=min(self.timeout, 5.0))
        deadline = time.monotonic() + self.topic_timeout
        while not topic_partitions(self.bootstrap, self.docs_topic, self.timeout):
            if time.monotonic() > deadline:
                raise OffsetError(f"document topic {self.docs_topic!r} does not exist at {self.bootstrap} "
                                  f"(waited {self.topic_timeout:.0f} s)")
            time.sleep(0.1)
        if len(topic_partitions(self.bootstrap, self.docs_topic, self.timeout)) != 1:
            raise InvalidArgument(f"document topic {self.docs_topic!r} must have one partition (a run's "
                                  f"documents in order)")
        ensure_topic(self.bootstrap, self.frames_topic, 1, timeout=self.timeout)
        self._producer = Producer(client_config(self.bootstrap, self._trap, **{
            "acks": "all", "enable.idempotence": True, "linger.ms": 1, "message.max.bytes": 64 * 1024 * 1024,
            "message.timeout.ms": int(self.timeout * 1000) + 5000}))
        resume = self._resume_point()
        low, _ = self._watermarks()
        if resume > low:
            self._replay(low, resume)
        self.next_offset = max(resume, low)
        return self

    def _watermarks(self) -> tuple[int, int]:
        from confluent_kafka import Consumer, TopicPartition

        consumer = getattr(self, "_marks", None)
        if consumer is None:
            consumer = self._marks = Consumer(client_config(self.bootstrap, self._trap, **{
                "group.id": "sparkmpi-watermarks", "enable.auto.commit": False}))
        try:
            return tuple(consumer.get_watermark_offsets(TopicPartition(self.docs_topic, 0), timeout=self.timeout))
        except Exception as exc:
            raise BrokerUnavailable(f"watermarks of {self.docs_topic}[0] from {self.bootstrap}: "
                                    f"{self._trap.last or exc}") from None

    def _resume_point(self) -> int:
        committed = committed_offsets(self.bootstrap, self.group, self.docs_topic, [0], timeout=self.timeout)
        resume = committed.get((self.docs_topic, 0)) or 0
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(client_config(self.bootstrap, self._trap, **{"group.id": "sparkmpi-watermarks",
                                                                       "enable.auto.commit": False}))
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.frames_topic, 0), timeout=self.timeout)
        finally:
            consumer.close()
        self.frames_high = high
        if high > low:
            for offset in range(high - 1, max(low, high - 50) - 1, -1):   # the last frame (markers skipped)
                records = read_offset_range(self.bootstrap, self.frames_topic, 0, offset, offset + 1,
                                            timeout=self.timeout)
                if not records:
                    continue
                header, _ = decode_message(records[0].value, check_finite=False)
                doc, k = int(header.extra["doc"]), int(header.extra["k"])
                if doc >= resume:
                    self._skip_through = (doc, k)
                    resume = doc
                break
        return resume

    def _replay(self, start: int, end: int) -> None:
        """Documents already handled: rebuild the state, write nothing (frames of a partly written doc excepted)."""
        for record in read_offset_range(self.bootstrap, self.docs_topic, 0, start, end, timeout=self.timeout):
            try:
                name, doc = decode_document(record.value)
            except DocumentError:
                continue
            with self.lock:
                self._note_start(name, doc, record.offset, self.state.feed(name, doc))
        log.info("bridge: replayed %d documents of %s to rebuild the scans' state", end - start, self.docs_topic)

    def _note_start(self, name, doc, offset: int, actions) -> None:
        for action in actions:
            if isinstance(action, ScanOpened):
                self.start_offsets[action.uid] = offset

    def first_frame_offset(self, uid: str, end: int) -> int:
        """The frames topic's offset from which scan ``uid``'s frames are (a lower bound, < ``end``).

        The frames are written in document order and carry their document's offset (``doc``), so
        the first frame at or after the scan's start document is found by bisection, one message
        read per step; without a known start, the topic's low watermark.
        """
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(client_config(self.bootstrap, self._trap, **{"group.id": "sparkmpi-watermarks",
                                                                       "enable.auto.commit": False}))
        try:
            lo, _ = consumer.get_watermark_offsets(TopicPartition(self.frames_topic, 0), timeout=self.timeout)
        finally:
            consumer.close()
        start = self.start_offsets.get(uid)
        if start is None:
            return lo
        hi = max(lo, end)
        while lo < hi:
            mid = (lo + hi) // 2
            records = read_offset_range(self.bootstrap, self.frames_topic, 0, mid, mid + 1, timeout=self.timeout)
            if not records:    # no message at that offset (none expected): stay on the safe side
                break
            header, _ = decode_message(records[0].value, check_finite=False)
            if int(header.extra["doc"]) < start:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # -- one round ------------------------------------------------------------------
    def step(self) -> int:
        """Translate every document that arrived since the last round; returns how many."""
        _, high = self._watermarks()
        if high <= self.next_offset:
            return 0
        records = read_offset_range(self.bootstrap, self.docs_topic, 0, self.next_offset, high, timeout=self.timeout)
        notes = []
        for record in records:
            notes += self._handle(record)
        if self._producer is not None:
            left = self._producer.flush(self.timeout)
            if self._failures or left:
                raise BrokerUnavailable(f"bridge: frames not stored at {self.bootstrap}: "
                                        f"{self._failures[:1] or self._trap.last or f'{left} undelivered'}")
        if self._dlq is not None:
            self._dlq.flush()
        self._commit(high)
        self.next_offset = high
        for action in notes:   # after the frames and dead letters are stored
            if self.on_action is not None:
                self.on_action(action)
        return len(records)

    def _commit(self, offset: int) -> None:
        from .kafka_io import Committer

        committer = getattr(self, "_committer", None)
        if committer is None:
            committer = self._committer = Committer(self.bootstrap, self.group, self.timeout)
        committer.commit([OffsetRange(self.docs_topic, 0, max(offset - 1, 0), offset)])

    def _handle(self, record) -> list:
        try:
            name, doc = decode_document(record.value)
        except DocumentError as exc:
            self._dead(record, exc.code, str(exc))
            return []
        skip = self._skip_through
        if skip is not None and record.offset > skip[0]:
            skip = self._skip_through = None
        with self.lock:
            actions = self.state.feed(name, doc)
            self._note_start(name, doc, record.offset, actions)
        notes = []
        k = 0
        for action in actions:
            if isinstance(action, FrameOut):
                if skip is not None and record.offset == skip[0] and k <= skip[1]:
                    k += 1
                    continue
                self._write_frame(record, action, k)
                k += 1
            elif isinstance(action, Rejected):
                if skip is None:
                    self._dead(record, action.code, action.reason)
                    notes.append(action)
            elif isinstance(action, (ScanOpened, ScanClosed)):
                notes.append(action)
        return notes

    def _write_frame(self, record, frame: FrameOut, k: int) -> None:
        array = frame.array
        if array is None:
            resource, datum = frame.datum
            try:
                array = read_datum(resource, datum)
            except (OSError, KeyError, ValueError) as exc:
                self._dead(record, "unreadable_datum", f"scan {frame.uid}: frame {frame.index}: datum "
                           f"{datum.get('datum_id')!r} could not be read: {type(exc).__name__}: {exc}"[:500])
                return
        array = np.ascontiguousarray(array, dtype=np.float32)
        header = FrameHeader(frame.uid, frame.index, frame.position, frame.time,
                             extra={"doc": record.offset, "k": k})

        def delivered(err, msg):
            if err is not None:
                self._failures.append(str(err))
            else:
                self.frames_high = max(self.frames_high, msg.offset() + 1)

        value = encode_frame(header, array)
        while True:
            try:
                self._producer.produce(self.frames_topic, value, key=str(frame.index).encode(),
                                       on_delivery=delivered)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)
        self.frames_written += 1

    def _dead(self, record, code: str, reason: str) -> None:
        if self._dlq is None:
            self._dlq = DeadLetterWriter(self.bootstrap, timeout=self.timeout)
        self._dlq.write(DeadLetter(record.topic, record.partition, record.offset, record.key, record.value,
                                   reason, code))
        self.dead_letters[code] = self.dead_letters.get(code, 0) + 1
        log.warning("bridge: dead letter %s at %s[%d]@%d: %s", code, record.topic, record.partition,
                    record.offset, reason)

    # -- a background thread ----------------------------------------------------------
    def run_in_thread(self) -> "DocumentBridge":
        """Call :meth:`step` in a daemon thread until :meth:`close`; an error stops it (``error``)."""
        def loop():
            try:
                while not self._stop.is_set():
                    if self.step() == 0:
                        self._stop.wait(self.poll_interval)
            except BaseException as exc:  # noqa: BLE001  (kept for the caller)
                self.error = exc
                log.error("bridge stopped: %s", exc)

        self._thread = threading.Thread(target=loop, name="sparkmpi-bluesky-bridge", daemon=True)
        self._thread.start()
        return self

    def drained(self) -> bool:
        """True when every document published so far is translated."""
        return self.next_offset >= self._watermarks()[1]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)
            self._thread = None
        if self._producer is not None:
            self._producer.flush(min(self.timeout, 5.0))
            self._producer = None
        for name in ("_marks",):
            client = getattr(self, name, None)
            if client is not None:
                client.close()
                setattr(self, name, None)
        committer = getattr(self, "_committer", None)
        if committer is not None:
            committer.close()
            self._committer = None
        if self._dlq is not None:
            self._dlq.close()
        self._dlq = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def summary(self) -> dict:
        return {"frames_written": self.frames_written, "dead_letters": dict(self.dead_letters),
                "next_offset": self.next_offset, "scans": sorted(self.state.scans),
                "closed": {u: c.exit_status for u, c in self.state.closed.items()}}
