"""Limits shared arrays run into: open files, and the memory left for them.

Every live shared array holds an fd, so :func:`raise_fd_limit` lifts the soft
``RLIMIT_NOFILE`` to the hard one once per process, and :func:`fd_limit_error`
names the limit when a received array still finds none free. Memory for a
memfd comes from RAM and the memory cgroup, not from ``/dev/shm``:
:func:`available_memory` reads both bounds (cached for 100 ms, as it is read
per large array) so that :func:`check_fits` refuses an oversized request with
a clear :class:`SharedMemoryError` instead of a SIGBUS or the OOM killer.

State, process-wide: whether the fd limit was raised already (under a lock,
so it is tried once), and the last memory reading with its time (unlocked: two
threads racing at worst both read ``/proc``).
"""

from __future__ import annotations

import os
import resource
import threading
import time

from .errors import SharedMemoryError
from .worker._memwatch import cgroup_headroom

__all__ = ["available_memory", "check_fits", "fd_limit_error", "mib", "raise_fd_limit"]

# Headroom left to the rest of the system when checking a request.
_RESERVE_BYTES = 64 << 20

_limits_lock = threading.Lock()
_fd_limit_raised = False
_available_cache: tuple[float, int] = (0.0, 0)


def _renew_lock_in_child() -> None:
    # fork() copies the lock held if another thread held it then: a worker
    # forked at that moment would wait for it forever on its way to serving.
    global _limits_lock
    _limits_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_lock_in_child)


def raise_fd_limit() -> None:
    """Lift the soft fd limit to the hard one: every live shared array holds an fd."""
    global _fd_limit_raised
    if _fd_limit_raised:
        return  # the common case: no lock
    with _limits_lock:
        if _fd_limit_raised:
            return
        _fd_limit_raised = True
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                pass  # keep the soft limit; transfers fall back when fds run out


def fd_limit_error(cause: str) -> SharedMemoryError:
    """The error for a shared array that could not be received because this
    process has no free file descriptor: names the limit and how to raise it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return SharedMemoryError(
        f"{cause}: process {os.getpid()} reached its open-file limit "
        f"(RLIMIT_NOFILE soft {_limit(soft)}, hard {_limit(hard)}; each shared array "
        "received holds two fds); raise it with `ulimit -n` or "
        "resource.setrlimit(resource.RLIMIT_NOFILE, ...), or pass fewer arrays per task"
    )


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def available_memory() -> int:
    """Bytes shared memory can still take: the least of MemAvailable and the
    memory cgroup's headroom. Cached for 100 ms (it is read per large array)."""
    global _available_cache
    now = time.monotonic()
    stamp, value = _available_cache
    if now - stamp < 0.1:
        return value
    value = _meminfo_available()
    # The process's own memory cgroup, v1 or v2 (a container's, a systemd
    # unit's MemoryMax, a batch job's): memfd pages are charged to it.
    cgroup = cgroup_headroom()
    if cgroup is not None:
        value = min(value, cgroup)
    _available_cache = (now, value)
    return value


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse anything


def check_fits(nbytes: int) -> None:
    """Refuse (SharedMemoryError) a request the memory left cannot hold."""
    if nbytes < (16 << 20):
        return  # small requests: not worth a /proc read
    free = available_memory() - _RESERVE_BYTES
    if nbytes > free:
        raise SharedMemoryError(
            f"need {mib(nbytes)} of shared memory but only {mib(max(free, 0))} is "
            "available; release arrays you no longer use, lower the pool's "
            "shm_threshold, or add memory"
        )


def mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
