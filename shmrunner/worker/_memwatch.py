"""Worker memory as the kernel reports it: what a ``memory_limit`` counts,
and the evidence that the kernel's OOM killer killed a worker.

Data flow::

    manager thread, every WATCH_INTERVAL while a memory_limit is set:
        anonymous_memory(pid) <- /proc/PID/statm: a cheap upper bound
        over the limit -> private_memory(pid) <- /proc/PID/smaps: the exact
                          figure (ms; at most every EXACT_INTERVAL per worker
                          while the bound alone is over)
        over the limit -> ProcessLifecycle SIGKILLs the worker; its reap fails
                          the running task with MemoryLimitError
    spawn:  oom_snapshot(own pid), just before the fork <- the memory cgroup
            the worker starts in (its parent's: /proc/PID/cgroup) and its
            oom_kill counter (v1 memory.oom_control, v2 memory.events), else
            the system's (/proc/vmstat oom_kill)
    reap of a SIGKILL nobody here sent: oom_evidence(snapshot, claimed) ->
            what rose (the kernel's OOM killer did it) or None (an anonymous
            SIGKILL); each OOM kill counted explains one death at most

What counts against a limit is the worker's *private* memory: the resident
anonymous pages that it alone maps (the heap, numpy arrays it allocates).
Not counted: the caller's shared arrays a task maps (memfd pages,
``RssShmem``: they belong to the caller), file pages (``RssFile``: code,
libraries, mapped files, which the kernel can drop), and, under the ``fork``
start method, the parent's pages a worker still shares copy-on-write (they
are the parent's until the worker writes to them; ``RssAnon`` counts them,
which is why it is only the cheap first test). Arrays a task itself creates
in shared memory (``shmrunner.empty``) are shared pages and not counted
either. Swapped-out pages are not counted. Stateless, except the cgroup
mount points, read once per process (the lifecycle, and an agent's Slots,
keep the snapshots and the claimed counts).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

__all__ = ["WATCH_INTERVAL", "EXACT_INTERVAL", "anonymous_memory", "private_memory",
           "OomSnapshot", "oom_snapshot", "oom_evidence", "memory_cgroup", "cgroup_limit"]

WATCH_INTERVAL = 0.1  # seconds between two readings of the workers' memory
EXACT_INTERVAL = 1.0  # most often a worker's exact figure is read while the bound is over
_PAGE = os.sysconf("SC_PAGE_SIZE")
_SMAPS = re.compile(rb"^(Private_Clean|Private_Dirty|Anonymous):\s+(\d+) kB", re.M)


def anonymous_memory(pid: int) -> int | None:
    """Bytes of resident anonymous memory of process ``pid`` (``RssAnon``:
    ``statm``'s resident minus shared pages), None once it is gone. An upper
    bound of :func:`private_memory`, read in microseconds."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def private_memory(pid: int) -> int | None:
    """Bytes of resident anonymous memory that process ``pid`` alone maps
    (not shared copy-on-write with its parent), None once it is gone: per
    mapping of ``/proc/PID/smaps``, its anonymous pages, at most its private
    ones. Milliseconds for a large process: read only when the bound is over."""
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            data = f.read()
    except OSError:
        return None
    total = private = 0
    for name, kib in _SMAPS.findall(data):  # in each mapping: Private_*, then Anonymous
        if name == b"Anonymous":
            total += min(int(kib), private)
            private = 0
        else:
            private += int(kib)
    return total * 1024


@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[str | None, str | None]:
    """Mount points of the cgroup v1 memory hierarchy and of cgroup v2."""
    v1 = v2 = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                head, _, tail = line.partition(" - ")
                parts, rest = head.split(), tail.split()
                if len(parts) < 5 or len(rest) < 3:
                    continue
                if rest[0] == "cgroup2" and v2 is None:
                    v2 = parts[4]
                elif rest[0] == "cgroup" and "memory" in rest[2].split(",") and v1 is None:
                    v1 = parts[4]
    except OSError:
        pass
    return v1, v2


def memory_cgroup(pid: int | str = "self") -> tuple[str, str] | None:
    """(directory, version) of the memory cgroup of ``pid``: v1's memory
    hierarchy, else v2's cgroup if its memory controller is enabled there."""
    v1, v2 = _mounts()
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if v1 is not None and "memory" in controllers.split(","):
            return os.path.join(v1, path.lstrip("/")), "v1"
    for line in lines:
        hierarchy, _, path = (line.split(":", 2) + ["", ""])[:3]
        if v2 is not None and hierarchy == "0":
            directory = os.path.join(v2, path.lstrip("/"))
            if os.path.exists(os.path.join(directory, "memory.events")):
                return directory, "v2"
    return None


def cgroup_limit(pid: int | str = "self") -> int | None:
    """The memory limit of ``pid``'s memory cgroup in bytes, None when unlimited."""
    found = memory_cgroup(pid)
    if found is None:
        return None
    directory, version = found
    name = "memory.limit_in_bytes" if version == "v1" else "memory.max"
    try:
        with open(os.path.join(directory, name), "rb") as f:
            return int(f.read().strip())
    except (OSError, ValueError):  # "max"
        return None


def cgroup_headroom(pid: int | str = "self") -> int | None:
    """Bytes ``pid``'s memory cgroup may still charge (its limit less its
    usage), None when it has no limit or none can be read."""
    limit = cgroup_limit(pid)
    found = memory_cgroup(pid)
    if limit is None or found is None:
        return None
    directory, version = found
    name = "memory.usage_in_bytes" if version == "v1" else "memory.current"
    try:
        with open(os.path.join(directory, name), "rb") as f:
            return limit - int(f.read())
    except (OSError, ValueError):
        return None


def _counter(path: str, key: bytes = b"oom_kill") -> int | None:
    """The value of the line ``key N`` of ``path`` (memory.events, oom_control, vmstat)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                name, _, value = line.partition(b" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class OomSnapshot:
    """The OOM-kill counter that will tell whether a worker was OOM-killed:
    its memory cgroup's (``path``) or, without one, the system's; and its
    value when the worker started."""

    path: str
    count: int


def oom_snapshot(pid: int) -> OomSnapshot | None:
    """Read when worker ``pid`` starts: the counter its OOM kill would raise."""
    found = memory_cgroup(pid)
    if found is not None:
        directory, version = found
        path = os.path.join(directory, "memory.oom_control" if version == "v1"
                            else "memory.events")
        count = _counter(path)
        if count is not None:
            return OomSnapshot(path, count)
    count = _counter("/proc/vmstat")  # Linux >= 4.13
    return OomSnapshot("/proc/vmstat", count) if count is not None else None


def oom_evidence(snapshot: OomSnapshot | None, claimed: dict[str, int]) -> str | None:
    """For a worker that died of a SIGKILL nobody here sent: how we know the
    kernel's OOM killer sent it (its counter rose since ``snapshot``), or None.
    ``claimed`` maps each counter to the last count a death was put down to
    (this call updates it): one OOM kill explains one death, not every worker
    that happens to die of a SIGKILL later in the same cgroup."""
    if snapshot is None:
        return None
    now = _counter(snapshot.path)
    before = max(snapshot.count, claimed.get(snapshot.path, snapshot.count))
    if now is None or now <= before:
        return None
    claimed[snapshot.path] = before + 1
    where = ("the system's" if snapshot.path == "/proc/vmstat"
             else f"its memory cgroup's ({os.path.dirname(snapshot.path)})")
    return f"{where} oom_kill count rose from {snapshot.count} to {now} while it ran"
