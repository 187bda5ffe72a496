"""The ``shmrunner`` command: a thin shell over the library.

``main(argv) -> int`` parses arguments, configures logging (the only place
that does) and returns one of the named exit codes below.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from . import _config_checks as checks
from .errors import ConfigError, ShmrunnerError

__all__ = ["main", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed
EXIT_USAGE = 2  # bad options or configuration (argparse uses 2 as well)


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(arrays=args.arrays, mib=args.mib, processes=args.processes)


def _worker(args: argparse.Namespace) -> int:
    from .config import resolve, with_overrides
    from .worker.remote import run_agent

    settings = resolve(args.config, sections=("worker",), sets=args.set or ()).worker
    # The command's own options are the last word, as --set is.
    overrides = {key: value for key, value in (
        ("connect", args.connect), ("processes", args.processes), ("name", args.name),
        ("memory_limit", args.memory_limit))
        if value is not None}
    if args.allow_pickle:
        overrides["allow_pickle"] = True
    if args.slots:
        overrides["slots"] = True
    settings = with_overrides(settings, overrides, "worker")
    if settings.connect is None:  # the same-host daemon's default socket
        from ._endpoints import client_address

        settings = with_overrides(settings, {"connect": client_address(None, "workers")},
                                  "worker")
    return run_agent(settings)


def _daemon(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ._gcpolicy import tune_for_service
    from .config import resolve
    from .daemon import Daemon

    # The handlers come before the daemon starts (its journal, its local
    # workers): a SIGTERM or Ctrl-C meanwhile asks for the drain it gets once
    # up (exit 0), instead of killing it half-built; a KeyboardInterrupt while
    # its workers started left them running and the exit waiting for them forever.
    requested = threading.Event()
    daemon: Daemon | None = None

    def on_signal(*_: object) -> None:
        requested.set()
        if daemon is not None:
            daemon.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    settings = resolve(args.config, sections=("daemon", "scheduler"), sets=args.set or ())
    daemon_settings, scheduler_settings = settings.daemon, settings.scheduler
    logging.getLogger().setLevel(args.log_level or daemon_settings.log_level)
    daemon = Daemon(daemon_settings, scheduler_settings)
    if requested.is_set():  # a signal came while it started
        daemon.stop()
    tune_for_service()  # this process is the daemon's own: its collector, tuned (_gcpolicy)
    print(f"shmrunner daemon: clients on {daemon.address}, workers on "
          f"{daemon.workers_address}", file=sys.stderr, flush=True)
    return daemon.run()


def _status(args: argparse.Namespace) -> int:
    from .client import Client

    if args.watch is None and args.count is not None:
        raise ConfigError("--count N is how many --watch refreshes to show: give "
                          "--watch SECONDS too")

    client = Client(args.connect, ack_timeout=args.timeout,
                    curve_secret_key=args.curve_secret_key,
                    curve_server_key=args.curve_server_key)
    try:
        if args.watch is None:
            _show_status(client.status(timeout=args.timeout), args.json)
            return EXIT_OK
        # One table per --watch seconds, redrawn in place on a terminal.
        clear = sys.stdout.isatty() and not args.json
        shown = 0
        try:
            while args.count is None or shown < args.count:
                status = client.status(timeout=args.timeout)
                if clear:
                    print("\x1b[H\x1b[2J", end="")
                elif shown:
                    print()
                _show_status(status, args.json)
                sys.stdout.flush()
                shown += 1
                if args.count is None or shown < args.count:
                    time.sleep(args.watch)  # the refresh period: nothing to wait for
        except KeyboardInterrupt:
            pass
        return EXIT_OK
    finally:
        client.shutdown(wait=False)


def _jobs(args: argparse.Namespace) -> int:
    import json

    from .client import Client
    from .transport._schema import MAX_JOB_IDS, MAX_JOBS_LIMIT

    if args.limit > MAX_JOBS_LIMIT:
        raise ConfigError(f"--limit {args.limit}: at most {MAX_JOBS_LIMIT}")
    ids = _job_ids(args.job_ids, MAX_JOB_IDS)
    if args.log is not None:
        _job_ids([args.log], 1)
        if ids:
            raise ConfigError(f"--log {args.log} shows one job's log: give no other job id "
                              f"(or drop --log to list jobs {' '.join(ids)})")
    client = Client(args.connect, ack_timeout=args.timeout,
                    curve_secret_key=args.curve_secret_key,
                    curve_server_key=args.curve_server_key)
    try:
        if args.log is not None:
            sys.stdout.write(client.job_log(args.log, timeout=args.timeout))
            return EXIT_OK
        jobs = (client.jobs(job_ids=ids, timeout=args.timeout) if ids
                else client.jobs(limit=args.limit, timeout=args.timeout))
    finally:
        client.shutdown(wait=False)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return EXIT_OK
    print(f"{'JOB':<34} {'STATE':<10} {'ATTEMPTS':<8} {'WORKER':<24} FINISHED")
    for job in jobs:
        finished = job.get("finished")
        when = "-" if finished is None else time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(finished))
        attempts = job.get("attempts")
        print(f"{job['job_id']:<34} {job['state']:<10} "
              f"{'-' if attempts is None else attempts!s:<8} {job.get('worker') or '-':<24} "
              f"{when}")
    return EXIT_OK


def _job_ids(ids: list[str], most: int) -> list[str]:
    from ._jobid import job_id_problem

    if len(ids) > most:
        raise ConfigError(f"{len(ids)} job ids: at most {most} at once")
    for job_id in ids:
        problem = job_id_problem(job_id)
        if problem is not None:
            raise ConfigError(problem)
    return ids


def _cancel(args: argparse.Namespace) -> int:
    from .client import Client
    from .transport._schema import MAX_JOB_IDS

    ids = _job_ids(args.job_ids, MAX_JOB_IDS)
    client = Client(args.connect, ack_timeout=args.timeout,
                    curve_secret_key=args.curve_secret_key,
                    curve_server_key=args.curve_server_key)
    failed = False
    try:
        for job_id in ids:
            state = client.cancel(job_id, timeout=args.timeout)
            print(f"{job_id} {state}")
            failed = failed or state != "cancelled"
    finally:
        client.shutdown(wait=False)
    return EXIT_FAILURE if failed else EXIT_OK


def _show_status(status: dict[str, Any], as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(status, indent=2))
        return
    print(f"uptime {status['uptime']:.0f} s   local workers {status['local_workers']}   "
          f"queued {status['queued']}   running {status['running']}   done {status['done']}   "
          f"failed {status['failed']}   cancelled {status.get('cancelled', 0)}   "
          f"rejected messages {status['rejected']}"
          + ("   (draining)" if status.get("draining") else ""))
    workers = status["workers"]
    print(f"{len(workers)} remote worker(s)")
    if workers:
        print(f"  {'name':<24} {'host':<16} {'capacity':>8} {'busy':>5} {'heartbeat':>10}")
        for w in workers:
            print(f"  {w['name']:<24} {w['host']:<16} {w['capacity']:>8} {w['busy']:>5} "
                  f"{w['last_heartbeat']:>8.1f} s")


def _keygen(args: argparse.Namespace) -> int:
    from .transport.curve import write_key_pair

    try:
        public, secret = write_key_pair(args.directory, args.name, force=args.force)
    except OSError as exc:
        print(f"shmrunner keygen: cannot write keys into {args.directory}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """Options every command takes, before or after its name. After it, their
    default is SUPPRESS: a command's parser must not overwrite what was given
    before the command's name."""
    from . import __version__

    parser.add_argument("--version", action="version", version=f"shmrunner {__version__}",
                        help="print the version and exit")
    parser.add_argument("--log-level", default=default,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level on stderr (default: WARNING; the daemon: "
                             "daemon.log_level)")


def _set_option(parser: argparse.ArgumentParser, sections: str, example: str) -> None:
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append",
                        help=f"override one setting of the {sections} section(s), e.g. --set "
                             f"{example} (repeatable; VALUE is read as YAML; wins over "
                             "--config and SHMRUNNER_<SECTION>__<KEY> variables)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shmrunner",
        description="Run Python functions in worker processes, numpy arrays in shared memory.",
        epilog="Settings: defaults < --config FILE < SHMRUNNER_<SECTION>__<KEY> environment "
               "variables < --set SECTION.KEY=VALUE (see README.md, Configuration).",
    )
    _global_options(parser, None)
    common = _Parser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    daemon_client = _Parser(add_help=False)  # the commands that ask a running daemon
    daemon_client.add_argument("--connect", metavar="ADDR", type=_address, default=None,
                               help="the daemon's client address (default: the same-host "
                                    "daemon's ipc socket)")
    daemon_client.add_argument("--curve-secret-key", metavar="FILE", default=None,
                               help="this client's CURVE .key_secret file (with "
                                    "--curve-server-key)")
    daemon_client.add_argument("--curve-server-key", metavar="FILE", default=None,
                               help="the daemon's CURVE public .key file")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    demo = commands.add_parser(
        "demo", parents=[common],
        help="map a function over large arrays with shmrunner.Pool and "
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
        "worker", parents=[common],
        help="run a remote worker agent that connects to a scheduler",
        description="Connects to a scheduler (or daemon), advertises --processes slots and "
                    "runs the tasks it is sent on this host's shared-memory pool. Reconnects "
                    "by itself; SIGTERM finishes the tasks it holds, then exits 0.")
    worker.add_argument("--connect", metavar="ADDR",
                        help="the scheduler's address, e.g. tcp://10.0.0.1:5561 (default: "
                             "worker.connect, else the same-host daemon's ipc socket)")
    worker.add_argument("--processes", type=_positive_int, default=None,
                        help="worker processes on this host (default: the CPU count)")
    worker.add_argument("--name", default=None,
                        help="how the scheduler lists this worker (default: host-pid)")
    worker.add_argument("--config", metavar="FILE", default=None,
                        help="YAML settings file (its worker: section)")
    worker.add_argument("--memory-limit", metavar="SIZE", type=_memory_limit, default=None,
                        help="private memory each worker process may use before it is killed "
                             "and replaced (its task fails with MemoryLimitError): bytes, "
                             "512MiB, 2GB, or a fraction of this host's memory: 0.5, 50%% "
                             "(default: worker.memory_limit, else none)")
    worker.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled functions and arguments (trusted networks only)")
    worker.add_argument("--slots", action="store_true",
                        help="each worker process talks to the scheduler itself, this agent "
                             "only supervises them: fewer hops per task (worker.slots)")
    _set_option(worker, "worker", "worker.join_timeout=120")
    worker.set_defaults(run=_worker)

    daemon = commands.add_parser(
        "daemon", parents=[common],
        help="run the runner daemon (scheduler, journal, client and worker endpoints)",
        description="Runs a long-lived scheduler: local shared-memory workers, remote workers "
                    "on daemon.workers, clients on daemon.clients, accepted jobs journaled in "
                    "SQLite. Without --config it uses an embedded default: ipc sockets in a "
                    "private directory (only this user can connect), local workers = CPU "
                    "count. A tcp:// endpoint needs CURVE keys or "
                    "daemon.allow_unauthenticated. SIGTERM/SIGINT drain and exit 0.")
    daemon.add_argument("--config", metavar="FILE", default=None,
                        help="YAML settings file (daemon: and scheduler: sections)")
    _set_option(daemon, "daemon and scheduler", "scheduler.local_workers=2")
    daemon.set_defaults(run=_daemon)

    status = commands.add_parser(
        "status", parents=[common, daemon_client],
        help="show a daemon's workers, queue depth, running, done and failed jobs",
        description="Asks the daemon at --connect (default: this user's daemon on this "
                    "host) for its status and prints it.")
    status.add_argument("--timeout", type=_positive_float, default=5.0,
                        help="seconds to wait for an answer (default: 5)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--watch", type=_positive_float, metavar="SECONDS", default=None,
                        help="refresh the status every SECONDS (in place on a terminal) "
                             "until Ctrl-C")
    status.add_argument("--count", type=_positive_int, metavar="N", default=None,
                        help="with --watch: stop after N refreshes")
    status.set_defaults(run=_status)

    jobs = commands.add_parser(
        "jobs", parents=[common, daemon_client],
        help="list a daemon's recent jobs (id, state, attempts, worker, finished time)",
        description="Asks the daemon at --connect (default: this user's daemon on this "
                    "host) for its most recently accepted jobs, newest first: queued, "
                    "running, done, failed or cancelled (finished results are kept for "
                    "daemon.result_ttl).")
    jobs.add_argument("--limit", type=_positive_int, metavar="N", default=20,
                      help="how many jobs, 1 to 1000 (default: 20)")
    jobs.add_argument("--timeout", type=_positive_float, default=5.0,
                      help="seconds to wait for an answer (default: 5)")
    jobs.add_argument("--json", action="store_true", help="print the jobs as JSON")
    jobs.add_argument("--log", metavar="JOB_ID", default=None,
                      help="print what that job's task logged and printed instead (kept "
                           "in memory by the daemon for its recent jobs, bounded)")
    jobs.add_argument("job_ids", nargs="*", metavar="ID",
                      help="show these jobs (up to 256) instead of the most recent ones")
    jobs.set_defaults(run=_jobs)

    cancel = commands.add_parser(
        "cancel", parents=[common, daemon_client],
        help="cancel jobs by id, queued or running",
        description="Asks the daemon at --connect to cancel each job: a queued one never "
                    "runs, a running one is stopped on its worker (its process is killed "
                    "and replaced); either way it is not retried nor run again after a "
                    "restart. Prints each id and its state afterwards; exits 1 when a job "
                    "could not be cancelled (it had finished, or is unknown).")
    cancel.add_argument("job_ids", nargs="+", metavar="ID", help="the jobs (up to 256)")
    cancel.add_argument("--timeout", type=_positive_float, default=5.0,
                        help="seconds to wait for each answer (default: 5)")
    cancel.set_defaults(run=_cancel)

    keygen = commands.add_parser(
        "keygen", parents=[common],
        help="write a CURVE key pair for a daemon, worker or client",
        description="Writes NAME.key (public: give it to the other side) and NAME.key_secret "
                    "(private, mode 0600) into DIRECTORY (created 0700; never a symlink or "
                    "a directory others can write). Put clients' public keys in "
                    "daemon.curve_authorized_clients and workers' in "
                    "daemon.curve_authorized_workers.")
    keygen.add_argument("directory", help="where to write the key files")
    keygen.add_argument("--name", default="shmrunner", help="file name stem (default: shmrunner)")
    keygen.add_argument("--force", action="store_true",
                        help="replace existing key files (atomically; default: refuse)")
    keygen.set_defaults(run=_keygen)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _memory_limit(text: str) -> int | float | str:
    from ._memsize import EXPECTED, problem

    value: int | float | str = text
    for number in (int, float):
        try:
            value = number(text)
            break
        except ValueError:
            pass
    if problem(value) is not None:
        raise argparse.ArgumentTypeError(f"expected {EXPECTED}, got {text!r}")
    return value


def _address(text: str) -> str:
    # Checked here, as worker.connect is: ZeroMQ's own refusal came at connect
    # time, as a failure (exit 1) instead of a usage error.
    problem = checks.address(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"expected {problem}, got {text!r}")
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    problem = checks.seconds(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text} is not {problem}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level or "WARNING", stream=sys.stderr,
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
