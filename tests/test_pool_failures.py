"""Failure tests for shmrunner.Pool: real worker processes, real signals.

The reliability contract (DESIGN.md) under test:

* a worker killed at any moment never hangs the caller: the task it held fails
  with WorkerLostError, every other task completes, and the worker is replaced;
* workers never outlive their parent;
* no shared-memory segment (a ``/memfd:shmrunner`` fd or mapping) outlives its
  last user;
* shared memory unusable -> a single warning and a fallback to pickling.

Synchronisation is by handshake only: a task reports its pid in a file before it
blocks, a FIFO or a lock file gates it, and the test polls with
``_util.wait_until``. A segment is identified by its memfd inode, so the leak
probes never confuse our segments with those of other processes on the machine.

Tests marked ``xfail(strict=True)`` reproduce shmrunner bugs described in their
reason; they pass (and must then be unmarked) once the bug is fixed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.pool import MaybeEncodingError, RemoteTraceback
from typing import Any

import numpy as np
import pytest

import _failure_tasks as tasks
import shmrunner
from _util import (
    children,
    drop_shm_cache,
    has_closed_its_files,
    is_alive,
    running_pool,
    shm_segments,
    wait_until,
)
from shmrunner import (
    InitializerError,
    SharedMemoryError,
    TaskCancelledError,
    WorkerLostError,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
BIG = 64 * MiB  # bytes of the "large array" arguments
RESULT_TIMEOUT = 30  # a healthy result arrives in well under a second
# Where a test probes for a hang: long enough for a healthy pool on a loaded machine
# (a respawn under spawn), and under the 30 s a _SlowReduce holds its caller.
HANG_TIMEOUT = 20

# --- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _resource_tracker_running() -> None:
    """Start CPython's resource tracker before the first test.

    spawn/forkserver start it on first use and it lives for the whole session, like
    the forkserver (which conftest's leak check exempts); started here, it is in the
    "before" set of every test instead of showing up as a leaked child.
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def pool_pids(pool: shmrunner.Pool) -> list[int]:
    return [process.pid for process in pool._pool]


def read_pid(path: str, timeout: float = RESULT_TIMEOUT) -> int:
    wait_until(lambda: os.path.exists(path), timeout, message=f"a task to write its pid to {path}")
    with open(path) as f:
        return int(f.read())


def wait_replaced(pool: shmrunner.Pool, dead: int, size: int) -> list[int]:
    wait_until(lambda: len(pool_pids(pool)) == size and dead not in pool_pids(pool),
               RESULT_TIMEOUT, message=f"worker {dead} to be replaced")
    pids = pool_pids(pool)
    for pid in pids:
        assert is_alive(pid), f"pool reports worker {pid}, which is not running"
    return pids


def memfds(pid: int | str = "self") -> dict[int, int]:
    """shmrunner memfds a process holds (fd or mapping): {inode: size in bytes}."""
    found: dict[int, int] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        link = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(link).startswith("/memfd:shmrunner"):
                st = os.stat(link)
                found[st.st_ino] = max(found.get(st.st_ino, 0), st.st_size)
        except OSError:
            continue
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/memfd:shmrunner" in line:
                    fields = line.split()
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    inode = int(fields[4])
                    found[inode] = max(found.get(inode, 0), hi - lo)
    except OSError:
        pass
    return found


def holders(inodes: set[int]) -> list[tuple[int, int]]:
    """(pid, inode) for every process on the machine holding one of ``inodes``."""
    held = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            held += [(int(entry), inode) for inode in memfds(int(entry)) if inode in inodes]
    return held


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def kill_strays(processes: dict[int, int | None]) -> None:
    """SIGKILL those of ``{pid: start time}`` still running (never a reused pid)."""
    for pid, started in processes.items():
        if started is not None and start_time(pid) == started and is_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def outcome(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except BaseException as exc:  # noqa: BLE001 (SystemExit is an outcome here)
        return False, exc


def run_script(tmp_path: Any, source: str, *args: str,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=timeout, env=script_env(), cwd=str(tmp_path))


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, env.get("PYTHONPATH")]))
    return env


# --- 1. a worker SIGKILLed mid-task, holding a 64 MiB argument -------------------------------


def _kill_cases() -> list[Any]:
    cases = []
    for method in ("fork", "spawn", "forkserver"):
        cases.append(pytest.param(method, "plain", id=f"{method}-plain"))
        cases.append(pytest.param(method, "shared", id=f"{method}-shared"))
    return cases


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("method", "kind"), _kill_cases())
def test_worker_sigkilled_mid_task(method: str, kind: str, tmp_path: Any) -> None:
    """Only the killed worker's task fails; its queued task and every other one
    completes; the worker is replaced; no memfd survives anywhere."""
    ctx = multiprocessing.get_context(method)
    victim_index = 1
    pid_file = str(tmp_path / "victim")
    plain = np.arange(BIG // 8, dtype=np.float64)
    arg = shmrunner.share(plain) if kind == "shared" else plain
    del plain
    items = [(i, arg, pid_file if i == victim_index else None) for i in range(6)]
    expected = [i + tasks.checksum(arg) for i in range(6)]

    with running_pool(2, context=ctx) as pool:
        before = pool_pids(pool)
        results = pool.imap(tasks.checksum_or_block, items)
        victim = read_pid(pid_file)
        assert victim in before
        held = memfds(victim)
        assert max(held.values(), default=0) >= BIG, (
            f"the victim should hold the 64 MiB argument while it blocks: {held}")

        os.kill(victim, signal.SIGKILL)
        outcomes = [outcome(lambda: results.next(timeout=RESULT_TIMEOUT)) for _ in items]
        with pytest.raises(StopIteration):
            results.next(timeout=RESULT_TIMEOUT)

        ok, error = outcomes[victim_index]
        assert not ok and isinstance(error, WorkerLostError), error
        assert error.pid == victim
        assert error.exitcode == -signal.SIGKILL
        assert error.signal == signal.SIGKILL
        for i, (ok, value) in enumerate(outcomes):
            if i != victim_index:
                assert ok and value == expected[i], f"task {i}: {value!r}"

        after = wait_replaced(pool, victim, 2)
        assert set(after) != set(before)
        assert pool.map(tasks.add_one, range(8)) == list(range(1, 9))

        # Drop every reference to the arguments and results: nothing may hold a segment.
        outcomes = error = value = results = items = arg = None  # type: ignore[assignment]
        gc.collect()
        drop_shm_cache()
        # Under fork, a replacement worker forked while the parent held the shared
        # array inherits it (fork semantics, documented in shm.py) until it exits.
        inherited = method == "fork" and kind == "shared"
        wait_until(lambda: not shm_segments() and (
                   inherited or not any(shm_segments(p) for p in after)),
                   HANG_TIMEOUT, message="the parent and the workers to release every segment")
        if not inherited:
            assert holders(set(held)) == [], "the victim's segments outlived it"
    wait_until(lambda: holders(set(held)) == [], HANG_TIMEOUT,
               message="the victim's segments to be released once the pool is gone")


# --- 2. a task calling os._exit ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_task_calling_os_exit(ctx: multiprocessing.context.BaseContext) -> None:
    with running_pool(2, context=ctx) as pool:
        before = pool_pids(pool)
        with pytest.raises(WorkerLostError) as info:
            pool.apply_async(tasks.exit_with, (3,)).get(timeout=RESULT_TIMEOUT)
        assert info.value.exitcode == 3
        assert info.value.signal is None
        assert info.value.pid in before
        wait_replaced(pool, info.value.pid, 2)

        # Inside a map: the map fails with the lost worker, the pool goes on.
        with pytest.raises(WorkerLostError) as info:
            pool.map(tasks.add_one_or_exit, [1, 2, -4, 5], chunksize=1)
        assert info.value.exitcode == 4
        wait_replaced(pool, info.value.pid, 2)
        assert pool.map(tasks.add_one, range(20)) == list(range(1, 21))
        assert pool.apply(tasks.add_one, (41,)) == 42


@pytest.mark.timeout(60)
def test_a_worker_that_dies_while_a_process_it_forked_lives_is_replaced_at_once(
        ctx: multiprocessing.context.BaseContext, tmp_path: Any) -> None:
    """The helper holds the worker's copies of its sentinel pipe and channel
    socket, so neither reports the death; the pool must still see it."""
    release = tmp_path / "release"
    helpers: list[int] = []
    try:
        with running_pool(1, context=ctx) as pool:
            helpers.append(pool.apply(tasks.fork_helper, (str(release),)))
            with pytest.raises(WorkerLostError) as info:
                pool.apply_async(tasks.exit_with, (3,)).get(timeout=HANG_TIMEOUT)
            assert info.value.exitcode == 3
            assert pool.apply(tasks.add_one, (41,)) == 42
            # The replacement forks one too; close + join still end with the worker.
            helpers.append(pool.apply(tasks.fork_helper, (str(release),)))
            pool.close()
            pool.join()
            assert pool_pids(pool) == []
            # Both deaths were seen while the helpers still lived.
            assert all(is_alive(pid) for pid in helpers)
    finally:
        release.touch()
        wait_until(lambda: not any(is_alive(pid) for pid in helpers), timeout=30,
                   message="the helpers to exit")


@pytest.mark.timeout(60)
def test_worker_death_is_blamed_on_the_task_that_killed_it(tmp_path: Any) -> None:
    """Tiny tasks queued back to back, then one that ends the worker: only that one
    fails, it runs exactly once, and every tiny task before and after it returns."""
    ctx = multiprocessing.get_context("fork")
    runs = tmp_path / "killer-runs"
    with running_pool(1, context=ctx) as pool:
        for trial in range(3):
            # Tiny tasks first: the pool lets a worker this fast hold many at once.
            assert pool.map(tasks.add_one, range(500), chunksize=1) == list(range(1, 501))
            gate = str(tmp_path / f"gate-{trial}")
            os.mkfifo(gate)
            # The worker waits at the gate while the rest is queued in its socket.
            gated = pool.apply_async(tasks.wait_gate, (gate,))
            before = [pool.apply_async(tasks.add_one, (i,)) for i in range(12)]
            killer = pool.apply_async(tasks.append_line_and_exit, (str(runs), 3))
            after = [pool.apply_async(tasks.add_one, (i,)) for i in range(4)]
            with open(gate, "w") as f:
                f.write("go")
            assert gated.get(timeout=RESULT_TIMEOUT) == "go"
            outcomes = [outcome(lambda r=r: r.get(timeout=RESULT_TIMEOUT)) for r in before]
            assert outcomes == [(True, i + 1) for i in range(12)], f"trial {trial}"
            with pytest.raises(WorkerLostError) as info:
                killer.get(timeout=RESULT_TIMEOUT)
            assert info.value.exitcode == 3
            assert [r.get(timeout=RESULT_TIMEOUT) for r in after] == [1, 2, 3, 4]
            assert len(runs.read_text().splitlines()) == trial + 1, "the killer ran again"


@pytest.mark.timeout(60)
def test_killer_dispatched_with_large_tasks_runs_once(tmp_path: Any) -> None:
    """A map sends a worker its tasks in one write; the first kills the worker while
    the large one behind it is still being written. Only the first fails, once."""
    runs = tmp_path / "killer-runs"
    large = b"x" * (4 * MiB)  # pickled inline: more than a socket buffer holds
    with running_pool(1, context=multiprocessing.get_context("fork")) as pool:
        result = pool.map_async(tasks.exit_or_len,
                                [(str(runs), b""), (None, large), (None, large)], chunksize=1)
        with pytest.raises(WorkerLostError) as info:
            result.get(timeout=HANG_TIMEOUT)
        assert info.value.exitcode == 3
        assert len(runs.read_text().splitlines()) == 1, "the task that killed its worker ran again"
        assert pool.map(tasks.exit_or_len, [(None, large)] * 3, chunksize=1) == [4 * MiB] * 3


# --- 3. SIGKILL of an idle worker --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_idle_worker_sigkilled_is_replaced(ctx: multiprocessing.context.BaseContext) -> None:
    with running_pool(2, context=ctx) as pool:
        assert pool.map(tasks.add_one, range(8)) == list(range(1, 9))  # both up, now idle
        before = pool_pids(pool)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        after = wait_replaced(pool, victim, 2)
        assert before[1] in after

        ran_on = pool.map(tasks.getpid, range(40), chunksize=1)
        assert set(ran_on) <= set(after)
        results = [pool.apply_async(tasks.add_one, (i,)) for i in range(20)]
        assert [r.get(timeout=RESULT_TIMEOUT) for r in results] == list(range(1, 21))


def _module_locks() -> list[str]:
    """'module:name' of every lock shmrunner keeps at module level."""
    import importlib
    import pkgutil

    lock_types = (type(threading.Lock()), type(threading.RLock()))
    found = []
    for info in pkgutil.walk_packages(shmrunner.__path__, "shmrunner."):
        module = importlib.import_module(info.name)
        found += [f"{info.name}:{name}" for name, value in vars(module).items()
                  if isinstance(value, lock_types)]
    return sorted(found)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", _module_locks())
def test_a_worker_forked_while_a_module_lock_is_held_still_serves(where: str) -> None:
    """fork() copies a lock held by another thread as held, forever: a worker
    respawned while some thread of the pool's process holds one of
    shmrunner's module locks must not need it (or must renew it) on its way
    to serving tasks, or every task sent to it would hang."""
    import importlib

    module_name, name = where.split(":")
    with running_pool(1, context=multiprocessing.get_context("fork")) as pool:
        assert pool.apply(tasks.add_one, (1,)) == 2
        (victim,) = pool_pids(pool)
        lock = getattr(importlib.import_module(module_name), name)
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with lock:
                held.set()
                release.wait(RESULT_TIMEOUT)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        try:
            assert held.wait(RESULT_TIMEOUT)
            os.kill(victim, signal.SIGKILL)
            # Replaced while the lock is held, unless reaping needs the lock itself
            # (then the fork follows its release): either way the pool must serve.
            deadline = time.monotonic() + 5.0
            while pool_pids(pool) in ([], [victim]) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            release.set()
            holder.join(RESULT_TIMEOUT)
        assert pool.apply_async(tasks.add_one, (2,)).get(timeout=HANG_TIMEOUT) == 3


@pytest.mark.timeout(60)
def test_task_sent_to_dead_idle_worker_is_not_lost() -> None:
    """A worker dies while idle and work arrives before the engine noticed: the
    work never started, so nothing may fail.

    The window is made deterministic by parking the engine's manager thread in
    a Scheduler future's done-callback (they run on the thread that settles
    the future, as in concurrent.futures) while the worker dies. (The Pool's
    callbacks run on a thread of their own, as in multiprocessing.)
    """
    with shmrunner.Scheduler(local_workers=2) as sched:
        victim = sched.submit(os.getpid).result(timeout=RESULT_TIMEOUT)
        in_callback, release = threading.Event(), threading.Event()

        def park(_: object) -> None:
            in_callback.set()
            release.wait(RESULT_TIMEOUT)

        sched.submit(tasks.add_one, 0).add_done_callback(park)
        assert in_callback.wait(RESULT_TIMEOUT)
        os.kill(victim, signal.SIGKILL)
        # Its channel closed: a task sent while it was dying would be taken by
        # the kernel and lost with it, indistinguishable from one it ran. The
        # kernel releases a dying process's files a few milliseconds after its
        # fd table empties (a deferred fput): nothing a test can wait on.
        wait_until(lambda: has_closed_its_files(victim), RESULT_TIMEOUT,
                   message="the worker to die")
        time.sleep(0.1)
        futures = [sched.submit(tasks.add_one, i) for i in range(6)]
        release.set()
        outcomes = [outcome(lambda f=f: f.result(timeout=RESULT_TIMEOUT)) for f in futures]
        assert outcomes == [(True, i + 1) for i in range(6)]


# --- 4. crash matrix (after loky's crash_cases) ---------------------------------------------


def _expect(exc_type: type[BaseException] | tuple[type[BaseException], ...],
            check: Callable[[Any], bool] = lambda e: True) -> Callable[[BaseException], None]:
    def verify(error: BaseException) -> None:
        assert isinstance(error, exc_type) and check(error), (
            f"expected {exc_type}, got {error!r}")
    return verify


def _lost(exitcode: int) -> Callable[[BaseException], None]:
    return _expect(WorkerLostError, lambda e: e.exitcode == exitcode)


def _remote_cause(e: BaseException) -> bool:
    return isinstance(e.__cause__, RemoteTraceback)


# id, fn, args, expected error, the worker dies, dispatched by the manager thread, xfail
CRASH_CASES: list[tuple[Any, ...]] = [
    ("arg-unpicklable", tasks.identity, (threading.Lock(),),
     _expect(TypeError, lambda e: "pickle" in str(e)), False, False, None),
    ("arg-error-at-pickle", tasks.identity, (tasks.ErrorAtPickle(),),
     _expect(tasks.SaboteurError), False, False, None),
    ("arg-error-at-pickle-deferred", tasks.identity, (tasks.ErrorAtPickle(),),
     _expect(tasks.SaboteurError), False, True, None),
    ("arg-exit-at-pickle", tasks.identity, (tasks.ExitAtPickle(),),
     _expect(SystemExit, lambda e: e.code == 5), False, False, None),
    ("arg-exit-at-pickle-deferred", tasks.identity, (tasks.ExitAtPickle(),),
     _expect(SystemExit, lambda e: e.code == 5), False, True, None),
    ("arg-error-at-unpickle", tasks.identity, (tasks.ErrorAtUnpickle(),),
     _expect(tasks.SaboteurError, _remote_cause), False, False, None),
    ("arg-exit-at-unpickle", tasks.identity, (tasks.ExitAtUnpickle(),),
     _expect(SystemExit, lambda e: e.code == 7), False, False, None),
    ("arg-os-exit-at-unpickle", tasks.identity, (tasks.CExitAtUnpickle(),),
     _lost(11), True, False, None),
    ("arg-os-exit-in-setstate", tasks.identity, (tasks.SetstateExit(),),
     _lost(12), True, False, None),
    ("arg-segfault-at-unpickle", tasks.identity, (tasks.CrashAtUnpickle(),),
     _lost(-signal.SIGSEGV), True, False, None),
    ("task-raises", tasks.raise_error, (RuntimeError, "boom"),
     _expect(RuntimeError, lambda e: str(e) == "boom" and _remote_cause(e)), False, False, None),
    ("task-segfault", tasks.segfault, (), _lost(-signal.SIGSEGV), True, False, None),
    ("result-unpicklable", tasks.unpicklable_result, (),
     _expect(MaybeEncodingError), False, False, None),
    ("result-error-at-pickle", tasks.return_instance, (tasks.ErrorAtPickle,),
     _expect(MaybeEncodingError), False, False, None),
    # SystemExit while pickling the result ends the worker today (loop._encode catches
    # only Exception); a MaybeEncodingError would serve the contract as well.
    ("result-exit-at-pickle", tasks.return_instance, (tasks.ExitAtPickle,),
     _expect((WorkerLostError, MaybeEncodingError),
             lambda e: not isinstance(e, WorkerLostError) or e.exitcode == 5), True, False, None),
    ("result-error-at-unpickle", tasks.return_instance, (tasks.ErrorAtUnpickle,),
     _expect(tasks.SaboteurError), False, False, None),
    ("result-exit-at-unpickle", tasks.return_instance, (tasks.ExitAtUnpickle,),
     _expect(SystemExit, lambda e: e.code == 7), False, False, None),
]


def _crash_params() -> list[Any]:
    params = []
    for case_id, fn, args, verify, kills, deferred, bug in CRASH_CASES:
        marks = [pytest.mark.xfail(reason=bug, strict=True)] if bug else []
        # Start methods differ in how the replacement starts, nothing else.
        for method in ("fork", "spawn", "forkserver") if kills else ("fork",):
            params.append(pytest.param(method, fn, args, verify, kills, deferred,
                                       id=f"{case_id}-{method}", marks=marks))
    return params


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("method", "fn", "args", "verify", "kills", "deferred"),
                         _crash_params())
def test_crash_matrix(method: str, fn: Callable[..., Any], args: tuple[Any, ...],
                      verify: Callable[[BaseException], None], kills: bool, deferred: bool,
                      tmp_path: Any) -> None:
    """Each failure lands on its own task; the tasks around it complete; the pool
    stays usable. One worker, so the neighbours share its queue."""
    ctx = multiprocessing.get_context(method)
    with running_pool(1, context=ctx) as pool:
        before = pool_pids(pool)
        neighbours = []
        if deferred:
            # The worker is busy (a gated task, another queued behind it), so the bad
            # task waits in the pool and is pickled later, on the manager thread.
            gate = str(tmp_path / "gate")
            os.mkfifo(gate)
            neighbours.append((pool.apply_async(tasks.wait_gate, (gate,)), "go"))
            neighbours.append((pool.apply_async(tasks.add_one, (1,)), 2))
        # Otherwise the worker is idle: the caller's thread pickles and sends it now.
        ok, bad = outcome(lambda: pool.apply_async(fn, args))
        neighbours += [(pool.apply_async(tasks.add_one, (i,)), i + 1) for i in (2, 3, 4)]
        if deferred:
            with open(gate, "w") as f:
                f.write("go")
        if ok:
            ok, error = outcome(lambda: bad.get(timeout=HANG_TIMEOUT))
        else:
            error = bad  # raised by apply_async itself, in the caller: also fine
        assert not ok, f"the bad task returned {error!r}"
        verify(error)
        if kills:
            assert error.pid in before
        for result, expected in neighbours:
            assert result.get(timeout=RESULT_TIMEOUT) == expected
        assert pool.map(tasks.add_one, range(6), chunksize=1) == list(range(1, 7))
        assert len(pool_pids(pool)) == 1
        if not kills:
            assert pool_pids(pool) == before


# --- 5. the parent SIGKILLed mid-map over large arrays -----------------------------------------

PARENT_SCRIPT = """
import multiprocessing, sys
import numpy as np
import shmrunner
import _failure_tasks as tasks

if __name__ == "__main__":
    method, prefix = sys.argv[1], sys.argv[2]
    pool = shmrunner.Pool(2, context=multiprocessing.get_context(method))
    tasks.report(prefix + "pids", " ".join(str(p.pid) for p in pool._pool))
    arrays = [np.full(8 << 20, float(i)) for i in range(4)]  # 4 x 64 MiB
    pool.map(tasks.checksum_or_block, [(i, a, prefix + str(i)) for i, a in enumerate(arrays)],
             chunksize=1)
    print("pool.map returned, but its tasks block forever", flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_parent_sigkilled_mid_map(method: str, tmp_path: Any) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT_SCRIPT))
    prefix = str(tmp_path / "report-")
    with open(tmp_path / "stderr", "w") as stderr:
        parent = subprocess.Popen([sys.executable, str(script), method, prefix],
                                  stdout=subprocess.DEVNULL, stderr=stderr, env=script_env())
    tree: dict[int, int | None] = {}
    try:
        def reported() -> bool:
            if parent.poll() is not None:
                raise AssertionError(f"the script died: {(tmp_path / 'stderr').read_text()}")
            return all(os.path.exists(prefix + name) for name in ("pids", "0", "1"))

        wait_until(reported, RESULT_TIMEOUT, message="the script's workers to block in map")
        with open(prefix + "pids") as f:
            workers = [int(pid) for pid in f.read().split()]
        blocked = {read_pid(prefix + "0"), read_pid(prefix + "1")}
        assert blocked == set(workers)
        for pid in workers:  # each holds the 64 MiB array of its running task
            assert max(memfds(pid).values(), default=0) >= BIG
        inodes = set(memfds(parent.pid))
        for pid in workers:
            inodes |= set(memfds(pid))
        tree = {pid: start_time(pid) for pid in children(parent.pid)}
        assert set(workers) <= set(tree)

        os.kill(parent.pid, signal.SIGKILL)
        assert parent.wait(timeout=RESULT_TIMEOUT) == -signal.SIGKILL

        wait_until(lambda: not any(is_alive(pid) for pid in workers), HANG_TIMEOUT,
                   message="the workers of the SIGKILLed parent to exit")
        wait_until(lambda: not any(is_alive(pid) for pid in tree), HANG_TIMEOUT,
                   message="every process the parent started to exit")
        assert holders(inodes) == [], "a segment outlived the parent and its workers"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        kill_strays(tree)


# --- 6. an initializer that raises ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_initializer_raising_breaks_pool_without_respawning(
        ctx: multiprocessing.context.BaseContext, tmp_path: Any) -> None:
    runs = tmp_path / "initializer-runs"
    runs.touch()

    def count() -> int:
        return len(runs.read_text().splitlines())

    processes = 2
    with running_pool(processes, initializer=tasks.append_line_and_raise,
                      initargs=(str(runs),), context=ctx) as pool:
        # The pool learns of the failure and does not start workers again.
        wait_until(lambda: count() >= 1 and not pool_pids(pool), RESULT_TIMEOUT,
                   message="the workers whose initializer failed to be gone")
        started = count()
        assert 1 <= started <= processes

        for submit in (lambda: pool.apply(tasks.add_one, (1,)),
                       lambda: pool.map(tasks.add_one, range(5)),
                       lambda: pool.apply_async(tasks.add_one, (1,)).get(timeout=HANG_TIMEOUT),
                       lambda: list(pool.imap(tasks.add_one, range(5)))):
            with pytest.raises(InitializerError) as info:
                submit()
            assert isinstance(info.value.__cause__, ValueError)
            assert "broken on purpose" in str(info.value.__cause__)
        assert count() == started, "the failing initializer ran again"
        assert pool_pids(pool) == []

        pool.close()
        joiner = threading.Thread(target=pool.join, daemon=True)
        joiner.start()
        joiner.join(HANG_TIMEOUT)
        assert not joiner.is_alive(), "close() + join() hang on a broken pool"


@pytest.mark.timeout(60)
def test_initializer_raising_fails_tasks_already_sent(tmp_path: Any) -> None:
    """The usual case: a slow initializer fails after tasks were dispatched to it.
    The initializer blocks on a lock the test holds, so they are, deterministically."""
    runs, lock_path = tmp_path / "initializer-runs", tmp_path / "lock"
    lock_path.touch()
    with open(lock_path) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pool = shmrunner.Pool(2, initializer=tasks.append_line_wait_and_raise,
                              initargs=(str(runs), str(lock_path)),
                              context=multiprocessing.get_context("fork"))
        try:
            results = [pool.apply_async(tasks.add_one, (i,)) for i in range(6)]
            fcntl.flock(lock, fcntl.LOCK_UN)
            for result in results:
                with pytest.raises(InitializerError) as info:
                    result.get(timeout=HANG_TIMEOUT)
                assert isinstance(info.value.__cause__, ValueError)
            pool.close()
            joiner = threading.Thread(target=pool.join, daemon=True)
            joiner.start()
            joiner.join(HANG_TIMEOUT)
            assert not joiner.is_alive(), "close() + join() hang on a broken pool"
            assert len(runs.read_text().splitlines()) <= 2
        finally:
            pool.terminate()
            pool.join()


@pytest.mark.timeout(60)
def test_imap_on_broken_pool_stops_reading_input(tmp_path: Any) -> None:
    runs = tmp_path / "initializer-runs"
    pool = shmrunner.Pool(2, initializer=tasks.append_line_and_raise, initargs=(str(runs),),
                          context=multiprocessing.get_context("fork"))
    read = 0

    def endless() -> Iterator[int]:
        nonlocal read
        for i in itertools.count():
            read += 1
            yield i

    try:
        wait_until(lambda: not pool_pids(pool), RESULT_TIMEOUT,
                   message="the workers whose initializer failed to be gone")
        results = pool.imap(tasks.add_one, endless())
        with pytest.raises(InitializerError):
            results.next(timeout=HANG_TIMEOUT)
        pool.close()
        joiner = threading.Thread(target=pool.join, daemon=True)
        joiner.start()
        joiner.join(HANG_TIMEOUT)
        assert not joiner.is_alive(), f"join() hangs; the feeder has read {read} items"
    finally:
        pool.terminate()  # also stops the feeder, so the thread ends
        pool.join()


# --- 7. shared memory unusable: fallback to pickling ---------------------------------------------

FSIZE_SCRIPT = """
import json, multiprocessing, resource, sys, warnings

# Before anything else, so that the pool's workers inherit it: no file (and no
# memfd) may grow past 1 MiB; writing past it fails with EFBIG.
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

import numpy as np
import shmrunner
import _failure_tasks as tasks

if __name__ == "__main__":
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays = [np.full(1 << 20, float(i)) for i in range(6)]  # 8 MiB each
        with shmrunner.Pool(2, context=multiprocessing.get_context(sys.argv[1])) as pool:
            doubled = pool.map(tasks.double, arrays, chunksize=1)
            sums = pool.map(tasks.checksum, arrays, chunksize=1)
            pool.close()
            pool.join()
    print(json.dumps({
        "doubled_ok": all(np.array_equal(d, a * 2) for d, a in zip(doubled, arrays)),
        "sums_ok": sums == [tasks.checksum(a) for a in arrays],
        "fallback_warnings": sum(issubclass(w.category, shmrunner.SharedMemoryUnavailableWarning)
                                 for w in caught),
        "other_warnings": [str(w.message) for w in caught
                           if not issubclass(w.category, shmrunner.SharedMemoryUnavailableWarning)],
    }))
"""


@pytest.mark.timeout(60)
def test_shared_memory_unusable_falls_back_to_pickling(
        ctx: multiprocessing.context.BaseContext, tmp_path: Any) -> None:
    done = run_script(tmp_path, FSIZE_SCRIPT, ctx.get_start_method())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"doubled_ok": True, "sums_ok": True, "fallback_warnings": 1,
                      "other_warnings": []}, done.stderr


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("shape", "dtype"), [(1 << 50, float), ((1 << 25, 1 << 25), np.uint8)])
def test_zeros_larger_than_memory_raises_one_line(shape: Any, dtype: Any) -> None:
    with pytest.raises(SharedMemoryError) as info:
        shmrunner.zeros(shape, dtype=dtype)
    message = str(info.value)
    assert message and "\n" not in message
    assert isinstance(info.value, MemoryError)
    assert shm_segments() == []


# --- 8. bounded memory: imap over a long lazy input ----------------------------------------------


@pytest.mark.timeout(60)
def test_imap_over_lazy_input_keeps_shared_memory_bounded() -> None:
    count, elements = 10_000, MiB // 8  # 10,000 arrays of 1 MiB
    bound = 64 * MiB
    produced = 0

    def arrays() -> Iterator[np.ndarray]:
        nonlocal produced
        for i in range(count):
            produced += 1
            yield np.full(elements, float(i))

    with running_pool(2, context=multiprocessing.get_context("fork")) as pool:
        pids = [os.getpid(), *pool_pids(pool)]
        peak, samples, stop = 0, 0, threading.Event()

        def sample() -> None:
            nonlocal peak, samples
            while not stop.is_set():
                held: dict[int, int] = {}
                for pid in pids:
                    held.update(memfds(pid))  # one segment counts once, wherever mapped
                peak = max(peak, sum(held.values()))
                samples += 1
                stop.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            total, consumed, ahead = 0.0, 0, 0
            for value in pool.imap(tasks.checksum, arrays()):
                total += value
                consumed += 1
                ahead = max(ahead, produced - consumed)
        finally:
            stop.set()
            sampler.join()

    assert consumed == count
    assert total == sum(2.0 * i + elements for i in range(count))
    assert samples > 10 and peak > 0, "the probe never saw a segment: is it broken?"
    assert peak < bound, f"{peak / MiB:.0f} MiB of shared memory held at once"
    # The feeder reads the input at the pool's pace (a few items past the tasks in
    # flight); results the consumer has not read yet are buffered, as in
    # multiprocessing, so the lag behind *consumed* results varies with scheduling.
    # What must never happen is multiprocessing.Pool's behaviour: the whole input
    # drained up front.
    assert ahead < count // 10, f"the input was read {ahead} items ahead of the results"


# --- 9. terminate() while tasks run --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_terminate_while_tasks_run(ctx: multiprocessing.context.BaseContext,
                                   tmp_path: Any) -> None:
    """Running tasks are cancelled, every worker is gone, join() returns."""
    pool = shmrunner.Pool(2, context=ctx)
    try:
        workers = pool_pids(pool)
        paths = [str(tmp_path / f"running-{i}") for i in range(2)]
        running = [pool.apply_async(tasks.hold_and_block, (path,)) for path in paths]
        assert {read_pid(path) for path in paths} == set(workers)
        pool.terminate()
        pool.join()
        for result in running:
            assert result.ready(), "a result is still pending after terminate() + join()"
            with pytest.raises(TaskCancelledError):
                result.get(timeout=0)
        assert not any(is_alive(pid) for pid in workers)
        assert pool_pids(pool) == []
        with pytest.raises(ValueError):
            pool.apply_async(tasks.add_one, (1,))
    finally:
        pool.terminate()
        pool.join()


@pytest.mark.timeout(60)
def test_leaving_a_with_block_ends_the_workers_before_it_returns(tmp_path: Any) -> None:
    """``__exit__`` is terminate(), which (as in multiprocessing) returns once
    the workers are gone, busy ones included."""
    path = str(tmp_path / "running")
    pool = shmrunner.Pool(2)
    try:
        with pool:
            workers = pool_pids(pool)
            running = pool.apply_async(tasks.hold_and_block, (path,))
            read_pid(path)
            assert pool.map(tasks.add_one, range(4)) == [1, 2, 3, 4]
        assert not any(is_alive(pid) for pid in workers)  # no wait: gone already
        assert running.ready()
    finally:
        pool.terminate()
        pool.join()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("front", ["pool", "scheduler"])
def test_close_ends_when_a_worker_never_exits(front: str, caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that never acts on its stop (frozen with SIGSTOP here; in the
    wild, one wedged on a lock it inherited mid-use from fork) is killed once
    its grace (SHMRUNNER_STOP_GRACE) has run out: close() + join() and
    shutdown(wait=True) end, the process is gone, and a warning names it."""
    caplog.set_level("WARNING", logger="shmrunner.pool")
    monkeypatch.setenv("SHMRUNNER_STOP_GRACE", "2")
    if front == "pool":
        pool = shmrunner.Pool(1, context=multiprocessing.get_context("fork"))
        pid = pool.apply(os.getpid)

        def close() -> None:
            pool.close()
            pool.join()
    else:
        scheduler = shmrunner.Scheduler(local_workers=1)
        pid = scheduler.submit(os.getpid).result(timeout=RESULT_TIMEOUT)

        def close() -> None:
            scheduler.shutdown(wait=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        closing = threading.Thread(target=close, daemon=True)
        closing.start()
        closing.join(HANG_TIMEOUT + 10)
        assert not closing.is_alive(), "closing waited forever for a worker that never exits"
        assert not is_alive(pid)
        assert any(f"worker pid {pid} did not exit" in record.getMessage()
                   for record in caplog.records)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if front == "pool":
            pool.terminate()
            pool.join()
        else:
            scheduler.shutdown(wait=False, cancel_futures=True)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "1e9"])
def test_a_bad_stop_grace_is_refused_in_one_line(value: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMRUNNER_STOP_GRACE", value)
    with pytest.raises(shmrunner.ConfigError, match="SHMRUNNER_STOP_GRACE=.*set it to"):
        shmrunner.Pool(1)


@pytest.mark.timeout(60)
def test_terminate_cancels_queued_tasks(tmp_path: Any) -> None:
    """Two workers, six blocking tasks: two run, two wait in the workers' queues,
    two wait in the pool. After terminate() + join() all six are cancelled."""
    pool = shmrunner.Pool(2, context=multiprocessing.get_context("fork"))
    try:
        paths = [str(tmp_path / f"task-{i}") for i in range(6)]
        results = [pool.apply_async(tasks.hold_and_block, (path,)) for path in paths]
        wait_until(lambda: sum(os.path.exists(p) for p in paths) == 2, RESULT_TIMEOUT,
                   message="two tasks to run")
        pool.terminate()
        pool.join()
        for i, result in enumerate(results):
            assert result.ready(), f"task {i} is still pending after terminate() + join()"
            with pytest.raises(TaskCancelledError):
                result.get(timeout=0)
    finally:
        pool.terminate()
        pool.join()


_HANDLER_SCRIPT = """
import os, signal, sys, time
import shmrunner
def on_term(signum, frame):  # an application's own shutdown hook
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.getpid()}\\n")
signal.signal(signal.SIGTERM, on_term)
with shmrunner.Pool(2, context=__import__("multiprocessing").get_context(sys.argv[2])) as pool:
    assert pool.map(abs, [-1, -2, -3, -4]) == [1, 2, 3, 4]
    started = time.monotonic()
    pool.terminate()
    pool.join()
    print(f"{time.monotonic() - started:.3f}")
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_terminate_does_not_run_the_parents_sigterm_handler_in_workers(tmp_path: Any,
                                                                       method: str) -> None:
    """A service that installed a SIGTERM handler for itself and uses a Pool:
    terminate() must end the workers, not run that handler in each of them
    (which then lived on until the SIGKILL a second later)."""
    ran = tmp_path / "handler-ran-in"
    out = subprocess.run([sys.executable, "-c", _HANDLER_SCRIPT, str(ran), method],
                         capture_output=True, text=True, timeout=50, check=True)
    assert not ran.exists(), f"the parent's SIGTERM handler ran in workers {ran.read_text()}"
    assert float(out.stdout) < 0.9  # ended by SIGTERM, not by the SIGKILL after 1 s


@pytest.mark.timeout(60)
def test_a_worker_sent_sigterm_keeps_serving_and_its_children_still_stop() -> None:
    """A SIGTERM to the whole process group (Slurm's, a shell's) must leave the
    workers to their pool, which drains them; a process a task starts must
    still stop on SIGTERM (the workers' handler is not inherited through exec)."""
    with shmrunner.Pool(1) as pool:
        pid = pool.apply(os.getpid)
        os.kill(pid, signal.SIGTERM)
        assert pool.apply(os.getpid) == pid  # the same process serves on
        assert pool.apply(tasks.child_stops_on_sigterm) == -signal.SIGTERM


@pytest.mark.timeout(60)
def test_terminate_ends_imap_iterator(tmp_path: Any) -> None:
    """imap over an endless input: after terminate() + join(), reading the iterator
    gives cancelled items and then ends; it never blocks.

    ``maxtasksperchild=1`` sends each worker a single task, so this checks the
    feeder alone (tasks queued in a worker are the test above).
    """
    pool = shmrunner.Pool(2, maxtasksperchild=1, context=multiprocessing.get_context("fork"))
    try:
        paths = (str(tmp_path / f"item-{i}") for i in itertools.count())  # endless
        results = pool.imap(tasks.hold_and_block, paths)
        wait_until(lambda: len(list(tmp_path.glob("item-*"))) >= 2, RESULT_TIMEOUT,
                   message="two items to run")
        pool.terminate()
        pool.join()
        seen = 0
        while True:
            ok, item = outcome(lambda: results.next(timeout=0))
            if not ok and isinstance(item, StopIteration):
                break
            assert not ok and isinstance(item, TaskCancelledError), (
                f"item {seen}: {item!r} (a TimeoutError means next() would block forever)")
            seen += 1
        assert seen >= 2
    finally:
        pool.terminate()
        pool.join()


# --- user code never runs under the pool's lock ----------------------------------------------


class _SlowReduce:
    """An argument whose pickling blocks until the test releases it."""

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        self.entered = entered
        self.release = release

    def __reduce__(self) -> tuple[Any, ...]:
        self.entered.set()
        self.release.wait(RESULT_TIMEOUT)
        return (int, (7,))


def _in_thread(fn: Callable[[], Any]) -> Any:
    import concurrent.futures

    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        ok, value = outcome(fn)
        future.set_result(value) if ok else future.set_exception(value)

    threading.Thread(target=run, daemon=True).start()
    return future


@pytest.mark.timeout(60)
def test_slow_reduce_does_not_block_other_callers() -> None:
    """A task whose argument takes forever to pickle holds up only its own
    caller: another thread's apply() on the same (one-worker) pool completes."""
    entered, release = threading.Event(), threading.Event()
    with running_pool(1) as pool:
        try:
            slow = _in_thread(lambda: pool.apply_async(tasks.identity,
                                                       (_SlowReduce(entered, release),)))
            assert entered.wait(RESULT_TIMEOUT)
            other = _in_thread(lambda: pool.apply(tasks.add_one, (1,)))
            assert other.result(HANG_TIMEOUT) == 2
            # The manager thread is free too: it still delivers results.
            assert pool.apply_async(tasks.add_one, (2,)).get(HANG_TIMEOUT) == 3
        finally:
            release.set()
        assert slow.result(RESULT_TIMEOUT).get(RESULT_TIMEOUT) == 7


# --- no file descriptor left: tasks fail clearly, nothing hangs ------------------------------


def _fd_limit_error(value: object) -> bool:
    return isinstance(value, SharedMemoryError) and "RLIMIT_NOFILE" in str(value) and (
        "ulimit -n" in str(value))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_without_free_fds_fails_array_tasks_clearly(method: str) -> None:
    """A worker that cannot receive fds (its soft RLIMIT_NOFILE is exhausted)
    fails each task carrying shared arrays with an error naming the limit;
    tasks without arrays still run on it."""
    arrays = [shmrunner.zeros(1000) for _ in range(12)]
    ctx = multiprocessing.get_context(method)
    with running_pool(1, initializer=tasks.leave_no_free_fd, context=ctx) as pool:
        worker = pool_pids(pool)
        results = pool.imap(tasks.checksum, arrays)
        outcomes = [outcome(lambda: results.next(timeout=RESULT_TIMEOUT)) for _ in arrays]
        for ok, value in outcomes:
            assert not ok and _fd_limit_error(value), value
        assert pool.apply(tasks.add_one, (1,)) == 2
        assert pool_pids(pool) == worker, "the worker was not lost: it reported every failure"
    del arrays, outcomes, value


FD_LIMIT_PARENT_SCRIPT = """
import json, os, resource
import shmrunner
import _failure_tasks as tasks

with shmrunner.Pool(1) as pool:
    arrays = [shmrunner.zeros(1000) for _ in range(8)]
    assert pool.apply(tasks.add_one, (1,)) == 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    tasks.leave_no_free_fd()  # the parent can now receive no fd
    results = pool.imap(tasks.identity, arrays)  # each result comes back by fd
    outcomes = []
    for _ in arrays:
        try:
            results.next(timeout=20)
            outcomes.append("ok")
        except shmrunner.SharedMemoryError as exc:
            outcomes.append("fd-limit" if "RLIMIT_NOFILE" in str(exc) else repr(exc))
        except Exception as exc:
            outcomes.append(repr(exc))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    back = pool.apply(tasks.identity, (arrays[0],))
    print(json.dumps({"outcomes": outcomes, "after": bool(shmrunner.is_shared(back))}))
"""


@pytest.mark.timeout(90)
def test_parent_without_free_fds_fails_array_results_clearly(tmp_path: Any) -> None:
    """The pool's own process out of fds: results carrying arrays fail with an
    error naming the limit (the worker's channel is never abandoned), and once
    the limit is raised the same worker serves arrays again."""
    done = run_script(tmp_path, FD_LIMIT_PARENT_SCRIPT, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"outcomes": ["fd-limit"] * 8, "after": True}, done.stderr


# --- the manager thread cannot die silently --------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["once", "again"])
def test_manager_thread_crash_fails_every_pending_result(fault: str, tmp_path: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception in the manager thread (injected in the code that
    handles a batch of results; then, for "again", in the code that accounts
    for the stopped workers too) fails every result still pending with a
    clear ShmrunnerError, stops every worker, and leaves the pool refusing new
    work instead of hanging it."""
    from shmrunner._manager import Manager
    from shmrunner.worker.lifecycle import ProcessLifecycle

    pace = ProcessLifecycle.pace
    injected = threading.Event()

    def crash_once(self: ProcessLifecycle, worker: Any, results: int,
                   now: float | None = None) -> None:
        if results and not injected.is_set():
            injected.set()
            raise RuntimeError("injected fault")
        pace(self, worker, results, now)

    def fail_again(self: Manager, worker: Any) -> None:
        raise RuntimeError("injected fault while crashing")

    blocker_pid = str(tmp_path / "blocker")
    pool = shmrunner.Pool(2)
    try:
        workers = pool_pids(pool)
        blocked = pool.apply_async(tasks.hold_and_block, (blocker_pid,))
        read_pid(blocker_pid)  # running: only a dead manager thread could fail it now
        monkeypatch.setattr(ProcessLifecycle, "pace", crash_once)
        if fault == "again":  # accounting for the workers fails too
            monkeypatch.setattr(Manager, "_reap", fail_again)
        many = [pool.apply_async(tasks.add_one, (i,)) for i in range(40)]
        mapped = pool.map_async(tasks.add_one, range(40), chunksize=1)
        for result in [blocked, mapped, *many]:
            result.wait(RESULT_TIMEOUT)
            assert result.ready(), "a result was left pending by the crashed manager thread"
        assert injected.is_set()
        with pytest.raises(shmrunner.ShmrunnerError, match="manager thread crashed.*injected"):
            blocked.get(0)
        for i, result in enumerate(many):
            ok, value = outcome(functools.partial(result.get, 0))
            assert (ok and value == i + 1) or (
                isinstance(value, shmrunner.ShmrunnerError) and "crashed" in str(value)), value
        with pytest.raises(shmrunner.ShmrunnerError, match="manager thread crashed"):
            pool.apply(tasks.add_one, (1,))
        wait_until(lambda: not any(is_alive(pid) for pid in workers), RESULT_TIMEOUT,
                   message="the crashed pool's workers to exit")
    finally:
        pool.terminate()
        pool.join()
    assert not [pid for pid in children() if pid in workers]
