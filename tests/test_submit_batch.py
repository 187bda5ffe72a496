"""Submits batched on the wire ("submits"): one message carries many submits.

A Client batches only once its daemon said it takes them (``submits: true``
in an ``accepted``); the daemon takes each item exactly as the single submit
it is, rejects a bad item alone (counted in ``rejected``) and journals the
item's bytes.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import zmq

from _daemon_tasks import RawPeer
from shmrunner import connect
from shmrunner.transport.protocol import Message, decode, encode


def _submit(job_id: str, x: int) -> bytes:
    return bytes(encode(Message("submit", {"job_id": job_id, "fn": "_daemon_tasks:inc",
                                           "args": [x], "kwargs": {}}))[0])


@pytest.mark.timeout(120)
def test_a_burst_travels_in_batches_and_every_job_runs(daemons) -> None:
    d = daemons().start()
    client = d.client()
    assert client.submit("_daemon_tasks:inc", 0).result(timeout=60) == 1  # the daemon said so
    before = client.status(timeout=10)
    futures = [client.submit("_daemon_tasks:inc", i) for i in range(300)]
    assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(300)]
    after = client.status(timeout=10)
    assert after["batched_submits"] - before["batched_submits"] == 300
    assert after["rejected"] == before["rejected"] == 0


@pytest.mark.timeout(90)
def test_a_bad_item_is_rejected_alone(daemons) -> None:
    d = daemons().start()
    peer = RawPeer(d.address)
    try:
        items = [b"\xc1 not msgpack", bytes(encode(Message("status"))[0]),
                 _submit("good-1", 1), _submit("../bad", 2), _submit("good-2", 2)]
        peer.send(Message("submits", {"submits": items}))
        acked: set[str] = set()
        results: dict[str, Any] = {}
        errors = []
        while len(results) < 2 or len(acked) < 2 or not errors:
            reply = peer.recv(timeout=20)
            assert reply is not None, (acked, results, errors)
            if reply.type == "accepted":
                assert reply.body.get("submits") is True
                acked.update(reply.body.get("job_ids") or [reply.body["job_id"]])
            elif reply.type in ("result", "results"):
                for body in reply.body.get("results") or [reply.body]:
                    results[body["job_id"]] = body["value"]
            else:
                assert reply.type == "error" and reply.body["code"] == "invalid", reply
                errors.append(reply)
        assert acked == {"good-1", "good-2"}
        assert results == {"good-1": 2, "good-2": 3}
    finally:
        peer.close()
    status = d.status()
    assert status["rejected"] == 2 and status["batched_submits"] == 5


class _StubDaemon:
    """A bare ROUTER standing in for a daemon: records what the client sends
    and answers each submit with "accepted" (saying ``submits`` or not) and its
    result."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.says_submits = False
        self.types: list[str] = []  # what each submit arrived in: "submit" or "submits"

    def serve(self, submits: int) -> None:
        """Answer until ``submits`` submits arrived (or 30 s without a message)."""
        seen = 0
        while seen < submits:
            assert self.socket.poll(30_000), f"only {seen} of {submits} submits came"
            peer, *frames = self.socket.recv_multipart()
            msg = decode(frames, max_bytes=1 << 20, allow_pickle=False)
            if msg.type == "submits":
                inner = [decode([b], max_bytes=1 << 20, allow_pickle=False)
                         for b in msg.body["submits"]]
            else:
                assert msg.type == "submit", msg
                inner = [msg]
            for one in inner:
                self.types.append(msg.type)
                job_id = one.body["job_id"]
                body: dict[str, Any] = {"job_id": job_id}
                if self.says_submits:
                    body["submits"] = True
                for reply in (Message("accepted", body),
                              Message("result", {"job_id": job_id, "ok": True,
                                                 "value": one.body["args"][0] + 1})):
                    self.socket.send_multipart([peer, *encode(reply)])
            seen += len(inner)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.ctx.term()


@pytest.mark.timeout(60)
def test_a_client_batches_only_once_its_daemon_says_it_takes_them() -> None:
    stub = _StubDaemon()
    client = connect(stub.address)
    try:
        for says, n in ((False, 20), (True, 1), (True, 20)):
            stub.says_submits = says
            server = threading.Thread(target=stub.serve, args=(n,))
            server.start()
            futures = [client.submit("_daemon_tasks:inc", i) for i in range(n)]
            assert [f.result(timeout=30) for f in futures] == [i + 1 for i in range(n)]
            server.join(30)
            assert not server.is_alive()
        # An older daemon never said so: every submit went alone. The first one
        # after "submits: true" may still have gone alone; every later one in a batch.
        assert stub.types[:20] == ["submit"] * 20
        assert stub.types[21:] == ["submits"] * 20
    finally:
        client.shutdown(wait=False)
        stub.close()
