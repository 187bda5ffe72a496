"""Helpers shared by the tests: deadlines instead of sleeps, and leak probes."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any


def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.01, message: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail with ``message`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def children(pid: int | None = None) -> list[int]:
    """Live (not zombie) descendants of ``pid`` (default: this process)."""
    root = os.getpid() if pid is None else pid
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] == b"Z":
            continue
        parent_of[int(entry)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        current = frontier.pop()
        for child, parent in parent_of.items():
            if parent == current:
                found.append(child)
                frontier.append(child)
    return found


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


def run_script(tmp_path: Any, body: str, timeout: float = 60) -> Any:
    """``body`` (dedented) as a script of its own, so that its interpreter's
    exit is what is tested, with this checkout's shmrunner and the tests'
    task modules importable; the CompletedProcess, output captured as text."""
    import subprocess
    import sys
    import textwrap

    tests = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(str(tmp_path), "script.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])}
    return subprocess.run([sys.executable, script], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)


def has_closed_its_files(pid: int) -> bool:
    """Whether process ``pid`` is gone or has closed every file (its sockets'
    peers then see it gone). Stronger than not :func:`is_alive`: the leader of
    a process with threads is a zombie while another thread still tears the
    process down, its files open."""
    try:
        return not os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return True


def shm_segments(pid: int | str = "self") -> list[str]:
    """shmrunner memfds a process holds open or mapped (empty when none)."""
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/memfd:shmrunner"):
                found.append(f"fd {fd}")
        with open(f"/proc/{pid}/maps") as f:
            found += [line.strip() for line in f if "/memfd:shmrunner" in line]
    except OSError:
        pass
    return found


def dev_shm_entries() -> list[str]:
    try:
        return sorted(name for name in os.listdir("/dev/shm") if "shmrunner" in name)
    except FileNotFoundError:
        return []


def drop_shm_cache() -> None:
    """Give back the recycled-segment cache's pages (it keeps populated memfds
    on purpose), so that what remains in shm_segments() is what is in use."""
    import shmrunner

    shmrunner.set_shm_cache(0)
    shmrunner.set_shm_cache(None)


@contextlib.contextmanager
def running_pool(*args: Any, **kwargs: Any) -> Iterator[Any]:
    """A ``shmrunner.Pool(*args, **kwargs)``, terminated and joined on the way out."""
    import shmrunner

    pool = shmrunner.Pool(*args, **kwargs)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()
