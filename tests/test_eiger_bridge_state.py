"""The bridge's decisions (pure): series open/close, restarts, timeouts, lost connections, dead letters; record keys."""

from __future__ import annotations

import numpy as np
import pytest

from sparkmpi.errors import InvalidArgument
from sparkmpi.stream.eiger import _bridge_state as st
from sparkmpi.stream.eiger import stream2 as s2
from sparkmpi.stream.eiger.records import RecordKey, parse_key
from sparkmpi.stream.frames import FrameError


def frame(shape=(8, 8), dtype="uint16"):
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape)


def start(series=1, n=3, shape=(8, 8)):
    raw = s2.encode_start(series, image_shape=shape, number_of_images=n, series_unique_id=f"u{series}")
    return s2.decode_message(raw), raw


def image(series, i, shape=(8, 8), dtype="uint16"):
    raw = s2.encode_image(series, i, frame(shape, dtype), series_unique_id=f"u{series}")
    return s2.decode_message(raw), raw


def end(series):
    raw = s2.encode_end(series, series_unique_id=f"u{series}")
    return s2.decode_message(raw), raw


def kinds(actions):
    return [type(a).__name__ for a in actions]


def test_a_complete_series():
    state = st.BridgeState(partitions=2, end_timeout=5)
    acts = state.message(*start(), now=0)
    assert kinds(acts) == ["PublishStart", "Report"]
    parts = []
    for i in range(3):
        (a,) = state.message(*image(1, i), now=1 + i)
        assert isinstance(a, st.PublishImage) and (a.series_id, a.image_id) == (1, i)
        parts.append(a.partition)
    assert parts == [0, 1, 0]
    acts = state.message(*end(1), now=5)
    assert kinds(acts) == ["PublishEnd", "Report"]
    assert acts[0].images_per_partition == (2, 1) and acts[0].incomplete is None and acts[0].raw is not None
    assert acts[1].event == "series_ended"
    assert state.finished == [{"series_id": 1, "images": 3, "expected": 3, "incomplete": None,
                               "per_partition": [2, 1]}]


def test_images_of_another_series_repeats_and_mismatches_are_dead_letters():
    state = st.BridgeState()
    (dead,) = state.message(*image(1, 0), now=0)   # before any start message
    assert isinstance(dead, st.DeadLetter) and dead.code == "unknown_series" and "series 1" in dead.reason
    state.message(*start(1), now=1)
    assert isinstance(state.message(*image(1, 0), now=2)[0], st.PublishImage)
    cases = [(image(1, 0), "duplicate"), (image(2, 1), "unknown_series"), (image(1, 1, (8, 9)), "shape_mismatch"),
             (image(1, 2, dtype="uint32"), "dtype_mismatch")]
    for (msg, raw), code in cases:
        (a,) = state.message(msg, raw, now=3)
        assert isinstance(a, st.DeadLetter) and a.code == code, (code, a)
        assert a.raw == raw
    bad = b"\xd9\xd9\xf7\xa1"
    (a,) = state.message(FrameError("truncated CBOR message", "truncated"), bad, now=4)
    assert isinstance(a, st.DeadLetter) and a.code == "truncated" and a.raw == bad
    # the stream goes on
    assert isinstance(state.message(*image(1, 1), now=5)[0], st.PublishImage)
    assert state.dead == 6
    (a,) = state.message(*end(7), now=6)
    assert isinstance(a, st.DeadLetter) and a.code == "unknown_series"
    assert state.series is not None


def test_a_restarted_series_closes_the_open_one_incomplete():
    state = st.BridgeState()
    state.message(*start(1), now=0)
    state.message(*image(1, 0), now=1)
    acts = state.message(*start(2), now=2)
    assert kinds(acts) == ["PublishEnd", "Report", "PublishStart", "Report"]
    assert acts[0].series_id == 1 and acts[0].raw is None and "restarted as series 2" in acts[0].incomplete
    assert acts[1].event == "series_incomplete" and "series 1" in acts[1].text
    assert state.series.start.series_id == 2
    (dup,) = state.message(*start(2), now=3)
    assert isinstance(dup, st.DeadLetter) and dup.code == "duplicate"


def test_a_missing_end_message_times_out_naming_a_lost_connection():
    state = st.BridgeState(end_timeout=2.0)
    state.message(*start(4), now=0)
    state.message(*image(4, 0), now=1)
    (lost,) = state.disconnected(now=1.5)
    assert lost.event == "connection_lost" and "series 4" in lost.text and "after 1 images" in lost.text
    assert state.tick(2.9) == []
    acts = state.tick(3.1)
    assert kinds(acts) == ["PublishEnd", "Report"]
    assert "no end message within 2 s" in acts[0].incomplete and "connection was lost" in acts[0].incomplete
    assert state.finished[-1]["images"] == 1 and state.finished[-1]["expected"] == 3
    assert state.tick(10) == [] and state.close() == []


def test_reconnecting_within_the_timeout_keeps_the_series():
    state = st.BridgeState(end_timeout=2.0)
    state.message(*start(4), now=0)
    state.disconnected(now=0.5)
    state.message(*image(4, 0), now=1.5)   # the detector came back
    assert state.tick(3.0) == []
    assert kinds(state.message(*end(4), now=3.2)) == ["PublishEnd", "Report"]


def test_closing_the_bridge_ends_an_open_series():
    state = st.BridgeState()
    state.message(*start(3), now=0)
    acts = state.close()
    assert acts[0].incomplete == "the bridge stopped before the end message"


def test_fewer_images_than_announced_are_reported():
    state = st.BridgeState()
    state.message(*start(1, n=5), now=0)
    state.message(*image(1, 0), now=0)
    acts = state.message(*end(1), now=0)
    assert "announced 5 (4 never came)" in acts[1].text


def test_arguments_are_checked():
    with pytest.raises(InvalidArgument, match="partitions"):
        st.BridgeState(partitions=0)
    with pytest.raises(InvalidArgument, match="end_timeout"):
        st.BridgeState(end_timeout=0)


def test_record_keys_round_trip_and_refuse_junk():
    for key in (RecordKey("start", 3), RecordKey("image", 3, image_id=17, start_offset=40),
                RecordKey("end", 3, images=9, start_offset=40), RecordKey("end", 3, images=1, start_offset=0,
                                                                          incomplete=True)):
        assert parse_key(key.encode()) == key
    for junk in (None, b"", b"7", b"eiger2/image/3/x/0", b"eiger2/image/3/1", b"eiger2/end/3/1/0/done",
                 b"other/start/1", b"\xff\xfe", b"eiger2/start/-1"):
        with pytest.raises(FrameError) as info:
            parse_key(junk)
        assert info.value.code == "bad_key"


def test_open_series_found_from_the_topic_keys():
    from sparkmpi.stream.eiger.records import open_series

    k = lambda *a, **kw: RecordKey(*a, **kw).encode()  # noqa: E731
    closed = {0: [(0, k("start", 1)), (1, k("image", 1, image_id=0, start_offset=0)),
                  (2, k("end", 1, images=1, start_offset=0))]}
    assert open_series(closed) is None
    assert open_series({0: []}) is None
    left = {0: closed[0] + [(3, k("start", 2)), (4, k("image", 2, image_id=0, start_offset=3)), (5, b"junk"),
                            (6, k("image", 2, image_id=2, start_offset=3))],
            1: [(0, k("start", 2)), (1, k("image", 2, image_id=1, start_offset=0))]}
    found = open_series(left)
    assert (found.series_id, found.start_offsets, found.image_ids, found.per_partition) == \
        (2, {0: 3, 1: 0}, frozenset({0, 1, 2}), (2, 1))
    left[1].append((2, k("end", 2, images=1, start_offset=0)))
    assert open_series(left) is None


def test_a_resumed_series_skips_what_is_on_the_topic():
    state = st.BridgeState(partitions=2)
    s, _ = start(5, n=4)
    (note,) = state.resume(s, {0, 1}, (1, 1), now=0)
    assert note.event == "series_resumed" and "2 images already bridged" in note.text
    assert isinstance(state.message(*image(5, 1), now=1)[0], st.DeadLetter)
    (a,) = state.message(*image(5, 2), now=1)
    assert isinstance(a, st.PublishImage)
    acts = state.message(*end(5), now=2)
    assert acts[0].images_per_partition == (2, 1)
    with pytest.raises(InvalidArgument, match="per_partition"):
        st.BridgeState(partitions=2).resume(s, set(), (0,), now=0)
