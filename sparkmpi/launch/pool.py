"""Rank processes: forked by the worker's fork server, or started fresh, kept ready as warm spares.

PySpark reuses its Python workers, and MPI can be initialised only once per
process, so every rank of every job runs in its own process.  Starting an
interpreter (Python, NumPy, mpi4py imports) costs about 0.2 s of CPU, more
than a whole trivial Spark job, so

* each Spark Python worker runs one fork server (:mod:`.fork_server`) that has
  done those imports and forks ranks on request (``fork_server``; when it
  cannot be used, ranks start as fresh interpreters);
* each worker keeps ``warm_pool`` spares that wait, MPI not initialised, for
  a job.  A spare serves exactly one job; it is then gone, and a new spare
  is made in its place after the task ends.

Ranks and the fork server die with their worker (``PR_SET_PDEATHSIG``);
spares exit by themselves when idle too long.  Each rank leads its own
process group, so what its code started in the background and left running
is killed with it at the end of the task (:func:`end_rank_group`); those
processes were re-parented to this worker (a subreaper), which reaps them.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .._proc import pid_running, stop_process
from . import channel

PR_SET_CHILD_SUBREAPER = 36


class ForkedChild:
    """The ``subprocess.Popen`` subset the launcher uses, for a rank made by the fork server.

    The rank is this process's child (re-parented to it, a subreaper), so it
    is waited for and signalled like one.
    """

    def __init__(self, pid: int, stderr, pidfd: int):
        self.pid, self.stderr, self._pidfd = pid, stderr, pidfd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Never ours (re-parented elsewhere): no status to read.
                if not pid_running(self.pid):
                    self.returncode = 255
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"rank process {self.pid}", timeout)
            # The pidfd turns readable when the process exits; the short cap
            # covers the case where it is already closed.
            select.select([self._pidfd] if self._pidfd >= 0 else [], [], [], min(left or 0.05, 0.05))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class RankProcess:
    """A rank process: a child interpreter running :mod:`sparkmpi.launch.rank`, or forked by :mod:`.fork_server`."""

    popen: "subprocess.Popen | ForkedChild"
    ctrl: socket.socket
    pidfd: int
    started: float = field(default_factory=time.monotonic)
    ready: bool = False  # its READY message was consumed (by wait_ready)
    preload: tuple = ()  # modules the fork server was asked to import before forking it

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 1.0) -> int | None:
        """Terminate, wait up to ``grace`` s, then kill; always reaps.  Returns the exit status."""
        status = stop_process(self.popen, grace)
        self.close()
        return status

    def close(self) -> None:
        """Release the parent's handles (after the child has exited)."""
        self.ctrl.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
            if isinstance(self.popen, ForkedChild):
                self.popen._pidfd = -1
        if self.popen.stderr is not None:
            self.popen.stderr.close()


def _child_pythonpath() -> str:
    # The child sees what this worker sees: sparkmpi, pyspark's zips, and
    # files shipped with SparkContext.addPyFile.
    paths = [p for p in sys.path if p]
    old = os.environ.get("PYTHONPATH")
    if old:
        paths.append(old)
    return os.pathsep.join(dict.fromkeys(paths))


def _child_env(ctrl_fd: int) -> dict:
    env = dict(os.environ)
    env.update({"SPARKMPI_PARENT_PID": str(os.getpid()),
                "SPARKMPI_RANK_CTRL_FD": str(ctrl_fd),
                "PYTHONPATH": _child_pythonpath()})
    return env


def spawn_fresh() -> RankProcess:
    """Start a rank process as a new interpreter (it imports, says READY, waits for a job)."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        popen = subprocess.Popen([sys.executable, "-m", "sparkmpi.launch.rank"],
                                 stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 pass_fds=(child_end.fileno(),), env=_child_env(child_end.fileno()),
                                 close_fds=True)
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    os.set_blocking(popen.stderr.fileno(), False)
    return RankProcess(popen=popen, ctrl=parent_end, pidfd=os.pidfd_open(popen.pid))


class ForkServerError(RuntimeError):
    """The fork server could not start or answer; ranks start as fresh interpreters instead."""


class _ForkServer:
    """This worker's :mod:`.fork_server` process and its control socket."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout   # for its imports, and for one fork
        libc = ctypes.CDLL(None, use_errno=True)
        # Ranks forked by the server are re-parented to this process (see fork_server).
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise ForkServerError(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")
        self.ctrl, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # stderr stays the worker's: a server that fails says why in the executor log.
            self.popen = subprocess.Popen([sys.executable, "-m", "sparkmpi.launch.fork_server"],
                                          stdin=subprocess.DEVNULL, pass_fds=(child_end.fileno(),),
                                          env=_child_env(child_end.fileno()), close_fds=True)
        except BaseException:
            self.ctrl.close()
            raise
        finally:
            child_end.close()
        self.ready = False
        # requested, not yet collected: (control socket, stderr pipe, modules preloaded)
        self.pending: deque[tuple[socket.socket, int, tuple]] = deque()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_ready(self, timeout: float) -> bool:
        """True once the server has finished its imports (waits up to ``timeout`` s)."""
        if not self.ready:
            if not select.select([self.ctrl], [], [], timeout)[0]:
                return False
            # The message has begun; its remaining parts follow at once (a timeout
            # of 0 here would make a message split across reads look like a failure).
            kind, _ = self._receive(max(timeout, 5.0))
            if kind != channel.READY:
                raise ForkServerError(f"the fork server said {channel.KIND_NAMES.get(kind, kind)} instead of ready")
            self.ready = True
        return True

    def _receive(self, timeout: float) -> tuple[int, object]:
        """One message from the server: ``(kind, payload)`` (it never sends descriptors)."""
        self.ctrl.settimeout(timeout)
        try:
            kind, payload, fds = channel.recv_message(self.ctrl)
        except (OSError, EOFError, ValueError) as exc:
            raise ForkServerError(f"the fork server stopped answering: {exc or type(exc).__name__}") from None
        finally:
            self.ctrl.settimeout(None)
        for fd in fds:
            os.close(fd)
        return kind, payload

    def request(self, preload=()) -> None:
        """Ask for one more rank; it is picked up, in order, by :meth:`collect`.

        Asking does not wait: the server forks while the caller goes on (a
        task returns its results meanwhile).  The server first imports the
        modules of ``preload`` it has not imported yet (see :mod:`.fork_server`).
        """
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err_read, err_write = os.pipe()
        request = {"preload": list(preload)} if preload else None
        try:
            channel.send_message(self.ctrl, channel.FORK, request, fds=(child_end.fileno(), err_write))
        except OSError as exc:
            parent_end.close()
            os.close(err_read)
            raise ForkServerError(f"the fork server is gone: {exc}") from None
        finally:
            child_end.close()
            os.close(err_write)
        self.pending.append((parent_end, err_read, tuple(preload)))

    def answer_waiting(self) -> bool:
        return bool(select.select([self.ctrl], [], [], 0)[0])

    def collect(self, timeout: float | None = None) -> RankProcess:
        """The rank of the oldest pending request (waits up to ``timeout`` s for it)."""
        timeout = self.timeout if timeout is None else timeout
        parent_end, err_read, preload = self.pending.popleft()
        try:
            kind, pid = self._receive(timeout)
            if kind != channel.FORKED or not isinstance(pid, int) or pid <= 0:
                raise ForkServerError(f"the fork server answered {channel.KIND_NAMES.get(kind, kind)} {pid!r}")
            pidfd = os.pidfd_open(pid)
        except BaseException:
            parent_end.close()
            os.close(err_read)
            raise
        os.set_blocking(err_read, False)
        stderr = os.fdopen(err_read, "rb", buffering=0)
        return RankProcess(popen=ForkedChild(pid, stderr, pidfd), ctrl=parent_end, pidfd=pidfd,
                           preload=preload)

    def fork(self, timeout: float | None = None, preload=()) -> RankProcess:
        """A rank now: the oldest pending one, else a new one, with ``preload``
        imported first: this job waits for the imports so that the spares
        forked after it have them (BENCHMARKS.md, "Launcher: why it is
        written as it is")."""
        timeout = self.timeout if timeout is None else timeout
        if not self.check_ready(timeout):
            raise ForkServerError(f"the fork server did not finish its imports within {timeout:.0f} s")
        if not self.pending:
            self.request(preload)
        return self.collect(timeout)

    def close(self, kill: bool = False) -> None:
        while self.pending:
            parent_end, err_read, _ = self.pending.popleft()
            parent_end.close()
            os.close(err_read)
        self.ctrl.close()  # the server exits when its channel closes
        stop_process(self.popen, 0 if kill else 2, sig=signal.SIGKILL if kill else 0)


class SparePool:
    """One Spark Python worker's rank processes: its fork server, the warm
    spares, and the process groups of ended ranks still to reap.

    A worker has one (:func:`worker_pool`); its methods may be called from
    the task threads and from the replenish timer, so each holds :attr:`lock`.
    """

    def __init__(self, *, fork_timeout: float = 60.0, max_server_failures: int = 3,
                 replenish_delay: float = 0.1, group_watch_s: float = 60.0) -> None:
        #: Seconds to wait for the fork server's imports, and for one fork.
        self.fork_timeout = fork_timeout
        #: After this many failures of its fork server, the worker starts fresh interpreters only.
        self.max_server_failures = max_server_failures
        #: Seconds after a task before the spares that replace its rank are forked.
        self.replenish_delay = replenish_delay
        #: Seconds after which an ended group is no longer watched (its members are not ours to reap).
        self.group_watch_s = group_watch_s
        self.lock = threading.RLock()
        self.spares: list[RankProcess] = []
        self.server: _ForkServer | None = None
        self.server_failures = 0
        self._later: threading.Timer | None = None
        self._ended_groups: dict[int, float] = {}   # pgid -> when its rank ended

    # -- the fork server --------------------------------------------------

    def fork_server(self, start: bool) -> _ForkServer | None:
        """This worker's fork server (a dead one is replaced when ``start``); None if unusable."""
        with self.lock:
            if self.server is not None and not self.server.alive():
                self.server.close()
                self.server = None
            if self.server is None and start and self.server_failures < self.max_server_failures:
                try:
                    self.server = _ForkServer(self.fork_timeout)
                except (OSError, ForkServerError) as exc:
                    self._server_failed(str(exc))
            return self.server

    def _server_failed(self, reason: str) -> None:
        self.server_failures += 1
        if self.server_failures >= self.max_server_failures:
            print(f"sparkmpi: the rank fork server failed {self.server_failures} times (last: {reason}); "
                  f"this worker starts ranks as fresh interpreters from now on", file=sys.stderr, flush=True)
        if self.server is not None:
            self.server.close(kill=True)  # it failed: it may be stuck
            self.server = None

    def _collect_forks(self, block: bool) -> None:
        """Move the fork server's finished forks to the spares (all pending ones if ``block``)."""
        server = self.server
        while server is not None and server.pending and (block or server.answer_waiting()):
            try:
                self.spares.append(server.collect())
            except (OSError, ForkServerError) as exc:
                self._server_failed(str(exc))
                return

    def _drop_dead_spares(self) -> None:
        for proc in [p for p in self.spares if not p.alive()]:
            self.spares.remove(proc)
            proc.stop(0)

    # -- ranks for tasks --------------------------------------------------

    def spawn(self, fork_server: bool = True, preload=()) -> RankProcess:
        """Make a rank process now: forked by the fork server if possible, else a fresh interpreter."""
        with self.lock:
            server = self.fork_server(start=True) if fork_server else None
            if server is not None:
                try:
                    return server.fork(preload=preload)
                except (OSError, ForkServerError) as exc:
                    self._server_failed(str(exc))
            return spawn_fresh()

    def acquire(self, fork_server: bool = True, preload=()) -> RankProcess:
        """The oldest live warm spare (the likeliest to have finished its imports),
        else a new rank process."""
        with self.lock:
            self.reap_ended_groups()
            self._collect_forks(block=False)
            for proc in list(self.spares):
                if not proc.alive():
                    self.spares.remove(proc)
                    proc.stop(0)
                elif fork_server or not isinstance(proc.popen, ForkedChild):
                    self.spares.remove(proc)
                    return proc
            return self.spawn(fork_server, preload)

    def replenish(self, count: int, fork_server: bool = True, *, block: bool = False, preload=()) -> None:
        """Make spares until ``count`` live ones wait or are being forked (dead ones are reaped).

        Never waits for the fork server unless ``block``: forks are requested
        and picked up by a later call, and with the server still importing
        nothing is requested yet.  With ``block``, returns with every spare made.
        The fork server imports the modules of ``preload`` before it forks them.
        """
        with self.lock:
            self._collect_forks(block=False)
            self._drop_dead_spares()
            server = self.fork_server(start=True) if fork_server else None
            pending = len(server.pending) if server is not None else 0
            if len(self.spares) + pending < count or (block and pending):
                if server is not None:
                    try:
                        if server.check_ready(self.fork_timeout if block else 0.0):
                            for _ in range(count - len(self.spares) - pending):
                                server.request(preload)
                            if block:
                                self._collect_forks(block=True)
                        return
                    except ForkServerError as exc:
                        self._server_failed(str(exc))
                while len(self.spares) < count:
                    self.spares.append(self.spawn(fork_server, preload))

    def replenish_soon(self, count: int, fork_server: bool = True, *, preload=(),
                       delay: float | None = None) -> None:
        """:meth:`replenish`, a moment after the task that called it has returned.

        Forking a spare right away (fork, copy-on-write faults, the child's start)
        takes CPU from the Spark task's own return (BENCHMARKS.md, "Launcher: why
        it is written as it is").  With a ready fork server the request is sent
        ``delay`` s later from a timer thread (a task in between uses the other
        spare, or forks its rank itself).
        Processes are never *started* from that thread, since a child's
        parent-death signal follows the thread that started it; without a ready
        server this replenishes now.
        """
        delay = self.replenish_delay if delay is None else delay
        with self.lock:
            server = self.server
            if not fork_server or server is None or not server.alive() or not server.ready or delay <= 0:
                self.replenish(count, fork_server, preload=preload)
                return
            if self._later is not None and self._later.is_alive():
                return   # one is due already (back-to-back tasks)
            self._later = threading.Timer(delay, self._replenish_from_server, args=(count, tuple(preload)))
            self._later.daemon = True
            self._later.start()

    def _replenish_from_server(self, count: int, preload: tuple) -> None:
        """Timer body: request spares from the running fork server only (starts no process)."""
        with self.lock:
            self.reap_ended_groups()
            try:
                self._collect_forks(block=False)
                server = self.server
                if server is None or not server.alive() or not server.ready:
                    return   # the next task makes its rank itself
                live = [p for p in self.spares if p.alive()]
                for _ in range(count - len(live) - len(server.pending)):
                    server.request(preload)
            except (OSError, ForkServerError) as exc:
                print(f"sparkmpi: could not ask the fork server for spares: {exc}", file=sys.stderr, flush=True)

    def drop_spares_without(self, preload) -> int:
        """Stop the spares forked before the modules of ``preload`` were asked for
        (so the next ones have them), and any spares due from the timer; returns
        how many were stopped.  Hold :attr:`lock` until the replacements are
        requested, or the timer may request spares without them meanwhile."""
        wanted = set(preload)
        with self.lock:
            if self._later is not None:
                self._later.cancel()
            # Forks requested earlier (by the timer, say) may lack them too: collect
            # them now, so they are judged with the rest instead of becoming spares later.
            self._collect_forks(block=True)
            stale = [p for p in self.spares if not wanted <= set(p.preload)]   # fresh interpreters too
            for proc in stale:
                self.spares.remove(proc)
                proc.stop(0)
        return len(stale)

    def prepare(self, count: int, fork_server: bool, preload=(), timeout: float = 10.0) -> int:
        """Have ``count`` spares with ``preload`` imported, ready; returns how many are ready."""
        with self.lock:   # no spares from the replenish timer between the two calls
            if preload and fork_server:
                self.drop_spares_without(preload)
            self.replenish(count, fork_server, block=True, preload=preload)
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 10.0) -> int:
        """Wait until every spare has finished its imports (said READY); return how many are ready."""
        import selectors

        deadline = time.monotonic() + timeout
        ready = 0
        for proc in list(self.spares):
            if proc.ready:
                ready += 1
                continue
            with selectors.DefaultSelector() as sel:
                sel.register(proc.ctrl, selectors.EVENT_READ)
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    continue
            try:
                kind, _, fds = channel.recv_message(proc.ctrl)
            except (channel.ChannelClosed, OSError, ValueError):
                continue  # a dead spare: acquire() skips it
            for fd in fds:
                os.close(fd)
            proc.ready = kind == channel.READY
            ready += proc.ready
        return ready

    def clear(self) -> None:
        """Stop every spare and the fork server (a worker that is going away)."""
        with self.lock:
            if self._later is not None:
                self._later.cancel()
            for proc in self.spares:
                proc.stop(0)
            self.spares.clear()
            if self.server is not None:
                self.server.close(kill=True)
                self.server = None

    # -- what ended ranks left behind -------------------------------------

    def end_rank_group(self, pgid: int) -> None:
        """Kill what is left of a finished rank's process group (background
        processes its code started) and reap those that became this worker's
        children.  Call after the rank itself has been reaped: the rank is a
        member of its own group, and its exit status is read by its owner."""
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return   # nothing left of the group
        with self.lock:
            self._ended_groups[pgid] = time.monotonic()
            self.reap_ended_groups()

    def reap_ended_groups(self) -> None:
        """Reap the killed members of ended rank groups that were re-parented here
        (called again later for those that had not died yet)."""
        with self.lock:
            now = time.monotonic()
            for pgid, ended in list(self._ended_groups.items()):
                while True:
                    try:
                        pid, _ = os.waitpid(-pgid, os.WNOHANG)
                    except ChildProcessError:
                        pid = 0
                    if pid == 0:
                        break
                try:
                    os.killpg(pgid, 0)
                    gone = now - ended > self.group_watch_s
                except (ProcessLookupError, PermissionError):
                    gone = True
                if gone:
                    del self._ended_groups[pgid]


_worker_pool: SparePool | None = None
_worker_pool_lock = threading.Lock()


def worker_pool() -> SparePool:
    """This process's pool (a Spark Python worker has one, made on first use)."""
    global _worker_pool
    with _worker_pool_lock:
        if _worker_pool is None:
            _worker_pool = SparePool()
        return _worker_pool
