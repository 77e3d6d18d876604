"""Offset-range planning, record decoding and counters: pure logic, no broker."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkmpi.stream.frames import FrameHeader, encode_end_of_scan, encode_frame
from sparkmpi.stream.offsets import (
    DeadLetter, EndMarker, Frame, KafkaRecord, OffsetError, OffsetRange, StreamCounters, decode_record,
    plan_batch,
)


def test_plan_from_scratch_and_from_committed():
    marks = {("t", 0): (0, 10), ("t", 1): (0, 7), ("t", 2): (0, 0)}
    assert plan_batch({}, marks) == [OffsetRange("t", 0, 0, 10), OffsetRange("t", 1, 0, 7)]
    assert plan_batch({("t", 0): 4, ("t", 1): 7, ("t", 2): None}, marks) == [OffsetRange("t", 0, 4, 10)]
    assert plan_batch({("t", 0): 10, ("t", 1): 7}, marks) == []


def test_plan_starts_at_low_watermark_when_never_committed():
    assert plan_batch({}, {("t", 0): (5, 9)}) == [OffsetRange("t", 0, 5, 9)]
    assert plan_batch({("t", 0): None}, {("t", 0): 3}) == [OffsetRange("t", 0, 0, 3)]


def test_plan_cap_is_shared_evenly():
    marks = {("t", 0): (0, 100), ("t", 1): (0, 3), ("t", 2): (0, 100)}
    plan = plan_batch({}, marks, max_messages=20)
    assert [r.count for r in plan] == [9, 3, 8]
    assert sum(r.count for r in plan) == 20
    plan = plan_batch({("t", 0): 50}, marks, max_messages=1)
    assert plan == [OffsetRange("t", 0, 50, 51)]


def test_plan_errors_name_the_partition_and_offsets():
    with pytest.raises(OffsetError, match=r"t\[0\]: committed offset 12 is beyond the high watermark 10"):
        plan_batch({("t", 0): 12}, {("t", 0): (0, 10)})
    with pytest.raises(OffsetError, match=r"3 message\(s\) were deleted"):
        plan_batch({("t", 0): 2}, {("t", 0): (5, 10)})
    assert plan_batch({("t", 0): 2}, {("t", 0): (5, 10)}, allow_gaps=True) == [OffsetRange("t", 0, 5, 10)]
    with pytest.raises(ValueError, match="max_messages: expected an integer >= 1 or None, got 0"):
        plan_batch({}, {("t", 0): 3}, max_messages=0)
    with pytest.raises(ValueError, match="expected 0 <= low <= high"):
        plan_batch({}, {("t", 0): (4, 3)})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=6),
       st.one_of(st.none(), st.integers(1, 200)))
def test_plan_properties(parts, cap):
    marks, committed = {}, {}
    for p, (low, extra, done) in enumerate(parts):
        high = low + extra
        marks[("t", p)] = (low, high)
        committed[("t", p)] = low + min(done, extra)
    plan = plan_batch(committed, marks, max_messages=cap)
    available = sum(h - committed[k] for k, (_, h) in marks.items())
    total = sum(r.count for r in plan)
    assert total == (available if cap is None else min(cap, available))
    for r in plan:
        assert r.start == committed[(r.topic, r.partition)] and r.end <= marks[(r.topic, r.partition)][1]
        assert r.count > 0
    # consecutive batches cover every offset exactly once
    for r in plan:
        committed[(r.topic, r.partition)] = r.end
    rest = plan_batch(committed, marks)
    assert sum(r.count for r in rest) == available - total


def test_offset_range_validates():
    with pytest.raises(ValueError, match="end \\(3\\) must be >= start \\(5\\)"):
        OffsetRange("t", 0, 5, 3)
    with pytest.raises(ValueError, match="partition: expected an integer >= 0, got -1"):
        OffsetRange("t", -1, 0, 3)
    assert OffsetRange("t", 1, 2, 5).to_json() == {"topic": "t", "partition": 1, "start": 2, "end": 5}


def _record(value, key, offset=0):
    return KafkaRecord("frames", 1, offset, key, value, 0)


def test_decode_record_kinds_and_counters():
    array = np.arange(12, dtype=np.uint16).reshape(3, 4)
    good = _record(encode_frame(FrameHeader("s", 5), array), b"5", 10)
    end = _record(encode_end_of_scan("s", 6, 1), b"end", 11)
    wrong_key = _record(encode_frame(FrameHeader("s", 5), array), b"6", 12)
    truncated = _record(encode_frame(FrameHeader("s", 7), array)[:-3], b"7", 13)
    tomb = _record(None, b"8", 14)
    items = [decode_record(r) for r in (good, end, wrong_key, truncated, tomb)]
    assert isinstance(items[0], Frame) and items[0].offset == 10 and items[0].header.index == 5
    np.testing.assert_array_equal(items[0].array, array)
    assert isinstance(items[1], EndMarker) and items[1].marker.frames == 6
    assert [type(i) for i in items[2:]] == [DeadLetter] * 3
    assert items[2].code == "key_mismatch" and "b'6'" in items[2].reason
    assert items[3].code == "truncated_payload" and items[3].value == truncated.value
    assert "needs 24 bytes, got 21" in items[3].reason
    assert items[4].code == "empty"
    counters = StreamCounters()
    for item in items:
        counters.add(item)
    assert counters.to_json() == {"messages": 5, "frames": 1, "frame_bytes": 24, "end_markers": 1,
                                  "dead_letters": 3,
                                  "reasons": {"empty": 1, "key_mismatch": 1, "truncated_payload": 1}}
    total = StreamCounters().merge(counters).merge(counters)
    assert total.frames == 2 and total.reasons["empty"] == 2


def test_records_and_decoded_items_pickle():
    array = np.ones((2, 2), np.float32)
    record = _record(encode_frame(FrameHeader("s", 1), array), b"1")
    frame = pickle.loads(pickle.dumps(decode_record(record)))
    assert frame.header.index == 1 and frame.array.sum() == 4
    assert pickle.loads(pickle.dumps(record)) == record
