"""Importable task functions for test_retries.py (local workers may start with
spawn or forkserver, so the tasks live in a module on their path).

Each task counts its attempts by appending a line to a file: the test reads
how often it ran, and when (``time.monotonic`` is the system-wide
CLOCK_MONOTONIC on Linux, so times from different processes compare).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from shmrunner.errors import RemoteTaskError


class Flaky(Exception):
    """A task's own error class, named in retry_on by 'module:qualname'."""


class FlakyChild(Flaky):
    """Matches a retry_on naming its base, Flaky."""


def _attempt(path: str) -> int:
    """Record one attempt (its start time) and return its number (1 for the first)."""
    with open(path, "a") as f:
        f.write(f"start {time.monotonic()!r}\n")
    with open(path) as f:
        return sum(1 for line in f if line.startswith("start"))


def _failed(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"fail {time.monotonic()!r}\n")


_ERRORS: dict[str, Callable[[str], BaseException]] = {
    "ConnectionError": ConnectionError, "ConnectionRefusedError": ConnectionRefusedError,
    "ValueError": ValueError, "Flaky": Flaky, "FlakyChild": FlakyChild,
    # defined in json.decoder, known to users as json.JSONDecodeError
    "JSONDecodeError": lambda message: json.JSONDecodeError(message, "", 0),
}


def fail_first(path: str, times: int, error: str) -> str:
    """Raise ``error`` (a name in _ERRORS) on the first ``times`` attempts, then
    return 'ok after N' (N: the attempt that succeeded)."""
    n = _attempt(path)
    if n <= times:
        _failed(path)
        raise _ERRORS[error](f"attempt {n} failed")
    return f"ok after {n}"


def fail_remote_first(path: str, times: int, type_name: str) -> str:
    """As fail_first, raising a RemoteTaskError that names ``type_name``: the
    shape of a remote task's exception whose class is not importable here."""
    n = _attempt(path)
    if n <= times:
        _failed(path)
        raise RemoteTaskError(type_name, f"attempt {n} failed")
    return f"ok after {n}"


def attempts(path: str) -> list[tuple[str, float]]:
    """The (event, monotonic time) lines a task recorded: 'start' and 'fail'."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(event, float(t)) for event, t in (line.split() for line in f)]
