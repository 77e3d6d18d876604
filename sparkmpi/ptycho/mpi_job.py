"""Run one distributed reconstruction as an MPI program (one process per rank).

Usage (what the tests and ``sparkmpi bench ptycho --ranks N`` run)::

    mpiexec -n 2 python -m sparkmpi.ptycho.mpi_job DATA.npz --out RESULT.npz \\
        --algorithm dm --iterations 100

Every rank loads the file, keeps its contiguous share of the frames
(:func:`split_frames`), and calls :func:`sparkmpi.ptycho.reconstruct_rank`.
Rank 0 writes ``RESULT.npz`` with ``object``, ``probe``, ``errors``,
``seconds`` (iterations only, the slowest rank) and ``ranks``.  A rank that fails aborts the whole job
(``comm.Abort``), so no rank is left waiting in a collective.

A Spark-MPI task (:func:`sparkmpi.ptycho.spark.reconstruct_mpi`) calls the
same :func:`~sparkmpi.ptycho.reconstruct_rank`: only where the frames come
from differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import numpy as np

from ..errors import InvalidArgument


def split_frames(n_frames: int, size: int, rank: int) -> slice:
    """Contiguous share of ``n_frames`` for ``rank`` of ``size`` (sizes differ by <= 1)."""
    if not 0 <= rank < size:
        raise InvalidArgument(f"rank must be in [0, {size}), got {rank}")
    if n_frames < size:
        raise InvalidArgument(f"{n_frames} frames cannot be split over {size} ranks "
                         f"(each rank needs at least one frame)")
    edges = np.linspace(0, n_frames, size + 1).round().astype(int)
    return slice(int(edges[rank]), int(edges[rank + 1]))


def ranks_on_node(comm) -> int:
    """How many ranks of ``comm`` share this rank's node (``MPI_COMM_TYPE_SHARED``)."""
    try:
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return int(local.Get_size())
        finally:
            local.Free()
    except Exception:  # not a real communicator (tests), or no shared-memory split
        return int(getattr(comm, "size", 1))


def threads_per_rank(comm) -> int:
    """Cores of this node divided by the ranks on it (at least 1).

    With as many ranks on a node as cores each rank runs its FFTs and kernels
    on one thread, so the node is not oversubscribed.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, ranks_on_node(comm)))


def _probe_init(data, how: str):
    from .simulate import model_probe

    if how == "data":
        return None
    if how == "true":
        if data.probe_true is None:
            raise InvalidArgument("--probe-init true needs probe_true in the data file")
        return data.probe_true
    return model_probe(data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparkmpi.ptycho.mpi_job",
                                     description="distributed ptychographic reconstruction")
    parser.add_argument("data", help="NPZ file written by 'sparkmpi ptycho simulate'")
    parser.add_argument("--out", required=True, help="result NPZ written by rank 0")
    parser.add_argument("--algorithm", choices=("dm", "raar"), default="dm")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--probe-update-start", type=int, default=10,
                        help="first iteration that refines the probe (-1: never)")
    parser.add_argument("--probe-init", choices=("model", "data", "true"), default="model")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--kernels", choices=("auto", "numba", "numpy"), default="auto",
                        help="CPU kernels: fused numba (auto when installed) or NumPy")
    parser.add_argument("--probe-modes", type=int, default=1,
                        help="incoherent probe modes, 1-4 (more than 1: the generic engine)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per rank (default: cores / ranks on the node)")
    args = parser.parse_args(argv)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        from .engines import reconstruct_rank
        from .simulate import load

        data = load(args.data)
        share = split_frames(data.n_frames, comm.size, comm.rank)
        result = reconstruct_rank(comm, data.intensities[share], data.positions[share],
                                  data.object_shape, algorithm=args.algorithm,
                                  iterations=args.iterations,
                                  probe_update_start=(None if args.probe_update_start < 0
                                                      else args.probe_update_start),
                                  probe=_probe_init(data, args.probe_init),
                                  backend=args.backend, kernels=args.kernels,
                                  threads=args.threads, probe_modes=args.probe_modes)
        if comm.rank == 0:
            tmp = args.out + ".part"
            with open(tmp, "wb") as fh:
                np.savez(fh, object=result.object, probe=result.probe, errors=result.errors,
                         probe_modes=result.probe_modes,
                         seconds=np.float64(result.seconds), ranks=np.int64(comm.size),
                         frames_per_rank=np.asarray(comm.gather(share.stop - share.start)))
            os.replace(tmp, args.out)
        else:
            comm.gather(share.stop - share.start)
    except BaseException:
        sys.stderr.write(f"rank {comm.rank} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        comm.Abort(1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
