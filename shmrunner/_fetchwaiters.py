"""Who waits for which job in the daemon, and until when.

Data flow (all on the front thread)::

    a submit's peer, a fetch of an unfinished job -> add(job_id, peer, deadline)
    the job settles         -> pop(job_id): every peer gets the result
    a fetch's deadline hits -> expired(now): that peer gets "not finished within
                               the fetch timeout"; the others keep waiting

Fetches with a timeout also sit in a heap, soonest first, so the poll round
looks at these only (``next_deadline``), not at every job a client waits for.
The dict is the truth: a heap entry no longer in it was answered in time.
"""

from __future__ import annotations

import heapq

__all__ = ["FetchWaiters"]

_Waiter = tuple[bytes, float | None]  # (peer, deadline or None)


class FetchWaiters:
    def __init__(self) -> None:
        self._waiters: dict[str, list[_Waiter]] = {}
        self._deadlines: list[tuple[float, str, bytes]] = []

    def add_submitter(self, job_id: str, peer: bytes) -> None:
        """The peer that submitted ``job_id`` hears its result."""
        self._waiters.setdefault(job_id, []).append((peer, None))

    def add(self, job_id: str, peer: bytes, deadline: float | None) -> None:
        """``peer`` waits for ``job_id`` until ``deadline`` (None: until it settles)."""
        waiters = self._waiters.setdefault(job_id, [])
        if deadline is not None:
            waiters.append((peer, deadline))
            heapq.heappush(self._deadlines, (deadline, job_id, peer))
        elif (peer, None) not in waiters:  # not again for a client re-asking
            waiters.append((peer, None))

    def pop(self, job_id: str) -> list[bytes]:
        """The peers waiting for ``job_id``, which has settled."""
        return [peer for peer, _ in self._waiters.pop(job_id, [])]

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def expired(self, now: float) -> list[tuple[bytes, str]]:
        """(peer, job id) of the waits whose deadline has passed; they stop waiting."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, job_id, peer = heapq.heappop(self._deadlines)
            waiters = self._waiters.get(job_id, [])
            if (peer, deadline) not in waiters:
                continue  # answered already: the job finished in time
            waiters.remove((peer, deadline))
            if not waiters:
                del self._waiters[job_id]
            out.append((peer, job_id))
        return out
