"""The daemon's job logs: what each job's task logged and printed, kept in
memory (bounded) for clients to fetch (``Client.job_log``, ``shmrunner log``).

Data flow::

    Scheduler tier threads: on_task_log(future, records, worker, host)
        -> add(): the job's log, by its future while it runs (lines of text)
    daemon front thread: settle(job_id, future) when the job is journaled as done
        -> kept by job id, newest last; the oldest dropped past max_jobs or total
    daemon front thread: text(job_id, future) -> a "jobs" reply's "log" field

Bounds: one job keeps at most ``per_job`` characters (the rest is counted and
a "[... N characters truncated]" line ends the log); all logs together, those
of running jobs included, at most ``total`` characters, and at most
``max_jobs`` finished jobs keep one. Logs are not journaled: a restarted
daemon has none of the jobs before it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from ._tasklogs import Record

__all__ = ["JobLogs"]

PER_JOB = 256 * 1024
TOTAL = 64 << 20
MAX_JOBS = 10_000


class _Log:
    __slots__ = ("lines", "size", "dropped")

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.size = 0
        self.dropped = 0

    def text(self) -> str:
        tail = [f"[... {self.dropped} characters truncated]"] if self.dropped else []
        return "".join(line + "\n" for line in self.lines + tail)


class JobLogs:
    def __init__(self, per_job: int = PER_JOB, total: int = TOTAL,
                 max_jobs: int = MAX_JOBS) -> None:
        self._per_job = per_job
        self._total = total
        self._max_jobs = max_jobs
        self._lock = threading.Lock()
        self._running: dict[Future[Any], _Log] = {}
        self._kept: collections.OrderedDict[str, _Log] = collections.OrderedDict()
        self._size = 0  # characters held by every log, running and kept

    def add(self, future: Future[Any], records: list[Record], worker: str, host: str) -> None:
        """Append a task attempt's records to its job's log (any thread)."""
        lines = [_line(record, worker, host) for record in records]
        with self._lock:
            log = self._running.get(future)
            if log is None:
                log = self._running[future] = _Log()
            for line in lines:
                if log.size + len(line) > self._per_job or not self._room_locked(len(line)):
                    log.dropped += len(line)
                    continue
                log.lines.append(line)
                log.size += len(line)
                self._size += len(line)

    def _room_locked(self, size: int) -> bool:
        """Make room for ``size`` more characters, dropping the oldest kept logs
        (and, last, logs of settled futures that no job claimed)."""
        while self._size + size > self._total and self._kept:
            _, old = self._kept.popitem(last=False)
            self._size -= old.size
        if self._size + size > self._total:
            for future in [f for f in self._running if f.done()]:
                self._size -= self._running.pop(future).size
        return self._size + size <= self._total

    def settle(self, job_id: str, future: Future[Any]) -> None:
        """``job_id`` finished: its log is kept by id from now on (front thread)."""
        with self._lock:
            log = self._running.pop(future, None)
            if log is None:
                return
            self._kept[job_id] = log
            while len(self._kept) > self._max_jobs:
                _, old = self._kept.popitem(last=False)
                self._size -= old.size

    def text(self, job_id: str, future: Future[Any] | None) -> str | None:
        """The log of ``job_id`` (``future``: its future while it runs) as text,
        "" when it logged nothing, None when no log is kept for it."""
        with self._lock:
            log = self._kept.get(job_id)
            if log is None and future is not None:
                log = self._running.get(future)
                if log is None:
                    return ""
            return None if log is None else log.text()


def _line(record: Record, worker: str, host: str) -> str:
    created, levelno, name, message = record
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
    millis = int((created - int(created)) * 1000)
    return (f"{when}.{millis:03d} {logging.getLevelName(levelno)} {name} "
            f"[{worker}@{host}] {message}")
