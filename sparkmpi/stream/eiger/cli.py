"""``sparkmpi detector send|bridge|acquire|eiger-simulator``: the Eiger verbs of the detector noun."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from ...errors import UsageError


def _emit(args, obj: dict, text: str) -> None:
    print(json.dumps(obj, sort_keys=True, default=str) if args.json else text)
    sys.stdout.flush()


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def _send(args) -> int:
    from ..detector import NpzScan, SyntheticScan, parse_shape
    from .sender import SeriesPlan, send_series

    if args.frames < 1:
        raise UsageError(f"--frames: expected >= 1, got {args.frames}")
    if args.thresholds < 1:
        raise UsageError(f"--thresholds: expected >= 1, got {args.thresholds}")
    try:
        shape = parse_shape(args.frame_shape)
    except ValueError as exc:
        raise UsageError(f"--frame-shape: {exc}") from None
    if args.from_npz:
        source = NpzScan(args.from_npz, dtype=args.dtype, scan_id=args.scan_id)
    else:
        source = SyntheticScan(args.frames, shape, args.dtype, seed=args.seed, scan_id=args.scan_id or "scan-0")
    plan = SeriesPlan(series_id=args.series_id, compression=None if args.compression == "none" else args.compression,
                      channels=tuple(f"threshold_{i + 1}" for i in range(args.thresholds)), rate=args.rate)
    print(f"sparkmpi: Stream V2 detector at {args.bind}, waiting for a receiver ...", file=sys.stderr, flush=True)
    report = send_series(source, args.bind, plan, send_timeout=args.timeout,
                         progress=None if args.json or args.quiet else sys.stderr)
    _emit(args, asdict(report), f"sent series {args.series_id}: {report.frames} images ({report.bytes / 1e6:.1f} MB "
                                f"{args.compression}) from {report.target} in {report.seconds:.2f} s")
    return 0


def _bridge(args) -> int:
    from .. import broker as _broker
    from .bridge import run_bridge

    if args.partitions < 1:
        raise UsageError(f"--partitions: expected >= 1, got {args.partitions}")
    if args.series is not None and args.series < 1:
        raise UsageError(f"--series: expected >= 1, got {args.series}")
    bootstrap = _broker.resolve_bootstrap(args.bootstrap, args.data_dir)
    report = run_bridge(args.source, bootstrap, args.topic, partitions=args.partitions, end_timeout=args.end_timeout,
                        series=args.series, idle_timeout=args.idle_timeout, stream=args.stream,
                        progress=None if args.quiet else sys.stderr, json_lines=args.json_lines)
    _emit(args, report.to_json(), f"bridged {report.images} images of {len(report.series)} series from "
                                  f"{report.endpoint} to {args.topic} at {bootstrap} ({report.dead_letters} dead "
                                  f"letters, {report.seconds:.1f} s; stopped: {report.stopped})")
    return 0


def _acquire(args) -> int:
    from .rest import SimplonClient

    host, port = _host_port(args.rest, "--rest")
    client = SimplonClient(host, port, timeout=args.timeout)
    client.wait_until_reachable(args.timeout)
    client.configure(nimages=args.nimages, ntrigger=args.ntrigger, stream=args.stream,
                     compression=None if args.compression == "keep" else args.compression,
                     header_detail=args.header_detail, frame_time=args.frame_time)
    t0 = time.monotonic()
    series = client.acquire(ntrigger=args.ntrigger, timeout=args.acquire_timeout)
    obj = {"rest": f"{host}:{port}", "series": series, "nimages": args.nimages, "ntrigger": args.ntrigger,
           "stream": args.stream, "seconds": time.monotonic() - t0, "state": client.state()}
    _emit(args, obj, f"acquired {args.nimages * args.ntrigger} images (series {series}) on {host}:{port} in "
                     f"{obj['seconds']:.2f} s, streamed as {args.stream}")
    return 0


def _simulator(args) -> int:
    from .simulator import TickitEiger

    with TickitEiger(log_path=args.log) as sim:
        obj = {"rest": f"127.0.0.1:{sim.rest_port}", "stream_v1": sim.stream_v1, "stream_v2": sim.stream_v2,
               "pid": sim.proc.pid, "log": str(sim.log_path)}
        _emit(args, obj, f"tickit Eiger simulator: REST 127.0.0.1:{sim.rest_port}, Stream V2 {sim.stream_v2}, "
                         f"Stream V1 {sim.stream_v1} (Ctrl-C stops it)")
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        try:
            while deadline is None or time.monotonic() < deadline:
                if sim.proc.poll() is not None:
                    print(f"sparkmpi: the simulator exited with {sim.proc.returncode}: {sim.log_tail()}",
                          file=sys.stderr)
                    return 1
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return 0


def register_verbs(verbs, add_bootstrap_argument) -> None:
    p = verbs.add_parser("send", help="a Stream V2 detector: a series of compressed frames on a ZeroMQ PUSH socket",
                         description="Bind a PUSH socket and send one Stream V2 series (CBOR start, images, end), "
                                     "frames compressed as an Eiger does.")
    p.add_argument("--bind", default="tcp://127.0.0.1:31001", help="PUSH endpoint (default: %(default)s)")
    p.add_argument("--frames", type=int, default=100, help="images in the series (default: %(default)s)")
    p.add_argument("--frame-shape", default="512x512", help="HxW (default: %(default)s)")
    p.add_argument("--dtype", default="uint16", choices=["uint8", "uint16", "uint32", "float32"],
                   help="(default: %(default)s)")
    p.add_argument("--compression", default="bslz4", choices=["bslz4", "lz4", "none"], help="(default: %(default)s)")
    p.add_argument("--thresholds", type=int, default=1, help="channels per image (default: %(default)s)")
    p.add_argument("--series-id", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--rate", type=float, default=None, help="images per second (default: as fast as taken)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic frames (default: %(default)s)")
    p.add_argument("--scan-id", default=None, help="scan name in the start message")
    p.add_argument("--from-npz", metavar="FILE", default=None,
                   help="send this .npz scan ('intensities', 'positions'; e.g. `sparkmpi ptycho simulate`)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a send may wait for a receiver (default: %(default)s)")
    p.set_defaults(func=_send)

    p = verbs.add_parser("bridge", help="republish an Eiger's stream (V2 or V1) into Kafka, images still compressed",
                         description="Connect to a detector's PUSH socket and write its start, image and end "
                                     "messages to a Kafka topic (keys carry series and image ids; docs/stream.md).")
    add_bootstrap_argument(p)
    p.add_argument("--from", dest="source", required=True, metavar="tcp://HOST:PORT",
                   help="the detector's stream endpoint")
    p.add_argument("--topic", required=True, help="Kafka topic (created when missing)")
    p.add_argument("--stream", choices=["v2", "v1"], default="v2", help="the detector's interface (default: v2)")
    p.add_argument("--partitions", type=int, default=1, help="topic partitions (default: %(default)s)")
    p.add_argument("--series", type=int, default=None, help="stop after this many series")
    p.add_argument("--end-timeout", type=float, default=10.0,
                   help="seconds without a message before an open series is closed as incomplete "
                        "(default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="stop after this many seconds without a message and no open series")
    p.add_argument("--json-lines", metavar="FILE", default=None, help="one JSON object per bridge event")
    p.set_defaults(func=_bridge)

    p = verbs.add_parser("acquire", help="configure, arm, trigger a DECTRIS detector over its SIMPLON REST API",
                         description="Set nimages, ntrigger, stream interface and compression, then arm, trigger "
                                     "(internal triggers) and wait until the detector is idle again.")
    p.add_argument("--rest", required=True, metavar="HOST:PORT", help="the detector's SIMPLON REST address")
    p.add_argument("--nimages", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--ntrigger", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--stream", choices=["v2", "v1"], default="v2", help="(default: %(default)s)")
    p.add_argument("--compression", choices=["bslz4", "lz4", "keep"], default="keep",
                   help="detector compression (default: keep the detector's)")
    p.add_argument("--header-detail", choices=["none", "basic", "all"], default=None)
    p.add_argument("--frame-time", type=float, default=None, help="seconds per image")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per REST call (default: %(default)s)")
    p.add_argument("--acquire-timeout", type=float, default=120.0,
                   help="seconds until the detector is idle again (default: %(default)s)")
    p.set_defaults(func=_acquire)

    p = verbs.add_parser("eiger-simulator", help="run Diamond Light Source's tickit Eiger simulator",
                         description="Start tickit-devices' Eiger on 127.0.0.1 at free ports and print its REST "
                                     "and stream addresses; stops on Ctrl-C (or after --seconds).")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--log", default=None, help="the simulator's log file (default: a temporary file)")
    p.set_defaults(func=_simulator)
