"""The job's key space and barrier as a state machine (no I/O)."""

import pytest

from sparkmpi.errors import PMIProtocolError
from sparkmpi.pmi import control
from sparkmpi.pmi.space import JobSpace, new_kvsname, process_mapping
from sparkmpi.pmi.wire import parse_line


def cmd(text):
    return parse_line(text.encode())


def replies(out):
    return [(rank, parse_line(line)) for rank, line in out]


def admitted(space, *ranks, host="h"):
    """Admit each rank (partition = rank) and check it is welcomed first."""
    for rank in ranks:
        out = space.admit(rank, rank, host)
        assert out[0] == (rank, control.bare_line(control.WELCOME))
    return space


def aborts(out):
    """{rank: (reason, stacks flag)} for the abort lines in ``out``; fails on any other line."""
    found = {}
    for rank, reply in replies(out):
        assert reply.name == control.ABORT, reply
        found[rank] = (control.decode_text(reply), reply.get("stacks"))
    return found


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
    assert space.admit(0, 0, "node-a") == [(0, control.bare_line(control.WELCOME))]
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
    [(r1, welcome), (r, reply)] = replies(space.admit(1, 1, "node-a"))
    assert (r1, welcome.name) == (1, control.WELCOME)
    assert r == 0 and reply.get("value") == "(vector,(0,1,2))"
    [(_, reply)] = replies(space.handle(1, cmd(f"cmd=get kvsname={space.kvsname} key=PMI_process_mapping")))
    assert reply.get("value") == "(vector,(0,1,2))"
    [(_, reply)] = replies(space.handle(1, cmd(f"cmd=get kvsname={space.kvsname} key=PMI_hwloc_xmlfile")))
    assert reply.name == "get_result" and reply.get("rc") == "-1" and reply.get("found") == "FALSE"


def test_put_get_and_barrier():
    space = JobSpace(3)
    for rank in range(3):
        space.admit(rank, rank, f"node-{rank}")
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
    space = admitted(JobSpace(1), 0)
    [(_, reply)] = replies(space.handle(0, cmd(f"cmd=put key=k value={'v' * 1025}")))
    assert reply.get("rc") == "-1" and "value longer" in reply.get("msg")
    [(_, reply)] = replies(space.handle(0, cmd(f"cmd=put key={'k' * 65} value=v")))
    assert reply.get("rc") == "-1" and "key longer" in reply.get("msg")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=get kvsname=other key=k")))
    assert reply.get("rc") == "-1" and "unknown kvsname" in reply.get("msg")


def test_initack_sends_size_and_rank():
    space = admitted(JobSpace(4), 2)
    [(_, line)] = space.handle(2, cmd("cmd=initack pmiid=2"))
    assert line == b"cmd=initack\ncmd=set size=4\ncmd=set rank=2\ncmd=set debug=0\n"
    with pytest.raises(PMIProtocolError, match="pmiid=3"):
        space.handle(2, cmd("cmd=initack pmiid=3"))


def test_unknown_and_unsupported_commands_get_error_replies():
    space = admitted(JobSpace(1), 0)
    [(_, reply)] = replies(space.handle(0, cmd("cmd=frobnicate x=1")))
    assert reply.name == "error" and reply.get("rc") == "-1" and "frobnicate" in reply.get("msg")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=singinit pmi_version=1 pmi_subversion=1")))
    assert reply.name == "singinit_info" and reply.get("rc") == "-1" and "singinit" in reply.get("msg")
    [(_, reply)] = replies(space.handle(0, cmd("cmd=init pmi_version=2 pmi_subversion=0")))
    assert reply.get("rc") == "-1" and "version 1" in reply.get("msg")


def test_mpi_abort_fails_the_job_aborts_every_rank_and_silences_it():
    space = admitted(JobSpace(2), 0, 1)
    out = aborts(space.handle(1, cmd("cmd=abort exitcode=7 message=bad input file")))
    assert sorted(out) == [0, 1]
    assert "MPI_Abort with exit code 7: bad input file" in out[0][0] and out[0][1] == "0"
    assert space.failure.rank == 1
    assert "MPI_Abort with exit code 7: bad input file" in space.failure.cause
    assert space.handle(0, cmd("cmd=get_maxes")) == []
    assert space.abort(0, "later") == [] and space.failure.rank == 1


def test_registration_rules():
    space = admitted(JobSpace(2), 0)
    with pytest.raises(PMIProtocolError, match="before registering"):
        space.handle(1, cmd("cmd=get_maxes"))
    space.handle(0, cmd("cmd=barrier_in"))
    with pytest.raises(PMIProtocolError, match="same barrier twice"):
        space.handle(0, cmd("cmd=barrier_in"))


def test_progress_descriptions():
    space = JobSpace(2)
    assert space.describe_rank(0) == "never connected"
    admitted(space, 0)
    space.handle(0, cmd("cmd=init pmi_version=1 pmi_subversion=1"))
    assert "running" in space.describe_rank(0)
    space.handle(0, cmd("cmd=barrier_in"))
    assert space.describe_rank(0) == "waiting in a PMI barrier"
    admitted(space, 1)
    assert space.relay_done(1) == []
    assert space.pending_ranks() == [0]
    assert space.status() == "rank 0 (partition 0 on h): waiting in a PMI barrier; rank 1 (partition 1 on h): finished"


# -- the job's life: admission, end, failure ------------------------------------

def test_admission_refuses_out_of_range_duplicate_and_nameless_relays():
    space = JobSpace(2)
    with pytest.raises(PMIProtocolError, match=r"rank 2 is outside 0..1"):
        space.admit(2, 2, "h")
    with pytest.raises(PMIProtocolError, match=r"rank -1 is outside 0..1"):
        space.admit(-1, 0, "h")
    with pytest.raises(PMIProtocolError, match="without a host name"):
        space.admit(0, 0, "")
    with pytest.raises(PMIProtocolError, match="partition -1"):
        space.admit(0, -1, "h")
    assert not space.ranks[0].registered  # a refused relay leaves no trace
    admitted(space, 0)
    with pytest.raises(PMIProtocolError, match=f"rank 0 of job {space.kvsname} is already connected"):
        space.admit(0, 0, "other-host")
    assert space.where(0) == "rank 0 (partition 0 on h)"  # the duplicate did not overwrite the first


def test_admission_records_partition_and_host_for_messages():
    space = JobSpace(3)
    space.admit(1, 7, "node-b")
    assert space.where(1) == "rank 1 (partition 7 on node-b)"
    assert space.where(0) == "rank 0"  # not admitted yet: nothing more is known
    assert space.where(None) == "the job"
    assert space.connected_ranks() == [1]


def test_no_admission_after_a_failure_or_once_closed():
    space = admitted(JobSpace(2), 0)
    space.relay_failed(0, "rank 0 raised ValueError: bad\nValueError: bad input")
    with pytest.raises(PMIProtocolError, match="has already failed: ValueError: bad input$"):
        space.admit(1, 1, "h")
    assert not space.ranks[1].registered
    closed = JobSpace(1)
    closed.close()
    with pytest.raises(PMIProtocolError, match=f"job {closed.kvsname} is closed"):
        closed.admit(0, 0, "h")


def test_all_done_only_when_every_relay_reported_done():
    space = admitted(JobSpace(2), 0, 1)
    assert space.handle(0, parse_line(control.bare_line(control.DONE))) == []
    assert not space.all_done and space.pending_ranks() == [1]
    assert space.relay_done(1) == []
    assert space.all_done and space.failure is None


def test_failed_report_fails_the_job_and_aborts_every_connected_rank():
    space = admitted(JobSpace(3), 0, 1, 2)
    out = aborts(space.handle(1, parse_line(control.text_line(control.FAILED, "rank 1 raised KeyError: 'x'"))))
    assert out == {r: ("rank 1 raised KeyError: 'x'", "0") for r in range(3)}
    assert (space.failure.rank, space.failure.cause) == (1, "rank 1 raised KeyError: 'x'")


def test_first_failure_wins_and_later_reports_are_kept():
    space = admitted(JobSpace(3), 0, 1, 2)
    assert aborts(space.relay_failed(2, "first"))
    assert space.relay_failed(0, "stack of rank 0") == []
    assert space.relay_lost(1, "connection closed") == []
    assert space.abort(None, "the job timed out", dump_stacks=True) == []
    assert space.relay_broke(0, "garbage") == []
    assert (space.failure.rank, space.failure.cause) == (2, "first")
    assert space.reports == {0: "stack of rank 0"}
    # A PMI command after the failure gets no reply, a relay report still counts.
    assert space.handle(0, cmd("cmd=get_maxes")) == []
    assert space.handle(1, parse_line(control.text_line(control.FAILED, "stack of rank 1"))) == []
    assert space.reports[1] == "stack of rank 1"


def test_abort_goes_to_connected_ranks_only_with_the_stacks_flag():
    space = admitted(JobSpace(4), 0, 1, 2)  # rank 3 never connects
    space.relay_done(1)
    space.relay_lost(1, "connection closed")  # rank 1 finished and left
    out = aborts(space.abort(None, "the job timed out after 5 s", dump_stacks=True))
    assert out == {0: ("the job timed out after 5 s", "1"), 2: ("the job timed out after 5 s", "1")}
    assert space.failure.rank is None


def test_a_relay_lost_before_done_fails_the_job():
    space = JobSpace(2)
    space.admit(0, 0, "node-a")
    space.admit(1, 5, "node-b")
    out = aborts(space.relay_lost(1, "connection reset"))
    assert out == {0: ("lost the relay of rank 1 (partition 5 on node-b): connection reset", "0")}
    assert space.failure.rank == 1


def test_a_relay_lost_after_done_or_after_close_is_no_failure():
    space = admitted(JobSpace(2), 0, 1)
    space.relay_done(0)
    assert space.relay_lost(0, "connection closed") == []
    assert space.failure is None and space.connected_ranks() == [1]
    space.close()
    assert space.relay_lost(1, "the job was closed") == []
    assert space.failure is None and space.connected_ranks() == []


def test_malformed_lines_fail_the_job_naming_the_relay():
    space = admitted(JobSpace(2), 0, 1)
    out = aborts(space.relay_broke(1, "no cmd= in line"))
    assert out[0][0] == "rank 1 (partition 1 on h) sent a malformed PMI command: no cmd= in line"
    other = admitted(JobSpace(1), 0)
    with pytest.raises(PMIProtocolError, match="unexpected control command sparkmpi-hello from rank 0"):
        other.handle(0, cmd("cmd=sparkmpi-hello job=x"))
    with pytest.raises(PMIProtocolError, match="reason64 is not base64"):
        other.handle(0, cmd("cmd=sparkmpi-failed reason64=***"))
