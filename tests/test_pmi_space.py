"""The job's key space and barrier as a state machine (no I/O)."""

import pytest

from sparkmpi.errors import PMIProtocolError
from sparkmpi.pmi.space import JobSpace, new_kvsname, process_mapping
from sparkmpi.pmi.wire import parse_line


def cmd(text):
    return parse_line(text.encode())


def replies(out):
    return [(rank, parse_line(line)) for rank, line in out]


def test_kvsnames_are_fresh():
    assert len({new_kvsname() for _ in range(100)}) == 100


@pytest.mark.parametrize("hosts, expected", [
    (["a"], "(vector,(0,1,1))"),
    (["a", "a", "a", "a"], "(vector,(0,1,4))"),
    (["a", "a", "b", "b"], "(vector,(0,1,2),(1,1,2))"),
    (["a", "b", "a"], "(vector,(0,1,1),(1,1,1),(0,1,1))"),
])
def test_process_mapping(hosts, expected):
    assert process_mapping(hosts) == expected


def test_process_mapping_needs_hosts():
    with pytest.raises(ValueError, match="at least one"):
        process_mapping([])


def test_size_validated():
    with pytest.raises(ValueError, match="positive number of ranks"):
        JobSpace(0)


def test_mpich_init_sequence_for_two_ranks_on_one_node():
    space = JobSpace(2)
    assert space.register(0, "node-a") == []
    [(r, reply)] = replies(space.handle(0, cmd("cmd=init pmi_version=1 pmi_subversion=1")))
    assert (r, reply.name, reply.get("rc")) == (0, "response_to_init", "0")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=get_maxes")))
    assert reply.name == "maxes" and int(reply.get("vallen_max")) >= 1024
    [(_, reply)] = replies(space.handle(0, cmd("cmd=get_appnum")))
    assert reply.get("appnum") == "0"
    [(_, reply)] = replies(space.handle(0, cmd("cmd=get_my_kvsname")))
    assert reply.get("kvsname") == space.kvsname
    [(_, reply)] = replies(space.handle(0, cmd("cmd=get_universe_size")))
    assert reply.get("size") == "2"
    # The node map waits until every rank has said where it runs.
    assert space.handle(0, cmd(f"cmd=get kvsname={space.kvsname} key=PMI_process_mapping")) == []
    [(r, reply)] = replies(space.register(1, "node-a"))
    assert r == 0 and reply.get("value") == "(vector,(0,1,2))"
    [(_, reply)] = replies(space.handle(1, cmd(f"cmd=get kvsname={space.kvsname} key=PMI_process_mapping")))
    assert reply.get("value") == "(vector,(0,1,2))"
    [(_, reply)] = replies(space.handle(1, cmd(f"cmd=get kvsname={space.kvsname} key=PMI_hwloc_xmlfile")))
    assert reply.name == "get_result" and reply.get("rc") == "-1" and reply.get("found") == "FALSE"


def test_put_get_and_barrier():
    space = JobSpace(3)
    for rank in range(3):
        space.register(rank, f"node-{rank}")
    for rank in range(3):
        for seg in range(9):  # a UCX address arrives as 9 segments of 1024 bytes
            out = replies(space.handle(rank, cmd(f"cmd=put kvsname={space.kvsname} "
                                                 f"key=-allgather-{rank}-seg-{seg}/9 value={'x' * 1024}")))
            assert out[0][1].name == "put_result" and out[0][1].get("rc") == "0"
    assert space.handle(0, cmd("cmd=barrier_in")) == []
    assert space.handle(1, cmd("cmd=barrier_in")) == []
    out = replies(space.handle(2, cmd("cmd=barrier_in")))
    assert sorted(r for r, _ in out) == [0, 1, 2]
    assert all(reply.name == "barrier_out" for _, reply in out)
    [(_, reply)] = replies(space.handle(2, cmd(f"cmd=get kvsname={space.kvsname} key=-allgather-0-seg-8/9")))
    assert reply.get("value") == "x" * 1024
    # A second barrier works the same way.
    space.handle(0, cmd("cmd=barrier_in"))
    space.handle(1, cmd("cmd=barrier_in"))
    assert len(space.handle(2, cmd("cmd=barrier_in"))) == 3


def test_put_limits_and_wrong_kvsname():
    space = JobSpace(1)
    space.register(0, "h")
    [(_, reply)] = replies(space.handle(0, cmd(f"cmd=put key=k value={'v' * 1025}")))
    assert reply.get("rc") == "-1" and "value longer" in reply.get("msg")
    [(_, reply)] = replies(space.handle(0, cmd(f"cmd=put key={'k' * 65} value=v")))
    assert reply.get("rc") == "-1" and "key longer" in reply.get("msg")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=get kvsname=other key=k")))
    assert reply.get("rc") == "-1" and "unknown kvsname" in reply.get("msg")


def test_initack_sends_size_and_rank():
    space = JobSpace(4)
    space.register(2, "h")
    [(_, line)] = space.handle(2, cmd("cmd=initack pmiid=2"))
    assert line == b"cmd=initack\ncmd=set size=4\ncmd=set rank=2\ncmd=set debug=0\n"
    with pytest.raises(PMIProtocolError, match="pmiid=3"):
        space.handle(2, cmd("cmd=initack pmiid=3"))


def test_unknown_and_unsupported_commands_get_error_replies():
    space = JobSpace(1)
    space.register(0, "h")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=frobnicate x=1")))
    assert reply.name == "error" and reply.get("rc") == "-1" and "frobnicate" in reply.get("msg")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=spawn")))
    assert reply.name == "spawn_result" and reply.get("rc") == "-1"
    [(_, reply)] = replies(space.handle(0, cmd("cmd=init pmi_version=2 pmi_subversion=0")))
    assert reply.get("rc") == "-1" and "version 1" in reply.get("msg")


def test_abort_records_first_failure_and_silences_the_job():
    space = JobSpace(2)
    space.register(0, "h")
    space.register(1, "h")
    assert space.handle(1, cmd("cmd=abort exitcode=7 message=bad input file")) == []
    assert space.failure.rank == 1
    assert "MPI_Abort with exit code 7: bad input file" in space.failure.cause
    assert space.handle(0, cmd("cmd=get_maxes")) == []
    assert space.fail(0, "later") is False and space.failure.rank == 1


def test_registration_rules():
    space = JobSpace(2)
    with pytest.raises(PMIProtocolError, match="outside 0..1"):
        space.register(2, "h")
    space.register(0, "h")
    with pytest.raises(PMIProtocolError, match="already connected"):
        space.register(0, "h")
    with pytest.raises(PMIProtocolError, match="before registering"):
        space.handle(1, cmd("cmd=get_maxes"))
    space.handle(0, cmd("cmd=barrier_in"))
    with pytest.raises(PMIProtocolError, match="same barrier twice"):
        space.handle(0, cmd("cmd=barrier_in"))


def test_progress_descriptions():
    space = JobSpace(2)
    assert space.describe_rank(0) == "never connected"
    space.register(0, "h")
    space.handle(0, cmd("cmd=init pmi_version=1 pmi_subversion=1"))
    assert "running" in space.describe_rank(0)
    space.handle(0, cmd("cmd=barrier_in"))
    assert space.describe_rank(0) == "waiting in a PMI barrier"
    space.mark_done(1)
    assert space.pending_ranks() == [0]
