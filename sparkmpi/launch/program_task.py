"""The executor side of an external MPI program: one Spark barrier task per rank.

The task's relay makes a socket pair, passes one end to the program as
``PMI_FD`` (with ``PMI_RANK`` and ``PMI_SIZE``), and relays PMI-1 lines
between it and the driver's PMI server, as for a Python rank (the shared
part is :class:`~.relay_adapter.RelayAdapter`).  The program's stdout and
stderr go to the driver's program endpoint as they are written; rank 0 gets
the driver's stdin (``exec``), or each rank its partition's records
(``pipe``); the driver's heartbeat PINGs are answered from the relay's
loop, whatever the program does.  What the relay decides is
:class:`~.program_relay.ProgramRelayState`; this module moves the bytes.
The programs run in process groups of their own, stopped (SIGTERM, then
SIGKILL after the kill grace) when the job fails, and die with their Spark
worker (``setpriv --pdeathsig``).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .._proc import stop_process, with_parent_death
from ..config import Settings
from ..errors import InvalidArgument, InvalidArgumentType
from ..pmi import control
from . import channel, interfaces, program_relay as pr, shm
from .relay_adapter import STDERR_TAIL, RankError, RelayAdapter, barrier_rank, connect_with_retry, send_quietly
from .task import NETMOD_VARIABLE, _task_hosts

#: Seconds to read what a program wrote before it exited, once it has.
DRAIN_S = 0.5
#: Bytes of framing before each binary record on a ``pipe`` rank's stdin (little-endian length).
FRAME_HEADER = 8


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
    the venv's ``bin`` first on PATH, the single-host netmod and the ``network_interface``
    variables (as for Python ranks)."""
    environ = dict(os.environ if environ is None else environ)
    env = {**environ, **spec.env}
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]) if bin_dir else env.get("PATH", "")
    netmod = spec.settings.single_host_netmod
    if netmod and len(set(task_hosts)) == 1 and NETMOD_VARIABLE not in env:
        env[NETMOD_VARIABLE] = netmod
    env.update(interfaces.interface_environment(spec.settings.network_interface, spec.env, environ))
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


class _ProgramRelay(RelayAdapter):
    """The socket adapter around :class:`~.program_relay.ProgramRelayState` for one rank."""

    def __init__(self, spec: ProgramSpec, rank: int):
        super().__init__((spec.server_host, spec.server_port), rank, spec.settings.kill_grace)
        self.spec = spec
        self.state = pr.ProgramRelayState(spec.kvsname, rank, self.where, self.host, keep_stdout=spec.pipe)
        self.driver = self.popen = None
        self.pidfd = -1
        self.stdin: _StdinWriter | None = None
        self.kept = bytearray()
        self.stderr_tail = bytearray()
        self.env: dict = {}

    def connect(self) -> None:
        spec = self.spec
        self.hello(spec.kvsname, spec.token)
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
        self.pidfd = os.pidfd_open(self.popen.pid)
        super().run([(self.driver, "driver"), (self.popen.stdout, 1), (self.popen.stderr, 2),
                     (self.pidfd, "exit")])

    def _readable_own(self, what) -> None:
        handle = self.state.handle
        if what == "driver":
            try:
                kind, message, _ = channel.recv_message(self.driver)
            except (channel.ChannelClosed, OSError, ValueError):
                self.sel.unregister(self.driver)
                self.execute(handle(pr.DriverClosed()))
                return
            if kind == channel.PING:
                self.answer_ping()
            elif kind == channel.STDIN:
                self.execute(handle(pr.DriverInput(bytes(message))))
        elif what in (1, 2):
            self._forward(what)
        elif what == "exit":
            self.sel.unregister(self.pidfd)  # its children may outlive it: the loop goes on without it
            self.forward_rank_pmi()  # an MPI_Abort it sent goes before its exit
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

    def _execute_own(self, action) -> bool:
        if isinstance(action, pr.Report):
            send_quietly(channel.send_message, self.driver, action.kind, action.payload)
        elif isinstance(action, pr.KeepOutput):
            self.kept += action.data
        elif isinstance(action, pr.ToStdin):
            if self.stdin is not None:
                self.stdin.feed([action.data])
        elif isinstance(action, pr.StopRank):
            self._stop_program()
            if self.children is not None:
                self.children.kill_all()
        elif isinstance(action, pr.Finish):
            return False
        return True

    def _children_env(self) -> dict:
        return self.env

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
        super().close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.popen is not None:
            try:
                stop_process(self.popen, self.spec.settings.kill_grace, group=True)
            except Exception:  # noqa: BLE001  (nothing more to do for a process stuck in the kernel)
                pass
            for pipe in (self.popen.stdout, self.popen.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()
        if self.driver is not None:
            self.driver.close()


class _StartFailed(RankError):
    """The program could not be started (not found, not executable)."""


def run_program_task(spec: ProgramSpec, iterator):
    """Body of one barrier task: run the program as rank = partition index until it exits."""
    context, rank, records = barrier_rank(spec.size, iterator, spec.pipe)
    relay = _ProgramRelay(spec, rank)
    try:
        relay.connect()
        try:
            problem = interfaces.missing_interface(spec.settings.network_interface,
                                                   [name for _, name in socket.if_nameindex()],
                                                   socket.gethostname())
            if problem is not None:   # before MPI starts, as for Python ranks
                raise _StartFailed(problem)
            relay.start(program_environment(spec, rank, -1, _task_hosts(context)), records)
        except _StartFailed as exc:
            # Reported like an exit: the job fails with the reason, the task ends normally.
            send_quietly(relay.server.sendall, control.text_line(control.FAILED, str(exc)))
            send_quietly(channel.send_message, relay.driver, channel.EXITED,
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
    # One record per task, the rank's lines: the driver keeps them apart, one partition per rank.
    return iter([relay.kept.decode("utf-8", "replace").splitlines()])
