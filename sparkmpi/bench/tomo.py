"""``sparkmpi bench tomo``: tilt series to volume through Spark, on a simulated phantom.

Timed path (``total_s``): read and validate the 16-bit TIFF and its angles on
the driver, hand the sinograms to Spark in ``--ranks`` partitions of
neighbouring slices, reconstruct every partition (system matrix built in each
Python worker, or broadcast), collect in slice order, and write the volume as
a float32 TIFF.  Not timed: simulating the phantom, starting the
SparkSession (``spark_start_s``) and starting the Python workers with
sparkmpi imported (``worker_start_s``), which a running pipeline has already
paid.  ``recon_s`` and ``matrix_s`` are the slowest partition's.  With
``--mode mpi`` (SIRT only) the projections are split over ``--ranks`` MPI
ranks started by :func:`sparkmpi.run`; ``recon_s`` is then the whole MPI
job, matrix building included (``matrix_s`` is reported as 0).  For ART
the figures include ``reference_rmse``: the straightforward one-slice
Kaczmarz (:func:`sparkmpi.tomo.art_reference`) on a few slices, and the ratio
of the batched result's RMSE to it on the same slices.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import UsageError

NAME = "tomo"
HELP = "ART/SIRT/FBP reconstruction of a simulated tilt series through Spark"


def add_arguments(parser) -> None:
    parser.add_argument("--size", type=int, default=256, help="pixels per side (default 256)")
    parser.add_argument("--angles", type=int, default=74, help="projections over -73..+73 degrees (default 74)")
    parser.add_argument("--algorithm", choices=("art", "sirt", "fbp"), default="art", help="default art")
    parser.add_argument("--iterations", type=int, default=None,
                        help="ART sweeps or SIRT iterations (default 1 for art, 100 for sirt)")
    parser.add_argument("--ranks", type=int, default=2, help="Spark partitions and local cores (default 2)")
    parser.add_argument("--mode", choices=("spark-slices", "mpi"), default="spark-slices",
                        help="slice partitions through Spark (default), or SIRT with projections split "
                             "over --ranks MPI ranks launched by sparkmpi.run")
    parser.add_argument("--phantom", choices=("shepp-logan", "nanoparticles"), default="shepp-logan")
    parser.add_argument("--matrix", choices=("rebuild", "broadcast"), default="rebuild",
                        help="system matrix: built in each worker (default) or broadcast from the driver")
    parser.add_argument("--compare-matrix", action="store_true",
                        help="also time the other --matrix mode first, and report both")
    parser.add_argument("--reference-slices", type=int, default=3,
                        help="slices for the one-slice Kaczmarz reference (ART only; default 3)")
    parser.add_argument("--master", default=None, help="Spark master (default local[RANKS])")
    parser.add_argument("--workdir", default=None, help="folder for the TIFFs (default a temporary one)")


def _warm_workers(sc, ranks: int) -> float:
    """Start the Python workers and import the numerical modules (not timed in total_s)."""
    t0 = time.perf_counter()

    def _touch(_):
        import sparkmpi.tomo.algorithms  # noqa: F401
        import sparkmpi.tomo.projector  # noqa: F401

        return [0]

    sc.parallelize(range(ranks), ranks).mapPartitions(_touch).collect()
    return time.perf_counter() - t0


def _one_run(spark, tiff: Path, out: Path, args, iterations: int, matrix_mode: str) -> tuple:
    from sparkmpi.tomo.output import write_volume_tiff
    from sparkmpi.tomo.spark import reconstruct_mpi, reconstruct_spark

    t0 = time.perf_counter()
    if args.mode == "mpi":
        volume, info = reconstruct_mpi(spark, tiff, ranks=args.ranks, iterations=iterations)
        # the matrix is built inside each rank's timed SIRT call
        info.update(matrix_s=0.0, broadcast_s=0.0, partitions=args.ranks)
    else:
        volume, info = reconstruct_spark(spark, tiff, algorithm=args.algorithm, iterations=iterations,
                                         partitions=args.ranks, matrix_mode=matrix_mode)
    t1 = time.perf_counter()
    write_volume_tiff(out, volume)
    t2 = time.perf_counter()
    info.update(total_s=t2 - t0, write_s=t2 - t1, through_spark_s=t1 - t0)
    return volume, info


def run(args) -> dict:
    from sparkmpi.tomo.algorithms import art_reference, rmse
    from sparkmpi.tomo.cli import spark_session
    from sparkmpi.tomo.io import read_tilt_series
    from sparkmpi.tomo.simulate import simulate_tilt_series

    for name in ("size", "angles", "ranks", "reference_slices"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.mode == "mpi" and (args.algorithm != "sirt" or args.compare_matrix):
        raise UsageError(f"--mode mpi runs SIRT only, without --compare-matrix "
                         f"(got --algorithm {args.algorithm})")
    iterations = args.iterations if args.iterations is not None else (1 if args.algorithm == "art" else 100)
    if iterations < 1:
        raise UsageError(f"--iterations must be a positive integer, got {iterations}")
    master = args.master or f"local[{args.ranks}]"
    with tempfile.TemporaryDirectory(prefix="sparkmpi-bench-tomo-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tiff = work / f"{args.phantom}_{args.size}_{args.angles}.tif"
        t0 = time.perf_counter()
        _, phantom = simulate_tilt_series(args.size, args.angles, phantom=args.phantom, out=tiff)
        simulate_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        with spark_session(master, app="sparkmpi-bench-tomo") as spark:
            spark_start_s = time.perf_counter() - t0
            worker_start_s = _warm_workers(spark.sparkContext, args.ranks)
            report: dict = {}
            if args.compare_matrix:
                other = "broadcast" if args.matrix == "rebuild" else "rebuild"
                _, other_info = _one_run(spark, tiff, work / "volume_other.tif", args, iterations, other)
                report[f"{other}_total_s"] = other_info["total_s"]
                report[f"{other}_matrix_s"] = other_info["matrix_s"] + other_info["broadcast_s"]
            volume, info = _one_run(spark, tiff, work / "volume.tif", args, iterations, args.matrix)

        report.update({
            "benchmark": NAME, "mode": args.mode, "algorithm": args.algorithm,
            "iterations": iterations if args.algorithm != "fbp" else 0, "size": args.size,
            "angles": args.angles, "ranks": args.ranks, "partitions": info["partitions"],
            "matrix_mode": args.matrix, "phantom": args.phantom,
            "total_s": info["total_s"], "recon_s": info["recon_s"],
            "matrix_s": info["matrix_s"] + info["broadcast_s"], "load_s": info["load_s"],
            "write_s": info["write_s"], "spark_start_s": spark_start_s, "worker_start_s": worker_start_s,
            "simulate_s": simulate_s, "rmse": rmse(volume, phantom),
            "rmse_central_slice": rmse(volume[args.size // 2], phantom[args.size // 2]),
        })
        if args.compare_matrix:
            report[f"{args.matrix}_total_s"] = info["total_s"]
            report[f"{args.matrix}_matrix_s"] = report["matrix_s"]
        if args.algorithm == "art":
            series = read_tilt_series(tiff)
            centre = args.size // 2
            count = min(args.reference_slices, args.size)
            picks = np.unique(np.clip(centre + (np.arange(count) - count // 2) * max(1, args.size // 16),
                                      0, args.size - 1))
            t0 = time.perf_counter()
            reference = np.stack([art_reference(series.projections[:, s, :], series.angles_deg,
                                                iterations=iterations) for s in picks])
            reference_s = (time.perf_counter() - t0) / picks.size
            report["reference_slices"] = picks.tolist()
            report["reference_rmse"] = rmse(reference, phantom[picks])
            report["rmse_on_reference_slices"] = rmse(volume[picks], phantom[picks])
            report["rmse_ratio"] = report["rmse_on_reference_slices"] / report["reference_rmse"]
            report["reference_s_per_slice"] = reference_s
            report["max_abs_diff_vs_reference"] = float(np.abs(volume[picks] - reference).max())
    return report
