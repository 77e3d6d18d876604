"""``sparkmpi exec``: the mpiexec of a Spark cluster (see :mod:`sparkmpi.launch.programs`)."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError

HELP = "run an MPI program (a script or a compiled code) as Spark barrier tasks, like mpiexec"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "exec", help=HELP, description=HELP + ". Everything after -- is the program and its arguments.",
        usage="sparkmpi exec -n N [options] -- PROGRAM [ARGS...]")
    parser.add_argument("-n", "--ranks", type=int, required=True, metavar="N", help="number of ranks (task slots)")
    parser.add_argument("--master", default="local[2]",
                        help="Spark master URL (default local[2]; local[N] needs N >= ranks)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="an environment variable for every rank (repeatable)")
    parser.add_argument("--cwd", metavar="DIR", help="working directory of the ranks on the executors")
    parser.add_argument("--files", default="", metavar="F,...",
                        help="comma-separated local files shipped to every executor (SparkContext.addFile); "
                             "without --cwd the ranks run in the executor's folder of them")
    parser.add_argument("--timeout", type=float, metavar="S", help="stop every rank after S seconds (exit 124)")
    parser.add_argument("--prefix-rank", action="store_true", help="prefix each output line with [rank]")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    parser.set_defaults(func=_run)


def parse_env(items) -> dict:
    env = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UsageError(f"--env expects NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def _run(args) -> int:
    from .. import _console
    from .programs import run_program
    from .session import spark_session

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("no program given: sparkmpi exec -n N -- PROGRAM [ARGS...]")
    if args.ranks < 1:
        raise UsageError(f"-n expects a positive number of ranks, got {args.ranks}")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout expects seconds > 0, got {args.timeout:g}")
    env = parse_env(args.env)
    files = [f for f in args.files.split(",") if f]
    from pyspark import SparkContext

    ours = SparkContext._active_spark_context is None  # a caller's session (tests call main()) stays up
    spark = spark_session(args.master, "sparkmpi-exec")
    try:
        stdin = sys.stdin.buffer if sys.stdin is not None else None  # to rank 0, as mpiexec does
        result = run_program(spark, command, ranks=args.ranks, env=env, cwd=args.cwd, files=files,
                             timeout=args.timeout, stdin=stdin, echo=True, prefix_rank=args.prefix_rank)
    finally:
        if ours:
            with _console.output_to_log(_console.log_file()):
                spark.stop()
    if result.returncode != 0:
        print(f"sparkmpi exec: {result.message}", file=sys.stderr)
    return result.returncode
