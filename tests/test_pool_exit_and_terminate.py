"""A Pool at the interpreter's exit (callbacks due still run) and join()
after terminate() with an imap feeder stuck in its input (public API only,
real processes; an interpreter's exit is tested in a script of its own)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmrunner
from _util import run_script

pytestmark = pytest.mark.timeout(120)

JOIN_DEADLINE = 10  # seconds: a join with nothing left to wait for takes well under one


def test_callbacks_due_at_interpreter_exit_still_run(tmp_path: Path) -> None:
    """A Pool left in a global when the script ends: every task it was given
    gets its callback or error_callback, as when the callbacks ran on the
    manager thread (which the exit waits for). On the daemon callback thread
    the exit killed those still queued behind a slow one: they were lost."""
    done = run_script(tmp_path, """
        import faulthandler, functools, threading, time
        faulthandler.dump_traceback_later(40, exit=True)  # a hang: the stack, exit 1
        import shmrunner

        def ident(x):
            return x

        started, go = threading.Event(), threading.Event()

        def on_value(i, value):
            started.set()
            go.wait(30)
            time.sleep(0.3)  # a slow callback: the others queue behind it
            print("callback", i, flush=True)

        def on_error(i, error):
            print("error_callback", i, flush=True)

        pool = shmrunner.Pool(1)  # one worker: the results come in order
        for i in range(5):
            pool.apply_async(ident, (i,), callback=functools.partial(on_value, i),
                             error_callback=functools.partial(on_error, i))
        assert started.wait(30)
        pool.apply(ident, (0,))  # behind the five: their results are in
        go.set()
    """)
    assert done.returncode == 0, done.stderr
    called = sorted(int(line.split()[1]) for line in done.stdout.splitlines())
    assert called == list(range(5)), done.stdout


def _ident(x: int) -> int:
    return x


def test_join_after_terminate_returns_with_an_imap_feeder_blocked_in_its_input() -> None:
    """``terminate(); join()``, the usual pair: terminate() now ends an imap
    whose feeder is blocked reading the input (next() raises), but join()
    then waited for that feeder, forever for a queue nobody feeds."""
    stalled: queue.Queue[int | None] = queue.Queue()

    def items() -> Iterator[int]:
        yield 1
        while (item := stalled.get()) is not None:
            yield item

    pool = shmrunner.Pool(1)
    try:
        results = pool.imap(_ident, items())
        assert next(results) == 1
        pool.terminate()
        with pytest.raises(shmrunner.TaskCancelledError):
            next(results)
        joiner = threading.Thread(target=pool.join, daemon=True)
        joiner.start()
        joiner.join(JOIN_DEADLINE)
        assert not joiner.is_alive(), "join() after terminate() waited for the imap's input"
    finally:
        stalled.put(None)  # the feeder reads on, sees the pool terminated and ends
        pool.join()
