"""Audit of the numpy-pipeline features (memory limits, task logs, progress,
lazy streams): regressions for the defects the audit found."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import _sched_tasks as tasks
import _stream_tasks
from shmrunner import Pool, Scheduler, zeros

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


def _each(results: Iterator[Any], most: int) -> list[Any]:
    """Every item of an imap, a failed one as its exception's type name
    (multiprocessing's imap goes on past a failed item)."""
    taken: list[Any] = []
    for _ in range(most):
        try:
            taken.append(next(results))
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 (the task's error, taken as an item)
            taken.append(type(exc).__name__)
    return taken


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_pool_imap_with_progress_goes_on_past_a_failed_item(method: str) -> None:
    # Without progress=, Pool.imap yields the items after a failed one (as
    # multiprocessing does); with progress= it wrapped the results in a
    # generator that a failed item ended: every later result was lost, and
    # the next next() said StopIteration as if the input had ended.
    items = [1, "a", 3, 4]  # square("a") raises TypeError
    expected = [1, "TypeError", 9, 16]
    seen: list[tuple[int, int | None]] = []
    with Pool(2) as pool:
        plain = _each(getattr(pool, method)(tasks.square, items), 10)
        metered = _each(getattr(pool, method)(tasks.square, items,
                                              progress=lambda d, t: seen.append((d, t))), 10)
    assert sorted(map(str, plain)) == sorted(map(str, expected))
    assert sorted(map(str, metered)) == sorted(map(str, expected))
    if method == "imap":
        assert metered == expected
    assert seen[-1] == (4, 4)


class _Stop(Exception):
    pass


@pytest.mark.timeout(60)
def test_pool_map_out_whose_progress_raises_returns_once_no_task_writes_out() -> None:
    # map(out=) promises that, failed or not, it returns only once none of its
    # tasks writes into out any more (the caller reuses out at once). A
    # progress callback that raised left the map's other chunks running, and
    # they went on writing into out after map had raised.
    def stop(done: int, total: int | None) -> None:
        raise _Stop

    out = zeros(4)
    items = [(np.ones(2), 0.5)] * 4  # each row: its checksum, 2.0, after half a second
    with Pool(2) as pool:
        with pytest.raises(_Stop):
            pool.starmap(_stream_tasks.slow_checksum, items, chunksize=1, progress=stop,
                         out=out)
        seen = out.copy()
        pool.close()
        pool.join()  # every task has ended
    assert (out == seen).all(), "a task of the failed map wrote into out after map raised"
