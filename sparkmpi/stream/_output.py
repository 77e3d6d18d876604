"""Batch output files: atomic, durable ``.npz`` writes and reading them back.

One file per batch, ``<out>/batch-000042.npz``, holding

* ``meta``: a JSON string: ``batch``, ``topic``, ``group``, ``source``
  (``kafka`` or ``zmq``), ``ranges`` (the batch's offset ranges), counts
  (``frames``, ``messages``, ``bytes``, ``dead_letters``, ``end_markers``),
  ``dead`` (offset, code and reason of each dead letter), ``end_markers``
  (scan, frames, partition of each), ``written_at`` (Unix time right before
  the write started), ``ranks``;
* ``frame_index`` (int64), ``frame_partition`` (int32), ``frame_offset``
  (int64), ``frame_ts`` (float64, producer time): one entry per frame the MPI
  function consumed, in rank order;
* ``result.<name>``: the MPI function's outputs (see :mod:`.driver`).

A file is written to a temporary name in the same folder, flushed, fsynced,
renamed into place and the folder fsynced, so after a crash either the whole
file is there or none of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._batches import OutputRanges, batch_file_name, parse_batch_file_name
from .offsets import OffsetRange
from ..errors import InvalidArgument

TMP_PREFIX = ".tmp-"


def write_atomic_npz(path: Path, arrays: dict) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` at ``path``, atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete half-written files a killed driver left behind; return how many."""
    n = 0
    for p in Path(out_dir).glob(TMP_PREFIX + "*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def read_meta(path: Path) -> dict:
    """The ``meta`` JSON of one batch file."""
    with np.load(path, allow_pickle=False) as data:
        if "meta" not in data.files:
            raise InvalidArgument(f"{path}: not a sparkmpi batch output (no 'meta' entry; found {data.files})")
        return json.loads(str(data["meta"]))


def meta_ranges(meta: dict) -> tuple[OffsetRange, ...]:
    return tuple(OffsetRange(r["topic"], r["partition"], r["start"], r["end"]) for r in meta["ranges"])


def list_outputs(out_dir: Path) -> list[tuple[int, Path]]:
    """``[(batch, path)]`` of the batch files in ``out_dir``, by batch number."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        batch = parse_batch_file_name(p.name)
        if batch is not None:
            found.append((batch, p))
    return sorted(found)


def output_ranges(out_dir: Path, *, topic: str | None = None, group: str | None = None) -> list[OutputRanges]:
    """The ranges every batch file covers; raises if a file belongs to another topic or group."""
    got = []
    for batch, path in list_outputs(out_dir):
        meta = read_meta(path)
        for name, want in (("topic", topic), ("group", group)):
            if want is not None and meta.get(name) != want:
                raise InvalidArgument(f"{path} was written for {name} {meta.get(name)!r}, not {want!r}; "
                                 f"use another output folder (--out) per topic and consumer group")
        if meta.get("batch") != batch:
            raise InvalidArgument(f"{path}: file name says batch {batch}, its meta says {meta.get('batch')}")
        got.append(OutputRanges(batch, meta_ranges(meta)))
    return got


@dataclass
class OutputSummary:
    """Everything in an output folder, read back (for checks and benchmarks)."""

    batches: int
    frame_index: np.ndarray     # every frame index in the outputs (with repeats, if any)
    frame_ts: np.ndarray        # producer timestamps, same order
    written_at: np.ndarray      # the batch's write time, per frame
    dead_letters: int
    end_markers: int
    first_written: float | None
    last_written: float | None

    def lost_and_duplicated(self, produced) -> tuple[int, int]:
        """Frames produced but absent, and extra copies of frames in the outputs."""
        produced = np.unique(np.asarray(produced, dtype=np.int64))
        uniq, counts = np.unique(self.frame_index, return_counts=True)
        lost = int(np.setdiff1d(produced, uniq, assume_unique=True).size)
        duplicated = int((counts - 1).sum())
        return lost, duplicated

    @property
    def latencies(self) -> np.ndarray:
        return self.written_at - self.frame_ts


def read_outputs(out_dir) -> OutputSummary:
    """Read back every batch file of ``out_dir``."""
    idx, ts, wr = [], [], []
    dead = ends = 0
    first = last = None
    files = list_outputs(Path(out_dir))
    for _, path in files:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            fi = data["frame_index"]
            idx.append(fi)
            ts.append(data["frame_ts"])
        wr.append(np.full(fi.shape, meta["written_at"]))
        dead += meta["dead_letters"]
        ends += meta["end_markers_count"]
        first = meta["written_at"] if first is None else min(first, meta["written_at"])
        last = meta["written_at"] if last is None else max(last, meta["written_at"])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return OutputSummary(len(files), cat(idx, np.int64), cat(ts, np.float64), cat(wr, np.float64),
                         dead, ends, first, last)


__all__ = ["write_atomic_npz", "remove_stale_temporaries", "read_meta", "list_outputs", "output_ranges",
           "read_outputs", "OutputSummary", "batch_file_name"]
