"""Balance of the local engine's dispatch: array-sized tasks go one at a
time to whichever worker is free, so no task waits behind another while a
worker idles (``Worker.free`` in ``worker/lifecycle.py``). Real processes;
every task is held by a file the test controls; no timings."""

from __future__ import annotations

from pathlib import Path

import _balance_tasks as balance

import _sched_tasks as tasks
import shmrunner
from _util import wait_until

DEADLINE = 30.0
N_TASKS = 4


def _started(directory: Path) -> dict[int, int]:
    """Task index -> pid of the worker that started it, so far."""
    found = {}
    for path in directory.glob("started-*"):
        index = path.name.split("-")[1]
        if index.isdigit():  # not a report still being written (started-N.pid.tmp)
            found[int(index)] = int(path.read_text())
    return found


def _go(directory: Path, index: int) -> None:
    (directory / f"go-{index}").touch()


def test_no_task_waits_behind_a_held_one(tmp_path: Path) -> None:
    """The last tasks of a map of long tasks: once as few tasks wait as there
    are workers, each goes to whichever worker is free. Worker A finishes a
    long task first and takes one; worker B then takes the other, though A
    has room to queue it: held there, it does not hold back A's, and each
    worker runs two."""
    with shmrunner.Pool(2) as pool:
        try:
            results = [pool.apply_async(balance.held, (str(tmp_path), i))
                       for i in range(N_TASKS)]
            wait_until(lambda: len(_started(tmp_path)) >= 2, DEADLINE,
                       message="a task on each worker")
            first = _started(tmp_path)
            assert len(set(first.values())) == 2, first
            (a, pid_a), (b, pid_b) = sorted(first.items())[:2]
            # Worker A finishes its task and starts another ...
            _go(tmp_path, a)
            wait_until(lambda: len([p for p in _started(tmp_path).values() if p == pid_a]) >= 2,
                       DEADLINE, message="worker A's second task")
            # ... then worker B, whose next task is held until the end.
            _go(tmp_path, b)
            wait_until(lambda: len([p for p in _started(tmp_path).values() if p == pid_b]) >= 2,
                       DEADLINE, message="worker B's second task")
            held = max(i for i, p in _started(tmp_path).items() if p == pid_b)

            def release_all_but_held() -> bool:
                for index in _started(tmp_path):
                    if index != held:
                        _go(tmp_path, index)
                return all(r.ready() for i, r in enumerate(results) if i != held)

            wait_until(release_all_but_held, DEADLINE,
                       message="every task but the held one, on the other worker")
            assert not results[held].ready()
        finally:
            for index in range(N_TASKS):
                _go(tmp_path, index)
        pids = [r.get(DEADLINE) for r in results]
    assert pids.count(pid_b) == 2, pids
    assert pids.count(pid_a) == N_TASKS - 2, pids


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
            short = [pool.apply_async(tasks.square, (i,)) for i in range(8)]
            wait_until(lambda: all(r.ready() for r in short), DEADLINE,
                       message="the short tasks, while the long one runs")
            assert not long.ready()
            assert [r.get(DEADLINE) for r in short] == [i * i for i in range(8)]
        finally:
            Path(gate).touch()
        assert long.get(DEADLINE) == "long"
