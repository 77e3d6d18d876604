"""``sparkmpi demo``: the whole product on embedded defaults, end to end.

1. starts local Spark and a local Kafka broker (jars from Maven Central on
   first use);
2. simulates a ptychographic scan and streams its frames into Kafka at a
   detector-like rate (:mod:`sparkmpi.stream.detector`);
3. cuts the stream into micro-batches by offset ranges; the ranks of one
   long-lived MPI world (:class:`sparkmpi.World`) read their ranges from
   Kafka, validate the frames and keep them in their per-rank state; outputs
   (frame indices and positions) are written atomically and only then are
   offsets committed (:class:`sparkmpi.stream.driver.StreamDriver`);
4. after each batch, a call on the same world refines the reconstruction
   (:class:`sparkmpi.ptycho.streaming.StreamingReconstruction`: object, probe
   and exit waves stay on the ranks, sums combined with ``MPI_Allreduce``)
   over every frame received so far, and publishes a snapshot for the live
   viewer; only a batch's new frames ever travel;
5. simulates a TEM tilt series (Shepp-Logan, 74 angles over -73..+73 degrees)
   and reconstructs it with ART through Spark, slice-partitioned;
6. writes everything under ``--out`` and prints a summary: streaming
   throughput and latency, the ptychography NRMSE (and its progression with
   frames received) and the tomography RMSE.

With ``--view`` the live viewer follows the reconstruction while the scan
streams, and the viewers of both results stay up at the end until Ctrl+C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ._proc import stop_process
from .errors import InvalidArgument, UsageError

STEPS = 6


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on embedded defaults (local Spark and Kafka)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-output", help="output folder (default ./demo-output)")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks = Spark task slots (default 2)")
    parser.add_argument("--frames", type=int, default=256, help="ptychography frames in the scan (default 256)")
    parser.add_argument("--frame-size", type=int, default=64, help="frame side in pixels (default 64)")
    parser.add_argument("--rate", type=float, default=50.0, help="detector frames per second (default 50)")
    parser.add_argument("--trigger", type=float, default=0.1,
                        help="seconds between micro-batches (default 0.1: a call on the world costs milliseconds)")
    parser.add_argument("--iterations-per-batch", type=int, default=10,
                        help="DM iterations after each micro-batch (default 10)")
    parser.add_argument("--refine-budget", type=float, default=0.12,
                        help="seconds a live refinement may take: each batch runs as many DM iterations as fit, "
                             "from the last refinement's seconds per iteration, at least 1 and at most "
                             "--iterations-per-batch (default 0.12; frames arriving meanwhile wait for it)")
    parser.add_argument("--final-iterations", type=int, default=60,
                        help="DM iterations over the whole scan at the end (default 60)")
    parser.add_argument("--tomo-size", type=int, default=256, help="tilt-series side in pixels (default 256)")
    parser.add_argument("--tomo-angles", type=int, default=74, help="projections (default 74, -73..+73 deg)")
    parser.add_argument("--bootstrap", default=None,
                        help="use this Kafka cluster (host:port) instead of starting a local broker")
    parser.add_argument("--detector", choices=("kafka", "eiger"), default="kafka",
                        help="kafka: the simulator publishes frames to Kafka; eiger: it streams them as an Eiger "
                             "does (Stream V2, bslz4) through `sparkmpi detector bridge` (default kafka)")
    parser.add_argument("--view", action="store_true",
                        help="serve the live viewer while streaming and the result viewers at the end")
    parser.add_argument("--bluesky", action="store_true",
                        help="instead: a Bluesky RunEngine's Fermat scan reconstructed live, stopped early by "
                             "the feedback agent (local Kafka, Tiled and Spark)")
    parser.set_defaults(func=_main)


def _check(args) -> None:
    cores = os.cpu_count() or 1
    if not 1 <= args.ranks <= cores:
        raise UsageError(f"--ranks must be in 1..{cores} (the cores of this machine), got {args.ranks}")
    for name in ("frames", "frame_size", "iterations_per_batch", "final_iterations", "tomo_size", "tomo_angles"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.frames < 2 * args.ranks:
        raise UsageError(f"--frames must be at least twice --ranks, got {args.frames}")
    if args.rate <= 0 or args.trigger <= 0 or args.refine_budget <= 0:
        raise UsageError("--rate, --trigger and --refine-budget must be > 0")


class _Steps:
    """Numbered progress lines on stderr, with elapsed times."""

    def __init__(self, quiet: bool = False):
        self.t0 = time.monotonic()
        self.quiet = quiet

    def __call__(self, number: int, text: str) -> None:
        if self.quiet:
            return
        print(f"[{number}/{STEPS} {time.monotonic() - self.t0:6.1f} s] {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.quiet:
            return
        print(f"        {text}", file=sys.stderr, flush=True)


def _stream_eiger(source, bootstrap: str, topic: str, rate: float, partitions: int) -> None:
    """The project's Stream V2 sender -> ``run_bridge`` -> ``topic``: one series, bslz4-compressed."""
    from .stream.eiger.bridge import run_bridge
    from .stream.eiger.sender import SeriesPlan, Stream2Sender

    with Stream2Sender("tcp://127.0.0.1:0", send_timeout=30) as sender:
        result: dict = {}

        def bridge():
            try:
                result["report"] = run_bridge(sender.endpoint, bootstrap, topic, partitions=partitions, series=1,
                                              progress=None)
            except BaseException as exc:  # noqa: BLE001  (re-raised below)
                result["error"] = exc

        thread = threading.Thread(target=bridge, name="sparkmpi-demo-bridge", daemon=True)
        thread.start()
        sender.send_series(source, SeriesPlan(series_id=1, compression="bslz4", rate=rate))
        thread.join(60)
    if "error" in result:
        raise result["error"]
    if thread.is_alive() or result["report"].images != source.count:
        raise RuntimeError(f"the bridge did not bridge the {source.count} images of the series in time")


def ptycho_frames(comm, frames, state=None) -> dict:
    """MPI body of each streaming batch: check the rank's frames and keep them on the rank.

    The frames stay in the world's per-rank ``state`` (``demo.new``) until the
    next live refinement takes them; the output holds ``positions`` (n, 2)
    int64 per rank (concatenated in rank order by the driver).  All ranks
    agree on the frame shape.
    """
    intensities, positions = [], []
    for frame in frames:
        array = np.asarray(frame.array, dtype=np.float32)
        if not np.isfinite(array).all() or (array < 0).any():
            raise InvalidArgument(f"frame {frame.header.index} has non-finite or negative intensities")
        intensities.append(array)
        positions.append(np.rint(frame.header.position).astype(np.int64))
    shapes = {s for s in comm.allgather(intensities[0].shape if intensities else None) if s is not None}
    if len(shapes) > 1:
        raise InvalidArgument(f"frames of different shapes in one batch: {sorted(shapes)}")
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    if state is not None and intensities:
        state.setdefault("demo.new", []).append((np.stack(intensities), positions))
    return {"positions": positions}


def live_refine(comm, state, iterations: int, object_shape, frame_shape, probe, probe_update_start=None):
    """A world call: fold the frames kept since the last call into the rank's
    :class:`~sparkmpi.ptycho.streaming.StreamingReconstruction` and iterate.

    Returns ``(object, probe, errors)`` on rank 0 (None elsewhere), or None on
    every rank while some rank holds no frame yet (the engine needs frames on
    every rank).
    """
    from .ptycho.streaming import StreamingReconstruction

    rec = state.get("demo.rec")
    new = state.get("demo.new", [])
    held = (rec.n_frames if rec is not None else 0) + sum(len(p) for _, p in new)
    if min(comm.allgather(held)) == 0:
        return None
    if rec is None:
        # the nominal probe of the optics first, refined once the object has formed
        rec = state["demo.rec"] = StreamingReconstruction(object_shape, frame_shape, probe=probe, comm=comm,
                                                          algorithm="dm",
                                                          probe_update_start=probe_update_start or iterations)
    if new:
        rec.add_frames(np.concatenate([i for i, _ in new]), np.concatenate([p for _, p in new]))
        state["demo.new"] = []
    result = rec.iterate(iterations)
    return (result.object, result.probe, np.asarray(result.errors), result.seconds,
            result.iterations) if comm.rank == 0 else None


def live_warm(comm, state, object_shape, probe):
    """A world call before the scan: run the engine once on stand-in frames, so
    its kernels are compiled before the first live refinement (not counted as latency)."""
    from .ptycho.streaming import StreamingReconstruction

    rec = StreamingReconstruction(object_shape, probe.shape, probe=probe, comm=comm, algorithm="dm")
    rec.add_frames(np.ones((2, *probe.shape), np.float32), np.zeros((2, 2), np.int64))
    rec.iterate(2)
    return comm.rank


#: Frames per rank before the first live reconstruction.
MIN_FRAMES_PER_RANK = 8


def iterations_within(budget_s: float, per_iteration_s: float, overhead_s: float, most: int) -> int:
    """Iterations that fit in ``budget_s`` when a refinement costs ``overhead_s`` once
    and ``per_iteration_s`` per iteration: at least 1, at most ``most``."""
    room = budget_s - overhead_s
    return max(1, min(most, int(room / max(per_iteration_s, 1e-6) + 1e-9)))


class _LiveReconstruction:
    """After each batch: one call on the stream's world refines over all frames so far."""

    def __init__(self, world, scan, ranks: int, iterations: int, live_dir: Path, steps: _Steps,
                 budget: float | None = None):
        from .ptycho.simulate import model_probe

        self.world, self.scan, self.ranks = world, scan, ranks
        self.iterations, self.live_dir, self.steps = iterations, live_dir, steps
        self.budget = budget
        self._seconds_per_iteration: float | None = None
        self._call_overhead_s = 0.0
        self.positions: list[np.ndarray] = []
        self.object = self.probe = None
        self.errors: list[float] = []
        self.history: list[dict] = []
        self.seen: set[int] = set()
        self.refine_s: list[float] = []
        self._probe0 = model_probe(scan)   # the nominal probe of the beamline's optics
        self._whole = None   # illuminated region of the whole scan
        self._pool = None        # the live quality thread
        self._measuring = None   # its measurement under way

    @property
    def frames(self) -> int:
        return sum(len(p) for p in self.positions)

    def add_batch(self, path: str) -> int:
        with np.load(path) as batch:
            if "result.positions" not in batch.files:
                return 0
            index = batch["frame_index"]
            self.seen.update(index.tolist())
            self.positions.append(batch["result.positions"])
        return int(index.size)

    def warm(self) -> None:
        self.world.call(live_warm, self.scan.object_shape, self._probe0)

    def refine(self, iterations: int, whole_scan: bool = False):
        from .ptycho import PtychoData
        from .ptycho.metrics import illuminated_mask

        t0 = time.perf_counter()
        out = self.world.call(live_refine, iterations, self.scan.object_shape, self._probe0.shape, self._probe0,
                              probe_update_start=self.iterations)
        self.refine_s.append(time.perf_counter() - t0)
        if out[0] is None:
            return None
        self.object, self.probe, errors, seconds, done = out[0]
        if done:
            # The engine's own loop time per iteration; the rest of the call (engine
            # set-up, the world call, the result's transfer) is paid once per batch.
            self._seconds_per_iteration = seconds / done
            self._call_overhead_s = max(self.refine_s[-1] - seconds, 0.0)
        self.errors = [float(e) for e in errors]
        positions = np.concatenate(self.positions)
        # Quality where the frames so far reach: the rest of the object is not
        # measured yet, and counting it would report coverage, not quality.
        stand_in = np.zeros((len(positions), *self._probe0.shape), np.float32)   # the mask needs positions only
        scanned = illuminated_mask(PtychoData(stand_in, positions, self.scan.object_shape,
                                              probe_true=self.scan.probe_true))
        if self._whole is None:
            self._whole = illuminated_mask(self.scan)
        entry = {"frames": len(positions), "iterations": len(self.errors),
                 "coverage": float((scanned & self._whole).sum() / self._whole.sum()),
                 "seconds_per_iteration": seconds / max(done, 1), "refine_s": self.refine_s[-1],
                 "iterations_run": int(done)}
        # The registered NRMSE costs 0.05-0.7 s here: live, it is measured in a
        # thread of its own (newest snapshot first, none queued) so that the next
        # batch does not wait for it; at the end, here, over the whole scan too.
        if whole_scan:
            self.drain_quality()
            self._measure(entry, self.object, scanned, whole=True)
        elif self._measuring is None or self._measuring.done():
            self._measuring = self._quality_pool().submit(self._measure, entry, self.object.copy(), scanned)
        return entry

    def _quality_pool(self):
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparkmpi-demo-quality")
        return self._pool

    def _measure(self, entry: dict, obj, scanned, whole: bool = False) -> dict:
        from .ptycho.metrics import registered_nrmse

        entry["nrmse"] = float(registered_nrmse(obj, self.scan.object_true, scanned))
        if whole:
            entry["nrmse_whole_scan"] = float(registered_nrmse(obj, self.scan.object_true, self._whole))
        self.history.append(entry)   # in the order measured: the order of the refinements
        return entry

    def drain_quality(self, check: bool = True) -> None:
        """Wait for the live measurement under way and stop its thread
        (``check``: re-raise what it raised)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        measuring, self._measuring = self._measuring, None
        if measuring is not None and check:
            measuring.result()

    @property
    def last_nrmse(self) -> float | None:
        return self.history[-1]["nrmse"] if self.history else None

    def on_batch(self, report) -> None:
        added = self.add_batch(report.path)
        # A reconstruction from a handful of frames is noise, and every later one
        # starts from it: wait for a few frames per rank (or the whole scan).
        if added == 0 or self.frames < min(MIN_FRAMES_PER_RANK * self.ranks, len(self.scan.positions)):
            return
        entry = self.refine(self.live_iterations())
        if entry is None:
            return
        self.publish()
        quality = "" if self.last_nrmse is None else (
            f"; object NRMSE {self.last_nrmse:.3f} over the part scanned (at {self.history[-1]['frames']} frames)")
        self.steps.note(f"batch {report.batch}: +{added} frames ({self.frames} received), "
                        f"{report.latency_s or 0:.2f} s latency{quality}")

    def live_iterations(self) -> int:
        """DM iterations for this batch: as many as fit in the budget (a refinement
        holds up the next batch), from the last refinement's seconds per iteration
        and what its call cost besides the iterations."""
        if self.budget is None or self._seconds_per_iteration is None:
            return self.iterations
        return iterations_within(self.budget, self._seconds_per_iteration, self._call_overhead_s,
                                 self.iterations)

    def publish(self) -> None:
        from .viz import publish_snapshot

        publish_snapshot(self.live_dir, {"object": self.object, "probe": self.probe,
                                         "errors": np.asarray(self.errors)},
                         {"frames": self.frames, "nrmse": self.last_nrmse})


def _spark(ranks: int):
    from .launch.session import spark_session

    return spark_session(f"local[{ranks}]", "sparkmpi-demo")


def _viewer(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Start ``sparkmpi view ARGS`` and return it with the address it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "sparkmpi.cli", "view", *args],
                            stdout=subprocess.PIPE, text=True)
    address = (proc.stdout.readline() or "").strip()
    if not address:
        stop_process(proc)
        raise RuntimeError(f"the viewer did not start (sparkmpi view {' '.join(args)})")
    return proc, address


def run_demo(args) -> dict:
    """Run the demo; returns the summary (also written to ``<out>/summary.json``)."""
    _check(args)
    from .ptycho import simulate
    from .ptycho.output import write_outputs as write_ptycho
    from .stream.kafka_client import ensure_topic
    from .stream.detector import NpzScan, publish_kafka
    from .stream.driver import StreamDriver
    from .stream.broker import LocalBroker
    from .tomo.algorithms import rmse
    from .tomo.output import write_outputs as write_tomo
    from .tomo.simulate import simulate_tilt_series
    from .tomo.spark import reconstruct_spark

    steps = _Steps(quiet=getattr(args, "quiet", False))
    out = Path(args.out).resolve()
    for sub in ("stream", "live"):
        shutil.rmtree(out / sub, ignore_errors=True)  # a fresh run; the broker data is per run too
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out": str(out)}
    viewers: list[subprocess.Popen] = []
    broker = None
    world = live = None

    steps(1, f"starting local Spark (local[{args.ranks}])"
             + ("" if args.bootstrap else " and a local Kafka broker"))
    spark = _spark(args.ranks)
    try:
        if args.bootstrap:
            bootstrap = args.bootstrap
        else:
            broker_dir = out / "kafka"
            shutil.rmtree(broker_dir, ignore_errors=True)
            broker = LocalBroker(broker_dir, port=0).start()
            bootstrap = broker.bootstrap
        steps.note(f"Kafka at {bootstrap}")

        steps(2, f"simulating a ptychographic scan: {args.frames} frames of {args.frame_size}x{args.frame_size}")
        scan = simulate(frames=args.frames, frame_size=args.frame_size, seed=0)
        scan_path = out / "ptycho" / "scan.npz"
        scan_path.parent.mkdir(parents=True, exist_ok=True)
        scan.save(scan_path)

        steps(3, f"streaming the scan into Kafka at {args.rate:g} frames/s; micro-batches every "
                 f"{args.trigger:g} s through Spark and {args.ranks} MPI ranks")
        import sparkmpi

        # One world for the stream and the live reconstruction: the frames stay on its ranks.
        world = sparkmpi.World(spark, ranks=args.ranks, preload=("sparkmpi.ptycho.streaming",))
        live = _LiveReconstruction(world, scan, args.ranks, args.iterations_per_batch, out / "live", steps,
                                   budget=args.refine_budget)
        if args.view:
            proc, address = _viewer(["--live", str(out / "live")])
            viewers.append(proc)
            summary["live_viewer"] = address
            steps.note(f"live viewer: {address}")
        topic = "demo-frames"
        publisher_error: list[BaseException] = []

        def _publish():
            try:
                if args.detector == "eiger":   # an Eiger's Stream V2 through the bridge into the topic
                    _stream_eiger(NpzScan(scan_path, dtype="float32", scan_id="demo"), bootstrap, topic,
                                  args.rate, args.ranks)
                else:
                    publish_kafka(NpzScan(scan_path, dtype="float32", scan_id="demo"), bootstrap, topic,
                                  rate=args.rate, partitions=args.ranks)
            except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
                publisher_error.append(exc)

        publisher = threading.Thread(target=_publish, name="sparkmpi-demo-detector", daemon=True)
        driver_class = StreamDriver
        if args.detector == "eiger":
            from .stream.eiger.driver import EigerStreamDriver as driver_class  # the same arguments
        driver = driver_class(spark, bootstrap, topic, "demo", out / "stream", ranks=args.ranks,
                              trigger=args.trigger, process=ptycho_frames, progress=None, world=world)
        # Get the topic, the Spark workers and the rank spares ready before the
        # detector starts, as a beamline would before the scan.
        ensure_topic(bootstrap, topic, partitions=args.ranks)
        driver.start()
        driver.warm_up()
        live.warm()
        publisher.start()
        report = driver.run(until_end_of_scan=True, idle_timeout=30, on_batch=live.on_batch)
        publisher.join(timeout=30)
        if publisher_error:
            raise publisher_error[0]
        summary["stream"] = {"frames": report.frames, "batches": report.batches,
                             "frames_per_s": report.frames_per_s, "latency_p50_s": report.latency_p50_s,
                             "latency_p99_s": report.latency_p99_s, "dead_letters": report.dead_letters,
                             "trigger": args.trigger, "mode": "world", "detector": args.detector,
                             "refine_budget_s": args.refine_budget,
                             "refine_p50_s": float(np.percentile(live.refine_s, 50)) if live.refine_s else None}
        if live.frames != args.frames:
            raise RuntimeError(f"the stream delivered {live.frames} distinct frames, expected {args.frames}")

        steps(4, f"refining over the whole scan: {args.final_iterations} DM iterations on {args.ranks} ranks")
        nrmse = live.refine(args.final_iterations, whole_scan=True)["nrmse_whole_scan"]
        live.publish()
        world.close("the live reconstruction is done")   # its task slots go to the tomography
        files = write_ptycho(out / "ptycho", live.object, live.probe, np.asarray(live.errors),
                             summary={"nrmse": nrmse, "frames": live.frames})
        summary["ptycho"] = {"nrmse": nrmse, "iterations": len(live.errors),
                             "fourier_error": live.errors[-1], "history": live.history,
                             "files": {k: str(v) for k, v in files.items()}}
        steps.note(f"object NRMSE {nrmse:.4f} after {len(live.errors)} iterations")

        steps(5, f"tomography: {args.tomo_size}^3 Shepp-Logan, {args.tomo_angles} projections, "
                 f"ART through Spark")
        tilt_path = out / "tomo" / "tilt_series.tif"
        tilt_path.parent.mkdir(parents=True, exist_ok=True)
        _, phantom = simulate_tilt_series(size=args.tomo_size, n_angles=args.tomo_angles, out=tilt_path)
        t0 = time.perf_counter()
        volume, timings = reconstruct_spark(spark, tilt_path, algorithm="art", iterations=1,
                                            partitions=args.ranks)
        tomo_s = time.perf_counter() - t0
        tomo_files = write_tomo(out / "tomo", volume)
        tomo_rmse = float(rmse(volume, phantom))
        summary["tomo"] = {"rmse": tomo_rmse, "seconds": tomo_s, "size": args.tomo_size,
                           "angles": args.tomo_angles, "files": tomo_files}
        steps.note(f"volume RMSE {tomo_rmse:.4f} in {tomo_s:.1f} s")

        summary["seconds"] = time.monotonic() - steps.t0
        steps(6, "done")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    finally:
        if live is not None:
            live.drain_quality(check=False)   # an error of the demo itself is on its way already
        if world is not None:
            world.close("the demo ended")
        if broker is not None:
            broker.stop()
        spark.stop()
        if not args.view:
            for proc in viewers:
                stop_process(proc)
    if args.view:
        _serve_results(viewers, out, summary)
    return summary


def _serve_results(viewers, out: Path, summary: dict) -> None:
    tomo_view, tomo_address = _viewer([summary["tomo"]["files"]["tiff"]])
    ptycho_view, ptycho_address = _viewer([summary["ptycho"]["files"]["arrays"]])
    viewers += [tomo_view, ptycho_view]
    print(f"viewers: tomography {tomo_address} | ptychography {ptycho_address} | "
          f"live {summary.get('live_viewer')} (Ctrl+C to stop)", file=sys.stderr, flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        for proc in viewers:
            stop_process(proc)


def _print_summary(summary: dict) -> None:
    stream, ptycho, tomo = summary["stream"], summary["ptycho"], summary["tomo"]
    lines = [
        "sparkmpi demo summary",
        f"  streaming:    {stream['frames']} frames in {stream['batches']} micro-batches, "
        f"{stream['frames_per_s']:.0f} frames/s, latency p50 {stream['latency_p50_s'] or 0:.2f} s "
        f"p99 {stream['latency_p99_s'] or 0:.2f} s, {stream['dead_letters']} dead letters",
        f"  ptychography: object NRMSE {ptycho['nrmse']:.4f} after {ptycho['iterations']} DM iterations "
        f"(by frames received, over the part scanned so far: "
        + ", ".join(f"{h['frames']}: {h['nrmse']:.3f} ({h['coverage']:.0%})" for h in ptycho["history"]) + ")",
        f"  tomography:   ART volume {tomo['size']}^3 RMSE {tomo['rmse']:.4f} in {tomo['seconds']:.1f} s",
        f"  total {summary['seconds']:.0f} s; results in {summary['out']}",
    ]
    print("\n".join(lines))


def _main(args) -> int:
    if getattr(args, "bluesky", False):
        from .bluesky.demo import print_bluesky_summary, run_bluesky_demo

        summary = run_bluesky_demo(args)
        if args.json:
            print(json.dumps(summary, default=float))
        else:
            print_bluesky_summary(summary)
        return 0
    summary = run_demo(args)
    if args.json:
        print(json.dumps(summary, default=float))
    else:
        _print_summary(summary)
    return 0
