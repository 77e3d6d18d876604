"""Scenarios the multi-host tests run in the testbed's driver (``driver.py``): ``fn(spark, bed, **kw)``.

Each returns plain data (lists, dicts, numbers) for the test to compare with
the single-process result it computes itself.
"""

import socket
import time

import numpy as np

import sparkmpi


def wait_for_executors(spark, count, timeout):
    """Until ``count`` executors have registered (each host's), so every job sees every slot."""
    sc = spark.sparkContext
    deadline = time.monotonic() + timeout
    while sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < count:   # minus the driver's
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sc._jsc.sc().getExecutorMemoryStatus().size() - 1} of {count} "
                               f"executors registered after {timeout} s")
        time.sleep(0.2)


def _placement(comm, records):
    from mpi4py import MPI

    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    node_ranks = shared.allgather(comm.rank)
    data = np.array([float(r) for r in records], dtype=np.float64)
    total = np.zeros(1)
    comm.Allreduce(np.array([data.sum()]), total)
    big = np.arange(200_000, dtype=np.float32) * (comm.rank + 1)
    big_sum = np.empty_like(big)
    comm.Allreduce(big, big_sum)
    gathered = comm.allgather(socket.gethostname())
    return [{"rank": comm.rank, "size": comm.size, "host": socket.gethostname(), "node_ranks": node_ranks,
             "total": float(total[0]), "big_checksum": float(big_sum.astype(np.float64).sum()),
             "hosts_seen": gathered}]


def placement(spark, bed, ranks, records=40):
    """sparkmpi.run over ``ranks`` partitions: where each rank ran, its node group and reductions."""
    rdd = spark.sparkContext.parallelize(range(records), ranks)
    return sparkmpi.run(rdd, _placement, start_timeout=60, timeout=60)


def _world_step(comm, state, factor):
    import socket as sk

    from mpi4py import MPI

    state["calls"] = state.get("calls", 0) + 1
    value = comm.allreduce(float(comm.rank + 1) * factor, op=MPI.SUM)
    return {"rank": comm.rank, "host": sk.gethostname(), "calls": state["calls"], "sum": value}


def world_calls(spark, bed, ranks, factors):
    """A persistent World across hosts called once per factor; the answers and the world's hosts."""
    with sparkmpi.World(spark, ranks, start_timeout=60) as world:
        answers = [world.call(_world_step, f, timeout=60) for f in factors]
        return {"answers": answers, "hosts": world.hosts}


def _busy_until_stopped(comm, records, marker_dir, seconds):
    """Allreduce in a loop for ``seconds`` (a job that hangs if a peer's host goes silent)."""
    import os
    import time as t

    from mpi4py import MPI

    open(os.path.join(marker_dir, f"started-{comm.rank}"), "w").close()
    end = t.monotonic() + seconds
    rounds = 0
    while t.monotonic() < end:
        comm.allreduce(1, op=MPI.SUM)
        rounds += 1
        t.sleep(0.01)
    return [rounds]


def _inject(bed, fault, host):
    import signal

    if fault == "link_down":
        bed.link(host, up=False)
    elif fault == "sigstop":
        bed.signal_host(host, signal.SIGSTOP)
    elif fault == "sigkill":
        bed.signal_host(host, signal.SIGKILL)     # its worker, executor, Python workers and ranks
    else:
        raise ValueError(f"fault: expected link_down, sigstop or sigkill, got {fault!r}")


def _recover(spark, bed, fault, host):
    import signal

    if fault == "link_down":
        bed.link(host, up=True)
    elif fault == "sigstop":
        bed.signal_host(host, signal.SIGCONT)
    else:
        bed.restart_worker(host)
        wait_for_executors(spark, len(bed.hosts), timeout=60)


def lost_host(spark, bed, fault, host, host_timeout=None, ranks=3, seconds=60.0):
    """Run a busy job, cut ``host`` off once every rank runs, and report what ``run`` raised and when;
    then (SIGKILL) a job on the surviving hosts, recover, and a job on every host."""
    import os
    import tempfile
    import threading

    marker_dir = tempfile.mkdtemp(prefix="sparkmpi-hosts-markers-")
    os.chmod(marker_dir, 0o777)
    injected = {}

    def injector():
        deadline = time.monotonic() + 60
        while len(os.listdir(marker_dir)) < ranks and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        injected["t"] = time.monotonic()
        _inject(bed, fault, host)

    thread = threading.Thread(target=injector, daemon=True)
    thread.start()
    rdd = spark.sparkContext.parallelize(range(ranks), ranks)
    report = {"fault": fault, "host": bed.host(host).hostname}
    options = {} if host_timeout is None else {"host_timeout": host_timeout}
    try:
        sparkmpi.run(rdd, lambda comm, recs: _busy_until_stopped(comm, recs, marker_dir, seconds),
                     start_timeout=60, **options)
        report["error"] = None
    except sparkmpi.JobFailed as exc:
        report["error"] = {"type": type(exc).__name__, "message": str(exc)[:3000], "rank": exc.rank,
                           "cause": exc.cause[:2000]}
    report["detected_s"] = time.monotonic() - injected["t"] if "t" in injected else None
    thread.join(5)
    if fault == "sigkill":
        survivors = sum(bed.cores) - bed.cores[host - 1]
        started = time.monotonic()
        report["survivors"] = placement(spark, bed, survivors, records=10)
        report["survivors_job_s"] = time.monotonic() - started
    _recover(spark, bed, fault, host)
    started = time.monotonic()
    report["next"] = placement(spark, bed, sum(bed.cores), records=10)
    report["next_job_s"] = time.monotonic() - started
    return report
