"""What the micro-batch drivers report: a batch, a whole run, and the progress line.

:class:`BatchReport` and :class:`StreamReport` are also JSON lines
(``event: "batch"`` / ``"end"``); :class:`_Reporter` writes them to a file and
a one-line progress display to a terminal.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["BatchReport", "StreamReport"]

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
    # world mode, the slowest rank's share of job_s: reading its ranges, and decode + process
    rank_read_s: float | None = None
    rank_process_s: float | None = None

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

