"""Rank functions in a plain local module (shipped by value by sparkmpi.run)."""


def rank_and_size(comm, records):
    from mpi4py import MPI

    return [(MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), len(list(records)))]


def fail_on_rank_one(comm, records):
    if comm.rank == 1:
        raise RuntimeError("detector file missing on rank one")
    comm.Barrier()
    return [comm.rank]


def _executor_pid():
    """The pid of the executor JVM this rank runs under (walking up the parents)."""
    import os

    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"CoarseGrainedExecutorBackend" in fh.read():
                return pid
        with open(f"/proc/{pid}/stat") as fh:
            pid = int(fh.read().rsplit(")", 1)[1].split()[1])
    raise RuntimeError("no executor JVM among this rank's ancestors")


def executor_pid(comm, records):
    list(records)
    return [(comm.rank, _executor_pid())]


def kill_own_executor(comm, records):
    """Rank 0 SIGKILLs the executor both ranks run under, in the middle of the job."""
    import os
    import signal

    list(records)
    comm.Barrier()
    if comm.rank == 0:
        os.kill(_executor_pid(), signal.SIGKILL)
    comm.Barrier()  # never completes: the executor, its Python workers and the ranks are gone
    return [comm.rank]
