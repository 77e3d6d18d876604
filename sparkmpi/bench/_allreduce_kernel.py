"""The timed Allreduce loop shared by the Spark-MPI job and the native run.

Also runnable under MPICH's own launcher, with no Spark at all::

    mpiexec -n 2 python -m sparkmpi.bench._allreduce_kernel --elements 2000000 --repeat 10 --runs 5

which prints one JSON object (rank 0) with the per-run mean Allreduce times.
"""

from __future__ import annotations

import time


def timed_allreduce(comm, elements: int, repeat: int) -> tuple[float, float]:
    """Mean seconds per Allreduce of ``elements`` float32 over ``repeat`` calls.

    As the paper's allreduce.py: the send buffer is ``arange(n)`` with its last
    element set to the iteration number.  One untimed call first sets up
    MPICH's buffers.  Returns ``(mean_seconds, last_element_of_result)``; the
    slowest rank's time is what a collective costs, so the max over ranks is
    returned on every rank.
    """
    import numpy as np
    from mpi4py import MPI

    send = np.arange(elements, dtype=np.float32)
    recv = np.empty_like(send)
    comm.Allreduce(send, recv, op=MPI.SUM)
    comm.Barrier()
    started = time.perf_counter()
    for i in range(repeat):
        send[elements - 1] = i
        comm.Allreduce(send, recv, op=MPI.SUM)
    mean = (time.perf_counter() - started) / repeat
    return comm.allreduce(mean, op=MPI.MAX), float(recv[elements - 1])


def main(argv=None) -> None:
    # Imported here: the ranks of the Spark-MPI job import this module for
    # timed_allreduce alone, and argparse plus json cost them a few ms each job.
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--elements", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    runs = [timed_allreduce(comm, args.elements, args.repeat) for _ in range(args.runs)]
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "allreduce_s": [r[0] for r in runs], "last": runs[-1][1]}))


if __name__ == "__main__":
    main()
