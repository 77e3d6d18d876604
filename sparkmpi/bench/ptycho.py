"""``sparkmpi bench ptycho``: difference-map / RAAR speed and quality.

Reports ``seconds_per_iteration`` (the reconstruction split over ``--ranks``
MPI ranks inside Spark, ``sparkmpi.run`` on a ``local[RANKS]`` session made
here; the iteration loop timed inside the ranks, slowest rank; the fastest of
``--repeats`` runs, default 3, with ``seconds_per_iteration_runs`` and
``_median``: on shared cores a run is slowed by other jobs, never sped up) with
``job_s`` (the whole Spark-MPI job on the driver: rank start-up, loading
the frames from the NPZ on the executors, set-up, iterations, results),
``seconds_per_iteration_1rank`` (one process, all frames, all cores),
``nrmse`` (object against ground truth, illuminated region, 1 rank, after
registering translation, phase ramp and complex factor:
:func:`sparkmpi.ptycho.metrics.register`; ``shift_px`` the registered
translation, ``nrmse_unregistered`` the plain figure),
``fourier_error``, ``backend``, ``fft_backend`` (the frame-stack FFT the
engines use: :mod:`sparkmpi.ptycho._fft`) with ``fft_ms_per_rank_stack``,
``fft_ms_per_rank_stack_scipy`` and ``fft_vs_scipy_ratio`` (one rank's
stack, forward plus inverse, one thread, side by side); unless ``--no-mpiexec``, also
``seconds_per_iteration_mpiexec`` (the same split under plain ``mpiexec``).
Each distributed object is compared with the one-process object
(``*_vs_1rank_relative_difference``, over the illuminated region).

``--position-error PX`` injects random position errors (uniform in
``[-PX, PX]`` per axis, whole pixels, :func:`sparkmpi.ptycho.positions.perturb_positions`)
and adds ``nrmse_exact_positions`` (= ``nrmse``), ``nrmse_noisy_positions``
(the noisy positions taken as exact), ``nrmse_refined`` (the noisy positions,
``refine_positions=True``), ``position_error_px_before`` / ``_after`` (RMS
distance to the true positions after removing the mean offset),
``seconds_per_iteration_1rank_refined`` and, through Spark,
``seconds_per_iteration_refined`` (fastest of ``--repeats``, each refined run
right after a plain one in the same Spark session) with
``refined_vs_plain_seconds_ratio`` (fastest against fastest) and
``refined_vs_plain_seconds_ratio_runs`` (each round's pair).

``--probe-modes M`` (2-4) simulates a partially coherent beam (``--mode-powers``,
default 0.7,0.3), runs every reconstruction above with ``M`` incoherent probe
modes (the generic engine), and adds the one-mode runs on the same data side
by side: ``nrmse_1mode`` / ``fourier_error_1mode`` /
``seconds_per_iteration_1mode`` (the default engine) and
``seconds_per_iteration_1mode_generic`` (the engine the modes run),
``nrmse_modes`` (= ``nrmse``), ``fourier_error_modes``,
``seconds_per_iteration_modes``, ``modes_vs_1mode_generic_seconds_ratio``,
``mode_powers`` (reconstructed), ``mode_powers_true`` and ``probe_nrmse``
(the main mode, registered).
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
    parser.add_argument("--position-error", type=float, default=0.0,
                        help="inject random position errors up to PX pixels and refine them")
    parser.add_argument("--position-refine-interval", type=int, default=None,
                        help="refine positions every K iterations (default: the Options default)")
    parser.add_argument("--probe-modes", type=int, choices=(1, 2, 3, 4), default=1,
                        help="simulate a partially coherent beam and reconstruct with this many "
                             "incoherent probe modes, side by side with one mode")
    parser.add_argument("--mode-powers", default="0.7,0.3",
                        help="power fractions of the simulated modes (with --probe-modes > 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Spark-MPI runs of each kind, interleaved (plain, refined, plain, "
                             "...); the figures are the fastest run's, with every run listed")
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
           "--kernels", args.kernels, "--probe-modes", str(args.probe_modes)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"mpiexec run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    got = np.load(out)
    return {"seconds_per_iteration_mpiexec": float(got["seconds"]) / max(args.iterations, 1),
            "mpiexec_wall_seconds": time.perf_counter() - t0, "object": got["object"]}


def _spark_session(args):
    from sparkmpi.launch.session import spark_session   # also points Spark at this interpreter

    t0 = time.perf_counter()
    spark = spark_session(args.master or f"local[{args.ranks}]", "sparkmpi-bench-ptycho",
                          conf={"spark.ui.enabled": "false"})
    return spark, time.perf_counter() - t0


def _distributed_spark(spark, source, args, probe, **settings) -> dict:
    """The reconstruction over ``args.ranks`` Spark-MPI ranks (``sparkmpi.run``)."""
    from sparkmpi.ptycho.spark import reconstruct_mpi

    out = reconstruct_mpi(spark, source, ranks=args.ranks, algorithm=args.algorithm,
                          iterations=args.iterations, probe_update_start=_probe_start(args),
                          probe=probe, backend=args.backend, kernels=args.kernels,
                          probe_modes=args.probe_modes, **settings)
    return {"seconds_per_iteration": out.seconds_per_iteration, "job_s": out.job_seconds,
            "threads_per_rank": out.threads_per_rank,
            "frames_per_rank": out.frames_per_rank, "kernels": out.kernels,
            "fourier_error_spark": out.fourier_error, "object": out.object,
            "positions": out.positions}


def _spark_runs(kinds: dict, args, probe) -> dict:
    """Each kind's Spark-MPI run ``args.repeats`` times, interleaved in one Spark
    session (so a slower moment of a shared machine falls on both kinds alike).

    ``kinds``: name -> (source, settings).  Returns name -> the fastest run's figures
    (:func:`_distributed_spark`) with ``runs`` (every run's seconds per iteration)."""
    spark, start_s = _spark_session(args)
    best: dict = {}
    runs: dict = {name: [] for name in kinds}
    try:
        for _ in range(args.repeats):
            for name, (source, settings) in kinds.items():
                print(f"reconstructing over {args.ranks} Spark-MPI ranks ({name}) ...",
                      file=sys.stderr)
                got = _distributed_spark(spark, source, args, probe, **settings)
                runs[name].append(got["seconds_per_iteration"])
                if name not in best or got["seconds_per_iteration"] < best[name][
                        "seconds_per_iteration"]:
                    best[name] = got
    finally:
        spark.stop()
    for name, got in best.items():
        got["runs"] = runs[name]
        got["spark_start_s"] = start_s
    return best


def _probe_start(args):
    return None if args.probe_update_start < 0 else args.probe_update_start


def _rel(a, b, mask) -> float:
    return float(np.linalg.norm((a - b)[mask]) / np.linalg.norm(b[mask]))


def run(args) -> dict:
    from sparkmpi import ptycho

    for name in ("frames", "frame_size", "ranks", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, "
                             f"got {getattr(args, name)}")
    mode_powers = None
    if args.probe_modes > 1:
        from sparkmpi.ptycho.cli import _mode_powers

        mode_powers = _mode_powers(args.mode_powers)
    print(f"simulating {args.frames} frames of {args.frame_size}^2 ...", file=sys.stderr)
    data = ptycho.simulate(args.frames, args.frame_size, seed=args.seed, mode_powers=mode_powers)
    mask = ptycho.illuminated_mask(data)
    probe = ptycho.model_probe(data)
    print(f"reconstructing in one process ({args.algorithm}, {args.iterations} iterations) ...",
          file=sys.stderr)
    result = ptycho.reconstruct(data, algorithm=args.algorithm, iterations=args.iterations,
                                probe_update_start=_probe_start(args), probe=probe,
                                backend=args.backend, kernels=args.kernels,
                                probe_modes=args.probe_modes)
    quality = ptycho.object_quality(result.object, data, mask=mask)
    report = {
        "frames": args.frames, "frame_size": args.frame_size, "iterations": args.iterations,
        "algorithm": args.algorithm, "backend": result.state.backend,
        "seconds_per_iteration_1rank": result.seconds_per_iteration,
        "nrmse": quality.nrmse, "shift_px": list(quality.shift_px),
        "nrmse_unregistered": quality.nrmse_unregistered,
        "fourier_error": result.fourier_error, "cpu_count": os.cpu_count(),
        "ranks": args.ranks, "probe_modes": args.probe_modes,
    }
    if args.probe_modes > 1:
        report.update(_mode_runs(data, probe, args, result, report))
    report.update(_fft_timing(args, result.state.backend))
    noisy = None
    if args.position_error > 0:
        from sparkmpi.ptycho.positions import perturb_positions

        noisy = ptycho.PtychoData(
            data.intensities, perturb_positions(data.positions, data.frame_shape,
                                                data.object_shape, random_px=args.position_error,
                                                seed=args.seed + 1),
            data.object_shape, data.object_true, data.probe_true, dict(data.metadata))
    spark_refined = None
    with tempfile.TemporaryDirectory(prefix="sparkmpi-bench-ptycho-") as tmp:
        path = data.save(Path(tmp) / "scan.npz")
        if not args.no_spark:
            kinds = {"plain": (path, {})}
            if noisy is not None:
                kinds["refined"] = (noisy, _refine_settings(args))
            spark_runs = _spark_runs(kinds, args, probe)
            dist = spark_runs["plain"]
            spark_refined = spark_runs.get("refined")
            obj = dist.pop("object")
            dist.pop("positions")
            dist["seconds_per_iteration_runs"] = dist.pop("runs")
            dist["seconds_per_iteration_median"] = float(
                np.median(dist["seconds_per_iteration_runs"]))
            report.update(dist, repeats=args.repeats)
            report["nrmse_spark"] = ptycho.registered_nrmse(obj, data.object_true, mask)
            report["spark_vs_1rank_relative_difference"] = _rel(obj, result.object, mask)
        if not args.no_mpiexec and args.ranks > 1:
            print(f"reconstructing under mpiexec -n {args.ranks} ...", file=sys.stderr)
            dist = _distributed_mpiexec(path, args, Path(tmp) / "result.npz")
            obj = dist.pop("object")
            report.update(dist)
            report["nrmse_mpiexec"] = ptycho.registered_nrmse(obj, data.object_true, mask)
            report["mpiexec_vs_1rank_relative_difference"] = _rel(obj, result.object, mask)
        if noisy is not None:
            report.update(_position_runs(data, noisy, probe, args, report, spark_refined))
    return report


def _refine_settings(args) -> dict:
    refine = {"refine_positions": True}
    if args.position_refine_interval:
        refine["position_refine_interval"] = args.position_refine_interval
    return refine


def _fft_timing(args, backend_name) -> dict:
    """The FFT the engines use (``fft_backend``) and, on the CPU, one rank's stack
    (frames / ranks) forward plus inverse with it and with scipy.fft, side by side
    (one thread, best of 5, interleaved)."""
    from sparkmpi.backend import get_backend
    from sparkmpi.ptycho._fft import choose_fft, make_stack_fft
    from sparkmpi.ptycho._kernels import fft_kwargs

    shape = (args.frame_size, args.frame_size)
    chosen = choose_fft("auto", shape, backend_name)
    out = {"fft_backend": chosen}
    if backend_name != "numpy":
        return out
    bk = get_backend("numpy")
    kw = dict(fft_kwargs(bk), workers=1)
    stacks = {name: make_stack_fft(bk, shape, name, kw, 1) for name in {"scipy", chosen}}
    n = max(1, args.frames // max(args.ranks, 1))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n,) + shape) + 1j).astype(np.complex64)
    best = {name: float("inf") for name in stacks}
    try:
        for _ in range(5):
            for name, st in stacks.items():
                t0 = time.perf_counter()
                st.inverse(st.forward(x))
                best[name] = min(best[name], time.perf_counter() - t0)
    finally:
        for st in stacks.values():
            st.close()
    out["fft_ms_per_rank_stack"] = best[chosen] * 1e3
    out["fft_ms_per_rank_stack_scipy"] = best["scipy"] * 1e3
    out["fft_vs_scipy_ratio"] = best[chosen] / best["scipy"]
    return out


def _position_runs(data, scan, probe, args, report, spark_refined) -> dict:
    """Noisy positions (``scan``) taken as exact, then refined in one process; the
    refined Spark runs (``spark_refined``, from :func:`_spark_runs`) beside the plain."""
    from sparkmpi import ptycho
    from sparkmpi.ptycho.positions import position_error

    common = dict(algorithm=args.algorithm, iterations=args.iterations,
                  probe_update_start=_probe_start(args), probe=probe, backend=args.backend,
                  kernels=args.kernels)
    out = {"nrmse_exact_positions": report["nrmse"],
           "position_error_px_before": position_error(scan.positions, data.positions)}
    print("reconstructing with the noisy positions as exact ...", file=sys.stderr)
    plain = ptycho.reconstruct(scan, **common)
    out["nrmse_noisy_positions"] = ptycho.object_quality(plain.object, data).nrmse
    print("reconstructing with position refinement ...", file=sys.stderr)
    refined = ptycho.reconstruct(scan, **common, **_refine_settings(args))
    quality = ptycho.object_quality(refined.object, data)
    out.update(nrmse_refined=quality.nrmse, shift_px_refined=list(quality.shift_px),
               position_error_px_after=position_error(refined.positions, data.positions),
               position_error_px_after_whole=position_error(np.rint(refined.positions),
                                                            data.positions),
               seconds_per_iteration_1rank_refined=refined.seconds_per_iteration,
               seconds_per_iteration_1rank_noisy=plain.seconds_per_iteration)
    out["nrmse_refined_vs_exact"] = out["nrmse_refined"] / max(report["nrmse"], 1e-300)
    if spark_refined is not None:
        runs = spark_refined["runs"]
        out["seconds_per_iteration_refined"] = spark_refined["seconds_per_iteration"]
        out["seconds_per_iteration_refined_runs"] = runs
        out["nrmse_refined_spark"] = ptycho.registered_nrmse(
            spark_refined["object"], data.object_true, ptycho.illuminated_mask(data))
        out["position_error_px_after_spark"] = position_error(spark_refined["positions"],
                                                              data.positions)
        plain_runs = report["seconds_per_iteration_runs"]
        out["refined_vs_plain_seconds_ratio"] = (spark_refined["seconds_per_iteration"]
                                                 / report["seconds_per_iteration"])
        # each round's refined run against the plain run just before it
        out["refined_vs_plain_seconds_ratio_runs"] = [r / p for r, p in zip(runs, plain_runs)]
    return out


def _mode_runs(data, probe, args, result, report) -> dict:
    """One mode on the same partially coherent data, side by side with the modes' run."""
    from sparkmpi import ptycho

    common = dict(algorithm=args.algorithm, iterations=args.iterations,
                  probe_update_start=_probe_start(args), probe=probe, backend=args.backend)
    probe_q = ptycho.probe_quality(result.probe_modes, data.probe_modes_true)
    out = {"nrmse_modes": report["nrmse"], "fourier_error_modes": result.fourier_error,
           "seconds_per_iteration_modes": result.seconds_per_iteration,
           "mode_powers": list(result.mode_powers),
           "mode_powers_true": list(ptycho.mode_powers(data.probe_modes_true)),
           "probe_nrmse": probe_q.nrmse}
    for name, kernels in (("", args.kernels), ("_generic", "generic")):
        print(f"reconstructing with one mode (kernels={kernels}) ...", file=sys.stderr)
        one = ptycho.reconstruct(data, kernels=kernels, **common)
        out[f"seconds_per_iteration_1mode{name}"] = one.seconds_per_iteration
        if not name:
            out["nrmse_1mode"] = ptycho.object_quality(one.object, data).nrmse
            out["fourier_error_1mode"] = one.fourier_error
            out["probe_nrmse_1mode"] = ptycho.probe_quality(one.probe, data.probe_true).nrmse
    out["modes_vs_1mode_generic_seconds_ratio"] = (
        result.seconds_per_iteration / out["seconds_per_iteration_1mode_generic"])
    return out
