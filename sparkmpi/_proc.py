"""Small process helpers shared by the launcher, the broker tooling, the cluster helper and the viewer tooling.

* :func:`die_with_parent` asks Linux to kill this process when its parent dies
  (``PR_SET_PDEATHSIG``), first thing in a child interpreter;
  :func:`with_parent_death` does the same for any command (``setpriv``, no
  Python between fork and exec).
* :func:`free_port` picks a TCP port that is free right now.
* :func:`stop_process` is the one terminate-wait-kill: signal, wait up to a
  grace period, SIGKILL, and always reap; it returns the exit status.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import time

from .errors import InvalidArgument, InvalidArgumentType, ProcessError

__all__ = ["pid_running", "die_with_parent", "with_parent_death", "free_port", "stop_process"]

PR_SET_PDEATHSIG = 1
#: Exit status of a child whose parent was gone before it asked for the parent-death signal.
PARENT_GONE_EXIT = 70
# Loaded once in the parent, so a preexec_fn after fork() does no dlopen.
_LIBC = ctypes.CDLL(None, use_errno=True)


def pid_running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent thread dies.

    Parameters
    ----------
    parent_pid : int, optional
        The pid the parent had before the fork.  When the parent is no longer
        it (it died before the request took effect), this process exits at
        once with status :data:`PARENT_GONE_EXIT`.
    sig : int
        The signal to receive (default SIGKILL).

    Raises
    ------
    OSError
        When ``prctl`` refuses (not Linux, or a bad signal number).
    """
    if _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG, {int(sig)}) failed: {os.strerror(errno)}")
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(PARENT_GONE_EXIT)


def with_parent_death(argv: list, sig: str = "KILL") -> list:
    """``argv`` run under util-linux's ``setpriv --pdeathsig``: the child dies
    with the calling thread, and no Python runs between fork and exec (a
    ``preexec_fn`` there can deadlock on a lock another thread held at the
    fork: a Py4J connection's finaliser logging, say).  A parent that dies
    before ``setpriv`` has made its request (the first milliseconds) leaves
    the child running; where ``setpriv`` is missing the child does not get
    the signal."""
    setpriv = shutil.which("setpriv")
    return [setpriv, f"--pdeathsig={sig}", "--", *argv] if setpriv else list(argv)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (another process may take it later)."""
    if not isinstance(host, str) or not host:
        raise InvalidArgument(f"host: expected a host name or address, got {host!r}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """True while a live (not zombie) process is in group ``pgid``; kill(0) also counts zombies."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        entries = None
    if entries is None:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                state, _ppid, pgrp = fh.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


class _Pid:
    """A bare pid as a minimal Popen: reaped with waitpid when it is our child."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                got, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Not our child: there is no status to read, only whether it runs.
                return None if pid_running(self.pid) else -1
            if got:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def known_status(self) -> int | None:
        return self.returncode


def _wait(proc, until: float) -> bool:
    """Poll ``proc`` until it is gone or ``until`` (monotonic) passes; True if it is gone."""
    delay = 0.005
    while proc.poll() is None:
        left = until - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, delay))
        delay = min(delay * 2, 0.1)
    return True


def stop_process(proc, grace: float = 5.0, *, sig: int = signal.SIGTERM, group: bool = False,
                 kill_timeout: float = 10.0) -> int | None:
    """Stop a process: send ``sig``, wait up to ``grace`` s, then SIGKILL; always reap.

    Parameters
    ----------
    proc : subprocess.Popen, Popen-like, or int
        The process: a Popen (or an object with ``pid``, ``poll``, ``wait``),
        or a bare pid.  A pid that is this process's child is reaped with
        ``waitpid``; any other pid is only watched until it is gone.
    grace : float
        Seconds between ``sig`` and SIGKILL; 0 kills at once.
    sig : int
        The first signal (default SIGTERM); 0 sends none (wait for the
        process to go by itself, then kill it).
    group : bool
        Signal the process group led by the process (``start_new_session``
        children: a JVM's shell wrapper and what it started), and wait for
        the whole group to go, not just its leader.
    kill_timeout : float
        Seconds to wait after SIGKILL.

    Returns
    -------
    int or None
        The exit status as :attr:`subprocess.Popen.returncode` gives it
        (negative: killed by that signal); None for a pid that is not this
        process's child (its status cannot be read).

    Raises
    ------
    ProcessError
        When the process (or its group) is still there ``kill_timeout`` s
        after SIGKILL (stuck in the kernel).
    """
    if not grace >= 0:
        raise InvalidArgument(f"grace: expected seconds >= 0, got {grace!r}")
    if isinstance(proc, bool) or not (isinstance(proc, int) or hasattr(proc, "poll")):
        raise InvalidArgumentType(f"proc: expected a subprocess.Popen or a pid, got {proc!r}")
    handle = _Pid(proc) if isinstance(proc, int) else proc
    pid = handle.pid

    def gone() -> bool:
        return handle.poll() is not None and not (group and _group_alive(pid))

    if not gone():
        if sig:
            _signal(pid, sig, group)
        deadline = time.monotonic() + grace
        _wait(handle, deadline)
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.02)  # the leader is reaped; the rest of its group is still exiting
        if not gone():
            _signal(pid, signal.SIGKILL, group)
            deadline = time.monotonic() + kill_timeout
            _wait(handle, deadline)
            while not gone() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not gone():
                what = f"process group {pid}" if group and handle.poll() is not None else f"process {pid}"
                raise ProcessError(f"{what} is still alive {kill_timeout:.0f} s after SIGKILL")
    if isinstance(handle, _Pid):
        return handle.known_status()
    return handle.returncode
