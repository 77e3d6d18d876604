"""What the Kafka and ZeroMQ drivers share: run a batch on the ranks, write its output, account for it.

Kept apart from the sources so that each driver module holds one source's
loop; the output format and the exactly-once order (write durably, then
commit) are the same for both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import JobFailed, SparkMPIError
from ._batches import batch_file_name, percentiles
from ._errors import OffsetError
from ._output import write_atomic_npz
from ._rank import _identity, _install_job, _noop_job, _RankJob, _world_batch, accepts_state
from .report import BatchReport, StreamReport, _Reporter

__all__ = ["BatchFailed", "MODES"]

#: How a stream runs its batches: on one long-lived world, or one Spark-MPI job each.
MODES = ("world", "jobs")


class BatchFailed(SparkMPIError):
    """A batch's MPI job failed more often than allowed; nothing of it was committed.

    Attributes: ``batch`` (number), ``ranges`` (its offset ranges), ``attempts``.
    """

    def __init__(self, message: str, *, batch: int, ranges, attempts: int):
        super().__init__(message)
        self.batch, self.ranges, self.attempts = batch, tuple(ranges), attempts



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
                 check_finite, batch_retries, job_timeout, job_settings, progress, json_lines, after_write,
                 mode="world", world=None, continuous=False):
        from ..config import load_settings
        from ..launch.job import pickle_function, preload_modules

        self.sc = getattr(spark, "sparkContext", spark)
        if not hasattr(self.sc, "parallelize"):
            raise TypeError(f"spark: expected a SparkSession or SparkContext, got {type(spark).__name__}")
        self.out_dir = Path(out_dir)
        self.ranks = _check_positive("ranks", ranks, integer=True)
        self.trigger = 0.0 if continuous else _check_positive("trigger", trigger, minimum=0)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if world is not None and mode != "world":
            raise ValueError(f"world: a World is only used with mode='world', got mode={mode!r}")
        if world is not None and getattr(world, "size", ranks) != ranks:
            raise ValueError(f"world: it has {world.size} ranks but ranks={ranks}")
        self.mode = mode
        self.world = world
        self._own_world = world is None
        self.restarts = 0
        self.restart_s: list[float] = []
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
        self._job = _RankJob(pickle_function(process), expect_shape, expect_dtype, check_finite,
                             takes_state=accepts_state(process))
        self.reporter = _Reporter(progress, json_lines)
        self.after_write = after_write
        self.next_batch = 0
        self.totals = {"frames": 0, "bytes": 0, "dead_letters": 0, "end_markers": 0, "batches": 0}
        self.latencies: list[np.ndarray] = []
        self.first_start: float | None = None

    # -- the ranks: one world for the stream, or one job per batch ---------------
    def open(self) -> None:
        """World mode: start the world (if none was given) and install the rank job; idempotent."""
        if self.mode != "world" or (self.world is not None and not self.world.closed and self._installed):
            return
        import sparkmpi

        if self.world is None:
            self.world = sparkmpi.World(self.sc, self.ranks, **self.job_settings)
        elif self.world.closed:
            self.world.restart()
        self.world.call(_install_job, self._job, self._warm_source(), timeout=self.job_timeout)
        self._installed = True

    _installed = False

    def close(self) -> None:
        """Close the world if this driver started it (the caller's own world stays open)."""
        if self.world is not None and self._own_world:
            self.world.close("the stream ended")
            self.world = None
        self._installed = False

    def warm_up(self) -> float:
        """Get the ranks ready before the first frame arrives; return its seconds.

        World mode: start the world (the ranks import the process function's
        module and the Kafka client once).  Jobs mode: run one empty MPI job so
        Spark's Python workers and the spare rank processes are up.
        """
        import sparkmpi

        t0 = time.monotonic()
        if self.mode == "world":
            self.open()
            return time.monotonic() - t0
        # Every Python worker a batch may land on (not only the ones this
        # job uses) gets its spares, so no early batch starts ranks cold.
        sparkmpi.warm_up(self.sc, warm_pool=self.job_settings.get("warm_pool"),
                         preload=self.job_settings["preload"])
        sparkmpi.run(self.sc.parallelize([[] for _ in range(self.ranks)], self.ranks).flatMap(self._warm_reader()),
                     _noop_job, timeout=self.job_timeout, **self.job_settings)
        return time.monotonic() - t0

    def _warm_reader(self):
        return _identity

    def _warm_source(self):
        """World mode: what each rank reads once at start (loads the source's client)."""
        return None

    def run_batch(self, source, payloads: list, batch: int, ranges) -> tuple[list, int]:
        """Run one batch on the ranks with retries; ``(per-rank results, attempts)``.

        ``source(payload)`` gives a rank its records; ``payloads[i]`` is rank i's
        share (its offset ranges, or its frames).
        """
        if self.mode == "jobs":
            rdd = self.sc.parallelize(payloads, self.ranks).flatMap(source)
            return self._run_attempts(lambda: self._run_job(rdd), batch, ranges)
        return self._run_attempts(lambda: self._call_world(source, payloads), batch, ranges)

    def _run_job(self, rdd) -> list:
        import sparkmpi

        return sparkmpi.run(rdd, self._job, timeout=self.job_timeout, **self.job_settings)

    def _call_world(self, source, payloads) -> list:
        if self.world is None or self.world.closed or not self._installed:
            # a world broken by the previous attempt: a fresh one, with the job installed again
            t0 = time.monotonic()
            self._installed = False
            self.open()
            self.restarts += 1
            self.restart_s.append(time.monotonic() - t0)
            self.reporter.note({"event": "world_restart", "restarts": self.restarts,
                                "seconds": self.restart_s[-1]},
                               f"restarted the MPI world in {self.restart_s[-1]:.2f} s "
                               f"(restart {self.restarts})")
        return self.world.call(_world_batch, source, scatter=payloads, timeout=self.job_timeout)

    def _run_attempts(self, attempt, batch: int, ranges) -> tuple[list, int]:
        attempts = 0
        while True:
            attempts += 1
            try:
                results = attempt()
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
                           f"batch {batch}: batch failed on the ranks (attempt {attempts} of {self.batch_retries + 1}), "
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
        phases = {k: max(r[k] for r in results) if all(k in r for r in results) else None
                  for k in ("read_s", "process_s")}
        return path, written_at, {"meta": meta, "frame_ts": arrays["frame_ts"], "dead": dead, "markers": markers,
                                  "phases": phases}

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
            path=str(path), written_at=meta["written_at"], reasons=meta["reasons"],
            rank_read_s=merged.get("phases", {}).get("read_s"),
            rank_process_s=merged.get("phases", {}).get("process_s"))
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

