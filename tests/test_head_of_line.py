"""Head-of-line blocking: queued work never waits behind a long task while
another worker is idle (the engine's prefetch rule, ``Worker.prefetch_window``
in ``worker/lifecycle.py``). Real processes; the long task is held by a gate
file the test controls; no timings."""

from __future__ import annotations

from pathlib import Path

import _sched_tasks as tasks
import shmrunner
from _util import wait_until

DEADLINE = 30.0


def test_short_tasks_pass_a_long_one(tmp_path: Path) -> None:
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with shmrunner.Pool(2) as pool:
        try:
            long = pool.apply_async(tasks.gated, (started, gate, "long"))
            wait_until(lambda: Path(started).exists(), DEADLINE, message="the long task to start")
            short = [pool.apply_async(tasks.square, (i,)) for i in range(8)]
            # Every short task finishes on the other worker while the long one runs.
            wait_until(lambda: all(r.ready() for r in short), DEADLINE,
                       message="the short tasks, while the long one runs")
            assert not long.ready()
            assert [r.get(DEADLINE) for r in short] == [i * i for i in range(8)]
        finally:
            Path(gate).touch()
        assert long.get(DEADLINE) == "long"


def test_short_tasks_submitted_with_the_long_one(tmp_path: Path) -> None:
    """Submitted together, before any worker has finished a task: none is
    queued behind the long one."""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with shmrunner.Pool(2) as pool:
        try:
            long = pool.apply_async(tasks.gated, (started, gate, "long"))
            short = [pool.apply_async(tasks.square, (i,)) for i in range(8)]
            wait_until(lambda: all(r.ready() for r in short), DEADLINE,
                       message="the short tasks, while the long one runs")
            assert not long.ready()
        finally:
            Path(gate).touch()
        assert long.get(DEADLINE) == "long"

