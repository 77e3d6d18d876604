"""``sparkmpi bench bluesky``: a planned Fermat scan through the whole Bluesky loop, feedback off and on.

Starts a Kafka broker and a Tiled server of its own, local Spark, then runs
the same scan twice through :func:`sparkmpi.bluesky.loop.run_scan_loop`:
once with the feedback agent listening but not acting (the full scan), once
with it stopping the scan by :class:`~sparkmpi.bluesky.feedback.ConvergenceRule`
at the given thresholds.  Both NRMSE figures are taken over the same region,
the part of the object the early-stopped scan illuminated (a Fermat spiral
grows outwards: the points saved are the outer ring, reported as
``coverage_early``), through :mod:`sparkmpi.ptycho.metrics`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

NAME = "bluesky"
HELP = "a Fermat scan through RunEngine -> Kafka -> sparkmpi -> feedback, with feedback off and on"


def add_arguments(parser) -> None:
    parser.add_argument("--points", type=int, default=512, help="points the Fermat scan plans (default 512)")
    parser.add_argument("--frame-size", type=int, default=64, help="detector frame side in pixels (default 64)")
    parser.add_argument("--exposure", type=float, default=0.02, help="seconds per point (default 0.02)")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks (default 2)")
    parser.add_argument("--iterations", type=int, default=5,
                        help="DM iterations at each checkpoint of the live reconstruction (default 5)")
    parser.add_argument("--checkpoint-frames", type=int, default=32,
                        help="frames between checkpoints, where the reconstruction and the stop rule advance "
                             "(default 32)")
    parser.add_argument("--final-iterations", type=int, default=30,
                        help="DM iterations at the end of a scan (default 30)")
    parser.add_argument("--min-coverage", type=float, default=None, help="stop rule: coverage of the planned area")
    parser.add_argument("--error-tolerance", type=float, default=None, help="stop rule: |Fourier error trend|")
    parser.add_argument("--patience", type=int, default=None, help="stop rule: documents in a row")
    parser.add_argument("--trace", action="store_true",
                        help="also report each run's checkpoints: frames, coverage, Fourier error, trend, NRMSE")
    parser.add_argument("--no-tiled", action="store_true", help="do not start a Tiled server")


def run(args) -> dict:

    from ..bluesky.feedback import ConvergenceRule
    from ..bluesky.loop import run_scan_loop
    from ..bluesky.quality import measured_nrmse
    from ..bluesky.tiled import LocalTiled, TiledResults
    from ..launch.session import spark_session
    from ..stream.broker import LocalBroker

    rule_args = {k: v for k, v in (("min_coverage", args.min_coverage), ("error_tolerance", args.error_tolerance),
                                   ("patience", args.patience)) if v is not None}
    rule = ConvergenceRule(**rule_args)
    work = Path(tempfile.mkdtemp(prefix="sparkmpi-bench-bluesky-"))
    t0 = time.monotonic()
    spark = broker = tiled = None
    runs = {}
    try:
        broker = LocalBroker(work / "kafka", port=0).start()
        if not args.no_tiled:
            tiled = LocalTiled(work / "tiled").start()
        spark = spark_session(f"local[{args.ranks + 1}]", "sparkmpi-bench-bluesky",
                              conf={"spark.ui.enabled": "false"})
        for mode in ("off", "on"):
            print(f"bench bluesky: scan with feedback {mode}", file=sys.stderr, flush=True)
            results = TiledResults(tiled.uri, tiled.api_key) if tiled is not None else None
            runs[mode] = run_scan_loop(spark, broker.bootstrap, work / f"feedback-{mode}", points=args.points,
                                       frame_size=args.frame_size, exposure=args.exposure, feedback=mode == "on",
                                       rule=rule, ranks=args.ranks, iterations=args.iterations,
                                       final_iterations=args.final_iterations,
                                       checkpoint_frames=args.checkpoint_frames, tiled=results)
    finally:
        if spark is not None:
            spark.stop()
        if tiled is not None:
            tiled.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    full, early = runs["off"], runs["on"]
    scene = early["scene"]
    region = early["positions"]
    nrmse_full = measured_nrmse(full["object"], scene.object_true, scene.probe_true, region)
    nrmse_early = measured_nrmse(early["object"], scene.object_true, scene.probe_true, region)
    planned = early["points_planned"]
    saved = 1.0 - early["points_measured"] / planned
    last_quality = early["quality"][-1] if early["quality"] else {}
    out = {
        "points_planned": planned, "points_used": early["points_used"], "points_used_full": full["points_used"],
        "saved_fraction": saved, "nrmse_full": nrmse_full, "nrmse_early": nrmse_early,
        "nrmse_ratio": nrmse_early / nrmse_full if nrmse_full else None,
        "decision_latency_s": early["decision_latency_s"], "stopped_early": early["stopped_early"],
        "decision_frames": (early["decision"] or {}).get("frames_used"),
        "decision_checkpoint": (early["decision"] or {}).get("checkpoint"),
        "checkpoint_frames": args.checkpoint_frames,
        "coverage_early": last_quality.get("coverage"), "decision_reason": (early["decision"] or {}).get("reason"),
        "rule": rule.to_json(), "exit_status_early": early["exit_status"], "exit_status_full": full["exit_status"],
        "refine_p50_s": early["refine_p50_s"], "frame_size": args.frame_size, "exposure_s": args.exposure,
        "tiled": tiled is not None, "tiled_errors": len(early["tiled_errors"]) + len(full["tiled_errors"]),
        "targets_met": bool(nrmse_early <= 1.2 * nrmse_full and saved >= 0.25
                            and (early["decision_latency_s"] or 9.9) <= 1.0),
        "seconds": time.monotonic() - t0,
    }
    if args.trace:
        for mode, run_ in runs.items():
            out[f"trace_{mode}"] = [[q["frames_used"], round(q["coverage"], 3), q["fourier_error"],
                                     q["fourier_error_trend"], q["nrmse"]] for q in run_["quality"]]
    return out
