"""How many bytes a task's arguments hold: what the byte budget of queued and
running tasks (``scheduler.max_pending_bytes``) counts.

Only the large parts count, and only those a submit makes the scheduler hold
on to: plain numpy arrays (copied into shared memory or onto the wire when
sent) and bytes-like objects. Arrays already in shared memory count nothing:
only their handle travels. The walk is bounded, so a huge list of small
objects costs a bounded time to measure (and counts what was seen).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .shm import is_shared

__all__ = ["payload_bytes", "default_budget", "only_scalars"]

_MAX_VISITS = 10_000  # objects looked at per task, at most
_SCALARS = frozenset({int, float, bool, complex, str, type(None)})


def only_scalars(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """True when every argument is a plain scalar (no container, array, bytes
    or future): the common tiny task, which needs no walk of its arguments.
    Exact types: a subclass could be anything."""
    # (No generator, and no look at an empty kwargs: this runs several times per task.)
    return _SCALARS.issuperset(map(type, args)) and (
        not kwargs or _SCALARS.issuperset(map(type, kwargs.values())))


def payload_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if only_scalars(args, kwargs):
        return 0
    total = 0
    visits = 0
    stack: list[Any] = [args, kwargs]
    while stack and visits < _MAX_VISITS:
        obj = stack.pop()
        visits += 1
        if isinstance(obj, np.ndarray):
            if obj.dtype != object and not is_shared(obj):
                total += obj.nbytes
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            total += len(obj) if not isinstance(obj, memoryview) else obj.nbytes
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
    return total


def default_budget() -> int:
    """A quarter of the memory available now (at least 256 MiB): room for the
    work in flight without pushing the host into swap."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(available // 4, 256 << 20)
