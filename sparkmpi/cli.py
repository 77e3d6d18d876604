"""The ``sparkmpi`` command: ``sparkmpi <noun> <verb> [options]``.

A thin argparse layer over library calls.  Each noun lives in its own module
and registers itself through ``register(subparsers)``; benchmarks are modules
of :mod:`sparkmpi.bench` found at start-up.  Machine-readable output goes to
stdout (``--json``), progress to stderr.  Exit codes: 0 ok, 1 failure, 2 usage.
Errors of sparkmpi (:class:`~sparkmpi.errors.SparkMPIError`) print as one
line unless ``--verbose`` is given; any other exception is a bug and shows
its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from . import _console
from .config import setting
from .errors import SparkMPIError, UsageError

# Modules that add a noun to the command line; a missing module is skipped so
# the CLI works while sub-packages are being built.
NOUN_MODULES = (
    "sparkmpi.bench.cli",
    "sparkmpi.ptycho.cli",
    "sparkmpi.tomo.cli",
    "sparkmpi.stream.cli",
    "sparkmpi.viz.cli",
    "sparkmpi.demo",
    "sparkmpi.launch.testbed",
    "sparkmpi.launch.exec_cli",
)


def _add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    # Below the top level the defaults are SUPPRESS, so a sub-command does not
    # overwrite a value given before it (``sparkmpi --json demo``).
    def default(value):
        return value if top else argparse.SUPPRESS

    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="show full tracebacks, and every log line on the terminal")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="no progress on stderr (errors still show)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the result as one JSON object on stdout")
    parser.add_argument("--log-file", metavar="PATH", default=default(None),
                        help="where Spark's, the JVM's and Kafka's messages go (default: a new file "
                             "under the temporary folder; its path is printed)")


def _sub_parsers(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse offers no public walk over sub-commands
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield sub
                yield from _sub_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparkmpi",
        description="Run mpi4py programs across Spark tasks; reconstruction and streaming pipelines.",
    )
    _add_global_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="noun", metavar="COMMAND")
    subparsers.required = True
    for name in NOUN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    for sub in _sub_parsers(parser):
        _add_global_options(sub, top=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:   # an argument's own type check (argparse turns only ValueError into usage)
        parser.print_usage(sys.stderr)
        print(f"sparkmpi: error: {exc}", file=sys.stderr)
        return 2
    verbose = args.verbose or setting("verbose")
    _console.setup(args.noun, verbose=verbose, quiet=args.quiet, path=args.log_file)
    try:
        result = args.func(args)
        return int(result or 0)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"sparkmpi: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparkmpi: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (shown as a user error or as a bug, never swallowed)
        if not is_user_error(exc):
            traceback.print_exc()
            print(f"sparkmpi: this is a bug in sparkmpi ({type(exc).__name__} above); please report it "
                  f"with the traceback", file=sys.stderr)
            return 1
        if verbose:
            traceback.print_exc()
        print(f"sparkmpi: error: {exc}", file=sys.stderr)
        log = _console.log_file_if_written()
        if log is not None:
            print(f"sparkmpi: the log of Spark, the JVM and Kafka: {log}", file=sys.stderr)
        return 1


def is_user_error(exc: BaseException) -> bool:
    """True for errors that are the user's to fix, shown as one line.

    sparkmpi's own errors, and a file the user named that cannot be opened
    (an ``OSError`` carrying a file name).  Anything else is a bug.
    """
    return isinstance(exc, SparkMPIError) or (isinstance(exc, OSError) and exc.filename is not None)


if __name__ == "__main__":
    sys.exit(main())
