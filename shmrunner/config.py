"""Settings: YAML -> frozen, typed, validated dataclasses.

One schema for every part (``scheduler``, ``worker``; the daemon's sections
join it as they are built). Each section is a frozen keyword-only dataclass
whose fields carry their default and a validator; :func:`load` reads a YAML
file and fails on the first problem with one :class:`ConfigError` line naming
the file, the key and the fix. Unknown keys are errors, never ignored. The
environment is read only here, when settings are resolved (never at import).

A command's settings come from :func:`resolve`, each layer over the last::

    defaults < the YAML file < SHMRUNNER_<SECTION>__<KEY> variables < --set SECTION.KEY=VALUE

Every layer goes through the same key check and the same validators, and a
bad value is one ``ConfigError`` line naming where it came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["DaemonSettings", "SchedulerSettings", "WorkerSettings", "Settings", "load", "parse",
           "resolve", "with_overrides", "ENV_PREFIX", "SHM_THRESHOLD_ALIAS",
           "default_address", "runtime_dir", "state_dir"]

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
# A function pattern: "module" or "module:qualname", fnmatch wildcards allowed.
_PATTERN = re.compile(r"^[\w.*?\[\]!-]+(:[\w.*?\[\]!-]+)?$")
MAX_PATTERNS = 1000
_patterns = _check(
    lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) <= MAX_PATTERNS and all(
        isinstance(p, str) and len(p) <= 300 and bool(_PATTERN.match(p)) for p in v)),
    "a list of 'module' or 'module:qualname' patterns (* and ? wildcards allowed), "
    "or null for any importable function")


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
    max_pending_bytes: int | None = _setting(
        None, _check(lambda v: v is None or (_is_int(v) and v >= 1),
                     "a whole number of bytes >= 1, or null for a quarter of the available "
                     "memory"),
        "bytes of array and bytes arguments held by queued and running tasks before "
        "submit() blocks (null: a quarter of the memory available at start)")
    max_message_bytes: int = _setting(
        1 << 31, _positive, "largest message accepted from the network, in bytes")
    prefetch: int = _setting(1, _prefetch, "tasks sent to a remote worker beyond its capacity")
    start_method: str | None = _setting(
        None, _start_method, "how local workers start (default: multiprocessing's)")
    allowed_functions: tuple[str, ...] | None = _setting(
        None, _patterns, "functions the daemon runs for its clients: 'module' or "
                         "'module:qualname' patterns, * wildcards (null: any importable "
                         "function, safe only because only authenticated peers reach you)")

    def __post_init__(self) -> None:
        _validate(self, "scheduler")
        _freeze_patterns(self, "scheduler")
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
    join_timeout: float | None = _setting(
        30.0, _optional_seconds, "seconds a worker that was never welcomed by a scheduler "
        "waits for one before it exits with status 1, naming the address (a wrong one, such "
        "as a daemon's clients address); once welcomed it reconnects forever. null: wait "
        "forever (agents started long before their scheduler)")
    allow_pickle: bool = _setting(False, _flag, "accept pickled functions and arguments")
    shm_threshold: int = _setting(64 * 1024, _count, "as scheduler.shm_threshold")
    max_message_bytes: int = _setting(1 << 31, _positive, "as scheduler.max_message_bytes")
    curve_secret_key: str | None = _setting(
        None, _optional_path, "this worker's CURVE secret key file (with curve_server_key)")
    curve_server_key: str | None = _setting(
        None, _optional_path, "the daemon's CURVE public key file")
    allowed_functions: tuple[str, ...] | None = _setting(
        None, _patterns, "functions this worker runs: 'module' or 'module:qualname' "
                         "patterns, * wildcards (null: any importable function)")

    def __post_init__(self) -> None:
        _validate(self, "worker")
        _freeze_patterns(self, "worker")
        if (self.curve_secret_key is None) != (self.curve_server_key is None):
            raise ConfigError("worker.curve_secret_key and worker.curve_server_key go "
                              "together: set both to use CURVE, or neither")


@dataclass(frozen=True, kw_only=True)
class DaemonSettings:
    """The runner daemon (``shmrunner daemon``): endpoints, journal, security."""

    clients: str | None = _setting(
        None, _optional_address, "address clients (shmrunner.connect, status) connect to "
        "(null: ipc://RUNTIME/clients.sock, RUNTIME = $XDG_RUNTIME_DIR/shmrunner, else the "
        "state directory)")
    workers: str | None = _setting(
        None, _optional_address, "address remote workers (shmrunner worker) connect to "
        "(null: ipc://RUNTIME/workers.sock)")
    allow_unauthenticated: bool = _setting(
        False, _flag, "serve a tcp:// endpoint, or an ipc:// socket outside a private "
                      "directory, without CURVE: anyone who can reach the port can run code "
                      "as this user")
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
    curve_authorized_clients: str | None = _setting(
        None, _optional_path, "directory of the public key files of the clients allowed on "
                              "daemon.clients (required with curve_secret_key)")
    curve_authorized_workers: str | None = _setting(
        None, _optional_path, "directory of the public key files of the workers allowed on "
                              "daemon.workers (required with curve_secret_key)")

    def __post_init__(self) -> None:
        _validate(self, "daemon")
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


_SECTIONS: dict[str, type[Any]] = {"scheduler": SchedulerSettings, "worker": WorkerSettings,
                                   "daemon": DaemonSettings}


def _validate(settings: object, section: str) -> None:
    for f in fields(settings):  # type: ignore[arg-type]
        problem = f.metadata["check"](getattr(settings, f.name))
        if problem is not None:
            raise ConfigError(f"{section}.{f.name}: expected {problem}, "
                              f"got {getattr(settings, f.name)!r}")


S = TypeVar("S")


# Keys that were replaced: an old config gets told what to use instead.
_REPLACED = {
    ("daemon", "curve_authorized_keys"):
        "replaced by daemon.curve_authorized_clients and daemon.curve_authorized_workers "
        "(one directory of allowed public keys per endpoint, so a client key cannot join as "
        "a worker); put the clients' .key files in one and the workers' in the other",
}


def _check_keys(cls: type[Any], section: str, keys: Iterable[Any]) -> None:
    """The one unknown-key check (files, overrides, the environment, --set)."""
    known = {f.name for f in fields(cls)}
    for key in keys:
        replaced = _REPLACED.get((section, key))
        if replaced is not None:
            raise ConfigError(f"{section}.{key}: {replaced}")
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key; known keys are "
                              f"{', '.join(sorted(known))}")


def _section(name: Any) -> type[Any]:
    """The settings class of section ``name`` (ConfigError for an unknown one)."""
    cls = _SECTIONS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"{name}: unknown section; known sections are {', '.join(_SECTIONS)}")
    return cls


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
            cls = _section(name)
            if values is None:
                values = {}
            if not isinstance(values, Mapping):
                raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
            _check_keys(cls, name, values)
            sections[name] = cls(**values)
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
    except ValueError as exc:  # a NUL in the path: no file can have that name
        raise ConfigError(f"{source!r}: cannot read the file: {exc}") from None
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
    _check_keys(type(settings), section, overrides)
    return replace(settings, **overrides)  # type: ignore[type-var]


# --- resolving a command's settings: file < environment < --set ------------------------------

ENV_PREFIX = "SHMRUNNER_"
# The Pool's threshold variable, older than the sections: for the commands it is
# scheduler.shm_threshold and worker.shm_threshold, below their own variables.
SHM_THRESHOLD_ALIAS = "SHMRUNNER_SHM_THRESHOLD"


class _Override:
    """One value for ``section.key`` and where it came from (for the error line)."""

    __slots__ = ("source", "section", "key", "value")

    def __init__(self, source: str, section: str, key: str, value: Any) -> None:
        self.source, self.section, self.key, self.value = source, section, key, value


def _yaml_value(text: str, source: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: the value is not valid YAML: {problem}") from None


def _from_environment(environ: Mapping[str, str]) -> list[_Override]:
    """``SHMRUNNER_<SECTION>__<KEY>`` variables, every one checked (an unknown one
    is an error whatever the command reads: a typo must not be ignored)."""
    found: list[_Override] = []
    alias = environ.get(SHM_THRESHOLD_ALIAS)
    if alias:  # set but empty was ignored before: it still is
        source = f"environment variable {SHM_THRESHOLD_ALIAS}"
        value = _yaml_value(alias, source)
        found += [_Override(source, section, "shm_threshold", value)
                  for section in ("scheduler", "worker")]
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].partition("__")
        section, key = section.lower(), key.lower()
        try:
            _check_keys(_section(section), section, [key])
        except ConfigError as exc:
            raise ConfigError(f"environment variable {name}: {exc} (the variables are "
                              f"{ENV_PREFIX}<SECTION>__<KEY>)") from None
        source = f"environment variable {name}"
        found.append(_Override(source, section, key, _yaml_value(environ[name], source)))
    return found


def _from_assignments(assignments: Iterable[str], sections: Collection[str]) -> list[_Override]:
    found = []
    for assignment in assignments:
        source = f"--set {assignment}"
        key, equals, raw = assignment.partition("=")
        section, _, name = key.partition(".")
        if not equals or not name or section not in sections:
            expected = " or ".join(f"{s}.KEY=VALUE" for s in sections)
            raise ConfigError(f"{source}: expected {expected}")
        try:
            _check_keys(_section(section), section, [name])
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        found.append(_Override(source, section, name, _yaml_value(raw, source)))
    return found


def _apply(settings: Settings, overrides: Sequence[_Override]) -> Settings:
    """``settings`` with one layer of overrides (within a layer the last wins)."""
    changed: dict[str, Any] = {}
    for name in _SECTIONS:
        layer = [o for o in overrides if o.section == name]
        if not layer:
            continue
        values: dict[str, Any] = {}
        for o in layer:
            check = next(f for f in fields(_SECTIONS[name]) if f.name == o.key).metadata["check"]
            problem = check(o.value)
            if problem is not None:
                raise ConfigError(f"{o.source}: {name}.{o.key}: expected {problem}, "
                                  f"got {o.value!r}")
            values[o.key] = o.value
        try:
            changed[name] = replace(getattr(settings, name), **values)
        except ConfigError as exc:  # a rule across keys (heartbeats, CURVE files)
            sources = ", ".join(dict.fromkeys(o.source for o in layer))
            raise ConfigError(f"{sources}: {exc}") from None
    return replace(settings, **changed) if changed else settings


def resolve(path: str | os.PathLike[str] | None = None, *,
            sections: Collection[str] = tuple(_SECTIONS), sets: Iterable[str] = (),
            environ: Mapping[str, str] | None = None) -> Settings:
    """A command's settings: the defaults, the YAML file at ``path`` over them,
    the ``SHMRUNNER_<SECTION>__<KEY>`` environment variables over that, and the
    ``--set SECTION.KEY=VALUE`` assignments ``sets`` last. Values from the
    environment and ``--set`` are read as YAML and validated like the file's.
    Only ``sections`` (those the command reads) take overrides; every
    ``SHMRUNNER_*__*`` variable must still name a real setting. ``environ``:
    default ``os.environ``, read now."""
    settings = load(path) if path is not None else Settings()
    from_env = _from_environment(os.environ if environ is None else environ)
    from_sets = _from_assignments(sets, sections)
    for layer in (from_env, from_sets):
        settings = _apply(settings, [o for o in layer if o.section in sections])
    return settings


def describe(cls: type[Any]) -> list[tuple[str, Any, str]]:
    """(key, default, doc) of every setting in a section, for docs and --help."""
    out = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        out.append((f.name, default, f.metadata["doc"]))
    return out
