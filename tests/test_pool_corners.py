"""``shmrunner.Pool`` as a ``multiprocessing.Pool`` drop-in, in the corners:
each test is one defect an audit found side by side with ``multiprocessing``.

Worker functions are module-level (fork workers call them directly); the pools
use the fork start method, as the behaviour does not depend on it.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from typing import Any

import pytest

import shmrunner
from _util import running_pool, wait_until

pytestmark = pytest.mark.timeout(60)

RESULT_TIMEOUT = 20

FORK = multiprocessing.get_context("fork")


# --- worker-side functions -------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def die_in_first_initializer(flag: str) -> None:
    """The first worker to start dies in its initializer (as one killed by the
    OOM killer, or crashing in a C library's set-up, would); later ones start."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


def always_die_in_initializer() -> None:
    os._exit(3)


class TwoArgError(Exception):
    """An exception whose ``__init__`` needs more than its ``args``: pickle
    rebuilds it with ``TwoArgError(*args)``, which raises TypeError."""

    def __init__(self, path: str, code: int) -> None:
        super().__init__(f"{path} failed with {code}")
        self.path = path
        self.code = code


def raise_two_arg_error(x: int) -> int:
    raise TwoArgError("/data/x", x)


# --- tests -------------------------------------------------------------------------------------


def test_a_task_sent_to_a_worker_dying_in_its_initializer_runs_elsewhere(tmp_path: Any) -> None:
    """multiprocessing runs every task on the replacement worker; the README
    promises "the tasks it had been sent but not started run elsewhere"."""
    flag = str(tmp_path / "died-once")
    with running_pool(1, initializer=die_in_first_initializer, initargs=(flag,),
                      context=FORK) as pool:
        results = [pool.apply_async(square, (i,)) for i in range(3)]
        outcomes = []
        for result in results:
            try:
                outcomes.append(result.get(RESULT_TIMEOUT))
            except shmrunner.WorkerLostError as exc:
                outcomes.append(f"lost: {exc}")
        assert os.path.exists(flag)  # the first worker did die in its initializer
        assert outcomes == [0, 1, 4]


def test_an_initializer_that_always_kills_its_worker_breaks_the_pool() -> None:
    """The tasks sent to a worker that dies in its initializer run again (the
    test above); with an initializer that always dies, they would run again
    for ever (multiprocessing respawns workers for ever): the pool breaks
    with InitializerError after a run of such deaths instead."""
    with running_pool(1, initializer=always_die_in_initializer, context=FORK) as pool:
        result = pool.apply_async(square, (3,))
        with pytest.raises(shmrunner.InitializerError, match=r"in a row died in it.*code 3"):
            result.get(RESULT_TIMEOUT)
        with pytest.raises(shmrunner.InitializerError):
            pool.apply(square, (4,))


def test_a_task_exception_not_rebuildable_from_its_args_names_itself() -> None:
    """The caller learns which exception the task raised and where, not a
    TypeError about ``__init__``'s arguments raised inside the unpickler."""
    with running_pool(1, context=FORK) as pool:
        with pytest.raises(Exception) as caught:
            pool.apply(raise_two_arg_error, (3,))
        exc = caught.value
        chain = "".join(traceback.format_exception(exc))
        assert isinstance(exc, (TwoArgError, shmrunner.RemoteTaskError)), chain
        assert "TwoArgError" in str(exc) or isinstance(exc, TwoArgError)
        assert "raise_two_arg_error" in chain  # the worker's traceback reached us
        assert pool.apply(square, (4,)) == 16  # and the pool serves on


def touch(path: str) -> str:
    with open(path, "w"):
        pass
    return path


@pytest.mark.parametrize("kind", ["callback", "error_callback"])
def test_a_slow_callback_does_not_leave_the_workers_idle(kind: str, tmp_path: Any) -> None:
    """While one result's callback runs (writing a file, updating a plot), the
    workers go on running the queued tasks, as under multiprocessing; here they
    sat idle until the callback returned (8 x 0.5 s tasks on 2 workers beside a
    2 s callback took 3.5 s instead of 2.1 s)."""
    import threading

    release = threading.Event()
    in_callback = threading.Event()

    def slow_callback(_: object) -> None:
        in_callback.set()
        release.wait(RESULT_TIMEOUT)

    options = {kind: slow_callback}
    with running_pool(2, context=FORK) as pool:
        try:
            if kind == "callback":
                pool.apply_async(square, (1,), **options)  # type: ignore[arg-type]
            else:
                pool.apply_async(square, (None,), **options)  # type: ignore[arg-type]
            assert in_callback.wait(RESULT_TIMEOUT)
            markers = [str(tmp_path / f"ran-{i}") for i in range(8)]
            pool.map_async(touch, markers, chunksize=1)
            wait_until(lambda: all(os.path.exists(m) for m in markers), timeout=10,
                       message="the tasks queued behind a slow callback to run")
        finally:
            release.set()


FORK_CHILD_EXITS = """
import os, sys
import shmrunner

def square(x):
    return x * x

if __name__ == "__main__":
    pool = shmrunner.Pool(2)
    assert pool.map(square, range(4)) == [0, 1, 4, 9]
    child = os.fork()
    if child == 0:
        sys.exit(0)  # a normal exit: atexit handlers run in the child
    os.waitpid(child, 0)
    assert pool.map(square, range(4)) == [0, 1, 4, 9]
    pool.terminate()
"""


def test_a_fork_child_of_a_pool_owner_exits_cleanly(tmp_path: Any) -> None:
    """A plain fork() child that exits normally printed "Exception ignored in
    atexit callback ... AssertionError: can only join a child process" (the
    README says the child's copy of the pool is the parent's to stop)."""
    import subprocess
    import sys

    script = tmp_path / "fork_child_exits.py"
    script.write_text(FORK_CHILD_EXITS)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=RESULT_TIMEOUT * 2)
    assert done.returncode == 0, done.stderr
    assert "can only join a child process" not in done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
