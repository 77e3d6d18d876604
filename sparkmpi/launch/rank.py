"""Entry point of a rank process: ``python -m sparkmpi.launch.rank``.

Started by a Spark task (directly, or ahead of time as a warm spare; or
forked by the worker's fork server, :mod:`.fork_server`, which runs steps 1-2 once
and :func:`serve` in each child), it

1. asks the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``) and
   exits at once if the parent is already gone;
2. imports NumPy and mpi4py with automatic MPI initialisation turned off, and
   says READY;
3. waits for one JOB message (rank, size, environment, records to park
   under keys, and the PMI socket as a passed file descriptor), initialises MPI over that socket (``PMI_FD``),
   checks that ``COMM_WORLD``'s rank is the one asked for, and says STARTED
   (passing the read end of a pipe that is now its stdout);
4. serves its world: DATA messages park records (a partition) under a key,
   each CALL runs ``fn(comm, state, *args, **kwargs)`` with ``state`` a dict
   that lives as long as the process, and answers RESULT; CLOSE finalises MPI
   and answers CLOSED.  Any failure sends ERROR with the traceback and ends
   the process: MPI cannot go on without a rank.

A process serves one world only: MPI can be initialised once per process.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import socket
import sys
import traceback

from sparkmpi._proc import die_with_parent
from sparkmpi.config import setting

PR_SET_NAME = 15
#: The process name (``/proc/PID/comm``, what ``ps``/``top`` show) of every rank.
PROCESS_NAME = "sparkmpi-rank"
#: A warm spare that gets no job within this many seconds exits by itself.
IDLE_EXIT_S = setting("rank_idle_exit_s")


def set_process_name(name: str) -> None:
    """Name this process for ``ps`` and ``top`` (at most 15 bytes are kept)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def _thread_level(MPI, name: str) -> int:
    return {"single": MPI.THREAD_SINGLE, "funneled": MPI.THREAD_FUNNELED,
            "serialized": MPI.THREAD_SERIALIZED}.get(name, MPI.THREAD_MULTIPLE)


def load_modules() -> None:
    """The imports a rank needs before its job; MPI stays uninitialised."""
    import mpi4py

    mpi4py.rc.initialize = False  # MPI_Init waits for the job's PMI socket
    mpi4py.rc.finalize = False    # finalised here, before results are sent
    from mpi4py import MPI  # noqa: F401
    import numpy  # noqa: F401  (warm import: most rank functions use it)
    import numpy.random  # noqa: F401  (loaded lazily by NumPy: 13 ms on first use, and forked ranks reseed it)
    import cloudpickle  # noqa: F401  (the user's function was pickled with it)

    from sparkmpi.launch import channel  # noqa: F401


def _capture_stdout() -> int:
    """Point fd 1 at a new pipe (line-buffered); return the pipe's read end for the relay."""
    sys.stdout.flush()
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    sys.stdout.reconfigure(line_buffering=True)
    return read_end


def _resolve(value, inputs: dict):
    """A call argument, with a :class:`~.channel.PartitionRef` replaced by its records' iterator."""
    from sparkmpi.launch.channel import PartitionRef

    if isinstance(value, PartitionRef):
        if value.key not in inputs:
            raise RuntimeError(f"no records were delivered under {value.key!r} before the call")
        return iter(inputs.pop(value.key))
    return value


def serve(ctrl: socket.socket) -> None:
    """Say READY on ``ctrl``, serve the one world that comes, and exit the process."""
    import pickle

    import mpi4py
    from mpi4py import MPI

    from sparkmpi.launch import channel

    # Lead a process group of our own: whatever the job's code starts and leaves
    # behind is killed with the group when the task ends (SparePool.end_rank_group in pool.py).
    os.setpgid(0, 0)
    channel.send_message(ctrl, channel.READY, os.getpid())
    ctrl.settimeout(IDLE_EXIT_S)
    try:
        kind, job, fds = channel.recv_message(ctrl)
    except (channel.ChannelClosed, socket.timeout, ConnectionError):
        os._exit(0)  # an unused spare: nothing to report
    ctrl.settimeout(None)
    if kind != channel.JOB or len(fds) != 1:
        os._exit(71)

    rank, size = job["rank"], job["size"]
    os.environ.update(job.get("env") or {})
    os.environ.update({"PMI_FD": str(fds[0]), "PMI_RANK": str(rank), "PMI_SIZE": str(size)})
    try:
        MPI.Init_thread(_thread_level(MPI, mpi4py.rc.thread_level))
        comm = MPI.COMM_WORLD
        if comm.Get_rank() != rank or comm.Get_size() != size:
            raise RuntimeError(f"MPI reports rank {comm.Get_rank()} of {comm.Get_size()}, "
                               f"expected rank {rank} of {size}")
        stdout_pipe = _capture_stdout()
        channel.send_message(ctrl, channel.STARTED, os.getpid(), fds=(stdout_pipe,))
        os.close(stdout_pipe)
        state: dict = {}
        inputs: dict = job.get("inputs") or {}
        del job
        while True:
            kind, message, _ = channel.recv_message(ctrl)
            if kind == channel.DATA:
                inputs[message["key"]] = message["records"]
            elif kind == channel.CALL:
                fn = pickle.loads(message["fn"])
                args = [_resolve(a, inputs) for a in message["args"]]
                value = fn(comm, state, *args, **message["kwargs"])
                sys.stdout.flush()
                sys.stderr.flush()
                channel.send_message(ctrl, channel.RESULT, {"id": message["id"], "value": value})
            elif kind == channel.CLOSE:
                break
            else:
                raise RuntimeError(f"unexpected message kind {channel.KIND_NAMES.get(kind, kind)} from the relay")
        del state, inputs
        if not MPI.Is_finalized():
            MPI.Finalize()
        sys.stdout.flush()
        sys.stderr.flush()
        channel.send_message(ctrl, channel.CLOSED, os.getpid())
    except BaseException as exc:  # noqa: BLE001  (every failure is reported, then the process ends)
        report = {"type": type(exc).__name__, "message": str(exc)[:2000],
                  "traceback": traceback.format_exc()}
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            channel.send_message(ctrl, channel.ERROR, report)
        except (OSError, ValueError):
            pass
        os._exit(1)  # skip atexit: MPI_Finalize would wait for ranks that may be gone
    os._exit(0)


def main() -> None:
    parent_pid = int(os.environ.pop("SPARKMPI_PARENT_PID"))
    die_with_parent(parent_pid)
    set_process_name(PROCESS_NAME)
    ctrl = socket.socket(fileno=int(os.environ.pop("SPARKMPI_RANK_CTRL_FD")))
    # On a job timeout the relay asks for every thread's stack before the kill.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    load_modules()
    serve(ctrl)


if __name__ == "__main__":
    main()
