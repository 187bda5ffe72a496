"""The cyclic garbage collector's settings for a process shmrunner owns (the daemon).

Why: a daemon streaming tiny jobs holds thousands of jobs in flight (messages,
futures, their locks), and CPython's default thresholds (a young collection
every 700 allocations) traverse them again and again, and every full
collection walks everything the daemon imported at start. In a 20,000-job W1b
stream the collector took 0.29-0.30 s of the daemon's CPU (15 µs per job);
freezing what exists once the service is built (``gc.freeze``: never
traversed again) and collecting the young generation every ``_YOUNG``
allocations brings that to 0.09-0.11 s (5,000 jobs: 0.040 -> 0.025 s, start-up
included). 50,000 saved another 2-3 µs per job; not taken: garbage made of
reference cycles (which may hold arrays or fds) waits for the next collection,
and that should not be much later than it is now.

Only the process's owner calls :func:`tune_for_service` (the CLI, never the
library: a user's process keeps its own settings). Processes forked from it
afterwards (the daemon's local workers, which run users' tasks) get the
previous thresholds back.
"""

from __future__ import annotations

import gc
import os

__all__ = ["tune_for_service"]

_YOUNG = 10_000  # allocations (net of deallocations) between young collections
_MIDDLE = 20     # young collections between middle ones
_OLD = 10        # middle collections between full ones (CPython's own rule also applies)


def tune_for_service() -> None:
    """Freeze the objects alive now and space collections out; children forked
    later start with the thresholds this process had."""
    previous = gc.get_threshold()
    os.register_at_fork(after_in_child=lambda: gc.set_threshold(*previous))
    gc.collect()  # what is garbage already is not frozen with the rest
    gc.freeze()
    gc.set_threshold(_YOUNG, _MIDDLE, _OLD)
