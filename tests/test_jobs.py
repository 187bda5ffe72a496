"""Job control in the runner daemon: job states by id, cancel by id, ``shmrunner jobs``.

Every test runs a real daemon process (one local worker, so a held job keeps
the next ones queued) and talks to it through the public Client or the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq

import shmrunner
from _daemon_tasks import run_cli
from _util import wait_until
from shmrunner.errors import TaskCancelledError
from shmrunner.transport.protocol import Message, decode, encode


def _hold(client: shmrunner.Client, tmp_path: Path, name: str) -> tuple[object, Path, Path]:
    started, release = tmp_path / f"{name}.started", tmp_path / f"{name}.release"
    future = client.submit("_daemon_tasks:hold", str(started), str(release), job_id=name)
    return future, started, release


@pytest.mark.timeout(90)
def test_job_states_through_a_jobs_life(tmp_path: Path, daemons) -> None:
    d = daemons().start()
    client = d.client()
    held, started, release = _hold(client, tmp_path, "held")
    wait_until(started.exists, timeout=30, message="the held job to start")
    queued = client.submit("_daemon_tasks:inc", 1, job_id="after")
    assert queued.wait_accepted(30)
    states = client.job_states(["held", "after", "never-seen"])
    # "after" may already sit in the worker's pipeline (handed over: running).
    assert states["held"] == "running" and states["never-seen"] == "unknown"
    assert states["after"] in ("queued", "running")
    release.touch()
    assert queued.result(timeout=30) == 2
    failing = client.submit("_daemon_tasks:fail", "boom", job_id="failing")
    with pytest.raises(Exception, match="boom"):
        failing.result(timeout=30)
    assert client.job_state("held") == "done"
    assert client.job_state("after") == "done"
    assert client.job_state("failing") == "failed"


@pytest.mark.timeout(90)
def test_cancel_of_a_queued_job_survives_a_daemon_restart(tmp_path: Path, daemons) -> None:
    # No worker at all: every job stays queued in the scheduler until the restart.
    d = daemons(scheduler={"local_workers": 0}).start()
    client = d.client(refetch_interval=0.2)
    held, started, release = _hold(client, tmp_path, "busy")
    assert held.wait_accepted(30)  # type: ignore[attr-defined]
    assert client.job_state("busy") == "queued"
    marker = tmp_path / "ran"
    # Would append to `marker` if it ever ran.
    victim = client.submit("_daemon_tasks:append_id", str(marker), "victim", 0.0,
                           job_id="victim")
    assert victim.wait_accepted(30)
    assert client.job_state("victim") == "queued"
    assert client.cancel("victim") == "cancelled"
    with pytest.raises(TaskCancelledError, match="cancelled"):
        victim.result(timeout=30)
    assert client.cancel("no-such-job") == "unknown"
    assert client.cancel("victim") == "cancelled"  # again: it stays cancelled
    assert client.job_state("victim") == "cancelled"
    with pytest.raises(TaskCancelledError):
        client.result("victim", timeout=10)
    d.kill9()
    d.scheduler_settings["local_workers"] = 1
    d.start()  # same journal: the cancelled job must not be replayed
    wait_until(started.exists, timeout=30, message="the replayed held job to start")
    release.touch()
    assert held.result(timeout=30)  # type: ignore[attr-defined]
    later = d.client()
    assert later.job_state("victim") == "cancelled"
    assert later.submit("_daemon_tasks:inc", 41).result(timeout=30) == 42  # the queue moved on
    assert not marker.exists()


@pytest.mark.timeout(90)
def test_bad_and_too_many_job_ids_are_refused(tmp_path: Path, daemons) -> None:
    d = daemons().start()
    client = d.client()
    with pytest.raises(ValueError, match="1 to 256 job ids"):
        client.job_states([f"j{i}" for i in range(257)])
    with pytest.raises(ValueError, match="invalid job id"):
        client.job_state("../etc")
    with pytest.raises(ValueError, match="limit"):
        client.jobs(limit=0)
    # The daemon itself refuses what a client that skips those checks sends.
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(d.address)
    try:
        sock.send_multipart(encode(Message("jobs", {"job_ids": ["ok", "../bad"]})))
        assert sock.poll(10_000)
        reply = decode(sock.recv_multipart(), max_bytes=1 << 20, allow_pickle=False)
        assert reply.type == "error" and reply.body["code"] == "invalid"
        assert "job id" in reply.body["reason"]
        # A cancel naming no job (a worker's task_id form) is refused; the daemon serves on.
        frames = encode(Message("jobs", {"job_ids": ["ok"]}))
        raw = [bytes(f) for f in frames]
        sock.send_multipart(encode(Message("cancel", {"job_id": ""})))
        assert sock.poll(10_000)
        reply = decode(sock.recv_multipart(), max_bytes=1 << 20, allow_pickle=False)
        assert reply.type == "error" and reply.body["code"] == "invalid"
        sock.send_multipart(raw)
        assert sock.poll(10_000)
        reply = decode(sock.recv_multipart(), max_bytes=1 << 20, allow_pickle=False)
        assert reply.type == "jobs_reply"
        assert reply.body["jobs"] == [{"job_id": "ok", "state": "unknown", "created": None,
                                       "finished": None, "attempts": None, "worker": None}]
    finally:
        sock.close()
    with pytest.raises(ValueError, match="job_ids"):
        encode(Message("jobs", {"job_ids": [f"j{i}" for i in range(257)]}))


@pytest.mark.timeout(90)
def test_shmrunner_jobs_lists_recent_jobs(tmp_path: Path, daemons) -> None:
    d = daemons().start()
    client = d.client()
    assert client.submit("_daemon_tasks:inc", 1, job_id="first").result(timeout=30) == 2
    with pytest.raises(Exception, match="nope"):
        client.submit("_daemon_tasks:fail", "nope", job_id="second").result(timeout=30)
    out = run_cli("jobs", "--connect", d.address, "--json", "--limit", "5")
    assert out.returncode == 0, out.stderr
    jobs = json.loads(out.stdout)
    assert [(j["job_id"], j["state"]) for j in jobs][:2] == [("second", "failed"),
                                                              ("first", "done")]
    assert all(j["finished"] is not None for j in jobs[:2])
    out = run_cli("jobs", "--connect", d.address, "--limit", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["JOB", "STATE", "ATTEMPTS", "WORKER", "FINISHED"]
    assert len(lines) == 2 and lines[1].split()[:2] == ["second", "failed"]
    out = run_cli("jobs", "--connect", d.address, "--limit", "5000")
    assert out.returncode != 0 and "--limit 5000: at most 1000" in out.stderr


@pytest.mark.timeout(90)
def test_future_cancel_sends_the_cancel_to_the_daemon(tmp_path: Path, daemons) -> None:
    d = daemons(scheduler={"local_workers": 0}).start()  # nothing ever starts
    client = d.client()
    future = client.submit("_daemon_tasks:inc", 1, job_id="drop-me")
    assert future.wait_accepted(30)
    assert future.cancel() is False  # running, as concurrent.futures has it ...
    with pytest.raises(TaskCancelledError):  # ... but the daemon dropped it unrun
        future.result(timeout=30)
    assert client.job_state("drop-me") == "cancelled"
