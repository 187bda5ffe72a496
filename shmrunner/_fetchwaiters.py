"""Who waits for which job in the daemon, and until when.

Data flow (all on the front thread)::

    a submit's peer, a fetch of an unfinished job -> add(job_id, peer, deadline)
    the job settles         -> pop(job_id): every waiting peer, once, gets the
                               result (a client settles all its calls for the
                               job from one)
    a fetch's deadline hits -> expired(now): that peer gets "not finished within
                               the fetch timeout" for that fetch; its other
                               fetches and the other peers keep waiting

Fetches with a timeout also sit in a heap, soonest first, so the poll round
looks at these only (``next_deadline``), not at every job a client waits for.
The per-job map is the truth: a heap entry no longer in it was answered in
time. A peer holds at most ``MAX_TIMED_FETCHES`` timed fetches of one job
(a client sends one per waiting ``result()`` call), so neither memory nor the
work to expire one grows with what a hostile peer sends.
"""

from __future__ import annotations

import heapq

__all__ = ["FetchWaiters", "MAX_TIMED_FETCHES"]

MAX_TIMED_FETCHES = 64  # timed fetches of one job one peer may have waiting


class _Waits:
    """One peer's waits for one job: until it settles, and/or timed ones."""

    __slots__ = ("forever", "deadlines")

    def __init__(self) -> None:
        self.forever = False
        self.deadlines: list[float] = []


class FetchWaiters:
    def __init__(self) -> None:
        self._waiters: dict[str, dict[bytes, _Waits]] = {}
        self._deadlines: list[tuple[float, str, bytes]] = []

    def add_submitter(self, job_id: str, peer: bytes) -> None:
        """The peer that submitted ``job_id`` hears its result."""
        self._waits(job_id, peer).forever = True

    def add(self, job_id: str, peer: bytes, deadline: float | None) -> bool:
        """``peer`` waits for ``job_id`` until ``deadline`` (None: until it
        settles); False, and nothing added, if it holds too many timed waits."""
        waits = self._waits(job_id, peer)
        if deadline is None:
            waits.forever = True  # once, however often a client re-asks
            return True
        if len(waits.deadlines) >= MAX_TIMED_FETCHES:
            return False
        waits.deadlines.append(deadline)
        heapq.heappush(self._deadlines, (deadline, job_id, peer))
        return True

    def _waits(self, job_id: str, peer: bytes) -> _Waits:
        peers = self._waiters.setdefault(job_id, {})
        waits = peers.get(peer)
        if waits is None:
            waits = peers[peer] = _Waits()
        return waits

    def pop(self, job_id: str) -> list[bytes]:
        """The peers waiting for ``job_id``, which has settled (each once)."""
        return list(self._waiters.pop(job_id, ()))

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def expired(self, now: float) -> list[tuple[bytes, str]]:
        """(peer, job id) of the waits whose deadline has passed; they stop waiting."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, job_id, peer = heapq.heappop(self._deadlines)
            peers = self._waiters.get(job_id)
            waits = peers.get(peer) if peers is not None else None
            if waits is None or deadline not in waits.deadlines:
                continue  # answered already: the job finished in time
            waits.deadlines.remove(deadline)  # at most MAX_TIMED_FETCHES long
            if not waits.deadlines and not waits.forever:
                del peers[peer]  # type: ignore[union-attr]
                if not peers:
                    del self._waiters[job_id]
            out.append((peer, job_id))
        return out
