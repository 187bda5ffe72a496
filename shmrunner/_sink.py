"""ResultSink: where the process engine hands one task's outcome.

Three unrelated owners wait for outcomes from the same engine: the Pool's
result objects (``_results.py``), the Scheduler's local tier, and the remote
agent (which sends them back over the network). The engine knows none of
them; it calls :meth:`ResultSink.settle` once per task it was given (with the
task's index within its map), on its manager thread, so a sink must not
block there. A task run with ``ProcessEngine.call`` (``Pool.apply``) has an
:class:`AwaitedSink`, which may be settled on the calling thread instead.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["ResultSink", "AwaitedSink"]


@runtime_checkable
class ResultSink(Protocol):
    def settle(self, index: int, ok: bool, value: Any) -> None:
        """Item ``index`` finished: ``value`` is its result when ``ok``, else the
        exception it failed with."""


class AwaitedSink(ResultSink, Protocol):
    def ready(self) -> bool:
        """Whether it has been settled."""
