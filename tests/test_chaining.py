"""Futures as arguments: a Scheduler resolves its own futures among a task's
arguments before the task runs (shmrunner/_deps.py). Real worker processes;
the remote chain runs on a real ``shmrunner worker`` agent over 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import _chain_tasks as ct
import _sched_tasks as tasks
from _sched_tasks import Gates
from _util import wait_until
from shmrunner import DependencyError, Scheduler

RESULT = 30  # seconds: a healthy result arrives in well under one
MiB = 1 << 20
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


def hold_workers(sched: Scheduler, gates: Gates, n: int = 6) -> list[str]:
    """Occupy every worker with gated tasks (more than they take: some stay
    queued); returns the gates."""
    opened = []
    started = []
    for i in range(n):
        s, g = gates.new()
        sched.submit(tasks.gated, s, g, i)
        opened.append(g)
        started.append(s)
    wait_until(lambda: sum(os.path.exists(s) for s in started) >= 1, RESULT,
               message="a worker to run a gated task")
    return opened


def test_chain_of_three_passes_the_array_by_handle(sched: Scheduler) -> None:
    a = sched.submit(ct.make, 8 * MiB // 8, 1.0)
    b = sched.submit(ct.inc, a)
    c = sched.submit(ct.poke, b)
    assert c.result(RESULT) is True  # the last task got a shared array ...
    # ... and it is the very memory of b's result: its write shows here.
    assert b.result(RESULT)[0] == 42.0
    assert b.result()[1] == 2.0
    assert sched.status()["waiting_on_futures"] == 0


def test_a_dependent_keeps_no_reference_to_the_result_it_was_given(sched: Scheduler) -> None:
    """Once the dependent is done, nothing but the dependency's own future holds
    its result (a reference cycle in the substitution kept every result passed
    on alive until the garbage collector's next full pass). gc is off, so only a
    plain reference count can let it go."""
    a = sched.submit(ct.make, 1 << 17, 1.0)
    value = a.result(RESULT)
    before = sys.getrefcount(value)
    gc.disable()
    try:
        b = sched.submit(ct.inc, a)
        assert b.result(RESULT)[0] == 2.0
        del b
        wait_until(lambda: sys.getrefcount(value) == before, timeout=10,
                   message="the scheduler to let go of the dependency's result")
    finally:
        gc.enable()


def test_futures_nested_in_lists_tuples_dicts_and_sets(sched: Scheduler) -> None:
    f1, f2, f3, f4 = (sched.submit(ct.inc, i) for i in range(4))
    out = sched.submit(ct.echo, [f1, (f2, {"k": f3})], {f4}, f1, key={"deep": [[f2]]})
    assert out.result(RESULT) == ([[1, (2, {"k": 3})], {4}, 1], {"key": {"deep": [[2]]}})


# Lists around a future 16 levels below the argument list, the deepest searched (README).
DEEPEST = 15


def _nested(value: Any, levels: int = DEEPEST) -> Any:
    for _ in range(levels):
        value = [value]
    return value


def test_a_future_at_the_deepest_level_searched_is_resolved(sched: Scheduler) -> None:
    f = sched.submit(ct.inc, 1)
    out = sched.submit(ct.echo, _nested(f), key=_nested(f))
    assert out.result(RESULT) == ([_nested(2)], {"key": _nested(2)})


def test_unhashable_results_in_a_set_fail_the_task_clearly(sched: Scheduler) -> None:
    listed = sched.submit(ct.echo, 1)  # returns a tuple holding a list: unhashable
    with pytest.raises(TypeError, match="unhashable"):
        sched.submit(ct.echo, {listed}).result(RESULT)
    assert sched.status()["waiting_on_futures"] == 0


def test_a_dependency_already_done_is_resolved_at_once(sched: Scheduler) -> None:
    a = sched.submit(ct.inc, 1)
    assert a.result(RESULT) == 2
    assert sched.submit(ct.inc, a).result(RESULT) == 3


def test_diamond(sched: Scheduler) -> None:
    top = sched.submit(ct.make, 1000, 1.0)
    left = sched.submit(ct.inc, top)
    right = sched.submit(ct.inc, top)
    bottom = sched.submit(ct.total, left, right, top)
    assert bottom.result(RESULT) == 1000 * (2 + 2 + 1)


def test_failure_propagates_down_the_chain_with_its_cause(sched: Scheduler) -> None:
    bad = sched.submit(ct.fail, "stage one broke")
    middle = sched.submit(ct.inc, bad)
    last = sched.submit(ct.inc, [middle])
    with pytest.raises(DependencyError) as info:
        last.result(RESULT)
    assert isinstance(info.value.__cause__, DependencyError)
    root = info.value.__cause__.__cause__
    assert isinstance(root, ValueError) and str(root) == "stage one broke"
    with pytest.raises(DependencyError) as direct:
        middle.result(RESULT)
    assert direct.value.__cause__ is root
    assert "failed with ValueError: stage one broke" in str(direct.value)
    assert sched.status()["waiting_on_futures"] == 0


def test_a_waiting_dependent_can_be_cancelled(sched: Scheduler, gates: Gates,
                                              tmp_path: Path) -> None:
    s, g = gates.new()
    dep = sched.submit(tasks.gated, s, g, 5)
    trace = str(tmp_path / "ran")
    dependent = sched.submit(tasks.mark_run, trace, dep)
    assert not dependent.running()
    assert sched.status()["waiting_on_futures"] == 1
    assert dependent.cancel()
    assert sched.status()["waiting_on_futures"] == 0
    gates.open(g)
    assert dep.result(RESULT) == 5
    after = sched.submit(ct.inc, dep)  # the scheduler goes on resolving
    assert after.result(RESULT) == 6
    assert not os.path.exists(trace)


def test_cancelling_a_dependency_cancels_its_dependents(sched: Scheduler,
                                                        gates: Gates) -> None:
    hold_workers(sched, gates)
    queued = sched.submit(ct.inc, 1)
    child = sched.submit(ct.inc, queued)
    grandchild = sched.submit(ct.echo, {"x": child})
    assert queued.cancel(), "the dependency should still be queued"
    assert child.cancelled() and grandchild.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        grandchild.result(RESULT)
    assert sched.status()["waiting_on_futures"] == 0


def test_a_chain_longer_than_max_pending_does_not_deadlock() -> None:
    with Scheduler(local_workers=1, max_pending=2) as s:
        f = s.submit(ct.inc, 0)
        for _ in range(30):
            f = s.submit(ct.inc, f)
        assert f.result(RESULT) == 31
        firsts = [s.submit(ct.inc, i) for i in range(10)]
        assert list(s.map(ct.inc, firsts, timeout=RESULT)) == [i + 2 for i in range(10)]


def test_shutdown_cancel_futures_cancels_waiting_dependents(gates: Gates) -> None:
    s = Scheduler(local_workers=1)
    try:
        started, g = gates.new()
        dep = s.submit(tasks.gated, started, g, 1)
        dependent = s.submit(ct.inc, dep)
        Gates.started(started)
    finally:
        s.shutdown(wait=False, cancel_futures=True)
        gates.open_all()
    assert dependent.cancelled()
    assert dep.result(RESULT) == 1


def test_a_future_of_another_executor_is_refused(sched: Scheduler) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        foreign = pool.submit(int, 1)
        foreign.result(RESULT)
        before = sched.status()["submitted"]
        with pytest.raises(TypeError, match="another executor"):
            sched.submit(ct.inc, [foreign])
    other = Scheduler(local_workers=1)
    try:
        theirs = other.submit(ct.inc, 1)
        with pytest.raises(TypeError, match="future of another executor"):
            sched.submit(ct.inc, theirs)
        assert theirs.result(RESULT) == 2
    finally:
        other.shutdown(wait=True)
    assert sched.status()["submitted"] == before


def _agent(address: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, REPO, env.get("PYTHONPATH", "")])
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "shmrunner.cli", "worker", "--connect", address,
             "--processes", "2", "--name", "chain-agent"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


@pytest.mark.parametrize("local", [0, 1], ids=["remote", "mixed"])
def test_chain_on_a_remote_worker(tmp_path: Path, local: int) -> None:
    s = Scheduler(local_workers=local, listen="tcp://127.0.0.1:*",
                  heartbeat_interval=0.2, heartbeat_timeout=5.0)
    agent = None
    try:
        assert s.address is not None
        agent = _agent(s.address, tmp_path / "agent.log")
        wait_until(lambda: sum(w["capacity"] for w in s.status()["workers"]) == 2,
                   RESULT, message="the agent to join")
        n = 4 * MiB // 8
        firsts = [s.submit(ct.make, n, float(i)) for i in range(4)]
        seconds = [s.submit(ct.inc, f) for f in firsts]
        thirds = [s.submit(ct.total, f) for f in seconds]
        assert [t.result(RESULT) for t in thirds] == [float(n * (i + 1)) for i in range(4)]
        bad = s.submit(ct.fail, "remote stage broke")
        with pytest.raises(DependencyError) as info:
            s.submit(ct.inc, bad).result(RESULT)
        assert isinstance(info.value.__cause__, ValueError)
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        s.shutdown(wait=True, cancel_futures=True)


def test_a_client_chains_its_jobs_in_the_daemon(daemons: Callable[..., Any],
                                                 tmp_path: Path) -> None:
    daemon = daemons(scheduler={"local_workers": 2}).start()
    client = daemon.client()
    other = daemon.client()
    try:
        n = 2 * MiB // 8
        first = client.submit(ct.make, n, 1.0)
        second = client.submit(ct.inc, first)
        third = client.submit(ct.total, second, first)
        assert third.result(RESULT) == float(n * 3)
        # A job finished long ago: its result comes from the daemon's journal.
        assert client.submit(ct.echo, {"k": [first.job_id, second]}).result(
            RESULT)[0][0]["k"][1][0] == 2.0
        small = client.submit(ct.inc, 1)
        assert client.submit(ct.echo, _nested(small), key=_nested(small)).result(
            RESULT) == ([_nested(2)], {"key": _nested(2)})
        bad = client.submit(ct.fail, "daemon stage broke")
        after_bad = client.submit(ct.inc, bad)
        with pytest.raises(DependencyError, match="daemon stage broke"):
            after_bad.result(RESULT)
        with pytest.raises(DependencyError, match="daemon stage broke"):
            client.submit(ct.inc, after_bad).result(RESULT)
        with pytest.raises(TypeError, match="future of another executor"):
            other.submit(ct.inc, first)
        with Scheduler(local_workers=1) as sched:
            with pytest.raises(TypeError, match="future of another executor"):
                client.submit(ct.inc, sched.submit(ct.inc, 1))
    finally:
        client.shutdown(wait=True)
        other.shutdown(wait=True)


def test_cancelling_a_job_in_the_daemon_cancels_the_jobs_that_use_it(
        daemons: Callable[..., Any], gates: Gates, tmp_path: Path) -> None:
    from shmrunner import TaskCancelledError

    daemon = daemons(scheduler={"local_workers": 1}).start()
    client = daemon.client()
    try:
        held = []
        for i in range(4):  # the one worker busy, and its queue too
            started, gate = gates.new()
            held.append(client.submit(tasks.gated, started, gate, i))
        Gates.started(str(tmp_path / "started-1"))
        queued = client.submit(ct.inc, 1)
        dependent = client.submit(ct.inc, queued)
        assert queued.wait_accepted(RESULT) and dependent.wait_accepted(RESULT)
        assert client.cancel(queued.job_id) == "cancelled"
        with pytest.raises(TaskCancelledError):
            dependent.result(RESULT)
        gates.open_all()
        assert [f.result(RESULT) for f in held] == [0, 1, 2, 3]
    finally:
        gates.open_all()
        client.shutdown(wait=True)


HOSTILE_REFS: list[tuple[Any, str]] = [
    ([[[0]]], "pair"),
    ([[[], "dep"]], "path must be"),
    ([[[-1], "dep"]], "path must be"),
    ([[[0.5], "dep"]], "path must be"),
    ([[[0] * 40, "dep"]], "path must be"),
    ([[["k" * 300], "dep"]], "path must be"),
    ([[[0], "../x"]], "invalid job id"),
    ([[[0], 7]], "job id must be a str"),
    ([[[0], "dep"]] * 1025, "at most 1024"),
    ([[[5], "dep"]], "points past the arguments"),
    ([[["nokw"], "dep"]], "names no keyword"),
    ([[[1], "dep"]], "does not lead to a placeholder"),
    ([[[0, 3], "dep"]], "does not lead into the arguments"),
    ([[[0], "never-accepted"]], "does not know"),
]


def test_hostile_job_references_fail_only_their_job(daemons: Callable[..., Any]) -> None:
    from _daemon_tasks import RawPeer
    from shmrunner.transport.protocol import Message

    daemon = daemons(scheduler={"local_workers": 1}).start()
    peer = RawPeer(daemon.address)
    try:
        peer.send(Message("submit", {"job_id": "dep", "fn": "_chain_tasks:inc",
                                     "args": (1,), "kwargs": {}}))
        replies = [peer.recv(timeout=RESULT) for _ in range(2)]
        assert sorted(r.type for r in replies) == ["accepted", "result"]
        for i, (refs, _) in enumerate(HOSTILE_REFS):
            peer.send(Message("submit", {
                "job_id": f"bad-{i}", "fn": "_chain_tasks:echo", "args": (None, 2),
                "kwargs": {}, "options": {"refs": refs}}))
        outcomes = {}
        while len(outcomes) < len(HOSTILE_REFS):
            reply = peer.recv(timeout=RESULT)
            assert reply is not None, "the daemon stopped answering"
            if reply.type in ("result", "error"):
                outcomes[reply.body["job_id"]] = reply
        for i, (_, reason) in enumerate(HOSTILE_REFS):
            reply = outcomes[f"bad-{i}"]
            text = reply.body["error"]["message"] if reply.type == "result" \
                else reply.body["reason"]
            assert reply.type == "error" or reply.body["ok"] is False
            assert reason in text, (i, text)
        # A good reference still works, and the daemon is unharmed.
        peer.send(Message("submit", {"job_id": "good", "fn": "_chain_tasks:echo",
                                     "args": (None, [None]), "kwargs": {"k": {"x": None}},
                                     "options": {"refs": [[[0], "dep"], [[1, 0], "dep"],
                                                          [["k", "x"], "dep"]]}}))
        reply = None
        while reply is None or reply.type != "result":
            reply = peer.recv(timeout=RESULT)
            assert reply is not None
        assert reply.body["ok"], reply.body
        assert reply.body["value"] == ([2, [2]], {"k": {"x": 2}})
    finally:
        peer.close()
