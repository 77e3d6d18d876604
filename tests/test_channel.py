"""The framed-message reader a relay uses for deliveries (channel.FrameReader), with no sockets."""

from __future__ import annotations

import numpy as np
import pytest

from sparkmpi.launch import channel


def _wire(kind, obj) -> bytes:
    return b"".join(bytes(p) for p in channel.frame_pieces(kind, channel.encode(obj)))


def _feed(reader, data: bytes, step: int) -> list:
    frames, i = [], 0
    while i < len(data):
        buf = reader.buffer()
        n = min(step, len(buf), len(data) - i)
        buf[:n] = data[i:i + n]
        i += n
        frame = reader.advance(n)
        if frame is not None:
            frames.append(frame)
    return frames


@pytest.mark.parametrize("step", [1, 3, 4096, 1 << 30])
def test_messages_read_whole_or_byte_by_byte_equal_what_was_sent(step):
    records = {"key": "k", "records": [np.arange(5000, dtype=np.float32), b"", "x" * 70000]}
    data = _wire(channel.HELLO, {"token": "t", "rank": 2}) + _wire(channel.DATA, records)
    frames = _feed(channel.FrameReader(), data, step)
    assert [kind for kind, _ in frames] == [channel.HELLO, channel.DATA]
    assert channel.decode(frames[0][1]) == {"token": "t", "rank": 2}
    out = channel.decode(frames[1][1])
    np.testing.assert_array_equal(out["records"][0], records["records"][0])
    assert out["records"][1:] == records["records"][1:]


def test_an_unfinished_message_gives_nothing_and_garbage_raises():
    data = _wire(channel.DATA, list(range(100)))
    reader = channel.FrameReader()
    assert _feed(reader, data[:-1], 7) == []
    assert len(reader.buffer()) == 1
    with pytest.raises(ValueError, match="bad message preamble"):
        _feed(channel.FrameReader(), b"GET / HTTP/1.1\r\n", 64)
    with pytest.raises(ValueError, match="count: expected"):
        channel.FrameReader().advance(100)
