"""The Scheduler's job control under faults (cancel, timeouts, retries,
chains, streams, shutdown), local and remote tiers.

Each test here reproduced a defect (found by an audit); see its docstring.
Real worker processes; synchronisation by files and polling with deadlines.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import _sched_tasks as tasks
from _sched_tasks import Gates
from _util import wait_until
from shmrunner import Scheduler, SchedulerBusyError, TaskCancelledError, WorkerLostError

RESULT = 30  # seconds: a healthy result arrives in well under one
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


def busy_with_queue(sched: Scheduler, gates: Gates) -> list[concurrent.futures.Future[object]]:
    """Gated tasks until every worker is busy and one more waits in the
    Scheduler's own queue (workers take a few ahead); returns their futures."""
    held = []
    while sched.status()["queued"] < 1:
        started, gate = gates.new()
        held.append(sched.submit(tasks.gated, started, gate))
        assert len(held) < 50, "the workers never filled up"
    return held


@pytest.mark.timeout(60)
def test_map_timeout_cancels_the_task_it_timed_out_on(gates: Gates, tmp_path: Path) -> None:
    """``Executor.map`` cancels every task not started when its timeout runs
    out, the one it was waiting on included; ``Scheduler.map`` left that one
    (the head) queued, and it ran after the caller had been told TimeoutError."""
    ran = str(tmp_path / "ran")
    with Scheduler(local_workers=1) as sched:
        held = busy_with_queue(sched, gates)
        results = sched.map(tasks.mark_run, [ran] * 3, timeout=0.3)
        with pytest.raises(TimeoutError):
            next(results)
        gates.open_all()
        assert all(f.result(RESULT) is None for f in held)
    assert not os.path.exists(ran), "a task of the timed-out map ran afterwards"


@pytest.mark.timeout(60)
def test_a_running_dependency_stopped_by_cancel_cancels_its_dependents(
        sched: Scheduler, gates: Gates) -> None:
    """README: "If a dependency is cancelled, the task is cancelled, and so on
    down the chain". A link stopped by ``sched.cancel`` while it runs is
    "cancelled" (``describe``), yet the links after it failed with
    DependencyError ("failed"), unlike those of a link cancelled while queued."""
    started, gate = gates.new()
    head = sched.submit(tasks.gated, started, gate, 1)
    middle = sched.submit(tasks.add, head, 1)
    tail = sched.submit(tasks.add, middle, 1)
    Gates.started(started)
    assert sched.cancel(head) is True
    done, _ = concurrent.futures.wait([head, middle, tail], timeout=RESULT)
    assert len(done) == 3
    assert sched.describe(head)["state"] == "cancelled"  # type: ignore[index]
    for future in (middle, tail):
        assert future.cancelled(), repr(future.exception())
        assert sched.describe(future)["state"] == "cancelled"  # type: ignore[index]


@pytest.mark.timeout(60)
def test_cancelled_queued_tasks_free_their_places_in_max_pending(gates: Gates) -> None:
    """``max_pending`` bounds the tasks that *wait*; cancelled ones wait for
    nothing, yet they kept their places (``status()["queued"]`` counted them,
    ``submit`` blocked and ``try_submit`` raised SchedulerBusyError) until a
    worker freed up."""
    with Scheduler(local_workers=1, max_pending=3) as sched:
        busy_with_queue(sched, gates)
        queued = []
        while True:
            try:
                queued.append(sched.try_submit(tasks.square, 2))
            except SchedulerBusyError:
                break
        assert all(sched.cancel(f) for f in queued) and all(f.cancelled() for f in queued)
        try:
            assert sched.status()["queued"] == 1  # the gated one still waiting
            sched.try_submit(tasks.square, 3)  # raised SchedulerBusyError
        finally:
            gates.open_all()


SLOW_IMPORT = """
import os, time
_end = time.monotonic() + 60
while not os.path.exists({gate!r}) and time.monotonic() < _end:
    time.sleep(0.005)


def hold(gate):
    end = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < end:
        time.sleep(0.005)
    return "held"
"""


@pytest.mark.timeout(60)
def test_cancel_of_a_task_placed_but_not_yet_handed_to_its_worker(
        gates: Gates, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the Backlog placing a job (it is "running") and the local tier
    handing it to the engine, ``sched.cancel`` raised a bare
    ``TypeError: cannot unpack non-iterable NoneType object`` from
    tiers/local.py, and the task went on to run to its end. The window is
    held open here by the job's own 'module:function' reference, whose module
    takes its time to import (the tier resolves it before handing it over)."""
    import_gate, never = str(tmp_path / "import-gate"), str(tmp_path / "never")
    module = f"audit_slow_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(SLOW_IMPORT.format(gate=import_gate))
    monkeypatch.syspath_prepend(str(tmp_path))
    with Scheduler(local_workers=1) as sched:
        held = busy_with_queue(sched, gates)
        victim = sched.submit(f"{module}:hold", never)  # queued behind them
        try:
            gates.open_all()  # the workers' thread places it, and imports its module
            wait_until(lambda: sched.describe(victim)["state"] == "running",  # type: ignore[index]
                       timeout=RESULT, message="the victim to be placed")
            try:
                assert sched.cancel(victim) is True
            finally:
                Gates.open(import_gate)
            with pytest.raises(TaskCancelledError):
                victim.result(RESULT)  # its gate stays shut: only a stop ends it
            assert all(f.result(RESULT) is None for f in held)
        finally:
            Gates.open(import_gate)
            Gates.open(never)  # (a victim never stopped must not hold the shutdown)


def start_agent(address: str, root: Path, name: str) -> subprocess.Popen[bytes]:
    """A one-process ``shmrunner worker`` with short heartbeats (as test_remote.py)."""
    config = root / f"{name}.yaml"
    config.write_text("worker:\n  heartbeat_interval: 0.1\n  heartbeat_timeout: 0.6\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO]))
    with open(root / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "shmrunner.cli", "worker", "--connect", address,
             "--processes", "1", "--name", name, "--config", str(config)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


@pytest.mark.timeout(90)
def test_an_agent_resumed_after_being_declared_lost_drops_the_tasks_it_lost(
        gates: Gates, tmp_path: Path) -> None:
    """An agent SIGSTOPped past heartbeat_timeout is declared lost: its task
    fails with WorkerLostError (or is retried elsewhere). Resumed, it rejoins
    the same session but goes on running that task, whose result the hub then
    ignores: the task runs on after it was reported lost (twice, with a
    retry), and new tasks wait behind it on the agent's process."""
    with Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", heartbeat_interval=0.1,
                   heartbeat_timeout=0.6) as sched:
        assert sched.address is not None
        agent = start_agent(sched.address, tmp_path, "sleepy")
        try:
            wait_until(lambda: len(sched.status()["workers"]) == 1, timeout=RESULT,
                       message="the agent to join")
            started, gate = gates.new()
            stale = sched.submit(tasks.gated, started, gate, retries=0)
            Gates.started(started)
            os.kill(agent.pid, signal.SIGSTOP)
            try:
                with pytest.raises(WorkerLostError):
                    stale.result(RESULT)
            finally:
                os.kill(agent.pid, signal.SIGCONT)
            wait_until(lambda: len(sched.status()["workers"]) == 1, timeout=RESULT,
                       message="the agent to rejoin")
            # The stale task holds the agent's only process for up to 60 s.
            assert sched.submit(tasks.square, 3).result(10) == 9
        finally:
            gates.open_all()
            agent.terminate()
            agent.wait(RESULT)
