"""The socket side both relays share: a Python rank's (:mod:`.task`) and an external program's (:mod:`.program_task`).

Either relay says hello to the driver's PMI server with the job's token,
relays PMI lines between its rank's ``PMI_FD`` socket and the server, starts
the children of the rank's ``MPI_Comm_spawn`` (:mod:`.spawned`) and passes on
their output.  :class:`RelayAdapter` does those parts and runs the select
loop; what each event means is decided by the relay's state object (a
:class:`~.relay.RelayDecisions`), and each subclass adds its own peers (the
world endpoint and a rank process, or the program's pipes and exit).
"""

from __future__ import annotations

import os
import selectors
import socket

from .._retry import retry
from ..pmi import control
from ..pmi.wire import LineBuffer, parse_line
from . import channel, relay
from .spawned import SpawnedChildren

CONNECT_TIMEOUT = 15.0
#: Bytes of a rank's stderr kept for the message when it fails.
STDERR_TAIL = 4000


class RankError(RuntimeError):
    """Raised in a Spark task when its rank (or the job) failed."""


def connect_with_retry(host: str, port: int, timeout: float = CONNECT_TIMEOUT, what: str = "PMI server"
                       ) -> socket.socket:
    """Connect to ``host:port``, retrying with backoff until ``timeout`` s."""
    def connect(seconds_left: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=min(5.0, seconds_left))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return retry(connect, what=f"connect to the sparkmpi {what} at", address=f"{host}:{port}",
                 timeout=timeout, error=RankError)


class RelayAdapter:
    """The PMI server connection, the rank's PMI socket, spawned children and the loop.

    Subclasses set :attr:`state`, :attr:`pmi` (our end of the rank's
    ``PMI_FD`` pair) and implement :meth:`_readable_own`, :meth:`_execute_own`
    and :meth:`_children_env`.
    """

    state: relay.RelayDecisions

    def __init__(self, server_address: tuple[str, int], rank: int, kill_grace: float):
        self.server_address, self.rank, self.kill_grace = server_address, rank, kill_grace
        self.host = socket.gethostname()
        self.where = f"rank {rank} (partition {rank} on {self.host})"
        self.server: socket.socket | None = None
        #: The connection to the driver's endpoint (the world's, or the program job's); the subclass opens it.
        self.driver: socket.socket | None = None
        self.pmi: socket.socket | None = None
        self.from_server, self.from_rank = LineBuffer(), LineBuffer()
        #: Lines that came with the server's welcome, handled once the loop runs.
        self.early: list = []
        #: Processes this rank started with MPI_Comm_spawn (made on the first spawn).
        self.children: SpawnedChildren | None = None
        self.sel: selectors.BaseSelector | None = None
        #: The rank's PMI socket is in the loop (until the rank closes its end).
        self.pmi_open = False

    # -- setup -------------------------------------------------------------
    def hello(self, job: str, token: str) -> None:
        """Connect to the PMI server and be admitted as this rank of ``job``; RankError if refused."""
        self.server = connect_with_retry(*self.server_address)
        hello = control.Hello(job=job, token=token, rank=self.rank, partition=self.rank, host=self.host,
                              pid=os.getpid())
        self.server.sendall(hello.encode())
        first = self._read_server_line(CONNECT_TIMEOUT)
        command = parse_line(first)
        if command.name == control.REFUSED:
            raise RankError(f"PMI server refused {self.where}: {control.decode_text(command)}")
        if command.name != control.WELCOME:
            raise RankError(f"unexpected first reply from the PMI server: {first!r}")
        self.server.settimeout(None)

    def _read_server_line(self, timeout: float) -> bytes:
        self.server.settimeout(timeout)
        while True:
            try:
                data = self.server.recv(65536)
            except socket.timeout:
                raise RankError(f"no answer from the PMI server within {timeout:.0f} s") from None
            if not data:
                raise RankError("the PMI server closed the connection during the hello")
            lines = self.from_server.feed(data)
            if lines:
                self.early = lines[1:]
                return lines[0]

    # -- the loop ------------------------------------------------------------
    def run(self, channels) -> None:
        """Relay until the state has finished; ``channels``: ``(file, key)`` pairs
        of the subclass's own peers, whose readiness goes to :meth:`_readable_own`."""
        self.sel = sel = selectors.DefaultSelector()
        sel.register(self.pmi, selectors.EVENT_READ, "rank-pmi")
        self.pmi_open = True
        sel.register(self.server, selectors.EVENT_READ, "server")
        for fileobj, key in channels:
            sel.register(fileobj, selectors.EVENT_READ, key)
        try:
            for line in self.early:
                self.execute(self.state.handle(relay.ServerLine(line)))
            while not self.state.finished:
                for key, _ in sel.select(timeout=5.0):
                    self._readable(key.data)
                    if self.state.finished:
                        break
        finally:
            sel.close()

    def _readable(self, what) -> None:
        handle = self.state.handle
        if what == "rank-pmi":
            self.forward_rank_pmi()
        elif what == "server":
            data = _recv(self.server)
            if not data:
                self.sel.unregister(self.server)
                self.execute(handle(relay.ServerClosed()))
                return
            for line in self.from_server.feed(data):
                self.execute(handle(relay.ServerLine(line)))
                if self.state.finished:
                    return
        elif what == "spawned-output":
            for stream, data in self.children.take_output():
                self.execute(handle(relay.RankOutput(stream, data)))
            if not self.children.running:
                self.execute(handle(relay.ChildrenExited()))
        else:
            self._readable_own(what)

    def forward_rank_pmi(self) -> None:
        """Forward the PMI lines the rank has written so far (never waits for more).

        Called when its socket is readable, and also before a frame or the exit
        of the rank is handled: what it wrote on PMI first is forwarded first, so
        a job that a rank aborted fails with the abort, not with the exit status
        or the result that followed it.  (Never a blocking read: an earlier call
        in the same round of the loop may have taken what made it readable.)
        """
        while self.pmi_open and not self.state.finished:
            try:
                data = self.pmi.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.pmi_open = False
                self.sel.unregister(self.pmi)  # the rank closed PMI (finalised, or exited)
                return
            # Whole lines only, so our own control lines never split one.
            for line in self.from_rank.feed(data):
                self.execute(self.state.handle(relay.RankPMILine(line)))

    def answer_ping(self) -> None:
        """The driver's heartbeat (:mod:`.heartbeat`): answer its PING at once, from this loop,
        whatever the rank or program is doing."""
        send_quietly(channel.send_message, self.driver, channel.PONG, None)

    def _readable_own(self, what) -> None:
        raise NotImplementedError

    # -- actions -------------------------------------------------------------
    def execute(self, actions) -> None:
        """Carry out ``actions`` in order; stops at one the subclass says ends them (Finish)."""
        for action in actions:
            if isinstance(action, relay.ToServer):
                send_quietly(self.server.sendall, action.line)
            elif isinstance(action, relay.ToRankPMI):
                send_quietly(self.pmi.sendall, action.line + b"\n")
            elif isinstance(action, relay.StartChildren):
                self._start_children(action.line)
            elif not self._execute_own(action):
                return

    def _execute_own(self, action) -> bool:
        """Carry out one of the subclass's actions; False when the rest are not to be."""
        raise NotImplementedError

    def _children_env(self) -> dict:
        """The environment spawned children start from."""
        raise NotImplementedError

    def _start_children(self, line: bytes) -> None:
        """MPI_Comm_spawn from this rank: start the children here (see :mod:`.spawned`) and answer."""
        job, token, commands = control.decode_spawn(parse_line(line))
        if self.children is None:
            self.children = SpawnedChildren(self.server_address, self.host, self.rank, self._children_env(),
                                            self.kill_grace)
            self.sel.register(self.children.wake_r, selectors.EVENT_READ, "spawned-output")
        error = self.children.start(job, token, commands)
        send_quietly(self.server.sendall, control.spawned_line(error))
        if error is not None:
            # MPICH shows only "PMI_Spawn_multiple returned -1": the reason goes to the rank's stderr.
            self.execute(self.state.handle(relay.RankOutput(2, f"sparkmpi: MPI_Comm_spawn failed: {error}\n"
                                                            .encode())))
        if not self.children.running:
            self.execute(self.state.handle(relay.ChildrenExited()))

    def close(self) -> None:
        """Reap the children and close the sockets (subclasses close their own peers after)."""
        if self.children is not None:
            self.children.stop()  # spawned processes are reaped with the rank's task
        for sock in (self.pmi, self.server):
            if sock is not None:
                sock.close()


def _recv(sock) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def send_quietly(send, *args) -> None:
    """Send, ignoring a peer that is gone: its loss is its own event."""
    try:
        send(*args)
    except OSError:
        pass


def barrier_rank(size: int, iterator, keep_records: bool, group: str = "job"):
    """``(context, rank, records)`` of this Spark barrier task: its rank is its
    partition's index; ``records`` its partition's (None unless ``keep_records``)."""
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    rank = context.partitionId()
    if not (0 <= rank < size):
        raise RankError(f"partition {rank} is outside the {group}'s {size} ranks")
    records = list(iterator) if keep_records else None
    if records is None:
        for _ in iterator:
            pass  # read the partition, or PySpark discards this worker afterwards
    return context, rank, records
