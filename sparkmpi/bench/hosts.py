"""``sparkmpi bench hosts``: Spark-MPI against native MPI across simulated hosts, and lost hosts.

Brings up a testbed of ``--hosts`` simulated hosts (network namespaces with
their own host names and ``/dev/shm``, one Spark worker with one core each:
see :mod:`sparkmpi.launch.testbed`), runs the driver on the bridge, and
tears everything down at the end.  Needs root.  Reports:

* ``allreduce_s``: mean Allreduce of ``--elements`` float32, one rank per
  host, inside a :func:`sparkmpi.run` job; ``native_allreduce_s``: the same
  loop under Hydra's ``mpiexec`` on the same hosts, launched through a script
  that enters each host's namespaces in place of ssh; their ratio
  ``allreduce_over_native``;
* ``job_s``: the whole ``sparkmpi.run`` of that job, against
  ``trivial_barrier_job_s``, a Spark barrier stage over the same hosts that
  does nothing;
* ``link_down_detected_s``, ``sigstop_detected_s``, ``executor_kill_detected_s``:
  from cutting one host off in the middle of a job (its link set down; every
  process on it frozen by SIGSTOP; its executor and what it started killed)
  until ``sparkmpi.run`` raised ``JobFailed``; ``next_job_ok``: after each, once
  the host is back, a job on every host returned the right answer.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from ..errors import UsageError

NAME = "hosts"
HELP = "Spark-MPI vs native mpiexec across simulated hosts (network namespaces); lost-host detection"
FAULTS = ("link_down", "sigstop", "executor_kill", "sigkill")


def add_arguments(parser) -> None:
    parser.add_argument("--hosts", type=int, default=2, help="simulated hosts, one rank each (default 2)")
    parser.add_argument("--elements", type=int, default=2_000_000, help="float32 per Allreduce (default 2,000,000)")
    parser.add_argument("--repeat", type=int, default=10, help="Allreduce calls timed per job (default 10)")
    parser.add_argument("--jobs", type=int, default=5, help="measurements per figure (median reported)")
    parser.add_argument("--host-timeout", type=float, default=None,
                        help="the host_timeout setting for the fault jobs (default: the setting's value)")


def _check(args) -> None:
    if not 2 <= args.hosts <= 8:
        raise UsageError(f"--hosts must be in 2..8, got {args.hosts}")
    if args.elements < 1 or args.repeat < 1 or args.jobs < 1:
        raise UsageError("--elements, --repeat and --jobs must be >= 1")


# ---------------------------------------------------------------- shared with the multi-host tests
def wait_for_executors(spark, count: int, timeout: float) -> None:
    """Until ``count`` executors have registered with the driver."""
    sc = spark.sparkContext
    deadline = time.monotonic() + timeout
    while sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < count:   # minus the driver's block manager
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sc._jsc.sc().getExecutorMemoryStatus().size() - 1} of {count} "
                               f"executors registered after {timeout:g} s")
        time.sleep(0.2)


def busy_until_stopped(comm, records, marker_dir: str, seconds: float):
    """Allreduce in a loop for ``seconds``: a job that hangs if a peer's host goes silent.  Each
    rank first leaves a file in ``marker_dir`` so the fault comes once every rank runs."""
    from mpi4py import MPI

    open(os.path.join(marker_dir, f"started-{comm.rank}"), "w").close()
    end = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < end:
        comm.allreduce(1, op=MPI.SUM)
        rounds += 1
        time.sleep(0.01)
    return [rounds]


def inject(bed, fault: str, host: int) -> None:
    """Make host ``host`` of the testbed ``bed`` fail in the way ``fault`` names."""
    if fault == "link_down":
        bed.link(host, up=False)
    elif fault == "sigstop":
        bed.signal_host(host, signal.SIGSTOP)
    elif fault == "sigkill":                 # its worker, executor, Python workers and ranks
        bed.signal_host(host, signal.SIGKILL)
    elif fault == "executor_kill":           # all but the worker, which starts a new executor
        worker = {bed.pids.get(f"worker-{host}", [None])[0], bed.host_init_pid(host)}   # unshare, the JVM
        for pid in bed.host_pids(host):
            if pid not in worker:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    else:
        raise ValueError(f"fault: expected one of {FAULTS}, got {fault!r}")


def recover(spark, bed, fault: str, host: int) -> None:
    """Bring host ``host`` back after :func:`inject` and wait for its executor."""
    if fault == "link_down":
        bed.link(host, up=True)
    elif fault == "sigstop":
        bed.signal_host(host, signal.SIGCONT)
    elif fault == "sigkill":
        bed.restart_worker(host)
    wait_for_executors(spark, len(bed.hosts), timeout=90)


def lost_host_job(spark, bed, fault: str, host: int, ranks: int, host_timeout: float | None = None,
                  seconds: float = 60.0) -> dict:
    """Run a busy job of ``ranks`` ranks, :func:`inject` ``fault`` into ``host`` once every rank
    runs; ``{"error": {type, message, rank, cause} or None, "detected_s": s from fault to raise}``."""
    import sparkmpi

    marker_dir = tempfile.mkdtemp(prefix="sparkmpi-hosts-markers-")
    injected: dict = {}

    def injector():
        deadline = time.monotonic() + 60
        while len(os.listdir(marker_dir)) < ranks and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        injected["t"] = time.monotonic()
        inject(bed, fault, host)

    thread = threading.Thread(target=injector, daemon=True)
    thread.start()
    rdd = spark.sparkContext.parallelize(range(ranks), ranks)
    options = {} if host_timeout is None else {"host_timeout": host_timeout}
    report: dict = {"fault": fault, "host": bed.host(host).hostname}
    try:
        sparkmpi.run(rdd, lambda comm, recs: busy_until_stopped(comm, recs, marker_dir, seconds),
                     start_timeout=60, **options)
        report["error"] = None
    except sparkmpi.JobFailed as exc:
        report["error"] = {"type": type(exc).__name__, "message": str(exc)[:3000], "rank": exc.rank,
                           "cause": exc.cause[:2000]}
    report["detected_s"] = time.monotonic() - injected["t"] if "t" in injected else None
    thread.join(5)
    for name in os.listdir(marker_dir):
        os.unlink(os.path.join(marker_dir, name))
    os.rmdir(marker_dir)
    return report


# ---------------------------------------------------------------- the benchmark
def _hostname_job(comm, records):
    import socket

    return [(comm.rank, socket.gethostname(), comm.allreduce(comm.rank + 1))]


def native_allreduce(bed, elements: int, repeat: int) -> float:
    """Mean Allreduce seconds under Hydra's mpiexec, one rank per simulated host."""
    from .allreduce import mpiexec_path

    hosts = ",".join(h.address for h in bed.hosts)
    cmd = [mpiexec_path(), "-launcher", "ssh", "-launcher-exec", bed.launcher_script(),
           "-localhost", bed.plan.bridge_address, "-hosts", hosts, "-n", str(len(bed.hosts)), "-ppn", "1",
           sys.executable, "-m", "sparkmpi.bench._allreduce_kernel",
           "--elements", str(elements), "--repeat", str(repeat), "--runs", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMI_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"native run failed ({' '.join(cmd)}): {done.stderr.strip()[-2000:]}")
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])["allreduce_s"][0]


def run(args) -> dict:
    _check(args)
    import sparkmpi

    from ..launch import testbed
    from ..launch.session import spark_session
    from ._allreduce_kernel import timed_allreduce

    n, repeat, hosts = args.elements, args.repeat, args.hosts
    print(f"bench hosts: {hosts} simulated hosts, one rank each, {n} float32", file=sys.stderr)
    bed = testbed.up(hosts, cores=1)
    session = None
    try:
        os.environ.update(bed.driver_environment())
        started = time.monotonic()
        session = spark_session(bed.master_url, "sparkmpi-bench-hosts", conf=bed.spark_conf())
        wait_for_executors(session, hosts, timeout=90)
        print(f"  testbed {bed.plan.name} up, driver on {bed.plan.bridge_address}, executors after "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr)
        sc = session.sparkContext
        rdd = sc.parallelize(range(hosts), hosts).cache()
        rdd.count()
        placed = sparkmpi.run(rdd, _hostname_job, start_timeout=90)
        if len({h for _, h, _ in placed}) != hosts:
            raise RuntimeError(f"the ranks did not land one per host: {placed}")

        def mpi_job(comm, records):
            mean, last = timed_allreduce(comm, n, repeat)
            return [(mean, last)]

        def trivial_once() -> float:
            t0 = time.perf_counter()
            rdd.barrier().mapPartitions(lambda it: [sum(1 for _ in it)]).collect()
            return time.perf_counter() - t0

        for _ in range(2):
            trivial_once(), sparkmpi.run(rdd, mpi_job)
        inner, native, jobs, trivial = [], [], [], []
        for i in range(args.jobs):
            trivial.append(trivial_once())
            t0 = time.perf_counter()
            results = sparkmpi.run(rdd, mpi_job)
            jobs.append(time.perf_counter() - t0)
            expected = float(hosts * (repeat - 1))
            if any(r[1] != expected for r in results):
                raise RuntimeError(f"Allreduce gave {[r[1] for r in results]}, expected {expected}")
            inner.append(results[0][0])
            native.append(native_allreduce(bed, n, repeat))
            print(f"  round {i + 1}/{args.jobs}: allreduce {inner[-1] * 1e3:.2f} ms, native "
                  f"{native[-1] * 1e3:.2f} ms, job {jobs[-1]:.3f} s, trivial barrier job {trivial[-1]:.3f} s",
                  file=sys.stderr)
        report = {"hosts": hosts, "elements": n, "repeat": repeat,
                  "allreduce_s": statistics.median(inner), "native_allreduce_s": statistics.median(native),
                  "allreduce_over_native": statistics.median(a / b for a, b in zip(inner, native)),
                  "job_s": statistics.median(jobs), "trivial_barrier_job_s": statistics.median(trivial),
                  "rounds": {"allreduce_s": inner, "native_allreduce_s": native, "job_s": jobs,
                             "trivial_barrier_job_s": trivial}}
        next_ok = True
        for fault, key in (("link_down", "link_down_detected_s"), ("sigstop", "sigstop_detected_s"),
                           ("executor_kill", "executor_kill_detected_s")):
            lost = lost_host_job(session, bed, fault, hosts, hosts, host_timeout=args.host_timeout)
            recover(session, bed, fault, hosts)
            after = sparkmpi.run(rdd, _hostname_job, start_timeout=90)
            ok = sorted(after) == sorted(placed) or (
                [r for _, _, r in after] == [r for _, _, r in placed] and len({h for _, h, _ in after}) == hosts)
            next_ok = next_ok and ok and lost["error"] is not None
            report[key] = lost["detected_s"]
            report[f"{fault}_error"] = (lost["error"] or {}).get("message", "no error: the job finished")[:300]
            print(f"  {fault}: JobFailed after {lost['detected_s']:.1f} s; next job "
                  f"{'ok' if ok else 'WRONG'}", file=sys.stderr)
        report["next_job_ok"] = next_ok
        return report
    finally:
        if session is not None:
            session.stop()
        problems = bed.down()
        if problems:
            print(f"bench hosts: teardown incomplete: {problems}", file=sys.stderr)
