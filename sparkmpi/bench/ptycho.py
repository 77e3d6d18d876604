"""``sparkmpi bench ptycho``: difference-map / RAAR speed and quality.

Reports ``seconds_per_iteration`` (the reconstruction split over ``--ranks``
MPI ranks inside Spark, ``sparkmpi.run`` on a ``local[RANKS]`` session made
here; the iteration loop timed inside the ranks, slowest rank) with
``job_s`` (the whole Spark-MPI job on the driver: rank start-up, loading
the frames from the NPZ on the executors, set-up, iterations, results),
``seconds_per_iteration_1rank`` (one process, all frames, all cores),
``nrmse`` (object against ground truth, illuminated region, 1 rank, after
registering translation, phase ramp and complex factor:
:func:`sparkmpi.ptycho.metrics.register`; ``shift_px`` the registered
translation, ``nrmse_unregistered`` the plain figure),
``fourier_error`` and ``backend``; unless ``--no-mpiexec``, also
``seconds_per_iteration_mpiexec`` (the same split under plain ``mpiexec``).
Each distributed object is compared with the one-process object
(``*_vs_1rank_relative_difference``, over the illuminated region).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import UsageError

NAME = "ptycho"
HELP = "ptychographic reconstruction: s/iteration (Spark-MPI ranks, 1 process, mpiexec), NRMSE"


def add_arguments(parser) -> None:
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--frame-size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--algorithm", choices=("dm", "raar"), default="dm")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks for the distributed run")
    parser.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="numpy")
    parser.add_argument("--probe-update-start", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", choices=("auto", "numba", "numpy"), default="auto",
                        help="CPU kernels: fused numba (auto when installed) or NumPy")
    parser.add_argument("--master", default=None, help="Spark master (default local[RANKS])")
    parser.add_argument("--no-spark", action="store_true",
                        help="skip the Spark-distributed run (seconds_per_iteration)")
    parser.add_argument("--no-mpiexec", action="store_true",
                        help="skip the same split under plain mpiexec "
                             "(seconds_per_iteration_mpiexec)")


def _distributed_mpiexec(path: Path, args, out: Path) -> dict:
    mpiexec = Path(sys.executable).with_name("mpiexec")
    cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(args.ranks),
           sys.executable, "-m", "sparkmpi.ptycho.mpi_job", str(path), "--out", str(out),
           "--algorithm", args.algorithm, "--iterations", str(args.iterations),
           "--probe-update-start", str(args.probe_update_start), "--backend", args.backend,
           "--kernels", args.kernels]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"mpiexec run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    got = np.load(out)
    return {"seconds_per_iteration_mpiexec": float(got["seconds"]) / max(args.iterations, 1),
            "mpiexec_wall_seconds": time.perf_counter() - t0, "object": got["object"]}


def _distributed_spark(path: Path, args, probe) -> dict:
    """The reconstruction over ``args.ranks`` Spark-MPI ranks (``sparkmpi.run``)."""
    from sparkmpi.launch.session import spark_session   # also points Spark at this interpreter
    from sparkmpi.ptycho.spark import reconstruct_mpi

    t0 = time.perf_counter()
    spark = spark_session(args.master or f"local[{args.ranks}]", "sparkmpi-bench-ptycho",
                          conf={"spark.ui.enabled": "false"})
    spark_start_s = time.perf_counter() - t0
    try:
        out = reconstruct_mpi(spark, path, ranks=args.ranks, algorithm=args.algorithm,
                              iterations=args.iterations,
                              probe_update_start=_probe_start(args), probe=probe,
                              backend=args.backend, kernels=args.kernels)
    finally:
        spark.stop()
    return {"seconds_per_iteration": out.seconds_per_iteration, "job_s": out.job_seconds,
            "spark_start_s": spark_start_s, "threads_per_rank": out.threads_per_rank,
            "frames_per_rank": out.frames_per_rank, "kernels": out.kernels,
            "fourier_error_spark": out.fourier_error, "object": out.object}


def _probe_start(args):
    return None if args.probe_update_start < 0 else args.probe_update_start


def _rel(a, b, mask) -> float:
    return float(np.linalg.norm((a - b)[mask]) / np.linalg.norm(b[mask]))


def run(args) -> dict:
    from sparkmpi import ptycho

    for name in ("frames", "frame_size", "ranks"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, "
                             f"got {getattr(args, name)}")
    print(f"simulating {args.frames} frames of {args.frame_size}^2 ...", file=sys.stderr)
    data = ptycho.simulate(args.frames, args.frame_size, seed=args.seed)
    mask = ptycho.illuminated_mask(data)
    probe = ptycho.model_probe(data)
    print(f"reconstructing in one process ({args.algorithm}, {args.iterations} iterations) ...",
          file=sys.stderr)
    result = ptycho.reconstruct(data, algorithm=args.algorithm, iterations=args.iterations,
                                probe_update_start=_probe_start(args), probe=probe,
                                backend=args.backend, kernels=args.kernels)
    quality = ptycho.object_quality(result.object, data, mask=mask)
    report = {
        "frames": args.frames, "frame_size": args.frame_size, "iterations": args.iterations,
        "algorithm": args.algorithm, "backend": result.state.backend,
        "seconds_per_iteration_1rank": result.seconds_per_iteration,
        "nrmse": quality.nrmse, "shift_px": list(quality.shift_px),
        "nrmse_unregistered": quality.nrmse_unregistered,
        "fourier_error": result.fourier_error, "cpu_count": os.cpu_count(),
        "ranks": args.ranks,
    }
    with tempfile.TemporaryDirectory(prefix="sparkmpi-bench-ptycho-") as tmp:
        path = data.save(Path(tmp) / "scan.npz")
        if not args.no_spark:
            print(f"reconstructing over {args.ranks} Spark-MPI ranks ...", file=sys.stderr)
            dist = _distributed_spark(path, args, probe)
            obj = dist.pop("object")
            report.update(dist)
            report["nrmse_spark"] = ptycho.registered_nrmse(obj, data.object_true, mask)
            report["spark_vs_1rank_relative_difference"] = _rel(obj, result.object, mask)
        if not args.no_mpiexec and args.ranks > 1:
            print(f"reconstructing under mpiexec -n {args.ranks} ...", file=sys.stderr)
            dist = _distributed_mpiexec(path, args, Path(tmp) / "result.npz")
            obj = dist.pop("object")
            report.update(dist)
            report["nrmse_mpiexec"] = ptycho.registered_nrmse(obj, data.object_true, mask)
            report["mpiexec_vs_1rank_relative_difference"] = _rel(obj, result.object, mask)
    return report
