"""Rank functions in a plain local module (shipped by value by sparkmpi.run)."""


def rank_and_size(comm, records):
    from mpi4py import MPI

    return [(MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), len(list(records)))]


def fail_on_rank_one(comm, records):
    if comm.rank == 1:
        raise RuntimeError("detector file missing on rank one")
    comm.Barrier()
    return [comm.rank]
