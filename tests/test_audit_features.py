"""Audit of the numpy-pipeline features (memory limits, task logs, progress,
lazy streams): regressions for the defects the audit found."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import _sched_tasks as tasks
from shmrunner import Scheduler

RESULT = 30.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered"])
def test_a_stream_over_no_iterables_is_empty_as_executor_map_is(method: str) -> None:
    # Executor.map(fn) with no iterables yields nothing; the Scheduler's
    # streams raised "ValueError: min() arg is an empty sequence" while
    # counting the progress total.
    with ThreadPoolExecutor(1) as stdlib:
        assert list(stdlib.map(tasks.square)) == []
    with Scheduler(local_workers=1) as sched:
        assert list(getattr(sched, method)(tasks.square, timeout=RESULT)) == []
        seen: list[tuple[int, int | None]] = []
        assert list(getattr(sched, method)(tasks.square, progress=lambda d, t: seen.append(
            (d, t)))) == []
        assert seen == []
