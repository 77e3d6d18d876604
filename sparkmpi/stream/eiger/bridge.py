"""``sparkmpi detector bridge``: a Stream V2 detector's messages into Kafka, still compressed.

A thin adapter around :class:`._bridge_state.BridgeState`: a ZeroMQ PULL
socket connected to the detector (with a monitor that reports a lost
connection), an idempotent Kafka producer, and the dead-letter writer of
the Kafka driver (``<topic>.dlq``, the reason in the record's headers).
Records are laid out as :mod:`.records` says.  A series' start records are
flushed before its first image is sent (their offsets go into the image
keys), its end records before the series is reported as ended, and
everything at exit: what the bridge reported as bridged is on the topic,
once (the producer is idempotent; the state drops repeated image ids).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

from .._errors import BrokerUnavailable, StreamTimeout
from ..frames import FrameError
from ..detector import PRODUCER_DEFAULTS, _ProducerIdWatch, _zmq_endpoint
from ..kafka_client import ErrorTrap, check_broker, client_config, ensure_topic
from ..offsets import DeadLetter as KafkaDeadLetter, DeadLetterWriter
from ...errors import InvalidArgument
from . import _bridge_state as st
from .records import RecordKey, open_series
from .stream1 import Stream1Decoder
from .stream2 import _dumps, decode_message, to_stream2

__all__ = ["BridgeReport", "run_bridge"]


@dataclass
class BridgeReport:
    """What a bridge run did."""

    endpoint: str
    bootstrap: str
    topic: str
    partitions: int
    images: int
    dead_letters: int
    series: list = field(default_factory=list)
    events: list = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""

    def to_json(self) -> dict:
        return asdict(self)


class _Kafka:
    """The producer side: records of :mod:`.records`, delivery checked."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, timeout: float):
        from confluent_kafka import Producer

        self.bootstrap, self.topic, self.partitions, self.timeout = bootstrap, topic, partitions, timeout
        check_broker(bootstrap, timeout=min(timeout, 5.0))
        ensure_topic(bootstrap, topic, partitions, timeout=timeout)
        self.trap = ErrorTrap()
        conf = client_config(bootstrap, self.trap, **PRODUCER_DEFAULTS)
        watch = _ProducerIdWatch()
        conf["stats_cb"] = watch
        conf["statistics.interval.ms"] = 100
        self.producer = Producer(conf)
        try:
            watch.wait(self.producer, timeout, bootstrap, self.trap)
        except BaseException:
            self.close(flush=False)
            raise
        self.failures: list[str] = []
        self.start_offsets: dict[int, int] = {}
        self.dlq: DeadLetterWriter | None = None
        self.images = 0

    def _produce(self, value: bytes, key: bytes, partition: int, on_delivery=None) -> None:
        def delivered(err, msg):
            if err is not None:
                self.failures.append(f"{msg.topic()}[{msg.partition()}]: {err}")
            elif on_delivery is not None:
                on_delivery(msg)

        while True:
            try:
                self.producer.produce(self.topic, value, key=key, partition=partition, on_delivery=delivered)
                break
            except BufferError:   # the local queue is full: let deliveries drain
                self.producer.poll(0.01)
        self.producer.poll(0)
        if self.failures:
            raise BrokerUnavailable(f"bridging to {self.topic!r} at {self.bootstrap} failed: {self.failures[0]}")

    def flush(self, what: str) -> None:
        left = self.producer.flush(self.timeout)
        if self.failures:
            raise BrokerUnavailable(f"{what}: {len(self.failures)} record(s) to {self.topic!r} at {self.bootstrap} "
                                    f"failed: {self.failures[0]}")
        if left:
            raise StreamTimeout(f"{what}: {left} record(s) to {self.topic!r} at {self.bootstrap} undelivered "
                                f"after {self.timeout:.1f} s: {self.trap.last or 'broker slow or unreachable'}")

    def start(self, action: st.PublishStart) -> None:
        offsets: dict[int, int] = {}
        key = RecordKey("start", action.series_id).encode()
        for p in range(self.partitions):
            self._produce(action.raw, key, p, lambda msg: offsets.__setitem__(msg.partition(), msg.offset()))
        self.flush(f"series {action.series_id}: start message")
        self.start_offsets = offsets

    def image(self, action: st.PublishImage) -> None:
        key = RecordKey("image", action.series_id, image_id=action.image_id,
                        start_offset=self.start_offsets[action.partition]).encode()
        self._produce(action.raw, key, action.partition)
        self.images += 1

    def end(self, action: st.PublishEnd) -> None:
        raw = action.raw
        if raw is None:
            raw = _dumps({"type": "end", "series_id": action.series_id, "sparkmpi_incomplete": action.incomplete})
        for p in range(self.partitions):
            key = RecordKey("end", action.series_id, images=action.images_per_partition[p],
                            start_offset=self.start_offsets.get(p, 0), incomplete=action.incomplete is not None)
            self._produce(raw, key.encode(), p)
        self.flush(f"series {action.series_id}: end records")

    def dead(self, action: st.DeadLetter, sequence: int) -> None:
        if self.dlq is None:
            self.dlq = DeadLetterWriter(self.bootstrap, timeout=self.timeout)
        key = None if action.series_id is None else f"eiger2/dead/{action.series_id}".encode()
        self.dlq.write(KafkaDeadLetter(self.topic, -1, sequence, key, action.raw, action.reason, action.code))
        self.dlq.flush()

    def close(self, flush: bool = True) -> None:
        """Deliver what is pending (``flush``), then release the producer's threads and broker
        connections now: garbage collection may come minutes later (a dead letter's error in
        the bridge's loop is a reference cycle back to its frame)."""
        if self.producer is None:
            return
        try:
            if flush:
                self.flush("closing the bridge")
        finally:
            producer, self.producer = self.producer, None
            producer.purge()   # only what a failed flush left: close() would wait for it with no deadline
            producer.close()

    def open_series(self, window: int, chunk: int = 256):
        """The series an earlier bridge left open on the topic, with its start message (or None).

        Each partition is read backwards, ``chunk`` records at a time, until
        its last start record (at most ``window`` records back): what is read
        is the open series itself (Kafka cannot fetch keys without values).
        """
        from ..offsets import read_offset_range, watermarks

        marks = watermarks(self.bootstrap, self.topic, timeout=self.timeout)
        keys = {}
        for (_, partition), (low, high) in sorted(marks.items()):
            items: list = []
            pos = high
            while pos > max(low, high - window):
                first = max(low, high - window, pos - chunk)
                records = read_offset_range(self.bootstrap, self.topic, partition, first, pos, timeout=self.timeout)
                items[:0] = [(r.offset, r.key) for r in records]
                pos = first
                if any(r.key and r.key.startswith(b"eiger2/start/") for r in records):
                    break
            keys[partition] = items
        found = open_series(keys)
        if found is None:
            return None
        record = read_offset_range(self.bootstrap, self.topic, 0, found.start_offsets[0],
                                   found.start_offsets[0] + 1, timeout=self.timeout)[0]
        start = decode_message(record.value)
        self.start_offsets = dict(found.start_offsets)
        return found, start


def _monitor_events(monitor) -> list[str]:
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    out = []
    while monitor.poll(0):
        event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
        if event == zmq.EVENT_DISCONNECTED:
            out.append("disconnected")
        elif event == zmq.EVENT_CONNECTED:
            out.append("connected")
    return out


def run_bridge(endpoint: str, bootstrap: str, topic: str, *, partitions: int = 1, end_timeout: float = 10.0,
               series: int | None = None, idle_timeout: float | None = None, kafka_timeout: float = 30.0,
               stream: str = "v2", resume: bool = True, resume_window: int = 100_000, progress=sys.stderr,
               json_lines=None, stop=None) -> BridgeReport:
    """Bridge the detector at ``endpoint`` (its Stream V2 or V1 PUSH socket) into ``topic``.

    Parameters
    ----------
    stream : {"v2", "v1"}
        The detector's interface.  Stream V1 series are written to Kafka as
        Stream V2 messages (:func:`.stream2.to_stream2`), blobs not recompressed.
    series : int, optional
        Stop once this many series have ended (complete or not).
    idle_timeout : float, optional
        Stop after this many seconds with no message while no series is open.
    end_timeout : float
        Seconds without a message, within a series, before the series is
        closed as incomplete (reported with its id).
    resume : bool
        Take over a series an earlier bridge left open on the topic (its start
        record and no end record, among each partition's last
        ``resume_window`` records): images already there are not bridged again.
    stop : threading.Event, optional
        Set it to stop the bridge (an open series ends incomplete).

    Returns
    -------
    BridgeReport
        Images bridged, dead letters, one summary per series, the events.
    """
    import zmq

    _zmq_endpoint(endpoint)
    if series is not None and (isinstance(series, bool) or not isinstance(series, int) or series < 1):
        raise InvalidArgument(f"series: expected an integer >= 1 or None, got {series!r}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise InvalidArgument(f"idle_timeout: expected seconds > 0 or None, got {idle_timeout!r}")
    if stream not in ("v1", "v2"):
        raise InvalidArgument(f"stream: expected 'v1' or 'v2', got {stream!r}")
    v1 = Stream1Decoder() if stream == "v1" else None
    state = st.BridgeState(partitions, end_timeout)
    kafka = _Kafka(bootstrap, topic, partitions, kafka_timeout)
    report = BridgeReport(endpoint, bootstrap, topic, partitions, 0, 0)
    out = open(json_lines, "a") if isinstance(json_lines, str) else json_lines
    t0 = time.monotonic()
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1000)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    sock.connect(endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    sequence = 0
    last = time.monotonic()

    def act(actions) -> None:
        for a in actions:
            if isinstance(a, st.PublishStart):
                kafka.start(a)
            elif isinstance(a, st.PublishImage):
                kafka.image(a)
            elif isinstance(a, st.PublishEnd):
                kafka.end(a)
            elif isinstance(a, st.DeadLetter):
                kafka.dead(a, sequence)
                _note({"event": "dead_letter", "series_id": a.series_id, "code": a.code, "reason": a.reason},
                      f"dead letter ({a.code}): {a.reason}")
            elif isinstance(a, st.Report):
                _note({"event": a.event, "series_id": a.series_id, **a.detail}, a.text)

    def _note(obj: dict, text: str) -> None:
        report.events.append(obj)
        if progress is not None:
            print(f"sparkmpi bridge: {text}", file=progress, flush=True)
        if out is not None:
            out.write(json.dumps(obj, default=str) + "\n")
            out.flush()

    try:
        if resume:
            found = kafka.open_series(resume_window)
            if found is not None:
                left, start = found
                act(state.resume(start, left.image_ids, left.per_partition, time.monotonic()))
        while True:
            if stop is not None and stop.is_set():
                report.stopped = "stopped"
                break
            try:
                events = dict(poller.poll(100))
            except KeyboardInterrupt:   # Ctrl-C: end the open series and deliver everything, as for a stop
                report.stopped = "interrupted"
                break
            now = time.monotonic()
            if monitor in events:
                for event in _monitor_events(monitor):
                    if event == "disconnected":
                        act(state.disconnected(now))
            if sock in events:
                while True:
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    last = time.monotonic()
                    # a detector sends one message per part; a simulator may batch several in one
                    for part in parts:
                        raw = part.bytes
                        if v1 is not None:
                            for decoded in v1.feed(raw):
                                value = raw
                                if not isinstance(decoded, FrameError):
                                    try:
                                        value = to_stream2(decoded)
                                    except InvalidArgument as exc:
                                        decoded = FrameError(f"cannot be written as Stream V2: {exc}", "bad_message")
                                act(state.message(decoded, value, last))
                        else:
                            try:
                                decoded = decode_message(raw)
                            except FrameError as exc:   # handed to the state as data: a dead letter
                                # (without its traceback, which holds this frame: a cycle)
                                decoded = exc.with_traceback(None)
                            act(state.message(decoded, raw, last))
                        sequence += 1
            act(state.tick(time.monotonic()))
            if series is not None and len(state.finished) >= series:
                report.stopped = "series"
                break
            if idle_timeout is not None and state.series is None and time.monotonic() - last > idle_timeout:
                report.stopped = "idle"
                break
        act(state.close())
        kafka.close()
    finally:
        kafka.close(flush=False)   # the normal way out has flushed and closed it already
        poller.unregister(sock)
        poller.unregister(monitor)
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        context.term()
        if kafka.dlq is not None:
            try:
                kafka.dlq.flush()
            finally:
                kafka.dlq.close()
        if isinstance(json_lines, str) and out is not None:
            out.close()
    report.images = kafka.images
    report.dead_letters = state.dead
    report.series = list(state.finished)
    report.seconds = time.monotonic() - t0
    return report
