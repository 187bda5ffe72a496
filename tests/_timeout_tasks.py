"""Task functions for test_timeouts.py (importable by spawned and remote workers)."""

from __future__ import annotations

import os
import time


def nap(seconds: float, index: int, journal: str) -> int:
    """Sleep ``seconds``; record this run's start and end (CLOCK_MONOTONIC is one
    clock for every process on the host) as lines appended to ``journal``."""
    _append(journal, f"{index} start {time.monotonic()!r}\n")
    time.sleep(seconds)
    _append(journal, f"{index} end {time.monotonic()!r}\n")
    return index


def _append(path: str, line: str) -> None:
    # O_APPEND: lines from several processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def note_and_exit(journal: str) -> None:
    """Record this run's start (as nap does), then end the process at once."""
    _append(journal, f"0 start {time.monotonic()!r}\n")
    os._exit(3)
