"""Progress of a batch of daemon jobs known by their ids: ``Client.progress``.

Data flow::

    Client.progress(job_ids) --> ids checked (each, and how many) --> chunks of
        MAX_JOB_IDS --> one "jobs" query each, with "summary": the daemon answers
        only the counts of each state (job_counts, on the daemon's side)
        --> summed --> the Meter of ``progress=`` (a tqdm bar or a callable, as
        map/imap have) --> again every ``interval`` until every job finished
        (or ``timeout``), or once with ``wait=False``

The ids may come from another process (a batch submitted earlier, its ids
saved by the user): nothing here needs the Client that submitted them. A job
the daemon does not know ("unknown": never accepted, or its result expired)
counts as finished, so a wait always ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._jobid import check_job_id
from ._streams import Meter, Progress
from .errors import ResultTimeoutError
from .transport._schema import MAX_JOB_IDS

__all__ = ["STATES", "MAX_PROGRESS_IDS", "job_counts", "batch_progress"]

STATES = ("queued", "running", "done", "failed", "cancelled", "unknown")
FINISHED = ("done", "failed", "cancelled", "unknown")
MAX_PROGRESS_IDS = 1_000_000  # ids one progress() call may follow (each asked about per round)


def job_counts(jobs: Iterable[dict[str, Any]]) -> dict[str, int]:
    """How many of ``jobs`` (maps with a ``state``) are in each of STATES."""
    counts = dict.fromkeys(STATES, 0)
    for job in jobs:
        state = job.get("state")
        counts[state if state in counts else "unknown"] += 1
    return counts


def _checked(job_ids: Iterable[str]) -> list[str]:
    if isinstance(job_ids, str):
        raise TypeError("job_ids must be an iterable of job ids, not one str")
    ids: list[str] = []
    seen: set[str] = set()
    for job_id in job_ids:
        if len(seen) >= MAX_PROGRESS_IDS:
            raise ValueError(f"progress follows at most {MAX_PROGRESS_IDS} job ids")
        if check_job_id(job_id) not in seen:
            seen.add(job_id)
            ids.append(job_id)
    if not ids:
        raise ValueError("progress needs at least one job id")
    return ids


def batch_progress(ask: Callable[[list[str]], dict[str, int]], job_ids: Iterable[str], *,
                   progress: Progress, wait: bool, interval: float,
                   timeout: float | None) -> dict[str, int]:
    """Counts of ``job_ids`` by state plus ``total`` (see the module's docstring).
    ``ask(chunk)`` returns the daemon's counts for at most MAX_JOB_IDS ids."""
    if not isinstance(interval, (int, float)) or not 0 < interval < math.inf:
        raise ValueError(f"interval must be a number of seconds > 0, got {interval!r}")
    if timeout is not None and (not isinstance(timeout, (int, float))
                                or not 0 <= timeout < math.inf):
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    ids = _checked(job_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    meter = Meter(progress, len(ids))
    try:
        while True:
            counts = dict.fromkeys(STATES, 0)
            for start in range(0, len(ids), MAX_JOB_IDS):
                for state, n in ask(ids[start:start + MAX_JOB_IDS]).items():
                    if state in counts and type(n) is int:
                        counts[state] += n
            counts["total"] = len(ids)
            finished = sum(counts[state] for state in FINISHED)
            if finished > meter.done:
                meter.add(finished - meter.done)
            if not wait or finished >= len(ids):
                return counts
            if deadline is not None and time.monotonic() + interval > deadline:
                raise ResultTimeoutError(
                    f"{len(ids) - finished} of {len(ids)} jobs not finished within "
                    f"{timeout} s; they go on running: ask again later")
            time.sleep(interval)
    finally:
        meter.close()
