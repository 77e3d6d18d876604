"""sparkmpi.run end to end: real Spark (local[2]), real MPICH ranks, real failures."""

import os
import re
import subprocess
import sys
import time

import pytest

import sparkmpi
from sparkmpi.launch import shm


def _processes_named(name):
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm == name and state != "Z":
            pids.append(int(entry))
    return pids


def _rank_processes():
    """PIDs of every live rank process (forked or fresh, running or a warm spare) on this machine."""
    return _processes_named("sparkmpi-rank")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _mpich_shm_files():
    return {n for n in os.listdir("/dev/shm") if n.startswith(("mpich_shm_", "mpich_vci_"))}


def _wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# -- the functions the ranks run ------------------------------------------------
def allreduce_example(comm, partition):
    import numpy as np
    from mpi4py import MPI

    buf = np.full(2_000_000, comm.rank + 1, dtype=np.float32)
    out = np.empty_like(buf)
    comm.Allreduce(buf, out, op=MPI.SUM)
    return [(comm.rank, float(out[0]), sum(partition))]


def plain_mpi4py(comm, partition):
    # Unmodified mpi4py style: ignores `comm` and uses COMM_WORLD directly.
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    total = world.allreduce(sum(partition), op=MPI.SUM)
    gathered = world.gather(world.Get_rank(), root=0)
    return [{"rank": world.Get_rank(), "size": world.Get_size(), "total": total, "gathered": gathered,
             "pid": os.getpid(), "ppid": os.getppid(), "pmi_rank": os.environ["PMI_RANK"], "processor": MPI.Get_processor_name()}]


def identity_ranks(comm, partition):
    import numpy as np

    return [(comm.rank, np.arange(3) + comm.rank, os.getpid(), os.getppid())]


def raise_on_rank_one(comm, partition):
    if comm.rank == 1:
        raise ValueError("bad frame 17 on rank one")
    comm.Barrier()
    return [comm.rank]


def exit_on_rank_one(comm, partition):
    if comm.rank == 1:
        os._exit(3)
    comm.Barrier()
    return [comm.rank]


def hang_on_rank_one(comm, partition):
    if comm.rank == 1:
        time.sleep(600)
    comm.Barrier()
    return [comm.rank]


def abort_on_rank_zero(comm, partition):
    if comm.rank == 0:
        comm.Abort(7)
    comm.Barrier()
    return [comm.rank]


# -- tests -------------------------------------------------------------------------
def test_issue_example_allreduce(sc):
    rdd = sc.parallelize(range(8), 2)
    assert sparkmpi.run(rdd, allreduce_example) == [(0, 3.0, 6), (1, 3.0, 22)]


def test_unmodified_mpi4py_code_and_rank_is_partition(sc):
    rdd = sc.parallelize(range(10), 2)
    results = sparkmpi.run(rdd, plain_mpi4py)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["size"] == 2 and r["total"] == 45 for r in results)
    assert results[0]["gathered"] == [0, 1] and results[1]["gathered"] is None
    assert [r["pmi_rank"] for r in results] == ["0", "1"]   # the rank's PMI wiring, as MPICH read it
    assert all(r["processor"] for r in results)


def test_single_rank_and_results_in_rank_order(sc):
    assert sparkmpi.run(sc.parallelize([5], 1), lambda comm, it: [(comm.size, list(it))]) == [(1, [5])]
    out = sparkmpi.run(sc.parallelize(range(4), 2), lambda comm, it: iter([comm.rank] * (comm.rank + 1)))
    assert out == [0, 1, 1]
    assert sparkmpi.run(sc.parallelize(range(4), 2), lambda comm, it: None) == []


def test_numpy_records_cross_without_pickling_into_the_stream(sc):
    import numpy as np

    frames = [np.full((64, 64), i, dtype=np.uint16) for i in range(6)]

    def sums(comm, it):
        return [int(sum(int(f.sum()) for f in it))]

    out = sparkmpi.run(sc.parallelize(frames, 2), sums)
    assert sum(out) == sum(int(f.sum()) for f in frames)
    # The channel the records cross: each array is a segment of its own (out of band),
    # not bytes inside the pickle stream, and arrives as a view of the received buffer.
    from sparkmpi.launch import channel

    segments = channel.encode(frames)
    assert len(segments) == 1 + len(frames)
    assert all(seg.nbytes == f.nbytes for seg, f in zip(segments[1:], frames))
    assert segments[0].nbytes < 1000   # the pickle stream holds no pixel data
    received = [bytearray(seg) for seg in segments]
    decoded = channel.decode(received)
    assert all(np.array_equal(a, f) for a, f in zip(decoded, frames))
    assert all(np.shares_memory(a, np.frombuffer(buf, np.uint8)) for a, buf in zip(decoded, received[1:]))


def test_twenty_jobs_fresh_processes_and_no_leaks(sc):
    rdd = sc.parallelize(range(4), 2)
    shm_before = _mpich_shm_files()
    sparkmpi.run(rdd, identity_ranks)  # warm-up: workers and spares exist now
    fds_driver = len(os.listdir("/proc/self/fd"))
    spares_before = len(_rank_processes())
    seen_pids, worker_fds = set(), {}
    for i in range(20):
        results = sparkmpi.run(rdd, identity_ranks)
        assert [r[0] for r in results] == [0, 1]
        assert [list(r[1]) for r in results] == [[0, 1, 2], [1, 2, 3]]
        pids = {r[2] for r in results}
        assert not (pids & seen_pids), "a rank process served two jobs"
        seen_pids |= pids
        assert _wait_until(lambda: not any(_alive(p) for p in pids)), "rank processes outlived their job"
        for r in results:
            # Measured once the worker's spares are back (they are forked a moment after the task).
            assert _wait_until(lambda: len(_children_named(r[3], "sparkmpi-rank")) == 2, timeout=5), \
                f"worker {r[3]} did not get its two spares back"
            worker_fds.setdefault(r[3], []).append(len(os.listdir(f"/proc/{r[3]}/fd")))
    assert len(seen_pids) == 40
    # Only the bounded set of warm spares remains (one per Spark Python worker).
    assert len(_rank_processes()) <= max(spares_before, 4)
    assert len(os.listdir("/proc/self/fd")) <= fds_driver + 3
    for counts in worker_fds.values():
        # A spare holds 2 or 3 descriptors (before and after it is collected), hence the slack;
        # a leak of one per job would add 20.
        assert max(counts[-5:]) <= max(counts[:5]) + 2, f"a Spark worker's fds grew: {counts}"
    assert _mpich_shm_files() <= shm_before


def _expect_failure(sc, fn, **kwargs):
    rdd = sc.parallelize(range(4), 2)
    started = time.monotonic()
    with pytest.raises(sparkmpi.JobFailed) as info:
        sparkmpi.run(rdd, fn, **kwargs)
    return info.value, time.monotonic() - started


def _assert_recovered(sc, error):
    """Nothing left behind, and the SparkContext runs the next job."""
    assert _wait_until(lambda: len(_rank_processes()) <= 4)
    assert not shm.job_segments(error.job_id), "the failed job's shared memory was left in /dev/shm"
    assert sparkmpi.run(sc.parallelize(range(4), 2), lambda comm, it: [comm.rank]) == [0, 1]


def test_rank_that_raises_fails_the_job_with_its_traceback(sc):
    error, elapsed = _expect_failure(sc, raise_on_rank_one)
    assert error.rank == 1 and error.partition == 1
    message = str(error)
    assert "rank 1 (partition 1 on" in message
    assert "raised ValueError: bad frame 17 on rank one" in message
    assert "Remote traceback" in message and "raise_on_rank_one" in message
    assert elapsed < 15
    _assert_recovered(sc, error)


def test_rank_that_exits_fails_the_job(sc):
    error, elapsed = _expect_failure(sc, exit_on_rank_one)
    assert error.rank == 1 and error.partition == 1
    assert "exited with status 3 before returning results" in str(error)
    assert elapsed < 15
    _assert_recovered(sc, error)


def killed_on_rank_one(comm, partition):
    import signal

    if comm.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    comm.Barrier()
    return [comm.rank]


def _children_named(parent, name):
    return [pid for pid in _processes_named(name) if _parent_of(pid) == parent]


def _parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def spark_worker_dies_on_rank_one(comm, partition):
    import signal

    if comm.rank == 1:
        # The Spark Python worker (the relay) dies: its rank, spares and fork server must die with it.
        others = _children_named(os.getppid(), "sparkmpi-rank") + _children_named(os.getppid(), "sparkmpi-zygote")
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(" ".join(str(pid) for pid in [os.getpid()] + others))
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)
    comm.Barrier()
    return [comm.rank]


def test_rank_killed_by_a_signal(sc):
    error, elapsed = _expect_failure(sc, killed_on_rank_one)
    assert error.rank == 1
    assert "killed by SIGKILL" in str(error)
    assert elapsed < 15
    _assert_recovered(sc, error)


def test_lost_spark_worker_takes_its_rank_along(sc, tmp_path):
    pid_file = tmp_path / "rank1.pid"
    error, elapsed = _expect_failure(sc, spark_worker_dies_on_rank_one, env={"PID_FILE": str(pid_file)})
    assert error.rank == 1
    assert "lost the relay of rank 1 (partition 1" in str(error)
    assert elapsed < 20
    rank, *others = [int(pid) for pid in pid_file.read_text().split()]
    assert _wait_until(lambda: not _alive(rank), 5), "the rank outlived its Spark worker"
    assert len(others) >= 2, "expected the worker's fork server and spares"
    assert _wait_until(lambda: not any(_alive(p) for p in others), 5), \
        "the fork server or spares outlived their Spark worker"
    _assert_recovered(sc, error)


def test_rank_that_hangs_times_out_with_stacks(sc):
    error, elapsed = _expect_failure(sc, hang_on_rank_one, timeout=3)
    assert isinstance(error, sparkmpi.JobTimeout)
    message = str(error)
    assert "timed out after 3 s" in message
    assert "rank 1 (partition 1 on" in message
    assert "Stacks of the ranks" in message and "hang_on_rank_one" in message
    assert elapsed < 3 + 10
    _assert_recovered(sc, error)


def test_mpi_abort_fails_the_job(sc):
    error, elapsed = _expect_failure(sc, abort_on_rank_zero)
    assert error.rank == 0 and error.partition == 0
    assert "called MPI_Abort with exit code 7" in str(error)
    assert elapsed < 15
    _assert_recovered(sc, error)


def test_unpicklable_result_is_reported(sc):
    import threading

    error, _ = _expect_failure(sc, lambda comm, it: [threading.Lock()])
    assert "TypeError" in str(error) and "pickle" in str(error)
    _assert_recovered(sc, error)


def test_bad_arguments_fail_before_running(sc):
    with pytest.raises(TypeError, match="fn must be a callable"):
        sparkmpi.run(sc.parallelize(range(2), 2), 42)
    with pytest.raises(TypeError, match="rdd must be a pyspark RDD"):
        sparkmpi.run([1, 2], allreduce_example)
    with pytest.raises(ValueError, match="has 3 partitions but master 'local\\[2\\]' has 2 task slots"):
        sparkmpi.run(sc.parallelize(range(3), 3), allreduce_example)
    with pytest.raises(sparkmpi.ConfigError, match="unknown setting"):
        sparkmpi.run(sc.parallelize(range(2), 2), allreduce_example, bogus=1)


def scaled_rank(comm, records, factor):
    return [comm.rank * factor]


class RankTimes:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, comm, records):
        return [comm.rank * self.factor]


def test_partials_and_callable_objects_from_local_modules(sc):
    import functools

    rdd = sc.parallelize(range(2), 2)
    assert sparkmpi.run(rdd, functools.partial(scaled_rank, factor=10)) == [0, 10]
    assert sparkmpi.run(rdd, RankTimes(5)) == [0, 5]


def test_warm_up_prepares_every_worker_with_ready_spares(sc):
    prepared = sparkmpi.warm_up(sc, warm_pool=2)
    assert len(prepared) == sc.defaultParallelism
    assert all(ready == 2 for _, ready in prepared), prepared
    # A one-rank job now lands on a worker whose spares finished their imports.
    assert sparkmpi.run(sc.parallelize([7], 1), lambda comm, it: [(comm.size, *it)]) == [(1, 7)]


def test_a_stopped_pmi_server_is_replaced_by_the_next_job(sc):
    from sparkmpi.launch.job import get_server, shutdown_server

    first = get_server("127.0.0.1")
    shutdown_server()
    assert not first.alive
    assert sparkmpi.run(sc.parallelize(range(2), 2), lambda comm, it: [comm.rank]) == [0, 1]
    assert get_server("127.0.0.1") is not first


def test_job_environment_reaches_ranks(sc):
    out = sparkmpi.run(sc.parallelize(range(2), 2), lambda comm, it: [os.environ.get("MY_SETTING")],
                       env={"MY_SETTING": "on"})
    assert out == ["on", "on"]


def test_single_host_jobs_get_the_quick_netmod_unless_one_was_chosen(sc, monkeypatch):
    monkeypatch.delenv("MPIR_CVAR_CH4_NETMOD", raising=False)
    rdd = sc.parallelize(range(2), 2)

    def netmod(comm, it):
        return [os.environ.get("MPIR_CVAR_CH4_NETMOD")]

    assert sparkmpi.run(rdd, netmod) == ["ofi", "ofi"]   # local[2]: one host
    assert sparkmpi.run(rdd, netmod, single_host_netmod="ucx") == ["ucx", "ucx"]
    assert sparkmpi.run(rdd, netmod, single_host_netmod="") == [None, None]
    assert sparkmpi.run(rdd, netmod, env={"MPIR_CVAR_CH4_NETMOD": "ucx"}) == ["ucx", "ucx"]


def test_rank_environment_picks_the_netmod_only_for_one_host():
    from sparkmpi.config import Settings
    from sparkmpi.launch.task import TaskSpec, rank_environment

    def spec(env=None, netmod="ofi"):
        return TaskSpec("h", 1, "kvs", "t", 2, "h", 2, settings=Settings(single_host_netmod=netmod),
                        env=env or {})

    one, two = ["node1", "node1"], ["node1", "node2"]
    plain = spec({"A": "1"})
    assert rank_environment(plain, one, {}) == {"A": "1", "MPIR_CVAR_CH4_NETMOD": "ofi"}
    assert rank_environment(plain, two, {}) == {"A": "1"}   # across hosts: MPICH's choice
    assert rank_environment(plain, one, {"MPIR_CVAR_CH4_NETMOD": "ucx"}) == {"A": "1"}
    chosen = spec({"MPIR_CVAR_CH4_NETMOD": "ucx"})
    assert rank_environment(chosen, one, {}) == {"MPIR_CVAR_CH4_NETMOD": "ucx"}
    assert rank_environment(spec(netmod=""), one, {}) == {}
    assert plain.env == {"A": "1"}   # not modified
    assert TaskSpec("h", 1, "kvs", "t", 2, "h", 2).settings.single_host_netmod == Settings().single_host_netmod


def test_shm_world_id_matches_mpich():
    # FNV-1a 32 test vectors, and the name MPICH derives from a kvsname.
    assert shm.fnv1a_32(b"") == 0x811C9DC5
    assert shm.fnv1a_32(b"a") == 0xE40C292C
    assert shm.world_ids("kvs_1") == [shm.fnv1a_32(b"kvs_1"), shm.fnv1a_32(b"kvs_1-1")]


def test_shm_cleanup_removes_only_the_jobs_files(tmp_path):
    wid = f"{shm.world_ids('sparkmpi_dead')[0]:x}"
    ours = [tmp_path / f"mpich_shm_{wid}_0", tmp_path / f"mpich_vci_{wid}_0"]
    other = tmp_path / "mpich_shm_deadbeef_0"
    for path in ours + [other]:
        path.write_bytes(b"x")
    removed = shm.remove_job_segments("sparkmpi_dead", str(tmp_path))
    assert sorted(removed) == sorted(str(p) for p in ours)
    assert other.exists()


def test_spark_session_applies_sparkmpi_defaults_and_checks_its_arguments(spark):
    from sparkmpi.launch.session import SESSION_DEFAULTS, spark_session

    conf = spark.sparkContext.getConf()
    for key, value in SESSION_DEFAULTS.items():
        assert conf.get(key) == value
    assert conf.get("spark.ui.enabled") == "false"  # the caller's conf is applied too
    assert spark_session("local[2]", "again") is spark  # getOrCreate: the running session
    with pytest.raises(ValueError, match="master: expected a Spark master URL"):
        spark_session("")
    with pytest.raises(ValueError, match="conf: expected keys starting with 'spark.', got 'ui.enabled'"):
        spark_session("local[2]", conf={"ui.enabled": "false"})


def who_am_i(comm, partition):
    import random

    import numpy as np

    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read()
    with open("/proc/self/comm") as f:
        name = f.read().strip()
    return [{"pid": os.getpid(), "ppid": os.getppid(), "name": name, "fresh": b"sparkmpi.launch.rank" in cmdline,
             "draws": (float(np.random.rand()), random.random())}]


def test_ranks_are_forked_by_one_server_per_worker_with_fresh_random_state(sc):
    rdd = sc.parallelize(range(4), 2)
    ranks = sparkmpi.run(rdd, who_am_i) + sparkmpi.run(rdd, who_am_i)
    workers = {r["ppid"] for r in ranks}
    assert all(r["name"] == "sparkmpi-rank" and not r["fresh"] for r in ranks), ranks
    # Re-parented to the Spark worker, not left a child of the fork server.
    assert all(_processes_named("sparkmpi-zygote").count(w) == 0 for w in workers)
    for worker in workers:
        assert len(_children_named(worker, "sparkmpi-zygote")) == 1
    draws = [d for r in ranks for d in r["draws"]]
    assert len(set(draws)) == len(draws), "forked ranks share the fork server's random state"


def test_spares_are_replaced_a_moment_after_each_job(sc):
    """The replacement spares are forked from a timer thread after the task (not during
    its return); each worker is back to its warm_pool spares within a second."""
    rdd = sc.parallelize(range(4), 2)
    for _ in range(3):
        workers = {r["ppid"] for r in sparkmpi.run(rdd, who_am_i)}
        assert _wait_until(lambda: all(len(_children_named(w, "sparkmpi-rank")) == 2 for w in workers),
                           timeout=5), {w: _children_named(w, "sparkmpi-rank") for w in workers}


def start_background_sleep(comm, partition):
    import subprocess

    child = subprocess.Popen(["sleep", "300"])   # never waited for: left behind by the rank
    if comm.rank == 1 and list(partition) == ["fail"]:
        raise RuntimeError(f"failing with background process {child.pid}")
    return [child.pid]


def _gone(pid):
    return not os.path.exists(f"/proc/{pid}")   # neither running nor a zombie


def test_processes_a_rank_leaves_behind_are_killed_and_reaped(sc):
    pids = sparkmpi.run(sc.parallelize(range(2), 2), start_background_sleep)
    assert len(pids) == 2
    assert _wait_until(lambda: all(_gone(p) for p in pids), timeout=5), \
        [open(f"/proc/{p}/stat").read() for p in pids if not _gone(p)]
    with pytest.raises(sparkmpi.JobFailed, match=r"background process (\d+)") as info:
        sparkmpi.run(sc.parallelize(["ok", "fail"], 2), start_background_sleep)
    failed_pid = int(re.search(r"background process (\d+)", str(info.value)).group(1))
    assert _wait_until(lambda: _gone(failed_pid), timeout=5)


def test_fork_server_off_starts_fresh_interpreters(sc):
    ranks = sparkmpi.run(sc.parallelize(range(4), 2), who_am_i, fork_server=False)
    assert all(r["fresh"] and r["name"] == "sparkmpi-rank" for r in ranks), ranks
    with pytest.raises(sparkmpi.ConfigError, match="SPARKMPI_FORK_SERVER='maybe' is not a valid"):
        sparkmpi.load_settings({"SPARKMPI_FORK_SERVER": "maybe"})
    assert sparkmpi.load_settings({"SPARKMPI_FORK_SERVER": "0"}).fork_server is False


def test_a_killed_fork_server_is_replaced(sc):
    import signal

    rdd = sc.parallelize(range(4), 2)
    workers = {r["ppid"] for r in sparkmpi.run(rdd, who_am_i)}
    # A worker whose earlier jobs ran without the fork server starts it after this task.
    assert _wait_until(lambda: all(len(_children_named(w, "sparkmpi-zygote")) == 1 for w in workers))
    servers = [pid for w in workers for pid in _children_named(w, "sparkmpi-zygote")]
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    for _ in range(3):  # the spares made before still serve; then new servers fork
        ranks = sparkmpi.run(rdd, who_am_i)
        assert [r["name"] for r in ranks] == ["sparkmpi-rank"] * 2
    assert _wait_until(lambda: all(len(_children_named(w, "sparkmpi-zygote")) == 1 for w in workers))
    assert not set(servers) & set(_processes_named("sparkmpi-zygote"))


def modules_at_entry(comm, partition):
    import sys

    return [sorted(m for m in ("colorsys", "sparkmpi.tomo.projector") if m in sys.modules)]


def test_preloaded_modules_are_in_forked_ranks_before_their_job(sc):
    rdd = sc.parallelize(range(2), 2)
    sparkmpi.warm_up(sc, preload=("colorsys",))   # spares made before are replaced
    seen = [sparkmpi.run(rdd, modules_at_entry, preload=("colorsys", "sparkmpi.tomo.projector"))
            for _ in range(4)]
    # Spares made by warm_up have colorsys (a rank forked on demand would have both).
    assert all("colorsys" in modules for modules in seen[0]), seen
    # sparkmpi.tomo.projector was asked for with the first job: forks from then on have it.
    assert seen[-1] == [["colorsys", "sparkmpi.tomo.projector"]] * 2, seen


def test_preload_modules_lists_the_settings_then_sparkmpi_modules_of_fn():
    import functools

    from sparkmpi.launch.job import preload_modules
    from sparkmpi.tomo import mpi as tomo_mpi

    fn = functools.partial(tomo_mpi.sirt_rank, iterations=3)
    assert preload_modules(fn, ("colorsys",)) == ("colorsys", "sparkmpi.tomo.mpi")
    assert preload_modules(who_am_i) == ()   # a test module: only if listed
    assert sparkmpi.load_settings({"SPARKMPI_PRELOAD": "a.b, c"}).preload == ("a.b", "c")
    with pytest.raises(sparkmpi.ConfigError, match="preload must be a sequence of dotted module names"):
        sparkmpi.load_settings({"SPARKMPI_PRELOAD": "no-dashes"})
    with pytest.raises(sparkmpi.ConfigError, match="preload must be a sequence"):
        sparkmpi.load_settings(preload="colorsys")


PRELOAD_SCRIPT = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from sparkmpi.launch import fork_server, rank

rank.load_modules()   # what the fork server has imported before its first preload
fork_server.PRELOAD_CHECK_TIMEOUT_S = 1.0
assert fork_server._import_check("quiet_module_x") is None
assert "1 thread(s) running after import" in fork_server._import_check("threaded_module_x")
assert "ModuleNotFoundError" in fork_server._import_check("no_such_module_x")
started = time.monotonic()
assert "took more than 1 s" in fork_server._import_check("slow_module_x")
assert time.monotonic() - started < 5
assert "1 thread(s) running" in fork_server._import_check("warm_starts_thread_x")
fork_server.preload(["warmed_module_x"])
assert sys.modules["warmed_module_x"].WARMED == 1   # once, in this process
fork_server.preload(["quiet_module_x", "threaded_module_x", "quiet_module_x"])
assert "quiet_module_x" in sys.modules and "threaded_module_x" not in sys.modules
# A process with threads is not forked for the check (its child would run their thread-local
# finalizers: Py4J's shut down the parent's connections to the JVM).
stop = threading.Event()
threading.Thread(target=stop.wait).start()
reason = fork_server._import_check("colorsys")
stop.set()
assert reason.startswith("not checked: the check forks, and this process has 1 other Python thread(s)"), reason
print("ok")
"""


def test_fork_server_preloads_only_modules_that_start_no_threads(tmp_path):
    """In a process of its own, like the fork server: no threads, no Spark connections."""
    (tmp_path / "quiet_module_x.py").write_text("VALUE = 1\n")
    (tmp_path / "threaded_module_x.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n")
    (tmp_path / "slow_module_x.py").write_text("import time\ntime.sleep(30)\n")
    (tmp_path / "warmed_module_x.py").write_text(
        "WARMED = 0\ndef _sparkmpi_fork_server_warm_up():\n    global WARMED\n    WARMED += 1\n")
    (tmp_path / "warm_starts_thread_x.py").write_text(
        "def _sparkmpi_fork_server_warm_up():\n    import threading, time\n"
        "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n")
    done = subprocess.run([sys.executable, "-c", PRELOAD_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert "not preloading threaded_module_x: it leaves 1 thread(s) running" in done.stderr
    assert "quiet_module_x" not in done.stderr


@pytest.mark.xfail(strict=True, reason="in a process like the fork server, sparkmpi.ptycho.spark's warm-up leaves a "
                   "thread (jemalloc_bg_thd: numba's first compile loads the installed packages' numba "
                   "extensions, awkward's among them, which imports pyarrow), so the fork server does not "
                   "preload it; the test that claimed it passed ran the check in the pytest process")
def test_sparkmpi_ptycho_warm_up_passes_the_fork_servers_check():
    script = ("from sparkmpi.launch import fork_server, rank\nrank.load_modules()\n"
              # the real time limit: the warm-up (numba kernels, a tiny reconstruction) needs about a
              # second of CPU on a busy machine
              "fork_server.PRELOAD_CHECK_TIMEOUT_S = 30.0\nprint(fork_server._import_check('sparkmpi.ptycho.spark'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "None", done.stdout


POOL_SCRIPT = r"""
import os, signal, subprocess
from sparkmpi.launch import channel, pool

spares = pool.SparePool(fork_timeout=60.0)
# A forked rank says READY with its pid, is this process's child, and reports its death like one.
proc = spares.spawn()
kind, pid, _ = channel.recv_message(proc.ctrl)
assert kind == channel.READY and pid == proc.pid, (kind, pid, proc.pid)
assert isinstance(proc.popen, pool.ForkedChild)
with open(f"/proc/{proc.pid}/stat") as f:
    assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid(), "not re-parented to the worker"
proc.popen.send_signal(signal.SIGKILL)
assert proc.popen.wait(timeout=5) == -9
proc.close()

# warm_up's preload: a fork requested earlier without the module (by the replenish
# timer, say) and still pending is dropped too, not handed out as a spare later.
spares.server.request(())
assert spares.prepare(2, True, ("colorsys",), timeout=30) == 2
assert not spares.server.pending
assert [p.preload for p in spares.spares] == [("colorsys",)] * 2, [p.preload for p in spares.spares]
# The oldest spare is handed out first, and a fresh one is not made while spares wait.
first = spares.spares[0]
assert spares.acquire(True, ("colorsys",)) is first
first.stop(0)
spares.clear()
assert not spares.spares and spares.server is None

# A fork server that stops answering (stopped with SIGSTOP): each time the rank starts
# fresh and the server is killed; after max_server_failures the worker stops trying.
spares = pool.SparePool(fork_timeout=1.0, max_server_failures=3)
for attempt in range(spares.max_server_failures):
    server = spares.fork_server(start=True)
    assert server is not None, attempt
    os.kill(server.popen.pid, signal.SIGSTOP)
    proc = spares.spawn()
    assert isinstance(proc.popen, subprocess.Popen), type(proc.popen)
    assert server.popen.poll() is not None, "the stuck fork server was left running"
    proc.stop(1)
assert spares.fork_server(start=True) is None
assert pool.worker_pool() is pool.worker_pool()
print("ok")
"""


def test_pool_forks_ranks_and_falls_back_to_fresh_interpreters(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", POOL_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
    assert "failed 3 times" in done.stderr and "fresh interpreters from now on" in done.stderr
