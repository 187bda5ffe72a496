"""The validators of the settings' fields, and the field helper that carries them.

Each validator takes a value and returns None when it is acceptable, else
what was expected ("a whole number >= 0"), which the caller turns into one
:class:`~shmrunner.errors.ConfigError` line naming the section and the key.
Stateless: the section dataclasses (``_config_sections.py``) attach one
validator to each field with :func:`setting`, :func:`validate` runs them when
a section is built, and the override layers (``_config_overrides.py``) run the
same one on a value before it replaces a field.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable
from dataclasses import field, fields
from typing import Any

from . import _memsize
from .errors import ConfigError

Check = Callable[[Any], str | None]

_ADDRESS = re.compile(r"^(tcp://(\*|[A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5}|\*)|ipc://.+)$")


def check(predicate: Callable[[Any], bool], expected: str) -> Check:
    """A validator: ``expected`` unless ``predicate`` holds."""
    def checker(value: Any) -> str | None:
        return None if predicate(value) else expected
    return checker


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Upper bounds: every count ends up in a C integer (a ZeroMQ option, a poll's
# milliseconds, a time_t), and a value past one raised OverflowError deep in a
# thread (the hub's, the timer's) instead of one line here.
MAX_WHOLE = 1 << 62
MAX_SECONDS = 1_000_000  # about 11.6 days; ZeroMQ's poll takes a 32-bit ms count


def _whole(v: Any, low: int) -> bool:
    return is_int(v) and low <= v <= MAX_WHOLE


def _seconds(v: Any, zero: bool = False, most: float = MAX_SECONDS) -> bool:
    # nan fails every comparison; inf fails the bound.
    return _is_number(v) and (v >= 0 if zero else v > 0) and v <= most


count = check(lambda v: _whole(v, 0), "a whole number >= 0 and at most 2**62")
positive = check(lambda v: _whole(v, 1), "a whole number >= 1 and at most 2**62")
optional_count = check(lambda v: v is None or _whole(v, 0),
                       "a whole number >= 0 and at most 2**62, or null for the CPU count")
# As protocol.MAX_CAPACITY (not imported: config stays light): a worker holds at
# most its capacity plus the prefetch, both bounded.
_MAX_PREFETCH = 4096
# As protocol.MAX_CAPACITY too: a scheduler gives one worker at most that many
# tasks at once, so processes past it could never run one (with --slots, a
# bound nonetheless); they were all forked before the scheduler was even
# reached: 5,000 met the OOM killer.
_MAX_WORKER_PROCESSES = 4096
worker_processes = check(
    lambda v: v is None or (is_int(v) and 1 <= v <= _MAX_WORKER_PROCESSES),
    f"a whole number from 1 to {_MAX_WORKER_PROCESSES}, or null for the CPU count")
prefetch = check(lambda v: is_int(v) and 0 <= v <= _MAX_PREFETCH,
                 f"a whole number from 0 to {_MAX_PREFETCH}")
seconds = check(_seconds, f"a number of seconds > 0 and at most {MAX_SECONDS:,}")
# A duration nothing waits on (only compared with timestamps): years are fine.
MAX_LONG_SECONDS = 1_000_000_000
long_seconds = check(lambda v: _seconds(v, most=MAX_LONG_SECONDS),
                     f"a number of seconds > 0 and at most {MAX_LONG_SECONDS:,}")
optional_seconds = check(lambda v: v is None or _seconds(v),
                         f"a number of seconds > 0 and at most {MAX_SECONDS:,}, or null for none")
flag = check(lambda v: isinstance(v, bool), "true or false")
address = check(lambda v: isinstance(v, str) and bool(_ADDRESS.match(v)),
                "a ZeroMQ address such as tcp://127.0.0.1:5560")
optional_address = check(lambda v: v is None or (isinstance(v, str) and bool(_ADDRESS.match(v))),
                         "a ZeroMQ address such as tcp://127.0.0.1:5560, or null")
start_method = check(lambda v: v in (None, "fork", "spawn", "forkserver"),
                     "one of fork, spawn, forkserver, or null for the default")
optional_path = check(lambda v: v is None or (isinstance(v, str) and v != ""),
                      "a file or directory path, or null")
level = check(lambda v: v in ("DEBUG", "INFO", "WARNING", "ERROR"),
              "one of DEBUG, INFO, WARNING, ERROR")
# As _tasklogs.level_of (not imported: config stays light); YAML reads a bare off as false.
_LOG_LEVELS = {"OFF", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
task_logs = check(lambda v: v is False or (isinstance(v, str) and v.upper() in _LOG_LEVELS),
                  "one of DEBUG, INFO, WARNING, ERROR, CRITICAL, or off")
MAX_TASK_LOG = 1 << 20  # as _tasklogs.MAX_LIMIT
task_log_bytes = check(lambda v: is_int(v) and 1 <= v <= MAX_TASK_LOG,
                       f"a whole number from 1 to {MAX_TASK_LOG}")
name = check(lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 200),
             "a short name, or null for the host name and pid")
# A function pattern: "module" or "module:qualname", fnmatch wildcards allowed.
_PATTERN = re.compile(r"^[\w.*?\[\]!-]+(:[\w.*?\[\]!-]+)?$")
MAX_PATTERNS = 1000
patterns = check(
    lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) <= MAX_PATTERNS and all(
        isinstance(p, str) and len(p) <= 300 and bool(_PATTERN.match(p)) for p in v)),
    "a list of 'module' or 'module:qualname' patterns (* and ? wildcards allowed), "
    "or null for any importable function")


# An exception class by name: "module:qualname", "module.Name", or a builtin's bare
# name; never imported, matched against the names of a raised exception's classes.
_EXCEPTION_NAME = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$")
MAX_RETRY_ON = 100
def _exception_name(n: Any) -> bool:
    if not isinstance(n, str) or len(n) > 300 or not _EXCEPTION_NAME.match(n):
        return False
    if ":" in n or "." in n:
        return True
    found = builtins.__dict__.get(n)  # a bare name is a builtin's, or it never matches
    return isinstance(found, type) and issubclass(found, BaseException)


exception_names = check(
    lambda v: isinstance(v, (list, tuple)) and len(v) <= MAX_RETRY_ON and all(
        _exception_name(n) for n in v),
    f"a list (at most {MAX_RETRY_ON}) of exception class names: a builtin's such as "
    "ConnectionError, or 'module:qualname' such as 'mypkg.errors:Flaky'; or [] for none")
memory_limit = check(lambda v: _memsize.problem(v) is None, _memsize.EXPECTED)
optional_backoff = check(lambda v: _seconds(v, zero=True),
                         f"a number of seconds from 0 (retry at once) to {MAX_SECONDS:,}")


def setting(default: Any, checker: Check, doc: str) -> Any:
    """A dataclass field with its default, its validator and its one-line doc."""
    return field(default=default, metadata={"check": checker, "doc": doc})


def validate(settings: object, section: str) -> None:
    """Run every field's validator on the built ``settings``; the first problem
    is one ConfigError line naming ``section.key``."""
    for f in fields(settings):  # type: ignore[arg-type]
        problem = f.metadata["check"](getattr(settings, f.name))
        if problem is not None:
            raise ConfigError(f"{section}.{f.name}: expected {problem}, "
                              f"got {getattr(settings, f.name)!r}")
