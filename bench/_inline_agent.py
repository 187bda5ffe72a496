"""A measurement prototype, not a product: ``shmrunner worker`` whose tasks run
in the agent's own loop thread instead of its pool process.

What it measures: the ceiling of the "slots" design in docs/scaling.md (each
process that runs tasks holds its own connection to the hub, the agent only
supervises). This agent has no supervision at all (no kill on timeout or
cancel, no memory limit, a crash takes the agent), so it is only a bound:
it removes exactly the agent -> pool process hop, the pool process's decode
and encode, and the agent's manager thread. bench_remote.py runs it as the
``inline`` system beside ``remote``.

python bench/_inline_agent.py --connect ADDR [shmrunner worker options]
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import shmrunner.worker.remote as agent_module
from shmrunner._tasks import Task
from shmrunner.cli import main


class InlineEngine:
    """The few calls the agent makes on its ProcessEngine, done in-line."""

    def __init__(self, settings: object, on_results: object = None, on_logs: object = None) -> None:
        self._ids = itertools.count()

    def new_task(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
                 result: Any, index: int = 0, *, report_start: bool = False) -> Task:
        return Task(next(self._ids), fn, args, kwargs, result, index, report_start)

    def submit(self, tasks: Iterable[Task]) -> None:
        for task in tasks:
            try:
                value, ok = task.fn(*task.args, **task.kwargs), True
            except Exception as exc:  # noqa: BLE001 (the task's own error, sent back)
                value, ok = exc, False
            assert task.result is not None
            task.result.settle(task.index, ok, value)

    def kill(self, task: Task, reason: BaseException, ran_for: float | None = None) -> bool:
        return True  # nothing to kill: the task ran before this was asked

    def terminate(self) -> None:
        pass

    def close(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass


if __name__ == "__main__":
    agent_module.ProcessEngine = InlineEngine  # type: ignore[misc,assignment]
    sys.exit(main(["worker", *sys.argv[1:]]))
