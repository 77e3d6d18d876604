"""Scenarios the multi-host tests run in the testbed's driver (``driver.py``): ``fn(spark, bed, **kw)``.

Each returns plain data (lists, dicts, numbers) for the test to compare with
the single-process result it computes itself.
"""

import os
import socket
import time

import numpy as np

import sparkmpi
from sparkmpi.bench.hosts import wait_for_executors  # noqa: F401  (used by driver.py)


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


def placement(spark, bed, ranks, records=40, **settings):
    """sparkmpi.run over ``ranks`` partitions: where each rank ran, its node group and reductions."""
    rdd = spark.sparkContext.parallelize(range(records), ranks)
    return sparkmpi.run(rdd, _placement, start_timeout=60, timeout=60, **settings)


def _world_step(comm, state, factor):
    import socket as sk

    from mpi4py import MPI

    state["calls"] = state.get("calls", 0) + 1
    value = comm.allreduce(float(comm.rank + 1) * factor, op=MPI.SUM)
    return {"rank": comm.rank, "host": sk.gethostname(), "calls": state["calls"], "sum": value}


def world_calls(spark, bed, ranks, factors):
    """A persistent World across hosts called once per factor; the answers, the world's hosts and
    its PMI key space (the keys and values its ranks put)."""
    from sparkmpi.config import load_settings
    from sparkmpi.launch.job import get_server, resolve_host

    with sparkmpi.World(spark, ranks, start_timeout=60) as world:
        answers = [world.call(_world_step, f, timeout=60) for f in factors]
        # What the ranks put into the PMI key space, read while the world (and so its job) is open.
        server = get_server(resolve_host(load_settings(), spark.sparkContext))
        keys = [job.key_values() for job in server.open_jobs()]
        return {"answers": answers, "hosts": world.hosts, "pmi_keys": keys}



def lost_host(spark, bed, fault, host, host_timeout=None, ranks=3):
    """A busy job with ``host`` cut off once every rank runs (see sparkmpi.bench.hosts.lost_host_job);
    then (SIGKILL) a job on the surviving hosts; then, the host back, a job on every host."""
    from sparkmpi.bench import hosts as bench_hosts

    report = bench_hosts.lost_host_job(spark, bed, fault, host, ranks, host_timeout=host_timeout)
    if fault == "sigkill":
        survivors = sum(bed.cores) - bed.cores[host - 1]
        started = time.monotonic()
        report["survivors"] = placement(spark, bed, survivors, records=10)
        report["survivors_job_s"] = time.monotonic() - started
    bench_hosts.recover(spark, bed, fault, host)
    started = time.monotonic()
    report["next"] = placement(spark, bed, sum(bed.cores), records=10)
    report["next_job_s"] = time.monotonic() - started
    return report


def tomography(spark, bed, ranks, folder):
    """The MPI tomography job (SIRT, slices split over ranks) against one process: max abs difference."""
    from sparkmpi.tomo import default_angles, simulate_tilt_series, sirt
    from sparkmpi.tomo.spark import reconstruct_mpi

    path = os.path.join(folder, "series.tif")
    series, _ = simulate_tilt_series(24, angles_deg=default_angles(16, 70.0), out=path)
    volume, info = reconstruct_mpi(spark, path, ranks=ranks, iterations=15, positivity=True, timeout=120)
    serial = sirt(series.sinograms(), series.angles_deg, iterations=15, positivity=True)
    return {"ranks": info["ranks"], "max_abs_diff": float(np.abs(volume - serial).max())}


def ptychography(spark, bed, ranks, folder):
    """The distributed ptychography (DM, frames split over ranks) against one process: relative error."""
    from sparkmpi import ptycho
    from sparkmpi.ptycho.spark import reconstruct_mpi

    data = ptycho.simulate(frames=72, frame_size=48, seed=1)
    path = data.save(os.path.join(folder, "scan.npz"))
    probe = ptycho.model_probe(data)
    mask = ptycho.illuminated_mask(data)
    out = reconstruct_mpi(spark, path, ranks=ranks, iterations=4, probe=probe, timeout=180)
    serial = ptycho.reconstruct(data, iterations=4, probe=probe)
    rel = float(np.linalg.norm((out.object - serial.object)[mask]) / np.linalg.norm(serial.object[mask]))
    return {"ranks": out.ranks, "frames_per_rank": out.frames_per_rank, "object_rel_diff": rel}


def _integrate_and_name_host(comm, frames):
    """The stream's default process function, plus the number of the host that took each frame."""
    import socket as sk

    from sparkmpi.stream.driver import integrate_frames

    out = integrate_frames(comm, frames)
    host = int(sk.gethostname().rsplit("host", 1)[1])      # testbed host names end in host<N>
    out["host"] = np.full(len(out["intensity"]), host, dtype=np.int64)
    return out


def stream(spark, bed, bootstrap, topic, out, ranks=2, max_frames=100):
    """A Kafka stream through the driver's own world (mode="world"), every batch on ``ranks`` ranks;
    the report's counts and the world's hosts (the outputs are for the test to read)."""
    from sparkmpi.stream.driver import StreamDriver

    hosts = []
    driver = StreamDriver(spark, bootstrap, topic, "hosts", out, ranks=ranks, trigger=0.1, max_frames=max_frames,
                          process=_integrate_and_name_host, progress=None, start_timeout=10,
                          job_settings={"start_timeout": 60})
    report = driver.run(until_end_of_scan=True, on_batch=lambda b: hosts.append(list(driver.world.hosts)))
    return {"stopped": report.stopped, "frames": report.frames, "batches": report.batches,
            "dead_letters": report.dead_letters, "world_hosts": hosts}



# Each rank: its host name, the size of its shared-memory group, and an Allreduce of a
# 200,000-double array (past the eager limit: the network path between hosts) of (rank + 1) * i.
HOSTS_PROGRAM_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int rank, size, local_size;
    char host[256];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm shared;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &shared);
    MPI_Comm_size(shared, &local_size);
    gethostname(host, sizeof host);
    long n = 200000;
    double *values = malloc(n * sizeof(double)), *sums = malloc(n * sizeof(double)), total = 0;
    for (long i = 0; i < n; i++) values[i] = (rank + 1.0) * i;
    MPI_Allreduce(values, sums, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    for (long i = 0; i < n; i++) total += sums[i];
    printf("rank %d of %d host %s shared %d total %.1f\n", rank, size, host, local_size, total);
    MPI_Finalize();
    return 0;
}
"""


def program(spark, bed, ranks, folder):
    """A compiled MPI program (the wheel's mpicc) under ``sparkmpi.run_program`` on the testbed."""
    import subprocess
    import sys

    source, exe = os.path.join(folder, "hosts_program.c"), os.path.join(folder, "hosts_program")
    with open(source, "w") as fh:
        fh.write(HOSTS_PROGRAM_C)
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "mpicc"), "-O1", "-o", exe, source],
                   check=True, timeout=120)
    result = sparkmpi.run_program(spark, [exe], ranks=ranks, timeout=90, start_timeout=60)
    return {"returncode": result.returncode, "exit_codes": list(result.exit_codes), "message": result.message,
            "stdout": [result.stdout[r].decode() for r in range(ranks)]}


def bench_allreduce(spark, bed, ranks=2, elements=200_000):
    """``sparkmpi bench allreduce --master <the testbed's master> --json`` in this driver (whose
    session on that master it reuses: Spark's getOrCreate); its exit code and JSON report."""
    import contextlib
    import io
    import json

    from sparkmpi.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", "allreduce", "--master", bed.master_url, "--ranks", str(ranks), "--elements",
                     str(elements), "--repeat", "3", "--jobs", "1", "--warmup", "0", "--json"])
    lines = out.getvalue().strip().splitlines()
    return {"code": code, "report": json.loads(lines[-1]) if code == 0 and lines else None,
            "stdout": out.getvalue()[-2000:]}
