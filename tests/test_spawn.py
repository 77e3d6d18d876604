"""MPI_Comm_spawn and spawn_multiple under sparkmpi: children started by the spawning rank's relay."""

import functools
import sys
import textwrap

import pytest

import sparkmpi
from sparkmpi.launch import relay
from sparkmpi.launch import program_relay as pr
from sparkmpi.pmi import control
from sparkmpi.pmi.wire import parse_line

# One line: MPICH's spawn command carries each argument on one line of its own.
CHILD = ("import sys; from mpi4py import MPI; parent, world = MPI.Comm.Get_parent(), MPI.COMM_WORLD; "
         "parent.gather((world.rank, world.size, world.Get_attr(MPI.APPNUM), sys.argv[1:]), root=0); "
         "parent.Disconnect()")


def spawn_children(comm, partition):
    from mpi4py import MPI

    inter = comm.Spawn(sys.executable, args=["-c", CHILD, "x y", "z"], maxprocs=2, root=0)
    got = inter.gather(None, root=MPI.ROOT if comm.rank == 0 else MPI.PROC_NULL)
    remote = inter.Get_remote_size()
    inter.Disconnect()
    return [(comm.rank, remote, got)]


def test_spawn_children_form_their_own_world_joined_to_the_parents(sc):
    results = sparkmpi.run(sc.parallelize(range(2), 2), spawn_children, timeout=60)
    children = [(0, 2, 0, ["x y", "z"]), (1, 2, 0, ["x y", "z"])]
    assert results == [(0, 2, children), (1, 2, None)]


def spawn_multiple(comm, partition):
    from mpi4py import MPI

    info = MPI.Info.Create()
    info.Set("wdir", "/tmp")
    inter = MPI.COMM_SELF.Spawn_multiple([sys.executable, sys.executable], args=[["-c", CHILD, "a"], ["-c", CHILD]],
                                         maxprocs=[1, 2], info=[info, MPI.INFO_NULL])
    info.Free()
    got = inter.gather(None, root=MPI.ROOT)
    inter.Disconnect()
    return got


def test_spawn_multiple_numbers_the_commands_with_appnum(sc):
    got = sparkmpi.run(sc.parallelize(range(1), 1), spawn_multiple, timeout=60)
    assert got == [(0, 3, 0, ["a"]), (1, 3, 1, []), (2, 3, 1, [])]


def pool_map(comm, partition):
    from mpi4py.futures import MPIPoolExecutor

    if comm.rank != 0:
        return []
    with MPIPoolExecutor(max_workers=2) as pool:
        return list(pool.map(pow, [2, 3, 4], [10, 2, 0]))


def test_mpipoolexecutor_inside_a_rank_function(sc):
    assert sparkmpi.run(sc.parallelize(range(2), 2), pool_map, timeout=60) == [1024, 9, 1]


def test_mpipoolexecutor_under_run_program(spark):
    program = textwrap.dedent("""
        from mpi4py import MPI
        from mpi4py.futures import MPIPoolExecutor
        with MPIPoolExecutor(max_workers=2) as pool:
            print(MPI.COMM_WORLD.rank, list(pool.map(pow, [2, 3, 4], [10, 2, 0])), flush=True)
    """)
    result = sparkmpi.run_program(spark, ["python", "-c", program], ranks=1, timeout=60)
    assert result.returncode == 0, result.message
    assert b"".join(result.stdout).decode().split() == ["0", "[1024,", "9,", "1]"]


def spawn_missing(comm, partition):
    from mpi4py import MPI

    try:
        MPI.COMM_SELF.Spawn("/nonexistent/child", maxprocs=1)
        return ["spawned"]
    except MPI.Exception as exc:
        return [exc.Get_error_string()]


def test_a_child_that_cannot_start_fails_the_spawn_call_not_the_job(sc):
    [message] = sparkmpi.run(sc.parallelize(range(1), 1), spawn_missing, timeout=60)
    assert "PMI_Spawn_multiple returned -1" in message


def test_spawn_under_run_program_and_the_children_output_streams(spark):
    # The children print after the parents have exited: as under mpiexec, the job waits for them
    # (their output and their PMI done are not cut off when the spawning rank's task ends).
    parent = textwrap.dedent("""
        import sys
        from mpi4py import MPI
        child = ("import time; from mpi4py import MPI; MPI.Comm.Get_parent().Disconnect(); time.sleep(0.5); "
                 "print('child', MPI.COMM_WORLD.rank, flush=True)")
        inter = MPI.COMM_WORLD.Spawn(sys.executable, args=["-c", child], maxprocs=2)
        print("parent", MPI.COMM_WORLD.rank, inter.Get_remote_size(), flush=True)
        inter.Disconnect()
    """)
    result = sparkmpi.run_program(spark, ["python", "-c", parent], ranks=2, timeout=60)
    assert result.returncode == 0, result.message
    out = b"".join(result.stdout).decode().splitlines()
    assert sorted(out) == ["child 0", "child 1", "parent 0 2", "parent 1 2"]
    assert sorted(result.stdout[0].decode().splitlines()) == ["child 0", "child 1", "parent 0 2"]  # children run at rank 0


# A child that spawns a grandchild (depth 2), and reports both worlds to its parent.
NESTED = """
import sys
from mpi4py import MPI
depth = int(sys.argv[1])
below = []
if depth < 2:
    inter = MPI.COMM_SELF.Spawn(sys.executable, args=[__file__, str(depth + 1)], maxprocs=1)
    below = inter.recv(source=0)
    inter.Disconnect()
parent = MPI.Comm.Get_parent()
parent.send([(depth, MPI.COMM_WORLD.size, MPI.Comm.Get_parent().Get_remote_size())] + below, dest=0)
parent.Disconnect()
"""


def spawn_nested_and_on_hosts(comm, partition, script):
    import socket

    from mpi4py import MPI

    inter = MPI.COMM_SELF.Spawn(sys.executable, args=[script, "1"], maxprocs=1)
    nested = inter.recv(source=0)
    inter.Disconnect()
    outcomes = []
    for host in (socket.gethostname(), "elsewhere.invalid"):
        info = MPI.Info.Create()
        info.Set("host", host)
        try:
            inter = MPI.COMM_SELF.Spawn(sys.executable, args=["-c", CHILD, host], maxprocs=1, info=info)
            outcomes.append(inter.gather(None, root=MPI.ROOT)[0][3])
            inter.Disconnect()
        except MPI.Exception as exc:
            outcomes.append(exc.Get_error_string())
        info.Free()
    return [(nested, outcomes)]


def test_children_spawn_again_and_a_host_elsewhere_fails_the_spawn_naming_why(sc, tmp_path, capsys):
    script = tmp_path / "nested.py"
    script.write_text(NESTED)
    [(nested, (here, elsewhere))] = sparkmpi.run(
        sc.parallelize(range(1), 1), functools.partial(spawn_nested_and_on_hosts, script=str(script)), timeout=60)
    assert nested == [(1, 1, 1), (2, 1, 1)]  # the child's world and its grandchild's, each joined to its parent
    assert here == [__import__("socket").gethostname()]  # host= this host: honoured
    assert "PMI_Spawn_multiple returned -1" in elsewhere
    err = capsys.readouterr().err
    assert "info host='elsewhere.invalid' names another host" in err and "spawning rank's host" in err


# -- the relay's decisions (pure) -----------------------------------------------------
def test_spawn_lines_round_trip_and_reach_the_relays_as_start_actions():
    commands = [{"execname": "/bin/x", "nprocs": 2, "args": ["a b"], "info": [["wdir", "/tmp"]]}]
    line = control.spawn_line("child_kvs", "tok", 1, commands).rstrip(b"\n")
    assert control.decode_spawn(parse_line(line)) == ("child_kvs", "tok", commands)
    python_rank = relay.RelayState("job", 1, "rank 1")
    assert python_rank.handle(relay.ServerLine(line)) == [relay.StartChildren(line)]
    program_rank = pr.ProgramRelayState("job", 1, "rank 1", "h")
    assert program_rank.handle(pr.ServerLine(line)) == [pr.StartChildren(line)]
    assert parse_line(control.spawned_line(None)).get("ok") == "1"
    failed = parse_line(control.spawned_line("no such file"))
    assert failed.get("ok") == "0" and control.decode_text(failed) == "no such file"


def test_the_space_answers_the_spawn_when_the_relay_says_the_children_started():
    from sparkmpi.pmi.space import JobSpace
    from sparkmpi.pmi.wire import parse_mcmd

    space = JobSpace(1, spawn_enabled=True)
    space.admit(0, 0, "h")
    block = [b"mcmd=spawn", b"nprocs=2", b"execname=x", b"totspawns=1", b"spawnssofar=1", b"argcnt=0",
             b"info_num=0", b"endcmd"]
    assert space.handle(0, parse_mcmd(block)) == []
    [request] = space.spawn_requests
    space.spawn_pending[0] = request.total  # what the server records as it asks the relay
    [(_, reply)] = space.handle(0, parse_line(control.spawned_line(None)))
    assert parse_line(reply).name == "spawn_result" and parse_line(reply).get("errcodes") == "0,0"
    with pytest.raises(Exception, match="unexpected control command"):
        space.handle(0, parse_line(control.spawned_line(None)))  # no spawn pending any more


def spawn_in_call(comm, state, tag):
    from mpi4py import MPI

    inter = comm.Spawn(sys.executable, args=["-c", CHILD, tag], maxprocs=1, root=0)
    got = inter.gather(None, root=MPI.ROOT if comm.rank == 0 else MPI.PROC_NULL)
    inter.Disconnect()
    return got


def test_spawn_in_a_persistent_world_twice(spark):
    with sparkmpi.World(spark, ranks=2) as world:
        assert world.call(spawn_in_call, "first") == [[(0, 1, 0, ["first"])], None]
        assert world.call(spawn_in_call, "second") == [[(0, 1, 0, ["second"])], None]
