"""The rank-side decoder of bridged records (pure: records built here, no broker)."""

from __future__ import annotations

import numpy as np
import pytest

from sparkmpi.stream.eiger import stream2 as s2
from sparkmpi.stream.eiger.records import RecordKey
from sparkmpi.stream.eiger.source import decode_eiger_record
from sparkmpi.stream.frames import FrameError
from sparkmpi.stream.offsets import DeadLetter, EndMarker, Frame, KafkaRecord


def rec(offset, key, value, topic="t"):
    return KafkaRecord(topic, 0, offset, key.encode() if isinstance(key, RecordKey) else key, value, 1_700_000_000_000)


START = s2.encode_start(4, image_shape=(6, 5), channels=["threshold_1", "threshold_2"], number_of_images=2)
A = np.arange(30, dtype=np.uint16).reshape(6, 5)


def image(i=0, arrays=None, **kw):
    return s2.encode_image(4, i, arrays if arrays is not None else {"threshold_1": A, "threshold_2": A * 2},
                           extra={"appendix": {"scan_position": [1.5, -2.0], "sent_at": 123.5}}, **kw)


def no_lookup(partition, offset):
    raise FrameError(f"no start record at {offset}", "unknown_series")


def test_start_then_images_then_end():
    topic = "t-basic"
    assert decode_eiger_record(rec(0, RecordKey("start", 4), START, topic), no_lookup) is None
    f = decode_eiger_record(rec(1, RecordKey("image", 4, image_id=0, start_offset=0), image(), topic), no_lookup)
    assert isinstance(f, Frame) and np.array_equal(f.array, A)
    assert (f.header.scan_id, f.header.index, f.header.position, f.header.timestamp) == ("eiger-4", 0, (1.5, -2.0),
                                                                                         123.5)
    assert f.header.extra["series_id"] == 4 and f.header.extra["decode_s"] >= 0
    both = decode_eiger_record(rec(2, RecordKey("image", 4, image_id=1, start_offset=0), image(1), topic),
                               no_lookup, channels="all")
    assert both.array.shape == (2, 6, 5) and np.array_equal(both.array[1], A * 2)
    end = decode_eiger_record(rec(3, RecordKey("end", 4, images=2, start_offset=0), s2.encode_end(4), topic),
                              no_lookup)
    assert isinstance(end, EndMarker) and (end.marker.scan_id, end.marker.frames) == ("eiger-4", 2)


def test_the_start_is_looked_up_when_another_rank_read_it():
    seen = []

    def lookup(partition, offset):
        seen.append((partition, offset))
        return s2.decode_message(START)

    f = decode_eiger_record(rec(9, RecordKey("image", 4, image_id=0, start_offset=7), image(), "t-lookup"), lookup)
    assert isinstance(f, Frame) and seen == [(0, 7)]


@pytest.mark.parametrize("key, value, code", [
    (b"frames/1", image(), "bad_key"),
    (RecordKey("image", 4, image_id=1, start_offset=0), image(0), "key_mismatch"),
    (RecordKey("image", 5, image_id=0, start_offset=0), s2.encode_image(5, 0, A), "unknown_series"),
    (RecordKey("image", 4, image_id=0, start_offset=0), image(arrays={"threshold_1": A[:, :4].copy()}),
     "shape_mismatch"),
    (RecordKey("image", 4, image_id=0, start_offset=0), image()[:-5], "truncated"),
    (RecordKey("end", 4, images=1, start_offset=0), image(), "key_mismatch"),
    (RecordKey("start", 4), s2.encode_end(4), "key_mismatch"),
    (RecordKey("image", 4, image_id=0, start_offset=99), image(), "unknown_series"),
])
def test_bad_records_are_dead_letters_with_the_reason(key, value, code):
    topic = f"t-bad-{code}"
    decode_eiger_record(rec(0, RecordKey("start", 4), START, topic), no_lookup)
    out = decode_eiger_record(rec(1, key, value, topic), no_lookup)
    assert isinstance(out, DeadLetter) and out.code == code, out
    assert out.value == value and out.reason


def test_a_tombstone_is_a_dead_letter():
    out = decode_eiger_record(rec(0, RecordKey("start", 4), None), no_lookup)
    assert isinstance(out, DeadLetter) and out.code == "empty"
