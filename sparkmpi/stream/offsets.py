"""Offset ranges: plan a micro-batch, read exactly its messages, decode, dead-letter, commit.

The micro-batch driver's loop, built from these pieces::

    parts = topic_partitions(bootstrap, topic)
    committed = committed_offsets(bootstrap, group, topic, parts)    # {(topic, p): offset or None}
    marks = watermarks(bootstrap, topic, parts)                      # {(topic, p): (low, high)}
    ranges = plan_batch(committed, marks, max_messages=N)            # [OffsetRange], pure
    # inside Spark tasks, one range per partition:
    records = read_offset_range(bootstrap, r.topic, r.partition, r.start, r.end)
    items = [decode_record(rec) for rec in records]                  # Frame | EndOfScan | DeadLetter
    # ... run the MPI job, write its output durably, send dead letters ...
    commit_offsets(bootstrap, group, ranges)                         # only now

:func:`plan_batch` and :func:`decode_record` do no I/O.  Records, frames and
dead letters are plain picklable objects (they cross Spark's task boundary).
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from .._retry import retry
from .kafka_client import (
    ErrorTrap, broker_unavailable, check_bootstrap, check_broker, client_config, ensure_topic, kafka_error_text,
)
from ._errors import BrokerUnavailable, OffsetError, StreamTimeout
from .frames import EndOfScan, FrameError, FrameHeader, decode_message
from ..errors import InvalidArgument, InvalidArgumentType

TopicPartitionKey = tuple  # (topic: str, partition: int)


@dataclass(frozen=True, order=True)
class OffsetRange:
    """Messages ``[start, end)`` of one topic-partition."""

    topic: str
    partition: int
    start: int
    end: int

    def __post_init__(self):
        if not isinstance(self.topic, str) or not self.topic:
            raise InvalidArgument(f"topic: expected a non-empty string, got {self.topic!r}")
        for name in ("partition", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name}: expected an integer >= 0, got {value!r}")
        if self.end < self.start:
            raise InvalidArgument(f"end ({self.end}) must be >= start ({self.start}) for {self.topic}[{self.partition}]")

    @property
    def count(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict:
        return {"topic": self.topic, "partition": self.partition, "start": self.start, "end": self.end}


# ---------------------------------------------------------------- planning (pure)

def _fair_shares(available: list[int], cap: int) -> list[int]:
    """Split ``cap`` among partitions with ``available`` messages, as evenly as possible."""
    take = [0] * len(available)
    left = cap
    open_ = [i for i, a in enumerate(available) if a > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        still = []
        for rank, i in enumerate(open_):
            want = share + (1 if rank < extra else 0)
            got = min(want, available[i] - take[i])
            take[i] += got
            left -= got
            if take[i] < available[i]:
                still.append(i)
        open_ = still
    return take


def plan_batch(committed: Mapping[TopicPartitionKey, int | None],
               watermarks: Mapping[TopicPartitionKey, tuple[int, int] | int], *,
               max_messages: int | None = None, allow_gaps: bool = False) -> list[OffsetRange]:
    """Offset ranges for the next batch: from each committed offset up to the high watermark.

    Parameters
    ----------
    committed : mapping (topic, partition) -> int or None
        Next offset to process per partition (Kafka's committed offset);
        None or a missing key means "from the start" (the low watermark).
    watermarks : mapping (topic, partition) -> (low, high) or high
        Offsets currently in each partition: ``[low, high)``.  Only partitions
        listed here are planned.
    max_messages : int, optional
        Cap on the batch's total messages, shared evenly among partitions.
    allow_gaps : bool
        A committed offset below the low watermark means messages were deleted
        (retention) before being processed; this is an :class:`OffsetError`
        unless ``allow_gaps``, which resumes at the low watermark.

    Returns
    -------
    list of OffsetRange
        Non-empty ranges, sorted by (topic, partition); empty when nothing is new.

    Raises
    ------
    OffsetError
        A committed offset beyond the high watermark (the topic was recreated
        or truncated), or a gap when not allowed.
    """
    if max_messages is not None and (isinstance(max_messages, bool) or not isinstance(max_messages, int)
                                     or max_messages < 1):
        raise InvalidArgument(f"max_messages: expected an integer >= 1 or None, got {max_messages!r}")
    keys = sorted(watermarks)
    starts, ends = [], []
    for key in keys:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise InvalidArgument(f"watermarks: keys must be (topic, partition), got {key!r}")
        mark = watermarks[key]
        low, high = (0, mark) if isinstance(mark, int) else mark
        if not 0 <= low <= high:
            raise InvalidArgument(f"watermarks[{key!r}]: expected 0 <= low <= high, got {mark!r}")
        start = committed.get(key)
        if start is None or start < 0:  # never committed (librdkafka reports -1001 as None upstream)
            start = low
        if start > high:
            raise OffsetError(f"{key[0]}[{key[1]}]: committed offset {start} is beyond the high watermark {high}; "
                              f"was the topic deleted and recreated? reset the consumer group's offsets")
        if start < low:
            if not allow_gaps:
                raise OffsetError(f"{key[0]}[{key[1]}]: committed offset {start} is below the low watermark {low}: "
                                  f"{low - start} message(s) were deleted before being processed")
            start = low
        starts.append(start)
        ends.append(high)
    if max_messages is not None:
        takes = _fair_shares([e - s for s, e in zip(starts, ends)], max_messages)
        ends = [s + t for s, t in zip(starts, takes)]
    return [OffsetRange(k[0], k[1], s, e) for k, s, e in zip(keys, starts, ends) if e > s]


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class KafkaRecord:
    """One message as read from Kafka (picklable; unlike confluent-kafka's Message)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


@dataclass(frozen=True)
class Frame:
    """A decoded frame and where it came from."""

    header: FrameHeader
    array: np.ndarray
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class EndMarker:
    """A decoded end-of-scan marker and where it came from."""

    marker: EndOfScan
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be decoded: the original bytes and the reason."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    code: str


def decode_record(record: KafkaRecord, *, check_finite: bool = True) -> Frame | EndMarker | DeadLetter:
    """Decode one record; never raises for bad content (returns a :class:`DeadLetter`).

    Besides the frame format's checks, a frame's Kafka key must be its index
    (ASCII decimal) and a marker's key ``b"end"``.
    """
    where = (record.topic, record.partition, record.offset)
    if record.value is None:
        return DeadLetter(*where, record.key, None, "message has no value (tombstone)", "empty")
    try:
        result = decode_message(record.value, check_finite=check_finite)
    except FrameError as exc:
        return DeadLetter(*where, record.key, record.value, str(exc), exc.code)
    if isinstance(result, EndOfScan):
        return EndMarker(result, *where)
    header, array = result
    if record.key != str(header.index).encode():
        return DeadLetter(*where, record.key, record.value,
                          f"message key {record.key!r} does not match the header's frame index {header.index}",
                          "key_mismatch")
    return Frame(header, array, *where)


@dataclass
class StreamCounters:
    """Counts of what a batch (or a whole stream) saw."""

    messages: int = 0
    frames: int = 0
    frame_bytes: int = 0
    end_markers: int = 0
    dead_letters: int = 0
    reasons: Counter = field(default_factory=Counter)

    def add(self, item: Frame | EndMarker | DeadLetter) -> None:
        self.messages += 1
        if isinstance(item, Frame):
            self.frames += 1
            self.frame_bytes += item.array.nbytes
        elif isinstance(item, EndMarker):
            self.end_markers += 1
        elif isinstance(item, DeadLetter):
            self.dead_letters += 1
            self.reasons[item.code] += 1
        else:
            raise InvalidArgumentType(f"item: expected Frame, EndMarker or DeadLetter, got {type(item).__name__}")

    def merge(self, other: "StreamCounters") -> "StreamCounters":
        self.messages += other.messages
        self.frames += other.frames
        self.frame_bytes += other.frame_bytes
        self.end_markers += other.end_markers
        self.dead_letters += other.dead_letters
        self.reasons.update(other.reasons)
        return self

    def to_json(self) -> dict:
        return {"messages": self.messages, "frames": self.frames, "frame_bytes": self.frame_bytes,
                "end_markers": self.end_markers, "dead_letters": self.dead_letters,
                "reasons": dict(sorted(self.reasons.items()))}


# ---------------------------------------------------------------- broker I/O

READER_DEFAULTS = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "enable.partition.eof": False,
    # 8 MiB per fetch, so a small range read from inside a log stops near its end
    # (BENCHMARKS.md, streaming); a message larger than this still comes back whole.
    "fetch.max.bytes": 8 * 1024 * 1024,
    "max.partition.fetch.bytes": 8 * 1024 * 1024,
    "fetch.wait.max.ms": 50,
    "queued.max.messages.kbytes": 262144,
    "isolation.level": "read_committed",
}


def _check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
    return float(timeout)


def read_offset_range(bootstrap: str, topic: str, partition: int, start: int, end: int, *,
                      timeout: float = 30.0, consumer_config: dict | None = None) -> list[KafkaRecord]:
    """Read exactly the messages at offsets ``[start, end)`` of ``topic[partition]``.

    Uses an assigned (not subscribed) consumer, so no group membership and no
    rebalancing: safe to call from many Spark tasks at once.  Nothing is
    committed.  The consumer is kept for the next call in the same process
    (Spark reuses its Python workers, so a micro-batch loop pays for a client
    and its broker connection once, not per batch).

    Raises
    ------
    BrokerUnavailable
        No broker answers at ``bootstrap`` (within ``min(timeout, 5)`` s).
    StreamTimeout
        The range was not fully read within ``timeout`` s (names the address,
        offsets read and the last client error).
    OffsetError
        The range lies outside the partition's current ``[low, high)``.
    """
    from confluent_kafka import KafkaError, TopicPartition

    rng = OffsetRange(topic, partition, start, end)  # validates
    timeout = _check_timeout(timeout)
    check_bootstrap(bootstrap)
    if rng.count == 0:
        return []
    t0 = time.monotonic()
    reader = _ReaderPool.take(bootstrap, consumer_config)
    consumer, trap = reader.consumer, reader.trap
    reusable = False
    try:
        probe = min(timeout, 5.0)
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=probe)
        except Exception as exc:  # KafkaException: transport down, timed out
            raise broker_unavailable(bootstrap, time.monotonic() - t0, trap.last or kafka_error_text(exc)) \
                from None
        if start < low or end > high:
            raise OffsetError(f"{topic}[{partition}] holds offsets [{low}, {high}) at {bootstrap}; "
                              f"cannot read [{start}, {end})")
        consumer.assign([TopicPartition(topic, partition, start)])
        out: list[KafkaRecord] = []
        next_offset = start
        deadline = t0 + timeout
        while next_offset < end:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StreamTimeout(f"reading {topic}[{partition}] offsets [{start}, {end}) from {bootstrap}: "
                                    f"got {len(out)} of {end - start} messages in {timeout:.1f} s "
                                    f"(next offset {next_offset}); last client error: {trap.last or 'none'}")
            batch = consumer.consume(num_messages=min(end - next_offset, 10000), timeout=min(left, 0.5))
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise BrokerUnavailable(f"reading {topic}[{partition}] from {bootstrap}: {err}")
                offset = msg.offset()
                if offset < next_offset:
                    continue  # never expected after assign(); keeps the result duplicate-free
                if offset >= end:
                    next_offset = end
                    break
                ts = msg.timestamp()[1]
                out.append(KafkaRecord(topic, partition, offset, msg.key(), msg.value(), ts))
                next_offset = offset + 1
            if not batch and next_offset < end:
                # offsets may be skipped (transaction markers, compaction): trust the position
                pos = consumer.position([TopicPartition(topic, partition)])[0].offset
                if pos >= end:
                    break
        reusable = True
        return out
    finally:
        _ReaderPool.give_back(reader, reusable)


@dataclass
class _Reader:
    key: tuple
    consumer: object
    trap: ErrorTrap


class _ReaderPool:
    """Idle range-reading consumers of this process, by bootstrap and configuration.

    A reader is checked out for one range at a time, so concurrent calls (threads)
    never share a consumer.  One that failed is closed, not kept: its state
    is unknown.
    """

    MAX_IDLE = 4
    _idle: dict[tuple, list[_Reader]] = {}
    _lock = threading.Lock()

    @classmethod
    def take(cls, bootstrap: str, consumer_config: dict | None) -> _Reader:
        from confluent_kafka import Consumer

        extra = dict(consumer_config or {})
        key = (bootstrap, tuple(sorted((k, repr(v)) for k, v in extra.items())))
        with cls._lock:
            idle = cls._idle.get(key)
            if idle:
                reader = idle.pop()
                reader.trap.last = ""  # errors of an earlier use are not this call's cause
                return reader
        trap = ErrorTrap()
        conf = client_config(bootstrap, trap, **READER_DEFAULTS)
        conf["group.id"] = "sparkmpi-offset-reader"  # required by the client; never joined nor committed
        conf.update(extra)
        return _Reader(key, Consumer(conf), trap)

    @classmethod
    def give_back(cls, reader: _Reader, reusable: bool) -> None:
        if reusable:
            try:
                reader.consumer.unassign()  # stops prefetching past the range
            except Exception:  # noqa: BLE001  (a consumer in doubt is closed below)
                reusable = False
        if reusable:
            with cls._lock:
                if sum(len(v) for v in cls._idle.values()) < cls.MAX_IDLE:
                    cls._idle.setdefault(reader.key, []).append(reader)
                    return
        reader.consumer.close()

    @classmethod
    def close_all(cls) -> None:
        with cls._lock:
            readers = [r for idle in cls._idle.values() for r in idle]
            cls._idle.clear()
        for reader in readers:
            try:
                reader.consumer.close()
            except Exception:  # noqa: BLE001  (exiting anyway)
                pass


atexit.register(_ReaderPool.close_all)


_RETRY_CODES = ("NOT_COORDINATOR", "COORDINATOR_LOAD_IN_PROGRESS", "COORDINATOR_NOT_AVAILABLE",
                "_WAIT_COORD", "_TIMED_OUT", "REQUEST_TIMED_OUT", "_TRANSPORT")


def _with_retries(call, timeout: float, what: str, trap: ErrorTrap, bootstrap: str):
    """Run ``call(seconds_left)`` until it succeeds, retrying transient group-coordinator
    errors (the coordinator moves or loads right after a broker starts) with backoff."""
    from confluent_kafka import KafkaError, KafkaException

    def transient(exc) -> bool:
        err = exc.args[0] if exc.args else None
        return isinstance(err, KafkaError) and (err.retriable() or err.name() in _RETRY_CODES)

    def describe(exc) -> str:
        return kafka_error_text(exc) + (f"; last client error: {trap.last}" if trap.last else "")

    try:
        return retry(lambda left: call(max(0.1, left)), what=what, address=bootstrap, timeout=timeout,
                     retry_on=(KafkaException,), transient=transient, first_delay=0.05, max_delay=1.0,
                     describe=describe, error=BrokerUnavailable)
    except KafkaException as exc:  # not transient
        raise BrokerUnavailable(f"could not {what} {bootstrap}: {describe(exc)}") from exc


def watermarks(bootstrap: str, topic: str, partitions: Iterable[int] | None = None, *,
               timeout: float = 10.0) -> dict[TopicPartitionKey, tuple[int, int]]:
    """``{(topic, p): (low, high)}`` for the given (default: all) partitions."""
    from confluent_kafka import Consumer, TopicPartition

    from .kafka_client import topic_partitions

    timeout = _check_timeout(timeout)
    check_broker(bootstrap, timeout=min(timeout, 5.0))
    parts = sorted(partitions) if partitions is not None else topic_partitions(bootstrap, topic, timeout)
    if not parts:
        raise OffsetError(f"topic {topic!r} does not exist at {bootstrap} (or has no partitions)")
    trap = ErrorTrap()
    consumer = Consumer(client_config(bootstrap, trap, **{"group.id": "sparkmpi-watermarks",
                                                          "enable.auto.commit": False}))
    try:
        out = {}
        for p in parts:
            try:
                out[(topic, p)] = tuple(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout))
            except Exception as exc:
                raise StreamTimeout(f"watermarks of {topic}[{p}] from {bootstrap} not received within "
                                    f"{timeout:.1f} s: {trap.last or exc}") from None
        return out
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: Iterable[int], *,
                      timeout: float = 10.0) -> dict[TopicPartitionKey, int | None]:
    """The consumer group's committed offsets: ``{(topic, p): next offset or None}``."""
    from confluent_kafka import Consumer, TopicPartition

    timeout = _check_timeout(timeout)
    if not isinstance(group, str) or not group:
        raise InvalidArgument(f"group: expected a non-empty consumer group id, got {group!r}")
    check_broker(bootstrap, timeout=min(timeout, 5.0))
    trap = ErrorTrap()
    consumer = Consumer(client_config(bootstrap, trap, **{"group.id": group, "enable.auto.commit": False}))
    try:
        wanted = [TopicPartition(topic, p) for p in sorted(partitions)]
        got = _with_retries(lambda left: consumer.committed(wanted, timeout=left), timeout,
                            f"read the committed offsets of group {group!r} for {topic!r} from", trap, bootstrap)
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in got}
    finally:
        consumer.close()


def commit_offsets(bootstrap: str, group: str, ranges: Iterable[OffsetRange], *, timeout: float = 10.0) -> None:
    """Commit ``range.end`` for every range as ``group``'s next offset (synchronously).

    Call this only after the batch's output is durably written: a crash
    before it replays the batch; a crash after it never does.

    Raises
    ------
    BrokerUnavailable
        The broker rejected the commit or did not answer (names the address).
    """
    from confluent_kafka import Consumer, TopicPartition

    timeout = _check_timeout(timeout)
    if not isinstance(group, str) or not group:
        raise InvalidArgument(f"group: expected a non-empty consumer group id, got {group!r}")
    offsets = [TopicPartition(r.topic, r.partition, r.end) for r in ranges]
    if not offsets:
        return
    check_broker(bootstrap, timeout=min(timeout, 5.0))
    trap = ErrorTrap()
    consumer = Consumer(client_config(bootstrap, trap, **{"group.id": group, "enable.auto.commit": False,
                                                          "socket.timeout.ms": int(timeout * 1000)}))
    try:
        result = _with_retries(lambda left: consumer.commit(offsets=offsets, asynchronous=False), timeout,
                               f"commit the offsets of group {group!r} at", trap, bootstrap)
        bad = [f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in result or [] if tp.error is not None]
        if bad:
            raise BrokerUnavailable(f"committing offsets of group {group!r} at {bootstrap} failed for {bad}")
    finally:
        consumer.close()


class DeadLetterWriter:
    """Writes :class:`DeadLetter` records to ``<topic>.dlq`` (created on first use).

    The value is the original message bytes; the key the original key;
    Kafka headers carry ``reason``, ``code``, ``source_topic``,
    ``source_partition`` and ``source_offset``.  :meth:`flush` waits for
    delivery (call it before committing the batch's offsets).
    """

    def __init__(self, bootstrap: str, *, suffix: str = ".dlq", timeout: float = 10.0):
        from confluent_kafka import Producer

        self.bootstrap, self.suffix, self.timeout = bootstrap, suffix, _check_timeout(timeout)
        self._trap = ErrorTrap()
        self._producer = Producer(client_config(bootstrap, self._trap, **{
            "acks": "all", "enable.idempotence": True, "linger.ms": 5, "message.max.bytes": 64 * 1024 * 1024,
            "message.timeout.ms": int(self.timeout * 1000) + 5000}))
        self._topics: set[str] = set()
        self._failures: list[str] = []
        self.written = 0
        self.counts: Counter = Counter()

    def topic_for(self, topic: str) -> str:
        return topic + self.suffix

    def write(self, letter: DeadLetter) -> None:
        if not isinstance(letter, DeadLetter):
            raise InvalidArgumentType(f"letter: expected DeadLetter, got {type(letter).__name__}")
        target = self.topic_for(letter.topic)
        if target not in self._topics:
            ensure_topic(self.bootstrap, target, 1, timeout=self.timeout)
            self._topics.add(target)
        headers = [("reason", letter.reason.encode()), ("code", letter.code.encode()),
                   ("source_topic", letter.topic.encode()), ("source_partition", str(letter.partition).encode()),
                   ("source_offset", str(letter.offset).encode())]

        def delivered(err, msg):
            if err is not None:
                self._failures.append(f"{target}: {err}")

        while True:
            try:
                self._producer.produce(target, letter.value, key=letter.key, headers=headers, on_delivery=delivered)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)
        self.written += 1
        self.counts[letter.code] += 1

    def flush(self) -> None:
        """Wait until every dead letter is stored; raise if any could not be."""
        left = self._producer.flush(self.timeout)
        if self._failures:
            raise BrokerUnavailable(f"{len(self._failures)} dead letter(s) not stored at {self.bootstrap}: "
                                    f"{self._failures[0]}")
        if left:
            raise StreamTimeout(f"{left} dead letter(s) not delivered to {self.bootstrap} within "
                                f"{self.timeout:.1f} s: {self._trap.last or 'broker slow or unreachable'}")

    def close(self, wait: bool = True) -> None:
        """Release the producer's broker connections (call :meth:`flush` first:
        close flushes too, without a deadline).  ``wait=False`` (broker gone)
        closes it in a daemon thread instead."""
        from .kafka_io import close_client

        producer, self._producer = self._producer, None
        if producer is not None:
            close_client(producer, wait)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self.close(wait=exc[0] is None)
