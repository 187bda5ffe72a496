"""Balance of the local engine's dispatch: array-sized tasks go one at a
time to whichever worker is free, so no task waits behind another while a
worker idles (``Worker.free`` in ``worker/lifecycle.py``). Real processes;
every task is held by a file the test controls; no timings."""

from __future__ import annotations

from pathlib import Path

import _balance_tasks as balance

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
