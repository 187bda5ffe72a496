"""What each slot process of an agent is running, in shared memory.

Data flow::

    slot i (worker/_slots.py), around each task, no syscall:
        begin(i, task_id): start time, running = task_id + 1, started += 1
        end(i):            running = 0
    agent (worker/remote.py), when the hub asks it to stop a task of slot i:
        read(i) -> (started, running task id or None, its start time)

The agent kills slot i for a task only while this says the slot runs it, and
the hub's cancel names the task's place in the slot's order (``seq``): fewer
tasks started than ``seq`` means it has not started yet, more means it is over.

One anonymous shared mapping made before the slots are forked: three aligned
64-bit words per slot, each written with one store. A reader checks that
``started`` did not move while it read the other two (a slot that moved on
meanwhile is read again).
"""

from __future__ import annotations

import ctypes
import mmap
import time

__all__ = ["TaskWords"]

_WORDS = 3  # started, running task id + 1 (0: none), start time (CLOCK_MONOTONIC ns)


class TaskWords:
    def __init__(self, slots: int) -> None:
        self._map = mmap.mmap(-1, max(1, slots) * _WORDS * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self._words = (ctypes.c_int64 * (slots * _WORDS)).from_buffer(self._map)

    def begin(self, slot: int, task_id: int) -> None:
        # Running before started: a reader that sees the new task with the old
        # count takes it for "not started yet" (asks again), never for "over".
        words, base = self._words, slot * _WORDS
        words[base + 2] = time.monotonic_ns()
        words[base + 1] = task_id + 1
        words[base] += 1

    def end(self, slot: int) -> None:
        self._words[slot * _WORDS + 1] = 0

    def reset(self, slot: int) -> None:
        """A new process takes the slot over: nothing started yet."""
        words, base = self._words, slot * _WORDS
        words[base] = words[base + 1] = words[base + 2] = 0

    def read(self, slot: int) -> tuple[int, int | None, float]:
        """(tasks started, the task running or None, when it started: monotonic s)."""
        words, base = self._words, slot * _WORDS
        while True:
            started = words[base]
            running = words[base + 1]
            since = words[base + 2]
            if words[base] == started:
                return started, (running - 1 if running else None), since / 1e9
