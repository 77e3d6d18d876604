"""Framed messages between a Spark task and its rank process (Unix socket).

A message is a fixed preamble (magic, kind, number of segments), the segment
lengths, then the segments.  Segment 0 is a pickle (protocol 5) stream and the
rest are its out-of-band buffers, so NumPy arrays cross the process boundary
without being copied into the pickle first; they are received straight into
their final buffers.  File descriptors ride along with the preamble
(``SCM_RIGHTS``).
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

_PREAMBLE = struct.Struct("!4sBI")  # magic, kind, segment count
_MAGIC = b"SMPR"
_MAX_SEGMENTS = 1 << 20

JOB, DATA, RESULT, ERROR, READY, FORK, FORKED = 1, 2, 3, 4, 5, 6, 7
KIND_NAMES = {JOB: "job", DATA: "data", RESULT: "result", ERROR: "error", READY: "ready", FORK: "fork",
              FORKED: "forked"}


class ChannelClosed(EOFError):
    """The peer closed the channel before a whole message arrived."""


def send_message(sock: socket.socket, kind: int, obj: Any, fds: tuple[int, ...] = (),
                 dumps=pickle.dumps) -> None:
    """Send ``obj`` as one message of ``kind``, passing ``fds`` along."""
    buffers: list[pickle.PickleBuffer] = []
    head = dumps(obj, protocol=5, buffer_callback=buffers.append)
    segments = [memoryview(head)] + [b.raw() for b in buffers]
    preamble = _PREAMBLE.pack(_MAGIC, kind, len(segments))
    lengths = struct.pack(f"!{len(segments)}Q", *(s.nbytes for s in segments))
    if fds:
        socket.send_fds(sock, [preamble], list(fds))
    else:
        sock.sendall(preamble)
    sock.sendall(lengths)
    for segment in segments:
        if segment.nbytes:
            sock.sendall(segment)


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ChannelClosed(f"channel closed after {got} of {size} bytes")
        got += n
    return buf


def recv_message(sock: socket.socket, max_fds: int = 4) -> tuple[int, Any, list[int]]:
    """Receive one message: ``(kind, obj, fds)``.

    Raises ChannelClosed on end of stream and ValueError on a bad preamble.
    """
    data, fds, _flags, _addr = socket.recv_fds(sock, _PREAMBLE.size, max_fds)
    if not data:
        raise ChannelClosed("channel closed")
    if len(data) < _PREAMBLE.size:
        data += _recv_exact(sock, _PREAMBLE.size - len(data))
    magic, kind, count = _PREAMBLE.unpack(data)
    if magic != _MAGIC or kind not in KIND_NAMES or not (1 <= count <= _MAX_SEGMENTS):
        for fd in fds:
            socket.close(fd)
        raise ValueError(f"bad message preamble {bytes(data)!r}")
    lengths = struct.unpack(f"!{count}Q", _recv_exact(sock, 8 * count))
    segments = [_recv_exact(sock, n) for n in lengths]
    obj = pickle.loads(segments[0], buffers=segments[1:])
    return kind, obj, list(fds)
