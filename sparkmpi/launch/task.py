"""The executor side of a job: one Spark barrier task per rank.

Each task takes a rank process (:mod:`.pool`), connects to the driver's PMI
server with the job's token, hands the rank a private PMI socket (``PMI_FD``,
so the rank opens no port), and then relays: PMI lines from the rank to the
server and replies back, while it watches the rank for its result, its error,
or its death.  The server can order the relay to abort (another rank failed,
the job timed out); the relay then kills its rank.  Whatever happens, the rank
process is reaped and the job's shared-memory files are removed before the
task returns.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field

from ..pmi import control
from ..pmi.wire import LineBuffer, parse_line
from . import channel, pool, shm

STDERR_TAIL = 4000
CONNECT_TIMEOUT = 15.0


class RankError(RuntimeError):
    """Raised in a Spark task when its rank (or the job) failed."""


@dataclass(frozen=True)
class TaskSpec:
    """What every task of one job needs; pickled into the Spark closure."""

    server_host: str
    server_port: int
    kvsname: str
    token: str
    size: int
    fn: bytes
    env: dict = field(default_factory=dict)
    warm_pool: int = 2
    kill_grace: float = 1.0
    fork_server: bool = True
    single_host_netmod: str = ""
    preload: tuple = ()


def connect_with_retry(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """Connect to ``host:port``, retrying with backoff until ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=min(5.0, timeout))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise RankError(f"could not reach the sparkmpi PMI server at {host}:{port} "
                                f"after {timeout:.0f} s: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


class _Relay:
    def __init__(self, spec: TaskSpec, rank: int, proc: pool.RankProcess):
        self.spec, self.rank, self.proc = spec, rank, proc
        self.where = f"rank {rank} (partition {rank} on {socket.gethostname()})"
        self.stderr_tail = bytearray()

    # -- setup -------------------------------------------------------------
    def connect(self) -> None:
        spec = self.spec
        self.server = connect_with_retry(spec.server_host, spec.server_port)
        hello = control.Hello(job=spec.kvsname, token=spec.token, rank=self.rank, partition=self.rank,
                              host=socket.gethostname(), pid=os.getpid())
        self.server.sendall(hello.encode())
        self.from_server = LineBuffer()
        first = self._read_server_line(timeout=CONNECT_TIMEOUT)
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
                self._early = lines[1:]
                return lines[0]

    def start_rank(self, records: list, env: dict) -> None:
        pmi_ours, pmi_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pmi = pmi_ours
        job = {"rank": self.rank, "size": self.spec.size, "env": env, "fn": self.spec.fn}
        try:
            channel.send_message(self.proc.ctrl, channel.JOB, job, fds=(pmi_theirs.fileno(),))
        finally:
            pmi_theirs.close()
        channel.send_message(self.proc.ctrl, channel.DATA, records)

    # -- relay loop ----------------------------------------------------------
    def run(self) -> list:
        sel = selectors.DefaultSelector()
        sel.register(self.pmi, selectors.EVENT_READ, "rank-pmi")
        sel.register(self.server, selectors.EVENT_READ, "server")
        sel.register(self.proc.ctrl, selectors.EVENT_READ, "rank-ctrl")
        sel.register(self.proc.popen.stderr, selectors.EVENT_READ, "rank-stderr")
        sel.register(self.proc.pidfd, selectors.EVENT_READ, "rank-exit")
        from_rank = LineBuffer()
        pending_server_lines = list(self._early)
        try:
            while True:
                for line in pending_server_lines:
                    self._from_server(line)
                pending_server_lines = []
                for key, _ in sel.select(timeout=5.0):
                    what = key.data
                    if what == "rank-pmi":
                        data = self.pmi.recv(65536)
                        if data:
                            # Whole lines only, so our own control lines never split one.
                            for line in from_rank.feed(data):
                                self.server.sendall(line + b"\n")
                        else:
                            sel.unregister(self.pmi)  # rank closed PMI (finalised or died)
                    elif what == "server":
                        data = self.server.recv(65536)
                        if not data:
                            raise RankError(f"lost the connection to the PMI server; {self.where} stopped")
                        pending_server_lines = self.from_server.feed(data)
                    elif what == "rank-stderr":
                        self._drain_stderr()
                    elif what == "rank-ctrl":
                        results = self._from_rank_ctrl()
                        if results is not None:
                            return results
                    elif what == "rank-exit":
                        self._drain_stderr()
                        # A result may still be queued on the control socket.
                        while self._ctrl_readable():
                            results = self._from_rank_ctrl()
                            if results is not None:
                                return results
                        status = self.proc.popen.wait()
                        self._report_failure(f"{self.where} exited with status {_describe_status(status)} "
                                             f"before returning results{self._stderr_note()}")
        finally:
            sel.close()

    def _from_server(self, line: bytes) -> None:
        if line.startswith(b"cmd=" + control.PREFIX.encode()):
            command = parse_line(line)
            if command.name == control.ABORT:
                if command.get("stacks") == "1":
                    self._report_stacks()
                self.proc.stop(self.spec.kill_grace)
                raise RankError(f"job {self.spec.kvsname} aborted; {self.where} was stopped. "
                                f"Cause: {control.decode_text(command)}")
            raise RankError(f"unexpected control line from the PMI server: {line!r}")
        self.pmi.sendall(line + b"\n")

    def _report_stacks(self) -> None:
        """Ask the rank for its threads' stacks (faulthandler on SIGUSR1) and report them."""
        if not self.proc.alive():
            return
        self.proc.popen.send_signal(signal.SIGUSR1)
        stacks = bytearray()
        deadline = time.monotonic() + 1.0
        quiet_since = time.monotonic()
        # Read until the dump has been quiet for 0.2 s (or 1 s in all).
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.2:
            chunk = self._drain_stderr()
            if chunk:
                stacks += chunk
                quiet_since = time.monotonic()
            time.sleep(0.02)
        text = stacks.decode("utf-8", "replace").strip() or "(no stack received)"
        try:
            self.server.sendall(control.text_line(control.FAILED, text[-8000:]))
        except OSError:
            pass

    def _ctrl_readable(self) -> bool:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.ctrl, selectors.EVENT_READ)
        try:
            return bool(sel.select(timeout=0.2))
        finally:
            sel.close()

    def _from_rank_ctrl(self) -> list | None:
        """Handle one message from the rank: its results, or None for READY."""
        try:
            kind, payload, fds = channel.recv_message(self.proc.ctrl)
        except (channel.ChannelClosed, ConnectionError):
            status = self.proc.popen.wait()
            self._drain_stderr()
            self._report_failure(f"{self.where} exited with status {_describe_status(status)} "
                                 f"before returning results{self._stderr_note()}")
        for fd in fds:
            os.close(fd)
        if kind == channel.READY:
            return None
        if kind == channel.RESULT:
            self.server.sendall(control.bare_line(control.DONE))
            return payload
        if kind == channel.ERROR:
            self._report_failure(f"{self.where} raised {payload['type']}: {payload['message']}\n\n"
                                 f"Remote traceback:\n{payload['traceback']}")
        self._report_failure(f"{self.where} sent an unexpected message kind {kind}")

    def _report_failure(self, cause: str) -> None:
        try:
            self.server.sendall(control.text_line(control.FAILED, cause))
        except OSError:
            pass
        raise RankError(cause)

    def _drain_stderr(self) -> bytes:
        """Read what the rank wrote to stderr so far; echo it, keep a tail, return it."""
        stream = self.proc.popen.stderr
        read = bytearray()
        while True:
            try:
                chunk = os.read(stream.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            os.write(2, chunk)  # keep the rank's stderr in the executor's log
            read += chunk
        self.stderr_tail += read
        del self.stderr_tail[:-STDERR_TAIL]
        return bytes(read)

    def _stderr_note(self) -> str:
        text = self.stderr_tail.decode("utf-8", "replace").strip()
        return f"; its stderr ended with:\n{text}" if text else ""

    def close(self) -> None:
        for sock in (getattr(self, "pmi", None), getattr(self, "server", None)):
            if sock is not None:
                sock.close()


def _describe_status(status: int | None) -> str:
    if status is None:
        return "unknown"
    if status < 0:
        try:
            return f"{status} (killed by {signal.Signals(-status).name})"
        except ValueError:
            return str(status)
    return str(status)


NETMOD_VARIABLE = "MPIR_CVAR_CH4_NETMOD"


def rank_environment(spec: TaskSpec, task_hosts, environ=None) -> dict:
    """The environment additions for this job's rank: the job's ``env``, plus
    ``MPIR_CVAR_CH4_NETMOD=spec.single_host_netmod`` when every task of the
    stage (``task_hosts``) is on one host and nobody chose a netmod already."""
    env = dict(spec.env)
    environ = os.environ if environ is None else environ
    if (spec.single_host_netmod and len(set(task_hosts)) == 1
            and NETMOD_VARIABLE not in env and NETMOD_VARIABLE not in environ):
        env[NETMOD_VARIABLE] = spec.single_host_netmod
    return env


def _task_hosts(context) -> list:
    """Host of every task in the barrier stage (``host:port`` addresses, port dropped)."""
    return [info.address.rsplit(":", 1)[0] for info in context.getTaskInfos()]


def run_rank_task(spec: TaskSpec, iterator):
    """Body of one barrier task: run rank = partition index; yield its results."""
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    rank = context.partitionId()
    if not (0 <= rank < spec.size):
        raise RankError(f"partition {rank} is outside the job's {spec.size} ranks")
    records = list(iterator)
    proc = pool.acquire(spec.fork_server, spec.preload)
    relay = _Relay(spec, rank, proc)
    try:
        relay.connect()
        relay.start_rank(records, rank_environment(spec, _task_hosts(context)))
        del records
        results = relay.run()
        # The rank finalised and is exiting; reap it.
        try:
            proc.popen.wait(timeout=10)
        except Exception:
            pass
    finally:
        relay.close()
        proc.stop(spec.kill_grace)
        pool.end_rank_group(proc.pid)
        shm.remove_job_segments(spec.kvsname)
        pool.replenish_soon(spec.warm_pool, spec.fork_server, preload=spec.preload)
    return iter(results)
