"""The executor side of a micro-batch: code that runs inside Spark tasks and MPI ranks.

Kept apart from :mod:`.driver` so that a rank, a fresh process per job,
imports only this module, the frame format and NumPy when it unpickles its
function (the driver module's imports would cost every rank of every batch;
BENCHMARKS.md, streaming).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from .offsets import DeadLetter, EndMarker, Frame, KafkaRecord, OffsetRange, decode_record, read_offset_range
from ..errors import InvalidArgument, InvalidArgumentType

ProcessFunction = Callable[[Any, Iterator[Frame]], "Mapping[str, Any] | None"]


# ---------------------------------------------------------------- the default MPI function

def integrate_frames(comm, frames: Iterable[Frame]) -> dict:
    """Per frame: integrated intensity and centre of mass; per batch: the summed image.

    Returns, per rank, ``intensity`` (n,) float64 (sum of counts), ``centre_of_mass``
    (n, 2) float64 (row, column in pixels; NaN for an empty frame) for the rank's
    n frames, and on rank 0 ``sum_image`` (H, W) float64: the sum of every frame
    of the batch, combined over the ranks with ``MPI_Allreduce``.  When frames of
    different shapes meet in one batch, ``sum_image`` is left out.
    """
    from mpi4py import MPI

    sums = _FrameSums()
    for frame in frames:
        sums.add(frame.array)
    sums.flush()
    out = {"intensity": np.concatenate(sums.intensity) if sums.intensity else np.zeros(0, np.float64),
           "centre_of_mass": (np.concatenate(sums.centre) if sums.centre else np.zeros((0, 2), np.float64))}
    seen = comm.allgather((sums.mixed, sums.shape))
    shapes = {s for _, s in seen if s is not None}
    if not any(m for m, _ in seen) and len(shapes) == 1:
        shape = shapes.pop()
        local = sums.total.astype(np.float64) if sums.total is not None else np.zeros(shape, np.float64)
        summed = np.empty(shape, np.float64)
        comm.Allreduce(local, summed, op=MPI.SUM)
        if comm.rank == 0:
            out["sum_image"] = summed
    return out


class _FrameSums:
    """Row, column and image sums of frames, a chunk of same-shape frames at a time.

    One NumPy reduction over a stack of frames instead of three per frame,
    with integer accumulators for integer frames (exact, and cheaper than
    casting every pixel to float64): BENCHMARKS.md, "Streaming on a world".
    """

    CHUNK = 64

    def __init__(self) -> None:
        self.intensity: list[np.ndarray] = []
        self.centre: list[np.ndarray] = []
        self.total: np.ndarray | None = None   # the image sum, of the first frame's shape
        self.shape: tuple | None = None
        self.mixed = False
        self._chunk: list[np.ndarray] = []

    def add(self, array: np.ndarray) -> None:
        first = self._chunk[0] if self._chunk else None
        if first is not None and (array.shape != first.shape or array.dtype != first.dtype):
            self.flush()
        self._chunk.append(array)
        if len(self._chunk) >= self.CHUNK:
            self.flush()

    @staticmethod
    def _accumulator(dtype: np.dtype, shape: tuple) -> type:
        if dtype.kind in "ub" and dtype.itemsize <= 2 and max(*shape, _FrameSums.CHUNK) <= 65536:
            return np.uint32   # a row, a column or a chunk's pixel: <= 65536 values < 2**16, sum < 2**32
        if dtype.kind in "ui" or dtype.kind == "b":
            return np.int64
        return np.float64

    def flush(self) -> None:
        if not self._chunk:
            return
        stack = np.stack(self._chunk)
        self._chunk = []
        if stack.ndim != 3:
            raise InvalidArgument(f"integrate_frames: frames must be 2-d images, got shape {stack.shape[1:]}")
        acc = self._accumulator(stack.dtype, stack.shape[1:])
        rows = stack.sum(axis=2, dtype=acc).astype(np.float64)
        cols = stack.sum(axis=1, dtype=acc).astype(np.float64)
        intensity = rows.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            row_centre = (rows @ np.arange(rows.shape[1], dtype=np.float64)) / intensity
            col_centre = (cols @ np.arange(cols.shape[1], dtype=np.float64)) / intensity
        empty = intensity == 0
        row_centre[empty] = np.nan
        col_centre[empty] = np.nan
        self.intensity.append(intensity)
        self.centre.append(np.stack([row_centre, col_centre], axis=1))
        part = stack.sum(axis=0, dtype=acc)
        if self.total is None:
            self.shape, self.total = stack.shape[1:], part.astype(np.int64 if acc is np.uint32 else acc)
        elif stack.shape[1:] == self.shape:
            self.total += part
        else:
            self.mixed = True


# ---------------------------------------------------------------- rank side

def _read_ranges(bootstrap: str, timeout: float, consumer_config: dict | None,
                 ranges: list[OffsetRange]) -> Iterator[KafkaRecord]:
    """Inside a Spark task: read this partition's offset ranges, exactly."""
    for r in ranges:
        yield from read_offset_range(bootstrap, r.topic, r.partition, r.start, r.end, timeout=timeout,
                                     consumer_config=consumer_config)


def _read_empty(bootstrap: str, timeout: float, ranges: list, _ignored) -> Iterator[KafkaRecord]:
    return _read_ranges(bootstrap, timeout, None, ranges)


def _identity(items):
    return items


def _noop_job(comm, items):
    comm.Barrier()
    return [sum(1 for _ in items)]


#: The key of the world's per-rank state that holds the installed :class:`_RankJob`.
JOB_KEY = "sparkmpi.stream.job"


def accepts_state(process) -> bool:
    """Does ``process`` take a ``state`` keyword (the rank's state dict, kept across batches)?"""
    import inspect

    try:
        params = inspect.signature(process).parameters
    except (TypeError, ValueError):   # a builtin or C callable: no state
        return False
    p = params.get("state")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _install_job(comm, state, job, warm_source=None):
    """A world call: keep the batch job on the rank, and load the source's client once."""
    state[JOB_KEY] = job
    job._process = None
    if warm_source is not None:
        for _ in warm_source(None):
            pass
    comm.Barrier()
    return comm.rank


def _world_batch(comm, state, source, payload):
    """A world call per batch: read this rank's share with ``source`` and run the installed job."""
    job = state.get(JOB_KEY)
    if job is None:
        raise RuntimeError("no stream job installed on this rank (the world was started outside the driver?)")
    t0 = time.perf_counter()
    records = list(source(payload))   # a range reader returns lists: this copies no frame
    t1 = time.perf_counter()
    report = job(comm, iter(records), state=state)[0]
    report["read_s"], report["process_s"] = t1 - t0, time.perf_counter() - t1
    return report


def _check_expectations(frame: Frame, shape, dtype) -> tuple[str, str] | None:
    if shape is not None and tuple(frame.array.shape) != tuple(shape):
        return (f"frame {frame.header.index} has shape {tuple(frame.array.shape)}, expected {tuple(shape)}",
                "wrong_shape")
    if dtype is not None:
        got = frame.array.dtype
        if got.kind != dtype.kind or got.itemsize != dtype.itemsize:
            return f"frame {frame.header.index} has dtype {got.str}, expected {dtype.str}", "wrong_dtype"
    return None


class _RankJob:
    """What every rank runs: decode, route bad messages aside, call ``process``, report."""

    def __init__(self, process_pickle: bytes, expect_shape, expect_dtype, check_finite: bool,
                 takes_state: bool = False):
        self.process_pickle = process_pickle
        self.takes_state = takes_state
        self._process = None
        self.expect_shape = tuple(expect_shape) if expect_shape is not None else None
        self.expect_dtype = np.dtype(expect_dtype).str if expect_dtype is not None else None
        self.check_finite = check_finite

    def __getstate__(self):
        return dict(self.__dict__, _process=None)   # the function travels as its pickle

    def __call__(self, comm, items, state: dict | None = None):
        import cloudpickle

        if self._process is None:   # once per world (every batch in jobs mode: a fresh process)
            self._process = cloudpickle.loads(self.process_pickle)
        process = self._process
        dtype = np.dtype(self.expect_dtype) if self.expect_dtype is not None else None
        index, part, offset, ts = [], [], [], []
        dead, markers = [], []
        counts = {"messages": 0, "bytes": 0}

        def frames():
            for item in items:
                counts["messages"] += 1
                record = item if isinstance(item, KafkaRecord) else None
                if record is not None:
                    item = decode_record(record, check_finite=self.check_finite)
                if isinstance(item, Frame):
                    bad = _check_expectations(item, self.expect_shape, dtype)
                    if bad is not None:
                        dead.append(DeadLetter(item.topic, item.partition, item.offset,
                                               record.key if record else None,
                                               record.value if record else None, *bad))
                        continue
                    index.append(item.header.index)
                    part.append(item.partition)
                    offset.append(item.offset)
                    ts.append(item.header.timestamp)
                    counts["bytes"] += item.array.nbytes
                    yield item
                elif isinstance(item, EndMarker):
                    markers.append(item)
                elif isinstance(item, DeadLetter):
                    dead.append(item)
                else:
                    raise InvalidArgumentType(f"unexpected record type {type(item).__name__} in the batch")

        stream = frames()
        if self.takes_state:
            result = process(comm, stream, state=state if state is not None else {})
        else:
            result = process(comm, stream)
        left = sum(1 for _ in stream)
        if left:
            raise RuntimeError(f"process returned before consuming all frames of rank {comm.rank}: "
                               f"{left} left; a frame not consumed would be committed unprocessed")
        if result is None:
            result = {}
        if not isinstance(result, Mapping):
            raise InvalidArgumentType(f"process must return a mapping of name -> array (or None), "
                            f"got {type(result).__name__}")
        result = {str(k): np.asarray(v) for k, v in result.items()}
        return [{"rank": comm.rank, "index": np.asarray(index, np.int64), "partition": np.asarray(part, np.int32),
                 "offset": np.asarray(offset, np.int64), "ts": np.asarray(ts, np.float64),
                 "messages": counts["messages"], "bytes": counts["bytes"], "dead": dead, "markers": markers,
                 "result": result}]
