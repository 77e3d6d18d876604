"""Processes started by ``MPI_Comm_spawn``: run by the relay of the spawning rank.

When a rank spawns, the driver's PMI server opens a key space for the
children (with the keys the parent preput, among them MPICH's
``PARENT_ROOT_PORT_NAME``) and tells the parent's relay to start them with
a control line (``cmd=sparkmpi-spawn``, :mod:`sparkmpi.pmi.control`).  The relay starts every child on its own
executor, next to the spawning rank: Spark gives the children no task slot
of their own (a barrier stage cannot grow), and the spawning rank's host is
the one place sure to be running the job.  Each child gets ``PMI_FD``,
``PMI_RANK``, ``PMI_SIZE`` and ``PMI_SPAWNED=1``, and its own connection
to the server as a rank of the children's job, so the children form their
own ``COMM_WORLD`` and MPICH connects them to the parents through the port
it preput.  Their output joins the spawning rank's; they are stopped
(their process groups) when the spawning rank's task ends.

:class:`SpawnedChildren` runs the children's PMI relaying and output in one
thread of its own; the relay thread only starts them and collects their
output through :meth:`SpawnedChildren.take_output`.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time

from .._proc import stop_process, with_parent_death
from ..pmi import control
from ..pmi.wire import LineBuffer, parse_line
from . import shm

#: Info keys of MPI_Comm_spawn that are honoured; others are accepted and ignored.
HONOURED_INFO = ("wdir", "path", "host")


def host_problem(host: str | None, here: str) -> str | None:
    """Why the info key ``host`` cannot be honoured on ``here`` (None: it names this host, or is unset).

    Children run on the spawning rank's executor (they have no task slot of
    their own), so a ``host`` naming another machine is refused rather than
    silently ignored: ``mpiexec`` would start them there."""
    if not host:
        return None
    wanted = host.strip().lower()
    names = {here.lower(), here.lower().split(".")[0], "localhost", "127.0.0.1"}
    if wanted in names or wanted.split(".")[0] in names:
        return None
    try:
        if socket.gethostbyname(wanted) == socket.gethostbyname(here):
            return None
    except OSError:
        pass
    return (f"info host={host!r} names another host, but children started by MPI_Comm_spawn run on the "
            f"spawning rank's host ({here}): Spark gives them no task slot elsewhere. Spawn from a rank on "
            f"{host}, or leave the key out")


class _Child:
    def __init__(self, rank: int, popen, pmi: socket.socket, server: socket.socket):
        self.rank, self.popen, self.pmi, self.server = rank, popen, pmi, server
        self.from_pmi, self.from_server = LineBuffer(), LineBuffer()
        self.pidfd = os.pidfd_open(popen.pid)
        self.aborted = False
        self.done = False
        self.partial = {1: b"", 2: b""}


class SpawnedChildren:
    """The children a relay started for its rank's spawns, and the thread that serves them."""

    def __init__(self, server_address: tuple[str, int], host: str, partition: int, env: dict,
                 kill_grace: float):
        self.server_address, self.host, self.partition = server_address, host, partition
        self.env, self.kill_grace = env, kill_grace
        self.children: list[_Child] = []
        self.jobs: list[str] = []
        self._lock = threading.Lock()
        self._output: list[tuple[int, bytes]] = []
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the relay thread --------------------------------------------------------
    def start(self, job: str, token: str, commands: list) -> str | None:
        """Start the children of one spawn; None, or why they could not all start."""
        started: list[_Child] = []
        self.jobs.append(job)
        for command in commands:
            problem = host_problem(dict(command.get("info", [])).get("host"), self.host)
            if problem is not None:
                return problem
        rank = 0
        try:
            for command in commands:
                argv = [command["execname"], *command.get("args", [])]
                info = dict(command.get("info", []))
                for _ in range(int(command["nprocs"])):
                    started.append(self._start_one(job, token, rank, len_total(commands), argv, info))
                    rank += 1
        except (OSError, RuntimeError) as exc:
            for child in started:
                self._kill(child)
                self._close_child(child)
            return f"could not start {argv[0]!r} for MPI_Comm_spawn on {self.host}: {exc}"
        with self._lock:
            self.children += started
            for child in started:
                self._register(child)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sparkmpi-spawned", daemon=True)
            self._thread.start()
        self._wake_w.send(b"x")
        return None

    def _start_one(self, job, token, rank, size, argv, info) -> _Child:
        path = os.pathsep.join(p for p in (info.get("path"), self.env.get("PATH")) if p)
        wdir = info.get("wdir") or None
        if shutil.which(argv[0], path=path) is None and not (
                wdir and os.sep in argv[0] and shutil.which(os.path.join(wdir, argv[0]))):
            raise RuntimeError(f"no executable {argv[0]!r} (PATH={path})")
        server = socket.create_connection(self.server_address, timeout=10.0)
        try:
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server.sendall(control.Hello(job=job, token=token, rank=rank, partition=self.partition,
                                         host=self.host, pid=os.getpid()).encode())
            first = LineBuffer()
            lines: list = []
            while not lines:
                data = server.recv(4096)
                if not data:
                    raise RuntimeError("the PMI server closed the connection")
                lines = first.feed(data)
            reply = parse_line(lines[0])
            if reply.name != control.WELCOME:
                raise RuntimeError(f"the PMI server refused child {rank}: {control.decode_text(reply)}")
            server.settimeout(None)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            env = {**self.env, "PMI_FD": str(theirs.fileno()), "PMI_RANK": str(rank), "PMI_SIZE": str(size),
                   "PMI_SPAWNED": "1"}
            if info.get("path"):
                env["PATH"] = os.pathsep.join([info["path"], env.get("PATH", "")])
            try:
                popen = subprocess.Popen(with_parent_death(argv), env=env, cwd=info.get("wdir") or None,
                                         pass_fds=(theirs.fileno(),), close_fds=True, start_new_session=True,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            except OSError:
                ours.close()
                raise
            finally:
                theirs.close()
        except BaseException:
            server.close()
            raise
        for pipe in (popen.stdout, popen.stderr):
            os.set_blocking(pipe.fileno(), False)
        return _Child(rank, popen, ours, server)

    def take_output(self) -> list[tuple[int, bytes]]:
        """What the children wrote since the last call, as ``(stream, data)``."""
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            out, self._output = self._output, []
        return out

    @property
    def running(self) -> bool:
        """Whether any child started so far has not yet exited (and reported so to the server)."""
        with self._lock:
            return any(not child.done for child in self.children)

    def kill_all(self) -> None:
        """SIGKILL every child's process group now (the job was aborted)."""
        for child in list(self.children):
            self._kill(child)

    def stop(self) -> None:
        """Stop every child (its process group) and the thread; always reaps.

        Children still running get the kill grace to end on their own first,
        served as before (a Python rank's world may close while its children
        finalise): one that ends reports ``done``, and only one that does not
        is stopped, its job failing as a lost relay."""
        deadline = time.monotonic() + self.kill_grace
        while self._thread is not None and self._thread.is_alive() and self.running \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(self.kill_grace + 15.0)
        for child in self.children:
            try:
                stop_process(child.popen, self.kill_grace, group=True)
            except Exception:  # noqa: BLE001  (stuck in the kernel: nothing more to do)
                pass
            self._close_child(child)
        self._sel.close()
        self.wake_r.close()
        self._wake_w.close()
        for job in self.jobs:
            shm.remove_job_segments(job)  # MPICH names the children's segments after their kvsname

    # -- the children's thread ---------------------------------------------------
    def _register(self, child: _Child) -> None:
        self._sel.register(child.pmi, selectors.EVENT_READ, (child, "pmi"))
        self._sel.register(child.server, selectors.EVENT_READ, (child, "server"))
        self._sel.register(child.popen.stdout, selectors.EVENT_READ, (child, 1))
        self._sel.register(child.popen.stderr, selectors.EVENT_READ, (child, 2))
        self._sel.register(child.pidfd, selectors.EVENT_READ, (child, "exit"))

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                pending = any(not c.done for c in self.children)
            if not pending:
                time.sleep(0.05)
                continue
            try:
                events = self._sel.select(timeout=0.2)
            except (OSError, ValueError):
                return
            for key, _ in events:
                child, what = key.data
                self._readable(child, what, key.fileobj)

    def _readable(self, child: _Child, what, fileobj) -> None:
        if what == "pmi":
            data = _recv(child.pmi)
            if not data:
                self._sel.unregister(fileobj)
                return
            for line in child.from_pmi.feed(data):
                if not child.aborted:
                    _send(child.server, line + b"\n")
        elif what == "server":
            data = _recv(child.server)
            if not data:
                self._sel.unregister(fileobj)
                self._kill(child)
                return
            for line in child.from_server.feed(data):
                if line.startswith(b"cmd=" + control.PREFIX.encode()):
                    command = parse_line(line)
                    if command.name == control.ABORT:
                        child.aborted = True
                        self._kill(child)
                    elif command.name == control.SPAWN and not child.aborted:
                        self._spawn_from(child, command)
                else:
                    _send(child.pmi, line + b"\n")
        elif what in (1, 2):
            try:
                data = os.read(fileobj.fileno(), 65536)
            except BlockingIOError:
                return
            if not data:
                self._sel.unregister(fileobj)
                return
            # Whole lines only: the children's output joins the spawning rank's streams.
            *lines, child.partial[what] = (child.partial[what] + data).split(b"\n")
            if lines:
                with self._lock:
                    self._output.append((what, b"".join(line + b"\n" for line in lines)))
                _send(self._wake_w, b"x")
        elif what == "exit":
            self._sel.unregister(fileobj)
            status = child.popen.wait()
            for stream, pipe in ((1, child.popen.stdout), (2, child.popen.stderr)):
                try:
                    rest = os.read(pipe.fileno(), 65536)
                except (BlockingIOError, OSError):
                    rest = b""
                rest = child.partial[stream] + rest
                if rest:
                    with self._lock:
                        self._output.append((stream, rest if rest.endswith(b"\n") else rest + b"\n"))
            if not child.aborted:
                if status == 0:
                    _send(child.server, control.bare_line(control.DONE))
                else:
                    _send(child.server, control.text_line(
                        control.FAILED, f"spawned rank {child.rank} on {self.host} exited with status {status}"))
            with self._lock:
                child.done = True
            _send(self._wake_w, b"x")  # after done: the relay checks `running` once it has the output

    def _spawn_from(self, child: _Child, command) -> None:
        """A child called MPI_Comm_spawn: its children start here too, served by this thread."""
        job, token, commands = control.decode_spawn(command)
        error = self.start(job, token, commands)
        _send(child.server, control.spawned_line(error))
        if error is not None:
            with self._lock:  # MPICH shows only "PMI_Spawn_multiple returned -1": the reason goes to stderr
                self._output.append((2, f"sparkmpi: MPI_Comm_spawn failed in spawned rank {child.rank}: "
                                        f"{error}\n".encode()))
            _send(self._wake_w, b"x")

    def _kill(self, child: _Child) -> None:
        try:
            os.killpg(child.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _close_child(self, child: _Child) -> None:
        for sock in (child.pmi, child.server):
            sock.close()
        for pipe in (child.popen.stdout, child.popen.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
        if child.pidfd >= 0:
            os.close(child.pidfd)
            child.pidfd = -1


def len_total(commands: list) -> int:
    return sum(int(c["nprocs"]) for c in commands)


def _recv(sock) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _send(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
