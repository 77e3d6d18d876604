"""``sparkmpi stream run``: the micro-batch driver on the command line.

``register_noun(subparsers)`` adds the ``stream`` noun; ``register_run(verbs)``
adds its ``run`` verb to an existing noun's verb subparsers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..errors import UsageError


def _spark(master: str, app: str):
    from ..launch.session import spark_session

    return spark_session(master, app, conf={"spark.ui.enabled": "false"})


def _run(args) -> int:
    from . import broker as _broker
    from .detector import parse_shape
    from .driver import StreamDriver, ZmqStreamDriver

    if args.ranks < 1:
        raise UsageError(f"--ranks: expected >= 1, got {args.ranks}")
    if not args.trigger >= 0:
        raise UsageError(f"--trigger: expected seconds >= 0, got {args.trigger}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames: expected >= 1, got {args.max_frames}")
    shape = None
    if args.frame_shape:
        try:
            shape = parse_shape(args.frame_shape)
        except ValueError as exc:
            raise UsageError(f"--frame-shape: {exc}") from None
    if args.zmq and args.bootstrap:
        raise UsageError("--zmq and --bootstrap exclude each other")
    if not args.zmq and not args.group:
        raise UsageError("--group is required with Kafka (the consumer group whose offsets are committed)")
    json_lines = None
    if args.json_lines == "-":
        json_lines = sys.stdout
    elif args.json_lines:
        json_lines = args.json_lines
    progress = None if args.quiet else sys.stderr
    common = dict(ranks=args.ranks, trigger=args.trigger, max_frames=args.max_frames, expect_shape=shape,
                  expect_dtype=args.dtype, batch_retries=args.batch_retries, job_timeout=args.job_timeout,
                  progress=progress, json_lines=json_lines, mode=args.mode, continuous=args.continuous)
    if args.zmq:
        spark = _spark(args.master or f"local[{args.ranks}]", "sparkmpi-stream-zmq")
        driver = ZmqStreamDriver(spark, args.zmq, args.out, receive_timeout=args.receive_timeout, **common)
        report = driver.run(max_batches=args.max_batches)
    else:
        bootstrap = _broker.resolve_bootstrap(args.bootstrap, args.data_dir)
        # fail fast (before starting Spark) when the broker is down
        from .kafka_client import check_broker

        check_broker(bootstrap, timeout=args.start_timeout)
        spark = _spark(args.master or f"local[{args.ranks}]", "sparkmpi-stream")
        driver_class = StreamDriver
        if args.eiger:
            from .eiger.driver import EigerStreamDriver as driver_class  # the same arguments
        driver = driver_class(spark, bootstrap, args.topic, args.group, args.out,
                              broker_retries=args.broker_retries, retry_backoff=args.retry_backoff,
                              start_timeout=args.start_timeout, topic_timeout=args.topic_timeout, **common)
        report = driver.run(until_end_of_scan=args.until_end_of_scan, idle_timeout=args.idle_timeout,
                            max_batches=args.max_batches)
    if args.json:
        print(json.dumps(asdict(report), sort_keys=True, default=str))
        sys.stdout.flush()
    return 0


def register_run(verbs) -> argparse.ArgumentParser:
    """Add ``run`` to the ``stream`` noun's verb subparsers."""
    from .cli import add_bootstrap_argument

    p = verbs.add_parser(
        "run", help="process a Kafka (or ZeroMQ) frame stream in micro-batches with an MPI job each",
        description="Cut the topic into micro-batches by offset ranges; each batch is one Spark RDD whose "
                    "tasks read their ranges, processed by one MPI job (per-frame intensity and centre of "
                    "mass, Allreduce'd sum image); outputs out/batch-NNNNNN.npz are written durably before "
                    "the offsets are committed, so a restart neither loses nor repeats frames.")
    add_bootstrap_argument(p)
    p.add_argument("--zmq", metavar="ENDPOINT", default=None,
                   help="receive from a ZeroMQ PUSH endpoint (e.g. tcp://127.0.0.1:5555) instead of Kafka "
                        "(weaker guarantee: frames in flight when the driver dies are lost)")
    p.add_argument("--topic", default="frames", help="Kafka topic (default: %(default)s)")
    p.add_argument("--eiger", action="store_true",
                   help="the topic holds an Eiger stream bridged by `sparkmpi detector bridge` (decoded in the ranks)")
    p.add_argument("--group", default=None, help="consumer group whose committed offsets mark progress")
    p.add_argument("--out", required=True, help="output folder (one per topic and group)")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks (default: %(default)s)")
    p.add_argument("--trigger", type=float, default=0.5,
                   help="seconds between batches (default: %(default)s)")
    p.add_argument("--mode", choices=("world", "jobs"), default="world",
                   help="world: one MPI world for the whole stream (default); jobs: one Spark-MPI job per batch")
    p.add_argument("--continuous", action="store_true",
                   help="start the next batch as soon as the previous one is written and frames are waiting "
                        "(same as --trigger 0)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="cap on messages per batch; a batch also starts as soon as this many are ready")
    p.add_argument("--until-end-of-scan", action="store_true",
                   help="stop once every partition's end-of-scan marker is processed")
    p.add_argument("--idle-timeout", type=float, default=None, help="stop after this many seconds without new frames")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--frame-shape", default=None, help="HxW; frames of another shape become dead letters")
    p.add_argument("--dtype", default=None, help="frames of another dtype become dead letters (e.g. uint16)")
    p.add_argument("--batch-retries", type=int, default=2,
                   help="runs of a failed batch's MPI job before giving up (default: %(default)s)")
    p.add_argument("--broker-retries", type=int, default=5,
                   help="retries when the broker is lost mid-stream (default: %(default)s)")
    p.add_argument("--retry-backoff", type=float, default=0.5,
                   help="first retry delay in seconds, doubling up to 5 s (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, default=5.0,
                   help="seconds to wait for the broker at start (default: %(default)s)")
    p.add_argument("--topic-timeout", type=float, default=30.0,
                   help="seconds to wait for the topic to exist (default: %(default)s)")
    p.add_argument("--receive-timeout", type=float, default=10.0,
                   help="ZeroMQ: seconds without any message before giving up (default: %(default)s)")
    p.add_argument("--job-timeout", type=float, default=300.0, help="seconds one batch's MPI job may take")
    p.add_argument("--master", default=None, help="Spark master (default: local[RANKS])")
    p.add_argument("--json-lines", metavar="FILE", default=None,
                   help="one JSON object per batch (and retries, end) to FILE ('-': stdout)")
    p.set_defaults(func=_run)
    return p


def register_noun(subparsers) -> None:
    """Add the ``stream`` noun with its ``run`` verb."""
    parser = subparsers.add_parser("stream", help="process detector frame streams (Kafka, ZeroMQ) with MPI jobs")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    register_run(verbs)
