"""The same MPI programs under the mpich wheel's ``mpiexec`` (Hydra) and under sparkmpi: same
exit statuses, same output, for what a PMI-1 server provides (spawn, spawn_multiple, name
publishing with port connect/accept, MPI_Abort, exit codes, environment, arguments)."""

import os
import subprocess
import sys
import textwrap

import pytest

import sparkmpi

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")

# Every program prints from rank 0 only (after gathering), so the output does not depend on
# how a launcher interleaves the ranks' streams.
PROGRAMS = {
    "spawn": """
        import sys
        from mpi4py import MPI
        if len(sys.argv) > 1:
            parent = MPI.Comm.Get_parent()
            parent.gather((MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size), root=0)
            parent.Disconnect()
        else:
            inter = MPI.COMM_WORLD.Spawn(sys.executable, args=[sys.argv[0], "child"], maxprocs=3)
            got = inter.gather(None, root=MPI.ROOT if MPI.COMM_WORLD.rank == 0 else MPI.PROC_NULL)
            if MPI.COMM_WORLD.rank == 0:
                print("children", got, "remote size", inter.Get_remote_size())
            inter.Disconnect()
    """,
    "spawn_multiple": """
        import sys
        from mpi4py import MPI
        if len(sys.argv) > 1:
            parent = MPI.Comm.Get_parent()
            parent.gather((MPI.COMM_WORLD.rank, MPI.COMM_WORLD.Get_attr(MPI.APPNUM), sys.argv[1:]), root=0)
            parent.Disconnect()
        else:
            me = [sys.executable] * 2
            inter = MPI.COMM_SELF.Spawn_multiple(me, args=[[sys.argv[0], "a", "b c"], [sys.argv[0], "d"]],
                                                 maxprocs=[1, 2]) if MPI.COMM_WORLD.rank == 0 else None
            if inter is not None:
                print("children", inter.gather(None, root=MPI.ROOT))
                inter.Disconnect()
    """,
    "names": """
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        color = comm.rank % 2
        group = comm.Split(color, comm.rank)
        if color == 0:
            port = MPI.Open_port()
            MPI.Publish_name("conformance-svc", port)
            comm.Barrier()
            inter = group.Accept(port)
        else:
            comm.Barrier()
            inter = group.Connect(MPI.Lookup_name("conformance-svc"))
        sums = comm.gather((comm.rank, inter.Get_remote_size(), inter.allreduce(comm.rank)), root=0)
        inter.Disconnect()
        comm.Barrier()
        if color == 0:
            MPI.Unpublish_name("conformance-svc", port)
            MPI.Close_port(port)
        comm.Barrier()
        try:
            MPI.Lookup_name("conformance-svc")
            gone = "still published"
        except MPI.Exception as exc:
            gone = exc.Get_error_class() == MPI.ERR_NAME
        if comm.rank == 0:
            print("sums", sums, "unpublished", gone)
    """,
    "abort": """
        from mpi4py import MPI
        MPI.COMM_WORLD.Barrier()
        if MPI.COMM_WORLD.rank == 1:
            MPI.COMM_WORLD.Abort(3)
        MPI.COMM_WORLD.Barrier()
    """,
    "exit_code": """
        import sys
        from mpi4py import MPI
        MPI.COMM_WORLD.Barrier()
        sys.exit(4 if MPI.COMM_WORLD.rank == 1 else 0)
    """,
    "env_and_args": """
        import os, sys
        from mpi4py import MPI
        got = MPI.COMM_WORLD.gather((os.environ.get("COLOUR"), sys.argv[1:], os.environ["PMI_SIZE"]), root=0)
        if MPI.COMM_WORLD.rank == 0:
            print(got)
    """,
}


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conformance")
    paths = {}
    for name, source in PROGRAMS.items():
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        paths[name] = str(path)
    return paths


def _mpich_segments():
    return {n for n in os.listdir("/dev/shm") if n.startswith("mpich_")}


def under_mpiexec(argv, env):
    options = [item for name, value in env.items() for item in ("-genv", name, value)]
    before = _mpich_segments()
    done = subprocess.run([MPIEXEC, "-n", "2", *options, *argv], capture_output=True, timeout=60)
    for name in _mpich_segments() - before:
        os.unlink(os.path.join("/dev/shm", name))  # Hydra leaves an aborted job's segment behind
    return done.returncode, done.stdout.decode().splitlines()


def under_sparkmpi(spark, argv, env):
    result = sparkmpi.run_program(spark, argv, ranks=2, env=env, timeout=60)
    return result.returncode, b"".join(result.stdout).decode().splitlines()


@pytest.mark.parametrize("name, args, env, expected_code", [
    ("spawn", [], {}, 0),
    ("spawn_multiple", [], {}, 0),
    ("names", [], {}, 0),
    ("abort", [], {}, 3),
    ("exit_code", [], {}, 4),
    ("env_and_args", ["x y", "", "--z"], {"COLOUR": "teal"}, 0),
])
def test_same_behaviour_as_mpiexec(spark, scripts, name, args, env, expected_code):
    argv = [sys.executable, scripts[name], *args]
    reference = under_mpiexec(argv, env)
    assert reference[0] == expected_code, reference  # the program does what it should under Hydra
    assert under_sparkmpi(spark, argv, env) == reference
