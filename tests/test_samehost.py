"""Same-host clients: arrays reach the daemon as memfds on its side channel
(shmrunner/_localclients.py, _shmclient.py), in both durability modes; kill -9
of the daemon with arrays in flight; hostile input on the side channel and in
the submit's ``shm`` option. Real daemon subprocesses, real sockets."""

from __future__ import annotations

import array
import fcntl
import gc
import os
import socket
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

import shmrunner
from _util import wait_until
from shmrunner.errors import ShmrunnerError
from shmrunner.transport.protocol import Message, decode, encode

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("durable", [True, False])
def test_arrays_round_trip_by_memfd(daemons, durable: bool) -> None:
    d = daemons(scheduler={"local_workers": 2}).start()
    client = d.client(durable=durable)
    a = np.linspace(0.0, 1.0, 200_000)
    b = np.arange(300_000, dtype=np.int32).reshape(300, 1000)[:, ::2]  # not contiguous
    shared = shmrunner.share(np.full(100_000, 3.0))  # by handle: no copy on the way
    small = np.ones(10)  # below the threshold: a frame, as ever
    futures = [client.submit("_daemon_tasks:add", a, 1.0),
               client.submit("_daemon_tasks:arrays_out", b.astype(float), 2.0),
               client.submit("_daemon_tasks:add", shared, b=shared),  # one memfd, twice
               client.submit("_daemon_tasks:total", b),
               client.submit("_daemon_tasks:nested_total", {"x": [a, small], "y": (b,)})]
    np.testing.assert_array_equal(futures[0].result(timeout=30), a + 1.0)
    out = futures[1].result(timeout=30)
    np.testing.assert_array_equal(out["scaled"], b * 2.0)
    np.testing.assert_array_equal(futures[2].result(timeout=30), shared * 2)
    assert futures[3].result(timeout=30) == float(b.sum())
    assert futures[4].result(timeout=30) == float(a.sum() + small.sum() + b.sum())
    assert client.same_host == {"enabled": True, "durable": durable, "connected": True,
                                "submits": 5}
    assert client.status()["same_host"]["deposits"] == 0  # every deposit claimed


def test_the_client_keeps_no_reference_to_a_submitted_array(daemons) -> None:
    """Once its job is done, nothing of the client holds the array it handed
    over (a reference cycle did: a stream of arrays grew the client by hundreds
    of MiB until the garbage collector's next full pass). gc is off, so only a
    plain reference count can let it go."""
    d = daemons(scheduler={"local_workers": 1}).start()
    client = d.client()
    a = np.full(100_000, 1.5)
    before = sys.getrefcount(a)
    gc.disable()
    try:
        assert client.submit("_daemon_tasks:total", a).result(timeout=30) == a.sum()
        assert client.same_host["submits"] == 1
        wait_until(lambda: sys.getrefcount(a) == before, timeout=10,
                   message="the client to let go of the array")
    finally:
        gc.enable()


def _memfds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:")
        except OSError:
            pass
    return count


@pytest.mark.parametrize("durable", [True, False])
def test_the_daemon_lets_go_of_the_memfds_once_jobs_finish(daemons, durable: bool) -> None:
    d = daemons(scheduler={"local_workers": 2}).start()
    client = d.client(durable=durable)
    client.submit("_daemon_tasks:inc", 1).result(timeout=30)
    baseline = _memfds(d.pid)
    arrays = [np.full(100_000, float(i)) for i in range(20)]
    futures = [client.submit("_daemon_tasks:total", a) for a in arrays]
    assert [f.result(timeout=60) for f in futures] == [float(a.sum()) for a in arrays]
    assert client.same_host["submits"] == 20
    wait_until(lambda: _memfds(d.pid) <= baseline, timeout=10,
               message=f"the daemon to close the deposited memfds (baseline {baseline})")


def test_memfd_bytes_count_against_max_pending_bytes(daemons) -> None:
    """Arrays handed over as memfds count in the client's budget until accepted,
    and leave it then: more than the budget goes through, a bit at a time."""
    d = daemons().start()
    client = d.client(max_pending_bytes=1 << 20)
    arrays = [np.full(100_000, float(i)) for i in range(12)]  # 800 kB each
    futures = [client.submit("_daemon_tasks:total", a) for a in arrays]
    assert [f.result(timeout=60) for f in futures] == [float(a.sum()) for a in arrays]
    assert client.same_host["submits"] == 12


def test_same_host_false_sends_frames(daemons) -> None:
    d = daemons().start()
    client = d.client(same_host=False)
    a = np.linspace(0.0, 1.0, 200_000)
    np.testing.assert_array_equal(client.submit("_daemon_tasks:add", a, 1.0).result(30), a + 1)
    assert client.same_host["submits"] == 0 and not client.same_host["connected"]


def test_kill9_with_arrays_in_flight(tmp_path: Path, daemons) -> None:
    """Jobs accepted from same-host clients, running or queued when the daemon is
    SIGKILLed: the durable ones run again after the restart with their arrays
    (from the journal), the non-durable ones fail saying why; nothing leaks
    (conftest: no memfd held, no process left)."""
    d = daemons(scheduler={"local_workers": 1}).start()
    durable = d.client(durable=True, refetch_interval=0.2)
    volatile = d.client(durable=False, refetch_interval=0.2)
    release = tmp_path / "release"
    arrays = [np.full(100_000, float(i)) for i in range(4)]
    # Once the daemon has said it takes batched submits, a burst travels as
    # one `submits` message: its items must be journaled with their arrays too.
    for client in (durable, volatile):
        assert client.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2
    kept = [durable.submit("_daemon_tasks:gated_total", a, str(tmp_path / f"s{i}"),
                           str(release)) for i, a in enumerate(arrays)]
    gone = [volatile.submit("_daemon_tasks:gated_total", a, str(tmp_path / f"v{i}"),
                            str(release)) for i, a in enumerate(arrays[:2])]
    for f in kept + gone:
        assert f.wait_accepted(timeout=30)
    wait_until((tmp_path / "s0").exists, timeout=30, message="the first job to start")
    assert durable.same_host["submits"] == 4 and volatile.same_host["submits"] == 2
    workers = d.descendants()
    d.kill9()
    wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=30,
               message="the killed daemon's workers to exit")
    # A submit while the daemon is down: its arrays cannot be deposited; they go
    # as frames once the daemon is back (the ledger resends the submit).
    late = durable.submit("_daemon_tasks:total", arrays[3])
    d.start()
    release.touch()
    assert [f.result(timeout=60) for f in kept] == [float(a.sum()) for a in arrays]
    for f in gone:
        with pytest.raises(ShmrunnerError, match="durable=False"):
            f.result(timeout=60)
    assert late.result(timeout=60) == float(arrays[3].sum())
    # After the restart the client finds the new daemon's side channel (it asks
    # for its status without waiting: a later submit uses the answer).
    sent = durable.same_host["submits"]

    def by_memfd() -> bool:
        assert durable.submit("_daemon_tasks:total", arrays[2]).result(30) == arrays[2].sum()
        return bool(durable.same_host["submits"] > sent)

    wait_until(by_memfd, timeout=30, message="a submit through the restarted daemon's "
               "side channel")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _side(d) -> socket.socket:  # type: ignore[no-untyped-def]
    name = d.status()["same_host"]["socket"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect("\0" + name)
    return sock


def _put(sock: socket.socket, fds: list[int], data: bytes = b"put") -> dict[str, str]:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
               if fds else [])
    reply: dict[str, str] = msgpack.unpackb(sock.recv(4096))
    return reply


def _memfd(size: int, sealed: bool = True) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def test_hostile_side_channel_input_is_refused(tmp_path: Path, daemons) -> None:
    d = daemons(scheduler={"max_message_bytes": 1 << 20}).start()
    sock = _side(d)
    r, w = os.pipe()
    unsealed, big, good = _memfd(4096, sealed=False), _memfd(2 << 20), _memfd(8 << 10)
    try:
        assert "not a shared memory segment" in _put(sock, [r])["error"]
        assert "not sealed" in _put(sock, [unsealed])["error"]
        assert "more than 1048576 bytes" in _put(sock, [big])["error"]
        assert "no fd" in _put(sock, [])["error"]
        assert "must be b'put'" in _put(sock, [good], data=b"junk")["error"]
        assert len(_put(sock, [good])["token"]) == 32
    finally:
        for fd in (r, w, unsealed, big, good):
            os.close(fd)
    assert d.status()["same_host"]["deposits"] == 1
    sock.close()  # its unclaimed deposit goes with it
    wait_until(lambda: d.status()["same_host"]["deposits"] == 0, timeout=10,
               message="the closed connection's deposit to be released")

    # Submits naming bad deposits: refused with the reason; the daemon serves on.
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(d.address)
    try:
        sock = _side(d)
        fd = _memfd(8 << 10)
        try:
            # A token is good for one claim, failed or not: one each.
            tokens = [_put(sock, [fd])["token"] for _ in range(6)]
        finally:
            os.close(fd)
        cases = {
            "bogus": ({"token": "0" * 32, "arrays": [[[0], 0, "<f8", [4], [8], 0]]},
                      "does not hold"),
            "shape": ({"token": tokens[0], "arrays": [[[0], 0, "<f8", [100_000], [8], 0]]},
                      "does not fit"),
            "strides": ({"token": tokens[1], "arrays": [[[0], 0, "<f8", [4], [-8], 0]]},
                        "does not fit"),
            "index": ({"token": tokens[2], "arrays": [[[0], 7, "<f8", [4], [8], 0]]},
                      "names fd 7"),
            "dtype": ({"token": tokens[3], "arrays": [[[0], 0, "|O", [4], [8], 0]]},
                      "refused"),
            "path": ({"token": tokens[4], "arrays": [[[5], 0, "<f8", [4], [8], 0]]},
                     "past the arguments"),
            "form": ({"token": tokens[5], "arrays": "x"}, "options.shm must be"),
        }
        for job_id, (spec, _) in cases.items():
            dealer.send_multipart(encode(Message("submit", {
                "job_id": job_id, "fn": "_daemon_tasks:total", "args": [None], "kwargs": {},
                "options": {"shm": spec}})))
        reasons = {}
        while len(reasons) < len(cases):
            assert dealer.poll(10_000), f"no answer for {set(cases) - set(reasons)}"
            reply = decode(dealer.recv_multipart(copy=False), max_bytes=1 << 20,
                           allow_pickle=False)
            assert reply.type == "error", reply
            reasons[reply.body["job_id"]] = reply.body["reason"]
        for job_id, (_, reason) in cases.items():
            assert reason in reasons[job_id], (job_id, reasons[job_id])
        sock.close()
    finally:
        dealer.close(linger=0)
        ctx.term()
    client = d.client()
    a = np.linspace(0.0, 1.0, 100_000)
    assert client.submit("_daemon_tasks:total", a).result(timeout=30) == float(a.sum())
    assert client.same_host["submits"] == 1
    assert d.status()["same_host"]["refused"] >= 5


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_user_is_refused_on_the_side_channel(daemons) -> None:
    d = daemons().start()
    name = d.status()["same_host"]["socket"]
    pid = os.fork()
    if pid == 0:  # the child: nothing but a socket, as uid 65534
        code = 2
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect("\0" + name)
            code = 1
            try:
                s.send(b"put")
                code = 0 if s.recv(100) == b"" else 1  # closed at once: no answer at all
            except (ConnectionResetError, BrokenPipeError):
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_until(lambda: d.status()["same_host"]["refused"] == 1, timeout=10,
               message="the refusal to be counted")
    assert "refused a connection from uid 65534" in d.log.read_text()
