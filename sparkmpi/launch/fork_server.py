"""The fork server of a Spark Python worker: ``python -m sparkmpi.launch.fork_server``.

Every rank of every job needs a fresh process (MPI initialises once per
process), and a fresh interpreter spends about 0.2 s of CPU importing Python,
NumPy and mpi4py.  At a few micro-batches per second on two cores that was
some 40 % of the machine.  The fork server does those imports once and forks a
rank per request instead (a few milliseconds).

Protocol on its control socket (:mod:`.channel` messages): it says READY when
its imports are done; each FORK message carries two descriptors, the rank's
control socket and the write end of its stderr pipe, and optionally a list of
modules to import first (``{"preload": [...]}``); the answer is FORKED with
the new rank's pid.

A module to preload is first imported in a throwaway child: only if that
child has started no threads afterwards (forking a process with threads
leaves their locks held in the child; the pools of OpenBLAS and scipy.fft
are the exception, as they stop themselves before a fork) is it imported in
the server itself.
A module that fails either way is not tried again; the ranks import it
themselves, and a failure then reaches the job's caller with its traceback.
A preloaded module may define ``_sparkmpi_fork_server_warm_up()``, called
once after its import (in the throwaway child first, so the same thread
check covers it) for work every rank would otherwise repeat, such as loading
JIT-compiled code.

The rank is forked twice so that it ends up a child of the Spark worker
itself, not of the fork server: the worker is a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so when the intermediate process exits the
rank is re-parented to it.  The worker can then wait for the rank and read
its exit status like any child, and the rank's parent-death signal is tied to
the worker, as for a rank started directly.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import struct
import sys
import time
import traceback

from .._proc import die_with_parent
from . import rank

#: The fork server's process name (``/proc/PID/comm``).
PROCESS_NAME = "sparkmpi-zygote"
#: Seconds a forked rank waits to be re-parented to the worker.
REPARENT_TIMEOUT_S = 5.0
#: Seconds the throwaway child may take to import a module to preload.
PRELOAD_CHECK_TIMEOUT_S = 60.0

#: Optional function of a preloaded module, called once after its import.
WARM_UP_HOOK = "_sparkmpi_fork_server_warm_up"

_preload_tried: set[str] = set()


def _import_and_warm(name: str) -> None:
    import importlib

    module = importlib.import_module(name)
    hook = getattr(module, WARM_UP_HOOK, None)
    if callable(hook):
        hook()


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _start_fork_safe_pools() -> None:
    """Start the worker threads of OpenBLAS (NumPy's BLAS) and of scipy.fft's
    pocketfft, so a module check counts only threads beyond them.  Both stop
    their threads before a fork and start them again after it
    (``pthread_atfork``), so a server that has them can fork safely."""
    import numpy

    numpy.dot(numpy.ones((256, 256)), numpy.ones((256, 256)))
    try:
        import scipy.fft
    except ImportError:
        return
    scipy.fft.fft(numpy.ones(64, dtype=numpy.complex64), workers=1)


def _import_check(name: str) -> str | None:
    """Import (and warm up) ``name`` in a throwaway child; None if that works
    and starts no threads beyond the fork-safe pools, else why not."""
    import select
    import threading

    others = threading.active_count() - 1
    if others:
        # The child would run those threads' thread-local finalizers (CPython clears every other
        # thread's state after a fork): Py4J's close their connections to the JVM with a
        # shutdown(), which cuts the parent's own connections.  The fork server has no threads.
        return (f"not checked: the check forks, and this process has {others} other Python thread(s) "
                f"(the fork server has none)")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            _start_fork_safe_pools()
            baseline = _thread_count()
            _import_and_warm(name)
            threads = _thread_count()
            reason = "" if threads <= baseline else \
                f"it leaves {threads - baseline} thread(s) running after import"
        except BaseException as exc:  # noqa: BLE001  (reported to the server)
            reason = f"importing it failed: {type(exc).__name__}: {exc}"
        try:
            os.write(write_end, reason.encode()[:4000] or b"ok")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        if not select.select([read_end], [], [], PRELOAD_CHECK_TIMEOUT_S)[0]:
            os.kill(pid, signal.SIGKILL)
            return f"importing it took more than {PRELOAD_CHECK_TIMEOUT_S:.0f} s"
        answer = os.read(read_end, 4096).decode(errors="replace")
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    if answer == "ok":
        return None
    return answer or "the import check died"


def preload(names) -> None:
    """Import each module of ``names`` not tried yet, if it is safe to fork after (see above)."""
    for name in names:
        if not isinstance(name, str) or name in _preload_tried:
            continue
        _preload_tried.add(name)
        if name in sys.modules:
            continue
        reason = _import_check(name)
        if reason is None:
            try:
                _import_and_warm(name)
            except BaseException as exc:  # noqa: BLE001
                reason = f"importing it failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            print(f"sparkmpi fork server: not preloading {name}: {reason}", file=sys.stderr, flush=True)


def _become_rank(server_ctrl: socket.socket, worker_pid: int, ctrl_fd: int, stderr_fd: int) -> None:
    """In the grandchild: take the rank's descriptors, attach to the worker, serve one job."""
    try:
        server_ctrl.close()
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        deadline = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() != worker_pid:
            if time.monotonic() > deadline:
                os._exit(72)  # not re-parented: the worker is gone (or no subreaper)
            time.sleep(0.0002)
        die_with_parent(worker_pid)
        rank.set_process_name(rank.PROCESS_NAME)
        import numpy

        numpy.random.seed()  # fresh entropy, as a new interpreter would have; not the fork server's state
        rank.serve(socket.socket(fileno=ctrl_fd))
    except BaseException:  # noqa: BLE001  (a rank that cannot start says why on its stderr)
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(74)


def fork_rank(server_ctrl: socket.socket, worker_pid: int, ctrl_fd: int, stderr_fd: int) -> int:
    """Fork a rank (via an intermediate process); return its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                _become_rank(server_ctrl, worker_pid, ctrl_fd, stderr_fd)
            os.write(write_end, struct.pack("!i", pid))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = b""
        while len(data) < 4:
            chunk = os.read(read_end, 4 - len(data))
            if not chunk:
                raise RuntimeError("the intermediate process exited without reporting the rank's pid")
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(middle, 0)
    return struct.unpack("!i", data)[0]


def main() -> None:
    from . import channel

    worker_pid = int(os.environ.pop("SPARKMPI_PARENT_PID"))
    die_with_parent(worker_pid)
    rank.set_process_name(PROCESS_NAME)
    ctrl = socket.socket(fileno=int(os.environ.pop("SPARKMPI_RANK_CTRL_FD")))
    # Inherited by every rank: on a job timeout the relay asks for stacks.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    rank.load_modules()
    channel.send_message(ctrl, channel.READY, os.getpid())
    while True:
        try:
            kind, request, fds = channel.recv_message(ctrl)
        except (channel.ChannelClosed, ConnectionError, ValueError):
            os._exit(0)  # the worker closed the channel (or is gone)
        if kind != channel.FORK or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            print(f"sparkmpi fork server: unexpected request kind {kind} with {len(fds)} descriptors",
                  file=sys.stderr, flush=True)
            os._exit(73)
        try:
            if isinstance(request, dict) and request.get("preload"):
                preload(request["preload"])
            pid = fork_rank(ctrl, worker_pid, fds[0], fds[1])
        finally:
            for fd in fds:
                os.close(fd)
        channel.send_message(ctrl, channel.FORKED, pid)


if __name__ == "__main__":
    main()
