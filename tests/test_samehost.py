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
from typing import Any

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
    # Results with large arrays came back as memfds: add (2: a and shared) and
    # arrays_out; the totals are floats (frames).
    assert client.same_host == {"enabled": True, "durable": durable, "connected": True,
                                "recycles": True, "submits": 5, "results": 3,
                                "results_failed": 0}
    status = client.status()["same_host"]
    assert status["deposits"] == 0  # every deposit claimed
    assert status["results_sent"] == 3 and status["result_fds_held"] == 0


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
        write_sealed = _memfd(4096, sealed=False)
        fcntl.fcntl(write_sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        try:
            assert "cannot be mapped" in _put(sock, [write_sealed])["error"]
        finally:
            os.close(write_sealed)
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
            tokens = [_put(sock, [fd])["token"] for _ in range(7)]
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
            # Spans nothing (a 0 in the shape), so it fits; numpy refuses the stride.
            "numpy": ({"token": tokens[6], "arrays": [[[0], 0, "|u1", [0], [2**63], 0]]},
                      "cannot be made"),
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


# --- results by memfd -----------------------------------------------------------------


@pytest.mark.parametrize("durable", [True, False])
def test_results_come_back_by_memfd(daemons, durable: bool) -> None:
    """Array results of a same-host client's jobs come back as memfds (counted
    in Client.same_host["results"]), in both modes; the journal keeps them for a
    later fetch only when durable, else a fetch answers a clear error."""
    d = daemons(scheduler={"local_workers": 2}).start()
    client = d.client(durable=durable)
    # A client learns the side channel from its first submit with large arrays
    # (it asks the status and waits; or, without waiting, from an "accepted"):
    # later results come by memfd.
    warm = np.ones(100_000)
    assert client.submit("_daemon_tasks:total", warm).result(timeout=30) == warm.sum()
    made = client.submit("_daemon_tasks:ones", 300_000)  # W3: made by the worker
    a = np.arange(200_000, dtype=np.float64)
    bumped = client.submit("_daemon_tasks:inc_inplace", a)  # W4: in and out by memfd
    small = client.submit("_daemon_tasks:ones", 10)  # below the threshold: a frame
    np.testing.assert_array_equal(made.result(timeout=30), np.ones(300_000))
    np.testing.assert_array_equal(bumped.result(timeout=30), a + 1)
    np.testing.assert_array_equal(a, np.arange(200_000, dtype=np.float64))  # a copy went
    np.testing.assert_array_equal(small.result(timeout=30), np.ones(10))
    assert client.same_host["results"] == 2 and client.same_host["results_failed"] == 0
    status = client.status()["same_host"]
    assert status["results_sent"] == 2 and status["result_fds_held"] == 0
    # Another client fetching the same job by id gets frames (durable) or the error.
    other = d.client(same_host=False)
    if durable:
        np.testing.assert_array_equal(other.result(made.job_id, timeout=30), np.ones(300_000))
    else:
        with pytest.raises(ShmrunnerError, match="durable=False"):
            other.result(made.job_id, timeout=30)
    # And after a restart, the same.
    workers = d.descendants()
    d.kill9()
    wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=30,
               message="the killed daemon's workers to exit")
    d.start()
    again = d.client(same_host=False)
    if durable:
        np.testing.assert_array_equal(again.result(bumped.job_id, timeout=30), a + 1)
    else:
        with pytest.raises(ShmrunnerError, match="is lost"):
            again.result(bumped.job_id, timeout=30)


def test_same_host_false_takes_results_as_frames(daemons) -> None:
    d = daemons().start()
    client = d.client(same_host=False)
    np.testing.assert_array_equal(client.submit("_daemon_tasks:ones", 100_000).result(30),
                                  np.ones(100_000))
    assert client.same_host["results"] == 0
    assert d.status()["same_host"]["results_sent"] == 0


_SLOW_CLIENT = """
import sys, threading
import shmrunner
from shmrunner import _shmclient
# A client that never picks its results up (stuck, slow): the daemon holds them.
# Its collect blocks the client thread, which then sends nothing more: so the
# jobs are all accepted (sent) before the first may finish (argv[3], the gate).
_shmclient.SameHost.collect = lambda self, body: threading.Event().wait()
c = shmrunner.connect(sys.argv[1])
import numpy as np
assert c.submit("_daemon_tasks:total", np.ones(100_000)).result(30) == 100_000  # side channel
release = sys.argv[3]
futures = [c.submit("_daemon_tasks:ones_after", 100_000, release)
           for _ in range(int(sys.argv[2]))]
assert all(f.wait_accepted(30) for f in futures)
open(release, "w").close()
print("submitted", flush=True)
threading.Event().wait()
"""


def test_kill9_of_a_client_with_results_in_flight_frees_them(daemons, tmp_path: Path) -> None:
    """A client that does not pick up its result memfds, then is SIGKILLed:
    the daemon frees every fd it held for it (status back to the baseline)."""
    import subprocess
    import sys

    from _daemon_tasks import env

    d = daemons(scheduler={"local_workers": 2}).start()
    warm = d.client(same_host=False)  # the daemon's own caches, warmed as by the jobs
    assert [f.result(30).size for f in [warm.submit("_daemon_tasks:ones", 100_000)
                                        for _ in range(5)]] == [100_000] * 5
    baseline = _memfds(d.pid)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLIENT, d.address, "5",
                             str(tmp_path / "release")], env=env(), stdout=subprocess.PIPE)
    try:
        wait_until(lambda: d.status()["same_host"]["result_fds_held"] == 5, timeout=60,
                   message="the daemon to hold 5 results for the stuck client")
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    wait_until(lambda: d.status()["same_host"]["result_fds_held"] == 0, timeout=10,
               message="the killed client's result memfds to be freed")
    status = d.status()["same_host"]
    assert status["results_held"] == 0 and status["results_expired"] == 5
    wait_until(lambda: _memfds(d.pid) <= baseline, timeout=10,
               message=f"the daemon to close the result memfds (baseline {baseline}, "
                       f"now {_memfds(d.pid)})")


def test_results_never_picked_up_expire_after_result_ttl(daemons, tmp_path: Path) -> None:
    import subprocess
    import sys

    from _daemon_tasks import env

    d = daemons(daemon={"result_ttl": 1.0}).start()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLIENT, d.address, "2",
                             str(tmp_path / "release")], env=env(), stdout=subprocess.PIPE)
    try:
        wait_until(lambda: d.status()["same_host"]["results_expired"] == 2, timeout=60,
                   message="the results never picked up to expire")
        assert d.status()["same_host"]["result_fds_held"] == 0
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


class _HostileDaemon:
    """A stand-in daemon (ZeroMQ ROUTER + side channel) that names memfds in
    every result and answers the pickup with ``answer``; a fetch gets frames."""

    def __init__(self, tmp_path: Path, answer: Any, put: Any = None) -> None:
        import secrets
        import threading

        self.answer = answer
        self.put = put  # answers deposits (then results stay frames), or None
        self.name = "shmrunner-" + secrets.token_hex(16)
        self.address = f"ipc://{tmp_path}/hostile-{secrets.token_hex(4)}"
        self.fetched: list[str] = []
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.address)
        self._side = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._side.bind("\0" + self.name)
        self._side.listen(4)
        self._side.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select

        conns: list[socket.socket] = []
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._side.accept()
                    conns.append(conn)
                except TimeoutError:
                    pass
                ready, _, _ = select.select(conns, [], [], 0)
                for conn in ready:
                    try:
                        data, fds, _, _ = socket.recv_fds(conn, 100, 253)
                    except OSError:  # the client dropped it
                        data, fds = b"", []
                    if not data and not fds:
                        conns.remove(conn)
                        conn.close()
                        continue
                    if data == b"put" and self.put is not None:
                        try:
                            self.put(conn, fds)  # (it closes them)
                        except OSError:  # the client dropped it meanwhile
                            conns.remove(conn)
                            conn.close()
                    elif data == b"results" and self.put is not None:
                        conn.send(msgpack.packb({"error": "no"}))
                    elif data == b"results":
                        conn.send(msgpack.packb({"channel": "a" * 32}))
                    elif data.startswith(b"get "):
                        self.answer(conn)
                while self._router.poll(0):
                    peer, *frames = self._router.recv_multipart()
                    msg = decode(frames, max_bytes=1 << 20, allow_pickle=False)
                    job_id = msg.body.get("job_id")
                    if msg.type == "status":
                        out = Message("status_reply", {"status": {"same_host": {
                            "socket": self.name}}})
                    elif msg.type == "submit":
                        self._router.send_multipart([peer, *encode(Message(
                            "accepted", {"job_id": job_id, "same_host": self.name}))])
                        option = (msg.body.get("options") or {}).get("shm_results")
                        if option is None:  # it learns the side channel from "accepted"
                            out = Message("result", {"job_id": job_id, "ok": True,
                                                     "value": "plain"})
                        else:
                            assert option["channel"] == "a" * 32
                            out = Message("result", {
                                "job_id": job_id, "ok": True, "value": None,
                                "shm": {"token": "b" * 32,
                                        "arrays": [[[0], 0, "<f8", [512], [8], 0]]}})
                    elif msg.type == "fetch":
                        self.fetched.append(job_id)
                        out = Message("result", {"job_id": job_id, "ok": True,
                                                 "value": "as frames"})
                    else:
                        continue
                    self._router.send_multipart([peer, *encode(out)])
        finally:
            for conn in conns:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._router.close(linger=0)
        self._ctx.term()
        self._side.close()


def _send(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                 if fds else [])
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("answer", ["garbage", "error", "pipe", "unsealed", "small", "count",
                                    "close"])
def test_a_hostile_pickup_answer_falls_back_to_a_fetch(tmp_path: Path, answer: str) -> None:
    """Garbage, a refusal, fds that are not sealed memfds or too small for the
    spec, a wrong fd count, a closed channel: the client checks, takes none of
    it, and fetches the job again (frames); it never hangs."""
    def reply(conn: socket.socket) -> None:
        if answer == "garbage":
            _send(conn, b"\xc1\xc1garbage", [])
        elif answer == "error":
            _send(conn, msgpack.packb({"error": "no"}), [])
        elif answer == "pipe":
            r, w = os.pipe()
            os.close(w)
            _send(conn, msgpack.packb({"fds": 1}), [r])
        elif answer == "unsealed":
            _send(conn, msgpack.packb({"fds": 1}), [_memfd(8192, sealed=False)])
        elif answer == "small":
            _send(conn, msgpack.packb({"fds": 1}), [_memfd(1024)])  # the spec needs 4096
        elif answer == "count":
            _send(conn, msgpack.packb({"fds": 2}), [_memfd(8192)])
        else:
            conn.shutdown(socket.SHUT_RDWR)

    fake = _HostileDaemon(tmp_path, reply)
    client = shmrunner.connect(fake.address)
    try:
        # It learns the side channel from "accepted", then opens its results
        # connection without waiting: a later submit asks for results by memfd.
        futures = []

        def by_memfd() -> bool:
            futures.append(client.submit("_daemon_tasks:inc", 1))
            return futures[-1].result(timeout=30) != "plain"

        wait_until(by_memfd, timeout=30, message="a submit taking results by memfd")
        assert futures[-1].result() == "as frames"
        assert fake.fetched == [futures[-1].job_id]
        assert client.same_host["results"] == 0 and client.same_host["results_failed"] == 1
    finally:
        client.shutdown(wait=False)
        fake.close()


@pytest.mark.parametrize("daemon", ["old", "garbage", "foreign", "honest"])
def test_the_client_recycles_only_what_its_daemon_releases(tmp_path: Path, daemon: str) -> None:
    """A stand-in daemon's answers to deposits: one that never says it
    recycles (an older daemon: nothing stays lent), a malformed release (the
    connection is dropped, what it was lent closed), releases of memfds the
    client never lent (ignored), and an honest release of the last deposit's
    memfds (reused by the next submit)."""
    import struct

    last: list[int] = []  # the fds of the previous deposit (honest)

    def put(conn: socket.socket, fds: list[int]) -> None:
        inodes = [os.fstat(fd).st_ino for fd in last]
        for fd in last:
            os.close(fd)
        last[:] = fds
        if daemon == "garbage":
            conn.send(b"released" + b"\x01\x00")
        elif daemon == "foreign":
            conn.send(b"released" + struct.pack("<II3Q", 2, 1, 12345, 67890, 1))
        elif daemon == "honest" and inodes:
            conn.send(b"released" + struct.pack(f"<II{len(inodes)}Q", len(inodes), 0, *inodes))
        reply = {"token": "c" * 32} if daemon == "old" else {"token": "c" * 32, "recycles": True}
        conn.send(msgpack.packb(reply))

    fake = _HostileDaemon(tmp_path, lambda conn: None, put=put)
    client = shmrunner.connect(fake.address)
    before = shmrunner.shm_cache_info()
    try:
        for i in range(3):
            assert client.submit("_daemon_tasks:total", np.full(100_000, float(i))
                                 ).result(timeout=30) == "plain"
        info = shmrunner.shm_cache_info()
        lent = info["lent_segments"] - before["lent_segments"]
        recycled = info["recycled"] - before["recycled"]
        if daemon == "old":
            assert client.same_host["recycles"] is False and client.same_host["submits"] == 3
            assert lent == 0 and recycled == 0
        elif daemon == "garbage":  # each deposit fails: the arrays went as frames
            assert client.same_host["submits"] == 0 and lent == 0 and recycled == 0
        elif daemon == "foreign":
            assert client.same_host["submits"] == 3 and lent == 3 and recycled == 0
        else:
            # Deposit 1's memfd is released while deposit 2 waits for its
            # answer, reused by deposit 3; deposit 2's is released then.
            assert client.same_host["submits"] == 3 and lent == 1 and recycled == 2
            assert info["hits"] - before["hits"] == 1
    finally:
        client.shutdown(wait=False)
        fake.close()
        for fd in last:
            os.close(fd)
    assert shmrunner.shm_cache_info()["lent_segments"] == before["lent_segments"]
