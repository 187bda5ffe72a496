"""Importable helpers for test_apply_races.py (workers import them by name)."""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import time
from pathlib import Path
from typing import Any


def _touch(path: str) -> None:
    Path(path).write_text(str(os.getpid()))


def _slow_exit(marker: str, seconds: float) -> None:
    _touch(f"{marker}.{os.getpid()}")
    time.sleep(seconds)


def exit_slowly(marker: str, seconds: float) -> None:
    """Initializer: when this worker exits, it writes ``marker.<pid>`` then
    takes ``seconds`` (a worker with cleanup to do, e.g. flushing a cache)."""
    multiprocessing.util.Finalize(None, _slow_exit, args=(marker, seconds), exitpriority=10)


def identity(x: Any) -> Any:
    return x


def wait_for_file(path: str, timeout: float = 30.0) -> None:
    """Poll (with a deadline) until ``path``, or a file named ``path.*``, exists."""
    folder, name = os.path.split(path)
    deadline = time.monotonic() + timeout
    while not any(entry == name or entry.startswith(name + ".")
                  for entry in os.listdir(folder)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.005)


class PicklesAfter:
    """An argument whose pickling waits until ``path`` exists (a large array
    copied, a slow __reduce__): the window between claim and send."""

    def __init__(self, path: str, started: str) -> None:
        self.path, self.started = path, started

    def __reduce__(self) -> Any:
        _touch(self.started)
        wait_for_file(self.path)
        return (str, ("pickled",))


def started_then_wait(started: str, gate: str) -> int:
    """Say it runs (``started``), then wait for the test's ``gate`` file."""
    _touch(started)
    wait_for_file(gate)
    return os.getpid()


def partial_line_after(seconds: float) -> float:
    """Print part of a line, then sleep ``seconds``: the line is still open
    when the task returns (the worker closes it when it takes the records)."""
    import sys
    sys.stdout.write("progress: ")
    time.sleep(seconds)
    return seconds


def fork_while_logging(forks: int, seconds: float) -> int:
    """Fork ``forks`` children over ``seconds`` while a helper thread logs
    without pause; each child logs and prints, then exits."""
    import threading

    log = logging.getLogger("review")
    stop = threading.Event()

    def chatter() -> None:
        i = 0
        while not stop.is_set():
            log.warning("chatter %d", i)
            i += 1

    helper = threading.Thread(target=chatter)
    helper.start()
    done = 0
    try:
        for _ in range(forks):
            pid = os.fork()
            if pid == 0:
                try:
                    log.warning("child")
                    print("child", flush=True)
                finally:
                    os._exit(0)
            _, status = os.waitpid(pid, 0)
            done += os.waitstatus_to_exitcode(status) == 0
            time.sleep(seconds / forks)
    finally:
        stop.set()
        helper.join()
    return done
