"""Importable task functions for test_scheduler.py and test_remote.py.

Remote workers import functions by reference (``module:qualname``), and local
workers may be started with spawn or forkserver: so every task lives here, in a
module on the workers' ``PYTHONPATH`` (the tests directory).

Handshakes are by files: a task *reports* (writes a file atomically) when it
has started, and a *gated* task waits until the test creates its gate file.
Every wait inside a task has a deadline, so a broken test can never leave a
task blocked forever.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

GATE_DEADLINE = 60.0  # seconds a gated task waits at most (then it raises)


# --- handshakes ----------------------------------------------------------------------


def report(path: str, text: str = "") -> None:
    """Write ``text`` to ``path`` atomically: a reader never sees a partial file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def append_line(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


def wait_for(path: str, deadline: float = GATE_DEADLINE) -> None:
    """Block (in the task) until ``path`` exists."""
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.005)


def whoami() -> dict[str, int]:
    """This process and its parent (on a remote worker: the agent's pid)."""
    return {"pid": os.getpid(), "ppid": os.getppid()}


# --- plain tasks -----------------------------------------------------------------------


def add(a: Any, b: Any) -> Any:
    return a + b


def union(a: Any, b: Any) -> Any:
    return a | b


def square(x: int) -> int:
    return x * x


def where() -> dict[str, int]:
    return whoami()


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


# --- arrays ----------------------------------------------------------------------------


def double(arr: np.ndarray) -> np.ndarray:
    return arr * 2


def checksum(arr: np.ndarray) -> float:
    return float(arr.sum(dtype=np.float64))


def arange(n: int, dtype: str = "float64") -> np.ndarray:
    return np.arange(n, dtype=dtype)


def fill(arr: np.ndarray, value: float) -> int:
    """Write into ``arr`` in place (the caller sees it when ``arr`` is shared)."""
    arr[...] = value
    return int(arr.size)


# --- gated tasks -----------------------------------------------------------------------


def gated(started: str, gate: str, value: Any = None) -> Any:
    """Report ``whoami()`` at ``started``, wait for ``gate``, return ``value``."""
    report(started, json.dumps(whoami()))
    wait_for(gate)
    return value


def mark_run(path: str, value: Any = None) -> Any:
    """Leave a trace at ``path`` (for tasks that must never run), return ``value``."""
    append_line(path, str(os.getpid()))
    return value


def mark_run_then_hold(path: str, gate: str, value: int) -> int:
    """Leave a trace at ``path``; every task but the first (``value`` 0) then waits
    for ``gate``, so the queue behind it cannot drain before the test acts."""
    append_line(path, str(os.getpid()))
    if value:
        wait_for(gate)
    return value


def all_started(started: str, others: list[str]) -> dict[str, int]:
    """Report at ``started``, then wait until every path in ``others`` exists: only
    tasks that run at the same time, on different processes, all return."""
    report(started, json.dumps(whoami()))
    for path in others:
        wait_for(path, 30.0)
    return whoami()


# --- failures ------------------------------------------------------------------------


def kill_self_first_time(marker: str, attempts: str) -> dict[str, int]:
    """Count the attempt; on the first one (no ``marker`` yet) SIGKILL this process."""
    append_line(attempts, json.dumps(whoami()))
    if not os.path.exists(marker):
        report(marker, "")
        os.kill(os.getpid(), signal.SIGKILL)
    return whoami()


def block_first_time(marker: str, started: str, attempts: str,
                     gate: str) -> dict[str, int]:
    """Count the attempt; on the first one (no ``marker``), report ``whoami()`` at
    ``started`` and wait for ``gate`` (the test kills us meanwhile)."""
    append_line(attempts, json.dumps(whoami()))
    if not os.path.exists(marker):
        report(marker, "")
        report(started, json.dumps(whoami()))
        wait_for(gate)
        return {"first": 1, **whoami()}
    return whoami()


def count_and_sleep(attempts: str, seconds: float) -> str:
    """Count the attempt, then sleep (a task that runs past its timeout)."""
    append_line(attempts, json.dumps(whoami()))
    time.sleep(seconds)
    return "slept"


class Gates:
    """Start reports and gate files under one directory; ``open_all`` releases
    every gated task (the fixtures call it before shutting down). Used by the
    tests, not by workers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def new(self) -> tuple[str, str]:
        self.count += 1
        return str(self.root / f"started-{self.count}"), str(self.root / f"gate-{self.count}")

    def path(self, name: str) -> str:
        return str(self.root / name)

    @staticmethod
    def open(gate: str) -> None:
        report(gate, "")

    def open_all(self) -> None:
        for i in range(1, self.count + 1):
            gate = str(self.root / f"gate-{i}")
            if not os.path.exists(gate):
                self.open(gate)

    @staticmethod
    def started(path: str, timeout: float = 30.0) -> dict[str, int]:
        from _util import wait_until

        wait_until(lambda: os.path.exists(path), timeout, message=f"{path} to be reported")
        result: dict[str, int] = json.loads(Path(path).read_text())
        return result
