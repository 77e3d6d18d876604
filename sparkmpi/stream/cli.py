"""``sparkmpi kafka fetch|start|stop|status`` and ``sparkmpi detector simulate``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from . import broker as _broker
from .driver_cli import register_noun as _register_stream
from ..errors import UsageError


def add_bootstrap_argument(parser: argparse.ArgumentParser) -> None:
    """The options every streaming command shares: ``--bootstrap`` and ``--data-dir``."""
    parser.add_argument("--bootstrap", metavar="HOST:PORT", default=None,
                        help="Kafka bootstrap address of your own cluster; default: the broker that "
                             "`sparkmpi kafka start` runs from --data-dir")
    parser.add_argument("--data-dir", default=str(_broker.DEFAULT_DATA_DIR),
                        help="data folder of the project's broker (default: %(default)s)")


def _emit(args, obj: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, sort_keys=True, default=str))
    else:
        print(text)
    sys.stdout.flush()


# ---------------------------------------------------------------- kafka

def _fetch(args) -> int:
    home = _broker.fetch_kafka(args.version, force=args.force, timeout=args.timeout)
    _emit(args, {"version": args.version, "home": str(home)}, f"Kafka {args.version} jars in {home / 'lib'}")
    return 0


def _start(args) -> int:
    info = _broker.start_broker(args.data_dir, args.port, version=args.version, heap=args.heap,
                                timeout=args.timeout, progress=sys.stderr, host=args.host)
    obj = asdict(info) | {"bootstrap": info.bootstrap, "log_file": str(info.log_file)}
    _emit(args, obj, f"Kafka {info.version} broker running at {info.bootstrap} (pid {info.pid}, "
                     f"data {info.data_dir}, log {info.log_file}; started in {info.start_seconds:.1f} s)")
    return 0


def _stop(args) -> int:
    stopped = _broker.stop_broker(args.data_dir, grace=args.grace)
    _emit(args, {"stopped": stopped, "data_dir": args.data_dir},
          "broker stopped" if stopped else f"no broker was running from {args.data_dir}")
    return 0


def _status(args) -> int:
    status = _broker.broker_status(args.data_dir, bootstrap=args.bootstrap, timeout=args.timeout)
    _emit(args, asdict(status), ("running: " if status.running else "not running: ") + status.detail)
    return 0 if status.running else 1


def _register_kafka(subparsers) -> None:
    parser = subparsers.add_parser("kafka", help="fetch, start, stop or check the project's local Kafka broker",
                                   description="A single-node Apache Kafka broker (KRaft) on 127.0.0.1, "
                                               "its jars fetched once from Maven Central.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    p = verbs.add_parser("fetch", help="download Kafka's jars into the cache (once)")
    p.add_argument("--version", default=_broker.DEFAULT_VERSION, help="Kafka version (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for Maven (default: %(default)s)")
    p.set_defaults(func=_fetch)

    p = verbs.add_parser("start", help="start a broker (on 127.0.0.1 unless --host) as a daemon")
    p.add_argument("--data-dir", default=str(_broker.DEFAULT_DATA_DIR),
                   help="configuration, logs and topic data (default: %(default)s)")
    p.add_argument("--port", type=int, default=_broker.DEFAULT_PORT,
                   help="client port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--host", default=_broker.HOST,
                   help="address to listen on and advertise, one other hosts reach (e.g. a testbed's bridge "
                        "address); default: %(default)s")
    p.add_argument("--version", default=_broker.DEFAULT_VERSION, help="Kafka version (default: %(default)s)")
    p.add_argument("--heap", default=_broker.DEFAULT_HEAP, help="JVM max heap (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the broker to answer (default: %(default)s)")
    p.set_defaults(func=_start)

    p = verbs.add_parser("stop", help="stop the broker started from --data-dir")
    p.add_argument("--data-dir", default=str(_broker.DEFAULT_DATA_DIR), help="(default: %(default)s)")
    p.add_argument("--grace", type=float, default=20.0,
                   help="seconds between SIGTERM and SIGKILL (default: %(default)s)")
    p.set_defaults(func=_stop)

    p = verbs.add_parser("status", help="is the broker running and answering? (exit 0 yes, 1 no)")
    add_bootstrap_argument(p)
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer (default: %(default)s)")
    p.set_defaults(func=_status)


# ---------------------------------------------------------------- detector

def _simulate(args) -> int:
    from .detector import NpzScan, SyntheticScan, parse_shape, publish_kafka, publish_zmq

    try:
        shape = parse_shape(args.frame_shape)
    except ValueError as exc:
        raise UsageError(f"--frame-shape: {exc}") from None
    if args.frames < 1:
        raise UsageError(f"--frames: expected >= 1, got {args.frames}")
    if args.rate is not None and args.rate <= 0:
        raise UsageError(f"--rate: expected frames/s > 0, got {args.rate}")
    if args.partitions < 1:
        raise UsageError(f"--partitions: expected >= 1, got {args.partitions}")
    if args.from_npz:
        source = NpzScan(args.from_npz, dtype=args.dtype, scan_id=args.scan_id)
    else:
        source = SyntheticScan(args.frames, shape, args.dtype, seed=args.seed, scan_id=args.scan_id or "scan-0")
    progress = None if args.json else sys.stderr
    if args.zmq:
        if args.bootstrap:
            raise UsageError("--zmq and --bootstrap exclude each other")
        print(f"sparkmpi: waiting for a ZeroMQ receiver at {args.zmq} ...", file=sys.stderr, flush=True)
        report = publish_zmq(source, args.zmq, rate=args.rate)
    else:
        bootstrap = _broker.resolve_bootstrap(args.bootstrap, args.data_dir)
        report = publish_kafka(source, bootstrap, args.topic, rate=args.rate, partitions=args.partitions,
                               timeout=args.timeout, progress=progress)
    obj = asdict(report)
    _emit(args, obj, f"sent {report.frames} frames ({report.bytes / 1e6:.1f} MB) to {report.target} in "
                     f"{report.seconds:.2f} s: {report.frames_per_s:.0f} frames/s, {report.megabytes_per_s:.1f} MB/s")
    return 0


def _register_detector(subparsers) -> None:
    parser = subparsers.add_parser("detector", help="simulate a detector streaming frames to Kafka or ZeroMQ")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    p = verbs.add_parser("simulate", help="publish a scan's frames at a given rate",
                         description="Publish synthetic frames (a moving Gaussian spot on a Poisson "
                                     "background) or an .npz scan to a Kafka topic or a ZeroMQ PUSH socket.")
    add_bootstrap_argument(p)
    p.add_argument("--zmq", metavar="ENDPOINT", default=None,
                   help="bind a ZeroMQ PUSH socket here (e.g. tcp://127.0.0.1:5555) instead of using Kafka")
    p.add_argument("--topic", default="frames", help="Kafka topic (default: %(default)s)")
    p.add_argument("--frames", type=int, default=1000, help="frames in the scan (default: %(default)s)")
    p.add_argument("--frame-shape", default="128x128", help="HxW (default: %(default)s)")
    p.add_argument("--dtype", default="uint16",
                   choices=["uint8", "uint16", "uint32", "int16", "int32", "float32", "float64"],
                   help="frame dtype (default: %(default)s)")
    p.add_argument("--rate", type=float, default=None, help="frames per second (default: as fast as possible)")
    p.add_argument("--partitions", type=int, default=1,
                   help="topic partitions; frame i goes to partition i mod P (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic frames (default: %(default)s)")
    p.add_argument("--scan-id", default=None, help="scan identifier in every header (default: scan-0 / file name)")
    p.add_argument("--from-npz", metavar="FILE", default=None,
                   help="send the 'intensities' (N, H, W) and 'positions' (N, 2) of this .npz instead")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds allowed for the broker check and final delivery (default: %(default)s)")
    p.set_defaults(func=_simulate)
    from .eiger.cli import register_verbs as _register_eiger

    _register_eiger(verbs, add_bootstrap_argument)


def register(subparsers) -> None:
    _register_kafka(subparsers)
    _register_detector(subparsers)
    _register_stream(subparsers)
