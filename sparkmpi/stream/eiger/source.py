"""The rank side of a bridged Eiger stream, and the driver that reads it.

:func:`read_eiger_ranges` runs in each rank: it reads the rank's offset
ranges of the bridged topic (:mod:`.records`), finds each series' start
message (in the batch, in its cache, or with one read of the start record
the image key points to), checks each image against it and decompresses the
frame there, in the rank.  It yields what the Kafka driver's rank job
expects: :class:`~sparkmpi.stream.offsets.Frame` (header ``scan`` =
``eiger-<series_id>``, ``index`` = image id, ``pos`` = the image's
``appendix.scan_position`` when present, ``ts`` = the sender's time when the
image carries one, else the bridge's Kafka timestamp; ``extra`` holds
``series_id``, ``real_time`` and ``decode_s``, the seconds decompression took), ``EndMarker`` per end
record, and ``DeadLetter`` (with the reason) for anything that does not
decode.

:class:`~.driver.EigerStreamDriver` (a module of its own, so that a rank
importing this one does not import the driver's) is the Kafka driver with
this reader.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from typing import Iterator

import numpy as np

from ..frames import EndOfScan, FrameError, FrameHeader
from ..offsets import DeadLetter, EndMarker, Frame, KafkaRecord, OffsetRange, read_offset_range
from .._errors import OffsetError
from .records import parse_key
from .stream2 import EndMessage, ImageMessage, StartMessage, check_image, decode_message

#: channels="first": each frame is the start message's first channel; "all": (C, H, W) of every channel.
CHANNEL_MODES = ("first", "all")
_STARTS: "OrderedDict[tuple, StartMessage]" = OrderedDict()
_STARTS_KEPT = 64


def _remember(key: tuple, start: StartMessage) -> None:
    _STARTS[key] = start
    _STARTS.move_to_end(key)
    while len(_STARTS) > _STARTS_KEPT:
        _STARTS.popitem(last=False)


def _start_for(bootstrap: str, timeout: float, consumer_config, topic: str, partition: int,
               offset: int) -> StartMessage:
    key = (bootstrap, topic, partition, offset)
    start = _STARTS.get(key)
    if start is None:
        try:
            records = read_offset_range(bootstrap, topic, partition, offset, offset + 1, timeout=timeout,
                                        consumer_config=consumer_config)
        except OffsetError as exc:   # a key pointing outside the partition: this record is bad, not the batch
            raise FrameError(f"the start record the key points to is not there: {exc}", "unknown_series") from None
        if not records:
            raise FrameError(f"{topic}[{partition}] has no start record at offset {offset}", "unknown_series")
        record = records[0]
        rkey = parse_key(record.key)
        if rkey.kind != "start":
            raise FrameError(f"{topic}[{partition}] offset {offset} is a {rkey.kind} record, not the series' start",
                             "unknown_series")
        start = decode_message(record.value)
        if not isinstance(start, StartMessage):
            raise FrameError(f"{topic}[{partition}] offset {offset}: a start key over a "
                             f"{type(start).__name__}", "bad_message")
        _remember(key, start)
    return start


def decode_eiger_record(record: KafkaRecord, start_for, *, channels: str = "first",
                        check_finite: bool = True) -> Frame | EndMarker | DeadLetter | None:
    """Decode one bridged record (None for a start record, which carries no frame).

    ``start_for(partition, offset)`` returns the :class:`StartMessage` stored
    at that offset.  Never raises for bad content: a :class:`DeadLetter` says why.
    """
    where = (record.topic, record.partition, record.offset)
    try:
        key = parse_key(record.key)
        if record.value is None:
            raise FrameError("record has no value", "empty")
        if key.kind == "start":
            start = decode_message(record.value)
            if not isinstance(start, StartMessage) or start.series_id != key.series_id:
                raise FrameError(f"start record of series {key.series_id} holds {type(start).__name__}"
                                 f"{' of series ' + str(start.series_id) if hasattr(start, 'series_id') else ''}",
                                 "key_mismatch")
            _remember(("local", record.topic, record.partition, record.offset), start)
            return None
        message = decode_message(record.value)
        if key.kind == "end":
            if not isinstance(message, EndMessage) or message.series_id != key.series_id:
                raise FrameError(f"end record of series {key.series_id} does not hold its end message", "key_mismatch")
            return EndMarker(EndOfScan(f"eiger-{key.series_id}", key.images, record.partition,
                                       record.timestamp_ms / 1000.0), *where)
        if not isinstance(message, ImageMessage) or (message.series_id, message.image_id) != (key.series_id,
                                                                                            key.image_id):
            raise FrameError(f"image record key {record.key!r:.80} does not match the message it holds",
                             "key_mismatch")
        start = _STARTS.get(("local", record.topic, record.partition, key.start_offset)) or \
            start_for(record.partition, key.start_offset)
        check_image(message, start)
        t_decode = time.perf_counter()
        arrays = message.decode()
        decode_s = time.perf_counter() - t_decode
        if channels == "first":
            array = arrays.get(start.channels[0])
            if array is None:
                array = next(iter(arrays.values()))
        else:
            array = np.stack([arrays[c] for c in start.channels if c in arrays])
        if check_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
            raise FrameError(f"image {message.image_id} of series {message.series_id}: NaN or infinite values",
                             "not_finite")
        appendix = message.fields.get("appendix")
        position, ts = (0.0, 0.0), record.timestamp_ms / 1000.0
        if isinstance(appendix, dict):
            pos = appendix.get("scan_position")
            if isinstance(pos, (list, tuple)) and len(pos) == 2:
                position = (float(pos[0]), float(pos[1]))
            if isinstance(appendix.get("sent_at"), (int, float)):
                ts = float(appendix["sent_at"])
        header = FrameHeader(f"eiger-{message.series_id}", message.image_id, position, ts, array.shape,
                             array.dtype.str, {"series_id": message.series_id, "real_time": message.real_time,
                                              "decode_s": decode_s})
        return Frame(header, array, *where)
    except FrameError as exc:
        return DeadLetter(*where, record.key, record.value, str(exc), exc.code)


def read_eiger_ranges(bootstrap: str, timeout: float, consumer_config: dict | None, channels: str,
                      check_finite: bool, ranges: list[OffsetRange]) -> Iterator:
    """Inside a rank: read these offset ranges and decode them, one frame at a time."""
    for r in ranges:
        start_for = functools.partial(_start_for, bootstrap, timeout, consumer_config, r.topic)
        for record in read_offset_range(bootstrap, r.topic, r.partition, r.start, r.end, timeout=timeout,
                                        consumer_config=consumer_config):
            item = decode_eiger_record(record, start_for, channels=channels, check_finite=check_finite)
            if item is not None:
                yield item


def _warm_eiger(bootstrap: str, timeout: float, ranges, _ignored) -> Iterator:
    import dectris.compression  # noqa: F401  (loaded once per rank, before the first frame)
    import cbor2  # noqa: F401

    return iter(read_eiger_ranges(bootstrap, timeout, None, "first", True, ranges))
