"""ZmqChannel over real sockets on 127.0.0.1: messages with arrays both ways, and
a channel that keeps serving while a raw socket throws garbage at it.

Every socket is made through the ``sockets`` fixture, which closes them all
with linger=0 and then terminates the context (which would hang, and trip the
timeout, if any socket were left open). Every receive has a timeout.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from _util import wait_until
from shmrunner._wakeup import Wakeup
from shmrunner.errors import ConfigError
from shmrunner.transport.protocol import PROTOCOL_VERSION as V
from shmrunner.transport.protocol import Message, encode
from shmrunner.transport.zmqchannel import (
    ChannelClosedError,
    ChannelError,
    ChannelOptions,
    CurveKeys,
    Received,
    ZmqChannel,
)

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0   # generous deadline for a message that must arrive
LOCAL = "tcp://127.0.0.1"


class Sockets:
    """Makes channels and raw sockets on one context, and remembers them all."""

    def __init__(self) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.made: list[ZmqChannel | zmq.Socket[Any]] = []

    def channel(self, kind: Any, options: ChannelOptions | None = None,
                **kw: Any) -> ZmqChannel:
        ch = ZmqChannel(kind, options, context=self.context, **kw)
        self.made.append(ch)
        return ch

    def raw(self, socket_type: int) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.context.socket(socket_type)
        sock.linger = 0
        sock.rcvtimeo = sock.sndtimeo = int(WAIT * 1000)
        self.made.append(sock)
        return sock

    def router(self, options: ChannelOptions | None = None) -> tuple[ZmqChannel, str]:
        ch = self.channel("router", options)
        return ch, ch.bind(f"{LOCAL}:*")

    def close(self) -> None:
        for thing in self.made:
            if isinstance(thing, ZmqChannel):
                thing.close()
            else:
                thing.close(linger=0)
        self.context.term()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    s = Sockets()
    try:
        yield s
    finally:
        s.close()


def hello(name: str = "w1") -> Message:
    return Message("hello", {"name": name, "host": "localhost", "pid": 1, "capacity": 2})


def must_recv(ch: ZmqChannel) -> Received:
    got = ch.recv(WAIT)
    assert got is not None, f"no message within {WAIT}s"
    return got


def test_dealer_and_router_exchange_arrays(sockets: Sockets) -> None:
    router, endpoint = sockets.router()
    dealer = sockets.channel("dealer", identity=b"worker-1")
    dealer.connect(endpoint)
    big = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    small = np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4))
    dealer.send(hello())
    tracker = dealer.send(Message("result", {"session": "s", "task_id": 3, "ok": True,
                                             "value": (big, {"s": small})}), track=True)
    assert tracker is not None
    peer, msg = must_recv(router)
    assert peer == b"worker-1" and msg == hello()
    peer, msg = must_recv(router)
    tracker.wait(WAIT)   # ZeroMQ is done with big's memory: it may change again
    got_big, got = msg.body["value"]
    np.testing.assert_array_equal(got_big, big)
    np.testing.assert_array_equal(got["s"], small)
    assert got["s"].dtype == small.dtype and got["s"].flags.f_contiguous
    assert isinstance(got_big.base, zmq.Frame) and got_big.flags.writeable   # no copy
    router.send(Message("task", {"task_id": 4, "fn": "math:hypot", "args": (got_big[0, :2],),
                                 "kwargs": {}}), peer)
    _, task = must_recv(dealer)
    np.testing.assert_array_equal(task.body["args"][0], [0.0, 1.0])
    assert router.rejected == dealer.rejected == 0


def test_recv_times_out_with_none(sockets: Sockets) -> None:
    router, _ = sockets.router()
    assert router.recv(0) is None
    assert router.recv(0.05) is None


def garbage(good: list[Any], max_bytes: int) -> list[list[Any]]:
    """Multipart messages that each break the protocol in one way."""
    def header(*items: Any) -> bytes:
        return bytes(msgpack.packb(list(items)))

    array_ref = msgpack.ExtType(1, msgpack.packb([2, "<f8", [4], [8]]))
    return [
        [b"\xc1"],
        [b"definitely not msgpack"],
        [b""],
        [header(V + 1, "hello", {})],
        [header(V, "launch", {})],
        [header(V, "hello", {"name": "w"})],
        [good[0][:-3]],
        [*good, b"trailing frame"],
        [header(V, "status_reply", {"status": {"v": array_ref}}), bytes(32)],
        [header(V, "status_reply", {"status": msgpack.ExtType(3, pickle.dumps(1))})],
        [good[0], *[bytes(max_bytes // 2)] * 3],   # every frame fits, the whole does not
        # lists nested past msgpack's fixed 1025-level stack, in a header short
        # enough to be parsed uncounted and in one long enough to be counted
        [b"\x93\x02\xa5hello\x81\xa1x" + b"\x91" * 1030 + b"\x90"],
        [b"\x93\x02\xa5hello\x82\xa1p" + msgpack.packb("p" * 6000) + b"\xa1x"
         + b"\x91" * 1030 + b"\x90"],
        # a 5479-byte header of 5468 lists: 3 more than its budget
        [b"\x93\x02\xa5hello\xdd" + (5466).to_bytes(4, "big") + b"\x90" * 5466],
    ]


def test_router_rejects_garbage_and_keeps_serving(sockets: Sockets,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    options = ChannelOptions(max_bytes=64 * 1024)
    router, endpoint = sockets.router(options)
    raw = sockets.raw(zmq.DEALER)
    raw.connect(endpoint)
    good = encode(hello("after-garbage"))
    bad = garbage(good, options.max_bytes)
    with caplog.at_level(logging.WARNING, logger="shmrunner.transport.zmqchannel"):
        for frames in bad:
            raw.send_multipart(frames)
        raw.send_multipart(good)
        _, msg = must_recv(router)
    assert msg == hello("after-garbage")
    assert router.rejected == len(bad)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("rejected message #1 from peer ")
    assert any(f"protocol version {V + 1}, expected {V}" in line for line in lines)


def test_recv_deadline_holds_against_a_stream_of_garbage(sockets: Sockets) -> None:
    router, endpoint = sockets.router()
    raw = sockets.raw(zmq.DEALER)
    raw.connect(endpoint)
    for _ in range(3):
        raw.send(b"garbage")
    assert router.poll(WAIT)
    assert router.recv(0) is None   # past its deadline after the first rejection
    assert router.rejected == 1
    raw.send_multipart(encode(hello()))
    assert must_recv(router).message == hello()
    assert router.rejected == 3


def test_frame_over_maxmsgsize_never_reaches_the_channel(sockets: Sockets) -> None:
    options = ChannelOptions(max_bytes=16 * 1024)
    router, endpoint = sockets.router(options)
    raw = sockets.raw(zmq.DEALER)
    raw.connect(endpoint)
    raw.send_multipart([encode(hello())[0], bytes(64 * 1024)])   # libzmq drops this peer
    good = sockets.channel("dealer")
    good.connect(endpoint)
    good.send(hello("good"))
    _, msg = must_recv(router)
    assert msg == hello("good")
    assert router.recv(0.1) is None and router.rejected == 0


def test_dealer_rejects_garbage_from_its_router(sockets: Sockets) -> None:
    raw = sockets.raw(zmq.ROUTER)
    port = raw.bind_to_random_port(LOCAL)
    dealer = sockets.channel("dealer", ChannelOptions(max_bytes=64 * 1024))
    dealer.connect(f"{LOCAL}:{port}")
    dealer.send(hello())
    identity, *frames = raw.recv_multipart()
    assert frames == encode(hello())
    good = encode(Message("welcome", {"heartbeat_interval": 1, "heartbeat_timeout": 3,
                                      "session": "s"}))
    bad = garbage(good, 64 * 1024)
    for frames in bad:
        raw.send_multipart([identity, *frames])
    raw.send_multipart([identity, *good])
    peer, msg = must_recv(dealer)
    assert peer is None and msg.type == "welcome"
    assert dealer.rejected == len(bad)


def test_accept_filters_message_types(sockets: Sockets) -> None:
    router, endpoint = sockets.router(ChannelOptions(accept=frozenset({"hello", "result"})))
    dealer = sockets.channel("dealer")
    dealer.connect(endpoint)
    dealer.send(Message("shutdown"))
    dealer.send(hello())
    assert must_recv(router).message == hello()
    assert router.rejected == 1


def test_zmq_errors_become_channel_errors(sockets: Sockets) -> None:
    router, endpoint = sockets.router()
    with pytest.raises(ChannelError, match="cannot bind"):
        sockets.channel("router").bind(endpoint)   # address in use
    with pytest.raises(ChannelError, match="cannot bind"):
        sockets.channel("router").bind("nonsense://x")
    with pytest.raises(ChannelError, match="cannot connect"):
        sockets.channel("dealer").connect("tcp://")
    with pytest.raises(ChannelError, match="is not connected"):
        router.send(hello(), b"nobody")
    lonely = sockets.channel("dealer", ChannelOptions(send_timeout=0.05))
    with pytest.raises(ChannelError, match="timed out"):
        lonely.send(hello())   # no peer: the send waits for its deadline, not forever
    with pytest.raises(ValueError, match="peer"):
        router.send(hello())
    with pytest.raises(TypeError, match="cannot encode"):
        router.send(Message("status_reply", {"status": {"v": {1, 2}}}), b"x")
    with pytest.raises(ValueError, match="'pub'"):
        ZmqChannel("pub", context=sockets.context)  # type: ignore[arg-type]


def test_close_is_idempotent_and_final(sockets: Sockets) -> None:
    router, _ = sockets.router()
    with router:
        pass
    assert router.closed
    router.close()
    with pytest.raises(ChannelClosedError):
        router.send(hello(), b"x")
    with pytest.raises(ChannelClosedError):
        router.recv(0)
    with pytest.raises(ChannelClosedError):
        router.bind(f"{LOCAL}:*")


@pytest.mark.parametrize(("options", "match"), [
    ({"max_bytes": 0}, "max_bytes"),
    ({"max_header_bytes": -1}, "max_header_bytes"),
    ({"send_timeout": 0}, "send_timeout"),
    ({"accept": frozenset({"hello", "launch"})}, "launch"),
])
def test_options_are_validated(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ChannelOptions(**options)


def test_pickles_only_when_both_ends_allow(sockets: Sockets) -> None:
    trusting = ChannelOptions(allow_pickle=True)
    router, endpoint = sockets.router(ChannelOptions())
    dealer = sockets.channel("dealer", trusting)
    dealer.connect(endpoint)
    offset = 5
    task = Message("submit", {"fn": lambda x: x + offset, "args": (1,), "kwargs": {}})
    dealer.send(task)
    assert router.recv(0.5) is None and router.rejected == 1
    trusting_router, endpoint2 = sockets.router(trusting)
    trusted = sockets.channel("dealer", trusting)
    trusted.connect(endpoint2)
    trusted.send(task)
    assert must_recv(trusting_router).message.body["fn"](1) == 6


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_curve(sockets: Sockets) -> None:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    router, endpoint = sockets.router(
        ChannelOptions(curve=CurveKeys(server_public, server_secret)))
    client = sockets.channel("dealer", ChannelOptions(
        curve=CurveKeys(client_public, client_secret, server_key=server_public)))
    client.connect(endpoint)
    client.send(hello("encrypted"))
    assert must_recv(router).message == hello("encrypted")
    wrong_public, _ = zmq.curve_keypair()
    impostor = sockets.channel("dealer", ChannelOptions(
        send_timeout=5, curve=CurveKeys(client_public, client_secret, server_key=wrong_public)))
    impostor.connect(endpoint)
    impostor.send(hello("impostor"))   # queued: the handshake never completes
    assert router.recv(0.5) is None and router.rejected == 0


def test_try_send_reports_a_full_peer_queue_instead_of_waiting(sockets: Sockets) -> None:
    """A peer that never reads: its queue (send_hwm messages, past what the
    socket buffers hold) fills, and try_send says so at once, where send would
    wait send_timeout."""
    router, endpoint = sockets.router(ChannelOptions(send_hwm=2, send_timeout=60.0))
    stuck = sockets.raw(zmq.DEALER)
    stuck.rcvhwm = 1
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.connect(endpoint)
    stuck.send_multipart(encode(hello("stuck")))
    peer, _ = must_recv(router)
    assert peer is not None
    big = Message("status_reply", {"status": {"a": np.zeros(1 << 20)}})  # 8 MiB each
    results = [router.try_send(big, peer) for _ in range(20)]
    assert results[0] is True and False in results  # the queue filled, and said so
    # Refused, but ZeroMQ's I/O thread may still be moving what was queued into the
    # peer's buffers (it lags on a loaded machine), and then frees room for a
    # message or two more: offer until the queue is full for good. Each offer
    # returns at once; a send that waited would hang here (send_timeout 60 s).
    for _ in range(100):
        tracker = router.try_send(Message("heartbeat"), peer, track=True)
        if tracker is False:
            break
        assert isinstance(tracker, zmq.MessageTracker)
    assert tracker is False
    with pytest.raises(ChannelError, match="not connected"):
        router.try_send(Message("heartbeat"), b"no-such-peer")


def test_prepared_frames_are_sent_as_they_are_and_again(sockets: Sockets) -> None:
    """A message encoded once (a submit kept to send again after "busy") goes
    out as often as asked, both ways, and its frame list is left as it was."""
    router, endpoint = sockets.router()
    dealer = sockets.channel("dealer", identity=b"client-1")
    dealer.connect(endpoint)
    array = np.arange(10.0)
    frames = encode(Message("status_reply", {"status": {"a": array}}))
    kept = list(frames)
    dealer.send_frames(frames)
    assert dealer.try_send_frames(frames) is True
    for _ in range(2):
        peer, msg = must_recv(router)
        assert peer == b"client-1"
        np.testing.assert_array_equal(msg.body["status"]["a"], array)
    assert frames == kept
    tracker = router.send_frames(frames, b"client-1", track=True)
    assert isinstance(tracker, zmq.MessageTracker)
    assert router.try_send_frames(frames, b"client-1") is True
    for _ in range(2):
        np.testing.assert_array_equal(must_recv(dealer).message.body["status"]["a"], array)
    with pytest.raises(ChannelError, match="not connected"):
        router.try_send_frames(frames, b"no-such-peer")
    with pytest.raises(ValueError, match="peer identity"):
        router.send_frames(frames)
    with pytest.raises(ValueError, match="peer identity"):
        dealer.try_send_frames(frames, b"x")


def test_try_send_frames_reports_a_full_peer_queue(sockets: Sockets) -> None:
    """As try_send: a peer that never reads fills its queue, and the prepared
    send says so at once (the daemon then drops that reply and counts it)."""
    router, endpoint = sockets.router(ChannelOptions(send_hwm=2, send_timeout=60.0))
    stuck = sockets.raw(zmq.DEALER)
    stuck.rcvhwm = 1
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.connect(endpoint)
    stuck.send_multipart(encode(hello("stuck")))
    peer, _ = must_recv(router)
    assert peer is not None
    big = encode(Message("status_reply", {"status": {"a": np.zeros(1 << 20)}}))  # 8 MiB
    results = [router.try_send_frames(big, peer) for _ in range(20)]
    # (Not necessarily the last: ZeroMQ's I/O thread may free room meanwhile.)
    assert results[0] is True and False in results


def test_poll_ends_at_a_message_a_wakeup_room_to_send_or_its_timeout(
        sockets: Sockets) -> None:
    router, endpoint = sockets.router()
    lonely = sockets.channel("dealer")      # connected to nothing: nowhere to send
    assert not lonely.writable()
    assert lonely.poll(0.05, writable=True) is False
    dealer = sockets.channel("dealer")
    dealer.connect(endpoint)
    wakeup = Wakeup()
    try:
        assert router.poll(0, wakeup=wakeup) is False
        wakeup.wake()
        assert router.poll(WAIT, wakeup=wakeup) is False   # woken, no message
        assert router.poll(0, wakeup=wakeup) is False      # and drained
        with pytest.raises(BlockingIOError):
            os.read(wakeup.fd, 1)
        dealer.send(hello())
        assert router.poll(WAIT, wakeup=wakeup) is True
        assert must_recv(router).message == hello()
        assert dealer.writable()
        assert dealer.poll(WAIT, writable=True) is False   # room to send: returns at once
    finally:
        wakeup.close()
    router.close()
    with pytest.raises(ChannelClosedError):
        router.poll(0)
    with pytest.raises(ChannelClosedError):
        router.writable()
    with pytest.raises(ChannelClosedError):
        router.try_send_frames(encode(hello()), b"x")


def test_frame_and_byte_limits_hold_while_receiving(sockets: Sockets) -> None:
    """Too many frames, or too many bytes in many frames: the rest of the message
    is read and dropped, the message counted, and the next one served."""
    router, endpoint = sockets.router(ChannelOptions(max_frames=10, max_bytes=64 * 1024))
    raw = sockets.raw(zmq.DEALER)
    raw.connect(endpoint)
    good = encode(hello("after"))
    raw.send_multipart([b""] * 11)                      # one frame too many
    raw.send_multipart([good[0], *[bytes(8 * 1024)] * 9])  # 10 frames, over 64 KiB
    raw.send_multipart([b""] * 100_000)                 # a flood of empty frames
    raw.send_multipart(good)
    _, msg = must_recv(router)
    assert msg == hello("after") and router.rejected == 3


def test_a_huge_refused_message_is_read_a_slice_per_call(sockets: Sockets) -> None:
    """libzmq delivers a multipart message whole, so a refused one is read to its
    end; that happens a bounded slice per recv() call, so a loop calling
    recv(0) gets its turn back many times while a million frames go by, and
    the time it took shows in drained()."""
    router, endpoint = sockets.router(ChannelOptions(max_frames=10))
    raw = sockets.raw(zmq.DEALER)
    raw.connect(endpoint)
    raw.send_multipart([b""] * 1_000_000)
    raw.send_multipart(encode(hello("after")))
    wait_until(lambda: router.poll(0), WAIT, message="the flood to arrive")
    calls_without_a_message, deadline = 0, time.monotonic() + WAIT
    while (got := router.recv(0)) is None:
        calls_without_a_message += 1
        assert time.monotonic() < deadline, "recv(0) never got through the flood"
    assert got.message == hello("after") and router.rejected == 1
    assert calls_without_a_message >= 10  # the flood came back in slices, not in one call
    assert router.drained() > 0


def test_the_time_to_refuse_a_hostile_header_shows_in_drained(sockets: Sockets) -> None:
    """A header of nested empty lists is decoded up to the decoder's container
    budget before it is refused: a quarter of a second in which no other peer's
    message is read. drained() reports it, so an owner that judges peers by
    their silence (the hub's heartbeats) does not blame them for it; a valid
    message adds nothing."""
    router, endpoint = sockets.router()
    raw = sockets.raw(zmq.DEALER)
    raw.connect(endpoint)
    n = 1 << 20
    raw.send_multipart([b"\x93" + msgpack.packb(V) + msgpack.packb("hello")
                        + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n])
    wait_until(lambda: router.poll(0), WAIT, message="the header to arrive")
    router.drained()  # nothing refused yet: start from zero
    started = time.monotonic()
    assert router.recv(0) is None and router.rejected == 1
    took = time.monotonic() - started
    assert 0 < router.drained() <= took
    raw.send_multipart(encode(hello("after")))
    assert must_recv(router).message == hello("after")
    assert router.drained() == 0
