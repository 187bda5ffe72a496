"""The ``shmrunner`` command: a thin shell over the library.

``main(argv) -> int`` parses arguments, configures logging (the only place
that does) and returns one of the named exit codes below.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed
EXIT_USAGE = 2  # bad options or configuration (argparse uses 2 as well)


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(arrays=args.arrays, mib=args.mib, processes=args.processes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmrunner",
        description="Run Python functions in worker processes, numpy arrays in shared memory.",
    )
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level on stderr (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="map a function over large arrays with shmrunner.Pool and "
                     "multiprocessing.Pool and compare the times",
        description="Maps a function over large numpy arrays twice, with shmrunner.Pool and "
                    "with multiprocessing.Pool, checks both give the same results and prints "
                    "both times and their ratio.")
    demo.add_argument("--arrays", type=_positive_int, default=16,
                      help="how many arrays to map over (default: 16)")
    demo.add_argument("--mib", type=_positive_int, default=32,
                      help="size of each array in MiB (default: 32)")
    demo.add_argument("--processes", type=_positive_int, default=None,
                      help="worker processes (default: the CPU count)")
    demo.set_defaults(run=_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
