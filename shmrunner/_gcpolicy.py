"""The cyclic garbage collector's settings for a process shmrunner owns (the daemon).

Why: a daemon streaming tiny jobs holds thousands of live objects per job in
flight (messages, futures, their locks), and CPython's default thresholds
(700 allocations per young collection) traverse them again and again: in a
W1b stream the collector took about 16 µs of the daemon's CPU per job, mostly
full collections walking everything the daemon imported at start. Freezing
what exists once the service is built (``gc.freeze``: never traversed again)
and collecting the young generation every ``_YOUNG`` allocations brings that
to about 3 µs. Garbage made of reference cycles is still collected, later.

Only the process's owner calls :func:`tune_for_service` (the CLI, never the
library: a user's process keeps its own settings). Processes forked from it
afterwards (the daemon's local workers, which run users' tasks) get the
previous thresholds back.
"""

from __future__ import annotations

import gc
import os

__all__ = ["tune_for_service"]

_YOUNG = 50_000  # allocations (net of deallocations) between young collections
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
