"""Head-of-line blocking: queued work never waits behind a long task while
another worker is idle (the engine's prefetch rule, ``Worker.prefetch_window``
in ``worker/lifecycle.py``). Real processes; the long task is held by a gate
file the test controls; no timings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _sched_tasks as tasks
import shmrunner
from _util import wait_until

DEADLINE = 30.0


def _short_ones_pass(pool: shmrunner.Pool, long: Any) -> None:
    """Eight short tasks submitted now all finish while ``long`` still runs."""
    short = [pool.apply_async(tasks.square, (i,)) for i in range(8)]
    wait_until(lambda: all(r.ready() for r in short), DEADLINE,
               message="the short tasks, while the long one runs")
    assert not long.ready()
    assert [r.get(DEADLINE) for r in short] == [i * i for i in range(8)]


def test_short_tasks_pass_a_long_one(tmp_path: Path) -> None:
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with shmrunner.Pool(2) as pool:
        try:
            long = pool.apply_async(tasks.gated, (started, gate, "long"))
            wait_until(lambda: Path(started).exists(), DEADLINE, message="the long task to start")
            _short_ones_pass(pool, long)
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
            _short_ones_pass(pool, long)
        finally:
            Path(gate).touch()
        assert long.get(DEADLINE) == "long"


def test_nothing_queued_behind_a_task_of_a_new_function(tmp_path: Path) -> None:
    """Workers that have finished a task are given a long task of another
    function and, in the same breath, short ones: no short one is queued
    behind the long one (its worker's last task time says nothing of it)."""
    pair = [str(tmp_path / "pair-a"), str(tmp_path / "pair-b")]
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with shmrunner.Pool(2) as pool:
        try:
            # Both workers finish a task first (these two only return together).
            warm = [pool.apply_async(tasks.all_started, (pair[0], [pair[1]])),
                    pool.apply_async(tasks.all_started, (pair[1], [pair[0]]))]
            assert len({w.get(DEADLINE)["pid"] for w in warm}) == 2
            long = pool.apply_async(tasks.gated, (started, gate, "long"))
            _short_ones_pass(pool, long)
        finally:
            Path(gate).touch()
        assert long.get(DEADLINE) == "long"
