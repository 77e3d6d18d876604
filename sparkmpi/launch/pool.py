"""Rank processes, started fresh or kept ready as warm spares.

PySpark reuses its Python workers, and MPI can be initialised only once per
process, so every rank of every job runs in its own child interpreter.
Starting one (Python, NumPy, mpi4py imports) costs more than a whole trivial
Spark job, so each Spark Python worker keeps ``warm_pool`` spares that have
done their imports and wait, MPI not initialised, for a job.  A spare serves
exactly one job; it is then gone, and a new spare is started in its place
after the task ends.  Spares die with their worker (``PR_SET_PDEATHSIG``) and
exit by themselves when idle too long.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

_spares: list["RankProcess"] = []


@dataclass
class RankProcess:
    """A child interpreter running :mod:`sparkmpi.launch.rank`."""

    popen: subprocess.Popen
    ctrl: socket.socket
    pidfd: int
    started: float = field(default_factory=time.monotonic)
    ready: bool = False  # its READY message was consumed (by wait_ready)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 1.0) -> int | None:
        """Terminate, wait up to ``grace`` s, then kill; always reaps.  Returns the exit status."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
            except ProcessLookupError:
                pass
        self.close()
        return self.popen.returncode

    def close(self) -> None:
        """Release the parent's handles (after the child has exited)."""
        self.ctrl.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
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


def spawn() -> RankProcess:
    """Start a rank process now (it imports, says READY, waits for a job)."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env.update({"SPARKMPI_PARENT_PID": str(os.getpid()),
                "SPARKMPI_RANK_CTRL_FD": str(child_end.fileno()),
                "PYTHONPATH": _child_pythonpath()})
    try:
        popen = subprocess.Popen([sys.executable, "-m", "sparkmpi.launch.rank"],
                                 stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 pass_fds=(child_end.fileno(),), env=env, close_fds=True)
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    os.set_blocking(popen.stderr.fileno(), False)
    return RankProcess(popen=popen, ctrl=parent_end, pidfd=os.pidfd_open(popen.pid))


def acquire() -> RankProcess:
    """The oldest live warm spare (the likeliest to have finished its imports),
    else a freshly started process."""
    while _spares:
        proc = _spares.pop(0)
        if proc.alive():
            return proc
        proc.stop(0)
    return spawn()


def replenish(count: int) -> None:
    """Start spares until ``count`` live ones wait (dead ones are reaped)."""
    for proc in [p for p in _spares if not p.alive()]:
        _spares.remove(proc)
        proc.stop(0)
    while len(_spares) < count:
        _spares.append(spawn())


def wait_ready(timeout: float = 10.0) -> int:
    """Wait until every spare has finished its imports (said READY); return how many are ready."""
    import selectors

    from . import channel

    deadline = time.monotonic() + timeout
    ready = 0
    for proc in list(_spares):
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
