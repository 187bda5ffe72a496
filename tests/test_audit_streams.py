"""Audit of lazy streams, chained futures and the Executor contract: each
test pins one defect found (and fixed, or marked xfail with why)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import _sched_tasks as tasks
from shmrunner import Scheduler

RESULT = 30  # seconds: a healthy result arrives in well under one
DEEP = 400  # links: deeper than the recursion limit allows frames per link


def _broken_input(n: int, bad: int) -> Iterator[int]:
    for i in range(n):
        if i == bad:
            raise ValueError(f"input broke at {i}")
        yield i


@pytest.mark.parametrize("method", ["map", "imap_unordered"])
def test_an_input_error_comes_after_the_results_of_the_items_read_before_it(
        sched: Scheduler, method: str) -> None:
    """As multiprocessing's imap: every item read before the input raised is
    computed and yielded, then the input's exception. The stream used to raise
    as soon as it read past the window, dropping (and cancelling) the tasks of
    items 5..9 that had been read and submitted."""
    got = []
    results = getattr(sched, method)(tasks.square, _broken_input(20, 10), buffersize=5,
                                     timeout=RESULT)
    with pytest.raises(ValueError, match="input broke at 10"):
        for value in results:
            got.append(value)
    assert sorted(got) == [i * i for i in range(10)]
