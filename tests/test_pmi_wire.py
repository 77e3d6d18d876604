"""The PMI-1 wire format: pure functions over bytes, no sockets."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkmpi.errors import PMIProtocolError
from sparkmpi.pmi.wire import MAX_LINE, Command, LineBuffer, format_command, parse_line

# Lines MPICH 5's simple PMI client sends (see FACTS.md and MPICH's pmi_v1.c).
MPICH_LINES = [
    b"cmd=init pmi_version=1 pmi_subversion=1",
    b"cmd=get_maxes",
    b"cmd=get_appnum",
    b"cmd=get_my_kvsname",
    b"cmd=get kvsname=sparkmpi_0123 key=PMI_process_mapping",
    b"cmd=put kvsname=sparkmpi_0123 key=-allgather-shm-1-0-seg-1/9 value=0123abcdef",
    b"cmd=barrier_in",
    b"cmd=finalize",
    b"cmd=initack pmiid=3",
]


@pytest.mark.parametrize("line", MPICH_LINES)
def test_mpich_lines_parse_and_round_trip(line):
    command = parse_line(line + b"\n")
    assert command.name == line.split(b" ")[0][4:].decode()
    assert command.encode() == line + b"\n"
    assert parse_line(command.encode()) == command


def test_parse_gives_name_and_ordered_args():
    command = parse_line(b"cmd=put kvsname=k key=a value=b\n")
    assert command == Command("put", (("kvsname", "k"), ("key", "a"), ("value", "b")))
    assert command.get("key") == "a"
    assert command.get("missing", "x") == "x"


def test_escaped_spaces_and_backslashes_round_trip():
    line = format_command("get_result", {"rc": 0, "value": "a b\\c  d"})
    assert line == b"cmd=get_result rc=0 value=a\\ b\\\\c\\ \\ d\n"
    assert parse_line(line).get("value") == "a b\\c  d"


def test_abort_message_is_rest_of_line_unescaped():
    command = parse_line(b"cmd=abort exitcode=7 message=application called MPI_Abort(MPI_COMM_WORLD, 7)")
    assert command.require_int("exitcode") == 7
    assert command.get("message") == "application called MPI_Abort(MPI_COMM_WORLD, 7)"


def test_bare_keys_and_extra_spaces():
    command = parse_line(b"cmd=mput   flag  key=v   ")
    assert command.args == (("flag", None), ("key", "v"))


@pytest.mark.parametrize("bad, fragment", [
    (b"", "starting with 'cmd='"),
    (b"hello world", "starting with 'cmd='"),
    (b"cmd= key=v", "value after cmd="),
    (b"cmd=put key=", "value after key="),
    (b"cmd=put k!y=1", "invalid character '!'"),
    (b"cmd=put =1", "expected a key"),
    (b"cmd=put key=\xff", "non-ASCII"),
    (b"cmd=put key=a\x00b", "NUL"),
])
def test_malformed_lines_raise_protocol_error_naming_the_problem(bad, fragment):
    with pytest.raises(PMIProtocolError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_line(bad)


def test_require_names_the_missing_key_and_bad_integers():
    command = parse_line(b"cmd=initack pmiid=x")
    with pytest.raises(PMIProtocolError, match="pmiid must be an integer"):
        command.require_int("pmiid")
    with pytest.raises(PMIProtocolError, match="needs key="):
        command.require("key")


def test_format_rejects_what_the_wire_cannot_carry():
    with pytest.raises(ValueError, match="newline"):
        format_command("put", {"value": "a\nb"})
    with pytest.raises(ValueError, match="bad PMI key"):
        format_command("put", {"bad key": "v"})
    with pytest.raises(ValueError, match="command name"):
        format_command("", {})


def test_parse_line_wants_bytes():
    with pytest.raises(TypeError, match="bytes"):
        parse_line("cmd=init")


STREAM = b"".join(line + b"\n" for line in MPICH_LINES)


def test_line_buffer_whole_stream():
    assert LineBuffer().feed(STREAM) == MPICH_LINES


def test_line_buffer_byte_by_byte():
    buf = LineBuffer()
    lines = []
    for i in range(len(STREAM)):
        lines += buf.feed(STREAM[i:i + 1])
    assert lines == MPICH_LINES
    assert buf.pending == 0


def test_line_buffer_keeps_trailing_partial_line():
    buf = LineBuffer()
    assert buf.feed(STREAM + b"cmd=get_ma") == MPICH_LINES
    assert buf.pending == len(b"cmd=get_ma")
    assert buf.feed(b"xes\n") == [b"cmd=get_maxes"]


def test_line_buffer_caps_lines_without_newline():
    buf = LineBuffer(max_line=64)
    with pytest.raises(PMIProtocolError, match="longer than 64 bytes"):
        buf.feed(b"cmd=put value=" + b"x" * 100)
    buf = LineBuffer(max_line=64)
    with pytest.raises(PMIProtocolError, match="longer than 64 bytes"):
        buf.feed(b"cmd=put value=" + b"x" * 100 + b"\n")
    assert MAX_LINE >= 2048  # a 1024-byte value plus key must fit


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_garbage_only_raises_protocol_error(data):
    try:
        command = parse_line(data)
    except PMIProtocolError:
        return
    assert command.name  # anything accepted has a command name


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_fuzz_line_buffer_split_anywhere(data, step):
    whole = LineBuffer(max_line=1 << 20).feed(data)
    buf = LineBuffer(max_line=1 << 20)
    pieces = []
    for i in range(0, len(data), step):
        pieces += buf.feed(data[i:i + step])
    assert pieces == whole


_key = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-/", min_size=1, max_size=20)
_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
# abort's message is special (rest of line, unescaped, as MPICH writes it).
@given(_key.filter(lambda k: k not in ("cmd", "abort")), st.lists(st.tuples(_key.filter(lambda k: k != "cmd"), _value), max_size=6))
def test_fuzz_format_then_parse_round_trips(name, args):
    command = parse_line(format_command(name, args))
    assert command == Command(name, tuple(args))
