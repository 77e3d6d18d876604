"""Persistent MPI worlds (sparkmpi.World) on real Spark (local[2]) and real MPICH."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import sparkmpi
from sparkmpi.errors import JobFailed, JobTimeout, WorldClosed


def remember(comm, state, value):
    state["value"] = value * (comm.rank + 1)
    state["pid"] = os.getpid()
    return comm.rank


def recall(comm, state):
    return state["value"], state["pid"]


def allreduce_sum(comm, state, array):
    from mpi4py import MPI

    out = np.empty_like(array)
    comm.Allreduce(array, out, op=MPI.SUM)
    return float(out.sum()), array.nbytes


def bump_module_global(comm, state):
    import colorsys   # an imported module, and what is set on it, stay for the next call

    colorsys.sparkmpi_test_counter = getattr(colorsys, "sparkmpi_test_counter", 0) + 1
    return colorsys.sparkmpi_test_counter


def test_state_globals_and_processes_survive_between_calls(spark):
    with sparkmpi.World(spark, ranks=2) as world:
        assert world.call(remember, 5) == [0, 1]
        first = world.call(recall)
        assert [v for v, _ in first] == [5, 10]
        assert [world.call(bump_module_global) for _ in range(3)] == [[1, 1], [2, 2], [3, 3]]   # module globals stay
        again = world.call(recall)
        assert again == first   # same processes, same state
        assert len({pid for _, pid in again}) == 2
    assert world.closed and "with block ended" in world.closed_reason


def test_scatter_sends_one_array_per_rank_and_kwargs_reach_every_rank(spark):
    parts = [np.arange(1000, dtype=np.float64), np.ones(4000, dtype=np.float64)]
    with sparkmpi.World(spark, ranks=2) as world:
        results = world.call(lambda comm, state, scale, part, offset=0: float(part.sum()) * scale + offset,
                             2.0, scatter=parts, offset=1)
        assert results == [2.0 * parts[0].sum() + 1, 2.0 * 4000 + 1]
        total, nbytes = world.call(allreduce_sum, np.full(10, 1.5))[0]
        assert (total, nbytes) == (30.0, 80)
        with pytest.raises(ValueError, match=r"scatter must have one item per rank \(2\), got 3"):
            world.call(recall, scatter=[1, 2, 3])
        with pytest.raises(TypeError, match="fn must be a callable"):
            world.call("recall")
        with pytest.raises(ValueError, match="the call's arguments cannot be pickled"):
            world.call(recall, threading.Lock())
        assert world.call(lambda comm, state: comm.size) == [2, 2]   # bad arguments did not close it


def test_rank_output_reaches_the_caller_prefixed_with_the_rank(spark, capfd):
    def chatty(comm, state):
        print(f"hello from {comm.rank}")
        print("partial line", end="")
        sys.stderr.write(f"warning on {comm.rank}\n")
        return comm.rank

    with sparkmpi.World(spark, ranks=2) as world:
        assert world.call(chatty) == [0, 1]
        out, err = capfd.readouterr()
    assert "[0] hello from 0\n" in out and "[1] hello from 1\n" in out
    assert "[0] partial line\n" in out
    assert "[1] warning on 1\n" in err and "[0] warning on 0\n" in err


def start_chatter(comm, state, megabytes):
    """A rank thread that prints ``megabytes`` of output as fast as it can, between calls."""
    line = "y" * 1023

    def chatter():
        for _ in range(megabytes * 1024):
            print(line, flush=True)

    thread = threading.Thread(target=chatter, daemon=True)
    thread.start()
    state["chatter"] = thread
    return comm.rank


def join_chatter(comm, state, big):
    state.pop("chatter").join()
    return int(big.size)


@pytest.mark.timeout(120)
def test_a_large_call_reaches_ranks_that_print_while_it_is_sent(spark, capfd):
    # The driver reads the relays' output while it writes a call (WorldCore._wait):
    # what a rank prints meanwhile arrives whole, and the call goes through.
    big = [np.zeros(4 << 20, np.uint8), np.ones(4 << 20, np.uint8)]
    with sparkmpi.World(spark, ranks=2) as world:
        world.call(start_chatter, 4)
        assert world.call(join_chatter, scatter=big, timeout=60) == [4 << 20] * 2
    out, _ = capfd.readouterr()
    assert out.count("[0] " + "y" * 1023 + "\n") == 4 * 1024
    assert out.count("[1] " + "y" * 1023 + "\n") == 4 * 1024


def test_a_rank_that_raises_closes_the_world_and_restart_starts_a_fresh_one(spark):
    def fail_on_one(comm, state):
        if comm.rank == 1:
            raise KeyError("no such frame")
        comm.Barrier()

    world = sparkmpi.World(spark, ranks=2)
    try:
        world.call(remember, 1)
        with pytest.raises(JobFailed) as info:
            world.call(fail_on_one, timeout=60)
        message = str(info.value)
        assert "rank 1 (partition 1 on" in message and "raised KeyError: 'no such frame' (in call 2)" in message
        assert "Remote traceback" in message and "fail_on_one" in message
        assert info.value.rank == 1
        assert world.closed
        with pytest.raises(WorldClosed, match=r"is closed \(.*no such frame.*\); call restart\(\)"):
            world.call(recall)
        world.restart()
        assert not world.closed
        assert world.call(lambda comm, state: sorted(state)) == [[], []]   # fresh ranks, empty state
    finally:
        world.close()


def test_a_rank_killed_between_calls_fails_the_next_call_naming_it(spark):
    def die_soon(comm, state):
        import threading

        if comm.rank == 0:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return os.getpid()

    with sparkmpi.World(spark, ranks=2) as world:
        pids = world.call(die_soon)
        time.sleep(1.0)
        started = time.monotonic()
        with pytest.raises(JobFailed) as info:
            world.call(recall)
        assert time.monotonic() - started < 10
        message = str(info.value)
        assert "rank 0 (partition 0 on" in message
        assert "killed by SIGKILL) between calls (after 1)" in message
    for pid in pids:
        assert not _alive(pid), f"rank process {pid} outlived its world"


def test_a_hanging_call_times_out_with_the_ranks_stacks(spark):
    def hang(comm, state):
        if comm.rank == 1:
            time.sleep(60)
        return comm.rank

    with sparkmpi.World(spark, ranks=2) as world:
        started = time.monotonic()
        with pytest.raises(JobTimeout) as info:
            world.call(hang, timeout=1.5)
        assert time.monotonic() - started < 15
    message = str(info.value)
    assert "call 1 timed out after 1.5 s" in message and "no result yet from rank 1" in message
    assert "Stacks of the ranks" in message and "hang" in message


def test_mpi_abort_in_a_call_fails_it(spark):
    def abort(comm, state):
        if comm.rank == 0:
            comm.Abort(7)
        comm.Barrier()

    with sparkmpi.World(spark, ranks=2) as world:
        with pytest.raises(JobFailed, match="abort") as info:
            world.call(abort, timeout=60)
    assert info.value.rank == 0


def test_map_partitions_delivers_partition_i_to_rank_i(spark):
    sc = spark.sparkContext
    with sparkmpi.World(spark, ranks=1) as world:
        world.call(remember, 3)
        rdd = sc.parallelize(range(10), 1).map(lambda x: x * x)
        assert world.map_partitions(rdd, lambda comm, state, records, extra: (sum(records) + extra,
                                                                             state["value"]), 1) == [(286, 3)]
        with pytest.raises(ValueError, match="rdd has 2 partitions but the world has 1 ranks"):
            world.map_partitions(sc.parallelize(range(4), 2), recall)
        # a one-shot run shares the cluster with the world while slots allow
        assert sparkmpi.run(sc.parallelize([4], 1), lambda comm, part: [comm.size, *part]) == [1, 4]


def test_a_relay_inbox_ignores_deliveries_without_the_token(spark):
    import socket

    from sparkmpi.launch import channel

    with sparkmpi.World(spark, ranks=1) as world:
        host, port = world._core.endpoint.inboxes[0]
        with socket.create_connection((host, port), timeout=10) as sock:
            channel.send_message(sock, channel.HELLO, {"token": "forged", "rank": 0})
            channel.send_message(sock, channel.DATA, {"key": "x", "records": [1, 2]})
            sock.settimeout(10)
            try:
                answer = sock.recv(1)
            except ConnectionResetError:   # closed with our DATA unread
                answer = b""
            assert answer == b""   # closed without an answer
        assert world.call(lambda comm, state: comm.size) == [1]


def test_a_relay_answers_the_heartbeat_while_slow_deliveries_come_in(spark):
    """map_partitions watches the relays (the heartbeat goes on) while Spark computes and delivers
    the partitions; a delivery trickling in for longer than host_timeout, and a stranger that
    connects and sends nothing, are read between the relay's other work, so it keeps answering."""
    import socket

    from sparkmpi.launch import channel

    def slow(x):
        time.sleep(0.5)
        return x

    with sparkmpi.World(spark, ranks=1, host_timeout=1.0) as world:
        host, port = world._core.endpoint.inboxes[0]
        answers = []

        def trickle():
            wire = b"".join(bytes(p) for p in channel.frame_pieces(channel.HELLO, channel.encode(
                {"token": world._core.job.token, "rank": 0})))
            wire += b"".join(bytes(p) for p in channel.frame_pieces(channel.DATA, channel.encode(
                {"key": "trickled", "records": list(range(1000))})))
            with socket.create_connection((host, port), timeout=10) as sock:
                step = len(wire) // 10 + 1
                for i in range(0, len(wire), step):
                    sock.sendall(wire[i:i + step])
                    time.sleep(0.25)
                answers.append(channel.recv_message(sock)[1])

        with socket.create_connection((host, port), timeout=10):     # a stranger, silent throughout
            sender = threading.Thread(target=trickle)
            sender.start()
            rdd = spark.sparkContext.parallelize(range(6), 1).map(slow)    # 3 s to compute
            assert world.map_partitions(rdd, lambda comm, state, records: sum(records), timeout=30) == [15]
            sender.join(10)
        assert answers == [0]          # the relay took the trickled delivery: its rank's number back
        assert world.call(lambda comm, state: comm.size) == [1]


def _relay_pid(comm, state):
    """The rank's relay: its nearest ancestor that is a PySpark worker (the Spark task's process)."""
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"pyspark.daemon" in fh.read():
                return pid
        with open(f"/proc/{pid}/stat") as fh:
            pid = int(fh.read().rsplit(")", 1)[1].split()[1])
    raise RuntimeError("no PySpark worker among the rank's ancestors")


def test_a_relay_silent_during_a_delivery_fails_the_world_within_host_timeout(spark):
    def slow(x):
        time.sleep(1.0)
        return x

    with sparkmpi.World(spark, ranks=1, host_timeout=1.0) as world:
        (relay,) = world.call(_relay_pid)
        rdd = spark.sparkContext.parallelize(range(8), 1).map(slow)     # 8 s to compute
        stopper = threading.Timer(1.0, os.kill, args=(relay, signal.SIGSTOP))
        stopper.start()
        started = time.monotonic()
        try:
            with pytest.raises(JobFailed, match=r"no contact for \d+ s with the relay of rank 0 on host") as info:
                world.map_partitions(rdd, lambda comm, state, records: sum(records), timeout=60)
        finally:
            stopper.join()
            os.kill(relay, signal.SIGCONT)
        assert time.monotonic() - started < 6, "the silent relay was not noticed within host_timeout"
        assert "map_partitions delivery" in str(info.value) and world.closed


def test_a_delivery_slower_than_start_timeout_is_not_cancelled_once_its_task_runs(spark):
    """start_timeout bounds the wait for a task slot; a partition that takes longer to
    compute than that, once its task runs, is delivered (not cancelled as 'no task slot')."""
    def slow(x):
        time.sleep(0.5)
        return x

    with sparkmpi.World(spark, ranks=1, start_timeout=2.5) as world:
        rdd = spark.sparkContext.parallelize(range(8), 1).map(slow)    # 4 s to compute
        assert world.map_partitions(rdd, lambda comm, state, records: sum(records), timeout=30) == [28]


def test_map_partitions_without_a_free_slot_says_so_instead_of_hanging(spark):
    with sparkmpi.World(spark, ranks=2) as world:
        with pytest.raises(ValueError, match=r"has 2 task slots and open worlds hold 2.*local\[3\]"):
            world.map_partitions(spark.sparkContext.parallelize(range(4), 2), recall)


def test_bad_arguments_fail_before_any_rank_starts(spark):
    with pytest.raises(ValueError, match="ranks must be a positive integer, got 0"):
        sparkmpi.World(spark, ranks=0)
    with pytest.raises(ValueError, match=r"ranks=3 but master 'local\[2\]' has 2 task slots"):
        sparkmpi.World(spark, ranks=3)
    with pytest.raises(TypeError, match="spark must be a SparkSession or SparkContext"):
        sparkmpi.World("local[2]", ranks=1)
    with pytest.raises(TypeError, match="env must map str to str"):
        sparkmpi.World(spark, ranks=1, env={"A": 1})


def test_an_idle_world_closes_itself_and_frees_its_slots(spark):
    world = sparkmpi.World(spark, ranks=2, idle_timeout=0.5)
    pids = [pid for _, pid in (world.call(remember, 1) and world.call(recall))]
    deadline = time.monotonic() + 15
    while not world.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert world.closed and "idle for 0.5 s" in world.closed_reason
    with pytest.raises(WorldClosed, match="idle"):
        world.call(recall)
    assert not any(_alive(p) for p in pids)
    assert sparkmpi.run(spark.sparkContext.parallelize(range(2), 2), lambda c, p: [c.rank]) == [0, 1]


def test_world_environment_reaches_the_ranks(spark):
    with sparkmpi.World(spark, ranks=1, env={"WORLD_TEST_VALUE": "x7"}) as world:
        assert world.call(lambda comm, state: os.environ.get("WORLD_TEST_VALUE")) == ["x7"]


def test_a_killed_driver_leaves_no_rank_behind(tmp_path):
    script = tmp_path / "driver.py"
    pids_file = tmp_path / "pids"
    script.write_text(textwrap.dedent(f"""
        import os, sparkmpi
        spark = sparkmpi.spark_session("local[2]", conf={{"spark.ui.enabled": "false"}})
        world = sparkmpi.World(spark, ranks=2)
        pids = world.call(lambda comm, state: os.getpid())
        open({str(pids_file)!r}, "w").write(" ".join(map(str, pids)))
        os.kill(os.getpid(), 9)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=240,
                          env={**os.environ, "PYSPARK_PYTHON": sys.executable, "WORLD_TEST_MARK": str(tmp_path)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), f"rank processes {pids} outlived their SIGKILLed driver"
    deadline = time.monotonic() + 30
    while _spark_of(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _spark_of(tmp_path)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _spark_of(tmp_path) -> list:
    """Processes that inherited the child driver's environment marker (its JVM, workers, ranks)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"WORLD_TEST_MARK={tmp_path}".encode() in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_run_hands_large_partitions_to_their_ranks(sc):
    # Far more than a socket buffer: the partition must not block the relay
    # while its rank waits in MPI_Init for PMI answers.
    rdd = sc.parallelize(range(2), 2).map(lambda i: np.full(2_000_000, i + 1.0))
    assert sparkmpi.run(rdd, lambda comm, part: [float(sum(a.sum() for a in part))], timeout=120) == [2e6, 4e6]


def test_ranks_that_never_connect_time_out_naming_the_slots_instead_of_hanging(spark):
    with sparkmpi.World(spark, ranks=2) as holder:   # holds both task slots of local[2]
        started = time.monotonic()
        with pytest.raises(JobTimeout) as info:
            sparkmpi.World(spark, ranks=1, start_timeout=3)
        assert time.monotonic() - started < 20
        message = str(info.value)
        assert "not every rank connected within 3 s (is the cluster short of free task slots?)" in message
        assert "rank 0: never connected" in message
        assert holder.call(lambda comm, state: comm.rank) == [0, 1]   # the other world is unharmed
