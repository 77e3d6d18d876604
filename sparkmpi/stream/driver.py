"""The micro-batch driver: Kafka offset ranges -> the ranks of one MPI world -> exactly-once outputs.

The paper's Fig. 7-8, with exactly-once output::

    from sparkmpi.stream.driver import StreamDriver
    driver = StreamDriver(spark, "127.0.0.1:9092", "frames", "analysis", "out/", ranks=2,
                          trigger=0.5, max_frames=4000)
    report = driver.run(until_end_of_scan=True)

Each batch:

1. **plan**: new offsets per topic-partition since the last commit
   (:func:`~.offsets.plan_batch`), at most ``max_frames`` messages; a batch is
   cut every ``trigger`` seconds, or as soon as ``max_frames`` are ready;
2. **read on the ranks**: the ranges are split over ``ranks`` shares
   (:func:`~._batches.assign_ranges`); ``mode="world"`` (default): one call on
   the stream's :class:`sparkmpi.World` gives rank i its share, and the rank
   reads exactly those ranges with :func:`~.offsets.read_offset_range` (no
   Spark job per batch); ``mode="jobs"``: an RDD of ``ranks`` partitions reads
   them inside its Spark tasks and :func:`sparkmpi.run` starts a fresh MPI job;
3. **MPI**: ``process(comm, frames)`` runs on every rank.  Messages are
   decoded in the rank; bad ones become dead letters and never reach
   ``process``;
4. **dead letters** go to ``<topic>.dlq`` (flushed);
5. **output**: ``<out>/batch-NNNNNN.npz`` written atomically and durably, with
   the batch's offset ranges inside (:mod:`._output`);
6. **commit**: only now the ranges' ends are committed to the consumer group.

A world broken by a failure (a rank that raised, died or hung) is restarted
(:meth:`sparkmpi.World.restart`) and the batch run again from the same,
uncommitted, offsets; ``batch_retries`` bounds the attempts, and
``driver.restarts`` / ``driver.restart_s`` count them.  ``trigger=0`` or
``continuous=True`` cuts the next batch as soon as the previous one is
committed and frames are waiting.

On start, :meth:`StreamDriver.run` reconciles: outputs whose ranges go beyond
the committed offsets (a crash between 5 and 6) are committed, not processed
again.  So a SIGKILL at any moment loses no frame and duplicates none in the
outputs.  Dead letters are at-least-once (a crash between 4 and 5 sends them
again).

The MPI function
----------------
``process(comm, frames) -> Mapping[str, array-like] | None`` runs on every
rank.  A process that takes a ``state`` parameter, ``process(comm, frames,
state)``, gets the rank's state dict of the world: what it keeps there stays
for the next batch (a running reconstruction, a calibration); it starts empty
after a world restart, and is a fresh dict every batch in ``mode="jobs"``.
The key ``"sparkmpi.stream.job"`` is the driver's.  ``frames`` ``frames`` yields :class:`~.offsets.Frame` objects (``.header``,
``.array``, ``.partition``, ``.offset``) and must be consumed to the end.  The
arrays a rank returns are stored as ``result.<name>``; the same name from
several ranks is concatenated along axis 0 in rank order, so per-frame values
line up with the output's ``frame_index``; return a batch-wide value (e.g. an
Allreduce'd image) from rank 0 only.  :func:`integrate_frames` is the default.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from typing import Callable

from ._batches import assign_ranges, reconcile, trigger_due
from ._core import BatchFailed, _BatchCore, _check_positive
from ._errors import BrokerUnavailable, OffsetError
from ._output import list_outputs, output_ranges, read_meta, remove_stale_temporaries
from ._rank import ProcessFunction, _read_empty, _read_ranges, integrate_frames
from .kafka_client import check_bootstrap, check_broker, topic_partitions
from .kafka_io import Committer, WatermarkPoller, broker_call
from .offsets import DeadLetterWriter, OffsetRange, commit_offsets, committed_offsets, plan_batch
from .report import BatchReport, StreamReport
from .zmq_driver import ZmqStreamDriver

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


class StreamDriver(_BatchCore):
    """Micro-batches from a Kafka topic through Spark and MPI, with exactly-once outputs.

    Parameters
    ----------
    spark : SparkSession or SparkContext
        Needs at least ``ranks`` free task slots (held by the world for the
        stream's life, or one barrier stage per batch in jobs mode).
    bootstrap : str
        ``host:port`` of the Kafka cluster.
    topic : str
        The frames' topic (all its partitions are read).
    group : str
        Consumer group whose committed offsets mark what is processed.
    out_dir : path
        Where ``batch-NNNNNN.npz`` files go; one folder per (topic, group).
    ranks : int
        MPI ranks.
    mode : {"world", "jobs"}
        ``"world"``: one :class:`sparkmpi.World` for the stream, started by
        :meth:`run` (or at :meth:`warm_up`) and closed at its end; ``"jobs"``:
        one Spark-MPI job per batch (for comparison, or when ``process`` needs
        Spark-side work between batches).
    world : sparkmpi.World, optional
        Use this open world (the caller keeps it: it is not closed at the end,
        and the caller may call it between batches, e.g. from ``on_batch``).
    continuous : bool
        Cut the next batch as soon as the previous one is committed and frames
        are waiting (the same as ``trigger=0``).
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
        Times a batch whose MPI job (or world call) failed is run again, on a
        restarted world, before :class:`BatchFailed`.
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
        Jobs mode: run one empty MPI job at start (Spark workers and rank
        processes ready before the first batch).  World mode always starts its
        world at start.
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
                 warm_up: bool = True, progress=sys.stderr, json_lines=None, after_write=None,
                 mode: str = "world", world=None, continuous: bool = False):
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
                         progress=progress, json_lines=json_lines, after_write=after_write,
                         mode=mode, world=world, continuous=continuous)
        self.committed: dict = {}
        self.partitions: list[int] = []
        self.ended: set = set()
        self._dlq: DeadLetterWriter | None = None
        self._committer = Committer(self.bootstrap, self.group, self.broker_timeout)

    # -- broker calls with bounded retries ----------------------------------
    def _retrying(self, what: str, call):
        def note(attempt, cause, delay):
            self.reporter.note({"event": "broker_retry", "what": what, "attempt": attempt, "error": cause},
                               f"{what}: broker at {self.bootstrap} unavailable, retry {attempt} of "
                               f"{self.broker_retries} in about {delay:.1f} s ({cause})")

        return broker_call(what, call, bootstrap=self.bootstrap, retries=self.broker_retries,
                           backoff=self.retry_backoff, max_backoff=self.max_backoff, on_retry=note,
                           committed=self._committed_text)

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

    def _warm_source(self):
        # the same empty read, once per rank of the world
        return self._warm_reader() if self.partitions else None

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
        self._broker_failures = 0
        results, attempts = self.run_batch(reader, assignment, batch, ranges)
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
            on_batch: Callable[[BatchReport], object] | None = None,
            until: Callable[[], bool] | None = None) -> StreamReport:
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
        until : callable, optional
            Stop once ``until()`` is true and nothing is pending (asked
            between polls; e.g. a source that knows its scans are done).

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
            # world mode starts its world here whatever `warm_up` says: the batches run on it
            warm = self.warm_up() if self.warm or self.mode == "world" else None
            self.reporter.event({"event": "started", "topic": self.topic, "group": self.group,
                                 "partitions": self.partitions, "committed": self._committed_text(),
                                 "next_batch": self.next_batch, "warm_up_s": warm, "mode": self.mode},
                                f"streaming {self.topic} ({len(self.partitions)} partitions) at {self.bootstrap} "
                                f"as group {self.group}; committed {self._committed_text()}")
            poller = WatermarkPoller(self.bootstrap, self.topic, self.partitions,
                                      timeout=min(self.broker_timeout, 5.0))
            try:
                stopped = self._loop(poller, until_end_of_scan, idle_timeout, max_batches, on_batch, until)
                healthy = True
            finally:
                poller.close(wait=healthy)
            return self.final(reconciled, stopped, t0)
        finally:
            if self._dlq is not None:
                self._dlq.close(wait=healthy)
            self._dlq = None
            self.close()
            self._committer.close(wait=healthy)
            self.reporter.close()

    def _loop(self, poller, until_end_of_scan, idle_timeout, max_batches, on_batch=None, until=None) -> str:
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
                if until is not None and until():
                    return "until"
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

