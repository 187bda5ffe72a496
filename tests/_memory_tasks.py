"""Task functions of the memory-limit tests (tests/test_memory_limit.py): they
allocate private memory and hold it, so that a worker's memory limit (or the
kernel's OOM killer) has something to find. Importable by reference
(``"_memory_tasks:hog"``) in daemons and remote workers: the harnesses put
this directory on their PYTHONPATH."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

HOLD = 60.0  # seconds a hog holds its memory: far longer than any limit takes to act

MiB = 1 << 20


def hog(mib: int, hold: float = HOLD) -> int:
    """Allocate and touch ``mib`` MiB of private memory, then hold it for up to
    ``hold`` seconds (a memory limit kills the worker long before); the pid."""
    block = np.ones(mib * MiB // 8)
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return int(block[-1]) + os.getpid() - 1


def hog_once(marker: str, mib: int) -> str:
    """:func:`hog` on the first attempt only (``marker`` records it); then "done"."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        hog(mib)
    return "done"


_kept: list[Any] = []


def leak(mib: int) -> int:
    """Keep ``mib`` MiB of private memory after returning (a leak, a cache); the pid."""
    _kept.append(np.ones(mib * MiB // 8))
    return os.getpid()


def where() -> int:
    return os.getpid()


def hold_shared(a: np.ndarray, hold: float) -> dict[str, Any]:
    """Read every page of the shared ``a``, keep it mapped for ``hold`` seconds
    (many readings of the memory watch), and report how the kernel counts it."""
    total = float(a.sum())
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        time.sleep(0.01)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if line.startswith("Rss"))
    kib = {key: int(value.split()[0]) for key, value in status.items()}
    return {"sum": total, "anon_mib": kib["RssAnon"] / 1024, "shmem_mib": kib["RssShmem"] / 1024,
            "pid": os.getpid()}


def die_by_sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
