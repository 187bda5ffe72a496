"""Audit of the Scheduler's remote tier after ``Scheduler.terminate()`` and
the non-daemon ``shutdown(wait=False)``: real ``shmrunner worker`` agents
over 127.0.0.1 (the ``cluster`` helpers of test_remote.py).

Each test here reproduces one defect found in the audit (the report says
which are fixed and which are left xfail, and why).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import zmq
from test_remote import RESULT, start_cluster, stop_cluster

import _sched_tasks as tasks
from _daemon_tasks import run_cli
from _sched_tasks import Gates
from shmrunner import Scheduler, ShmrunnerError, TaskCancelledError, WorkerLostError
from shmrunner.transport.curve import CurveKeys, server_keys


@pytest.fixture
def gates(tmp_path: Path) -> Gates:
    d = tmp_path / "gates"
    d.mkdir()
    return Gates(d)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("retries", [0, 2])
def test_terminate_fails_running_remote_tasks_with_task_cancelled(
        tmp_path: Path, gates: Gates, retries: int) -> None:
    """README: terminate() stops now, "running ones fail with
    TaskCancelledError" (the local tier's do). A task running on a remote
    agent, and one prefetched behind it, failed instead with
    WorkerLostError("the scheduler's remote tier stopped") when the task had
    no retries left (and with TaskCancelledError when it had some): a
    caller catching TaskCancelledError, as for the local tier, missed them,
    and one retrying on WorkerLostError would rerun a task it terminated."""
    sched, workers = start_cluster(tmp_path, gates, n=1, retries=retries)
    try:
        started, gate = gates.new()
        running = sched.submit(tasks.gated, started, gate, 1)
        prefetched = sched.submit(tasks.add, 1, 2)  # capacity 1 + prefetch 1: sent too
        Gates.started(started, RESULT)
        sched.terminate()
        for future in (running, prefetched):
            error = future.exception(RESULT)
            assert isinstance(error, TaskCancelledError), repr(error)
    finally:
        stop_cluster(sched, workers, gates)


def _curve(tmp_path: Path) -> CurveKeys:
    """The scheduler's keys (``shmrunner keygen``) admitting one worker key."""
    keys, workers = tmp_path / "keys", tmp_path / "ok-workers"
    for name in ("scheduler", "worker"):
        done = run_cli("keygen", str(keys), "--name", name)
        assert done.returncode == 0, done.stderr
    workers.mkdir()
    shutil.copy(keys / "worker.key", workers)
    return server_keys(str(keys / "scheduler.key_secret"), str(workers))


@pytest.mark.timeout(120)
def test_a_curve_scheduler_starts_while_another_one_shuts_down(tmp_path: Path) -> None:
    """With curve=, a Scheduler made while another one's shutdown(wait=False)
    was still releasing its endpoint failed now and then with a bare
    ``zmq.error.ZMQError: Address already in use (addr='inproc://zeromq.zap.01')``:
    the last endpoint's release stops the context's ZAP authenticator, whose
    socket libzmq closes in the background, and the new Scheduler's
    authenticator bound the same inproc address before it was gone (within
    70 cycles in each of three runs)."""
    curve = _curve(tmp_path)
    for _ in range(300):
        sched = Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", curve=curve)
        sched.shutdown(wait=False)
    sched.shutdown(wait=True)


@pytest.mark.timeout(60)
def test_a_curve_scheduler_beside_another_zap_authenticator_fails_in_one_line(
        tmp_path: Path) -> None:
    """A program that runs its own ``zmq.auth`` authenticator on the
    process-wide context (the one a CURVE Scheduler shares) got a bare
    ``ZMQError: Address already in use`` from deep in pyzmq, naming neither
    CURVE nor the conflict; now a ShmrunnerError that says what is wrong."""
    from zmq.auth.thread import ThreadAuthenticator

    curve = _curve(tmp_path)
    theirs = ThreadAuthenticator(zmq.Context.instance())
    theirs.start()
    try:
        with pytest.raises(ShmrunnerError, match="ZAP authenticator"):
            Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", curve=curve)
    finally:
        theirs.stop()
    # Once theirs is gone, a CURVE scheduler starts.
    Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", curve=curve).shutdown(wait=True)


@pytest.mark.timeout(90)
def test_shutdown_cancel_futures_returns_when_the_only_agent_is_lost(
        tmp_path: Path, gates: Gates) -> None:
    """shutdown(wait=True, cancel_futures=True) on a remote-only Scheduler
    while its only agent runs a task with a retry left: the agent is
    SIGKILLed, its task is lost and queued again for its retry (after the
    cancel pass), and the shutdown waits for an agent that never comes.
    A task already waiting for a retry when the shutdown began is cancelled
    (test_remote.py); one whose retry came a moment later hung it. Such a
    task is not retried: it fails with its own error."""
    sched, workers = start_cluster(tmp_path, gates, n=1)
    stopper = threading.Thread(target=sched.shutdown, daemon=True,
                               kwargs={"wait": True, "cancel_futures": True})
    try:
        started, gate = gates.new()
        future = sched.submit(tasks.gated, started, gate, 1, retries=1)
        Gates.started(started, RESULT)
        stopper.start()
        workers.procs[0].kill()
        workers.procs[0].wait(RESULT)
        stopper.join(10)  # heartbeat_timeout is 0.6 s
        assert not stopper.is_alive(), "shutdown(cancel_futures=True) still waits"
        assert isinstance(future.exception(0), WorkerLostError)
    finally:
        sched.terminate()  # ends a hung shutdown
        stopper.join(RESULT)
        stop_cluster(sched, workers, gates)
