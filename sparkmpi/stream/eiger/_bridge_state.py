"""What the detector bridge does with each Stream V2 message: events in, actions out, no I/O.

The bridge republishes a detector's messages to Kafka, still compressed.
This module decides, per message, what to publish, what to dead-letter and
what to report; :mod:`.bridge` does the sockets.  Its rules:

* a start message opens a series (its start record goes to every partition);
* an image of the open series, not seen before, is published to partition
  ``image_id mod P``; an image of another series, a repeated image id, or one
  whose channels, shape or dtype disagree with the start message is a dead
  letter with the reason;
* the end message of the open series closes it (an end record per
  partition, with the number of images bridged there);
* a start message for another series while one is open closes the open one
  as *incomplete* ("restarted") and opens the new one;
* no message for ``end_timeout`` s while a series is open closes it as
  incomplete ("no end message"), naming a lost connection when there was one.

An incomplete series still gets its end records (flagged ``incomplete`` with
the reason), so a driver waiting for the end of the scan stops, and every
image bridged before stays on the topic exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..frames import FrameError
from ...errors import InvalidArgument
from .stream2 import EndMessage, ImageMessage, StartMessage, check_image


@dataclass(frozen=True)
class PublishStart:
    series_id: int
    raw: bytes


@dataclass(frozen=True)
class PublishImage:
    series_id: int
    image_id: int
    partition: int
    raw: bytes


@dataclass(frozen=True)
class PublishEnd:
    """End records of a series: one per partition, with that partition's image count."""

    series_id: int
    images_per_partition: tuple[int, ...]
    raw: bytes | None           # the detector's end message; None when the bridge closes the series
    incomplete: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    code: str
    raw: bytes
    series_id: int | None = None


@dataclass(frozen=True)
class Report:
    event: str
    text: str
    series_id: int | None = None
    detail: dict = field(default_factory=dict)


Action = PublishStart | PublishImage | PublishEnd | DeadLetter | Report


@dataclass
class _Series:
    start: StartMessage
    seen: set = field(default_factory=set)
    per_partition: list = field(default_factory=list)


class BridgeState:
    """The bridge's bookkeeping for one detector connection.

    Parameters
    ----------
    partitions : int
        Partitions of the Kafka topic (image ``i`` goes to ``i mod partitions``).
    end_timeout : float
        Seconds without any message, while a series is open, after which the
        series is closed as incomplete.
    """

    def __init__(self, partitions: int = 1, end_timeout: float = 10.0):
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise InvalidArgument(f"partitions: expected an integer >= 1, got {partitions!r}")
        if not end_timeout > 0:
            raise InvalidArgument(f"end_timeout: expected seconds > 0, got {end_timeout!r}")
        self.partitions, self.end_timeout = partitions, float(end_timeout)
        self.series: _Series | None = None
        self.last_message: float | None = None
        self.lost_at: float | None = None
        self.finished: list[dict] = []     # one summary per closed series
        self.dead = 0

    def resume(self, start: StartMessage, seen, per_partition, now: float) -> list[Action]:
        """Take over a series an earlier bridge left open on the topic (its start record, no end record).

        ``seen`` are the image ids already on the topic; they are not bridged again.
        """
        if len(per_partition) != self.partitions:
            raise InvalidArgument(f"per_partition: expected {self.partitions} counts, got {len(per_partition)}")
        self.series = _Series(start, set(seen), list(per_partition))
        self.last_message = now
        return [Report("series_resumed", f"series {start.series_id}: resumed from the topic "
                                         f"({len(self.series.seen)} images already bridged)", start.series_id)]

    # -- events ------------------------------------------------------------
    def message(self, decoded, raw: bytes, now: float) -> list[Action]:
        """A message arrived: ``decoded`` is the parsed message or the :class:`FrameError` parsing raised."""
        self.last_message = now
        self.lost_at = None
        if isinstance(decoded, FrameError):
            return [self._dead(f"{decoded}", decoded.code, raw)]
        if isinstance(decoded, StartMessage):
            return self._start(decoded, raw)
        if isinstance(decoded, ImageMessage):
            return self._image(decoded, raw)
        if isinstance(decoded, EndMessage):
            return self._end(decoded, raw)
        raise InvalidArgument(f"decoded: expected a Stream V2 message or FrameError, got {type(decoded).__name__}")

    def disconnected(self, now: float) -> list[Action]:
        self.lost_at = now
        if self.series is None:
            return [Report("connection_lost", "detector connection lost (no series open)")]
        s = self.series
        return [Report("connection_lost", f"series {s.start.series_id}: detector connection lost after "
                                          f"{len(s.seen)} images; waiting up to {self.end_timeout:g} s for it "
                                          f"to come back with the rest", s.start.series_id)]

    def tick(self, now: float) -> list[Action]:
        """Time passes: close an open series whose end message is overdue."""
        if self.series is None or self.last_message is None or now - self.last_message < self.end_timeout:
            return []
        reason = f"no end message within {self.end_timeout:g} s of the last message"
        if self.lost_at is not None:
            reason += " (the detector connection was lost)"
        return self._close(reason)

    def close(self) -> list[Action]:
        """The bridge stops: an open series ends incomplete."""
        return self._close("the bridge stopped before the end message") if self.series is not None else []

    # -- rules -------------------------------------------------------------
    def _dead(self, reason: str, code: str, raw: bytes, series_id=None) -> DeadLetter:
        self.dead += 1
        return DeadLetter(reason, code, raw, series_id)

    def _start(self, start: StartMessage, raw: bytes) -> list[Action]:
        out: list[Action] = []
        if self.series is not None:
            old = self.series.start
            if old.series_id == start.series_id and old.series_unique_id == start.series_unique_id:
                return [self._dead(f"series {start.series_id}: a second start message for the open series",
                                   "duplicate", raw, start.series_id)]
            out += self._close(f"restarted as series {start.series_id} before its end message")
        self.series = _Series(start, set(), [0] * self.partitions)
        out.append(PublishStart(start.series_id, raw))
        out.append(Report("series_started", f"series {start.series_id}: started "
                                            f"({start.number_of_images if start.number_of_images is not None else '?'}"
                                            f" images of {start.image_shape}, channels {list(start.channels)})",
                          start.series_id))
        return out

    def _image(self, image: ImageMessage, raw: bytes) -> list[Action]:
        start = self.series.start if self.series is not None else None
        try:
            check_image(image, start)
        except FrameError as exc:
            return [self._dead(str(exc), exc.code, raw, image.series_id)]
        s = self.series
        if image.image_id in s.seen:
            return [self._dead(f"image {image.image_id} of series {image.series_id}: already bridged (a repeated "
                               f"image id)", "duplicate", raw, image.series_id)]
        s.seen.add(image.image_id)
        partition = image.image_id % self.partitions
        s.per_partition[partition] += 1
        return [PublishImage(image.series_id, image.image_id, partition, raw)]

    def _end(self, end: EndMessage, raw: bytes) -> list[Action]:
        s = self.series
        if s is None or s.start.series_id != end.series_id:
            known = "none" if s is None else str(s.start.series_id)
            return [self._dead(f"end message for series {end.series_id}, which is not open (open: {known})",
                               "unknown_series", raw, end.series_id)]
        return self._close(None, raw)

    def _close(self, incomplete: str | None, raw: bytes | None = None) -> list[Action]:
        s = self.series
        self.series = None
        sid = s.start.series_id
        expected = s.start.number_of_images
        missing = None if expected is None else expected - len(s.seen)
        summary = {"series_id": sid, "images": len(s.seen), "expected": expected, "incomplete": incomplete,
                   "per_partition": list(s.per_partition)}
        self.finished.append(summary)
        text = f"series {sid}: {len(s.seen)} images bridged"
        if incomplete:
            text += f"; ended incomplete: {incomplete}"
        elif missing:
            text += f"; the start message announced {expected} ({missing} never came)"
        return [PublishEnd(sid, tuple(s.per_partition), raw, incomplete),
                Report("series_incomplete" if incomplete else "series_ended", text, sid, summary)]
