"""``sparkmpi bench world``: calls on a persistent world against one-shot ``run`` jobs.

Side by side in one run, on one SparkSession with task slots for both:

* ``call_p50_s`` / ``call_p99_s``: a trivial call (``fn(comm, state)``
  returning the rank) on an open :class:`~sparkmpi.World`, over ``--calls``
  calls;
* ``call_8mb_s``: a call that scatters ``--megabytes`` MB (a float64 array)
  to each rank and gets its sum back (median of ``--big-calls``);
* ``run_job_s``: a one-shot :func:`sparkmpi.run` of the same trivial
  function (median of ``--jobs``), interleaved with the calls so both see
  the same machine state;
* ``run_over_call``: ``run_job_s / call_p50_s``.
"""

from __future__ import annotations

import statistics
import sys
import time

NAME = "world"
HELP = "persistent world calls vs one-shot run jobs (latency, 8 MB scatter)"


def add_arguments(parser) -> None:
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the world (default 2)")
    parser.add_argument("--calls", type=int, default=1000, help="trivial calls timed (default 1000)")
    parser.add_argument("--jobs", type=int, default=10, help="one-shot run jobs timed (default 10)")
    parser.add_argument("--megabytes", type=float, default=8.0, help="MB scattered to each rank (default 8)")
    parser.add_argument("--big-calls", type=int, default=10, help="scatter calls timed (default 10)")
    parser.add_argument("--master", default=None,
                        help="Spark master (default local[2*RANKS]: the world's slots and a run's)")


def _check(args) -> None:
    from ..cli import UsageError

    if args.ranks < 1:
        raise UsageError(f"--ranks must be >= 1, got {args.ranks}")
    if args.calls < 10 or args.jobs < 1 or args.big_calls < 1:
        raise UsageError("--calls must be >= 10 and --jobs, --big-calls >= 1")
    if not args.megabytes > 0:
        raise UsageError(f"--megabytes must be > 0, got {args.megabytes}")


def _trivial_call(comm, state):
    return comm.rank


def _trivial_job(comm, records):
    return [comm.rank]


def _array_sum(comm, state, array):
    return float(array.sum())


def _percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args) -> dict:
    _check(args)
    import numpy as np

    import sparkmpi
    from sparkmpi.launch.session import spark_session

    ranks = args.ranks
    master = args.master or f"local[{2 * ranks}]"
    print(f"bench world: {ranks} ranks, master {master}", file=sys.stderr)
    session = spark_session(master, "sparkmpi-bench-world")
    sc = session.sparkContext
    rdd = sc.parallelize(range(ranks), ranks).cache()
    rdd.count()
    sparkmpi.warm_up(sc)
    for _ in range(2):
        sparkmpi.run(rdd, _trivial_job)
    elements = int(args.megabytes * 1e6 / 8)
    parts = [np.full(elements, float(r + 1)) for r in range(ranks)]
    calls, jobs, big = [], [], []
    with sparkmpi.World(session, ranks=ranks) as world:
        for _ in range(50):
            world.call(_trivial_call)
        per_round = max(1, args.calls // args.jobs)
        while len(calls) < args.calls or len(jobs) < args.jobs:
            for _ in range(min(per_round, args.calls - len(calls))):
                started = time.perf_counter()
                result = world.call(_trivial_call)
                calls.append(time.perf_counter() - started)
                if result != list(range(ranks)):
                    raise RuntimeError(f"a trivial call returned {result}")
            if len(jobs) < args.jobs:
                started = time.perf_counter()
                result = sparkmpi.run(rdd, _trivial_job)
                jobs.append(time.perf_counter() - started)
                if result != list(range(ranks)):
                    raise RuntimeError(f"a trivial run returned {result}")
        for _ in range(args.big_calls):
            started = time.perf_counter()
            sums = world.call(_array_sum, scatter=parts)
            big.append(time.perf_counter() - started)
            if sums != [float(elements * (r + 1)) for r in range(ranks)]:
                raise RuntimeError(f"scattered arrays summed to {sums}")
        print(f"  {len(calls)} calls: p50 {statistics.median(calls) * 1e3:.2f} ms; "
              f"{len(jobs)} run jobs: median {statistics.median(jobs):.3f} s; "
              f"{args.megabytes:g} MB scatter: median {statistics.median(big) * 1e3:.1f} ms", file=sys.stderr)
    session.stop()
    call_p50 = statistics.median(calls)
    return {
        "ranks": ranks,
        "master": master,
        "calls": len(calls),
        "call_p50_s": call_p50,
        "call_p99_s": _percentile(calls, 0.99),
        "call_max_s": max(calls),
        "call_8mb_s": statistics.median(big),
        "megabytes_per_rank": args.megabytes,
        "run_job_s": statistics.median(jobs),
        "run_over_call": statistics.median(jobs) / call_p50,
    }
