"""The relay's decisions (sparkmpi.launch.relay.RelayState), without sockets, Spark or ranks."""

from __future__ import annotations

import pytest

from sparkmpi.launch import channel, relay
from sparkmpi.launch.relay import (DriverClosed, DriverFrame, DumpStacks, Fail, Finish, Phase, RankExited,
                                   RankFrame, RankOutput, RankPMILine, RelayState, ServerClosed, ServerLine,
                                   StopRank, ToDriver, ToRank, ToRankPMI, ToServer)
from sparkmpi.pmi import control
from sparkmpi.pmi.wire import parse_line


def _state() -> RelayState:
    return RelayState("kvs_1", 1, "rank 1 (partition 1 on hostA)")


def _started() -> RelayState:
    state = _state()
    actions = state.handle(RankFrame(channel.STARTED, channel.encode(1), 1))
    assert [type(a) for a in actions] == [ToDriver] and actions[0].kind == channel.STARTED
    assert state.phase is Phase.IDLE
    return state


def _failure(actions) -> str:
    assert isinstance(actions[-1], Fail), actions
    return actions[-1].cause


def _reported(actions) -> str:
    """The FAILED text the relay sends to the PMI server."""
    lines = [a.line for a in actions if isinstance(a, ToServer)]
    assert len(lines) == 1, actions
    command = parse_line(lines[0].rstrip(b"\n"))
    assert command.name == control.FAILED
    return control.decode_text(command)


def test_pmi_lines_pass_both_ways_with_the_newline_the_server_needs():
    state = _state()
    assert state.handle(RankPMILine(b"cmd=init pmi_version=1")) == [ToServer(b"cmd=init pmi_version=1\n")]
    assert state.handle(ServerLine(b"cmd=response_to_init rc=0")) == [ToRankPMI(b"cmd=response_to_init rc=0")]


def test_a_call_goes_to_the_rank_and_its_result_to_the_driver():
    state = _started()
    frame = channel.encode({"id": 1})
    assert state.handle(DriverFrame(channel.CALL, frame)) == [ToRank(channel.CALL, frame)]
    assert state.phase is Phase.CALLING
    result = channel.encode({"id": 1, "value": 42})
    assert state.handle(RankFrame(channel.RESULT, result)) == [ToDriver(channel.RESULT, result)]
    assert state.phase is Phase.IDLE and state.calls_done == 1


def test_output_is_forwarded_with_its_stream():
    state = _started()
    (action,) = state.handle(RankOutput(2, b"warning\n"))
    assert action.kind == channel.OUTPUT
    assert channel.decode(action.segments) == {"stream": 2, "data": b"warning\n"}


def test_close_reports_done_to_the_server_then_finishes():
    state = _started()
    assert state.handle(DriverFrame(channel.CLOSE, channel.encode(None)))[0].kind == channel.CLOSE
    actions = state.handle(RankFrame(channel.CLOSED, channel.encode(7)))
    assert actions[0] == ToServer(control.bare_line(control.DONE))
    assert actions[1].kind == channel.CLOSED and isinstance(actions[2], Finish)
    assert state.finished and state.handle(RankPMILine(b"cmd=x")) == []


def test_a_rank_error_is_reported_with_its_traceback_and_the_call_number():
    state = _started()
    state.handle(DriverFrame(channel.CALL, channel.encode({})))
    error = {"type": "ZeroDivisionError", "message": "division by zero", "traceback": "Traceback ...line 3"}
    actions = state.handle(RankFrame(channel.ERROR, channel.encode(error), error))
    cause = _failure(actions)
    assert cause == _reported(actions)
    assert "rank 1 (partition 1 on hostA) raised ZeroDivisionError: division by zero (in call 1)" in cause
    assert "Traceback ...line 3" in cause
    assert StopRank() in actions and state.phase is Phase.FAILED


@pytest.mark.parametrize("prepare, where", [
    (lambda s: None, "before MPI started"),
    (lambda s: s.handle(RankFrame(channel.STARTED, [], 1)), "between calls (after 0)"),
    (lambda s: (s.handle(RankFrame(channel.STARTED, [], 1)), s.handle(DriverFrame(channel.CALL, []))),
     "before returning results (in call 1)"),
])
def test_a_rank_that_exits_is_reported_with_where_it_was(prepare, where):
    state = _state()
    prepare(state)
    actions = state.handle(RankExited(-9, "last words"))
    cause = _failure(actions)
    assert f"exited with status -9 (killed by SIGKILL) {where}" in cause
    assert "its stderr ended with:\nlast words" in cause and cause == _reported(actions)
    assert StopRank() not in actions   # it is gone already


def test_an_abort_stops_the_rank_without_reporting_back_and_dumps_stacks_when_asked():
    state = _started()
    line = control.text_line(control.ABORT, "rank 0 raised", stacks=1).rstrip(b"\n")
    actions = state.handle(ServerLine(line))
    assert actions[0] == DumpStacks() and StopRank() in actions
    assert not [a for a in actions if isinstance(a, ToServer)]
    assert "job kvs_1 aborted; rank 1 (partition 1 on hostA) was stopped. Cause: rank 0 raised" in _failure(actions)
    quiet = _started().handle(ServerLine(control.text_line(control.ABORT, "x", stacks=0).rstrip(b"\n")))
    assert DumpStacks() not in quiet


def test_lost_peers_fail_the_task():
    assert "lost the connection to the PMI server" in _failure(_started().handle(ServerClosed()))
    actions = _started().handle(DriverClosed())
    assert "lost the connection to the driver's world endpoint" in _reported(actions)
    assert StopRank() in actions


@pytest.mark.parametrize("kind", [channel.CALL, channel.CLOSE])
def test_calls_before_the_rank_started_are_a_protocol_error(kind):
    actions = _state().handle(DriverFrame(kind, []))
    assert "the driver sent" in _reported(actions) and "starting MPI" in _failure(actions)


def test_a_second_call_while_one_runs_is_refused():
    state = _started()
    state.handle(DriverFrame(channel.CALL, []))
    assert "in a call" in _failure(state.handle(DriverFrame(channel.CALL, [])))


def test_unexpected_messages_from_the_rank_fail_the_task():
    state = _started()
    assert "unexpected result message while between calls" in _failure(state.handle(RankFrame(channel.RESULT, [])))
    assert "unexpected control line" in _failure(_started().handle(ServerLine(b"cmd=sparkmpi-what")))


def test_unknown_events_are_a_bug():
    with pytest.raises(TypeError, match="cannot handle"):
        _state().handle(object())


def test_status_descriptions():
    assert relay.describe_status(3) == "3"
    assert relay.describe_status(-15) == "-15 (killed by SIGTERM)"
    assert relay.describe_status(None) == "unknown"


def test_a_delivered_partition_goes_to_an_idle_rank_only():
    from sparkmpi.launch.relay import PartitionDelivered

    state = _started()
    data = channel.encode({"key": "k", "records": [1]})
    assert state.handle(PartitionDelivered(data)) == [ToRank(channel.DATA, data)]
    state.handle(DriverFrame(channel.CALL, []))
    assert "a partition was delivered while" in _failure(state.handle(PartitionDelivered(data)))


def test_a_greeted_delivery_tells_the_driver_its_task_runs_only_while_idle():
    from sparkmpi.launch.relay import DeliveryGreeted, ToDriver

    state = _started()
    (action,) = state.handle(DeliveryGreeted())
    assert isinstance(action, ToDriver) and action.kind == channel.DELIVERING
    assert channel.decode(action.segments) == state.rank
    state.handle(DriverFrame(channel.CALL, []))
    assert state.handle(DeliveryGreeted()) == []


def test_a_rank_that_calls_mpi_abort_is_stopped_before_it_can_return_a_result():
    # MPICH's MPI_Abort sends cmd=abort and returns: the relay must not let the rank go on.
    state = _started()
    state.handle(DriverFrame(channel.CALL, channel.encode({"id": 1})))
    actions = state.handle(RankPMILine(b"cmd=abort exitcode=7"))
    assert actions[0] == ToServer(b"cmd=abort exitcode=7\n") and StopRank() in actions
    assert "rank 1 (partition 1 on hostA) called MPI_Abort (in call 1)" in _failure(actions)
    assert state.handle(RankFrame(channel.RESULT, channel.encode({"id": 1, "value": None}))) == []
    # A command whose name only starts like it is forwarded as any other line.
    assert _started().handle(RankPMILine(b"cmd=abortive x=1")) == [ToServer(b"cmd=abortive x=1\n")]
