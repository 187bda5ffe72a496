"""Task functions for test_task_logs.py: they print and log (importable by
reference in remote agents and the daemon, whose PYTHONPATH has this directory)."""

from __future__ import annotations

import logging
import os
import sys
import time


def chatty(x: int) -> int:
    print(f"printed {x}")
    logging.getLogger("myapp.part").warning("warned %d", x)
    print(f"complained {x}", file=sys.stderr)
    logging.getLogger("myapp.part").debug("too fine to forward %d", x)
    return x + 1


def quiet(x: int) -> int:
    return x + 1


def capturing() -> bool:
    """Whether this worker's sys.stdout is the task-log capture's stream."""
    return type(sys.stdout).__name__ == "_Stream"


def flood(total: int, chunk: int) -> int:
    """Print ``total`` characters in writes of ``chunk`` (lines of ``chunk`` - 1 x)."""
    line = "x" * (chunk - 1)
    for _ in range(total // chunk):
        print(line)
    return total


def one_huge_line(size: int) -> int:
    sys.stdout.write("y" * size)
    return size


def raises_after_logging() -> None:
    logging.getLogger("myapp").error("about to fail")
    raise ValueError("failed on purpose")


def uses_fileno() -> int:
    """What subprocess(stdout=sys.stdout) and faulthandler do: the fd itself."""
    return sys.stdout.fileno()


def long_task(release: str) -> str:
    """Works a little over a second (the early-flush threshold), says so, then
    waits (bounded) for the test to create ``release``."""
    start = time.monotonic()
    while time.monotonic() - start < 1.2:
        sum(range(1000))  # the task's own work
    print("still working")
    deadline = time.monotonic() + 60
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            return "never released"
        time.sleep(0.01)
    print("done")
    return "released"


def print_then_wait(release: str) -> str:
    """Says one line at once, then waits quietly (bounded) for ``release``."""
    print("started")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"


def odd_records(x: int) -> int:
    """Text the wire cannot carry as it is: undecodable bytes printed (lone
    surrogates) and a custom level past logging's CRITICAL scale."""
    print(b"bad bytes: \xff\xfe".decode("utf-8", "surrogateescape"))
    logging.getLogger("myapp.custom").log(150, "level one-fifty")
    return x + 1


def fork_and_print() -> int:
    """Runs past the early-flush threshold, forks a child (no exec) that
    prints and logs, waits for it, then prints itself; returns the child's
    exit status."""
    start = time.monotonic()
    while time.monotonic() - start < 1.2:
        sum(range(1000))
    pid = os.fork()
    if pid == 0:
        try:
            print("from the child", flush=True)
            logging.getLogger("myapp.child").warning("child warned")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("from the worker")
    return status
