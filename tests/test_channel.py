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


def test_pings_go_only_to_relays_that_take_them_at_once():
    import socket

    pairs = [socket.socketpair() for _ in range(3)]
    try:
        full, _ = pairs[1]
        full.setblocking(False)
        try:
            while True:
                full.send(b"x" * 65536)
        except BlockingIOError:
            pass                                     # a frozen relay's buffer: a ping would block
        pairs[2][0].close()                          # gone: left to the read that finds it
        channel.send_pings({rank: ours for rank, (ours, _) in enumerate(pairs)}, [0, 1, 2, 7])
        theirs = pairs[0][1]
        theirs.settimeout(5)
        assert channel.recv_message(theirs)[0] == channel.PING
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)                           # one ping, nothing more
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
