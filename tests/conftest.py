"""Every test runs under the no-leak contract: when it ends, no worker process
is left and no shared-memory segment is held or mapped by anything it made."""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import shmrunner
from _sched_tasks import Gates
from _util import children, dev_shm_entries, shm_segments, wait_until

START_METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    """Each start method in turn."""
    return multiprocessing.get_context(request.param)


@pytest.fixture(autouse=True)
def no_leaks():
    before = set(children())
    yield
    # multiprocessing's forkserver and resource tracker serve the whole session
    # once started; they are not leaks.
    def leftover() -> list[int]:
        return [pid for pid in children() if pid not in before and not _is_session_helper(pid)]

    wait_until(lambda: not leftover(), timeout=15, message="worker processes to exit")
    gc.collect()
    # The recycled-segment cache keeps populated memfds on purpose; emptied,
    # nothing may be left (a segment still lent out would show here).
    shmrunner.set_shm_cache(0)
    shmrunner.set_shm_cache(None)
    # As long as the processes get (15 s): a loaded machine may be slow to run the
    # threads that drop the last references; a leak still fails here.
    wait_until(lambda: not shm_segments(), timeout=15,
               message="shared segments held by the test process to be released")
    assert dev_shm_entries() == []


def _is_session_helper(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"forkserver" in cmdline or b"resource_tracker" in cmdline


# A Scheduler with two local workers, and the gates its tasks wait on (opened
# before it shuts down, so no gated task outlives a test).
@pytest.fixture
def gates(tmp_path: Path) -> Gates:
    return Gates(tmp_path)


@pytest.fixture
def sched(gates: Gates) -> Iterator[shmrunner.Scheduler]:
    s = shmrunner.Scheduler(local_workers=2)
    try:
        yield s
    finally:
        gates.open_all()
        s.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Make daemons (``_daemon_tasks.Daemon``, or ``cls=`` a subclass; not
    started); every one is stopped, with all it started."""
    from _daemon_tasks import Daemon

    made: list[Daemon] = []

    def make(cls: type[Daemon] = Daemon, **options: Any) -> Daemon:
        d = cls(tmp_path, name=f"daemon{len(made)}", **options)
        made.append(d)
        return d

    yield make
    leftovers = [pid for d in made for pid in d.close()]
    assert not leftovers, f"processes outlived their daemon and were killed: {leftovers}"


# A real memory cgroup for the OOM-killer tests (test_memory_limit.py, test_slots.py):
# a process joins it by writing its pid to its cgroup.procs; its children inherit it.
def _memory_cgroup() -> tuple[str, str] | None:
    from shmrunner.worker._memwatch import memory_cgroup

    return memory_cgroup()


@pytest.fixture
def oom_cgroup(tmp_path: Path) -> Iterator[str]:
    """A memory cgroup of 256 MiB under this process's own (removed afterwards);
    skips when this host does not let us make one."""
    found = _memory_cgroup()
    if found is None:
        pytest.skip("no memory cgroup (v1 memory hierarchy, or v2 with memory) to nest one in")
    parent, version = found
    path = os.path.join(parent, f"shmrunner-test-{os.getpid()}-{tmp_path.name}")
    try:
        os.mkdir(path)
        limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        with open(os.path.join(path, limit_file), "w") as f:
            f.write(str(256 << 20))
        if version == "v2":
            with open(os.path.join(path, "memory.swap.max"), "w") as f:
                f.write("0")
    except OSError as exc:
        if os.path.isdir(path):
            os.rmdir(path)
        pytest.skip(f"cannot create a memory cgroup under {parent}: {exc}")
    try:
        yield path
    finally:
        def empty() -> bool:
            with open(os.path.join(path, "cgroup.procs")) as f:
                return not f.read().strip()

        wait_until(empty, timeout=15, message="the cgroup's processes to exit")
        os.rmdir(path)
