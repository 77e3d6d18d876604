"""Pure pieces of the micro-batch driver: no I/O, no Spark, no broker.

* :func:`assign_ranges`: split a batch's offset ranges over ``ranks`` Spark
  partitions (= MPI ranks), as evenly as possible, each piece contiguous;
* :func:`trigger_due`: whether the loop should cut a batch now;
* :func:`reconcile`: after a crash, which offsets the outputs on disk already
  cover beyond the consumer group's committed offsets (to be committed, not
  reprocessed);
* :func:`percentiles`, :func:`batch_file_name`, :func:`parse_batch_file_name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from ._errors import OffsetError
from .offsets import OffsetRange
from ..errors import InvalidArgument, InvalidArgumentType

BATCH_FILE = re.compile(r"^batch-(\d{6,})\.npz$")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgument(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def batch_file_name(batch: int) -> str:
    """``batch-000042.npz`` for batch 42."""
    return f"batch-{_check_int('batch', batch, 0):06d}.npz"


def parse_batch_file_name(name: str) -> int | None:
    """The batch number of an output file name, or None if it is not one."""
    match = BATCH_FILE.match(name)
    return int(match.group(1)) if match else None


def assign_ranges(ranges: Sequence[OffsetRange], ranks: int) -> list[list[OffsetRange]]:
    """Split ``ranges`` into ``ranks`` lists of contiguous sub-ranges of near-equal size.

    Parameters
    ----------
    ranges : sequence of OffsetRange
        The batch, e.g. from :func:`~.offsets.plan_batch` (at most one range
        per topic-partition; empty ranges are ignored).
    ranks : int
        Number of Spark partitions / MPI ranks (>= 1).

    Returns
    -------
    list of list of OffsetRange
        ``ranks`` lists; list ``i`` is what partition (rank) ``i`` reads.  The
        union of all pieces is exactly the input (no offset dropped, none
        repeated); rank totals differ by at most one message.  A rank gets an
        empty list when there are fewer messages than ranks.

    Notes
    -----
    Ranges are walked in (topic, partition) order and cut at the quotas
    ``total // ranks`` (+1 for the first ``total % ranks`` ranks), so a
    partition's messages stay in offset order within and across ranks and each
    rank reads as few ranges as possible.
    """
    ranks = _check_int("ranks", ranks, 1)
    items = []
    seen = set()
    for r in ranges:
        if not isinstance(r, OffsetRange):
            raise InvalidArgumentType(f"ranges: expected OffsetRange items, got {type(r).__name__}")
        key = (r.topic, r.partition)
        if key in seen:
            raise InvalidArgument(f"ranges: {r.topic}[{r.partition}] appears more than once")
        seen.add(key)
        if r.count:
            items.append(r)
    items.sort()
    total = sum(r.count for r in items)
    quota, extra = divmod(total, ranks)
    out: list[list[OffsetRange]] = [[] for _ in range(ranks)]
    rank, room = 0, quota + (1 if extra > 0 else 0)
    for r in items:
        start = r.start
        while start < r.end:
            while room == 0:
                rank += 1
                room = quota + (1 if rank < extra else 0)
            take = min(room, r.end - start)
            out[rank].append(OffsetRange(r.topic, r.partition, start, start + take))
            start += take
            room -= take
    return out


def trigger_due(pending: int, since_last: float, *, trigger: float, max_frames: int | None) -> bool:
    """Cut a batch now?  When messages are pending and either ``trigger`` seconds
    have passed since the last batch started, or ``max_frames`` are ready."""
    if pending <= 0:
        return False
    if max_frames is not None and pending >= max_frames:
        return True
    return since_last >= trigger


@dataclass(frozen=True)
class OutputRanges:
    """What one output file on disk covers."""

    batch: int
    ranges: tuple[OffsetRange, ...]


@dataclass(frozen=True)
class Reconciliation:
    """Result of :func:`reconcile`."""

    to_commit: tuple[OffsetRange, ...]   # ranges whose ends must be committed (already in outputs)
    committed: dict                      # (topic, partition) -> next offset after the commit (or None)
    next_batch: int                      # the number of the next batch to write


def reconcile(committed: Mapping[tuple, int | None], outputs: Iterable[OutputRanges]) -> Reconciliation:
    """Offsets covered by outputs on disk but not yet committed (a crash between
    the durable write and the commit): commit them, do not reprocess them.

    Parameters
    ----------
    committed : mapping (topic, partition) -> int or None
        The consumer group's committed offsets (None: never committed).
    outputs : iterable of OutputRanges
        The batches found on disk with the offset ranges each one covers.

    Returns
    -------
    Reconciliation
        ``to_commit`` holds one range per topic-partition whose outputs go past
        the committed offset, from the committed offset to the outputs' end;
        ``committed`` is the mapping after those commits; ``next_batch`` is one
        past the highest batch number on disk (0 when there is none).

    Raises
    ------
    OffsetError
        Two outputs overlap (a frame would be in the output twice), or the
        outputs beyond the committed offset leave a gap (an output file was
        removed by hand): the driver cannot tell what was processed.
    """
    per_key: dict[tuple, list[tuple[int, int, int]]] = {}
    next_batch = 0
    batches = set()
    for out in outputs:
        if not isinstance(out, OutputRanges):
            raise InvalidArgumentType(f"outputs: expected OutputRanges items, got {type(out).__name__}")
        if out.batch in batches:
            raise OffsetError(f"batch {out.batch} appears twice among the outputs")
        batches.add(out.batch)
        next_batch = max(next_batch, out.batch + 1)
        for r in out.ranges:
            if r.count:
                per_key.setdefault((r.topic, r.partition), []).append((r.start, r.end, out.batch))
    after = dict(committed)
    to_commit = []
    for key in sorted(per_key):
        spans = sorted(per_key[key])
        for (s0, e0, b0), (s1, e1, b1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise OffsetError(f"outputs of batches {b0} and {b1} overlap on {key[0]}[{key[1]}] "
                                  f"([{s0}, {e0}) and [{s1}, {e1})): frames would be in the output twice")
        frontier = spans[-1][1]
        done = committed.get(key)
        if done is not None and frontier <= done:
            continue
        # the outputs beyond the committed offset must be contiguous from it
        beyond = [(s, e, b) for s, e, b in spans if e > (done if done is not None else -1)]
        expect = done if done is not None else beyond[0][0]
        for s, e, b in beyond:
            if s > expect:
                raise OffsetError(f"{key[0]}[{key[1]}]: committed offset {done}, but the outputs on disk jump from "
                                  f"{expect} to {s} (batch {b}); was an output file removed?")
            if s < expect:
                raise OffsetError(f"{key[0]}[{key[1]}]: batch {b} covers [{s}, {e}) which overlaps the committed "
                                  f"offset {expect}; outputs and consumer group disagree")
            expect = e
        to_commit.append(OffsetRange(key[0], key[1], done if done is not None else beyond[0][0], frontier))
        after[key] = frontier
    return Reconciliation(tuple(to_commit), after, next_batch)


def percentiles(values: Sequence[float] | np.ndarray, qs=(50, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p99": ...}`` (linear interpolation); None for no values."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {f"p{q:g}": None for q in qs}
    got = np.percentile(arr, qs)
    return {f"p{q:g}": float(v) for q, v in zip(qs, got)}
