"""Attacks on the runner daemon's client endpoint, against a real daemon
subprocess: job ids that try to be paths, lost spill files, peers that never
read, a full queue, and a fuzz of random messages."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shmrunner
from _daemon_tasks import Daemon, RawPeer
from _util import wait_until
from shmrunner.errors import JournalError
from shmrunner.transport.protocol import Message


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Make daemons (not started); every one is stopped, with all it started."""
    made: list[Daemon] = []

    def make(**options: Any) -> Daemon:
        d = Daemon(tmp_path, name=f"daemon{len(made)}", **options)
        made.append(d)
        return d

    yield make
    leftovers = [pid for d in made for pid in d.close()]
    assert not leftovers, f"processes outlived their daemon and were killed: {leftovers}"


def _tree(root: Path, skip: Path) -> set[str]:
    """Every path under ``root`` except those under ``skip``."""
    found = set()
    for directory, dirs, files in os.walk(root):
        if Path(directory) == skip or skip in Path(directory).parents:
            continue
        found.update(os.path.join(directory, name) for name in dirs + files)
    return found


BIG = np.ones(40_000)  # 320 kB: over the journal's spill size, so it goes to a file


# --- job ids -----------------------------------------------------------------------------

def _attack_ids(tmp_path: Path) -> list[str]:
    return ["proj/run-1", "../x", "../../outside", "../decoy", str(tmp_path / "decoy"),
            str(tmp_path / "abs-target"), "..", ".hidden", "", "a" * 129, "nul\0byte",
            "sp ace", "caf\u00e9", "back\\slash", "new\nline", "*", "$(id)"]


@pytest.mark.timeout(90)
def test_path_like_job_ids_are_refused_and_touch_no_file(tmp_path: Path, daemons) -> None:
    state = tmp_path / "state"
    d = daemons(daemon={"journal": str(state / "journal.sqlite"), "result_ttl": 0.5}).start()
    decoy = tmp_path / "decoy.result"  # what expire() deleted for the id "../decoy"
    decoy.write_text("not the daemon's")
    before = _tree(tmp_path, skip=state)
    peer = RawPeer(d.address)
    try:
        ids = _attack_ids(tmp_path)
        for job_id in ids:
            peer.send(Message("submit", {"job_id": job_id, "fn": "_daemon_tasks:total",
                                         "args": (BIG,), "kwargs": {}}))
            peer.send(Message("fetch", {"job_id": job_id, "timeout": 1.0}))
        replies = [peer.recv(timeout=10) for _ in range(2 * len(ids))]
        assert None not in replies, "the daemon stopped answering"
        for reply in replies:
            assert reply.type == "error" and reply.body["code"] == "invalid", reply
            assert "invalid job id" in reply.body["reason"], reply.body["reason"]
        assert sorted(r.body["job_id"] for r in replies) == sorted(ids * 2)

        # A valid id with every allowed kind of character: journaled (spilled), run, fetched.
        good = "proj.run:1-a_B"
        peer.send(Message("submit", {"job_id": good, "fn": "_daemon_tasks:total",
                                     "args": (BIG,), "kwargs": {}}))
        assert peer.recv().type == "accepted"
        result = peer.recv()
        assert result.type == "result" and result.body["value"] == float(BIG.sum())
        spilled = os.listdir(state / "journal.sqlite.spill")
        assert all(good not in name for name in spilled), spilled
    finally:
        peer.close()

    client = d.client()
    with pytest.raises(ValueError, match="invalid job id"):
        client.submit("_daemon_tasks:inc", 1, job_id="../x")
    with pytest.raises(ValueError, match="invalid job id"):
        client.result("proj/run-1", timeout=1)
    assert client.submit("_daemon_tasks:inc", 1, job_id="ok.1").result(timeout=30) == 2

    def expired() -> bool:  # the expiry sweep has run over the finished jobs
        try:
            client.result(good, timeout=1)
        except shmrunner.ShmrunnerError as exc:
            return "unknown job" in str(exc)
        return False

    wait_until(expired, timeout=20, interval=0.1, message="the results to expire")
    assert decoy.read_text() == "not the daemon's"
    assert _tree(tmp_path, skip=state) == before
    assert d.proc.alive()  # type: ignore[union-attr]
    assert "Traceback" not in d.proc.text()  # type: ignore[union-attr]


@pytest.mark.timeout(90)
def test_a_lost_or_truncated_spill_file_fails_that_job_and_the_daemon_starts(
        tmp_path: Path, daemons) -> None:
    # No local workers: the jobs stay journaled, unfinished, until the restart.
    d = daemons(scheduler={"local_workers": 0}).start()
    spill = Path(d.daemon_settings["journal"] + ".spill")
    client = d.client()
    futures, files = [], []
    for i in range(3):
        futures.append(client.submit("_daemon_tasks:total", BIG * i))
        wait_until(lambda i=i: len(os.listdir(spill)) == i + 1, timeout=10,
                   message=f"job {i}'s request to be spilled")
        files.append(spill / next(n for n in os.listdir(spill) if spill / n not in files))
    wait_until(lambda: client.status()["queued"] == 3, timeout=10, message="3 queued jobs")
    d.forget(client)
    d.kill9()
    files[0].unlink()
    with open(files[1], "r+b") as f:
        f.truncate(os.path.getsize(files[1]) // 2)

    d.scheduler_settings["local_workers"] = 1
    d.start()
    later = d.client()
    with pytest.raises(JournalError, match=f"job {futures[0].job_id}.*cannot be read"):
        later.result(futures[0].job_id, timeout=30)
    with pytest.raises(JournalError, match=f"job {futures[1].job_id}.*truncated"):
        later.result(futures[1].job_id, timeout=30)
    assert later.result(futures[2].job_id, timeout=30) == float((BIG * 2).sum())
    assert later.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2
    assert "Traceback" not in d.proc.text()  # type: ignore[union-attr]


# --- one client cannot stall the daemon ----------------------------------------------------

@pytest.mark.timeout(120)
def test_a_peer_that_never_reads_cannot_stall_the_daemon(daemons) -> None:
    d = daemons().start()
    n = 800  # accepted + results: more replies than its queue (and the kernel's) can hold
    hog = RawPeer(d.address, rcvhwm=1)
    try:
        for i in range(n):
            hog.send(Message("submit", {"job_id": f"hog-{i}", "fn": "_daemon_tasks:blob",
                                        "args": (65536,), "kwargs": {}}))
        client = d.client()
        # Every status call has a short deadline: a front thread stuck sending to the
        # hog (10 s per reply before) misses it.
        wait_until(lambda: client.status(timeout=5)["done"] == n, timeout=90, interval=0.2,
                   message=f"{n} jobs done")
        assert client.status(timeout=5)["dropped_replies"] > 0
        assert client.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2
        d.proc.signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert d.proc.popen.wait(20) == 0  # type: ignore[union-attr]
    finally:
        hog.close()


@pytest.mark.timeout(120)
def test_a_full_queue_answers_busy_and_never_blocks_the_daemon(tmp_path: Path,
                                                               daemons) -> None:
    d = daemons(scheduler={"max_pending": 2}, daemon={"drain_timeout": 1.0}).start()
    client = d.client()
    # Busy submits are sent again by the client, with backoff, until they fit.
    quick = [client.submit("_daemon_tasks:inc", i) for i in range(50)]
    assert [f.result(timeout=60) for f in quick] == list(range(1, 51))

    started, release = tmp_path / "started", tmp_path / "release"
    held = [client.submit("_daemon_tasks:hold", str(started), str(release)) for _ in range(50)]
    peer = RawPeer(d.address)
    try:
        wait_until(started.exists, timeout=30, message="a held job to start")
        # Nothing finishes while the jobs hold: once the queue is full it stays full.
        wait_until(lambda: client.status(timeout=5)["queued"] == 2, timeout=30,
                   message="the queue to fill up to max_pending")
        peer.send(Message("submit", {"job_id": "one-more", "fn": "_daemon_tasks:inc",
                                     "args": (1,), "kwargs": {}}))
        reply = peer.recv(timeout=10)
        assert reply is not None and reply.type == "error" and reply.body["code"] == "busy", \
            reply
        assert "scheduler.max_pending" in reply.body["reason"]
        assert not any(f.done() for f in held)  # waiting for room, not failed

        d.proc.signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert d.proc.popen.wait(20) == 0  # type: ignore[union-attr]
    finally:
        peer.close()
        release.touch()
