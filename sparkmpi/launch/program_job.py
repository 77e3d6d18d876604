"""The driver side of an external MPI program: :class:`ProgramJob` and its :class:`ProgramResult`.

The job opens a key space on the driver's PMI server and a program endpoint
(a listening socket) that every rank's relay (:mod:`.program_task`) connects
to with the job's token, runs the barrier stage in a thread, and collects
each rank's output (echoed as it comes) and exit.  Its exit status is
``mpiexec``'s: 0 when every rank exited 0, else the first failing rank's
(its ``MPI_Abort`` code, its exit code, or, as Hydra reports it, the number
of the signal that killed it), with a one-line message naming rank, host and
cause.  A failing rank, a timeout or Ctrl-C aborts the job on the server,
which stops every program within the kill grace.  While it waits the job
pings every relay that has not reported its exit (the heartbeat of
:mod:`.heartbeat`, as a world's): a relay silent for ``host_timeout`` s is
on a host that went silent (link down, frozen, powered off), and the job
fails with "no contact for N s" naming its rank and host instead of hanging
until TCP gives up.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from ..config import Settings
from ..errors import JobFailed
from . import channel, heartbeat
from .echo import LineEcho
from .job import get_server, resolve_host
from .program_task import ProgramSpec, run_program_task

#: Bytes of rank 0's stdin per STDIN message.
STDIN_CHUNK = 1 << 16


@dataclass
class ProgramResult:
    """How an MPI program run through Spark ended.

    Attributes
    ----------
    returncode : int
        ``mpiexec``'s exit status: 0 if every rank exited 0, else the first
        failing rank's (its MPI_Abort code, exit code, or the number of the
        signal that killed it, as Hydra's mpiexec reports it); 124 on a timeout.
    exit_codes : list of int
        Each rank's exit status as :attr:`subprocess.Popen.returncode`
        gives it (negative: killed by that signal; None: never reported).
    stdout, stderr : list of bytes
        What each rank wrote (empty for ``pipe``'s stdout, which is the result).
    hosts : list of str
        The host of each rank.
    message : str or None
        One line on why the job failed (None when it did not).
    records : list of list of str
        ``pipe``: the lines each rank printed, rank 0's first.
    """

    returncode: int
    exit_codes: list
    stdout: list
    stderr: list
    hosts: list
    message: str | None = None
    records: list = field(default_factory=list)

    def check(self) -> "ProgramResult":
        """Raise :class:`~sparkmpi.JobFailed` unless every rank exited 0."""
        if self.returncode != 0:
            raise JobFailed(self.message or f"the program failed with status {self.returncode}",
                            cause=self.message or "")
        return self


def describe_exit(status: int | None) -> tuple[int, str]:
    """``(mpiexec exit code, words)`` for a rank's exit status."""
    if status is None:
        return 1, "ended without reporting an exit status"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return -status, f"was killed by signal {-status} ({name})"  # Hydra exits with the signal number
    return status, f"exited with code {status}"


class ProgramJob:
    """One run of an external MPI program as ``size`` Spark barrier tasks (the driver's side)."""

    def __init__(self, sc, size: int, argv, *, settings: Settings, env=None, cwd=None, pipe=False,
                 binary=False, stdin=None, echo=False, prefix_rank=False, files=False):
        self.sc, self.size, self.settings = sc, size, settings
        host = resolve_host(settings, sc)
        server = get_server(host, settings.pmi_port)
        self.job = server.open_job(size)
        self.kvsname = self.job.kvsname
        self.listener = socket.create_server((host, 0), backlog=max(16, size))
        self.spec = ProgramSpec(server_host=host, server_port=server.port, kvsname=self.kvsname,
                                token=self.job.token, size=size, driver_host=host,
                                driver_port=self.listener.getsockname()[1], argv=tuple(argv),
                                settings=settings, env=dict(env or {}), cwd=cwd, pipe=pipe, binary=binary,
                                stdin_to_rank0=stdin is not None, files=files)
        self.stdin = stdin
        self.echo = LineEcho(prefix_rank) if echo else None
        self.tag = f"sparkmpi-{self.kvsname}"
        self.conns: dict[int, socket.socket] = {}
        self.hosts: dict[int, str] = {}
        self.exits: dict[int, dict] = {}
        self.stdout = [bytearray() for _ in range(size)]
        self.stderr = [bytearray() for _ in range(size)]
        self.records: list = []
        self.stage_error: BaseException | None = None
        self.stage_done = threading.Event()
        self.watch = heartbeat.ContactWatch(settings.host_timeout)
        #: Ranks whose relay connection closed, and ranks whose host went silent (the heartbeat found them).
        self.gone: set[int] = set()
        self.silent: set[int] = set()
        #: Rank 0's connection is written by the stdin thread too: one frame at a time (see :meth:`_ping`).
        self.stdin_lock = threading.Lock()
        #: When the stdin thread last sent rank 0 something (bytes its relay takes are contact).
        self.stdin_sent_at: float | None = None

    # -- the stage -------------------------------------------------------------
    def _run_stage(self, rdd) -> None:
        spec = self.spec
        sc = self.sc

        def task(iterator):
            return run_program_task(spec, iterator)

        sc.addJobTag(self.tag)
        try:
            self.records = rdd.barrier().mapPartitions(task).collect()
        except BaseException as exc:  # noqa: BLE001  (reported by the waiting thread)
            self.stage_error = exc
        finally:
            sc.removeJobTag(self.tag)
            self.stage_done.set()

    def run(self, rdd, timeout: float | None) -> ProgramResult:
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        stage = threading.Thread(target=self._run_stage, args=(rdd,), name=self.tag, daemon=True)
        stage.start()
        started = time.monotonic()
        timed_out = None
        try:
            try:
                timed_out = self._loop(started, timeout)
            except BaseException:
                self.job.abort("interrupted (the caller stopped the job)")
                self._drain(time.monotonic() + self.settings.kill_grace + 5.0)
                raise
        finally:
            self._teardown(stage)
        return self._result(timed_out)

    def _loop(self, started: float, timeout: float | None) -> str | None:
        """Read the relays until every rank exited; the reason if it had to stop them."""
        start_by = started + self.settings.start_timeout
        deadline = None if timeout is None else started + timeout
        stdin_thread = None
        failed_at = None
        # self.sel lives as long as run(): after an interrupt the exits still drain through it
        while self._waiting_for():
            now = time.monotonic()
            if self.stdin is not None and stdin_thread is None and 0 in self.conns:
                stdin_thread = threading.Thread(target=self._send_stdin, name=f"{self.tag}-stdin",
                                                daemon=True)
                stdin_thread.start()
            if deadline is not None and now > deadline:
                reason = f"timed out after {timeout:g} s"
                self.job.abort(f"the job {reason}")
                self._drain(now + self.settings.kill_grace + 5.0)
                return reason
            if len(self.conns) < self.size and now > start_by:
                reason = (f"not every rank started within {self.settings.start_timeout:g} s (is the cluster "
                          f"short of free task slots?); {self.job.status()}")
                self.job.abort(reason)
                self._drain(now + self.settings.kill_grace + 5.0)
                return reason
            if self.job.failed.is_set():
                failed_at = failed_at or now
                if now - failed_at > self.settings.kill_grace + 10.0:
                    return None  # the rest never reported: they are counted as unknown
            if self.stage_done.is_set():
                # The tasks have returned: what they reported is in the sockets already.
                self._drain(now + 2.0)
                if len(self.exits) < self.size:
                    self.job.abort("the Spark stage ended before every rank reported its exit")
                return None
            self._poll(0.05)
            self._heartbeat()
        return None

    def _waiting_for(self) -> set:
        """Ranks whose exit may still come (not reported, not on a host that went silent)."""
        return set(range(self.size)) - set(self.exits) - self.silent

    def _heartbeat(self) -> None:
        """Ping the relays that are due; abort the job when one has been silent too long.

        After the frames that were waiting are read: a driver that was not
        scheduled for a while must not take its own pause for silence.
        """
        now = time.monotonic()
        if self.stdin_sent_at is not None:
            self.watch.contact(0, self.stdin_sent_at)
        watched = set(self.conns) - set(self.exits) - self.gone - self.silent
        pings, lost = self.watch.beat(now, watched)
        self._ping(pings)
        if lost:
            self.silent.update(rank for rank, _ in lost)
            rank, silent_s = lost[0]
            self.job.abort(heartbeat.lost_message(rank, self.hosts.get(rank, "?"), silent_s, self.watch.timeout),
                           rank=rank)

    def _ping(self, ranks) -> None:
        """PING ``ranks``; rank 0's only while the stdin thread is not halfway through a frame to it
        (skipped, its clock runs on: the stdin it takes counts as contact, see :meth:`_send_stdin`)."""
        channel.send_pings(self.conns, [r for r in ranks if r != 0])
        if 0 in ranks and self.stdin_lock.acquire(blocking=False):
            try:
                channel.send_pings(self.conns, [0])
            finally:
                self.stdin_lock.release()

    def _poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout=timeout):
            if key.data is None:
                self._accept()
                continue
            rank = key.data
            try:
                kind, message, _ = channel.recv_message(self.conns[rank])
            except (channel.ChannelClosed, OSError, ValueError):
                self.sel.unregister(key.fileobj)
                self.gone.add(rank)
                if rank not in self.exits:
                    self.job.abort(f"lost the relay of rank {rank} (on {self.hosts.get(rank, '?')})")
                continue
            self.watch.contact(rank, time.monotonic())
            if kind == channel.PONG:
                continue
            if kind == channel.OUTPUT:
                stream, data = message["stream"], message["data"]
                (self.stdout if stream == 1 else self.stderr)[rank] += data
                if self.echo is not None:
                    self.echo.write(rank, stream, data)
            elif kind == channel.EXITED:
                self.exits[rank] = message
                if self.echo is not None:
                    self.echo.flush(rank)

    def _accept(self) -> None:
        accepted = channel.accept_relay(self.listener, self.kvsname, self.job.token, self.size, self.conns,
                                        self.hosts)
        if accepted is not None:
            rank = accepted[0]
            self.sel.register(self.conns[rank], selectors.EVENT_READ, rank)

    def _send_stdin(self) -> None:
        """Rank 0's stdin from the caller's (a file object, or bytes), until end of input."""
        sock = self.conns[0]
        source = self.stdin

        def send(data: bytes) -> None:
            with self.stdin_lock:  # the heartbeat's pings go on the same connection
                channel.send_message(sock, channel.STDIN, data)
                self.stdin_sent_at = time.monotonic()

        try:
            if isinstance(source, (bytes, bytearray)):
                view = memoryview(source)
                for start in range(0, len(view), STDIN_CHUNK):   # each chunk taken is contact
                    send(bytes(view[start:start + STDIN_CHUNK]))
            else:
                fd = source.fileno()
                while 0 not in self.exits:
                    chunk = os.read(fd, STDIN_CHUNK)
                    if not chunk:
                        break
                    send(chunk)
            send(b"")
        except (OSError, ValueError):
            pass  # the rank is gone; its exit says why

    def _drain(self, until: float) -> None:
        """After an abort: collect the exits that are still coming, until ``until``."""
        while self._waiting_for() and time.monotonic() < until:
            self._poll(0.05)
            self._heartbeat()

    def _teardown(self, stage: threading.Thread) -> None:
        self.job.close()
        # A silent host's task will not return by itself: cancel it at once.
        if self.silent or not self.stage_done.wait(self.settings.kill_grace + 5.0):
            try:
                self.sc.cancelJobsWithTag(self.tag)
            except Exception:  # noqa: BLE001  (a JVM that got the Ctrl-C too is gone: nothing to cancel)
                pass
        stage.join(self.settings.kill_grace + 30.0)
        self.sel.close()
        for sock in self.conns.values():
            sock.close()
        self.listener.close()

    # -- the outcome -----------------------------------------------------------
    def _result(self, stopped_because: str | None) -> ProgramResult:
        codes = [self.exits.get(r, {}).get("status") for r in range(self.size)]
        hosts = [self.exits.get(r, {}).get("host") or self.hosts.get(r, "?") for r in range(self.size)]
        failure = self.job.failure
        returncode, message = 0, None
        if stopped_because is not None:
            returncode, message = 124 if stopped_because.startswith("timed out") else 1, \
                f"MPI job {self.kvsname} {stopped_because}; every rank was stopped"
        elif failure is not None or any(c != 0 for c in codes):
            rank = failure.rank if failure is not None and failure.rank is not None else \
                next((r for r, c in enumerate(codes) if c != 0), None)
            if failure is not None and failure.rank in self.silent:
                returncode, message = 1, f"MPI job {self.kvsname} failed: {failure.cause}"
            elif failure is not None and failure.exit_code is not None:
                returncode = failure.exit_code if failure.exit_code != 0 else 1
                message = f"rank {rank} (on {hosts[rank]}) called MPI_Abort with exit code {failure.exit_code}"
            elif rank is not None:
                returncode, words = describe_exit(codes[rank])
                returncode = returncode or 1
                message = f"rank {rank} (on {hosts[rank]}) {words}"
                last = (self.exits.get(rank, {}).get("stderr_tail") or "").strip().splitlines()[-1:]
                if last:
                    message += f"; its stderr ended with: {last[0][:300]}"
            else:
                returncode, message = 1, f"MPI job {self.kvsname} failed: {failure.cause.splitlines()[0]}"
            # (A silent host's task was cancelled: that error of the stage says nothing more.)
            if self.stage_error is not None and not self.exits and not self.silent:
                message += f"; the Spark stage failed: {str(self.stage_error).strip().splitlines()[0][:300]}"
        elif self.stage_error is not None:
            returncode = 1
            message = f"the Spark stage failed: {str(self.stage_error).strip().splitlines()[0][:300]}"
        return ProgramResult(returncode=returncode, exit_codes=codes, stdout=[bytes(b) for b in self.stdout],
                             stderr=[bytes(b) for b in self.stderr], hosts=hosts, message=message,
                             records=list(self.records) if returncode == 0 else [])
