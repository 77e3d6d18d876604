"""What the relay of a rank that is an external program decides, with no I/O.

The relay (:mod:`.programs`) sits between the driver's PMI server, the
driver's program endpoint (output and exit status out, rank 0's stdin in) and
the program (PMI lines on the ``PMI_FD`` socket, stdout, stderr, its exit).
Unlike a Python rank it never raises in the Spark task: the program's end,
whatever it was, is reported to the driver as one EXITED message, and the
driver works out the job's exit status as ``mpiexec`` does.  A program that
exits non-zero fails the job (the PMI server then aborts every other rank);
an abort from the server stops this rank's program.

As under ``mpiexec``, the children a rank spawned belong to the job: a
program that exits cleanly while its children still run is reported only
once they have ended too, so that neither the children's last output nor
their PMI ``done`` is cut off by the task ending (which reaps them).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pmi import control
from . import channel
from .relay import (ChildrenExited, DriverClosed, Finish, RankExited, RankOutput, RankPMILine, RelayDecisions,
                    ServerClosed, ServerLine, StartChildren, StopRank, ToRankPMI, ToServer, describe_status)

__all__ = ["ProgramRelayState", "DriverInput", "ToStdin", "Report", "KeepOutput",
           "ServerLine", "ServerClosed", "RankPMILine", "RankOutput", "RankExited", "DriverClosed", "ChildrenExited",
           "ToServer", "ToRankPMI", "StopRank", "StartChildren", "Finish"]


@dataclass(frozen=True)
class DriverInput:
    """Bytes for the program's stdin from the driver (rank 0 only); empty: end of input."""
    data: bytes


@dataclass(frozen=True)
class ToStdin:
    """Write ``data`` to the program's stdin; empty: close it."""
    data: bytes


@dataclass(frozen=True)
class Report:
    """Send ``payload`` to the driver as a message of ``kind`` (OUTPUT or EXITED)."""
    kind: int
    payload: dict


@dataclass(frozen=True)
class KeepOutput:
    """Keep the program's stdout as the task's result (``sparkmpi.pipe``)."""
    data: bytes


class ProgramRelayState(RelayDecisions):
    """The relay of rank ``rank`` of job ``kvsname``, ``where`` naming it in messages.

    With ``keep_stdout`` the program's stdout becomes the task's result
    instead of going to the driver as output.
    """

    def __init__(self, kvsname: str, rank: int, where: str, host: str, keep_stdout: bool = False):
        self.kvsname, self.rank, self.where, self.host = kvsname, rank, where, host
        self.keep_stdout = keep_stdout
        #: Why the program is being stopped (an abort of the job, a lost peer); None while it runs freely.
        self.stopping: str | None = None
        self.server_open = True
        self.finished = False
        #: Whether children this rank spawned may still run (until :class:`ChildrenExited`).
        self.children_running = False
        #: A clean exit of the program, held until its children have ended.
        self.held_exit: RankExited | None = None

    def _stop(self, why: str) -> list:
        if self.stopping is not None:
            return []
        self.stopping = why
        if self.held_exit is not None:  # the program is gone: stopping kills its children, then it ends
            return [StopRank()] + self._exited(self.held_exit)
        return [StopRank()]

    # -- the PMI server (what its lines mean: RelayDecisions) -------------------
    def _pmi_reply(self, line: bytes) -> list:
        return [] if self.stopping else [ToRankPMI(line)]

    def _spawn(self, line: bytes) -> list:
        if self.stopping:
            return []
        self.children_running = True
        return [StartChildren(line)]

    def _aborted(self, command) -> list:
        return self._stop(f"job {self.kvsname} aborted: {control.decode_text(command)}")

    def _broken(self, problem: str) -> list:
        return self._stop(problem)

    def _on_ServerClosed(self, event: ServerClosed) -> list:
        self.server_open = False
        return self._stop("lost the connection to the PMI server")

    def _on_RankPMILine(self, event: RankPMILine) -> list:
        return [ToServer(event.line + b"\n")] if self.server_open and not self.stopping else []

    def _on_RankOutput(self, event: RankOutput) -> list:
        if event.stream == 1 and self.keep_stdout:
            return [KeepOutput(event.data)]
        return [Report(channel.OUTPUT, {"stream": event.stream, "data": event.data})]

    def _on_DriverInput(self, event: DriverInput) -> list:
        return [ToStdin(event.data)]

    def _on_DriverClosed(self, event: DriverClosed) -> list:
        cause = f"lost the connection to the driver; {self.where} was stopped"
        report = [ToServer(control.text_line(control.FAILED, cause))] if self.server_open else []
        return report + self._stop(cause)

    def _on_ChildrenExited(self, event: ChildrenExited) -> list:
        self.children_running = False
        held, self.held_exit = self.held_exit, None
        return [] if held is None else self._exited(held)

    def _on_RankExited(self, event: RankExited) -> list:
        if event.status == 0 and self.children_running and self.stopping is None:
            self.held_exit = event
            return []
        return self._exited(event)

    def _exited(self, event: RankExited) -> list:
        self.finished = True
        exited = Report(channel.EXITED, {"rank": self.rank, "host": self.host, "status": event.status,
                                         "stopped": self.stopping, "stderr_tail": event.stderr_tail})
        if self.stopping is not None:
            return [exited, Finish()]  # the job failed elsewhere (or its driver is gone)
        if event.status == 0:
            return [ToServer(control.bare_line(control.DONE)), exited, Finish()]
        note = f"; its stderr ended with:\n{event.stderr_tail}" if event.stderr_tail else ""
        cause = f"{self.where} exited with status {describe_status(event.status)}{note}"
        return [ToServer(control.text_line(control.FAILED, cause)), exited, Finish()]
