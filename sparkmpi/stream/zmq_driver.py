"""The micro-batch driver for a ZeroMQ detector stream: the same batches and outputs as Kafka's."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time

from ._batches import assign_ranges
from ._core import _BatchCore, _check_positive
from ._errors import StreamTimeout
from ._output import output_ranges, remove_stale_temporaries
from ._rank import ProcessFunction, _identity, integrate_frames
from .offsets import DeadLetter, Frame, OffsetRange
from .report import BatchReport, StreamReport

__all__ = ["ZmqStreamDriver"]


class ZmqStreamDriver(_BatchCore):
    """The same loop fed by a ZeroMQ detector stream (:class:`~.detector.ZmqReceiver`).

    Frames are received in the driver (a background thread), cut into batches
    every ``trigger`` s (or at ``max_frames``), and shipped to the ranks of the
    stream's world (one ``scatter=`` share per rank; ``mode="jobs"``: one RDD
    of ``ranks`` partitions and one MPI job per batch); outputs are the
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
                 progress=sys.stderr, json_lines=None, after_write=None, mode: str = "world", world=None,
                 continuous: bool = False):
        from .detector import _zmq_endpoint

        self.endpoint = _zmq_endpoint(endpoint)
        self.receive_timeout = _check_positive("receive_timeout", receive_timeout)
        super().__init__(spark, out_dir, ranks=ranks, trigger=trigger, max_frames=max_frames, process=process,
                         expect_shape=expect_shape, expect_dtype=expect_dtype, check_finite=check_finite,
                         batch_retries=batch_retries, job_timeout=job_timeout, job_settings=job_settings,
                         progress=progress, json_lines=json_lines, after_write=after_write,
                         mode=mode, world=world, continuous=continuous)

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
        self.open()   # world mode: the ranks are up before the first frame
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
            self.close()
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
        results, attempts = self.run_batch(_identity, chunks, batch, [rng])
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

