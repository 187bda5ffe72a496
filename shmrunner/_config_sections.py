"""The schema: one frozen keyword-only dataclass per section of the settings.

``scheduler`` (:class:`SchedulerSettings`), ``worker`` (:class:`WorkerSettings`)
and ``daemon`` (:class:`DaemonSettings`), gathered in :class:`Settings`. Each
field carries its default, its validator and its doc (``_config_checks.py``);
building a section validates every field, then the rules across keys
(heartbeats, CURVE files, allowed functions vs. pickle). :func:`check_keys` is
the one unknown-key check that the file, ``with_overrides``, the environment
and ``--set`` all go through. Also here: where the daemon's files and sockets
live by default (read from the environment when asked, never at import).
Users import all of it from :mod:`shmrunner.config`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from . import _config_checks as checks
from ._config_checks import setting, validate
from .errors import ConfigError

__all__ = ["DaemonSettings", "SchedulerSettings", "WorkerSettings", "Settings", "SECTIONS",
           "check_keys", "section_class", "describe", "default_address", "runtime_dir",
           "state_dir"]


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    """Where tasks run and how they are retried, timed and guarded."""

    local_workers: int | None = setting(
        None, checks.optional_count,
        "local shared-memory worker processes (null: CPU count, 0: none)")
    listen: str | None = setting(
        None, checks.optional_address, "address remote workers connect to (null: local only)")
    retries: int = setting(
        0, checks.count, "default times a task is retried when its worker is lost, it times "
                         "out, or it raises one of retry_on")
    timeout: float | None = setting(
        None, checks.optional_seconds, "default seconds a task may run before it is stopped")
    retry_on: tuple[str, ...] = setting(
        (), checks.exception_names, "exception classes a task is retried on while its retries "
        "allow (as Celery's autoretry_for): 'module:qualname' names, or a builtin's bare name; "
        "a raised exception matches when its class or a base has one of these names")
    retry_backoff: float = setting(
        0.0, checks.optional_backoff, "seconds before a task's first retry, doubled for each "
                                      "further retry (0: retry at once)")
    retry_backoff_max: float = setting(
        60.0, checks.seconds, "most seconds between retries (the cap of the doubling)")
    heartbeat_interval: float = setting(1.0, checks.seconds, "seconds between heartbeats")
    heartbeat_timeout: float = setting(
        5.0, checks.seconds, "seconds of silence after which a remote worker is declared lost")
    allow_pickle: bool = setting(
        False, checks.flag, "accept pickled functions and arguments (anyone who can send them "
                            "can run code: enable only on trusted networks)")
    shm_threshold: int = setting(
        64 * 1024, checks.count, "bytes from which plain arrays go through shared memory")
    max_pending: int = setting(
        100_000, checks.positive, "tasks queued before submit() blocks (backpressure)")
    max_pending_bytes: int | None = setting(
        None, checks.check(lambda v: v is None or (checks.is_int(v) and v >= 1),
                           "a whole number of bytes >= 1, or null for a quarter of the available "
                           "memory"),
        "bytes of array and bytes arguments held by queued and running tasks before "
        "submit() blocks (null: a quarter of the memory available at start)")
    max_message_bytes: int = setting(
        1 << 31, checks.positive, "largest message accepted from the network, in bytes")
    prefetch: int = setting(1, checks.prefetch, "tasks sent to a remote worker beyond its capacity")
    start_method: str | None = setting(
        None, checks.start_method, "how local workers start (default: multiprocessing's)")
    memory_limit: int | float | str | None = setting(
        None, checks.memory_limit, "private memory each local worker process may use before "
        "it is killed and replaced, its task failing with MemoryLimitError (retried as a lost "
        "worker): bytes, a size such as '512MiB' or '2GB', or a fraction of this host's memory "
        "such as 0.5 or '50%' (null: no limit)")
    allowed_functions: tuple[str, ...] | None = setting(
        None, checks.patterns, "functions the daemon runs for its clients: 'module' or "
                               "'module:qualname' patterns, * wildcards (null: any importable "
                               "function, safe only because only authenticated peers reach you)")
    task_logs: str | bool = setting(
        "INFO", checks.task_logs, "what tasks log and print reaches the caller as logging "
        "records on the logger shmrunner.task, from this level up (print: INFO, stderr: "
        "WARNING); off: nothing is captured or sent")
    task_log_bytes: int = setting(
        64 * 1024, checks.task_log_bytes, "characters of one task's log kept (at most 1 MiB); the "
        "rest is dropped and a '[... N characters truncated]' record says so")

    def __post_init__(self) -> None:
        validate(self, "scheduler")
        _freeze_patterns(self, "scheduler")
        # A tuple: settings stay hashable and immutable.
        object.__setattr__(self, "retry_on", tuple(self.retry_on))
        if self.retry_backoff > self.retry_backoff_max:
            raise ConfigError(
                f"scheduler.retry_backoff ({self.retry_backoff}) must not be larger than "
                f"scheduler.retry_backoff_max ({self.retry_backoff_max}); raise the cap or "
                "lower the first backoff")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"scheduler.heartbeat_timeout ({self.heartbeat_timeout}) must be larger than "
                f"scheduler.heartbeat_interval ({self.heartbeat_interval}); "
                "use a few intervals, e.g. 5x")


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """A remote worker agent (``shmrunner worker``)."""

    connect: str | None = setting(None, checks.optional_address, "the scheduler's address")
    processes: int | None = setting(
        None, checks.worker_processes, "worker processes on this host (null: CPU count)")
    name: str | None = setting(None, checks.name, "how the scheduler lists this worker")
    heartbeat_interval: float = setting(1.0, checks.seconds, "seconds between heartbeats")
    heartbeat_timeout: float = setting(
        5.0, checks.seconds, "seconds without a scheduler heartbeat before reconnecting")
    join_timeout: float | None = setting(
        30.0, checks.optional_seconds, "seconds a worker that was never welcomed by a scheduler "
        "waits for one before it exits with status 1, naming the address (a wrong one, such "
        "as a daemon's clients address); once welcomed it reconnects forever. null: wait "
        "forever (agents started long before their scheduler)")
    allow_pickle: bool = setting(False, checks.flag, "accept pickled functions and arguments")
    slots: bool = setting(
        False, checks.flag, "each worker process holds its own connection to the scheduler "
        "and runs the tasks it is sent; the agent only supervises them (restarts, timeouts, "
        "cancels, memory_limit): about half the time per tiny task (docs/scaling.md)")
    memory_limit: int | float | str | None = setting(
        None, checks.memory_limit, "private memory each worker process on this host may use "
        "before it is killed and replaced, its task failing with MemoryLimitError: as "
        "scheduler.memory_limit (a fraction is of this host's memory)")
    shm_threshold: int = setting(64 * 1024, checks.count, "as scheduler.shm_threshold")
    max_message_bytes: int = setting(1 << 31, checks.positive, "as scheduler.max_message_bytes")
    curve_secret_key: str | None = setting(
        None, checks.optional_path, "this worker's CURVE secret key file (with curve_server_key)")
    curve_server_key: str | None = setting(
        None, checks.optional_path, "the daemon's CURVE public key file")
    allowed_functions: tuple[str, ...] | None = setting(
        None, checks.patterns, "functions this worker runs: 'module' or 'module:qualname' "
                               "patterns, * wildcards (null: any importable function)")
    task_logs: str | bool = setting(
        "INFO", checks.task_logs, "as scheduler.task_logs: what this worker's tasks log and "
        "print is sent with their results (off: nothing)")
    task_log_bytes: int = setting(64 * 1024, checks.task_log_bytes,
                                  "as scheduler.task_log_bytes")

    def __post_init__(self) -> None:
        validate(self, "worker")
        _freeze_patterns(self, "worker")
        if (self.curve_secret_key is None) != (self.curve_server_key is None):
            raise ConfigError("worker.curve_secret_key and worker.curve_server_key go "
                              "together: set both to use CURVE, or neither")


@dataclass(frozen=True, kw_only=True)
class DaemonSettings:
    """The runner daemon (``shmrunner daemon``): endpoints, journal, security."""

    clients: str | None = setting(
        None, checks.optional_address, "address clients (shmrunner.connect, status) connect to "
        "(null: ipc://RUNTIME/clients.sock, RUNTIME = $XDG_RUNTIME_DIR/shmrunner, else the "
        "state directory)")
    workers: str | None = setting(
        None, checks.optional_address, "address remote workers (shmrunner worker) connect to "
        "(null: ipc://RUNTIME/workers.sock)")
    allow_unauthenticated: bool = setting(
        False, checks.flag, "serve a tcp:// endpoint, or an ipc:// socket outside a private "
                            "directory, without CURVE: anyone who can reach the port can run code "
                            "as this user")
    journal: str | None = setting(
        None, checks.optional_path, "SQLite journal of accepted jobs (null: "
        "$XDG_STATE_HOME/shmrunner/journal.sqlite, else ~/.local/state/shmrunner/...)")
    result_ttl: float = setting(3600.0, checks.long_seconds,
                                "seconds finished results stay fetchable")
    drain_timeout: float = setting(
        30.0, checks.seconds, "seconds SIGTERM waits for running jobs before exiting (the rest "
                              "stay journaled and run after a restart)")
    log_level: str = setting("INFO", checks.level, "logging level on stderr")
    curve_secret_key: str | None = setting(
        None, checks.optional_path, "the daemon's CURVE secret key file (from shmrunner keygen); "
                                    "set it to encrypt and authenticate both endpoints")
    curve_authorized_clients: str | None = setting(
        None, checks.optional_path, "directory of the public key files of the clients allowed on "
                                    "daemon.clients (required with curve_secret_key)")
    curve_authorized_workers: str | None = setting(
        None, checks.optional_path, "directory of the public key files of the workers allowed on "
                                    "daemon.workers (required with curve_secret_key)")

    def __post_init__(self) -> None:
        validate(self, "daemon")
        dirs = ("curve_authorized_clients", "curve_authorized_workers")
        if self.curve_secret_key is not None:
            for key in dirs:
                if getattr(self, key) is None:
                    raise ConfigError(f"daemon.{key}: missing; with daemon.curve_secret_key "
                                      "set it to the directory of the public keys allowed "
                                      "on that endpoint")
        elif any(getattr(self, key) is not None for key in dirs):
            raise ConfigError("daemon.curve_secret_key: missing; the authorised key "
                              "directories need the daemon's own key (shmrunner keygen DIR)")
        for key in ("curve_secret_key", *dirs):
            path = getattr(self, key)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"daemon.{key}: {path} does not exist; "
                                  "create keys with: shmrunner keygen DIR")
        for key in dirs:
            path = getattr(self, key)
            if path is not None and not os.path.isdir(path):
                raise ConfigError(f"daemon.{key}: {path} is not a directory; point it at a "
                                  "directory holding the allowed peers' .key files")

    def journal_path(self) -> str:
        if self.journal is not None:
            return self.journal
        return os.path.join(state_dir(), "journal.sqlite")

    def clients_address(self) -> str:
        """``clients``, or the default ipc socket in the private runtime directory."""
        return self.clients or default_address("clients")

    def workers_address(self) -> str:
        """``workers``, or the default ipc socket in the private runtime directory."""
        return self.workers or default_address("workers")


def state_dir() -> str:
    """``$XDG_STATE_HOME/shmrunner``, else ``~/.local/state/shmrunner``."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "shmrunner")


def runtime_dir() -> str:
    """Where the default sockets live: ``$XDG_RUNTIME_DIR/shmrunner`` (per user, on
    tmpfs), else the state directory. It must be private (0700, ours)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "shmrunner") if runtime else state_dir()


def default_address(endpoint: str) -> str:
    """The default address of the daemon's ``clients`` or ``workers`` endpoint."""
    return f"ipc://{os.path.join(runtime_dir(), endpoint + '.sock')}"


def _freeze_patterns(settings: SchedulerSettings | WorkerSettings, section: str) -> None:
    patterns = settings.allowed_functions
    if patterns is not None:  # a tuple: settings stay hashable and immutable
        object.__setattr__(settings, "allowed_functions", tuple(patterns))
    if patterns is not None and settings.allow_pickle:
        raise ConfigError(f"{section}.allowed_functions and {section}.allow_pickle exclude "
                          "each other: a pickle runs code as it is loaded, before any check; "
                          "turn one of them off")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """A whole configuration file."""

    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)


SECTIONS: dict[str, type[Any]] = {"scheduler": SchedulerSettings, "worker": WorkerSettings,
                                   "daemon": DaemonSettings}


# Keys that were replaced: an old config gets told what to use instead.
_REPLACED = {
    ("daemon", "curve_authorized_keys"):
        "replaced by daemon.curve_authorized_clients and daemon.curve_authorized_workers "
        "(one directory of allowed public keys per endpoint, so a client key cannot join as "
        "a worker); put the clients' .key files in one and the workers' in the other",
}


def check_keys(cls: type[Any], section: str, keys: Iterable[Any]) -> None:
    """The one unknown-key check (files, overrides, the environment, --set)."""
    known = {f.name for f in fields(cls)}
    for key in keys:
        replaced = _REPLACED.get((section, key))
        if replaced is not None:
            raise ConfigError(f"{section}.{key}: {replaced}")
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key; known keys are "
                              f"{', '.join(sorted(known))}")


def section_class(name: Any) -> type[Any]:
    """The settings class of section ``name`` (ConfigError for an unknown one)."""
    cls = SECTIONS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"{name}: unknown section; known sections are {', '.join(SECTIONS)}")
    return cls


def describe(cls: type[Any]) -> list[tuple[str, Any, str]]:
    """(key, default, doc) of every setting in a section, for docs and --help."""
    out = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        out.append((f.name, default, f.metadata["doc"]))
    return out
