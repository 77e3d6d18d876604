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
import select
import socket
import struct
from dataclasses import dataclass
from typing import Any

_PREAMBLE = struct.Struct("!4sBI")  # magic, kind, segment count
_MAGIC = b"SMPR"
_MAX_SEGMENTS = 1 << 20
_SMALL = 1 << 16

JOB, DATA, RESULT, ERROR, READY, FORK, FORKED = 1, 2, 3, 4, 5, 6, 7
# A world's life after JOB: STARTED (MPI is up), then CALL -> RESULT or ERROR
# any number of times, OUTPUT (the rank's stdout/stderr, relay to driver) in
# between, and CLOSE -> CLOSED (MPI finalised).  HELLO opens a relay's
# connection to the driver's world endpoint; DATA also carries partitions.
STARTED, CALL, CLOSE, CLOSED, OUTPUT, HELLO = 8, 9, 10, 11, 12, 13
# The driver's heartbeat (see .heartbeat): PING to a relay while it waits, PONG back at once.
PING, PONG = 14, 15
# Ranks that are external programs (:mod:`.programs`): the relay reports
# OUTPUT and one EXITED (its program's exit status); the driver sends rank 0
# its STDIN (empty data: end of input).
EXITED, STDIN = 16, 17
# A map_partitions delivery greeted a relay (its task runs; the partition is being computed).
DELIVERING = 18
KIND_NAMES = {JOB: "job", DATA: "data", RESULT: "result", ERROR: "error", READY: "ready", FORK: "fork",
              FORKED: "forked", STARTED: "started", CALL: "call", CLOSE: "close", CLOSED: "closed",
              OUTPUT: "output", HELLO: "hello", PING: "ping", PONG: "pong", EXITED: "exited", STDIN: "stdin",
              DELIVERING: "delivering"}


@dataclass(frozen=True)
class PartitionRef:
    """A call argument that the rank replaces by an iterator over the records
    delivered to it under ``key`` (a DATA message sent before the call)."""

    key: str


def partition_call(comm, state, records, fn):
    """A world call in ``run``'s shape: ``fn(comm, records)`` returning an iterable.

    It lives here because every rank has this module loaded already: a rank
    importing the driver's modules for it would spend tens of ms per job."""
    out = fn(comm, records)
    return [] if out is None else list(out)


class ChannelClosed(EOFError):
    """The peer closed the channel before a whole message arrived."""


def encode(obj: Any, dumps=pickle.dumps) -> list:
    """``obj`` as message segments: the pickle stream, then its out-of-band buffers."""
    buffers: list[pickle.PickleBuffer] = []
    head = dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [memoryview(head)] + [b.raw() for b in buffers]


def decode(segments) -> Any:
    """The object of :func:`encode`'s ``segments``."""
    return pickle.loads(segments[0], buffers=segments[1:])


def send_message(sock: socket.socket, kind: int, obj: Any, fds: tuple[int, ...] = (),
                 dumps=pickle.dumps) -> None:
    """Send ``obj`` as one message of ``kind``, passing ``fds`` along."""
    send_frame(sock, kind, encode(obj, dumps), fds)


def frame_pieces(kind: int, segments) -> list[memoryview]:
    """The bytes of one message of ``kind`` as a few buffers to write in order.

    Small segments join the header in one buffer (one packet, one wake-up of
    the peer); large ones stay as they are, without a copy.
    """
    segments = [s if isinstance(s, memoryview) else memoryview(s) for s in segments]
    head = bytearray(_PREAMBLE.pack(_MAGIC, kind, len(segments)))
    head += struct.pack(f"!{len(segments)}Q", *(s.nbytes for s in segments))
    pieces: list[memoryview] = []
    for segment in segments:
        if segment.nbytes <= _SMALL:
            head += segment.cast("B") if segment.ndim != 1 or segment.format != "B" else segment
        else:
            if head:
                pieces.append(memoryview(head))
                head = bytearray()
            pieces.append(segment.cast("B") if segment.ndim != 1 or segment.format != "B" else segment)
    if head:
        pieces.append(memoryview(head))
    return pieces


def send_pings(conns: dict, ranks) -> None:
    """The heartbeat's PING to the relay of each of ``ranks`` (``conns``: rank -> socket).

    Only a socket that takes the few bytes at once gets one: a blocking send
    to a frozen relay whose buffer is full would stop the heartbeat itself
    (its unanswered ping is what finds it).  A connection that is gone is
    left to the read that finds it.
    """
    socks = [conns[rank] for rank in ranks if rank in conns and conns[rank].fileno() >= 0]
    if not socks:
        return
    poller = select.poll()  # not select.select: a driver may hold descriptors past FD_SETSIZE
    for sock in socks:
        poller.register(sock, select.POLLOUT)
    writable = {fd for fd, events in poller.poll(0) if events & select.POLLOUT}
    for sock in socks:
        if sock.fileno() in writable:
            try:
                send_message(sock, PING, None)
            except OSError:
                pass


def send_frame(sock: socket.socket, kind: int, segments, fds: tuple[int, ...] = ()) -> None:
    """Send already encoded ``segments`` as one message of ``kind`` (a relay forwards them unread)."""
    if not fds:
        for piece in frame_pieces(kind, segments):
            sock.sendall(piece)
        return
    segments = [s if isinstance(s, memoryview) else memoryview(s) for s in segments]
    socket.send_fds(sock, [_PREAMBLE.pack(_MAGIC, kind, len(segments))], list(fds))
    head = bytearray(struct.pack(f"!{len(segments)}Q", *(s.nbytes for s in segments)))
    for segment in segments:
        if segment.nbytes <= _SMALL:
            head += segment
        else:
            if head:
                sock.sendall(head)
                head = bytearray()
            sock.sendall(segment)
    if head:
        sock.sendall(head)


class FrameReader:
    """One message read piecewise from a non-blocking socket, with no I/O of its own.

    The adapter receives into :meth:`buffer` (``sock.recv_into(reader.buffer())``)
    and reports the count to :meth:`advance`, which returns ``(kind, segments)``
    once the whole message is in: the same as :func:`recv_frame` (without
    descriptors), so a relay can read a long delivery between its other work.
    Segments are received straight into their final buffers, as there.
    """

    def __init__(self) -> None:
        self._head = bytearray(_PREAMBLE.size)
        self._target: bytearray = self._head
        self._got = 0
        self._stage = "preamble"
        self._kind = 0
        self._lengths: tuple = ()
        self._segments: list = []

    def buffer(self) -> memoryview:
        """Where the next bytes go (never empty while a message is unfinished)."""
        return memoryview(self._target)[self._got:]

    def advance(self, count: int) -> tuple[int, list] | None:
        """``count`` more bytes are in :meth:`buffer`; the message once it is whole, else None.

        Raises ValueError on a bad preamble (the peer is not one of ours)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(self._target) - self._got:
            raise ValueError(f"count: expected 0..{len(self._target) - self._got} bytes, got {count!r}")
        self._got += count
        while self._got == len(self._target):
            if self._stage == "preamble":
                magic, kind, segments = _PREAMBLE.unpack(self._head)
                if magic != _MAGIC or kind not in KIND_NAMES or not (1 <= segments <= _MAX_SEGMENTS):
                    raise ValueError(f"bad message preamble {bytes(self._head)!r}")
                self._kind, self._stage = kind, "lengths"
                self._begin(bytearray(8 * segments))
            elif self._stage == "lengths":
                self._lengths = struct.unpack(f"!{len(self._target) // 8}Q", self._target)
                self._stage = "segments"
                self._begin(bytearray(self._lengths[0]))
            else:
                self._segments.append(self._target)
                if len(self._segments) == len(self._lengths):
                    frame = (self._kind, self._segments)
                    self.__init__()
                    return frame
                self._begin(bytearray(self._lengths[len(self._segments)]))
        return None

    def _begin(self, target: bytearray) -> None:
        self._target, self._got = target, 0


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
    kind, segments, fds = recv_frame(sock, max_fds)
    return kind, decode(segments), fds


def recv_frame(sock: socket.socket, max_fds: int = 4) -> tuple[int, list, list[int]]:
    """Receive one message undecoded: ``(kind, segments, fds)`` (see :func:`recv_message`)."""
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
    return kind, segments, list(fds)


#: Seconds a relay connecting to a driver endpoint has to send its HELLO.
HELLO_TIMEOUT = 10.0


def accept_relay(listener: socket.socket, job: str, token: str, size: int, conns: dict, hosts: dict
                 ) -> tuple | None:
    """Accept one relay on a driver endpoint's ``listener``: when its HELLO names ``job``
    with its ``token`` and a rank in ``range(size)`` not in ``conns``, its socket goes into
    ``conns[rank]``, its host into ``hosts[rank]``, and ``(rank, hello)`` is returned;
    otherwise the connection is closed and None returned (a stranger cannot take a rank)."""
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(HELLO_TIMEOUT)
    try:
        kind, hello, _ = recv_message(sock)
    except (OSError, EOFError, ValueError):
        sock.close()
        return None
    sock.settimeout(None)
    rank = hello.get("rank") if kind == HELLO and isinstance(hello, dict) else None
    if (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < size or rank in conns
            or hello.get("job") != job or hello.get("token") != token):
        sock.close()
        return None
    conns[rank] = sock
    hosts[rank] = hello.get("host", "?")
    return rank, hello
