"""The process engine's package API, as its three users (Pool, the Scheduler's
local tier, the remote agent) call it: settings, room, capacity, status,
kill, respawn, shutdown. Real processes, really killed."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Iterator

import pytest

import _failure_tasks as tasks
from _util import wait_until
from shmrunner import TaskCancelledError, TaskTimeoutError, WorkerLostError
from shmrunner._engine import EngineSettings, ProcessEngine
from shmrunner._results import ApplyResult

DEADLINE = 30.0


@pytest.fixture
def engine() -> Iterator[ProcessEngine]:
    engine = ProcessEngine(EngineSettings(processes=2))
    try:
        yield engine
    finally:
        engine.terminate()
        engine.join()


def run(engine: ProcessEngine, fn: object, *args: object) -> tuple[ApplyResult, object]:
    result = ApplyResult()
    task = engine.new_task(fn, args, {}, result)  # type: ignore[arg-type]
    engine.submit([task])
    return result, task


def read_pid(path: str) -> int:
    wait_until(lambda: os.path.exists(path), DEADLINE, message=f"a pid at {path}")
    with open(path) as f:
        return int(f.read())


def test_settings_are_keyword_only_frozen_and_validated() -> None:
    with pytest.raises(TypeError):
        EngineSettings(2)  # type: ignore[misc]
    settings = EngineSettings(processes=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.processes = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="at least 1"):
        EngineSettings(processes=0)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        EngineSettings(processes=1, maxtasksperchild=0)
    with pytest.raises(TypeError, match="initializer"):
        EngineSettings(processes=1, initializer=3)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_room_capacity_and_status_follow_the_work(engine: ProcessEngine,
                                                  tmp_path: object) -> None:
    wait_until(lambda: engine.capacity() == 2, DEADLINE, message="two workers")
    status = engine.status()
    assert (status.state, status.workers, status.running, status.queued, status.broken) == (
        "RUN", 2, 0, 0, False)
    # One task per fresh worker: none is queued behind a task before the
    # worker has shown how long its tasks take (Worker.free).
    assert engine.room() == 2
    paths = [str(tmp_path / f"pid{i}") for i in range(2)]  # type: ignore[operator]
    held = [run(engine, tasks.hold_and_block, path) for path in paths]
    for path in paths:
        read_pid(path)
    extra = [run(engine, tasks.add_one, i) for i in range(5)]
    status = engine.status()
    assert status.running + status.queued == 7 and status.running <= 4
    # Five waiting, and none queued behind a task that blocks on a worker that
    # has finished none yet (the head-of-line rule, Worker.prefetch_window).
    assert engine.room() == -5
    # Killing a running task fails it alone (what its worker held behind it
    # runs elsewhere); its worker is replaced.
    for result, task in held:
        assert engine.kill(task, TaskTimeoutError("stopped"))  # type: ignore[arg-type]
        with pytest.raises(TaskTimeoutError):
            result.get(DEADLINE)
    for i, (other, _) in enumerate(extra):
        assert other.get(DEADLINE) == i + 1
    assert engine.wait_for_workers(DEADLINE) and engine.capacity() == 2
    last, _ = run(engine, tasks.block_forever)
    engine.terminate()
    with pytest.raises(TaskCancelledError):
        last.get(DEADLINE)
    engine.join()
    assert engine.status().state == "TERMINATE" and engine.capacity() == 0


@pytest.mark.timeout(60)
def test_a_dead_worker_is_reaped_and_respawned(engine: ProcessEngine, tmp_path: object) -> None:
    path = str(tmp_path / "pid")  # type: ignore[operator]
    result, _ = run(engine, tasks.hold_and_block, path)
    pid = read_pid(path)
    before = {process.pid for process in engine.processes()}
    assert pid in before
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerLostError) as lost:
        result.get(DEADLINE)
    assert lost.value.pid == pid and lost.value.signal == signal.SIGKILL
    wait_until(lambda: len({p.pid for p in engine.processes()} - before) == 1, DEADLINE,
               message="a replacement worker")
    assert pid not in {p.pid for p in engine.processes()}
    assert run(engine, tasks.add_one, 1)[0].get(DEADLINE) == 2


@pytest.mark.timeout(60)
def test_results_hook_runs_on_the_engine_thread() -> None:
    seen: list[bool] = []
    holder: list[ProcessEngine] = []
    ran = threading.Event()

    def on_results() -> None:
        seen.append(holder[0].is_engine_thread())
        ran.set()

    engine = ProcessEngine(EngineSettings(processes=1), on_results=on_results)
    holder.append(engine)
    try:
        assert not engine.is_engine_thread()
        assert run(engine, tasks.add_one, 1)[0].get(DEADLINE) == 2
        assert ran.wait(DEADLINE)
        assert seen and all(seen)
    finally:
        engine.close()
        engine.join()


@pytest.mark.timeout(60)
def test_a_feeder_waiting_for_room_is_released_by_terminate() -> None:
    engine = ProcessEngine(EngineSettings(processes=1))
    outcome: list[bool] = []
    feeder = threading.Thread(target=lambda: outcome.append(engine.wait_for_room()))
    try:
        results = [run(engine, tasks.block_forever)[0] for _ in range(20)]
        engine.add_feeder(feeder)
        feeder.start()
        engine.terminate()
        feeder.join(DEADLINE)
        assert outcome == [False]
        engine.remove_feeder(feeder)
        for result in results:
            with pytest.raises(TaskCancelledError):
                result.get(DEADLINE)
    finally:
        engine.terminate()
        engine.join()
