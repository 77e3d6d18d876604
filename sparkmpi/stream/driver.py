"""The micro-batch driver: Kafka offset ranges -> one Spark RDD per batch -> one MPI job.

The paper's Fig. 7-8, with exactly-once output::

    from sparkmpi.stream.driver import StreamDriver
    driver = StreamDriver(spark, "127.0.0.1:9092", "frames", "analysis", "out/", ranks=2,
                          trigger=0.5, max_frames=4000)
    report = driver.run(until_end_of_scan=True)

Each batch:

1. **plan**: new offsets per topic-partition since the last commit
   (:func:`~.offsets.plan_batch`), at most ``max_frames`` messages; a batch is
   cut every ``trigger`` seconds, or as soon as ``max_frames`` are ready;
2. **read in the tasks**: the ranges are split over ``ranks`` Spark partitions
   (:func:`~._batches.assign_ranges`); each partition reads exactly its ranges
   with :func:`~.offsets.read_offset_range` inside its task;
3. **MPI**: :func:`sparkmpi.run` runs ``process(comm, frames)`` as one rank per
   partition.  Messages are decoded in the rank; bad ones become dead letters
   and never reach ``process``;
4. **dead letters** go to ``<topic>.dlq`` (flushed);
5. **output**: ``<out>/batch-NNNNNN.npz`` written atomically and durably, with
   the batch's offset ranges inside (:mod:`._output`);
6. **commit**: only now the ranges' ends are committed to the consumer group.

On start, :meth:`StreamDriver.run` reconciles: outputs whose ranges go beyond
the committed offsets (a crash between 5 and 6) are committed, not processed
again.  So a SIGKILL at any moment loses no frame and duplicates none in the
outputs.  Dead letters are at-least-once (a crash between 4 and 5 sends them
again).

The MPI function
----------------
``process(comm, frames) -> Mapping[str, array-like] | None`` runs on every
rank; ``frames`` yields :class:`~.offsets.Frame` objects (``.header``,
``.array``, ``.partition``, ``.offset``) and must be consumed to the end.  The
arrays a rank returns are stored as ``result.<name>``; the same name from
several ranks is concatenated along axis 0 in rank order, so per-frame values
line up with the output's ``frame_index``; return a batch-wide value (e.g. an
Allreduce'd image) from rank 0 only.  :func:`integrate_frames` is the default.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import JobFailed, SparkMPIError
from ._batches import assign_ranges, batch_file_name, percentiles, reconcile, trigger_due
from .kafka_client import ErrorTrap, check_bootstrap, check_broker, client_config, topic_partitions
from ._errors import BrokerUnavailable, OffsetError, StreamTimeout
from ._output import (
    list_outputs, output_ranges, read_meta, remove_stale_temporaries, write_atomic_npz,
)
from ._rank import ProcessFunction, _identity, _noop_job, _RankJob, _read_empty, _read_ranges, integrate_frames
from .offsets import (
    DeadLetter, DeadLetterWriter, Frame, OffsetRange, commit_offsets, committed_offsets, plan_batch,
)

log = logging.getLogger("sparkmpi.stream.driver")

#: Test hook: ``PHASE:BATCH`` (PHASE one of before_write, after_write, after_commit) makes the
#: driver print ``sparkmpi test hook: paused at PHASE of batch BATCH`` to stderr and block there,
#: so a test can SIGKILL it at exactly that point.
TEST_PAUSE_VARIABLE = "SPARKMPI_TEST_PAUSE_AT"


def _test_pause(phase: str, batch: int) -> None:
    if os.environ.get(TEST_PAUSE_VARIABLE) == f"{phase}:{batch}":
        print(f"sparkmpi test hook: paused at {phase} of batch {batch}", file=sys.stderr, flush=True)
        threading.Event().wait()

__all__ = ["StreamDriver", "ZmqStreamDriver", "run_stream", "integrate_frames", "BatchReport", "StreamReport",
           "BatchFailed"]


class BatchFailed(SparkMPIError):
    """A batch's MPI job failed more often than allowed; nothing of it was committed.

    Attributes: ``batch`` (number), ``ranges`` (its offset ranges), ``attempts``.
    """

    def __init__(self, message: str, *, batch: int, ranges, attempts: int):
        super().__init__(message)
        self.batch, self.ranges, self.attempts = batch, tuple(ranges), attempts


# ---------------------------------------------------------------- reports

@dataclass
class BatchReport:
    """What one batch did (also one JSON line, ``event: "batch"``)."""

    batch: int
    source: str
    ranges: list
    frames: int
    messages: int
    bytes: int
    dead_letters: int
    end_markers: int
    attempts: int
    latency_s: float | None         # oldest frame's producer time -> output written
    latency_p50_s: float | None     # per-frame latencies of this batch
    latency_p99_s: float | None
    seconds: float                  # wall time of the batch (plan -> commit)
    job_s: float                    # Spark + MPI job (includes the Kafka reads in the tasks)
    write_s: float
    commit_s: float
    frames_per_s: float             # this batch: frames / seconds
    total_frames: int
    total_dead_letters: int
    stream_frames_per_s: float      # all frames so far / time since the first batch started
    path: str
    written_at: float
    reasons: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"event": "batch", **asdict(self)}

    def line(self) -> str:
        lat = "" if self.latency_s is None else (
            f" | latency p50 {self.latency_p50_s:.2f} s p99 {self.latency_p99_s:.2f} s")
        return (f"batch {self.batch}: {self.frames} frames ({self.total_frames} total) in {self.seconds:.2f} s | "
                f"{self.stream_frames_per_s:.0f} frames/s{lat} | dead letters {self.total_dead_letters}")


@dataclass
class StreamReport:
    """What a whole :meth:`run` did."""

    batches: int
    frames: int
    bytes: int
    dead_letters: int
    end_markers: int
    seconds: float
    frames_per_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    latency_max_s: float | None
    reconciled: list           # ranges committed at start from outputs already on disk
    stopped: str               # "end_of_scan", "idle", "max_batches"
    out_dir: str

    def to_json(self) -> dict:
        return {"event": "end", **asdict(self)}


class _Reporter:
    """One-line progress on a terminal stream and/or JSON lines to a file."""

    def __init__(self, progress, json_lines):
        self.progress = progress
        self._own = False
        if isinstance(json_lines, (str, Path)):
            self.sink = open(json_lines, "a", buffering=1)
            self._own = True
        else:
            self.sink = json_lines
        self._dirty = False

    def event(self, obj: dict, text: str | None = None, *, final: bool = False) -> None:
        if self.sink is not None:
            self.sink.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
            self.sink.flush()
        if self.progress is not None and text is not None:
            tty = getattr(self.progress, "isatty", lambda: False)()
            if tty:
                self.progress.write("\r\033[K" + text + ("\n" if final else ""))
                self._dirty = not final
            else:
                self.progress.write(text + "\n")
            self.progress.flush()

    def note(self, obj: dict, text: str) -> None:
        if self._dirty and self.progress is not None:
            self.progress.write("\n")
            self._dirty = False
        self.event(obj, text, final=True)

    def close(self) -> None:
        if self._dirty and self.progress is not None:
            self.progress.write("\n")
            self.progress.flush()
        if self._own:
            self.sink.close()


# ---------------------------------------------------------------- common batch core

def _check_positive(name: str, value, *, integer=False, allow_none=False, minimum=None):
    """Integers: >= ``minimum`` (default 1).  Numbers: > 0, or >= ``minimum`` when given."""
    if value is None and allow_none:
        return None
    if integer:
        lo = 1 if minimum is None else minimum
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
        expected = f"an integer >= {lo}"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value > 0 if minimum is None else value >= minimum)
        expected = "a number > 0" if minimum is None else f"a number >= {minimum}"
    if not ok:
        raise ValueError(f"{name}: expected {expected}{' or None' if allow_none else ''}, got {value!r}")
    return value


class _BatchCore:
    """What the Kafka and ZeroMQ drivers share: run a batch's MPI job, write its output."""

    def __init__(self, spark, out_dir, *, ranks, trigger, max_frames, process, expect_shape, expect_dtype,
                 check_finite, batch_retries, job_timeout, job_settings, progress, json_lines, after_write):
        from ..config import load_settings
        from ..launch.job import pickle_function, preload_modules

        self.sc = getattr(spark, "sparkContext", spark)
        if not hasattr(self.sc, "parallelize"):
            raise TypeError(f"spark: expected a SparkSession or SparkContext, got {type(spark).__name__}")
        self.out_dir = Path(out_dir)
        self.ranks = _check_positive("ranks", ranks, integer=True)
        self.trigger = _check_positive("trigger", trigger, minimum=0)
        self.max_frames = _check_positive("max_frames", max_frames, integer=True, allow_none=True)
        if not callable(process):
            raise TypeError(f"process: expected a callable process(comm, frames), got {type(process).__name__}")
        if expect_shape is not None:
            expect_shape = tuple(expect_shape)
            if not expect_shape or not all(isinstance(s, int) and s > 0 for s in expect_shape):
                raise ValueError(f"expect_shape: expected a tuple of positive ints, got {expect_shape!r}")
        if expect_dtype is not None:
            expect_dtype = np.dtype(expect_dtype)
        self.batch_retries = _check_positive("batch_retries", batch_retries, integer=True, minimum=0)
        self.job_timeout = _check_positive("job_timeout", job_timeout, allow_none=True)
        self.job_settings = dict(job_settings or {})
        # The ranks run _RankJob, which unpickles `process`: its module is preloaded too.
        self.job_settings["preload"] = preload_modules(
            process, load_settings(preload=self.job_settings.get("preload")).preload)
        self.process = process
        self._job = _RankJob(pickle_function(process), expect_shape, expect_dtype, check_finite)
        self.reporter = _Reporter(progress, json_lines)
        self.after_write = after_write
        self.next_batch = 0
        self.totals = {"frames": 0, "bytes": 0, "dead_letters": 0, "end_markers": 0, "batches": 0}
        self.latencies: list[np.ndarray] = []
        self.first_start: float | None = None

    def warm_up(self) -> float:
        """Run one empty MPI job so Spark's Python workers and the spare rank
        processes are up before the first frame arrives; return its seconds."""
        import sparkmpi

        t0 = time.monotonic()
        # Every Python worker a batch may land on (not only the ones this
        # job uses) gets its spares, so no early batch starts ranks cold.
        sparkmpi.warm_up(self.sc, warm_pool=self.job_settings.get("warm_pool"),
                         preload=self.job_settings["preload"])
        sparkmpi.run(self.sc.parallelize([[] for _ in range(self.ranks)], self.ranks).flatMap(self._warm_reader()),
                     _noop_job, timeout=self.job_timeout, **self.job_settings)
        return time.monotonic() - t0

    def _warm_reader(self):
        return _identity

    def run_job(self, rdd, batch: int, ranges) -> tuple[list, int]:
        """Run the batch's MPI job with retries; ``(per-rank results, attempts)``."""
        import sparkmpi

        attempts = 0
        while True:
            attempts += 1
            try:
                results = sparkmpi.run(rdd, self._job, timeout=self.job_timeout, **self.job_settings)
                if len(results) != self.ranks:
                    raise JobFailed(f"expected {self.ranks} rank reports, got {len(results)}")
                return results, attempts
            except JobFailed as exc:
                self.on_job_failure(exc, batch, ranges, attempts)

    def on_job_failure(self, exc: JobFailed, batch: int, ranges, attempts: int) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = ", ".join(f"{r.topic}[{r.partition}] [{r.start}, {r.end})" for r in ranges)
        if attempts > self.batch_retries:
            raise BatchFailed(f"batch {batch} (offsets {where}) failed {attempts} time(s); nothing of it was "
                              f"committed: {first}", batch=batch, ranges=ranges, attempts=attempts) from exc
        self.reporter.note({"event": "retry", "batch": batch, "attempt": attempts, "error": first},
                           f"batch {batch}: MPI job failed (attempt {attempts} of {self.batch_retries + 1}), "
                           f"retrying: {first}")

    def write_output(self, batch: int, meta: dict, results: list) -> tuple[Path, float, dict]:
        """Merge the ranks' reports and write the batch file; ``(path, written_at, merged)``."""
        cat = (lambda key, dt: np.concatenate([r[key] for r in results]).astype(dt, copy=False))
        arrays = {"frame_index": cat("index", np.int64), "frame_partition": cat("partition", np.int32),
                  "frame_offset": cat("offset", np.int64), "frame_ts": cat("ts", np.float64)}
        names = []
        for r in results:
            names.extend(k for k in r["result"] if k not in names)
        for name in names:
            parts = [np.asarray(r["result"][name]) for r in results if name in r["result"]]
            arrays[f"result.{name}"] = parts[0] if len(parts) == 1 else np.concatenate(
                [p.reshape(1) if p.ndim == 0 else p for p in parts])
        dead = [d for r in results for d in r["dead"]]
        markers = [m for r in results for m in r["markers"]]
        reasons: dict[str, int] = {}
        for d in dead:
            reasons[d.code] = reasons.get(d.code, 0) + 1
        written_at = time.time()
        meta = dict(meta, batch=batch, ranks=self.ranks, written_at=written_at,
                    frames=int(arrays["frame_index"].size), messages=sum(r["messages"] for r in results),
                    bytes=sum(r["bytes"] for r in results), dead_letters=len(dead), reasons=reasons,
                    dead=[{"topic": d.topic, "partition": d.partition, "offset": d.offset, "code": d.code,
                           "reason": d.reason[:500]} for d in dead],
                    end_markers_count=len(markers),
                    end_markers=[{"scan": m.marker.scan_id, "frames": m.marker.frames, "topic": m.topic,
                                  "partition": m.partition, "offset": m.offset} for m in markers])
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / batch_file_name(batch)
        if path.exists():
            raise OffsetError(f"{path} exists already; refusing to overwrite an earlier batch's output")
        write_atomic_npz(path, arrays)
        if self.after_write is not None:
            self.after_write(batch, path)
        return path, written_at, {"meta": meta, "frame_ts": arrays["frame_ts"], "dead": dead, "markers": markers}

    def account(self, batch: int, source: str, ranges, merged: dict, path: Path, attempts: int,
                t_start: float, t_job: float, t_write: float, t_commit: float, t_end: float) -> BatchReport:
        meta = merged["meta"]
        done = time.time()
        lat = done - merged["frame_ts"] if merged["frame_ts"].size else np.zeros(0)
        self.latencies.append(lat)
        for key, value in (("frames", meta["frames"]), ("bytes", meta["bytes"]),
                           ("dead_letters", meta["dead_letters"]), ("end_markers", meta["end_markers_count"]),
                           ("batches", 1)):
            self.totals[key] += value
        pct = percentiles(lat)
        seconds = t_end - t_start
        report = BatchReport(
            batch=batch, source=source, ranges=[r.to_json() for r in ranges], frames=meta["frames"],
            messages=meta["messages"], bytes=meta["bytes"], dead_letters=meta["dead_letters"],
            end_markers=meta["end_markers_count"], attempts=attempts,
            latency_s=float(lat.max()) if lat.size else None, latency_p50_s=pct["p50"], latency_p99_s=pct["p99"],
            seconds=seconds, job_s=t_job, write_s=t_write, commit_s=t_commit,
            frames_per_s=meta["frames"] / seconds if seconds > 0 else 0.0,
            total_frames=self.totals["frames"], total_dead_letters=self.totals["dead_letters"],
            stream_frames_per_s=self.totals["frames"] / max(t_end - self.first_start, 1e-9),
            path=str(path), written_at=meta["written_at"], reasons=meta["reasons"])
        self.reporter.event(report.to_json(), report.line())
        return report

    def final(self, reconciled, stopped: str, t0: float) -> StreamReport:
        lat = np.concatenate(self.latencies) if self.latencies else np.zeros(0)
        pct = percentiles(lat)
        seconds = time.monotonic() - t0
        report = StreamReport(
            batches=self.totals["batches"], frames=self.totals["frames"], bytes=self.totals["bytes"],
            dead_letters=self.totals["dead_letters"], end_markers=self.totals["end_markers"], seconds=seconds,
            frames_per_s=self.totals["frames"] / seconds if seconds > 0 else 0.0,
            latency_p50_s=pct["p50"], latency_p99_s=pct["p99"],
            latency_max_s=float(lat.max()) if lat.size else None,
            reconciled=[r.to_json() for r in reconciled], stopped=stopped, out_dir=str(self.out_dir))
        self.reporter.note(report.to_json(), f"stream stopped ({stopped}): {report.batches} batches, "
                                             f"{report.frames} frames, {report.dead_letters} dead letters "
                                             f"in {seconds:.1f} s")
        return report


# ---------------------------------------------------------------- Kafka

class _WatermarkPoller:
    """One long-lived consumer asking for high watermarks (cheap enough to poll often)."""

    def __init__(self, bootstrap: str, topic: str, partitions: list[int], timeout: float):
        from confluent_kafka import Consumer

        self.bootstrap, self.topic, self.partitions, self.timeout = bootstrap, topic, partitions, timeout
        self.trap = ErrorTrap()
        self.consumer = Consumer(client_config(bootstrap, self.trap, **{
            "group.id": "sparkmpi-driver-watermarks", "enable.auto.commit": False}))

    def poll(self) -> dict:
        from confluent_kafka import TopicPartition

        out = {}
        for p in self.partitions:
            try:
                out[(self.topic, p)] = tuple(self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=self.timeout, cached=False))
            except Exception as exc:
                raise BrokerUnavailable(f"no watermarks for {self.topic}[{p}] from {self.bootstrap} within "
                                        f"{self.timeout:.1f} s: {self.trap.last or exc}") from None
        return out

    def close(self, wait: bool = True) -> None:
        _close_client(self.consumer, wait)


class _Committer:
    """One long-lived group member-less consumer that commits offsets with a deadline.

    Cheaper than :func:`~.offsets.commit_offsets` per batch (no new client, no
    metadata round trip); the commit is asynchronous and awaited with a
    deadline, so a lost broker surfaces as :class:`BrokerUnavailable` in time.
    """

    def __init__(self, bootstrap: str, group: str, timeout: float):
        self.bootstrap, self.group, self.timeout = bootstrap, group, timeout
        self.consumer = None
        self.trap = ErrorTrap()
        self._results: list = []

    def _open(self):
        from confluent_kafka import Consumer

        if self.consumer is None:
            self.consumer = Consumer(client_config(self.bootstrap, self.trap, **{
                "group.id": self.group, "enable.auto.commit": False,
                "on_commit": lambda err, parts: self._results.append((err, parts))}))
        return self.consumer

    def commit(self, ranges) -> None:
        from confluent_kafka import TopicPartition

        offsets = [TopicPartition(r.topic, r.partition, r.end) for r in ranges]
        if not offsets:
            return
        consumer = self._open()
        self._results.clear()
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
            deadline = time.monotonic() + self.timeout
            while not self._results:
                if time.monotonic() > deadline:
                    raise StreamTimeout(f"committing offsets of group {self.group!r} at {self.bootstrap}: no answer "
                                        f"within {self.timeout:.1f} s; last client error: {self.trap.last or 'none'}")
                consumer.poll(0.02)
        except Exception:
            self.close(wait=False)   # a fresh client next time
            raise
        err, parts = self._results[0]
        bad = [f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in parts or [] if tp.error is not None]
        if err is not None or bad:
            self.close(wait=False)
            raise BrokerUnavailable(f"committing offsets of group {self.group!r} at {self.bootstrap} failed: "
                                    f"{err or bad}")

    def close(self, wait: bool = True) -> None:
        """Close the client; ``wait=False`` (broker gone) closes it in a daemon
        thread, as librdkafka may block for long on a pending request."""
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            _close_client(consumer, wait)


def _close_client(client, wait: bool) -> None:
    def close():
        try:
            client.close()
        except Exception:  # noqa: BLE001  (closing a client whose broker is gone)
            pass

    if wait:
        close()
    else:
        threading.Thread(target=close, name="sparkmpi-kafka-close", daemon=True).start()


class StreamDriver(_BatchCore):
    """Micro-batches from a Kafka topic through Spark and MPI, with exactly-once outputs.

    Parameters
    ----------
    spark : SparkSession or SparkContext
        Needs at least ``ranks`` free task slots (one barrier stage per batch).
    bootstrap : str
        ``host:port`` of the Kafka cluster.
    topic : str
        The frames' topic (all its partitions are read).
    group : str
        Consumer group whose committed offsets mark what is processed.
    out_dir : path
        Where ``batch-NNNNNN.npz`` files go; one folder per (topic, group).
    ranks : int
        MPI ranks = Spark partitions per batch.
    trigger : float
        Seconds between batches (a batch starts when messages are pending and
        this long has passed since the previous batch started).
    max_frames : int, optional
        Cap on messages per batch; a batch also starts as soon as this many are
        pending.
    process : callable
        ``process(comm, frames) -> mapping`` run on every rank (module docstring);
        default :func:`integrate_frames`.
    expect_shape, expect_dtype : optional
        Frames of another shape or dtype go to the dead letters
        (``wrong_shape``, ``wrong_dtype``) instead of reaching ``process``.
    batch_retries : int
        Times a batch whose MPI job failed is run again before :class:`BatchFailed`.
    broker_retries : int
        Times a lost broker is retried (backoff ``retry_backoff`` s, doubling up
        to ``max_backoff``) before :class:`BrokerUnavailable`.
    read_timeout : float
        Seconds a task may take to read its ranges.
    start_timeout : float
        Seconds to wait for the broker at start (then a clear error naming it).
    topic_timeout : float
        Seconds to wait for ``topic`` to exist (a producer may create it).
    broker_timeout : float
        Seconds one driver-side broker call (watermarks, commit, dead letters)
        may take before it counts as a failed attempt.
    job_timeout : float, optional
        Seconds one batch's MPI job may take.
    job_settings : dict, optional
        Launcher settings for :func:`sparkmpi.run` (``start_timeout=``, ...).
    progress : file, optional
        One progress line per batch (default ``sys.stderr``; None: quiet).
    json_lines : path or file, optional
        One JSON object per event (``reconciled``, ``started``, ``batch``, ``retry``,
        ``broker_retry``, ``end``).
    warm_up : bool
        Run one empty MPI job at start (Spark workers and rank processes ready
        before the first batch).
    after_write : callable, optional
        ``after_write(batch, path)`` right after the output is written and before
        the commit (tests simulate a crash there).
    """

    def __init__(self, spark, bootstrap: str, topic: str, group: str, out_dir, *, ranks: int = 2,
                 trigger: float = 0.5, max_frames: int | None = None, process: ProcessFunction = integrate_frames,
                 expect_shape=None, expect_dtype=None, check_finite: bool = True, batch_retries: int = 2,
                 broker_retries: int = 5, retry_backoff: float = 0.5, max_backoff: float = 5.0,
                 read_timeout: float = 30.0, start_timeout: float = 5.0, topic_timeout: float = 30.0,
                 broker_timeout: float = 10.0,
                 job_timeout: float | None = 300.0, job_settings: dict | None = None,
                 consumer_config: dict | None = None, poll_interval: float = 0.02,
                 warm_up: bool = True, progress=sys.stderr, json_lines=None, after_write=None):
        self.bootstrap = check_bootstrap(bootstrap)
        self.warm = bool(warm_up)
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic: expected a non-empty string, got {topic!r}")
        if not isinstance(group, str) or not group:
            raise ValueError(f"group: expected a non-empty consumer group id, got {group!r}")
        self.topic, self.group = topic, group
        self.broker_retries = _check_positive("broker_retries", broker_retries, integer=True, minimum=0)
        self.retry_backoff = _check_positive("retry_backoff", retry_backoff)
        self.max_backoff = _check_positive("max_backoff", max_backoff)
        self.read_timeout = _check_positive("read_timeout", read_timeout)
        self.start_timeout = _check_positive("start_timeout", start_timeout)
        self.topic_timeout = _check_positive("topic_timeout", topic_timeout)
        self.broker_timeout = _check_positive("broker_timeout", broker_timeout)
        self.poll_interval = _check_positive("poll_interval", poll_interval)
        self.consumer_config = dict(consumer_config or {})
        super().__init__(spark, out_dir, ranks=ranks, trigger=trigger, max_frames=max_frames, process=process,
                         expect_shape=expect_shape, expect_dtype=expect_dtype, check_finite=check_finite,
                         batch_retries=batch_retries, job_timeout=job_timeout, job_settings=job_settings,
                         progress=progress, json_lines=json_lines, after_write=after_write)
        self.committed: dict = {}
        self.partitions: list[int] = []
        self.ended: set = set()
        self._dlq: DeadLetterWriter | None = None
        self._committer = _Committer(self.bootstrap, self.group, self.broker_timeout)

    # -- broker calls with bounded retries ----------------------------------
    def _retrying(self, what: str, call):
        from confluent_kafka import KafkaException

        attempt, delay, t0 = 0, self.retry_backoff, time.monotonic()
        while True:
            try:
                return call()
            except (BrokerUnavailable, StreamTimeout, KafkaException) as exc:
                attempt += 1
                cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if attempt > self.broker_retries:
                    raise BrokerUnavailable(
                        f"{what}: the Kafka broker at {self.bootstrap} did not answer after {attempt} attempt(s) "
                        f"over {time.monotonic() - t0:.1f} s ({self.broker_retries} retries with backoff); "
                        f"offsets are committed up to {self._committed_text()}: {cause}") from exc
                self.reporter.note({"event": "broker_retry", "what": what, "attempt": attempt, "error": cause},
                                   f"{what}: broker at {self.bootstrap} unavailable, retry {attempt} of "
                                   f"{self.broker_retries} in {delay:.1f} s ({cause})")
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)

    def _committed_text(self) -> str:
        return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(self.committed.items())) or "nothing"

    def _broker_alive(self) -> bool:
        try:
            check_broker(self.bootstrap, timeout=min(self.broker_timeout, 2.0))
            return True
        except BrokerUnavailable:
            return False

    def on_job_failure(self, exc, batch, ranges, attempts):
        # A job that failed because the tasks could not read from Kafka is a broker
        # problem: retried with the broker policy, not counted against the batch.
        if not self._broker_alive():
            self._broker_failures = getattr(self, "_broker_failures", 0) + 1
            if self._broker_failures > self.broker_retries:
                raise BrokerUnavailable(f"batch {batch}: the Kafka broker at {self.bootstrap} was lost while the "
                                        f"tasks read their ranges; gave up after {self.broker_retries} retries; "
                                        f"offsets are committed up to {self._committed_text()}") from exc
            delay = min(self.retry_backoff * 2 ** (self._broker_failures - 1), self.max_backoff)
            self.reporter.note({"event": "broker_retry", "what": f"batch {batch}", "attempt": self._broker_failures},
                               f"batch {batch}: broker at {self.bootstrap} unavailable, retry "
                               f"{self._broker_failures} of {self.broker_retries} in {delay:.1f} s")
            time.sleep(delay)
            return
        super().on_job_failure(exc, batch, ranges, attempts - getattr(self, "_broker_failures", 0))

    def _warm_reader(self):
        # an empty range per task: loads confluent-kafka in the Spark workers
        return functools.partial(_read_empty, self.bootstrap, self.read_timeout,
                                 [OffsetRange(self.topic, self.partitions[0], 0, 0)])

    # -- start: broker, topic, reconciliation --------------------------------
    def start(self) -> list[OffsetRange]:
        """Check the broker, wait for the topic, reconcile outputs with commits.

        Returns the ranges committed from outputs already on disk.
        """
        check_broker(self.bootstrap, timeout=self.start_timeout)
        deadline = time.monotonic() + self.topic_timeout
        while True:
            self.partitions = topic_partitions(self.bootstrap, self.topic, timeout=self.start_timeout)
            if self.partitions:
                break
            if time.monotonic() > deadline:
                raise OffsetError(f"topic {self.topic!r} does not exist at {self.bootstrap} "
                                  f"(waited {self.topic_timeout:.0f} s)")
            time.sleep(0.1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir)
        committed = self._retrying("reading committed offsets", lambda: committed_offsets(
            self.bootstrap, self.group, self.topic, self.partitions, timeout=self.broker_timeout))
        outputs = output_ranges(self.out_dir, topic=self.topic, group=self.group)
        rec = reconcile(committed, outputs)
        self.committed = dict(committed)
        if rec.to_commit:
            self._retrying("committing outputs found on disk",
                           lambda: commit_offsets(self.bootstrap, self.group, rec.to_commit,
                                                  timeout=self.broker_timeout))
            self.reporter.note({"event": "reconciled", "ranges": [r.to_json() for r in rec.to_commit]},
                               "committed offsets already in the outputs (crash before commit): " +
                               ", ".join(f"{r.topic}[{r.partition}] [{r.start}, {r.end})" for r in rec.to_commit))
        self.committed = dict(rec.committed)
        self.next_batch = rec.next_batch
        for _, path in list_outputs(self.out_dir):
            for m in read_meta(path).get("end_markers", []):
                self.ended.add((m["topic"], m["partition"]))
        return list(rec.to_commit)

    # -- one batch -------------------------------------------------------------
    def process_batch(self, ranges: list[OffsetRange]) -> BatchReport:
        batch = self.next_batch
        t_start = time.monotonic()
        if self.first_start is None:
            self.first_start = t_start
        assignment = assign_ranges(ranges, self.ranks)
        reader = functools.partial(_read_ranges, self.bootstrap, self.read_timeout, self.consumer_config or None)
        rdd = self.sc.parallelize(assignment, self.ranks).flatMap(reader)
        self._broker_failures = 0
        results, attempts = self.run_job(rdd, batch, ranges)
        t_job = time.monotonic()
        dead = [d for r in results for d in r["dead"]]
        if dead:
            if self._dlq is None:
                self._dlq = DeadLetterWriter(self.bootstrap, timeout=self.broker_timeout)
            for letter in dead:
                self._retrying(f"batch {batch}: writing a dead letter", lambda: self._dlq.write(letter))
            self._retrying(f"batch {batch}: flushing dead letters", self._dlq.flush)
        meta = {"source": "kafka", "topic": self.topic, "group": self.group, "bootstrap": self.bootstrap,
                "ranges": [r.to_json() for r in ranges]}
        _test_pause("before_write", batch)
        path, _, merged = self.write_output(batch, meta, results)
        t_write = time.monotonic()
        _test_pause("after_write", batch)
        self._retrying(f"batch {batch}: committing offsets", lambda: self._committer.commit(ranges))
        t_commit = time.monotonic()
        _test_pause("after_commit", batch)
        for r in ranges:
            self.committed[(r.topic, r.partition)] = r.end
        for m in merged["markers"]:
            self.ended.add((m.topic, m.partition))
        self.next_batch = batch + 1
        return self.account(batch, "kafka", ranges, merged, path, attempts, t_start, t_job - t_start,
                            t_write - t_job, t_commit - t_write, t_commit)

    # -- the loop --------------------------------------------------------------
    def run(self, *, until_end_of_scan: bool = False, idle_timeout: float | None = None,
            max_batches: int | None = None,
            on_batch: Callable[[BatchReport], object] | None = None) -> StreamReport:
        """Process batches until a stop condition; return the run's :class:`StreamReport`.

        Parameters
        ----------
        until_end_of_scan : bool
            Stop once every partition's end-of-scan marker is processed and
            nothing is pending.
        idle_timeout : float, optional
            Stop after this many seconds with no new message.
        max_batches : int, optional
            Stop after this many batches.
        on_batch : callable, optional
            ``on_batch(report)`` after each batch is written and committed
            (e.g. to fold its output into a running reconstruction); it runs
            in the driver's thread, so the next batch waits for it.

        Raises
        ------
        BrokerUnavailable
            At start within ``start_timeout`` s, or mid-stream after the retries.
        BatchFailed
            A batch's MPI job failed ``batch_retries + 1`` times.
        """
        _check_positive("idle_timeout", idle_timeout, allow_none=True)
        _check_positive("max_batches", max_batches, integer=True, allow_none=True)
        t0 = time.monotonic()
        healthy = False
        try:
            reconciled = self.start()
            warm = self.warm_up() if self.warm else None
            self.reporter.event({"event": "started", "topic": self.topic, "group": self.group,
                                 "partitions": self.partitions, "committed": self._committed_text(),
                                 "next_batch": self.next_batch, "warm_up_s": warm},
                                f"streaming {self.topic} ({len(self.partitions)} partitions) at {self.bootstrap} "
                                f"as group {self.group}; committed {self._committed_text()}")
            poller = _WatermarkPoller(self.bootstrap, self.topic, self.partitions,
                                      timeout=min(self.broker_timeout, 5.0))
            try:
                stopped = self._loop(poller, until_end_of_scan, idle_timeout, max_batches, on_batch)
                healthy = True
            finally:
                poller.close(wait=healthy)
            return self.final(reconciled, stopped, t0)
        finally:
            self._dlq = None
            self._committer.close(wait=healthy)
            self.reporter.close()

    def _loop(self, poller, until_end_of_scan, idle_timeout, max_batches, on_batch=None) -> str:
        done = 0
        last_batch = -float("inf")
        last_new = time.monotonic()
        seen_high = None
        while True:
            marks = self._retrying("reading watermarks", poller.poll)
            pending = sum(max(high - (low if self.committed.get(key) is None else self.committed[key]), 0)
                          for key, (low, high) in marks.items())
            now = time.monotonic()
            highs = tuple(sorted(marks.items()))
            if highs != seen_high:
                seen_high, last_new = highs, now
            if trigger_due(pending, now - last_batch, trigger=self.trigger, max_frames=self.max_frames):
                ranges = plan_batch(self.committed, marks, max_messages=self.max_frames)
                last_batch = time.monotonic()
                report = self.process_batch(ranges)
                if on_batch is not None:
                    on_batch(report)
                done += 1
                if max_batches is not None and done >= max_batches:
                    return "max_batches"
                continue
            if pending == 0:
                if until_end_of_scan and len(self.ended) >= len(self.partitions):
                    return "end_of_scan"
                if idle_timeout is not None and now - last_new > idle_timeout:
                    return "idle"
            wait = self.poll_interval if pending == 0 else min(self.poll_interval,
                                                               max(self.trigger - (now - last_batch), 0.001))
            time.sleep(wait)


def run_stream(spark, bootstrap: str, topic: str, group: str, out_dir, **options) -> StreamReport:
    """``StreamDriver(spark, bootstrap, topic, group, out_dir, **driver_options).run(**run_options)``.

    ``until_end_of_scan``, ``idle_timeout`` and ``max_batches`` go to :meth:`StreamDriver.run`;
    everything else to the constructor.
    """
    run_keys = ("until_end_of_scan", "idle_timeout", "max_batches")
    run_opts = {k: options.pop(k) for k in run_keys if k in options}
    return StreamDriver(spark, bootstrap, topic, group, out_dir, **options).run(**run_opts)


# ---------------------------------------------------------------- ZeroMQ

class ZmqStreamDriver(_BatchCore):
    """The same loop fed by a ZeroMQ detector stream (:class:`~.detector.ZmqReceiver`).

    Frames are received in the driver (a background thread), cut into batches
    every ``trigger`` s (or at ``max_frames``), parallelised into one RDD of
    ``ranks`` partitions and processed by the same MPI job; outputs are the
    same files (``source: "zmq"``, offsets = the receive sequence number).

    Guarantee: weaker than Kafka's.  ZeroMQ PUSH/PULL keeps no log, so frames
    received but not yet written when the driver dies are lost (at most one
    batch plus the socket buffers); nothing is written twice.  Dead letters
    go to ``<out>/dead-letters.jsonl``.
    """

    def __init__(self, spark, endpoint: str, out_dir, *, ranks: int = 2, trigger: float = 0.5,
                 max_frames: int | None = None, process: ProcessFunction = integrate_frames,
                 expect_shape=None, expect_dtype=None, check_finite: bool = True, batch_retries: int = 2,
                 receive_timeout: float = 10.0, job_timeout: float | None = 300.0, job_settings: dict | None = None,
                 progress=sys.stderr, json_lines=None, after_write=None):
        from .detector import _zmq_endpoint

        self.endpoint = _zmq_endpoint(endpoint)
        self.receive_timeout = _check_positive("receive_timeout", receive_timeout)
        super().__init__(spark, out_dir, ranks=ranks, trigger=trigger, max_frames=max_frames, process=process,
                         expect_shape=expect_shape, expect_dtype=expect_dtype, check_finite=check_finite,
                         batch_retries=batch_retries, job_timeout=job_timeout, job_settings=job_settings,
                         progress=progress, json_lines=json_lines, after_write=after_write)

    def _receive(self, q: "queue.Queue", stop: threading.Event) -> None:
        from .detector import ZmqDeadLetter, ZmqReceiver

        try:
            with ZmqReceiver(self.endpoint, timeout=self.receive_timeout, on_error="yield") as rx:
                for item in rx:
                    if stop.is_set():
                        return
                    if isinstance(item, ZmqDeadLetter):
                        q.put(("dead", item))
                    else:
                        q.put(("frame", item))
                q.put(("end", rx.end))
        except BaseException as exc:  # noqa: BLE001  (handed to the loop)
            q.put(("error", exc))

    def run(self, *, max_batches: int | None = None) -> StreamReport:
        """Receive and process until the end-of-series message (or ``max_batches``)."""
        _check_positive("max_batches", max_batches, integer=True, allow_none=True)
        t0 = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir)
        outputs = output_ranges(self.out_dir, topic="zmq")
        seq = max((r.end for o in outputs for r in o.ranges), default=0)
        self.next_batch = max((o.batch + 1 for o in outputs), default=0)
        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        thread = threading.Thread(target=self._receive, args=(q, stop), name="sparkmpi-zmq-receiver", daemon=True)
        thread.start()
        done, ended, stopped = 0, False, "end_of_scan"
        try:
            while not ended:
                items, first = [], None
                deadline = None
                while True:
                    timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
                    try:
                        kind, obj = q.get(timeout=timeout if timeout is not None else self.receive_timeout + 5)
                    except queue.Empty:
                        if deadline is None:
                            raise StreamTimeout(f"no ZeroMQ message from {self.endpoint} within "
                                                f"{self.receive_timeout + 5:.0f} s") from None
                        break
                    if kind == "error":
                        raise obj
                    if kind == "end":
                        ended = True
                        break
                    if first is None:
                        first = time.monotonic()
                        deadline = first + self.trigger
                    if kind == "frame":
                        header, array = obj
                        items.append(Frame(header, array, "zmq", 0, seq))
                    else:
                        items.append(DeadLetter("zmq", 0, seq, None, b"".join(obj.parts), obj.reason, obj.code))
                    seq += 1
                    if self.max_frames is not None and len(items) >= self.max_frames:
                        break
                if items:
                    self._zmq_batch(items)
                    done += 1
                    if max_batches is not None and done >= max_batches:
                        stopped = "max_batches"
                        break
            return self.final([], stopped, t0)
        finally:
            stop.set()
            thread.join(self.receive_timeout + 1)
            self.reporter.close()

    def _zmq_batch(self, items: list) -> BatchReport:
        batch = self.next_batch
        t_start = time.monotonic()
        if self.first_start is None:
            self.first_start = t_start
        rng = OffsetRange("zmq", 0, items[0].offset, items[-1].offset + 1)
        chunks = [[] for _ in range(self.ranks)]
        for piece, chunk in zip(assign_ranges([rng], self.ranks), chunks):
            for sub in piece:
                chunk.extend(items[sub.start - rng.start:sub.end - rng.start])
        rdd = self.sc.parallelize(chunks, self.ranks).flatMap(_identity)
        results, attempts = self.run_job(rdd, batch, [rng])
        t_job = time.monotonic()
        dead = [d for r in results for d in r["dead"]]
        if dead:
            with open(self.out_dir / "dead-letters.jsonl", "a") as fh:
                for d in dead:
                    fh.write(json.dumps({"batch": batch, "sequence": d.offset, "code": d.code, "reason": d.reason,
                                         "bytes": len(d.value or b"")}) + "\n")
                fh.flush()
        path, _, merged = self.write_output(batch, {"source": "zmq", "topic": "zmq", "group": None,
                                                    "endpoint": self.endpoint, "ranges": [rng.to_json()]}, results)
        t_write = time.monotonic()
        self.next_batch = batch + 1
        return self.account(batch, "zmq", [rng], merged, path, attempts, t_start, t_job - t_start,
                            t_write - t_job, 0.0, t_write)


__all__ = ["StreamDriver", "ZmqStreamDriver", "run_stream", "integrate_frames", "BatchFailed", "BatchReport",
           "StreamReport"]
