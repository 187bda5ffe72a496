"""Task functions for test_dispatch_balance.py (importable by workers under
any start method). Handshakes are files, as in ``_sched_tasks.py``."""

from __future__ import annotations

import os
import time

from _sched_tasks import report, wait_for

# A held task runs at least this long (real time in the task, not a wait in
# the test): long enough that the engine counts its function as array-sized
# work (worker/lifecycle.py, _LONG_TASK), whatever the machine's speed.
MIN_RUN = 0.05


def held(directory: str, index: int) -> int:
    """Report this worker's pid at ``started-<index>``, wait for the test's
    ``go-<index>``, run at least ``MIN_RUN`` in all; return the pid."""
    begun = time.monotonic()
    report(os.path.join(directory, f"started-{index}"), str(os.getpid()))
    wait_for(os.path.join(directory, f"go-{index}"))
    time.sleep(max(0.0, begun + MIN_RUN - time.monotonic()))
    return os.getpid()
