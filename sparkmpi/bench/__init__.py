"""Benchmarks behind ``sparkmpi bench NAME``.

Each module here defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> dict``; :mod:`sparkmpi.bench.cli` finds them at start-up.  A
benchmark measures the compared variants side by side in one run and reports
ratios, because the machines are shared and noisy.
"""
