"""Job control: stopping a running job (Scheduler.cancel, the daemon's cancel on
a local worker and on a remote agent), job states with attempts and worker,
client futures PENDING until the daemon accepts them, and progress of a batch
followed by its ids from another client.

The Scheduler tests run in this process; the daemon tests run real daemon and
agent processes (``_daemon_tasks``) and talk to them through the public Client,
the CLI, or a raw DEALER socket for what a Client never sends.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import signal
import socket
import weakref
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import _retry_tasks
import shmrunner
from _daemon_tasks import RawPeer, Worker, named, port_of, run_cli, rx_queued, stopped
from _util import is_alive, wait_until
from shmrunner.errors import TaskCancelledError
from shmrunner.transport.protocol import PROTOCOL_VERSION, Message

RESULT = 30.0
HOST = socket.gethostname()


def _pid_in(path: Path) -> int:
    wait_until(path.exists, timeout=RESULT, message=f"{path.name} to appear")
    return int(path.read_text())


# --- the Scheduler ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_scheduler_cancel_stops_a_running_task_and_replaces_its_worker(tmp_path: Path) -> None:
    from _daemon_tasks import hold

    started, release = tmp_path / "started", tmp_path / "release"
    with shmrunner.Scheduler(local_workers=1, retries=3) as sched:
        future = sched.submit(hold, str(started), str(release), 120.0)
        pid = _pid_in(started)
        assert future.running()
        assert future.cancel() is False  # concurrent.futures' meaning is kept
        assert sched.describe(future) == {"state": "running", "attempts": 1,
                                          "worker": f"local@{HOST}"}
        assert sched.runs(future) == (1, f"local@{HOST}")  # describe's two, alone
        assert sched.runs(concurrent.futures.Future()) is None  # not this Scheduler's
        assert sched.cancel(future) is True
        with pytest.raises(TaskCancelledError, match="cancelled"):
            future.result(RESULT)
        wait_until(lambda: not is_alive(pid), timeout=RESULT, message="the worker to be killed")
        assert sched.describe(future) == {"state": "cancelled", "attempts": 1,
                                          "worker": f"local@{HOST}"}
        assert sched.runs(future) == (1, f"local@{HOST}")  # settled: kept
        with shmrunner.Scheduler(local_workers=1) as other:  # ... for its own Scheduler only
            assert other.runs(future) is None and other.describe(future) is None
        assert sched.cancel(future) is False  # settled: nothing to cancel
        # Never retried (retries=3), and a new process serves the next task.
        from _daemon_tasks import where

        assert sched.submit(where).result(RESULT) != pid
        assert sched.status()["running"] == 0
        assert not release.exists()


@pytest.mark.timeout(60)
def test_scheduler_cancel_of_a_queued_task_and_of_a_task_waiting_for_its_retry(
        tmp_path: Path) -> None:
    from _daemon_tasks import hold

    started, release = tmp_path / "started", tmp_path / "release"
    attempts = tmp_path / "attempts"
    with shmrunner.Scheduler(local_workers=1, retry_backoff=60.0,
                             retry_on=["ConnectionError"]) as sched:
        blocker = sched.submit(hold, str(started), str(release), 120.0)
        _pid_in(started)
        # The worker may take a few tasks ahead (pacing): the last ones wait here.
        others = []
        while sched.status()["queued"] < 2:
            others.append(sched.submit(_retry_tasks.fail_first, str(tmp_path / "other"), 0,
                                       "ConnectionError"))
        queued = others.pop()
        assert sched.describe(queued) == {"state": "queued", "attempts": 0, "worker": None}
        assert sched.runs(queued) == (0, None)
        assert sched.cancel(queued) is True
        assert queued.cancelled()
        release.touch()
        blocker.result(RESULT)
        assert all(f.result(RESULT).startswith("ok after") for f in others)
        # Fails once, then sits out a 60 s backoff: cancel ends that wait.
        flaky = sched.submit(_retry_tasks.fail_first, str(attempts), 5, "ConnectionError",
                             retries=5)
        wait_until(lambda: sched.status()["retry_waiting"] == 1, timeout=RESULT,
                   message="the task to wait for its retry")
        assert sched.describe(flaky) == {"state": "queued", "attempts": 1,
                                         "worker": f"local@{HOST}"}
        assert sched.cancel(flaky) is True
        with pytest.raises(TaskCancelledError):
            flaky.result(RESULT)
        assert sched.status()["retry_waiting"] == 0
    assert [event for event, _ in _retry_tasks.attempts(str(attempts))] == ["start", "fail"]


@pytest.mark.timeout(60)
def test_a_kept_future_does_not_keep_its_tasks_arguments(tmp_path: Path) -> None:
    """A caller may keep futures for as long as it likes (a list of results):
    once settled or cancelled, they must not hold the arrays they were
    submitted with, cancelled while queued included."""
    from _daemon_tasks import hold, total

    started, release = tmp_path / "started", tmp_path / "release"
    with shmrunner.Scheduler(local_workers=1) as sched:
        blocker = sched.submit(hold, str(started), str(release), 120.0)
        _pid_in(started)
        futures, refs = [], []
        while sched.status()["queued"] < 2:  # the worker may take a few ahead
            a = np.ones(1000)
            refs.append(weakref.ref(a))
            futures.append(sched.submit(total, a))
            del a
        victim = futures.pop()
        assert victim.cancel() is True  # queued: concurrent.futures' own cancel
        assert sched.describe(victim) == {"state": "cancelled", "attempts": 0, "worker": None}
        release.touch()
        blocker.result(RESULT)
        assert [f.result(RESULT) for f in futures] == [1000.0] * len(futures)
        # No gc.collect(): a reference cycle through a kept future would hold them.
        wait_until(lambda: all(ref() is None for ref in refs), timeout=RESULT,
                   message="the arguments of settled and cancelled tasks to be freed")
        assert sched.describe(futures[0]) == {"state": "done", "attempts": 1,
                                              "worker": f"local@{HOST}"}


# --- the daemon -------------------------------------------------------------------------

def _hold(client: Any, tmp_path: Path, name: str, **options: Any) -> tuple[Any, Path, Path]:
    started, release = tmp_path / f"{name}.started", tmp_path / f"{name}.release"
    future = client.submit("_daemon_tasks:hold", str(started), str(release), 120.0,
                           job_id=name, **options)
    return future, started, release


@pytest.mark.timeout(120)
def test_cancel_stops_a_running_job_on_a_local_worker_for_good(tmp_path: Path,
                                                               daemons: Any) -> None:
    d = daemons().start()
    client = d.client(refetch_interval=0.2)
    future, started, release = _hold(client, tmp_path, "victim", retries=3)
    pid = _pid_in(started)
    info = client.job_info("victim")
    assert (info["state"], info["attempts"], info["worker"]) == ("running", 1, f"local@{HOST}")
    assert future.cancel() is False  # accepted and running: as concurrent.futures says
    assert client.cancel(future) == "cancelled"
    with pytest.raises(TaskCancelledError, match="while it ran"):
        future.result(RESULT)
    wait_until(lambda: not is_alive(pid), timeout=RESULT, message="the worker to be killed")
    info = client.job_info("victim")
    assert (info["state"], info["attempts"], info["worker"]) == ("cancelled", 1,
                                                                 f"local@{HOST}")
    assert client.cancel("victim") == "cancelled"  # again: it stays cancelled
    started.unlink()
    # A new worker process serves the next job; the cancelled one is not retried.
    assert client.submit("_daemon_tasks:where").result(RESULT) != pid
    status = client.status()
    assert status["cancelled"] == 1 and status["running"] == 0
    d.kill9()
    d.start()  # same journal: the cancelled job is not run again
    later = d.client()
    assert later.submit("_daemon_tasks:inc", 1).result(RESULT) == 2
    assert later.job_state("victim") == "cancelled"
    with pytest.raises(TaskCancelledError):
        later.result("victim", timeout=10)
    assert not started.exists()
    out = run_cli("cancel", "--connect", d.address, "victim", "no-such-job")
    assert out.returncode == 1, out.stderr
    assert out.stdout.split() == ["victim", "cancelled", "no-such-job", "unknown"]


@pytest.mark.timeout(120)
def test_cancel_stops_a_running_job_on_a_remote_agent(tmp_path: Path, daemons: Any) -> None:
    d = daemons(scheduler={"local_workers": 0}).start()
    agent = Worker(tmp_path, d.workers_address, "far")
    try:
        wait_until(lambda: named(d.status(), "far") is not None, timeout=RESULT,
                   message="the agent to join")
        client = d.client()
        future, started, release = _hold(client, tmp_path, "remote-victim", retries=2,
                                         timeout=300.0)
        pid = _pid_in(started)
        info = client.job_info("remote-victim")
        assert (info["state"], info["worker"]) == ("running", f"far@{HOST}")
        out = run_cli("cancel", "--connect", d.address, "remote-victim")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["remote-victim", "cancelled"]
        with pytest.raises(TaskCancelledError):
            future.result(RESULT)
        # Killed at once, not after its 300 s timeout; the agent replaces it.
        wait_until(lambda: not is_alive(pid), timeout=RESULT, message="the task's process "
                   "to be killed")
        started.unlink()
        assert client.submit("_daemon_tasks:where").result(RESULT) not in (pid, None)
        assert agent.alive()
        assert not started.exists()  # not retried
        out = run_cli("jobs", "--connect", d.address, "--json", "remote-victim")
        assert out.returncode == 0, out.stderr
        [job] = json.loads(out.stdout)
        assert (job["state"], job["attempts"], job["worker"]) == ("cancelled", 1,
                                                                  f"far@{HOST}")
    finally:
        agent.stop()


@pytest.mark.timeout(120)
def test_state_shows_attempts_and_worker_after_a_retry(tmp_path: Path, daemons: Any) -> None:
    d = daemons(scheduler={"retry_on": ["ConnectionError"]}).start()
    client = d.client()
    path = tmp_path / "attempts"
    future = client.submit("_retry_tasks:fail_first", str(path), 1, "ConnectionError",
                           retries=2, job_id="flaky")
    assert future.result(RESULT) == "ok after 2"
    info = client.job_info("flaky")
    assert (info["state"], info["attempts"], info["worker"]) == ("done", 2, f"local@{HOST}")
    assert info["finished"] is not None
    out = run_cli("jobs", "--connect", d.address, "--limit", "1")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split()[:4] == ["JOB", "STATE", "ATTEMPTS", "WORKER"]
    assert row.split()[:4] == ["flaky", "done", "2", f"local@{HOST}"]


@pytest.mark.timeout(120)
def test_cancel_during_a_retry_backoff_says_so(tmp_path: Path, daemons: Any) -> None:
    d = daemons(scheduler={"retry_on": ["ConnectionError"], "retry_backoff": 600.0,
                           "retry_backoff_max": 600.0}).start()
    client = d.client()
    path = tmp_path / "attempts"
    future = client.submit("_retry_tasks:fail_first", str(path), 1, "ConnectionError",
                           retries=2, job_id="backoff")
    wait_until(lambda: path.exists() and "fail" in path.read_text(), timeout=RESULT,
               message="the first attempt to fail")
    wait_until(lambda: client.job_info("backoff")["state"] == "queued", timeout=RESULT,
               message="the job to wait for its retry")
    assert client.cancel(future) == "cancelled"
    with pytest.raises(TaskCancelledError, match="while it waited to be retried"):
        future.result(RESULT)
    assert path.read_text().count("start") == 1  # never retried


def _submit_to_frozen(d: Any, client: Any, marker: Path, job_id: str) -> Any:
    """Submit ``append_id(marker, job_id)`` to the SIGSTOPped daemon ``d``; its
    future once the submit waits, unread, in the daemon's socket."""
    port = port_of(d.address)
    before = rx_queued(d.pid, port)
    future = client.submit("_daemon_tasks:append_id", str(marker), job_id, 0.0, job_id=job_id)
    wait_until(lambda: rx_queued(d.pid, port) > before, timeout=RESULT,
               message="the submit to reach the daemon's socket")
    return future


@pytest.mark.timeout(120)
def test_a_future_is_pending_until_accepted_and_its_cancel_withdraws_the_job(
        tmp_path: Path, daemons: Any) -> None:
    d = daemons().start()
    client = d.client()
    assert client.submit("_daemon_tasks:inc", 0).result(RESULT) == 1  # connected
    marker = tmp_path / "ran"
    port = port_of(d.address)
    os.kill(d.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: stopped(d.pid), timeout=RESULT, message="the daemon to stop")
        # The submit has left (it waits in the stopped daemon's socket) ...
        future = _submit_to_frozen(d, client, marker, "withdrawn")
        assert not future.running() and not future.done() and not future.accepted()
        sent = rx_queued(d.pid, port)
        assert future.cancel() is True  # ... and is withdrawn: a cancel follows it
        assert future.cancelled()
        assert future.wait_accepted(0) is False
        wait_until(lambda: rx_queued(d.pid, port) > sent, timeout=RESULT,
                   message="the cancel to reach the daemon's socket")
    finally:
        os.kill(d.pid, signal.SIGCONT)
    wait_until(lambda: client.job_state("withdrawn") == "cancelled", timeout=RESULT,
               message="the daemon to cancel the withdrawn job")
    with pytest.raises(TaskCancelledError, match="before it started"):
        client.result("withdrawn", timeout=10)
    # The queue moved on and the withdrawn job never ran.
    assert client.submit("_daemon_tasks:inc", 41).result(RESULT) == 42
    assert not marker.exists()
    # Accepted: RUNNING from then on, as a concurrent.futures future that started.
    accepted = client.submit("_daemon_tasks:inc", 1)
    assert accepted.wait_accepted(RESULT)
    assert accepted.result(RESULT) == 2
    assert accepted.cancel() is False


@pytest.mark.timeout(120)
def test_shutdown_with_cancel_futures_drops_every_job_that_has_not_started(
        tmp_path: Path, daemons: Any) -> None:
    d = daemons().start()  # one local worker
    client = d.client()
    held, started, release = _hold(client, tmp_path, "held")
    _pid_in(started)
    # The local tier takes a task more than it runs (queued on its worker): a
    # second held job fills that place, so the next one waits in the daemon.
    second = client.submit("_daemon_tasks:hold", str(tmp_path / "second.started"),
                           str(release), 120.0, job_id="second")
    marker = tmp_path / "ran"
    queued = client.submit("_daemon_tasks:append_id", str(marker), "queued", 0.0,
                           job_id="queued")
    assert queued.wait_accepted(RESULT)
    assert client.job_state("queued") == "queued"
    os.kill(d.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: stopped(d.pid), timeout=RESULT, message="the daemon to stop")
        pending = _submit_to_frozen(d, client, marker, "pending")
        client.shutdown(wait=False, cancel_futures=True)
        assert pending.cancelled()  # never accepted: withdrawn, as concurrent.futures does
        # Accepted: the daemon decides (a running job finishes, a queued one is dropped).
        assert not any(f.cancelled() for f in (held, second, queued))
    finally:
        os.kill(d.pid, signal.SIGCONT)
    watcher = d.client()
    wait_until(lambda: (watcher.job_state("queued"), watcher.job_state("pending"))
               == ("cancelled", "cancelled"), timeout=RESULT,
               message="the daemon to drop the queued job and the withdrawn one")
    assert watcher.job_state("held") == "running"
    release.touch()
    assert watcher.result("held", timeout=RESULT) > 0
    assert watcher.result("second", timeout=RESULT) > 0
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_progress_of_a_batch_from_another_client(tmp_path: Path, daemons: Any) -> None:
    d = daemons().start()
    submitter = d.client()
    ids = [f"batch-{i}" for i in range(5)]
    futures = [submitter.submit("_daemon_tasks:inc", i, job_id=job_id)
               for i, job_id in enumerate(ids)]
    assert [f.result(RESULT) for f in futures] == [1, 2, 3, 4, 5]
    _, started, release = _hold(submitter, tmp_path, "batch-held")
    _pid_in(started)
    ids.append("batch-held")
    # Another Client (as another process would) follows the batch by its ids.
    watcher = d.client()
    counts = watcher.progress(ids, wait=False)
    assert counts == {"queued": 0, "running": 1, "done": 5, "failed": 0, "cancelled": 0,
                      "unknown": 0, "total": 6}
    own = submitter.status()
    mine = [c for c in watcher.status()["clients"] if c["client"] == own["client"]]
    assert mine and (mine[0]["done"], mine[0]["running"]) == (5, 1)  # the submitter's, counted
    assert watcher.status()["client"] != own["client"]
    seen: list[tuple[int, int | None]] = []

    def report(done: int, total: int | None) -> None:
        seen.append((done, total))
        release.touch()  # the held job finishes only once the first count is in

    counts = watcher.progress(ids, progress=report, interval=0.05, timeout=RESULT)
    assert counts["done"] == 6 and counts["total"] == 6
    assert seen[0] == (5, 6) and seen[-1] == (6, 6)
    # Ids the daemon never saw count as finished ("unknown"): a wait always ends.
    assert watcher.progress(["never-submitted"], timeout=RESULT)["unknown"] == 1


@pytest.mark.timeout(120)
def test_a_flood_of_timed_fetches_of_one_job_is_bounded_and_answered_once(
        tmp_path: Path, daemons: Any) -> None:
    """One peer's timed fetches of one job are capped (the rest refused at
    once); each kept one is answered once when it times out; the result goes to
    the peer once, however many of its fetches wait; others are served."""
    d = daemons().start()
    client = d.client()
    started, release = tmp_path / "started", tmp_path / "release"
    held = client.submit("_daemon_tasks:hold", str(started), str(release))
    wait_until(started.exists, timeout=RESULT, message="the held job to start")
    peer = RawPeer(d.address, rcvhwm=100_000)
    try:
        flood = 2000
        for i in range(flood):  # the first 64 expire in 2-3 s, the rest much later
            timeout = 2.0 + i / 1000 if i < 64 else 600.0
            peer.send(Message("fetch", {"job_id": held.job_id, "timeout": timeout}))
        assert client.status(timeout=RESULT)["running"] == 1  # another client is served
        codes = collections.Counter()
        while sum(codes.values()) < flood:
            reply = peer.recv(timeout=RESULT)
            assert reply is not None and reply.type == "error", (codes, reply)
            codes[reply.body["code"]] += 1
        assert codes == {"busy": flood - 64, "timeout": 64}
        peer.send(Message("fetch", {"job_id": held.job_id, "timeout": 600.0}))  # room again
        peer.send(Message("fetch", {"job_id": held.job_id, "timeout": 600.0}))
        assert client.status(timeout=RESULT)["running"] == 1  # both fetches were read
        release.write_text("go")
        assert held.result(timeout=RESULT) == int(started.read_text())
        result = peer.recv(timeout=RESULT)
        assert result is not None and result.type == "result", result
        assert peer.recv(timeout=0.5) is None  # once, not once per waiting fetch
    finally:
        peer.close()


@pytest.mark.timeout(120)
def test_hostile_cancel_and_progress_requests_are_refused(tmp_path: Path,
                                                          daemons: Any) -> None:
    d = daemons().start()
    client = d.client()
    with pytest.raises(ValueError, match="at least one"):
        client.progress([])
    with pytest.raises(ValueError, match="invalid job id"):
        client.progress(["ok", "../etc/passwd"])
    with pytest.raises(TypeError, match="not one str"):
        client.progress("batch-1")
    with pytest.raises(ValueError, match="invalid job id"):
        client.cancel("x" * 500)
    with pytest.raises(ValueError, match="interval"):
        client.progress(["ok"], interval=0)
    with pytest.raises(ValueError, match="interval"):  # it slept for ever (OverflowError)
        client.progress(["ok"], interval=float("inf"))
    with pytest.raises(ValueError, match="timeout"):  # it never timed out
        client.progress(["ok"], timeout=float("nan"))
    out = run_cli("cancel", "--connect", d.address, "../bad")
    assert out.returncode == 2 and "invalid job id" in out.stderr
    peer = RawPeer(d.address)
    try:
        # A bad id in a cancel or a summary query: one clear error, no crash.
        peer.send(Message("cancel", {"job_id": "../../x"}))
        reply = peer.recv()
        assert reply.type == "error" and reply.body["code"] == "invalid"
        peer.send(Message("jobs", {"job_ids": ["a", "b/c"], "summary": True}))
        reply = peer.recv()
        assert reply.type == "error" and "invalid job id" in reply.body["reason"]
        peer.send(Message("jobs", {"job_ids": ["a", "b"], "summary": True}))
        reply = peer.recv()
        assert reply.type == "jobs_reply" and reply.body["counts"]["unknown"] == 2
        # Too many ids, or fields of the wrong type, break the schema: rejected
        # and counted, never answered nor acted on; the daemon serves on.
        rejected = d.status()["rejected"]
        for body in ({"job_ids": [f"j{i}" for i in range(257)], "summary": True},
                     {"job_ids": ["a"], "summary": "yes"}, {"limit": 10**9}):
            peer.send_frames([msgpack.packb([PROTOCOL_VERSION, "jobs", body])])
        peer.send_frames([msgpack.packb([PROTOCOL_VERSION, "cancel",
                                         {"job_id": "a", "queued_only": 1}])])
        wait_until(lambda: d.status()["rejected"] >= rejected + 4, timeout=RESULT,
                   message="the daemon to reject the malformed requests")
        assert peer.recv(timeout=0.5) is None
    finally:
        peer.close()
    assert client.submit("_daemon_tasks:inc", 1).result(RESULT) == 2
