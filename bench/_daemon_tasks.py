"""Task functions for bench/bench_daemon.py; a module of its own so the daemon's
worker agents import them by reference (``_daemon_tasks:record``)."""

from __future__ import annotations

import os


def record(path: str, job_id: str) -> str:
    """Append ``job_id`` and a newline to ``path`` in one O_APPEND write (atomic for
    short lines, so concurrent workers never interleave), and return it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{job_id}\n".encode())
    finally:
        os.close(fd)
    return job_id


def record_total(path: str, job_id: str, a: object) -> float:
    """Append ``job_id`` and the array's sum to ``path`` (one O_APPEND write); return the sum."""
    total = float(a.sum())  # type: ignore[attr-defined]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{job_id} {total!r}\n".encode())
    finally:
        os.close(fd)
    return total
