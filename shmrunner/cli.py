"""The ``shmrunner`` command: a thin shell over the library.

``main(argv) -> int`` parses arguments, configures logging (the only place
that does) and returns one of the named exit codes below.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .errors import ConfigError, ShmrunnerError

__all__ = ["main", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed
EXIT_USAGE = 2  # bad options or configuration (argparse uses 2 as well)


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(arrays=args.arrays, mib=args.mib, processes=args.processes)


def _worker(args: argparse.Namespace) -> int:
    from .config import WorkerSettings, load, with_overrides
    from .worker.remote import run_agent

    settings = load(args.config).worker if args.config else WorkerSettings()
    overrides = {key: value for key, value in (
        ("connect", args.connect), ("processes", args.processes), ("name", args.name))
        if value is not None}
    if args.allow_pickle:
        overrides["allow_pickle"] = True
    settings = with_overrides(settings, overrides, "worker")
    if settings.connect is None:
        raise ConfigError("worker.connect: missing; pass --connect tcp://HOST:PORT "
                          "or set worker.connect in the config file")
    return run_agent(settings)


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

    worker = commands.add_parser(
        "worker", help="run a remote worker agent that connects to a scheduler",
        description="Connects to a scheduler (or daemon), advertises --processes slots and "
                    "runs the tasks it is sent on this host's shared-memory pool. Reconnects "
                    "by itself; SIGTERM finishes the tasks it holds, then exits 0.")
    worker.add_argument("--connect", metavar="ADDR",
                        help="the scheduler's address, e.g. tcp://127.0.0.1:5560")
    worker.add_argument("--processes", type=_positive_int, default=None,
                        help="worker processes on this host (default: the CPU count)")
    worker.add_argument("--name", default=None,
                        help="how the scheduler lists this worker (default: host-pid)")
    worker.add_argument("--config", metavar="FILE", default=None,
                        help="YAML settings file (its worker: section)")
    worker.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled functions and arguments (trusted networks only)")
    worker.set_defaults(run=_worker)
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
    except ConfigError as exc:
        print(f"shmrunner {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ShmrunnerError as exc:
        print(f"shmrunner {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
