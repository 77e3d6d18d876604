"""Ranks that are external programs: ``sparkmpi exec``, :func:`run_program`, :func:`pipe`.

Each rank is one Spark barrier task running ``argv`` (``python script.py``,
or any executable linked against MPICH's ABI) with its PMI wiring: the task's
relay makes a socket pair, passes one end as ``PMI_FD`` (with ``PMI_RANK`` and
``PMI_SIZE``) and relays PMI-1 lines between the program and the driver's PMI
server, as for a Python rank.  The program's stdout and stderr stream to the
driver as they are written; rank 0 gets the driver's stdin (``exec``), or
each rank gets its partition's records (``pipe``).  What the relay decides is
:class:`~.program_relay.ProgramRelayState`; this module moves the bytes.

The job's exit status is ``mpiexec``'s: 0 when every rank exited 0, else the
first failing rank's (its ``MPI_Abort`` code, its exit code, or, as Hydra
reports it, the number of the signal that killed it), with a one-line message naming rank, host and cause.
A failing rank, a timeout or Ctrl-C stops every program (its whole process
group) within the kill grace; the programs also die with their Spark worker
(``setpriv --pdeathsig``).
"""

from __future__ import annotations

import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .._proc import stop_process, with_parent_death
from ..config import Settings
from ..errors import InvalidArgument, InvalidArgumentType, JobFailed, JobTimeout
from ..pmi import control
from ..pmi.wire import LineBuffer, parse_line
from . import channel, program_relay as pr, shm
from .spawned import SpawnedChildren
from .job import get_server, local_cores, resolve_host
from .task import CONNECT_TIMEOUT, NETMOD_VARIABLE, RankError, _task_hosts, connect_with_retry

STDERR_TAIL = 4000
#: Seconds to read what a program wrote before it exited, once it has.
DRAIN_S = 0.5
#: Bytes of framing before each binary record on a ``pipe`` rank's stdin (little-endian length).
FRAME_HEADER = 8


# -- the task side ---------------------------------------------------------------
@dataclass(frozen=True)
class ProgramSpec:
    """What every task of one program job needs; pickled into the Spark closure."""

    server_host: str
    server_port: int
    kvsname: str
    token: str
    size: int
    driver_host: str
    driver_port: int
    argv: tuple
    settings: Settings = field(default_factory=Settings)
    env: dict = field(default_factory=dict)
    cwd: str | None = None
    #: ``pipe``: the partition's records go to stdin, stdout lines are the task's result.
    pipe: bool = False
    binary: bool = False
    #: ``exec``: rank 0's stdin comes from the driver.
    stdin_to_rank0: bool = False
    #: Files were shipped with ``SparkContext.addFile``: without ``cwd`` the
    #: ranks run in the executor's copy of them (see :func:`program_environment`).
    files: bool = False


def encode_records(records, binary: bool):
    """The bytes a ``pipe`` rank reads on stdin: one line per record (``str``
    of it; bytes as they are), or with ``binary`` each record (bytes or a
    NumPy array, C order) after its length as 8 little-endian bytes."""
    for record in records:
        if binary:
            if hasattr(record, "__array_interface__"):
                import numpy

                data = numpy.ascontiguousarray(record).tobytes()
            elif isinstance(record, (bytes, bytearray, memoryview)):
                data = bytes(record)
            else:
                raise InvalidArgumentType(f"binary pipe records must be bytes or NumPy arrays, "
                                          f"got {type(record).__name__}")
            yield len(data).to_bytes(FRAME_HEADER, "little") + data
        elif isinstance(record, (bytes, bytearray)):
            yield bytes(record).rstrip(b"\n") + b"\n"
        else:
            text = str(record)
            if "\n" in text:
                raise InvalidArgument(f"a pipe record must fit on one line, got {text[:60]!r}")
            yield text.encode() + b"\n"


def program_environment(spec: ProgramSpec, rank: int, pmi_fd: int, task_hosts, environ=None) -> dict:
    """The program's environment: the worker's, the job's ``env``, the PMI wiring,
    the venv's ``bin`` first on PATH, and the single-host netmod (as for Python ranks)."""
    environ = dict(os.environ if environ is None else environ)
    env = {**environ, **spec.env}
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]) if bin_dir else env.get("PATH", "")
    netmod = spec.settings.single_host_netmod
    if netmod and len(set(task_hosts)) == 1 and NETMOD_VARIABLE not in env:
        env[NETMOD_VARIABLE] = netmod
    env.update({"PMI_FD": str(pmi_fd), "PMI_RANK": str(rank), "PMI_SIZE": str(spec.size)})
    for name in ("PMI_PORT", "PMI_ID", "PMI_SPAWNED"):
        env.pop(name, None)
    if spec.files:
        files_dir = _spark_files_dir()
        env[FILES_DIR_VARIABLE] = files_dir
        env["PATH"] = os.pathsep.join([files_dir, env["PATH"]])
    return env


#: Where a rank finds the files of ``--files`` (``SparkFiles.getRootDirectory()``).
FILES_DIR_VARIABLE = "SPARKMPI_FILES_DIR"


def _spark_files_dir() -> str:
    from pyspark import SparkFiles

    return SparkFiles.getRootDirectory()


def _program_argv(spec: ProgramSpec) -> list:
    """``argv`` with a shipped file's executor copy for its program, when it names one (``--files``)."""
    argv = list(spec.argv)
    if spec.files and os.sep not in argv[0]:
        shipped = os.path.join(_spark_files_dir(), argv[0])
        if os.path.isfile(shipped):
            if not os.access(shipped, os.X_OK):
                os.chmod(shipped, os.stat(shipped).st_mode | 0o111)
            argv[0] = shipped
    return argv


class _StdinWriter(threading.Thread):
    """Writes chunks to the program's stdin off the relay loop (a program that
    does not read must not stop the relay); an empty chunk closes it."""

    def __init__(self, pipe):
        super().__init__(name="sparkmpi-program-stdin", daemon=True)
        self.pipe, self.chunks = pipe, queue.Queue()

    def run(self) -> None:
        try:
            while True:
                chunk = self.chunks.get()
                if not chunk:
                    break
                self.pipe.write(chunk)
        except (OSError, ValueError):
            pass  # the program closed its stdin or exited
        finally:
            try:
                self.pipe.close()
            except OSError:
                pass

    def feed(self, chunks) -> None:
        for chunk in chunks:
            self.chunks.put(chunk)


class _ProgramRelay:
    """The socket adapter around :class:`~.program_relay.ProgramRelayState` for one rank."""

    def __init__(self, spec: ProgramSpec, rank: int):
        self.spec, self.rank = spec, rank
        self.host = socket.gethostname()
        self.where = f"rank {rank} (partition {rank} on {self.host})"
        self.state = pr.ProgramRelayState(spec.kvsname, rank, self.where, self.host, keep_stdout=spec.pipe)
        self.server = self.driver = self.pmi = self.popen = None
        self.stdin: _StdinWriter | None = None
        self.kept = bytearray()
        self.stderr_tail = bytearray()
        self.early: list = []
        self.env: dict = {}
        self.children: SpawnedChildren | None = None

    def connect(self) -> None:
        spec = self.spec
        self.server = connect_with_retry(spec.server_host, spec.server_port)
        hello = control.Hello(job=spec.kvsname, token=spec.token, rank=self.rank, partition=self.rank,
                              host=self.host, pid=os.getpid())
        self.server.sendall(hello.encode())
        self.from_server = LineBuffer()
        self.server.settimeout(CONNECT_TIMEOUT)
        lines: list = []
        while not lines:
            data = self.server.recv(65536)
            if not data:
                raise RankError("the PMI server closed the connection during the hello")
            lines = self.from_server.feed(data)
        self.server.settimeout(None)
        first, self.early = parse_line(lines[0]), lines[1:]
        if first.name == control.REFUSED:
            raise RankError(f"PMI server refused {self.where}: {control.decode_text(first)}")
        if first.name != control.WELCOME:
            raise RankError(f"unexpected first reply from the PMI server: {lines[0]!r}")
        self.driver = connect_with_retry(spec.driver_host, spec.driver_port, what="program endpoint")
        self.driver.settimeout(None)
        channel.send_message(self.driver, channel.HELLO, {"job": spec.kvsname, "token": spec.token,
                                                          "rank": self.rank, "host": self.host})

    def start(self, env: dict, records) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pmi = ours
        self.env = {k: v for k, v in env.items() if not k.startswith("PMI_")}
        feeds_stdin = self.spec.pipe or (self.spec.stdin_to_rank0 and self.rank == 0)
        cwd = self.spec.cwd or (_spark_files_dir() if self.spec.files else None)
        try:
            self.popen = subprocess.Popen(
                with_parent_death(_program_argv(self.spec)), env={**env, "PMI_FD": str(theirs.fileno())},
                cwd=cwd, pass_fds=(theirs.fileno(),), close_fds=True, start_new_session=True,
                stdin=subprocess.PIPE if feeds_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            ours.close()
            self.pmi = None
            raise _StartFailed(f"{self.where} could not start {self.spec.argv[0]!r}: {exc}") from exc
        finally:
            theirs.close()
        for pipe in (self.popen.stdout, self.popen.stderr):
            os.set_blocking(pipe.fileno(), False)
        if feeds_stdin:
            self.stdin = _StdinWriter(self.popen.stdin)
            self.stdin.start()
            if self.spec.pipe:
                self.stdin.feed(encode_records(records, self.spec.binary))
                self.stdin.feed([b""])

    def run(self) -> None:
        self.sel = sel = selectors.DefaultSelector()
        sel.register(self.pmi, selectors.EVENT_READ, "pmi")
        sel.register(self.server, selectors.EVENT_READ, "server")
        sel.register(self.driver, selectors.EVENT_READ, "driver")
        sel.register(self.popen.stdout, selectors.EVENT_READ, 1)
        sel.register(self.popen.stderr, selectors.EVENT_READ, 2)
        self.pidfd = os.pidfd_open(self.popen.pid)
        sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.from_rank = LineBuffer()
        try:
            for line in self.early:
                self.execute(self.state.handle(pr.ServerLine(line)))
            while not self.state.finished:
                for key, _ in sel.select(timeout=5.0):
                    self._readable(key.data)
                    if self.state.finished:
                        break
        finally:
            sel.close()
            os.close(self.pidfd)

    def _readable(self, what) -> None:
        handle = self.state.handle
        if what == "pmi":
            data = _recv(self.pmi)
            if data:
                for line in self.from_rank.feed(data):
                    self.execute(handle(pr.RankPMILine(line)))
            else:
                self.sel.unregister(self.pmi)  # the program closed PMI (finalised, or exited)
        elif what == "server":
            data = _recv(self.server)
            if not data:
                self.sel.unregister(self.server)
                self.execute(handle(pr.ServerClosed()))
                return
            for line in self.from_server.feed(data):
                self.execute(handle(pr.ServerLine(line)))
        elif what == "driver":
            try:
                kind, message, _ = channel.recv_message(self.driver)
            except (channel.ChannelClosed, OSError, ValueError):
                self.sel.unregister(self.driver)
                self.execute(handle(pr.DriverClosed()))
                return
            if kind == channel.STDIN:
                self.execute(handle(pr.DriverInput(bytes(message))))
        elif what in (1, 2):
            self._forward(what)
        elif what == "spawned-output":
            for stream, data in self.children.take_output():
                self.execute(handle(pr.RankOutput(stream, data)))
            if not self.children.running:
                self.execute(handle(pr.ChildrenExited()))
        elif what == "exit":
            self.sel.unregister(self.pidfd)  # its children may outlive it: the loop goes on without it
            deadline = time.monotonic() + DRAIN_S
            # What it wrote last is still in the pipes (or held open by its own children: not waited for long).
            while time.monotonic() < deadline and (self._forward(1, final=True) | self._forward(2, final=True)):
                pass
            status = self.popen.wait()
            tail = self.stderr_tail.decode("utf-8", "replace").strip()
            self.execute(handle(pr.RankExited(status, tail)))

    def _forward(self, stream: int, final: bool = False) -> bool:
        """Forward what the program wrote to ``stream``; True while more may come."""
        pipe = self.popen.stdout if stream == 1 else self.popen.stderr
        if pipe.closed:
            return False
        try:
            data = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            if final:
                time.sleep(0.01)
            return True
        except OSError:
            data = b""
        if not data:
            if not final:
                self.sel.unregister(pipe)
            pipe.close()
            return False
        if stream == 2:
            self.stderr_tail += data
            del self.stderr_tail[:-STDERR_TAIL]
        self.execute(self.state.handle(pr.RankOutput(stream, data)))
        return True

    def execute(self, actions) -> None:
        for action in actions:
            if isinstance(action, pr.ToServer):
                _send_quietly(self.server.sendall, action.line)
            elif isinstance(action, pr.ToRankPMI):
                _send_quietly(self.pmi.sendall, action.line + b"\n")
            elif isinstance(action, pr.Report):
                _send_quietly(channel.send_message, self.driver, action.kind, action.payload)
            elif isinstance(action, pr.KeepOutput):
                self.kept += action.data
            elif isinstance(action, pr.ToStdin):
                if self.stdin is not None:
                    self.stdin.feed([action.data])
            elif isinstance(action, pr.StopRank):
                self._stop_program()
                if self.children is not None:
                    self.children.kill_all()
            elif isinstance(action, pr.StartChildren):
                job, token, commands = control.decode_spawn(parse_line(action.line))
                if self.children is None:
                    self.children = SpawnedChildren((self.spec.server_host, self.spec.server_port), self.host,
                                                    self.rank, self.env, self.spec.settings.kill_grace)
                    self.sel.register(self.children.wake_r, selectors.EVENT_READ, "spawned-output")
                _send_quietly(self.server.sendall, control.spawned_line(self.children.start(job, token, commands)))
                if not self.children.running:  # none started: nothing to wait for
                    self.execute(self.state.handle(pr.ChildrenExited()))

    def _stop_program(self) -> None:
        """SIGTERM the program's process group; SIGKILL after the grace (in a thread: the loop
        goes on reading its output, and its exit arrives as an event)."""
        popen, grace = self.popen, self.spec.settings.kill_grace
        if popen is None or popen.poll() is not None:
            return
        try:
            os.killpg(popen.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return

        def kill_later():
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if popen.poll() is not None:
                    return
                time.sleep(0.02)
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        threading.Thread(target=kill_later, name="sparkmpi-program-kill", daemon=True).start()

    def close(self) -> None:
        if self.children is not None:
            self.children.stop()  # spawned processes are reaped with the rank's task
        if self.popen is not None:
            try:
                stop_process(self.popen, self.spec.settings.kill_grace, group=True)
            except Exception:  # noqa: BLE001  (nothing more to do for a process stuck in the kernel)
                pass
            for pipe in (self.popen.stdout, self.popen.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()
        for sock in (self.pmi, self.server, self.driver):
            if sock is not None:
                sock.close()


class _StartFailed(RankError):
    """The program could not be started (not found, not executable)."""


def _recv(sock) -> bytes:
    try:
        return sock.recv(65536)
    except (ConnectionError, OSError):
        return b""


def _send_quietly(send, *args) -> None:
    """Send, ignoring a peer that is gone: its loss is its own event."""
    try:
        send(*args)
    except OSError:
        pass


def run_program_task(spec: ProgramSpec, iterator):
    """Body of one barrier task: run the program as rank = partition index until it exits."""
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    rank = context.partitionId()
    if not (0 <= rank < spec.size):
        raise RankError(f"partition {rank} is outside the job's {spec.size} ranks")
    records = list(iterator) if spec.pipe else None
    if records is None:
        for _ in iterator:
            pass  # read the partition, or PySpark discards this worker afterwards
    relay = _ProgramRelay(spec, rank)
    try:
        relay.connect()
        try:
            relay.start(program_environment(spec, rank, -1, _task_hosts(context)), records)
        except _StartFailed as exc:
            # Reported like an exit: the job fails with the reason, the task ends normally.
            _send_quietly(relay.server.sendall, control.text_line(control.FAILED, str(exc)))
            _send_quietly(channel.send_message, relay.driver, channel.EXITED,
                          {"rank": rank, "host": relay.host, "status": 127, "stopped": None,
                           "stderr_tail": str(exc)})
            return iter(())
        del records
        relay.run()
    finally:
        relay.close()
        shm.remove_job_segments(spec.kvsname)
    if not spec.pipe:
        return iter(())
    text = relay.kept.decode("utf-8", "replace")
    return iter(text.splitlines())


# -- the driver side -------------------------------------------------------------
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
    records : list of str
        ``pipe``: the lines the ranks printed, in rank order.
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


class _LineEcho:
    """Ranks' output written to the caller's stdout/stderr as whole lines, optionally ``[rank] ``-prefixed."""

    def __init__(self, prefix_rank: bool, out=None, err=None):
        self.prefix_rank = prefix_rank
        self.targets = {1: out or sys.stdout.buffer, 2: err or sys.stderr.buffer}
        self.partial: dict[tuple[int, int], bytes] = {}

    def write(self, rank: int, stream: int, data: bytes) -> None:
        text = self.partial.pop((rank, stream), b"") + data
        *lines, rest = text.split(b"\n")
        if rest:
            self.partial[(rank, stream)] = rest
        if lines:
            self._emit(rank, stream, lines)

    def flush(self, rank: int) -> None:
        for stream in (1, 2):
            rest = self.partial.pop((rank, stream), b"")
            if rest:
                self._emit(rank, stream, [rest])

    def _emit(self, rank, stream, lines) -> None:
        prefix = f"[{rank}] ".encode() if self.prefix_rank else b""
        target = self.targets[stream]
        target.write(b"".join(prefix + line + b"\n" for line in lines))
        target.flush()


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
        self.echo = _LineEcho(prefix_rank) if echo else None
        self.tag = f"sparkmpi-{self.kvsname}"
        self.conns: dict[int, socket.socket] = {}
        self.hosts: dict[int, str] = {}
        self.exits: dict[int, dict] = {}
        self.stdout = [bytearray() for _ in range(size)]
        self.stderr = [bytearray() for _ in range(size)]
        self.records: list = []
        self.stage_error: BaseException | None = None
        self.stage_done = threading.Event()

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
        while len(self.exits) < self.size:
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
        return None

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
                if rank not in self.exits:
                    self.job.abort(f"lost the relay of rank {rank} (on {self.hosts.get(rank, '?')})")
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
        sock, _ = self.listener.accept()
        sock.settimeout(10.0)
        try:
            kind, hello, _ = channel.recv_message(sock)
        except (OSError, EOFError, ValueError):
            sock.close()
            return
        sock.settimeout(None)
        rank = hello.get("rank") if kind == channel.HELLO and isinstance(hello, dict) else None
        if (hello.get("job") != self.kvsname or hello.get("token") != self.job.token
                or not isinstance(rank, int) or not 0 <= rank < self.size or rank in self.conns):
            sock.close()
            return
        self.conns[rank] = sock
        self.hosts[rank] = hello.get("host", "?")
        self.sel.register(sock, selectors.EVENT_READ, rank)

    def _send_stdin(self) -> None:
        """Rank 0's stdin from the caller's (a file object, or bytes), until end of input."""
        sock = self.conns[0]
        source = self.stdin
        try:
            if isinstance(source, (bytes, bytearray)):
                if source:
                    channel.send_message(sock, channel.STDIN, bytes(source))
            else:
                fd = source.fileno()
                while 0 not in self.exits:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    channel.send_message(sock, channel.STDIN, chunk)
            channel.send_message(sock, channel.STDIN, b"")
        except (OSError, ValueError):
            pass  # the rank is gone; its exit says why

    def _drain(self, until: float) -> None:
        """After an abort: collect the exits that are still coming, until ``until``."""
        while len(self.exits) < self.size and time.monotonic() < until:
            self._poll(0.05)

    def _teardown(self, stage: threading.Thread) -> None:
        self.job.close()
        if not self.stage_done.wait(self.settings.kill_grace + 5.0):
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
            if failure is not None and failure.exit_code is not None:
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
            if self.stage_error is not None and not self.exits:
                message += f"; the Spark stage failed: {str(self.stage_error).strip().splitlines()[0][:300]}"
        elif self.stage_error is not None:
            returncode = 1
            message = f"the Spark stage failed: {str(self.stage_error).strip().splitlines()[0][:300]}"
        return ProgramResult(returncode=returncode, exit_codes=codes, stdout=[bytes(b) for b in self.stdout],
                             stderr=[bytes(b) for b in self.stderr], hosts=hosts, message=message,
                             records=list(self.records) if returncode == 0 else [])


def _check_argv(argv) -> list:
    if isinstance(argv, (str, bytes)) or not hasattr(argv, "__iter__"):
        raise InvalidArgumentType(f"argv: expected a list of strings such as ['./prog', '-x'], got {argv!r}")
    argv = list(argv)
    if not argv or not all(isinstance(a, str) and a for a in argv[:1]) or \
            not all(isinstance(a, str) for a in argv):
        raise InvalidArgument(f"argv: expected a non-empty list of strings, got {argv!r}")
    return argv


def _check_env(env) -> dict:
    if env is None:
        return {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                                            for k, v in env.items()):
        raise InvalidArgumentType(f"env: expected a dict of str names to str values, got {env!r}")
    return dict(env)


def _settings(settings, overrides) -> Settings:
    from .world import _settings as world_settings

    return world_settings(settings, overrides)


def run_program(spark, argv, *, ranks: int, env: dict | None = None, cwd: str | None = None,
                timeout: float | None = None, stdin=None, echo: bool = False, prefix_rank: bool = False,
                files=(), check: bool = False, settings: Settings | None = None, **setting_overrides: Any) -> ProgramResult:
    """Run the MPI program ``argv`` as ``ranks`` Spark barrier tasks, like ``mpiexec -n ranks argv``.

    Parameters
    ----------
    spark : SparkSession or SparkContext
    argv : list of str
        The program and its arguments (``["python", "script.py"]``, ``["./a.out", "-n", "3"]``),
        resolved on the executors (the venv's ``bin`` is first on PATH).
    ranks : int
        Size of the program's ``MPI_COMM_WORLD``: one task slot each.
    env : dict, optional
        Extra environment variables for every rank.
    cwd : str, optional
        Working directory of the ranks (default: the Spark worker's).
    timeout : float, optional
        Seconds the whole job may take; then every rank is stopped and
        :attr:`ProgramResult.returncode` is 124.
    stdin : bytes or binary file, optional
        Rank 0's standard input (others read end-of-file at once).
    echo, prefix_rank : bool
        Write the ranks' output to this process's stdout/stderr as it comes
        (whole lines; with ``[rank] `` before each, like ``mpiexec -prepend-rank``).
    files : list of str
        Local files to ship to every executor (``SparkContext.addFile``);
        without ``cwd`` the ranks run in the executor's folder of them, which
        is also first on PATH and in ``$SPARKMPI_FILES_DIR``.
    check : bool
        Raise :class:`~sparkmpi.JobFailed` when a rank failed.

    Returns
    -------
    ProgramResult
        Exit status as ``mpiexec`` gives it, each rank's status and output.
    """
    sc = getattr(spark, "sparkContext", spark)
    if not hasattr(sc, "parallelize") or not hasattr(sc, "cancelJobsWithTag"):
        raise InvalidArgumentType(f"spark: expected a SparkSession or SparkContext, got {type(spark).__name__}")
    argv = _check_argv(argv)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise InvalidArgument(f"ranks: expected a positive integer, got {ranks!r}")
    env = _check_env(env)
    if cwd is not None and not isinstance(cwd, str):
        raise InvalidArgumentType(f"cwd: expected a directory path, got {cwd!r}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
    if stdin is not None and not isinstance(stdin, (bytes, bytearray)) and not hasattr(stdin, "fileno"):
        raise InvalidArgumentType(f"stdin: expected bytes or a binary file, got {type(stdin).__name__}")
    cores = local_cores(sc.master)
    if cores is not None and ranks > cores:
        raise InvalidArgument(f"ranks={ranks} but master {sc.master!r} has {cores} task slots; "
                              f"each rank needs one (use ranks <= {cores})")
    if isinstance(files, str) or not all(isinstance(f, str) for f in files):
        raise InvalidArgumentType(f"files: expected a list of paths, got {files!r}")
    for path in files:
        if not os.path.isfile(path):
            raise InvalidArgument(f"files: {path!r} is not a file")
    settings = _settings(settings, setting_overrides)
    for path in files:
        sc.addFile(os.path.abspath(path))
    job = ProgramJob(sc, ranks, argv, settings=settings, env=env, cwd=cwd, stdin=stdin, echo=echo,
                     prefix_rank=prefix_rank, files=bool(files))
    result = job.run(sc.parallelize(range(ranks), ranks), timeout)
    return result.check() if check else result


def pipe(rdd, argv, *, binary: bool = False, env: dict | None = None, cwd: str | None = None,
         timeout: float | None = None, settings: Settings | None = None, **setting_overrides: Any) -> list:
    """Like ``RDD.pipe``, but the program's ranks form one MPI world.

    Rank ``i`` runs ``argv`` with partition ``i``'s records on its stdin: one
    line per record (``str`` of it), or with ``binary`` each record (bytes
    or a NumPy array, written C-ordered) after its length in bytes as an
    8-byte little-endian integer.  The lines the ranks print on stdout are
    the result, in rank order; their stderr goes to this process's.

    Returns
    -------
    list of str
        The printed lines, rank 0's first (without newlines).

    Raises
    ------
    JobFailed
        When a rank exited non-zero, was killed, called MPI_Abort, or the
        job timed out; the message names rank, host and cause.
    """
    if not hasattr(rdd, "barrier") or not hasattr(rdd, "getNumPartitions"):
        raise InvalidArgumentType(f"rdd: expected a pyspark RDD, got {type(rdd).__name__}")
    argv = _check_argv(argv)
    env = _check_env(env)
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
    sc = rdd.context
    size = rdd.getNumPartitions()
    if size < 1:
        raise InvalidArgument("rdd has no partitions; an MPI job needs at least one rank")
    cores = local_cores(sc.master)
    if cores is not None and size > cores:
        raise InvalidArgument(f"rdd has {size} partitions but master {sc.master!r} has {cores} task slots; "
                              f"each rank needs one (repartition to <= {cores})")
    settings = _settings(settings, setting_overrides)
    job = ProgramJob(sc, size, argv, settings=settings, env=env, cwd=cwd, pipe=True, binary=binary)
    job.echo = _LineEcho(prefix_rank=True)  # stderr only: stdout is the result
    result = job.run(rdd, timeout)
    if result.returncode != 0:
        cls = JobTimeout if result.returncode == 124 else JobFailed
        tails = "".join(f"\n--- stderr of rank {r} ---\n{err.decode('utf-8', 'replace')[-2000:]}"
                        for r, err in enumerate(result.stderr) if err)
        raise cls(f"sparkmpi.pipe: {result.message}{tails}", job_id=job.kvsname, cause=result.message or "")
    return result.records
