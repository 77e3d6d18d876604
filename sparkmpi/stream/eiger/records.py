"""The Kafka records of a bridged Eiger stream: keys that carry the ids, values as the detector sent them.

Pure functions, no I/O.  Every record's value is a Stream V2 message,
byte for byte as the detector sent it (images still compressed); the key
names what it is::

    eiger2/start/<series_id>
    eiger2/image/<series_id>/<image_id>/<start offset>
    eiger2/end/<series_id>/<images in this partition>/<start offset>[/incomplete]

``start offset`` is the offset of the series' start record in the same
partition: the record a rank reads to check (and decode) the images.  An
end record the bridge wrote itself (the detector's end message never came)
is a CBOR end message with ``sparkmpi_incomplete`` giving the reason, and
its key ends in ``/incomplete``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..frames import FrameError

PREFIX = "eiger2"


@dataclass(frozen=True)
class RecordKey:
    kind: str                      # "start", "image" or "end"
    series_id: int
    image_id: int | None = None    # images
    images: int | None = None      # end records: images bridged to this partition
    start_offset: int | None = None
    incomplete: bool = False

    def encode(self) -> bytes:
        if self.kind == "start":
            parts = [PREFIX, "start", str(self.series_id)]
        elif self.kind == "image":
            parts = [PREFIX, "image", str(self.series_id), str(self.image_id), str(self.start_offset)]
        elif self.kind == "end":
            parts = [PREFIX, "end", str(self.series_id), str(self.images), str(self.start_offset)]
            if self.incomplete:
                parts.append("incomplete")
        else:
            raise FrameError(f"record kind {self.kind!r}: expected start, image or end", "bad_key")
        return "/".join(parts).encode()


def _number(text: str, what: str, key: bytes) -> int:
    if not text.isdigit():
        raise FrameError(f"record key {key!r:.120}: {what} must be a decimal integer >= 0, got {text!r:.40}",
                         "bad_key")
    return int(text)


def parse_key(key: bytes | None) -> RecordKey:
    """The :class:`RecordKey` of a bridged record; :class:`FrameError` (``bad_key``) for anything else."""
    if not isinstance(key, bytes):
        raise FrameError(f"record has no key (an Eiger record's key is {PREFIX}/KIND/SERIES/...)", "bad_key")
    try:
        parts = key.decode("ascii").split("/")
    except UnicodeDecodeError:
        raise FrameError(f"record key {key!r:.120} is not ASCII", "bad_key") from None
    if len(parts) < 3 or parts[0] != PREFIX:
        raise FrameError(f"record key {key!r:.120} is not an Eiger record key ({PREFIX}/KIND/SERIES/...)", "bad_key")
    kind, series = parts[1], _number(parts[2], "series id", key)
    if kind == "start" and len(parts) == 3:
        return RecordKey("start", series)
    if kind == "image" and len(parts) == 5:
        return RecordKey("image", series, image_id=_number(parts[3], "image id", key),
                         start_offset=_number(parts[4], "start offset", key))
    if kind == "end" and len(parts) in (5, 6) and (len(parts) == 5 or parts[5] == "incomplete"):
        return RecordKey("end", series, images=_number(parts[3], "image count", key),
                         start_offset=_number(parts[4], "start offset", key), incomplete=len(parts) == 6)
    raise FrameError(f"record key {key!r:.120}: expected {PREFIX}/start/S, {PREFIX}/image/S/I/O or "
                     f"{PREFIX}/end/S/N/O[/incomplete]", "bad_key")


@dataclass(frozen=True)
class OpenSeries:
    """A series whose start record is on the topic and whose end record is not."""

    series_id: int
    start_offsets: dict           # partition -> offset of its start record
    image_ids: frozenset
    per_partition: tuple


def open_series(keys_by_partition: dict) -> OpenSeries | None:
    """From each partition's ``[(offset, key bytes), ...]`` (in offset order): the series left open, if any.

    The last start record decides: if an end record of that series follows it
    (in any partition) the series is closed and None is returned.
    """
    last_start: dict = {}
    for partition, items in keys_by_partition.items():
        for offset, raw in items:
            try:
                key = parse_key(raw)
            except FrameError:
                continue
            if key.kind == "start":
                last_start[partition] = (offset, key.series_id)
    if not last_start:
        return None
    series = max(last_start.values())[1]
    starts, ids, counts = {}, set(), {}
    for partition, items in keys_by_partition.items():
        start = last_start.get(partition)
        if start is None or start[1] != series:
            return None
        starts[partition] = start[0]
        counts[partition] = 0
        for offset, raw in items:
            if offset <= start[0]:
                continue
            try:
                key = parse_key(raw)
            except FrameError:
                continue
            if key.series_id != series:
                continue
            if key.kind == "end":
                return None
            if key.kind == "image":
                ids.add(key.image_id)
                counts[partition] += 1
    return OpenSeries(series, starts, frozenset(ids), tuple(counts[p] for p in sorted(counts)))
