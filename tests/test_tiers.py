"""The seams between the Scheduler, its tiers and the process engine: results
reach every owner through one typed sink, and each tier reports back through
the events it was given (run here against real worker processes and a real
socket, without a Scheduler)."""

from __future__ import annotations

import multiprocessing

import pytest

from shmrunner._results import ApplyResult, IMapIterator, IMapUnorderedIterator, MapResult
from shmrunner._sink import ResultSink


def test_every_result_owner_is_a_result_sink() -> None:
    from shmrunner.worker.remote import _Reply

    owners = [ApplyResult(), MapResult(2, 1), IMapIterator(), IMapUnorderedIterator(),
              _Reply(None, ("session", 0))]  # type: ignore[arg-type]
    for owner in owners:
        assert isinstance(owner, ResultSink), type(owner).__name__
    result = ApplyResult()
    result.settle(0, True, 42)
    assert result.get(0) == 42
    failed = MapResult(2, 1)
    failed.settle(1, False, ValueError("item 1"))
    with pytest.raises(ValueError, match="item 1"):
        failed.get(0)
    assert multiprocessing.active_children() == []
