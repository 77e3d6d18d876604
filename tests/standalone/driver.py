"""Driver run by test_standalone.py against a local standalone cluster.

Prints one JSON line with what the jobs returned.  The rank functions live in
this script and in a local helper module, neither installed on the workers.
"""

import json
import os
import sys
import time

import sparkmpi

sys.path.insert(0, os.path.dirname(__file__))
import rank_helpers  # noqa: E402  (a local module the executors cannot import)


def allreduce(comm, partition):
    import numpy as np
    from mpi4py import MPI

    buf = np.full(2_000_000, comm.rank + 1, dtype=np.float32)
    out = np.empty_like(buf)
    comm.Allreduce(buf, out, op=MPI.SUM)
    return [(comm.rank, float(out[0]), sum(partition))]


def main():
    master = sys.argv[1]
    spark = sparkmpi.spark_session(master, "sparkmpi-standalone-test", conf={
        "spark.executor.cores": "2", "spark.cores.max": "2", "spark.executor.memory": "1g",
        "spark.ui.enabled": "false"})
    rdd = spark.sparkContext.parallelize(range(8), 2)
    report = {"allreduce": sparkmpi.run(rdd, allreduce, start_timeout=120)}
    report["helper"] = sparkmpi.run(rdd, rank_helpers.rank_and_size)
    try:
        sparkmpi.run(rdd, rank_helpers.fail_on_rank_one)
        report["failure"] = None
    except sparkmpi.JobFailed as exc:
        report["failure"] = {"rank": exc.rank, "partition": exc.partition, "message": str(exc)}
    report["after_failure"] = sparkmpi.run(rdd, rank_helpers.rank_and_size)
    # An executor lost in the middle of a job: a clear error, then a new executor runs the next job.
    report["executor_before"] = sorted({pid for _, pid in sparkmpi.run(rdd, rank_helpers.executor_pid)})
    t0 = time.monotonic()
    try:
        sparkmpi.run(rdd, rank_helpers.kill_own_executor, timeout=120)
        report["lost"] = None
    except Exception as exc:  # noqa: BLE001  (the test checks which)
        report["lost"] = {"type": type(exc).__name__, "message": str(exc)[:2000],
                          "seconds": time.monotonic() - t0}
        # The ranks died after MPI_Init: their shared-memory segment is left for whoever ran the job
        # to remove (the launcher does not do it yet for a lost executor).
        from sparkmpi.launch.shm import remove_job_segments

        report["lost"]["segments_left"] = remove_job_segments(getattr(exc, "job_id", ""))
    report["executor_after"] = sorted({pid for _, pid in sparkmpi.run(rdd, rank_helpers.executor_pid,
                                                                      start_timeout=120)})
    print("REPORT " + json.dumps(report))
    spark.stop()


if __name__ == "__main__":
    main()
