"""``sparkmpi ptycho simulate`` and ``sparkmpi ptycho reconstruct``.

A thin layer over :func:`sparkmpi.ptycho.simulate` and
:func:`sparkmpi.ptycho.reconstruct`: progress on stderr, ``--json`` prints one
summary object on stdout.
"""

from __future__ import annotations

import json
import sys
import time

from ..errors import UsageError


def _photons(value: str):
    if value.lower() in ("none", "inf", "0"):
        return None
    try:
        out = float(value)
    except ValueError:
        raise UsageError(f"--photons must be a number or 'none', got {value!r}") from None
    if out <= 0:
        raise UsageError(f"--photons must be > 0 or 'none', got {value!r}")
    return out


def _mode_powers(value: str):
    try:
        out = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"--mode-powers must be comma-separated numbers, got {value!r}") from None
    if not 2 <= len(out) <= 4 or min(out) <= 0 or any(b > a for a, b in zip(out, out[1:])):
        raise UsageError(f"--mode-powers must be 2 to 4 positive, decreasing fractions, "
                         f"got {value!r}")
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser("ptycho", help="ptychography: simulate scans, reconstruct them")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    sim = verbs.add_parser("simulate", help="write a simulated scan (NPZ) with ground truth")
    sim.add_argument("--frames", type=int, default=512, help="number of diffraction patterns")
    sim.add_argument("--frame-size", type=int, default=128, help="frame side in pixels")
    sim.add_argument("--overlap", type=float, default=0.7, help="probe overlap, 0..1")
    sim.add_argument("--photons", type=_photons, default=None,
                     help="photons per frame for Poisson noise, or 'none' (noise-free)")
    sim.add_argument("--seed", type=int, default=0, help="random seed")
    sim.add_argument("--probe", choices=("aperture", "focused", "gaussian"), default="aperture",
                     help="probe model")
    sim.add_argument("--scan", choices=("spiral", "raster"), default="spiral", help="scan pattern")
    sim.add_argument("--propagation-distance", type=float, default=0.0,
                     help="Fresnel propagation of the probe, metres")
    sim.add_argument("--mode-powers", default=None,
                     help="partially coherent beam: comma-separated power fractions of 2-4 "
                          "incoherent probe modes, decreasing (e.g. 0.7,0.3)")
    sim.add_argument("--out", required=True, help="output NPZ file")
    sim.set_defaults(func=_simulate)

    rec = verbs.add_parser("reconstruct", help="reconstruct a scan; write NPZ and PNG outputs")
    rec.add_argument("file", help="NPZ file from 'sparkmpi ptycho simulate' (or same format), "
                                  "or a CXI file (.cxi/.h5: entry_1/data_1/data, ...)")
    rec.add_argument("--algorithm", choices=("dm", "raar"), default="dm")
    rec.add_argument("--iterations", type=int, default=100)
    rec.add_argument("--probe-update-start", type=int, default=10,
                     help="first iteration refining the probe (-1: never)")
    rec.add_argument("--beta", type=float, default=None, help="relaxation (default dm 1, raar 0.75)")
    rec.add_argument("--probe-init", choices=("model", "data", "true"), default="model",
                     help="initial probe: nominal model from the metadata, mean diffraction "
                          "pattern, or the file's probe_true")
    rec.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="numpy")
    rec.add_argument("--probe-support", type=float, default=0.8,
                     help="probe support, fraction of the frame (0: none)")
    rec.add_argument("--no-probe-center", action="store_true", help="do not centre the probe")
    rec.add_argument("--probe-power", action="store_true",
                     help="normalise the probe's power to the brightest frame")
    rec.add_argument("--refine-positions", action="store_true",
                     help="refine the scan positions (written with the result)")
    rec.add_argument("--position-refine-start", type=int, default=10)
    rec.add_argument("--probe-modes", type=int, choices=(1, 2, 3, 4), default=1,
                     help="incoherent probe modes (mixed state); more than 1 runs the "
                          "generic engine")
    rec.add_argument("--translation-sign", type=float, default=1.0,
                     help="CXI files: +1 sample translation, -1 beam translation")
    rec.add_argument("--out", required=True, help="output directory")
    rec.set_defaults(func=_reconstruct)


def _simulate(args) -> int:
    from .simulate import simulate

    t0 = time.perf_counter()
    print(f"simulating {args.frames} frames of {args.frame_size}x{args.frame_size} ...",
          file=sys.stderr)
    data = simulate(args.frames, args.frame_size, overlap=args.overlap, photons=args.photons,
                    seed=args.seed, probe=args.probe, scan=args.scan,
                    propagation_distance=args.propagation_distance,
                    mode_powers=None if args.mode_powers is None
                    else _mode_powers(args.mode_powers))
    path = data.save(args.out)
    summary = {"file": str(path), "frames": data.n_frames, "frame_shape": list(data.frame_shape),
               "object_shape": list(data.object_shape), "seconds": time.perf_counter() - t0}
    print(f"wrote {path} (object {data.object_shape[0]}x{data.object_shape[1]})", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


def _reconstruct(args) -> int:
    from .engines import reconstruct
    from .metrics import illuminated_mask, object_quality, probe_quality
    from .mpi_job import _probe_init
    from .output import write_outputs
    from .files import read_scan

    data = read_scan(args.file, **({} if args.file.lower().endswith(".npz")
                                   else {"translation_sign": args.translation_sign}))
    probe = _probe_init(data, args.probe_init)
    every = max(1, args.iterations // 10)

    def progress(i, err):
        if (i + 1) % every == 0 or i == 0:
            print(f"iteration {i + 1}/{args.iterations}  fourier error {err:.4g}", file=sys.stderr)

    result = reconstruct(data, algorithm=args.algorithm, iterations=args.iterations,
                         probe_update_start=None if args.probe_update_start < 0
                         else args.probe_update_start,
                         beta=args.beta, backend=args.backend, probe=probe, callback=progress,
                         probe_support=args.probe_support if args.probe_support > 0 else None,
                         probe_center=not args.no_probe_center, probe_power=args.probe_power,
                         refine_positions=args.refine_positions,
                         position_refine_start=args.position_refine_start,
                         probe_modes=args.probe_modes)
    summary = {"file": args.file, "algorithm": args.algorithm, "iterations": args.iterations,
               "backend": result.state.backend, "seconds": result.seconds,
               "seconds_per_iteration": result.seconds_per_iteration,
               "fourier_error": result.fourier_error, "frames": data.n_frames,
               "probe_modes": args.probe_modes}
    mask = None
    if data.probe_true is not None:
        mask = illuminated_mask(data)
    if data.object_true is not None and mask is not None:
        # registered: a drifted probe translates the object without making it worse
        summary.update(object_quality(result.object, data, mask=mask).as_dict())
    if data.probe_true is not None:
        summary.update(probe_quality(result.probe_modes if args.probe_modes > 1 else result.probe,
                                     data.probe_true).as_dict("probe_"))
    if args.probe_modes > 1:   # known without ground truth
        summary["mode_powers"] = list(result.mode_powers)
    if args.refine_positions:
        summary["positions_moved"] = int(sum(result.positions_moved))
    summary["files"] = write_outputs(args.out, result.object, result.probe_modes, result.errors,
                                     mask=mask, summary=summary, positions=result.positions)
    print(f"wrote {args.out}: {result.seconds_per_iteration:.3f} s/iteration"
          + (f", NRMSE {summary['nrmse']:.4f}" if "nrmse" in summary else ""), file=sys.stderr)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0
