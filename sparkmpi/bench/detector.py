"""``sparkmpi bench detector``: Stream V2 sender -> bridge -> Kafka -> driver -> ranks that decompress and sum.

Starts a real Kafka broker in a temporary folder and the stream driver
(:class:`~sparkmpi.stream.eiger.driver.EigerStreamDriver`, world mode, in this
process, on ``local[RANKS]`` Spark); once its world is up, the bridge
(``sparkmpi detector bridge``) and the project's Stream V2 sender
(``sparkmpi detector send``) start as processes and one series of
``--frames`` synthetic frames (a spot on a Poisson background, as a
diffraction detector sees) streams through.  Run twice: frames compressed
``bslz4`` (the Eiger default), then uncompressed (``raw_`` keys).

Reported per run:

* ``frames_per_s``: frames / (last output written - start of the sender process);
  ``from_first_image_frames_per_s``: the same from the first image sent (no process start-up);
* ``decoded_mb_per_s``: decompressed megabytes / the same wall time;
* ``rank_decode_mb_per_s``: decompressed megabytes / seconds the ranks spent
  decompressing, summed over the ranks (what the ranks can decode when the
  rest keeps up), and ``one_core_decode_mb_per_s``: the same frames
  decompressed in this process on one core;
* ``p50_latency_s``, ``p99_latency_s``: output written - image sent, per frame;
* ``lost``, ``duplicated``: image ids sent but absent from the outputs, extra copies;
* ``sum_matches``: the ranks' summed image equals the sum of the frames sent;
* where the ranks' time goes: ``rank_read_s`` (Kafka fetch and CBOR parse),
  ``rank_decode_s``, ``rank_sum_s``, and the driver's ``job_s``/``write_s``/``commit_s``
  means per batch; ``compression_ratio``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import UsageError

NAME = "detector"
HELP = ("Eiger Stream V2 (bslz4 and raw) -> bridge -> Kafka -> ranks decoding and summing: frames/s, decoded MB/s, "
        "p99 latency, lost/duplicated")


def add_arguments(parser) -> None:
    parser.add_argument("--frames", type=int, default=300, help="images per series (default: %(default)s)")
    parser.add_argument("--frame-shape", default="1024x1024", help="HxW (default: %(default)s)")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks (default: %(default)s)")
    parser.add_argument("--trigger", type=float, default=0.2, help="seconds between batches (default: %(default)s)")
    parser.add_argument("--max-frames", type=int, default=100, help="images per batch at most (default: %(default)s)")
    parser.add_argument("--only", choices=["bslz4", "raw"], default=None, help="run one of the two series only")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run (default: %(default)s)")


def decode_and_sum(comm, frames, state=None) -> dict:
    """The ranks' work: take each decompressed frame, add it to an int64 sum; timings per rank."""
    from mpi4py import MPI

    total = None
    read_s = decode_s = sum_s = 0.0
    nbytes = count = 0
    it = iter(frames)
    while True:
        t0 = time.perf_counter()
        try:
            frame = next(it)
        except StopIteration:
            read_s += time.perf_counter() - t0
            break
        t1 = time.perf_counter()
        d = float(frame.header.extra.get("decode_s", 0.0))
        decode_s += d
        read_s += (t1 - t0) - d
        if total is None:
            total = np.zeros(frame.array.shape, np.int64)
        np.add(total, frame.array, out=total, casting="unsafe")
        sum_s += time.perf_counter() - t1
        nbytes += frame.array.nbytes
        count += 1
    shapes = [s for s in comm.allgather(None if total is None else total.shape) if s is not None]
    out = {"read_s": np.array([read_s]), "decode_s": np.array([decode_s]), "sum_s": np.array([sum_s]),
           "decoded_bytes": np.array([nbytes]), "frames": np.array([count])}
    if shapes:
        local = total if total is not None else np.zeros(shapes[0], np.int64)
        summed = np.empty(shapes[0], np.int64)
        comm.Allreduce(local, summed, op=MPI.SUM)
        if comm.rank == 0:
            out["sum_image"] = summed
    return out


def _one_core_decode(scan, compression: str | None, repeat: int = 20) -> tuple[float, float]:
    from ..stream.eiger import stream2

    messages = [stream2.decode_message(stream2.encode_image(1, i, scan.frame(i), compression=compression))
                for i in range(min(repeat, scan.count))]
    raw = sum(m.data["threshold_1"].nbytes for m in messages)
    packed = sum(len(m.data["threshold_1"].data) for m in messages)
    t0 = time.perf_counter()
    for m in messages:
        m.decode()
    return raw / (time.perf_counter() - t0) / 1e6, raw / packed


def _series(args, spark, bootstrap: str, work: Path, compression: str | None, shape, deadline: float) -> dict:
    from ..stream._output import list_outputs, read_outputs
    from ..stream.detector import SyntheticScan
    from ..stream.eiger.driver import EigerStreamDriver
    from ..stream.kafka_client import ensure_topic

    name = compression or "raw"
    topic, out = f"detector-{name}", work / f"out-{name}"
    ensure_topic(bootstrap, topic, 1)
    lines = work / f"driver-{name}.jsonl"
    driver = EigerStreamDriver(spark, bootstrap, topic, "bench", out, ranks=args.ranks, trigger=args.trigger,
                               max_frames=args.max_frames, process=decode_and_sum, progress=None,
                               json_lines=str(lines), read_timeout=120.0, job_timeout=300.0)
    result: dict = {}

    def drive():
        try:
            result["report"] = driver.run(until_end_of_scan=True)
        except BaseException as exc:  # noqa: BLE001  (re-raised below)
            result["error"] = exc

    thread = threading.Thread(target=drive, name="bench-detector-driver", daemon=True)
    thread.start()
    while not (lines.exists() and '"started"' in lines.read_text()):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise result.get("error") or UsageError("the driver did not start in time")
        time.sleep(0.1)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    py = [sys.executable, "-m", "sparkmpi.cli"]
    bridge = subprocess.Popen(py + ["detector", "bridge", "--from", endpoint, "--topic", topic, "--bootstrap",
                                    bootstrap, "--series", "1", "--end-timeout", "60", "-q", "--json"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_send = time.time()
    sender = subprocess.Popen(py + ["detector", "send", "--bind", endpoint, "--frames", str(args.frames),
                                    "--frame-shape", f"{shape[0]}x{shape[1]}", "--compression", name if compression
                                    else "none", "--series-id", "1", "-q", "--json"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said: dict = {}
    try:
        for proc, what in ((sender, "sender"), (bridge, "bridge")):
            text, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            if proc.returncode:
                raise UsageError(f"the {what} failed ({proc.returncode}): {err.strip()[-500:]}")
            said[what] = json.loads(text.strip().splitlines()[-1])
        thread.join(max(deadline - time.monotonic(), 1))
        if thread.is_alive():
            raise UsageError("the driver did not reach the end of the series in time")
    finally:
        for proc in (sender, bridge):
            if proc.poll() is None:
                from .._proc import stop_process

                stop_process(proc, grace=5)
    if "error" in result:
        raise result["error"]
    summary = read_outputs(out)
    lost, duplicated = summary.lost_and_duplicated(np.arange(args.frames))
    totals = {k: 0.0 for k in ("read_s", "decode_s", "sum_s", "decoded_bytes")}
    total_image = None
    phases = {"job_s": [], "write_s": [], "commit_s": []}
    for _, path in list_outputs(out):
        with np.load(path) as z:
            for k in totals:
                if f"result.{k}" in z.files:
                    totals[k] += float(z[f"result.{k}"].sum())
            if "result.sum_image" in z.files:
                total_image = z["result.sum_image"] if total_image is None else total_image + z["result.sum_image"]
    for line in lines.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "batch":
            for k in phases:
                phases[k].append(event[k])
    scan = SyntheticScan(args.frames, shape, "uint16", seed=0)
    expected = np.zeros(shape, np.int64)
    for _, _, f in scan:
        expected += f
    wall = max(summary.last_written - t_send, 1e-9) if summary.last_written else float("nan")
    lat = summary.latencies
    mb = totals["decoded_bytes"] / 1e6
    one_core, ratio = _one_core_decode(scan, compression)
    return {
        "frames": int(summary.frame_index.size), "frames_per_s": summary.frame_index.size / wall,
        "from_first_image_frames_per_s": summary.frame_index.size / max(summary.last_written
                                                                        - float(summary.frame_ts.min()), 1e-9),
        "decoded_mb_per_s": mb / wall,
        "rank_decode_mb_per_s": (mb / totals["decode_s"] * args.ranks) if totals["decode_s"] else None,
        "one_core_decode_mb_per_s": one_core, "compression_ratio": ratio,
        "p50_latency_s": float(np.percentile(lat, 50)), "p99_latency_s": float(np.percentile(lat, 99)),
        "lost": lost, "duplicated": duplicated,
        "sum_matches": bool(total_image is not None and np.array_equal(total_image, expected)),
        "rank_read_s": totals["read_s"], "rank_decode_s": totals["decode_s"], "rank_sum_s": totals["sum_s"],
        "batches": len(phases["job_s"]), "wall_s": wall,
        "sender_frames_per_s": said["sender"]["frames_per_s"], "sender_mb_per_s": said["sender"]["megabytes_per_s"],
        "bridge_images": said["bridge"]["images"], "bridge_dead_letters": said["bridge"]["dead_letters"],
        **{f"mean_{k}": float(np.mean(v)) if v else None for k, v in phases.items()},
    }


def _free_port() -> int:
    from .._proc import free_port

    return free_port()


def run(args) -> dict:
    from ..launch.session import spark_session
    from ..stream.broker import fetch_kafka, start_broker, stop_broker
    from ..stream.detector import parse_shape

    shape = parse_shape(args.frame_shape)
    if args.frames < 1:
        raise UsageError(f"--frames: expected >= 1, got {args.frames}")
    if args.ranks < 1:
        raise UsageError(f"--ranks: expected >= 1, got {args.ranks}")
    deadline = time.monotonic() + args.timeout
    fetch_kafka()
    with tempfile.TemporaryDirectory(prefix="sparkmpi-bench-detector-") as tmp:
        work = Path(tmp)
        print(f"starting a Kafka broker in {work / 'kafka'} ...", file=sys.stderr)
        info = start_broker(work / "kafka", 0, timeout=90, die_with_parent=True, heap="1g")
        spark = spark_session(f"local[{args.ranks}]", "sparkmpi-bench-detector", conf={"spark.ui.enabled": "false"})
        try:
            report: dict = {"frame_shape": f"{shape[0]}x{shape[1]}", "dtype": "uint16", "ranks": args.ranks,
                            "frames_sent": args.frames}
            for compression, prefix in (("bslz4", ""), (None, "raw_")):
                if args.only and args.only != (compression or "raw"):
                    continue
                print(f"series: {args.frames} frames {compression or 'uncompressed'} ...", file=sys.stderr)
                for k, v in _series(args, spark, info.bootstrap, work, compression, shape, deadline).items():
                    report[prefix + k] = v
            if "frames_per_s" in report and "raw_frames_per_s" in report:
                report["bslz4_over_raw_frames_per_s"] = report["frames_per_s"] / report["raw_frames_per_s"]
            report["target_decode_mb_per_s"] = 1000.0
            return report
        finally:
            spark.stop()
            stop_broker(work / "kafka", grace=15)
