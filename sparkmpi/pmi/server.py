"""The driver's PMI server: a thin socket loop around :class:`JobSpace`.

One server per driver process serves any number of jobs, each with its own
key-value space, random name and secret token.  Only relays that present the
token of an open job are admitted (``cmd=sparkmpi-hello``); anything else is
refused, logged and counted.  Which relays are admitted, what fails a job and
who hears the abort are rules of the space; this module only moves its lines
between sockets.  The loop runs in one daemon thread with a selector; other
threads talk to it through :class:`JobHandle` methods, which take the lock and
wake the loop.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from ..errors import PMIProtocolError
from . import control
from .space import JobSpace
from .wire import CommandReader, LineBuffer, parse_line

log = logging.getLogger("sparkmpi.pmi")

#: Seconds a new connection has to introduce itself before it is dropped.
HELLO_TIMEOUT = 10.0


@dataclass
class _Conn:
    sock: socket.socket
    peer: str
    opened: float
    lines: LineBuffer = field(default_factory=LineBuffer)
    #: Joins the lines of a multi-line ``mcmd=`` command (MPI_Comm_spawn).
    commands: CommandReader = field(default_factory=CommandReader)
    out: bytearray = field(default_factory=bytearray)
    job: "JobHandle | None" = None
    rank: int = -1
    #: Why the server is closing the connection once its output is flushed ("" while open).
    closing: str = ""


class JobHandle:
    """The driver's view of one job on the server.

    What the job knows (ranks, hosts, partitions, failure, reports) lives in
    :attr:`space`; the handle adds the relays' connections, the token and the
    events other threads wait on.

    Attributes
    ----------
    kvsname : str
        The job's PMI key-space name (also its id).
    token : str
        Secret each relay must present.
    size : int
        Number of ranks.
    finished : threading.Event
        Set when every rank reported its results delivered.
    failed : threading.Event
        Set on the first failure; see :attr:`failure`.
    """

    def __init__(self, server: "PMIServer", size: int):
        self._server = server
        self.space = JobSpace(size)
        self.kvsname = self.space.kvsname
        self.size = size
        self.token = secrets.token_hex(16)
        self.finished = threading.Event()
        self.failed = threading.Event()
        self.conns: dict[int, _Conn] = {}
        #: The jobs MPI_Comm_spawn started from this one, and the job that spawned this one.
        self.children: list[JobHandle] = []
        self.parent: JobHandle | None = None

    @property
    def failure(self):
        return self.space.failure

    @property
    def reports(self) -> dict[int, str]:
        """What relays reported after the failure (e.g. their rank's stacks)."""
        return self.space.reports

    @property
    def closed(self) -> bool:
        return self.space.closed

    @property
    def partitions(self) -> dict[int, int]:
        """Spark partition of each rank whose relay has been admitted."""
        with self._server._lock:
            return {r: s.partition for r, s in enumerate(self.space.ranks) if s.partition is not None}

    @property
    def hosts(self) -> dict[int, str]:
        """Host of each rank whose relay has been admitted."""
        with self._server._lock:
            return {r: s.host for r, s in enumerate(self.space.ranks) if s.host is not None}

    def key_values(self) -> dict[str, str]:
        """A copy of the keys and values the ranks put so far (diagnostics: how MPICH split
        its business cards over keys)."""
        with self._server._lock:
            return dict(self.space.kvs)

    def where(self, rank: int | None) -> str:
        """``"rank R (partition P on HOST)"`` as far as it is known."""
        with self._server._lock:
            return self.space.where(rank)

    def status(self) -> str:
        """One line per rank on how far it got (for timeout messages)."""
        with self._server._lock:
            return self.space.status()

    def abort(self, reason: str, rank: int | None = None, dump_stacks: bool = False) -> None:
        """Fail the job (if not failed already) and tell every relay to kill its rank.

        With ``dump_stacks`` the relays first ask their rank for the Python
        stacks of all its threads and report them (see :attr:`reports`).
        """
        self._server._abort(self, rank, reason, dump_stacks)

    def wait_relays_gone(self, timeout: float, ignore=()) -> bool:
        """Wait until every relay of the job has disconnected; True if they all did.

        ``ignore``: ranks not to wait for (on a host known to be silent)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._server._lock:
                if not set(self.conns) - set(ignore):
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Forget the job: its connections are closed and new ones refused."""
        self._server._close_job(self)


class PMIServer:
    """A PMI-1 server for relays, listening on ``host:port`` (0 picks a port).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.RLock()
        self._jobs: dict[str, JobHandle] = {}
        self._conns: dict[int, _Conn] = {}
        self.refused: list[str] = []  # reasons, for tests and diagnostics
        self._listener = socket.create_server((host, port), backlog=512, reuse_port=False)
        self._listener.setblocking(False)
        self.host, self.port = host, self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"sparkmpi-pmi-{self.port}", daemon=True)
        self._thread.start()
        log.debug("PMI server listening on %s:%d", host, self.port)

    # -- public ------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def open_job(self, size: int) -> JobHandle:
        """Create a key space for a job of ``size`` ranks."""
        job = JobHandle(self, size)
        job.space.spawn_enabled = True  # relays start the children (sparkmpi.launch.spawned)
        with self._lock:
            self._jobs[job.kvsname] = job
        return job

    def open_jobs(self) -> list[JobHandle]:
        """The jobs whose key spaces are open now (a world's, for as long as it lives)."""
        with self._lock:
            return list(self._jobs.values())

    def close(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._wake()
        self._thread.join(timeout=5)
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- used by JobHandle (any thread) ---------------------------------------
    def _abort(self, job: JobHandle, rank: int | None, cause: str, dump_stacks: bool) -> None:
        with self._lock:
            self._deliver(job, job.space.abort(rank, cause, dump_stacks))
        self._wake()

    def _close_job(self, job: JobHandle) -> None:
        with self._lock:
            job.space.close()
            self._jobs.pop(job.kvsname, None)
            for conn in job.conns.values():
                conn.closing = "the job was closed"
            for child in job.children:
                self._close_job(child)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are closing

    # -- the loop (server thread only) ----------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            events = self._selector.select(timeout=1.0)
            with self._lock:
                for key, mask in events:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        conn: _Conn = key.data
                        if mask & selectors.EVENT_READ:
                            self._read(conn)
                        if mask & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                            self._flush(conn)
                self._housekeeping()

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock=sock, peer=f"{addr[0]}:{addr[1]}", opened=time.monotonic())
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(conn, f"connection error: {exc}")
            return
        if not data:
            self._drop(conn, "connection closed")
            return
        try:
            for raw in conn.lines.feed(data):
                if conn.job is None:
                    self._hello(conn, raw)
                    if conn.job is None:
                        return
                else:
                    command = conn.commands.feed(raw)
                    if command is not None:
                        self._deliver(conn.job, conn.job.space.handle(conn.rank, command))
                        if conn.job.space.spawn_requests:
                            self._serve_spawns(conn.job)
        except PMIProtocolError as exc:
            if conn.job is None:
                self._refuse(conn, f"malformed first line: {exc}")
            else:
                self._deliver(conn.job, conn.job.space.relay_broke(conn.rank, str(exc)))
                conn.closing = "the server closed it after a malformed line"

    def _refuse(self, conn: _Conn, reason: str) -> None:
        message = f"refused PMI client {conn.peer}: {reason}"
        log.warning(message)
        self.refused.append(message)
        conn.out += control.text_line(control.REFUSED, reason)
        conn.closing = "refused"

    def _hello(self, conn: _Conn, raw: bytes) -> None:
        hello = control.Hello.from_command(parse_line(raw))
        job = self._jobs.get(hello.job)
        if job is None:
            self._refuse(conn, f"no open job named {hello.job!r}")
            return
        if not hmac.compare_digest(hello.token.encode(), job.token.encode()):
            self._refuse(conn, f"wrong token for job {hello.job}")
            return
        try:
            replies = job.space.admit(hello.rank, hello.partition, hello.host)
        except PMIProtocolError as exc:
            self._refuse(conn, str(exc))
            return
        conn.job, conn.rank = job, hello.rank
        job.conns[hello.rank] = conn
        self._deliver(job, replies)

    def _deliver(self, job: JobHandle, replies) -> None:
        """Queue the space's replies and mirror its state in the job's events."""
        for rank, line in replies:
            target = job.conns.get(rank)
            if target is not None:
                target.out += line
        if job.space.failure is not None and not job.failed.is_set():
            log.info("job %s failed at %s", job.kvsname, job.space.where(job.space.failure.rank))
            job.failed.set()
            parent = job.parent
            if parent is not None and parent.space.failure is None and not parent.space.closed:
                # As under mpiexec, a spawned job that fails takes its parents down too.
                cause = job.space.failure.cause
                self._deliver(parent, parent.space.abort(None, f"a job it spawned ({job.kvsname}) failed: {cause}"))
        if job.space.all_done:
            job.finished.set()

    def _serve_spawns(self, job: JobHandle) -> None:
        """Open a key space for each spawn's children and ask the parent's relay to start them."""
        while job.space.spawn_requests:
            request = job.space.spawn_requests.pop(0)
            child = JobHandle(self, request.total)
            child.space.names = job.space.names  # one name service for a job and what it spawned
            child.space.kvs.update(dict(request.preput))
            child.space.rank_appnums = [index for index, c in enumerate(request.commands) for _ in range(c.nprocs)]
            child.space.spawn_enabled = True  # children spawn again: the thread serving them starts theirs
            child.parent = job
            job.children.append(child)
            self._jobs[child.kvsname] = child
            commands = [{"execname": c.execname, "nprocs": c.nprocs, "args": list(c.args), "info": list(c.info)}
                        for c in request.commands]
            job.space.spawn_pending[request.parent_rank] = request.total
            conn = job.conns.get(request.parent_rank)
            if conn is not None:
                conn.out += control.spawn_line(child.kvsname, child.token, request.parent_rank, commands)

    def _drop(self, conn: _Conn, why: str) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            self._conns.pop(fd, None)
            conn.sock.close()
        job = conn.job
        if job is not None and job.conns.get(conn.rank) is conn:
            del job.conns[conn.rank]
            self._deliver(job, job.space.relay_lost(conn.rank, why))

    def _flush(self, conn: _Conn) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                conn.out.clear()
                conn.closing = f"send failed: {exc}"

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if conn.job is None and not conn.closing and now - conn.opened > HELLO_TIMEOUT:
                self._refuse(conn, f"no hello within {HELLO_TIMEOUT:.0f} s")
            if conn.out:
                self._flush(conn)
            if conn.closing and not conn.out:
                self._drop(conn, conn.closing)
        # A second pass, since a drop above may have queued abort lines for connections already seen.
        for conn in self._conns.values():
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
            try:
                if self._selector.get_key(conn.sock).events != want:
                    self._selector.modify(conn.sock, want, conn)
            except (KeyError, ValueError):
                pass
