"""What a Spark task's relay decides, with no sockets in it.

A relay sits between three peers: the driver's PMI server (PMI-1 lines and
sparkmpi's control lines), the driver's world endpoint (calls in, results and
output out, as :mod:`.channel` frames), and its rank process (PMI lines on
one socket, frames on another, and its exit).  :class:`RelayState` takes what
arrives from them as events and returns the actions to carry out; the socket
loop in :mod:`.task` only reads, feeds and executes.  It knows the world's
phases (starting, idle between calls, in a call, closing) so that a rank that
dies is reported with where it was.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from ..pmi import control
from ..pmi.wire import parse_line
from . import channel


class Phase(enum.Enum):
    STARTING = "starting MPI"
    IDLE = "between calls"
    CALLING = "in a call"
    CLOSING = "finalising MPI"
    CLOSED = "closed"
    FAILED = "failed"


# -- events -----------------------------------------------------------------
@dataclass(frozen=True)
class ServerLine:
    """One line from the PMI server."""
    line: bytes


@dataclass(frozen=True)
class ServerClosed:
    """The PMI server's connection ended."""


@dataclass(frozen=True)
class RankPMILine:
    """One whole PMI line from the rank."""
    line: bytes


@dataclass(frozen=True)
class RankFrame:
    """One frame from the rank's control socket; ``payload`` is decoded for
    the kinds the relay reads (STARTED, ERROR, CLOSED), None for the rest."""
    kind: int
    segments: list
    payload: object = None


@dataclass(frozen=True)
class RankOutput:
    """Bytes the rank wrote to stdout (1) or stderr (2)."""
    stream: int
    data: bytes


@dataclass(frozen=True)
class RankExited:
    """The rank process ended with ``status`` (negative: killed by that signal)."""
    status: int | None
    stderr_tail: str = ""


@dataclass(frozen=True)
class ChildrenExited:
    """Every process this rank started with MPI_Comm_spawn has ended (or none started)."""


@dataclass(frozen=True)
class DriverFrame:
    """One frame from the driver's world endpoint."""
    kind: int
    segments: list


@dataclass(frozen=True)
class DeliveryGreeted:
    """A Spark task's delivery connected to the inbox with the world's token (its task runs;
    the partition follows once computed)."""


@dataclass(frozen=True)
class PartitionDelivered:
    """A Spark task delivered a partition (a DATA frame) to the relay's inbox."""
    segments: list


@dataclass(frozen=True)
class DriverClosed:
    """The driver's world endpoint connection ended."""


# -- actions ----------------------------------------------------------------
@dataclass(frozen=True)
class ToServer:
    """Send ``line`` (newline included) to the PMI server."""
    line: bytes


@dataclass(frozen=True)
class ToRankPMI:
    """Send ``line`` (without its newline) to the rank's PMI socket."""
    line: bytes


@dataclass(frozen=True)
class ToRank:
    kind: int
    segments: list


@dataclass(frozen=True)
class ToDriver:
    kind: int
    segments: list


@dataclass(frozen=True)
class DumpStacks:
    """Ask the rank for its threads' stacks and report them to the server."""


@dataclass(frozen=True)
class StopRank:
    """Terminate the rank (then kill it after the grace period)."""


@dataclass(frozen=True)
class StartChildren:
    """Start the processes of an MPI_Comm_spawn (``line``: the server's
    ``cmd=sparkmpi-spawn``) and answer the server (:mod:`.spawned`)."""
    line: bytes


@dataclass(frozen=True)
class Finish:
    """The world closed cleanly: the task ends."""


@dataclass(frozen=True)
class Fail:
    """The task ends with ``cause`` (raised as the task's error)."""
    cause: str


def describe_status(status: int | None) -> str:
    """An exit status as a person reads it (``-9 (killed by SIGKILL)``)."""
    if status is None:
        return "unknown"
    if status < 0:
        try:
            return f"{status} (killed by {signal.Signals(-status).name})"
        except ValueError:
            return str(status)
    return str(status)


class RelayDecisions:
    """What both relays decide alike (a Python rank's, :class:`RelayState`, and an
    external program's, :class:`~.program_relay.ProgramRelayState`): the event
    dispatch, and what a line from the PMI server means.  Subclasses say what an
    abort and a broken line do to them, and may refuse PMI lines and spawns."""

    finished: bool

    def handle(self, event) -> list:
        """The actions for one ``event``, in order."""
        if self.finished:
            return []
        method = getattr(self, "_on_" + type(event).__name__, None)
        if method is None:
            raise TypeError(f"{type(self).__name__} cannot handle {type(event).__name__}")
        return method(event)

    def _on_ServerLine(self, event: ServerLine) -> list:
        if not event.line.startswith(CONTROL_LINE):
            return self._pmi_reply(event.line)
        command = parse_line(event.line)
        if command.name == control.SPAWN:
            return self._spawn(event.line)
        if command.name == control.ABORT:
            return self._aborted(command)
        return self._broken(f"unexpected control line from the PMI server: {event.line!r}")

    def _pmi_reply(self, line: bytes) -> list:
        return [ToRankPMI(line)]

    def _spawn(self, line: bytes) -> list:
        return [StartChildren(line)]

    def _aborted(self, command) -> list:
        raise NotImplementedError

    def _broken(self, problem: str) -> list:
        raise NotImplementedError

    def _on_ChildrenExited(self, event: ChildrenExited) -> list:
        return []


#: How sparkmpi's own lines from the PMI server begin (``cmd=sparkmpi-...``).
CONTROL_LINE = b"cmd=" + control.PREFIX.encode()


class RelayState(RelayDecisions):
    """The relay of rank ``rank`` of job ``kvsname``; ``where`` names it in messages."""

    def __init__(self, kvsname: str, rank: int, where: str):
        self.kvsname, self.rank, self.where = kvsname, rank, where
        self.phase = Phase.STARTING
        self.calls_done = 0

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.CLOSED, Phase.FAILED)

    def _fail(self, cause: str, *, report: bool, stop: bool = True) -> list:
        """Fail the task: tell the server (unless it told us), stop the rank."""
        self.phase = Phase.FAILED
        actions: list = [ToServer(control.text_line(control.FAILED, cause))] if report else []
        if stop:
            actions.append(StopRank())
        return actions + [Fail(cause)]

    # -- the PMI server --------------------------------------------------------
    def _aborted(self, command) -> list:
        dump = [DumpStacks()] if command.get("stacks") == "1" else []
        return dump + self._fail(f"job {self.kvsname} aborted; {self.where} was stopped. "
                                 f"Cause: {control.decode_text(command)}", report=False)

    def _broken(self, problem: str) -> list:
        return self._fail(problem, report=False)

    def _on_ServerClosed(self, event: ServerClosed) -> list:
        return self._fail(f"lost the connection to the PMI server; {self.where} stopped", report=False)

    # -- the rank --------------------------------------------------------------
    def _on_RankPMILine(self, event: RankPMILine) -> list:
        forward = [ToServer(event.line + b"\n")]
        if event.line.split(b" ", 1)[0] == b"cmd=abort":
            # MPICH's MPI_Abort sends this and returns, leaving the kill to the
            # process manager: the rank must not go on to deliver a result.
            cause = f"{self.where} called MPI_Abort{self._during()}"
            self.phase = Phase.FAILED
            return forward + [StopRank(), Fail(cause)]
        return forward

    def _on_RankOutput(self, event: RankOutput) -> list:
        return [ToDriver(channel.OUTPUT, channel.encode({"stream": event.stream, "data": event.data}))]

    def _on_RankFrame(self, event: RankFrame) -> list:
        kind = event.kind
        if kind == channel.READY:
            return []
        if kind == channel.STARTED and self.phase is Phase.STARTING:
            self.phase = Phase.IDLE
            return [ToDriver(channel.STARTED, channel.encode(self.rank))]
        if kind == channel.RESULT and self.phase is Phase.CALLING:
            self.phase = Phase.IDLE
            self.calls_done += 1
            return [ToDriver(channel.RESULT, event.segments)]
        if kind == channel.CLOSED and self.phase is Phase.CLOSING:
            self.phase = Phase.CLOSED
            return [ToServer(control.bare_line(control.DONE)), ToDriver(channel.CLOSED, event.segments),
                    Finish()]
        if kind == channel.ERROR:
            error = event.payload or {}
            return self._fail(f"{self.where} raised {error.get('type')}: {error.get('message')}"
                              f"{self._during()}\n\nRemote traceback:\n{error.get('traceback')}", report=True)
        name = channel.KIND_NAMES.get(kind, kind)
        return self._fail(f"{self.where} sent an unexpected {name} message while {self.phase.value}",
                          report=True)

    def _on_RankExited(self, event: RankExited) -> list:
        note = f"; its stderr ended with:\n{event.stderr_tail}" if event.stderr_tail else ""
        return self._fail(f"{self.where} exited with status {describe_status(event.status)} "
                          f"{self._before()}{note}", report=True, stop=False)

    def _during(self) -> str:
        return f" (in call {self.calls_done + 1})" if self.phase is Phase.CALLING else ""

    def _before(self) -> str:
        if self.phase is Phase.CALLING:
            return f"before returning results (in call {self.calls_done + 1})"
        if self.phase is Phase.STARTING:
            return "before MPI started"
        if self.phase is Phase.CLOSING:
            return "while finalising MPI"
        return f"between calls (after {self.calls_done})"

    # -- the driver ------------------------------------------------------------
    def _on_DriverFrame(self, event: DriverFrame) -> list:
        kind = event.kind
        if kind == channel.DATA and self.phase is Phase.IDLE:
            return [ToRank(kind, event.segments)]
        if kind == channel.CALL and self.phase is Phase.IDLE:
            self.phase = Phase.CALLING
            return [ToRank(kind, event.segments)]
        if kind == channel.CLOSE and self.phase is Phase.IDLE:
            self.phase = Phase.CLOSING
            return [ToRank(kind, event.segments)]
        name = channel.KIND_NAMES.get(kind, kind)
        return self._fail(f"the driver sent {name} while {self.where} was {self.phase.value}", report=True)

    def _on_DeliveryGreeted(self, event: DeliveryGreeted) -> list:
        # the driver then knows the delivery's task got a slot (start_timeout no longer applies)
        if self.phase is Phase.IDLE:
            return [ToDriver(channel.DELIVERING, channel.encode(self.rank))]
        return []   # its DATA will fail the relay, as any delivery outside IDLE does

    def _on_PartitionDelivered(self, event: PartitionDelivered) -> list:
        if self.phase is Phase.IDLE:
            return [ToRank(channel.DATA, event.segments)]
        return self._fail(f"a partition was delivered while {self.where} was {self.phase.value}", report=True)

    def _on_DriverClosed(self, event: DriverClosed) -> list:
        return self._fail(f"lost the connection to the driver's world endpoint; {self.where} stopped",
                          report=True)
