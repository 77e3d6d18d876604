"""``sparkmpi bench ptycho``: difference-map / RAAR speed and quality.

Reports ``seconds_per_iteration_1rank`` (one process, all frames),
``nrmse`` (object against ground truth, illuminated region), ``fourier_error``
and ``backend``; with ``--ranks N > 1`` also ``seconds_per_iteration_mpiexec``
(the same reconstruction split over N ranks under ``mpiexec``) and the
relative difference of its object from the one-process object.

The Spark-distributed figure ``seconds_per_iteration`` belongs in
:func:`_distributed_spark` once ``sparkmpi.run`` exists: it runs
:func:`sparkmpi.ptycho.mpi_job.partition_job` per rank on the frames of each
partition; everything else here stays as is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NAME = "ptycho"
HELP = "ptychographic reconstruction: s/iteration (1 process, mpiexec ranks), NRMSE"


def add_arguments(parser) -> None:
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--frame-size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--algorithm", choices=("dm", "raar"), default="dm")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks for the distributed run")
    parser.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="numpy")
    parser.add_argument("--probe-update-start", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)


def _distributed_mpiexec(path: Path, args, out: Path) -> dict:
    mpiexec = Path(sys.executable).with_name("mpiexec")
    cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(args.ranks),
           sys.executable, "-m", "sparkmpi.ptycho.mpi_job", str(path), "--out", str(out),
           "--algorithm", args.algorithm, "--iterations", str(args.iterations),
           "--probe-update-start", str(args.probe_update_start), "--backend", args.backend]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"mpiexec run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    got = np.load(out)
    return {"seconds_per_iteration_mpiexec": float(got["seconds"]) / max(args.iterations, 1),
            "mpiexec_wall_seconds": time.perf_counter() - t0, "object": got["object"]}


def run(args) -> dict:
    from sparkmpi import ptycho

    print(f"simulating {args.frames} frames of {args.frame_size}^2 ...", file=sys.stderr)
    data = ptycho.simulate(args.frames, args.frame_size, seed=args.seed)
    mask = ptycho.illuminated_mask(data)
    print(f"reconstructing in one process ({args.algorithm}, {args.iterations} iterations) ...",
          file=sys.stderr)
    result = ptycho.reconstruct(data, algorithm=args.algorithm, iterations=args.iterations,
                                probe_update_start=args.probe_update_start,
                                probe=ptycho.model_probe(data), backend=args.backend)
    report = {
        "frames": args.frames, "frame_size": args.frame_size, "iterations": args.iterations,
        "algorithm": args.algorithm, "backend": result.state.backend,
        "seconds_per_iteration_1rank": result.seconds_per_iteration,
        "nrmse": ptycho.nrmse(result.object, data.object_true, mask),
        "fourier_error": result.fourier_error, "cpu_count": os.cpu_count(),
    }
    if args.ranks > 1:
        print(f"reconstructing under mpiexec -n {args.ranks} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="sparkmpi-bench-ptycho-") as tmp:
            path = data.save(Path(tmp) / "scan.npz")
            dist = _distributed_mpiexec(path, args, Path(tmp) / "result.npz")
        obj = dist.pop("object")
        report.update(dist)
        report["ranks"] = args.ranks
        report["nrmse_mpiexec"] = ptycho.nrmse(obj, data.object_true, mask)
        report["mpiexec_vs_1rank_relative_difference"] = float(
            np.linalg.norm((obj - result.object)[mask]) / np.linalg.norm(result.object[mask]))
    return report
