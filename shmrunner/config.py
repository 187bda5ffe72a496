"""Settings: YAML -> frozen, typed, validated dataclasses.

One schema for every part (``scheduler``, ``worker``; the daemon's sections
join it as they are built). Each section is a frozen keyword-only dataclass
whose fields carry their default and a validator; :func:`load` reads a YAML
file and fails on the first problem with one :class:`ConfigError` line naming
the file, the key and the fix. Unknown keys are errors, never ignored. The
environment is read only here, when settings are resolved (never at import).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["DaemonSettings", "SchedulerSettings", "WorkerSettings", "Settings", "load", "parse"]

_ADDRESS = re.compile(r"^(tcp://(\*|[A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5}|\*)|ipc://.+)$")


def _check(predicate: Callable[[Any], bool], expected: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if predicate(value) else expected
    return check


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_count = _check(lambda v: _is_int(v) and v >= 0, "a whole number >= 0")
_positive = _check(lambda v: _is_int(v) and v >= 1, "a whole number >= 1")
_optional_count = _check(lambda v: v is None or (_is_int(v) and v >= 0),
                         "a whole number >= 0, or null for the CPU count")
_optional_positive = _check(lambda v: v is None or (_is_int(v) and v >= 1),
                            "a whole number >= 1, or null for the CPU count")
# As protocol.MAX_CAPACITY (not imported: config stays light): a worker holds at
# most its capacity plus the prefetch, both bounded.
_MAX_PREFETCH = 4096
_prefetch = _check(lambda v: _is_int(v) and 0 <= v <= _MAX_PREFETCH,
                   f"a whole number from 0 to {_MAX_PREFETCH}")
_seconds = _check(lambda v: _is_number(v) and v > 0, "a number of seconds > 0")
_optional_seconds = _check(lambda v: v is None or (_is_number(v) and v > 0),
                           "a number of seconds > 0, or null for none")
_flag = _check(lambda v: isinstance(v, bool), "true or false")
_address = _check(lambda v: isinstance(v, str) and bool(_ADDRESS.match(v)),
                  "a ZeroMQ address such as tcp://127.0.0.1:5560")
_optional_address = _check(lambda v: v is None or (isinstance(v, str) and bool(_ADDRESS.match(v))),
                           "a ZeroMQ address such as tcp://127.0.0.1:5560, or null")
_start_method = _check(lambda v: v in (None, "fork", "spawn", "forkserver"),
                       "one of fork, spawn, forkserver, or null for the default")
_optional_path = _check(lambda v: v is None or (isinstance(v, str) and v != ""),
                        "a file or directory path, or null")
_level = _check(lambda v: v in ("DEBUG", "INFO", "WARNING", "ERROR"),
                "one of DEBUG, INFO, WARNING, ERROR")
_name = _check(lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 200),
               "a short name, or null for the host name and pid")


def _setting(default: Any, check: Callable[[Any], str | None], doc: str) -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    """Where tasks run and how they are retried, timed and guarded."""

    local_workers: int | None = _setting(
        None, _optional_count, "local shared-memory worker processes (null: CPU count, 0: none)")
    listen: str | None = _setting(
        None, _optional_address, "address remote workers connect to (null: local only)")
    retries: int = _setting(0, _count, "default times a task is retried when its worker is lost")
    timeout: float | None = _setting(
        None, _optional_seconds, "default seconds a task may run before it is stopped")
    heartbeat_interval: float = _setting(1.0, _seconds, "seconds between heartbeats")
    heartbeat_timeout: float = _setting(
        5.0, _seconds, "seconds of silence after which a remote worker is declared lost")
    allow_pickle: bool = _setting(
        False, _flag, "accept pickled functions and arguments (anyone who can send them "
                      "can run code: enable only on trusted networks)")
    shm_threshold: int = _setting(
        64 * 1024, _count, "bytes from which plain arrays go through shared memory")
    max_pending: int = _setting(
        100_000, _positive, "tasks queued before submit() blocks (backpressure)")
    max_message_bytes: int = _setting(
        1 << 31, _positive, "largest message accepted from the network, in bytes")
    prefetch: int = _setting(1, _prefetch, "tasks sent to a remote worker beyond its capacity")
    start_method: str | None = _setting(
        None, _start_method, "how local workers start (default: multiprocessing's)")

    def __post_init__(self) -> None:
        _validate(self, "scheduler")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"scheduler.heartbeat_timeout ({self.heartbeat_timeout}) must be larger than "
                f"scheduler.heartbeat_interval ({self.heartbeat_interval}); "
                "use a few intervals, e.g. 5x")


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """A remote worker agent (``shmrunner worker``)."""

    connect: str | None = _setting(None, _optional_address, "the scheduler's address")
    processes: int | None = _setting(
        None, _optional_positive, "worker processes on this host (null: CPU count)")
    name: str | None = _setting(None, _name, "how the scheduler lists this worker")
    heartbeat_interval: float = _setting(1.0, _seconds, "seconds between heartbeats")
    heartbeat_timeout: float = _setting(
        5.0, _seconds, "seconds without a scheduler heartbeat before reconnecting")
    allow_pickle: bool = _setting(False, _flag, "accept pickled functions and arguments")
    shm_threshold: int = _setting(64 * 1024, _count, "as scheduler.shm_threshold")
    max_message_bytes: int = _setting(1 << 31, _positive, "as scheduler.max_message_bytes")
    curve_secret_key: str | None = _setting(
        None, _optional_path, "this worker's CURVE secret key file (with curve_server_key)")
    curve_server_key: str | None = _setting(
        None, _optional_path, "the daemon's CURVE public key file")

    def __post_init__(self) -> None:
        _validate(self, "worker")
        if (self.curve_secret_key is None) != (self.curve_server_key is None):
            raise ConfigError("worker.curve_secret_key and worker.curve_server_key go "
                              "together: set both to use CURVE, or neither")


@dataclass(frozen=True, kw_only=True)
class DaemonSettings:
    """The runner daemon (``shmrunner daemon``): endpoints, journal, security."""

    clients: str = _setting("tcp://127.0.0.1:5560", _address,
                            "address clients (shmrunner.connect, status) connect to")
    workers: str = _setting("tcp://127.0.0.1:5561", _address,
                            "address remote workers (shmrunner worker) connect to")
    journal: str | None = _setting(
        None, _optional_path, "SQLite journal of accepted jobs (null: "
        "$XDG_STATE_HOME/shmrunner/journal.sqlite, else ~/.local/state/shmrunner/...)")
    result_ttl: float = _setting(3600.0, _seconds, "seconds finished results stay fetchable")
    drain_timeout: float = _setting(
        30.0, _seconds, "seconds SIGTERM waits for running jobs before exiting (the rest "
                        "stay journaled and run after a restart)")
    log_level: str = _setting("INFO", _level, "logging level on stderr")
    curve_secret_key: str | None = _setting(
        None, _optional_path, "the daemon's CURVE secret key file (from shmrunner keygen); "
                              "set it to encrypt and authenticate both endpoints")
    curve_authorized_keys: str | None = _setting(
        None, _optional_path, "directory of the public key files of clients and workers "
                              "allowed to connect (required with curve_secret_key)")

    def __post_init__(self) -> None:
        _validate(self, "daemon")
        if (self.curve_secret_key is None) != (self.curve_authorized_keys is None):
            raise ConfigError("daemon.curve_secret_key and daemon.curve_authorized_keys go "
                              "together: set both to enable CURVE, or neither")
        for key in ("curve_secret_key", "curve_authorized_keys"):
            path = getattr(self, key)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"daemon.{key}: {path} does not exist; "
                                  "create keys with: shmrunner keygen DIR")
        keys = self.curve_authorized_keys
        if keys is not None and not os.path.isdir(keys):
            raise ConfigError(f"daemon.curve_authorized_keys: {keys} is not a directory; "
                              "point it at a directory holding the clients' and workers' "
                              ".key files")

    def journal_path(self) -> str:
        if self.journal is not None:
            return self.journal
        state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return os.path.join(state, "shmrunner", "journal.sqlite")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """A whole configuration file."""

    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)


_SECTIONS: dict[str, type[Any]] = {"scheduler": SchedulerSettings, "worker": WorkerSettings,
                                   "daemon": DaemonSettings}


def _validate(settings: object, section: str) -> None:
    for f in fields(settings):  # type: ignore[arg-type]
        problem = f.metadata["check"](getattr(settings, f.name))
        if problem is not None:
            raise ConfigError(f"{section}.{f.name}: expected {problem}, "
                              f"got {getattr(settings, f.name)!r}")


S = TypeVar("S")


def _build(cls: type[S], section: str, values: Mapping[str, Any]) -> S:
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key; known keys are "
                              f"{', '.join(sorted(known))}")
    return cls(**values)


def parse(data: object, source: str = "<config>") -> Settings:
    """Settings from the parsed YAML document ``data`` (None: all defaults)."""
    try:
        if data is None:
            return Settings()
        if not isinstance(data, Mapping):
            raise ConfigError(f"the top level must be a mapping of sections "
                              f"({', '.join(_SECTIONS)}), got {type(data).__name__}")
        sections: dict[str, Any] = {}
        for name, values in data.items():
            if name not in _SECTIONS:
                raise ConfigError(f"{name}: unknown section; known sections are "
                                  f"{', '.join(_SECTIONS)}")
            if values is None:
                values = {}
            if not isinstance(values, Mapping):
                raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
            sections[name] = _build(_SECTIONS[name], name, values)
        return Settings(**sections)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a YAML settings file."""
    import yaml

    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not valid YAML: not UTF-8 text (byte "
                          f"0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    return parse(data, source)


def with_overrides(settings: S, overrides: Mapping[str, Any], section: str) -> S:
    """``settings`` with the given keys replaced (validated like the file)."""
    known = {f.name for f in fields(settings)}  # type: ignore[arg-type]
    for key in overrides:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key; known keys are "
                              f"{', '.join(sorted(known))}")
    return replace(settings, **overrides)  # type: ignore[type-var]


def describe(cls: type[Any]) -> list[tuple[str, Any, str]]:
    """(key, default, doc) of every setting in a section, for docs and --help."""
    out = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        out.append((f.name, default, f.metadata["doc"]))
    return out
