"""`fastload bench ...`: the benchmark (python -m fastload.bench), whose own parser takes every argument."""

from __future__ import annotations

import argparse

from fastload.cli.output import EXIT_USAGE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench_args", nargs=argparse.REMAINDER,
                        help="arguments for the benchmark (see `fastload bench --help`)")


def run_argv(argv: list[str]) -> int:
    """Run the benchmark's own command line; its --help (0) and usage errors (2) are exit codes, not exits."""
    from fastload.bench.driver import main as bench_main

    try:
        return bench_main(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    return run_argv(list(args.bench_args))
