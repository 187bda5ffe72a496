"""Attacks on the runner daemon's client endpoint, against a real daemon
subprocess: job ids that try to be paths, lost spill files, peers that never
read, a full queue, and a fuzz of random messages."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import shmrunner
from _daemon_tasks import RawPeer
from _util import wait_until
from shmrunner._jobid import job_id_problem
from shmrunner.errors import JournalError
from shmrunner.transport.protocol import PROTOCOL_VERSION, Message


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
    # Accepted + results: more replies than ZeroMQ's queue for it (1,000) and its
    # backlog in the daemon (32 MiB) hold: the rest are dropped, not waited for.
    n = 2000
    hog = RawPeer(d.address, rcvhwm=1)
    try:
        for i in range(n):
            hog.send(Message("submit", {"job_id": f"hog-{i}", "fn": "_daemon_tasks:blob",
                                        "args": (64 << 10,), "kwargs": {}}))
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
    quick = [client.submit("_daemon_tasks:inc", i) for i in range(20)]
    assert [f.result(timeout=60) for f in quick] == list(range(1, 21))

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


# --- fuzz ----------------------------------------------------------------------------------

def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-"


def _random_job_id(rng: random.Random, tmp_path: Path) -> Any:
    kind = rng.randrange(10)
    if kind < 3:  # valid
        return rng.choice("abcXYZ019_:-") + "".join(
            rng.choice(_ID_CHARS) for _ in range(rng.randrange(0, 128)))
    if kind == 3:
        return "../" * rng.randrange(1, 6) + f"escape{rng.randrange(100)}"
    if kind == 4:
        return str(tmp_path / f"abs{rng.randrange(100)}")
    if kind == 5:
        return f"dir/{rng.randrange(100)}/file"
    if kind == 6:
        return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(0, 300)))
    if kind == 7:
        return rng.choice(["", ".", "..", ".hidden", "a" * 129, "x" * 5000, "nul\0"])
    return rng.choice([None, 7, -1, 3.5, b"bytes", ["list"], {"map": 1}, True])


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randrange(-2**63, 2**64)
    if kind == 1:
        return rng.random() * 10 ** rng.randrange(-5, 300)
    if kind == 2:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 3:
        return "".join(chr(rng.randrange(32, 0x250)) for _ in range(rng.randrange(0, 32)))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 6:
        return {str(_random_value(rng, 3)): _random_value(rng, depth + 1)
                for _ in range(rng.randrange(0, 5))}
    return msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(rng.randrange(0, 32)))


def _fuzz_message(rng: random.Random, tmp_path: Path, valid_jobs: list[int]) -> list[bytes]:
    kind = rng.randrange(10)
    if kind < 3:  # random frames
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 4))]
    if kind < 6:  # random msgpack, often shaped like a header
        if rng.random() < 0.7:
            value = [PROTOCOL_VERSION if rng.random() < 0.8 else _random_value(rng),
                     rng.choice(["submit", "fetch", "status", "result", "hello", "nope"]),
                     _random_value(rng)]
        else:
            value = _random_value(rng)
        return [msgpack.packb(value, use_bin_type=True)]
    job_id = _random_job_id(rng, tmp_path)
    if kind < 9:
        body: dict[str, Any] = {"job_id": job_id}
        if rng.random() < 0.5:
            body["timeout"] = rng.choice([0, 0.01, None, -1, "x"])
        return [msgpack.packb([PROTOCOL_VERSION, "fetch", body], use_bin_type=True)]
    if isinstance(job_id, str) and job_id_problem(job_id) is None:
        if valid_jobs[0] >= 300:  # keep the real work small: the point is the parsing
            job_id = "../" + job_id
        else:
            valid_jobs[0] += 1
    fn = rng.choice(["_daemon_tasks:inc", "no_such_module:fn", "os:system", "bad ref"])
    return [msgpack.packb([PROTOCOL_VERSION, "submit", {
        "job_id": job_id, "fn": fn, "args": [rng.randrange(100)], "kwargs": {}}],
        use_bin_type=True)]


@pytest.mark.timeout(120)
def test_fuzz_100k_random_messages(tmp_path: Path, daemons,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    d = daemons(daemon={"journal": str(state / "journal.sqlite")},
                scheduler={"max_message_bytes": 1 << 20}).start()
    client = d.client()
    assert client.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2  # warmed up
    baseline = peak = _rss_kib(d.pid)
    before = _tree(tmp_path, skip=state)
    rng = random.Random(20240607)
    valid_jobs = [0]
    peer = RawPeer(d.address)
    replies = 0
    try:
        for start in range(0, 100_000, 500):
            for _ in range(500):
                peer.send_frames(_fuzz_message(rng, tmp_path, valid_jobs))
            while peer.socket.poll(0):
                peer.socket.recv_multipart()
                replies += 1
            if start % 10_000 == 0:
                peak = max(peak, _rss_kib(d.pid))
        # A few valid submits over the spill size, with path-like and valid ids.
        for i in range(10):
            job_id = f"big-{i}" if i % 2 else f"../big-{i}"
            peer.send(Message("submit", {"job_id": job_id, "fn": "_daemon_tasks:total",
                                         "args": (BIG,), "kwargs": {}}))
        peer.send(Message("status", {}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # everything sent before it has been handled
            if peer.socket.poll(1000) and b"status_reply" in peer.socket.recv_multipart()[0]:
                break
        else:
            raise AssertionError("no status reply after the fuzz")
    finally:
        peer.close()
    peak = max(peak, _rss_kib(d.pid))

    assert d.proc.alive()  # type: ignore[union-attr]
    status = client.status(timeout=10)
    with capsys.disabled():
        print(f"\n[fuzz] 100000 messages: {status['rejected']} rejected, {replies} replies read, "
              f"{valid_jobs[0]} valid submits, RSS {baseline} -> peak {peak} KiB")
    assert status["rejected"] > 10_000, status
    assert client.submit("_daemon_tasks:inc", 41).result(timeout=30) == 42
    assert (peak - baseline) < 200 * 1024, f"RSS grew from {baseline} to {peak} KiB"
    assert _tree(tmp_path, skip=state) == before
    assert "carrying on" not in d.proc.text()  # type: ignore[union-attr]
