"""Spark slice-partitioned reconstruction (the paper's section IV workflow).

1. Load the tilt series into an RDD of ``(slice_index, sinogram)`` records,
   from a TIFF stack (read and validated on the driver, then parallelised) or
   from the Parquet table of :func:`sparkmpi.tomo.io.tiff_to_parquet`
   (read by Spark).
2. Repartition by slice index into ``P`` partitions of neighbouring slices.
3. Reconstruct each partition with the batched algorithm; the system matrix
   is either rebuilt once per Python worker (and cached there) or shipped as a
   Spark broadcast variable.
4. Collect the blocks and place them in slice order.

Only this module touches Spark; the numerical work is plain functions from
:mod:`sparkmpi.tomo.algorithms`.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from .algorithms import ALGORITHMS, FILTERS, art, fbp, sirt
from .io import TiltSeries, TiltSeriesError, decode_sinogram_row, parquet_metadata, read_tilt_series
from .projector import cached_system_matrix, system_matrix
from ..errors import InvalidArgument

__all__ = ["MATRIX_MODES", "load_sinograms_rdd", "partition_slices", "reconstruct_rdd", "reconstruct_spark",
           "reconstruct_mpi"]

MATRIX_MODES = ("rebuild", "broadcast")


class SlicePartitioner:
    """Map slice index ``s`` of ``n_slices`` to partition ``s * P // n_slices``.

    Neighbouring slices share a partition and partition ``p`` holds a
    contiguous range, in order, of about ``n_slices / P`` slices.
    """

    def __init__(self, n_slices: int, partitions: int):
        self.n_slices = int(n_slices)
        self.partitions = int(partitions)

    def __call__(self, key) -> int:
        return int(key) * self.partitions // self.n_slices

    def __eq__(self, other):
        return (isinstance(other, SlicePartitioner) and other.n_slices == self.n_slices
                and other.partitions == self.partitions)

    def __hash__(self):
        return hash((self.n_slices, self.partitions))


def _decode_parquet_row(row):
    return int(row[0]), decode_sinogram_row(int(row[1]), int(row[2]), row[3], float(row[4]), bytes(row[5]))


def load_sinograms_rdd(spark, source, angles=None, angles_file=None, num_slices: int | None = None):
    """Load a tilt series into Spark as ``(slice_index, sinogram)`` records.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
    source : str, Path or TiltSeries
        A ``.tif``/``.tiff`` stack, a ``.parquet`` sinogram table, or a series
        already in memory.
    angles, angles_file
        For TIFF input, as in :func:`sparkmpi.tomo.io.read_tilt_series`.
    num_slices : int, optional
        Number of RDD partitions for in-memory or TIFF input (default
        Spark's parallelism).  ``parallelize`` cuts the slice list into
        contiguous ranges, so such an RDD is already slice-partitioned; the
        metadata then says so (``"partitioned": num_slices``) and
        :func:`reconstruct_rdd` skips the shuffle when it asks for the same
        number of partitions.

    Returns
    -------
    (pyspark.RDD, dict)
        Records ``(int, float32 array (n_angles, n_rays))`` and the metadata
        ``angles_deg``, ``n_slices``, ``n_angles``, ``n_rays``.

    Raises
    ------
    TiltSeriesError
        On any invalid input, before a Spark job starts.
    """
    sc = spark.sparkContext
    if isinstance(source, TiltSeries):
        series = source
    else:
        path = Path(source)
        if path.suffix.lower() == ".parquet":
            if angles is not None or angles_file is not None:
                raise TiltSeriesError(f"'{path}': a Parquet table carries its own angles; "
                                      f"do not pass angles or angles_file")
            meta = parquet_metadata(path)
            meta["partitioned"] = 0
            frame = spark.read.parquet(str(path)).select("slice", "n_angles", "n_rays", "dtype", "scale", "data")
            rdd = frame.rdd.map(_decode_parquet_row)
            return rdd, meta
        series = read_tilt_series(path, angles=angles, angles_file=angles_file)
    meta = {"angles_deg": np.asarray(series.angles_deg, dtype=np.float64), "n_slices": series.n_slices,
            "n_angles": series.n_angles, "n_rays": series.n_rays}
    sinos = series.sinograms()
    records = [(s, sinos[s]) for s in range(series.n_slices)]
    num_slices = min(num_slices or sc.defaultParallelism, series.n_slices)
    meta["partitioned"] = num_slices
    rdd = sc.parallelize(records, num_slices)
    return rdd, meta


def partition_slices(rdd, n_slices: int, partitions: int):
    """Repartition ``(slice_index, value)`` records into contiguous slice ranges."""
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise InvalidArgument(f"partitions must be a positive integer, got {partitions!r}")
    if partitions > n_slices:
        raise InvalidArgument(f"partitions ({partitions}) must not exceed the number of slices ({n_slices})")
    return rdd.partitionBy(partitions, SlicePartitioner(n_slices, partitions))


def _reconstruct_partition(config: dict, index: int, records):
    """Spark task: reconstruct one partition's slices; yields one block record."""
    items = sorted(records, key=lambda r: r[0])
    if not items:
        return
    t0 = time.perf_counter()
    if config["matrix"] is not None:
        matrix = config["matrix"].value
    else:
        matrix = cached_system_matrix(config["n"], config["angles_deg"], config["n_rays"])
    t1 = time.perf_counter()
    slices = np.array([r[0] for r in items], dtype=np.int64)
    sinos = np.stack([r[1] for r in items])
    algorithm = config["algorithm"]
    if algorithm == "art":
        block = art(sinos, config["angles_deg"], n=config["n"], iterations=config["iterations"],
                    relaxation=config["relaxation"], positivity=config["positivity"], matrix=matrix)
    elif algorithm == "sirt":
        block = sirt(sinos, config["angles_deg"], n=config["n"], iterations=config["iterations"],
                     relaxation=config["relaxation"], positivity=config["positivity"], matrix=matrix)
    else:
        block = fbp(sinos, config["angles_deg"], n=config["n"], filter=config["filter"], matrix=matrix)
    t2 = time.perf_counter()
    yield index, slices, block, {"matrix_s": t1 - t0, "recon_s": t2 - t1, "slices": int(slices.size)}


class _StageProgress(threading.Thread):
    """Polls Spark's status tracker and reports completed tasks of a job group."""

    def __init__(self, sc, group: str, progress, interval: float = 0.5):
        super().__init__(daemon=True, name="tomo-progress")
        self.sc, self.group, self.progress, self.interval = sc, group, progress, interval
        self.stop_event = threading.Event()
        self.total = 0

    def run(self):
        tracker = self.sc.statusTracker()
        while not self.stop_event.wait(self.interval):
            done = total = 0
            for job_id in tracker.getJobIdsForGroup(self.group):
                job = tracker.getJobInfo(job_id)
                for stage_id in (job.stageIds if job else []):
                    stage = tracker.getStageInfo(stage_id)
                    if stage is not None:
                        done += stage.numCompletedTasks
                        total += stage.numTasks
            if total:
                self.total = total
                self.progress(min(done, total - 1), total)


def reconstruct_rdd(rdd, meta: dict, algorithm: str = "art", iterations: int = 1, relaxation: float = 1.0,
                    positivity: bool = False, filter: str = "ramp", partitions: int | None = None,
                    n: int | None = None, matrix_mode: str = "rebuild", progress=None):
    """Reconstruct ``(slice_index, sinogram)`` records partition by partition.

    Parameters
    ----------
    rdd : pyspark.RDD
        Records from :func:`load_sinograms_rdd`.
    meta : dict
        Its metadata (``angles_deg``, ``n_slices``, ``n_angles``, ``n_rays``).
    algorithm : {"art", "sirt", "fbp"}
    iterations, relaxation, positivity
        For ART and SIRT (see :mod:`sparkmpi.tomo.algorithms`).
    filter : {"ramp", "hann"}
        For FBP.
    partitions : int, optional
        Partitions of neighbouring slices (default Spark's parallelism).
    n : int, optional
        Reconstruction side (default ``n_rays``).
    matrix_mode : {"rebuild", "broadcast"}
        Build the system matrix in each Python worker (cached per process),
        or build it on the driver and ship it as a broadcast variable.
    progress : callable(done, total), optional
        Called from a driver thread with completed/total Spark tasks (all
        stages of the job, the shuffle included), then once at the end.

    Returns
    -------
    (numpy.ndarray, dict)
        The volume, float32, shape (n_slices, n, n), in slice order, and
        timings: ``matrix_s`` and ``recon_s`` (slowest partition), the
        driver-side ``broadcast_s``, ``partitions`` and ``partition_slices``.
    """
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if filter not in FILTERS:
        raise InvalidArgument(f"filter must be one of {FILTERS}, got {filter!r}")
    if matrix_mode not in MATRIX_MODES:
        raise InvalidArgument(f"matrix_mode must be one of {MATRIX_MODES}, got {matrix_mode!r}")
    sc = rdd.context
    n_slices, n_rays = int(meta["n_slices"]), int(meta["n_rays"])
    n = n_rays if n is None else int(n)
    partitions = partitions or sc.defaultParallelism
    angles = np.asarray(meta["angles_deg"], dtype=np.float64)
    t0 = time.perf_counter()
    broadcast = None
    if matrix_mode == "broadcast":
        broadcast = sc.broadcast(system_matrix(n, angles, n_rays))
    broadcast_s = time.perf_counter() - t0
    config = {"algorithm": algorithm, "iterations": int(iterations), "relaxation": float(relaxation),
              "positivity": bool(positivity), "filter": filter, "n": n, "n_rays": n_rays,
              "angles_deg": angles, "matrix": broadcast}
    if meta.get("partitioned") == partitions and rdd.getNumPartitions() == partitions:
        ranged = rdd                       # parallelize already made contiguous ranges
    else:
        ranged = partition_slices(rdd, n_slices, partitions)
    blocks = ranged.mapPartitionsWithIndex(
        functools.partial(_reconstruct_partition, config))
    group = f"sparkmpi-tomo-{uuid.uuid4().hex[:8]}"
    watcher = None
    sc.setJobGroup(group, f"tomo {algorithm} reconstruction", interruptOnCancel=True)
    try:
        if progress is not None:
            watcher = _StageProgress(sc, group, progress)
            watcher.start()
        results = blocks.collect()
    finally:
        if watcher is not None:
            watcher.stop_event.set()
            watcher.join(timeout=5)
        sc.setLocalProperty("spark.jobGroup.id", None)
        if broadcast is not None:
            broadcast.unpersist()
    volume = np.empty((n_slices, n, n), dtype=np.float32)
    seen = np.zeros(n_slices, dtype=bool)
    stats = []
    for _, slices, block, info in sorted(results, key=lambda r: r[0]):
        volume[slices] = block
        if np.any(seen[slices]):
            raise RuntimeError(f"slices {slices[seen[slices]].tolist()[:5]} were reconstructed twice")
        seen[slices] = True
        stats.append(info)
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} of {n_slices} slices missing from the reconstruction "
                           f"(first {np.flatnonzero(~seen)[:5].tolist()})")
    if progress is not None:
        total = max(watcher.total if watcher is not None else 0, len(stats))
        progress(total, total)
    info = {"matrix_s": max(s["matrix_s"] for s in stats), "recon_s": max(s["recon_s"] for s in stats),
            "broadcast_s": broadcast_s, "partitions": partitions,
            "partition_slices": [s["slices"] for s in stats], "matrix_mode": matrix_mode}
    return volume, info


def reconstruct_spark(spark, source, algorithm: str = "art", iterations: int = 1, partitions: int | None = None,
                      angles=None, angles_file=None, progress=None, **options):
    """Load a tilt series through Spark and reconstruct it slice-partitioned.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
    source : str, Path or TiltSeries
        TIFF stack, sinogram Parquet table, or series in memory.
    algorithm, iterations, partitions
        See :func:`reconstruct_rdd`.
    angles, angles_file
        For TIFF input.
    progress : callable(done, total), optional
    **options
        ``relaxation``, ``positivity``, ``filter``, ``n``, ``matrix_mode``.

    Returns
    -------
    (numpy.ndarray, dict)
        Volume (n_slices, n, n) float32 and the timings of
        :func:`reconstruct_rdd` plus ``load_s`` (driver-side reading and
        validation).
    """
    t0 = time.perf_counter()
    rdd, meta = load_sinograms_rdd(spark, source, angles=angles, angles_file=angles_file,
                                   num_slices=partitions)
    load_s = time.perf_counter() - t0
    volume, info = reconstruct_rdd(rdd, meta, algorithm=algorithm, iterations=iterations,
                                   partitions=partitions, progress=progress, **options)
    info["load_s"] = load_s
    info["angles_deg"] = meta["angles_deg"]
    return volume, info


class _SirtRankTask:
    """``fn(comm, records)`` for :func:`sparkmpi.run`: :func:`~sparkmpi.tomo.mpi.sirt_rank` with options.

    A module-level class (not a ``functools.partial``) so that it pickles by
    reference to this importable module.
    """

    def __init__(self, options: dict):
        self.options = options

    def __call__(self, comm, records):
        from .mpi import sirt_rank

        return list(sirt_rank(comm, records, **self.options))


def reconstruct_mpi(spark, source, ranks: int = 2, iterations: int = 100, angles=None, angles_file=None,
                    timeout: float | None = None, **options):
    """SIRT with projections split across MPI ranks launched through Spark (:func:`sparkmpi.run`).

    The tilt series is read and validated on the driver, its projections are
    parallelised into ``ranks`` partitions of neighbouring angles, and every
    partition runs :func:`sparkmpi.tomo.mpi.sirt_rank` as one rank of a
    shared ``MPI.COMM_WORLD``: each rank back-projects its own projections and
    the updates are summed by ``Allreduce`` every iteration.  This is the
    mode for volumes whose projections do not fit one node.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
        Needs at least ``ranks`` free task slots (a barrier stage).
    source : str, Path or TiltSeries
        TIFF stack (with angles), Parquet sinogram table, or series in memory.
    ranks : int
        MPI ranks (Spark partitions).
    iterations : int
    angles, angles_file
        For TIFF input.
    timeout : float, optional
        Seconds the MPI job may take.
    **options
        ``relaxation``, ``positivity``, ``n`` for :func:`sparkmpi.tomo.sirt`.

    Returns
    -------
    (numpy.ndarray, dict)
        Volume (n_slices, n, n) float32 and ``{"recon_s", "load_s", "ranks"}``.
    """
    import sparkmpi

    from .io import read_parquet_sinograms
    from .mpi import projection_records

    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise InvalidArgument(f"ranks must be a positive integer, got {ranks!r}")
    t0 = time.perf_counter()
    if isinstance(source, TiltSeries):
        series = source
    elif Path(source).suffix.lower() == ".parquet":
        series = read_parquet_sinograms(source)
    else:
        series = read_tilt_series(source, angles=angles, angles_file=angles_file)
    if ranks > series.n_angles:
        raise InvalidArgument(f"ranks ({ranks}) must not exceed the number of projections ({series.n_angles})")
    records = spark.sparkContext.parallelize(projection_records(series), ranks)
    load_s = time.perf_counter() - t0
    task = _SirtRankTask(dict(n_slices=series.n_slices, n_rays=series.n_rays, only_root=True,
                              iterations=iterations, **options))
    t1 = time.perf_counter()
    results = sparkmpi.run(records, task, timeout=timeout)
    recon_s = time.perf_counter() - t1
    if len(results) != 1:
        raise RuntimeError(f"expected one volume from rank 0, got {len(results)} results")
    return np.asarray(results[0]), {"recon_s": recon_s, "load_s": load_s, "ranks": ranks}
