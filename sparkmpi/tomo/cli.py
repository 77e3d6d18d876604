"""``sparkmpi tomo simulate|reconstruct|to-parquet``: a thin layer over :mod:`sparkmpi.tomo`.

Progress goes to stderr, the ``--json`` summary to stdout.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import UsageError

__all__ = ["register", "spark_session"]


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _angle_list(text: str) -> list[float]:
    import argparse

    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated angles in degrees, got {text!r}") from None


@contextmanager
def spark_session(master: str, app: str = "sparkmpi-tomo"):
    """The active SparkSession if there is one (left running), else a new one (stopped after)."""
    from pyspark.sql import SparkSession

    from ..launch.session import spark_session as new_session

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    session = new_session(master, app, conf={"spark.ui.enabled": "false", "spark.driver.memory": "4g"})
    try:
        yield session
    finally:
        session.stop()


def _emit(args, summary: dict) -> None:
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        for key in sorted(summary):
            print(f"{key:<16} {summary[key]}")
    sys.stdout.flush()


def _cmd_simulate(args) -> int:
    from .io import angles_sidecar_path
    from .output import write_volume_tiff
    from .simulate import simulate_tilt_series

    progress = sys.stderr if not args.quiet else None
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    series, phantom = simulate_tilt_series(args.size, args.angles, phantom=args.phantom, noise=args.noise,
                                           seed=args.seed, out=out, dtype=args.dtype)
    summary = {"tiff": str(out), "angles_file": str(angles_sidecar_path(out)), "size": args.size,
               "n_angles": series.n_angles, "phantom": args.phantom,
               "angle_range_deg": [float(series.angles_deg.min()), float(series.angles_deg.max())]}
    if args.truth:
        summary["truth"] = str(write_volume_tiff(args.truth, phantom))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if progress:
        print(f"tomo simulate: wrote {out} ({series.n_angles} projections of {args.size}x{args.size})",
              file=progress)
    _emit(args, summary)
    return 0


def _cmd_to_parquet(args) -> int:
    from .io import tiff_to_parquet

    t0 = time.perf_counter()
    path = tiff_to_parquet(args.input, args.out, angles=args.angles, angles_file=args.angles_file)
    _emit(args, {"parquet": str(path), "seconds": round(time.perf_counter() - t0, 3)})
    return 0


def _read_series(args):
    from .io import read_parquet_sinograms, read_tilt_series

    if Path(args.input).suffix.lower() == ".parquet":
        return read_parquet_sinograms(args.input)
    return read_tilt_series(args.input, angles=args.angles, angles_file=args.angles_file)


def _cmd_reconstruct(args) -> int:
    from .algorithms import art, fbp, rmse, sirt
    from .output import Progress, write_outputs

    if args.input.lower().endswith(".parquet") and (args.angles or args.angles_file):
        raise UsageError("a Parquet table carries its own angles; drop --angles/--angles-file")
    truth = None
    if args.truth:
        import tifffile

        truth = np.asarray(tifffile.imread(args.truth), dtype=np.float32)
    progress = Progress(f"tomo {args.algorithm}", enabled=not args.quiet)
    iterations = args.iterations if args.iterations is not None else (1 if args.algorithm == "art" else 100)
    t0 = time.perf_counter()
    info: dict = {}
    if args.spark_partitions == 0 and not args.mpi_ranks:
        series = _read_series(args)
        progress.message(f"read {series.n_angles} projections of {series.n_slices}x{series.n_rays}")
        sinos = series.sinograms()
        if args.algorithm == "art":
            volume = art(sinos, series.angles_deg, iterations=iterations, relaxation=args.relaxation,
                         positivity=args.positivity, progress=progress)
        elif args.algorithm == "sirt":
            volume = sirt(sinos, series.angles_deg, iterations=iterations, relaxation=args.relaxation,
                          positivity=args.positivity, progress=progress, backend=args.backend)
        else:
            volume = fbp(sinos, series.angles_deg, filter=args.filter, backend=args.backend)
        mode = "single-process"
    elif args.mpi_ranks:
        from .spark import reconstruct_mpi

        if args.algorithm != "sirt":
            raise UsageError(f"--mpi-ranks distributes SIRT only (got --algorithm {args.algorithm})")
        with spark_session(args.master) as spark:
            progress.message(f"SIRT over {args.mpi_ranks} MPI ranks launched through Spark")
            volume, info = reconstruct_mpi(spark, args.input, ranks=args.mpi_ranks, iterations=iterations,
                                           angles=args.angles, angles_file=args.angles_file,
                                           relaxation=args.relaxation, positivity=args.positivity)
        mode = "mpi"
    else:
        from .spark import reconstruct_spark

        with spark_session(args.master) as spark:
            progress.message(f"reconstructing through Spark ({args.spark_partitions} partitions)")
            volume, info = reconstruct_spark(
                spark, args.input, algorithm=args.algorithm, iterations=iterations,
                partitions=args.spark_partitions, angles=args.angles, angles_file=args.angles_file,
                progress=Progress(f"tomo {args.algorithm} tasks", enabled=not args.quiet),
                relaxation=args.relaxation, positivity=args.positivity, filter=args.filter,
                matrix_mode=args.matrix)
        mode = "spark-slices"
    recon_done = time.perf_counter()
    paths = write_outputs(args.out, volume)
    total = time.perf_counter() - t0
    progress.message(f"wrote {paths['tiff']}, {paths['vti']}, {paths['png']} in {total:.2f} s")
    summary = {"mode": mode, "algorithm": args.algorithm, "iterations": iterations if args.algorithm != "fbp" else 0,
               "shape": list(volume.shape), "total_s": round(total, 3),
               "reconstruct_s": round(recon_done - t0, 3), **paths}
    for key in ("matrix_s", "recon_s", "partitions"):
        if key in info:
            summary[key] = round(info[key], 4) if isinstance(info[key], float) else info[key]
    if truth is not None:
        summary["rmse"] = rmse(volume, truth)
    _emit(args, summary)
    return 0


def register(subparsers) -> None:
    """Add the ``tomo`` noun and its verbs to the ``sparkmpi`` command line."""
    from .algorithms import ALGORITHMS, FILTERS
    from .simulate import PHANTOMS

    parser = subparsers.add_parser("tomo", help="tomographic reconstruction (ART, SIRT, FBP)",
                                   description="Simulate tilt series and reconstruct volumes.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    sim = verbs.add_parser("simulate", help="write a phantom's tilt series as a 16-bit TIFF + angles file")
    sim.add_argument("--size", type=_positive_int, default=256, help="pixels per side (default 256)")
    sim.add_argument("--angles", type=_positive_int, default=74,
                     help="number of projections over -73..+73 degrees (default 74: 2-degree steps)")
    sim.add_argument("--phantom", choices=PHANTOMS, default="shepp-logan", help="object to simulate")
    sim.add_argument("--noise", type=float, default=0.0,
                     help="Gaussian noise, relative to the largest projection value (default 0)")
    sim.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sim.add_argument("--dtype", choices=("uint16", "float32"), default="uint16", help="TIFF pixel type")
    sim.add_argument("--truth", metavar="FILE.tif", help="also write the phantom volume (float32 TIFF)")
    sim.add_argument("--out", required=True, metavar="FILE.tif", help="output TIFF (angles go to FILE.angles.txt)")
    sim.set_defaults(func=_cmd_simulate)

    etl = verbs.add_parser("to-parquet", help="convert a tilt-series TIFF to a Parquet table of sinograms")
    etl.add_argument("input", metavar="FILE.tif", help="tilt-series TIFF")
    etl.add_argument("--angles-file", metavar="FILE", help="angles, one per line (default FILE.angles.txt)")
    etl.add_argument("--angles", type=_angle_list, help="angles in degrees, comma-separated")
    etl.add_argument("--out", required=True, metavar="FILE.parquet", help="output Parquet file")
    etl.set_defaults(func=_cmd_to_parquet)

    rec = verbs.add_parser("reconstruct", help="reconstruct a tilt series into a volume")
    rec.add_argument("input", metavar="FILE", help="tilt-series TIFF (or .parquet from to-parquet)")
    rec.add_argument("--angles-file", metavar="FILE", help="angles, one per line (default FILE.angles.txt)")
    rec.add_argument("--angles", type=_angle_list, help="angles in degrees, comma-separated")
    rec.add_argument("--algorithm", choices=ALGORITHMS, default="art", help="reconstruction method (default art)")
    rec.add_argument("--iterations", type=_positive_int,
                     help="ART sweeps or SIRT iterations (default 1 for art, 100 for sirt)")
    rec.add_argument("--relaxation", type=float, default=1.0, help="relaxation factor in (0, 2) (default 1)")
    rec.add_argument("--positivity", action="store_true", help="clip negative values (ART, SIRT)")
    rec.add_argument("--filter", choices=FILTERS, default="ramp", help="FBP filter (default ramp)")
    rec.add_argument("--spark-partitions", type=_non_negative_int, default=2,
                     help="Spark partitions of neighbouring slices; 0 = one process, no Spark (default 2)")
    rec.add_argument("--mpi-ranks", type=_positive_int, default=None,
                     help="SIRT only: split the projections over this many MPI ranks (sparkmpi.run) "
                          "instead of partitioning slices")
    rec.add_argument("--master", default="local[2]", help="Spark master when a session is started (default local[2])")
    rec.add_argument("--matrix", choices=("rebuild", "broadcast"), default="rebuild",
                     help="system matrix per Spark worker: build there, or broadcast from the driver")
    rec.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="numpy",
                     help="array backend for single-process SIRT/FBP (default numpy)")
    rec.add_argument("--truth", metavar="FILE.tif", help="phantom volume to report the RMSE against")
    rec.add_argument("--out", required=True, metavar="DIR", help="output folder (volume.tif, .vti, _slices.png)")
    rec.set_defaults(func=_cmd_reconstruct)
