"""``sparkmpi bench NAME ... [--json]``: registers every benchmark module."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys

import sparkmpi.bench as bench_pkg


def _benchmark_modules():
    for info in sorted(pkgutil.iter_modules(bench_pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "cli":
            continue
        module = importlib.import_module(f"sparkmpi.bench.{info.name}")
        if hasattr(module, "run") and hasattr(module, "add_arguments"):
            yield module


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, sort_keys=True))
        return
    width = max(len(k) for k in report) if report else 0
    for key in sorted(report):
        value = report[key]
        if isinstance(value, float):
            value = f"{value:.6g}"
        print(f"{key:<{width}}  {value}")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and print its figures")
    names = parser.add_subparsers(dest="benchmark", metavar="NAME")
    names.required = True
    for module in _benchmark_modules():
        sub = names.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)

        def _run(args, _module=module):
            report = _module.run(args)
            _print_report(report, args.json)
            sys.stdout.flush()
            return 0

        sub.set_defaults(func=_run)
