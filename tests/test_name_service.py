"""Name publishing and a failing spawn inside ``sparkmpi.run``: real Spark, real MPICH ranks."""

import sparkmpi


def connect_two_groups(comm, partition):
    # Group 0 (even ranks) accepts on a published port; group 1 (odd ranks) looks it up and connects.
    from mpi4py import MPI

    color = comm.rank % 2
    group = comm.Split(color, comm.rank)
    service = "sparkmpi-test-ocean"
    if color == 0:
        port = MPI.Open_port() if group.rank == 0 else None
        if group.rank == 0:
            MPI.Publish_name(service, port)
        comm.Barrier()
        inter = group.Accept(port, root=0)
    else:
        comm.Barrier()  # the name is published before anyone looks it up
        port = MPI.Lookup_name(service) if group.rank == 0 else None
        inter = group.Connect(port, root=0)
    # Each side sends its world ranks' sum to the other.
    mine = group.allreduce(comm.rank)
    theirs = inter.allreduce(mine)  # intercommunicator: the reduction of the *other* group
    inter.Disconnect()
    comm.Barrier()
    if color == 0 and group.rank == 0:
        MPI.Unpublish_name(service, port)
        MPI.Close_port(port)
    comm.Barrier()  # unpublished before anyone looks again
    try:
        MPI.Lookup_name(service)
        gone = False
    except MPI.Exception as exc:
        gone = exc.Get_error_class() == MPI.ERR_NAME
    group.Free()
    return [(comm.rank, color, mine, theirs, gone)]


def test_open_port_accept_connect_through_published_names(sc):
    results = sparkmpi.run(sc.parallelize(range(2), 2), connect_two_groups, timeout=60)
    # rank 0 is group 0 (world ranks {0}), rank 1 group 1 ({1}): each sees the other's sum.
    assert results == [(0, 0, 0, 1, True), (1, 1, 1, 0, True)]
