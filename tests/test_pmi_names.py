"""Multi-line PMI commands (mcmd=spawn), the name service and spawn requests: pure, no sockets."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkmpi.errors import PMIProtocolError
from sparkmpi.pmi import control
from sparkmpi.pmi.space import REPLY_NAMES, JobSpace, SpawnCommand, parse_spawn_block
from sparkmpi.pmi.wire import CommandReader, parse_line, parse_mcmd

# What MPICH 5.0.2 sent for MPI_Comm_spawn(python, ["-c", "print(1)"], maxprocs=2),
# recorded with a probe server (the port name is shortened).
SPAWN_BLOCK = [b"mcmd=spawn", b"nprocs=2", b"execname=/usr/bin/python3", b"totspawns=1", b"spawnssofar=1",
               b"argcnt=2", b"arg1=-c", b"arg2=print(1)", b"preput_num=1",
               b"preput_key_0=PARENT_ROOT_PORT_NAME", b"preput_val_0=tag#0$connentry#2087C0[2]637$",
               b"info_num=0", b"endcmd"]


def cmd(text):
    return parse_line(text.encode())


def replies(out):
    return [(rank, parse_line(line)) for rank, line in out]


def space_of(size, **kwargs):
    space = JobSpace(size, **kwargs)
    for rank in range(size):
        space.admit(rank, rank, "h")
    return space


def test_mcmd_block_parses_with_raw_values():
    command = parse_mcmd(SPAWN_BLOCK)
    assert command.name == "spawn"
    assert command.get("arg2") == "print(1)"
    assert command.get("preput_val_0") == "tag#0$connentry#2087C0[2]637$"  # '#', '$', '[' kept
    assert parse_mcmd([b"mcmd=spawn", b"arg1=x y", b"endcmd"]).get("arg1") == "x y"  # spaces too
    assert parse_mcmd([b"mcmd=spawn", b"arg1=", b"endcmd"]).get("arg1") == ""  # an empty argument


def test_reader_joins_blocks_and_passes_single_lines():
    reader = CommandReader()
    assert reader.feed(b"cmd=get_maxes").name == "get_maxes"
    outs = [reader.feed(line) for line in SPAWN_BLOCK]
    assert outs[:-1] == [None] * (len(SPAWN_BLOCK) - 1) and outs[-1] == parse_mcmd(SPAWN_BLOCK)
    assert not reader.in_block
    assert reader.feed(b"cmd=barrier_in").name == "barrier_in"


@pytest.mark.parametrize("block, fragment", [
    ([b"mcmd=", b"endcmd"], "bad multi-line command name"),
    ([b"mcmd=spawn", b"=x", b"endcmd"], "expected key=value"),
    ([b"mcmd=spawn", b"a b=1", b"endcmd"], "expected key=value"),
    ([b"mcmd=spawn", b"nprocs=2"], "does not end with 'endcmd'"),
    ([b"cmd=spawn", b"endcmd"], "starting with 'mcmd='"),
])
def test_malformed_blocks_say_what_is_wrong(block, fragment):
    with pytest.raises(PMIProtocolError, match=fragment):
        parse_mcmd(block)


def test_reader_caps_a_block_without_end():
    reader = CommandReader(max_lines=10)
    reader.feed(b"mcmd=spawn")
    with pytest.raises(PMIProtocolError, match="longer than 10 lines"):
        for i in range(20):
            reader.feed(b"arg%d=x" % i)
    assert reader.feed(b"cmd=get_maxes").name == "get_maxes"  # the reader starts over


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=12))
def test_garbage_only_ever_raises_the_protocol_error(lines):
    reader = CommandReader(max_lines=8)
    for line in [b"mcmd=spawn", *lines, b"endcmd"]:
        try:
            reader.feed(line.replace(b"\n", b""))
        except PMIProtocolError:
            pass


# -- the name service ------------------------------------------------------------
def test_publish_lookup_unpublish_across_ranks():
    space = space_of(2)
    [(_, reply)] = replies(space.handle(0, cmd("cmd=publish_name service=ocean port=tag#0$x$")))
    assert (reply.name, reply.get("rc")) == ("publish_result", "0")
    [(_, reply)] = replies(space.handle(1, cmd("cmd=lookup_name service=ocean")))
    assert (reply.name, reply.get("rc"), reply.get("port")) == ("lookup_result", "0", "tag#0$x$")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=publish_name service=ocean port=other")))
    assert reply.get("rc") == "-1" and "already published" in reply.get("msg")
    [(_, reply)] = replies(space.handle(1, cmd("cmd=unpublish_name service=ocean")))
    assert (reply.name, reply.get("rc")) == ("unpublish_result", "0")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=lookup_name service=ocean")))
    assert (reply.name, reply.get("rc")) == ("lookup_result", "-1") and "not published" in reply.get("msg")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=unpublish_name service=ocean")))
    assert reply.get("rc") == "-1"


@pytest.mark.parametrize("line, reply_name", [
    ("cmd=publish_name port=p", "publish_result"),
    ("cmd=publish_name service=s", "publish_result"),
    ("cmd=lookup_name", "lookup_result"),
    ("cmd=unpublish_name", "unpublish_result"),
])
def test_name_service_errors_answer_with_the_reply_the_client_waits_for(line, reply_name):
    [(_, reply)] = replies(space_of(1).handle(0, cmd(line)))
    assert reply.name == reply_name and reply.get("rc") == "-1" and reply.get("msg")


def test_names_are_shared_with_a_space_given_the_same_table():
    parent = space_of(1)
    child = space_of(1, names=parent.names)
    parent.handle(0, cmd("cmd=publish_name service=s port=p"))
    [(_, reply)] = replies(child.handle(0, cmd("cmd=lookup_name service=s")))
    assert reply.get("port") == "p"


def test_every_mpich_query_gets_its_own_reply_name_never_an_abort():
    space = space_of(1)
    for query, reply_name in REPLY_NAMES.items():
        if query in ("init", "initack", "fullinit", "barrier_in", "spawn"):
            continue  # served with their own arguments (test_pmi_space.py, below)
        args = {"put": " key=k value=v", "get": " key=k"}.get(query, "")
        out = space.handle(0, cmd(f"cmd={query}{args}"))
        [(_, reply)] = replies(out)
        assert reply.name == reply_name, query
    assert space.failure is None


# -- spawn requests --------------------------------------------------------------
def test_spawn_block_fields():
    command, total, so_far, preput = parse_spawn_block(parse_mcmd(SPAWN_BLOCK))
    assert command == SpawnCommand("/usr/bin/python3", 2, ("-c", "print(1)"), ())
    assert (total, so_far) == (1, 1)
    assert preput == (("PARENT_ROOT_PORT_NAME", "tag#0$connentry#2087C0[2]637$"),)


@pytest.mark.parametrize("change, fragment", [
    ((b"nprocs=2", b"nprocs=0"), "nprocs must be"),
    ((b"argcnt=2", b"argcnt=3"), "arg3 is missing"),
    ((b"argcnt=2", b"argcnt=x"), "argcnt must be a count"),
    ((b"spawnssofar=1", b"spawnssofar=2"), "spawnssofar=2 outside"),
])
def test_bad_spawn_blocks_name_the_field(change, fragment):
    block = [change[1] if line == change[0] else line for line in SPAWN_BLOCK]
    with pytest.raises(PMIProtocolError, match=fragment):
        parse_spawn_block(parse_mcmd(block))


def _block(nprocs, execname, so_far, total, args=(), info=(), preput=()):
    lines = [b"mcmd=spawn", b"nprocs=%d" % nprocs, b"execname=" + execname.encode(), b"totspawns=%d" % total,
             b"spawnssofar=%d" % so_far, b"argcnt=%d" % len(args)]
    lines += [b"arg%d=%s" % (i + 1, a.encode()) for i, a in enumerate(args)]
    if preput:
        lines += [b"preput_num=%d" % len(preput)]
        for i, (k, v) in enumerate(preput):
            lines += [b"preput_key_%d=%s" % (i, k.encode()), b"preput_val_%d=%s" % (i, v.encode())]
    lines += [b"info_num=%d" % len(info)]
    for i, (k, v) in enumerate(info):
        lines += [b"info_key_%d=%s" % (i, k.encode()), b"info_val_%d=%s" % (i, v.encode())]
    return parse_mcmd(lines + [b"endcmd"])


def test_spawn_multiple_waits_for_the_last_block_then_queues_one_request():
    space = space_of(2, spawn_enabled=True)
    assert space.handle(1, _block(1, "a", 1, 2, args=("x",), preput=(("K", "V"),))) == []
    assert space.spawn_requests == []
    assert space.handle(1, _block(2, "b", 2, 2, info=(("wdir", "/tmp"),))) == []
    [request] = space.spawn_requests
    assert request.parent_rank == 1 and request.total == 3 and request.preput == (("K", "V"),)
    assert request.commands[1] == SpawnCommand("b", 2, (), (("wdir", "/tmp"),))
    [(_, reply)] = replies(space.spawn_started(1, 3))
    assert (reply.name, reply.get("rc"), reply.get("errcodes")) == ("spawn_result", "0", "0,0,0")
    [(_, reply)] = replies(space.spawn_started(1, 3, error="no such program"))
    assert reply.get("rc") == "-1" and reply.get("msg") == "no such program"


def test_spawn_not_enabled_fails_in_the_rank_only():
    space = space_of(1)
    assert space.handle(0, _block(1, "a", 1, 2)) == []
    [(_, reply)] = replies(space.handle(0, _block(1, "b", 2, 2)))
    assert reply.name == "spawn_result" and reply.get("rc") == "-1" and "not served" in reply.get("msg")
    assert space.failure is None and space.spawn_requests == []


def test_spawn_blocks_out_of_order_are_a_protocol_error():
    space = space_of(1, spawn_enabled=True)
    with pytest.raises(PMIProtocolError, match="block 2 of 2 arrived after 0"):
        space.handle(0, _block(1, "b", 2, 2))


def test_abort_keeps_the_exit_code():
    space = space_of(2)
    out = space.handle(1, cmd("cmd=abort exitcode=7 message=bye"))
    assert {rank for rank, _ in out} == {0, 1} and all(control.ABORT in line.decode() for _, line in out)
    assert (space.failure.rank, space.failure.exit_code) == (1, 7)
