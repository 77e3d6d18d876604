"""``sparkmpi bench allreduce``: the paper's Table I on this machine.

Side by side in one run, on the same RDD:

* ``collect_s``: the paper's collect.py: every partition returns its
  ``elements``-long float32 array and the driver sums them;
* ``allreduce_s``: mean time of one ``MPI_Allreduce`` of the same array inside
  a Spark-MPI job (the paper's allreduce.py);
* ``native_allreduce_s``: the same mpi4py loop under MPICH's ``mpiexec``, no
  Spark;
* ``job_s``: wall time of a whole Spark-MPI job (rank start-up, MPI_Init,
  the Allreduce loop, results back), and ``trivial_barrier_job_s``: a
  do-nothing barrier job in the same SparkSession, measured alternately.

Each round measures every variant back to back (after a garbage collection
and a short pause each); each figure is the median over ``--jobs`` rounds and
each ratio the median of the rounds' ratios.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from ..errors import UsageError

NAME = "allreduce"
HELP = "Table I of the paper: Spark collect vs Allreduce in Spark-MPI vs native mpiexec"


def add_arguments(parser) -> None:
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks = Spark partitions (default 2)")
    parser.add_argument("--elements", type=int, default=2_000_000, help="float32 elements per array")
    parser.add_argument("--repeat", type=int, default=10, help="Allreduce calls timed per job")
    parser.add_argument("--jobs", type=int, default=7, help="measurements per figure (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (default 3)")
    parser.add_argument("--master", default=None, help="Spark master (default local[RANKS])")


def _check(args) -> None:
    cores = os.cpu_count() or 1
    if args.ranks < 1 or (args.master is None and args.ranks > cores):
        raise UsageError(f"--ranks must be in 1..{cores} (the cores of this machine), got {args.ranks}")
    if args.elements < 1:
        raise UsageError(f"--elements must be >= 1, got {args.elements}")
    if args.repeat < 1 or args.jobs < 1:
        raise UsageError("--repeat and --jobs must be >= 1")


def mpiexec_path() -> str:
    """MPICH's Hydra ``mpiexec`` from the same environment as mpi4py."""
    candidate = os.path.join(sys.prefix, "bin", "mpiexec")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("mpiexec not found: install the 'mpich' wheel into this environment")
    return found


def native_allreduce(ranks: int, elements: int, repeat: int, runs: int) -> list[float]:
    """Per-run mean Allreduce seconds under ``mpiexec -n ranks`` (no Spark)."""
    cmd = [mpiexec_path(), "-n", str(ranks), sys.executable, "-m", "sparkmpi.bench._allreduce_kernel",
           "--elements", str(elements), "--repeat", str(repeat), "--runs", str(runs)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMI_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"native run failed ({' '.join(cmd)}): {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["allreduce_s"]


def _spark_session(master: str):
    from ..launch.session import spark_session

    return spark_session(master, "sparkmpi-bench-allreduce")


def run(args) -> dict:
    _check(args)
    import numpy as np

    import sparkmpi

    from ._allreduce_kernel import timed_allreduce

    ranks, n, repeat = args.ranks, args.elements, args.repeat
    master = args.master or f"local[{ranks}]"
    print(f"bench allreduce: {ranks} ranks, {n} float32, master {master}", file=sys.stderr)
    session = _spark_session(master)
    sc = session.sparkContext
    rdd = sc.parallelize([{"n": n, "rank": r} for r in range(ranks)], ranks).cache()
    rdd.count()

    def sendbuf(kvs):
        buf = np.arange(kvs["n"], dtype=np.float32)
        buf[kvs["n"] - 1] = 5.0
        return buf

    def collect_once() -> float:
        started = time.perf_counter()
        total = np.sum(rdd.map(sendbuf).collect(), axis=0)
        elapsed = time.perf_counter() - started
        assert total[n - 1] == 5.0 * ranks
        return elapsed

    def mpi_job(comm, records):
        mean, last = timed_allreduce(comm, n, repeat)
        return [(mean, last)]

    def count_records(iterator):
        # Consume the input: PySpark reuses a Python worker only if its task
        # read the whole partition, and a killed worker takes its warm spares.
        return [sum(1 for _ in iterator)]

    def trivial_once() -> float:
        started = time.perf_counter()
        rdd.barrier().mapPartitions(count_records).collect()
        return time.perf_counter() - started

    def settle() -> None:
        # Every variant starts from the same quiet state: the previous one's
        # garbage (16 MB arrays per collect) collected, the JVM idle.
        gc.collect()
        time.sleep(0.2)

    # Warm-up until the JVM's JIT compilers have settled: they keep a core busy
    # for a while after new Spark work, which would disturb the ranks.
    for _ in range(args.warmup):
        collect_once(), trivial_once(), sparkmpi.run(rdd, mpi_job)
    collect, trivial, jobs, inner, native = [], [], [], [], []
    for i in range(args.jobs):
        settle()
        collect.append(collect_once())
        settle()
        trivial.append(trivial_once())
        settle()
        started = time.perf_counter()
        results = sparkmpi.run(rdd, mpi_job)
        jobs.append(time.perf_counter() - started)
        inner.append(results[0][0])
        expected = float(ranks * (repeat - 1))
        if any(r[1] != expected for r in results):
            raise RuntimeError(f"Allreduce gave {[r[1] for r in results]}, expected {expected}")
        settle()
        native.append(native_allreduce(ranks, n, repeat, 1)[0])
        print(f"  round {i + 1}/{args.jobs}: collect {collect[-1]:.3f} s, allreduce {inner[-1] * 1e3:.2f} ms, "
              f"native {native[-1] * 1e3:.2f} ms, job {jobs[-1]:.3f} s, trivial barrier job {trivial[-1]:.3f} s",
              file=sys.stderr)

    report = {
        "ranks": ranks,
        "elements": n,
        "repeat": repeat,
        "master": master,
        "collect_s": statistics.median(collect),
        "allreduce_s": statistics.median(inner),
        "native_allreduce_s": statistics.median(native),
        "job_s": statistics.median(jobs),
        "trivial_barrier_job_s": statistics.median(trivial),
    }
    # Ratios pair the figures of one round, which all saw the same machine
    # state (the Allreduce speed on this shared machine varies between
    # minutes, for native and Spark-MPI ranks alike), then take the median.
    report["collect_over_allreduce"] = statistics.median(c / a for c, a in zip(collect, inner))
    report["allreduce_over_native"] = statistics.median(a / b for a, b in zip(inner, native))
    report["job_over_trivial"] = statistics.median(j / t for j, t in zip(jobs, trivial))
    report["rounds"] = {"collect_s": collect, "allreduce_s": inner, "native_allreduce_s": native,
                        "job_s": jobs, "trivial_barrier_job_s": trivial}
    return report
