"""The PMI-1 wire format as pure functions over bytes (no sockets here).

A PMI-1 command is one line of ASCII::

    cmd=<name> key=value key=value ...\\n

Tokens are separated by spaces.  Keys are made of letters, digits and
``_ - /``.  A value runs up to the next space; a backslash escapes the next
character (so ``\\ `` is a space inside a value).  MPICH's client writes the
``message`` of ``cmd=abort`` without escaping, so for that one key the value is
the rest of the line.  Replies use the same format.

One command is sent on several lines: ``MPI_Comm_spawn`` sends ``mcmd=spawn``,
then one ``key=value`` per line (the value is the rest of the line, with
backslash escapes), then a bare ``endcmd`` line; ``Comm_spawn_multiple``
sends one such block per command.  :func:`parse_mcmd` reads one block and
:class:`CommandReader` turns a stream of lines into commands of either kind.

:class:`LineBuffer` turns a byte stream into lines with a size cap, so a peer
that never sends a newline cannot make us buffer without bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ..errors import InvalidArgument, InvalidArgumentType, PMIProtocolError

#: Longest line accepted: MPICH's values are at most 1024 bytes (``vallen_max``),
#: keys at most 64; this leaves ample room without unbounded buffering.
MAX_LINE = 64 * 1024

_KEY_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-/")
# Keys whose value is the rest of the line (MPICH sends them unescaped).
_REST_OF_LINE_KEYS = {("abort", "message")}


@dataclass(frozen=True)
class Command:
    """One parsed PMI command.

    Attributes
    ----------
    name : str
        The value of ``cmd=`` (e.g. ``"put"``).
    args : tuple of (str, str or None)
        The other tokens in order; a bare key has value None.
    """

    name: str
    args: tuple[tuple[str, str | None], ...] = ()

    def get(self, key: str, default: str | None = None) -> str | None:
        """Value of the first token called ``key``, or ``default``."""
        for k, v in self.args:
            if k == key:
                return v
        return default

    def require(self, key: str) -> str:
        """Value of ``key``; raises PMIProtocolError naming the command if absent."""
        value = self.get(key)
        if value is None:
            raise PMIProtocolError(f"cmd={self.name} needs {key}=..., got {self.encode()!r}")
        return value

    def require_int(self, key: str) -> int:
        text = self.require(key)
        try:
            return int(text)
        except ValueError:
            raise PMIProtocolError(f"cmd={self.name}: {key} must be an integer, got {text!r}") from None

    def encode(self) -> bytes:
        """This command as one wire line, newline included."""
        return format_command(self.name, self.args)


def _escape(value: str) -> str:
    if "\n" in value or "\0" in value:
        raise InvalidArgument(f"a PMI value cannot contain a newline or NUL byte, got {value!r}")
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def format_command(name: str, args: Mapping[str, object] | Iterable[tuple[str, object]] = ()) -> bytes:
    """Serialize a command: ``format_command("put_result", {"rc": 0})``.

    Values are converted with ``str`` and escaped; a value of None writes a
    bare key.  Raises ValueError for a name or key with characters the wire
    format cannot carry.
    """
    items = args.items() if isinstance(args, Mapping) else args
    if not name or not all(c in _KEY_CHARS for c in name.encode("ascii", "replace")):
        raise InvalidArgument(f"bad PMI command name {name!r}")
    parts = [f"cmd={name}"]
    for key, value in items:
        if not key or not all(c in _KEY_CHARS for c in key.encode("ascii", "replace")):
            raise InvalidArgument(f"bad PMI key {key!r} in cmd={name}")
        parts.append(key if value is None else f"{key}={_escape(str(value))}")
    return (" ".join(parts) + "\n").encode("ascii", "backslashreplace")


def _unescape(raw: bytes) -> bytes:
    if b"\\" not in raw:
        return raw
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x5C and i + 1 < len(raw):  # backslash: take the next byte literally
            out.append(raw[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return bytes(out)


def parse_line(line: bytes) -> Command:
    """Parse one PMI-1 line (with or without its trailing newline).

    Raises
    ------
    PMIProtocolError
        If the line does not start with ``cmd=``, holds a byte that is not
        allowed where it stands, is not ASCII, or is empty.
    """
    if not isinstance(line, (bytes, bytearray, memoryview)):
        raise InvalidArgumentType(f"line must be bytes, got {type(line).__name__}")
    data = bytes(line)
    if data.endswith(b"\n"):
        data = data[:-1]
    if data.endswith(b"\r"):
        data = data[:-1]
    if not data.startswith(b"cmd="):
        raise PMIProtocolError(f"expected a line starting with 'cmd=', got {_show(data)}")
    if b"\n" in data or b"\0" in data:
        raise PMIProtocolError(f"newline or NUL inside a PMI line: {_show(data)}")
    try:
        data.decode("ascii")
    except UnicodeDecodeError:
        raise PMIProtocolError(f"non-ASCII bytes in PMI line: {_show(data)}") from None

    name: str | None = None
    args: list[tuple[str, str | None]] = []
    i, n = 0, len(data)
    while True:
        while i < n and data[i] == 0x20:
            i += 1
        if i >= n:
            break
        start = i
        while i < n and data[i] in _KEY_CHARS:
            i += 1
        if i == start:
            raise PMIProtocolError(f"expected a key at column {i}, got {chr(data[i])!r} in {_show(data)}")
        key = data[start:i].decode("ascii")
        value: str | None = None
        if i < n and data[i] == 0x3D:  # '='
            i += 1
            if i >= n or data[i] == 0x20:
                raise PMIProtocolError(f"expected a value after {key}= in {_show(data)}")
            if (name, key) in _REST_OF_LINE_KEYS:
                raw, i = data[i:], n
            else:
                vstart = i
                while i < n and data[i] != 0x20:
                    i += 2 if data[i] == 0x5C and i + 1 < n else 1
                raw = _unescape(data[vstart:i])
            value = raw.decode("ascii")
        elif i < n and data[i] != 0x20:
            raise PMIProtocolError(f"invalid character {chr(data[i])!r} after key {key!r} in {_show(data)}")
        if key == "cmd" and name is None:
            if not value:
                raise PMIProtocolError(f"empty command name in {_show(data)}")
            name = value
        else:
            args.append((key, value))
    assert name is not None  # the line starts with cmd=, so the first token set it
    return Command(name, tuple(args))


#: Most lines one ``mcmd=`` block may have (arguments, info keys and preput keys of one command).
MAX_MCMD_LINES = 4096
MCMD_END = b"endcmd"


def parse_mcmd(lines: Iterable[bytes]) -> Command:
    """Parse one multi-line command: ``mcmd=NAME``, ``key=value`` lines, ``endcmd``.

    Raises
    ------
    PMIProtocolError
        If the block does not start with ``mcmd=``, does not end with
        ``endcmd``, or holds a line that is not ``key=value`` with a valid key.
    """
    block = [bytes(line).rstrip(b"\r") for line in lines]
    if not block or not block[0].startswith(b"mcmd="):
        raise PMIProtocolError(f"expected a block starting with 'mcmd=', got {_show(block[0] if block else b'')}")
    if block[-1] != MCMD_END:
        raise PMIProtocolError(f"mcmd block does not end with 'endcmd': {_show(block[-1])}")
    name = block[0][5:]
    if not name or not all(c in _KEY_CHARS for c in name):
        raise PMIProtocolError(f"bad multi-line command name in {_show(block[0])}")
    args: list[tuple[str, str | None]] = []
    for line in block[1:-1]:
        if not line:
            continue
        if b"\0" in line:
            raise PMIProtocolError(f"NUL inside a PMI line: {_show(line)}")
        key, eq, raw = line.partition(b"=")
        if not key or not all(c in _KEY_CHARS for c in key):
            raise PMIProtocolError(f"expected key=value in mcmd={name.decode()}, got {_show(line)}")
        try:
            value = _unescape(raw).decode("ascii") if eq else None
        except UnicodeDecodeError:
            raise PMIProtocolError(f"non-ASCII bytes in PMI line: {_show(line)}") from None
        args.append((key.decode("ascii"), value))
    return Command(name.decode("ascii"), tuple(args))


class CommandReader:
    """Whole lines in, commands out: single-line ``cmd=`` ones, and multi-line ``mcmd=`` blocks.

    >>> reader = CommandReader()
    >>> reader.feed(b"mcmd=spawn"), reader.feed(b"nprocs=2"), reader.feed(b"endcmd").name
    (None, None, 'spawn')
    """

    def __init__(self, max_lines: int = MAX_MCMD_LINES):
        self._block: list[bytes] | None = None
        self._max_lines = max_lines

    @property
    def in_block(self) -> bool:
        """True while the lines of an ``mcmd=`` block are arriving."""
        return self._block is not None

    def feed(self, line: bytes) -> Command | None:
        """The command ``line`` completes, or None while a block is still open.

        Raises PMIProtocolError for a malformed line or block, or a block of
        more than ``max_lines`` lines.
        """
        if self._block is None:
            if bytes(line[:5]) == b"mcmd=":
                self._block = [bytes(line)]
                return None
            return parse_line(line)
        self._block.append(bytes(line))
        if bytes(line).rstrip(b"\r") == MCMD_END:
            block, self._block = self._block, None
            return parse_mcmd(block)
        if len(self._block) > self._max_lines:
            first, self._block = self._block[0], None
            raise PMIProtocolError(f"{_show(first)} block longer than {self._max_lines} lines without 'endcmd'")
        return None


def _show(data: bytes, limit: int = 120) -> str:
    text = repr(bytes(data[:limit]))
    return text + ("..." if len(data) > limit else "")


class LineBuffer:
    """Accumulates bytes from a stream and yields complete lines.

    >>> buf = LineBuffer()
    >>> buf.feed(b"cmd=init pmi_ver")
    []
    >>> buf.feed(b"sion=1\\ncmd=get_maxes\\n")
    [b'cmd=init pmi_version=1', b'cmd=get_maxes']
    """

    def __init__(self, max_line: int = MAX_LINE):
        if max_line < 16:
            raise InvalidArgument(f"max_line must be >= 16 bytes, got {max_line}")
        self._max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the lines it completed, without their newlines.

        Raises PMIProtocolError if a line grows past ``max_line`` bytes.
        """
        self._buf += data
        lines = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                break
            if end > self._max_line:
                raise PMIProtocolError(f"PMI line longer than {self._max_line} bytes")
            lines.append(bytes(self._buf[:end]))
            del self._buf[: end + 1]
        if len(self._buf) > self._max_line:
            raise PMIProtocolError(f"PMI line longer than {self._max_line} bytes without a newline")
        return lines

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a whole line."""
        return len(self._buf)
