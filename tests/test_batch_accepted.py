"""Batched "accepted" and "results": one message per client per round.

A client that says ``batch_accepted`` in its submits hears, per poll round,
one "accepted" carrying ``job_ids``; one that says ``batch_results`` hears a
settle round's results as one "results"; any other client hears one message
per job. The client takes each item of a batch exactly as a single message,
and refuses a malformed batch (too many ids, bad ids, wrong types) without harm.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import msgpack
import pytest
import zmq

from _daemon_tasks import RawPeer, port_of, rx_queued, stopped
from _util import wait_until
from shmrunner import Client, ProtocolError
from shmrunner.transport._schema import MAX_ACCEPTED_IDS
from shmrunner.transport.protocol import Message, decode, encode

N = 400


@pytest.mark.timeout(120)
def test_a_burst_of_submits_is_accepted_in_far_fewer_messages(daemons) -> None:
    d = daemons().start()
    client = d.client()
    assert client.submit("_daemon_tasks:inc", 0).result(timeout=60) == 1  # connected
    before_messages = client.status(timeout=10)["accepted_messages"]
    port = port_of(d.address)
    # The burst waits in the frozen daemon's socket, so its rounds find it whole
    # (on a fast machine a daemon left running may take each submit as it comes).
    os.kill(d.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: stopped(d.pid), 30, message="the daemon to stop")
        queued = rx_queued(d.pid, port)
        futures = [client.submit("_daemon_tasks:inc", i) for i in range(N)]
        wait_until(lambda: rx_queued(d.pid, port) >= queued + 50 * N, 30,
                   message="the burst to reach the daemon's socket")
        assert not any(f.accepted() for f in futures)
    finally:
        os.kill(d.pid, signal.SIGCONT)
    assert all(f.wait_accepted(timeout=60) for f in futures)
    messages = client.status(timeout=10)["accepted_messages"] - before_messages
    assert 1 <= messages <= N // 4, messages
    assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(N)]


def _submit(job_id: str, batch: bool | None) -> Message:
    body: dict[str, Any] = {"job_id": job_id, "fn": "_daemon_tasks:inc", "args": [1],
                            "kwargs": {}}
    if batch is not None:
        body["batch_accepted"] = batch
    return Message("submit", body)


@pytest.mark.timeout(90)
def test_only_a_client_that_asks_hears_the_batched_form(daemons) -> None:
    d = daemons().start()
    for batch in (None, False, True):
        peer = RawPeer(d.address)
        try:
            ids = [f"b{batch}-{i}" for i in range(20)]
            for job_id in ids:
                peer.send(_submit(job_id, batch))
            acked: list[str] = []
            results = 0
            while len(acked) < len(ids) or results < len(ids):
                reply = peer.recv(timeout=20)
                assert reply is not None, "the daemon stopped answering"
                if reply.type == "result":
                    assert reply.body["job_id"] in acked  # never before its "accepted"
                    results += 1
                    continue
                assert reply.type == "accepted", reply
                if batch:
                    assert "job_id" not in reply.body
                    acked += reply.body["job_ids"]
                else:
                    assert "job_ids" not in reply.body
                    acked.append(reply.body["job_id"])
            assert sorted(acked) == sorted(ids)
        finally:
            peer.close()


@pytest.mark.timeout(120)
def test_results_are_batched_only_for_a_client_that_asks(daemons) -> None:
    d = daemons().start()
    for batch in (False, True):
        peer = RawPeer(d.address)
        try:
            ids = [f"r{batch}-{i}" for i in range(N)]
            for job_id in ids:
                body = _submit(job_id, None).body
                body["batch_results"] = batch
                peer.send(Message("submit", body))
            values: dict[str, int] = {}
            batches = 0
            while len(values) < N:
                reply = peer.recv(timeout=30)
                assert reply is not None, "the daemon stopped answering"
                if reply.type == "accepted":
                    continue
                if batch and reply.type == "results":
                    batches += 1
                    items = reply.body["results"]
                    assert 1 < len(items) <= N
                else:
                    assert reply.type == "result", reply
                    items = [reply.body]
                for item in items:
                    assert item["ok"] is True and item["job_id"] not in values
                    values[item["job_id"]] = item["value"]
            assert values == dict.fromkeys(ids, 2)
            # Jobs finish while the daemon commits the last round's results: a
            # round settles several of them, and they go as one message.
            assert batches >= (1 if batch else 0)
        finally:
            peer.close()


_MALFORMED: list[dict[str, Any]] = [
    {"job_ids": ["victim"] * (MAX_ACCEPTED_IDS + 1)},               # too many
    {"job_ids": []},                                                # none
    {"job_ids": ["victim", "../etc"]},                              # not a job id
    {"job_ids": ["victim", 7]},                                     # not a str
    {"job_ids": "ok"},                                              # not a list
    {"job_ids": {"ok": 1}},                                         # not a list
    {"job_ids": ["a" * 129]},                                       # too long
    {"job_id": "victim", "job_ids": ["victim"]},                    # both forms
    {},                                                             # neither
]


@pytest.mark.parametrize("body", _MALFORMED)
def test_a_malformed_batched_accepted_does_not_decode(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        encode(Message("accepted", body))
    # The same body forged on the wire: the receiver refuses it in one line.
    with pytest.raises(ProtocolError):
        decode([msgpack.packb([2, "accepted", body])], max_bytes=1 << 30, allow_pickle=False)


@pytest.mark.timeout(60)
def test_a_client_refuses_malformed_batched_accepted_cleanly() -> None:
    """A fake daemon (bare ROUTER) answers the client's submits with every malformed
    batch naming one job, then a valid one naming another: the first stays
    pending (the client refused the bad ones, in order) while the second is
    accepted; a valid batch then accepts the first, and its result settles it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvtimeo = router.sndtimeo = 20_000
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = Client(f"tcp://127.0.0.1:{port}", ack_timeout=60.0, refetch_interval=60.0)

    def send(body: dict[str, Any]) -> None:
        router.send_multipart([peer.bytes, msgpack.packb([2, "accepted", body])])

    try:
        victim = client.submit("_daemon_tasks:inc", 1, job_id="victim")
        other = client.submit("_daemon_tasks:inc", 1, job_id="other")
        peer, *parts = router.recv_multipart(copy=False)
        submit = decode(parts, max_bytes=1 << 30, allow_pickle=False)
        assert submit.type == "submit" and submit.body["batch_accepted"] is True
        for body in _MALFORMED:
            send(body)
        send({"job_ids": ["other"]})
        wait_until(other.accepted, timeout=20, message="the valid batch to accept 'other'")
        assert not victim.accepted()
        send({"job_ids": ["unknown-one", "victim"]})
        wait_until(victim.accepted, timeout=20, message="the valid batch to accept 'victim'")
        assert submit.body["batch_results"] is True
        bad_results: list[Any] = [
            {"results": []},
            {"results": [{"job_id": "victim", "value": 2}]},                # no ok
            {"results": [{"ok": True, "job_id": "victim"}]},                # no value
            {"results": [{"ok": True, "job_id": "victim", "value": 2}] * 1025},
            {"results": [{"ok": True, "job_id": "victim", "task_id": 1, "value": 2}]},
            {"results": {"ok": True, "job_id": "victim", "value": 2}},
            {"results": [7]},
        ]
        for body in bad_results:
            router.send_multipart([peer.bytes, msgpack.packb([2, "results", body])])
        router.send_multipart([peer.bytes, *encode(Message("results", {"results": [
            {"ok": True, "job_id": "other", "value": 5},
            {"ok": True, "job_id": "unknown-one", "value": 0}]}))])
        assert other.result(timeout=20) == 5
        assert not victim.done()
        router.send_multipart([peer.bytes, *encode(Message("results", {"results": [
            {"ok": True, "job_id": "victim", "value": 2}]}))])
        assert victim.result(timeout=20) == 2
    finally:
        client.shutdown(wait=False, cancel_futures=True)
        router.close(linger=0)
        ctx.term()
