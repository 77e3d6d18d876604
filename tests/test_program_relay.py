"""The decisions of an external program's relay, with no sockets (sparkmpi.launch.program_relay)."""

import pytest

from sparkmpi.launch import channel
from sparkmpi.launch import program_relay as pr
from sparkmpi.launch.programs import describe_exit, encode_records
from sparkmpi.pmi import control
from sparkmpi.pmi.wire import parse_line


def state(**kwargs):
    return pr.ProgramRelayState("job1", 1, "rank 1 (partition 1 on h)", "h", **kwargs)


def test_pmi_lines_pass_both_ways():
    relay = state()
    assert relay.handle(pr.RankPMILine(b"cmd=get_maxes")) == [pr.ToServer(b"cmd=get_maxes\n")]
    assert relay.handle(pr.ServerLine(b"cmd=maxes rc=0")) == [pr.ToRankPMI(b"cmd=maxes rc=0")]


def test_clean_exit_reports_done_then_the_status():
    relay = state()
    actions = relay.handle(pr.RankExited(0))
    assert actions[0] == pr.ToServer(control.bare_line(control.DONE))
    assert actions[1].kind == channel.EXITED and actions[1].payload["status"] == 0
    assert actions[1].payload["stopped"] is None and isinstance(actions[2], pr.Finish)
    assert relay.finished and relay.handle(pr.RankPMILine(b"cmd=x")) == []


def test_failing_exit_reports_the_failure_with_stderr():
    actions = state().handle(pr.RankExited(-11, "boom"))
    failed = parse_line(actions[0].line)
    assert failed.name == control.FAILED
    text = control.decode_text(failed)
    assert "rank 1 (partition 1 on h) exited with status -11 (killed by SIGSEGV)" in text and "boom" in text
    assert actions[1].payload["status"] == -11


def test_an_abort_stops_the_program_once_and_its_exit_is_not_a_new_failure():
    relay = state()
    abort = control.text_line(control.ABORT, "rank 0 called MPI_Abort").rstrip(b"\n")
    assert relay.handle(pr.ServerLine(abort)) == [pr.StopRank()]
    assert relay.handle(pr.ServerLine(abort)) == []  # asked once
    assert relay.handle(pr.ServerLine(b"cmd=barrier_out rc=0")) == []  # PMI lines no longer reach it
    [exited, finish] = relay.handle(pr.RankExited(-15))
    assert "MPI_Abort" in exited.payload["stopped"] and isinstance(finish, pr.Finish)


def spawned(relay):
    line = control.spawn_line("kids", "tok", 1, [{"execname": "x", "nprocs": 1, "args": [], "info": []}])
    assert relay.handle(pr.ServerLine(line.rstrip(b"\n"))) == [pr.StartChildren(line.rstrip(b"\n"))]
    return relay


def test_a_clean_exit_is_held_until_the_children_it_spawned_have_ended():
    relay = spawned(state())
    assert relay.handle(pr.RankExited(0)) == [] and not relay.finished
    assert relay.handle(pr.RankOutput(1, b"child\n"))[0].kind == channel.OUTPUT  # the children's output goes on
    done, exited, finish = relay.handle(pr.ChildrenExited())
    assert done == pr.ToServer(control.bare_line(control.DONE)) and exited.payload["status"] == 0
    assert isinstance(finish, pr.Finish) and relay.finished


def test_an_abort_while_the_exit_is_held_stops_the_children_and_ends():
    relay = spawned(state())
    relay.handle(pr.RankExited(0))
    abort = control.text_line(control.ABORT, "a job it spawned failed").rstrip(b"\n")
    stop, exited, finish = relay.handle(pr.ServerLine(abort))
    assert stop == pr.StopRank() and "spawned failed" in exited.payload["stopped"]
    assert isinstance(finish, pr.Finish)


def test_a_failing_exit_is_not_held_for_the_children():
    relay = spawned(state())
    failed, exited, finish = relay.handle(pr.RankExited(3))
    assert parse_line(failed.line).name == control.FAILED and exited.payload["status"] == 3
    assert relay.handle(pr.ChildrenExited()) == []  # finished already


def test_a_lost_driver_fails_the_job_and_stops_the_program():
    actions = state().handle(pr.DriverClosed())
    assert parse_line(actions[0].line).name == control.FAILED and actions[1] == pr.StopRank()


def test_a_lost_server_stops_the_program_and_sends_it_nothing_more():
    relay = state()
    assert relay.handle(pr.ServerClosed()) == [pr.StopRank()]
    assert relay.handle(pr.RankPMILine(b"cmd=barrier_in")) == []


def test_output_goes_to_the_driver_or_is_kept_for_pipe():
    [report] = state().handle(pr.RankOutput(1, b"hi\n"))
    assert report == pr.Report(channel.OUTPUT, {"stream": 1, "data": b"hi\n"})
    assert state(keep_stdout=True).handle(pr.RankOutput(1, b"hi\n")) == [pr.KeepOutput(b"hi\n")]
    assert state(keep_stdout=True).handle(pr.RankOutput(2, b"e"))[0].kind == channel.OUTPUT
    assert state().handle(pr.DriverInput(b"x")) == [pr.ToStdin(b"x")]


def test_unknown_events_are_a_bug():
    with pytest.raises(TypeError, match="cannot handle"):
        state().handle(object())


@pytest.mark.parametrize("status, code, words", [
    (0, 0, "exited with code 0"), (3, 3, "exited with code 3"),
    (-11, 11, "signal 11 (SIGSEGV)"), (None, 1, "without reporting"),
])
def test_exit_statuses_as_mpiexec_reports_them(status, code, words):
    got_code, got_words = describe_exit(status)
    assert got_code == code and words in got_words


def test_record_framing():
    import numpy as np

    assert b"".join(encode_records([1, "a b", b"raw\n"], binary=False)) == b"1\na b\nraw\n"
    framed = b"".join(encode_records([np.arange(2, dtype=np.int32), b"xyz"], binary=True))
    assert framed == (8).to_bytes(8, "little") + np.arange(2, dtype=np.int32).tobytes() + \
        (3).to_bytes(8, "little") + b"xyz"
    with pytest.raises(ValueError, match="one line"):
        list(encode_records(["a\nb"], binary=False))
    with pytest.raises(TypeError, match="bytes or NumPy"):
        list(encode_records([1.5], binary=True))
