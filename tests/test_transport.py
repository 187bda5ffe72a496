"""Array-aware pickling over a real fd-carrying channel, and the channel itself.

Everything crosses a real AF_UNIX socketpair in this process: ``dumps`` on one
end, :class:`FdChannel` send/recv, ``loads`` on the other. Blocking sends that
may exceed the socket buffer run in a helper thread so the test can read.
"""

from __future__ import annotations

import array
import concurrent.futures
import dataclasses
import gc
import os
import selectors
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import shmrunner
from _util import drop_shm_cache, shm_segments
from shmrunner.shm import DEFAULT_THRESHOLD, segment_of
from shmrunner.transport import pickling
from shmrunner.transport.fdchannel import FdChannel, PeerClosed, channel_pair

THRESHOLD = DEFAULT_THRESHOLD
BIG = THRESHOLD // 8 * 2  # float64 elements: twice the threshold
TIMEOUT = 30.0  # every wait in this module has a deadline


# --- fixtures and helpers ------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[FdChannel, FdChannel]]:
    a, b = channel_pair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fds_named(name: str) -> list[int]:
    """This process's fds open on a memfd called ``name``."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}").startswith(f"/memfd:{name} "):
                found.append(int(entry))
        except OSError:
            continue
    return found


def labelled_fd(label: str, name: str = "probe") -> int:
    """A memfd whose content is ``label``: identifies which fd arrived where."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, label.encode())
    return fd


def label_of(fd: int) -> str:
    return os.pread(fd, 64, 0).decode()


def in_thread(fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    """Run ``fn`` in a fresh daemon thread; its Future carries result or exception."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 (reported through the future)
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


class Sent:
    """What ``dumps`` produced, captured before ``release()`` empties ``owned``."""

    def __init__(self, enc: pickling.Encoded) -> None:
        self.data = bytes(enc.data)
        self.fds = list(enc.fds)
        self.owned = list(enc.owned)


def transfer(pair: tuple[FdChannel, FdChannel], obj: object,
             threshold: int = THRESHOLD) -> tuple[Any, Sent]:
    """dumps -> FdChannel.send -> FdChannel.recv -> loads; returns (result, what was sent)."""
    a, b = pair
    enc = pickling.dumps(obj, threshold)
    sent = Sent(enc)

    def send() -> None:
        try:
            a.send(sent.data, sent.fds)
        finally:
            enc.release()

    sending = in_thread(send)
    payload, received = b.recv()
    sending.result(TIMEOUT)
    assert len(received) == len(sent.fds)
    return pickling.loads(payload, received), sent


@dataclasses.dataclass
class Holder:
    name: str
    array: np.ndarray
    more: list[np.ndarray]


class Plain:
    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


# --- pickling: plain arrays ----------------------------------------------------------


def test_plain_array_above_threshold_travels_as_fd(pair) -> None:
    src = np.arange(BIG, dtype=np.float64)
    out, enc = transfer(pair, src)
    assert len(enc.fds) == 1
    assert len(enc.data) < 1024  # a handle, not the bytes
    np.testing.assert_array_equal(out, src)
    assert out.dtype == src.dtype
    # The receiver reads the shared copy in place (and can pass it on by handle).
    assert shmrunner.is_shared(out)
    # Value semantics: the copy is independent of the sender's array.
    out[0] = -1
    assert src[0] == 0


def test_plain_array_below_threshold_travels_inline(pair) -> None:
    src = np.arange(100, dtype=np.float64)
    out, enc = transfer(pair, src)
    assert enc.fds == [] and enc.owned == []
    assert len(enc.data) > src.nbytes
    np.testing.assert_array_equal(out, src)
    assert not shmrunner.is_shared(out)


def test_threshold_boundary_is_inclusive(pair) -> None:
    at = pickling.dumps(np.zeros(THRESHOLD, np.uint8), THRESHOLD)
    below = pickling.dumps(np.zeros(THRESHOLD - 1, np.uint8), THRESHOLD)
    try:
        assert len(at.fds) == 1
        assert below.fds == []
    finally:
        at.release()
        below.release()


PLAIN_LAYOUTS = {
    "c-order": lambda: np.arange(BIG, dtype="f8").reshape(-1, 8),
    "fortran": lambda: np.asfortranarray(np.arange(BIG, dtype="f8").reshape(-1, 8)),
    "non-contiguous": lambda: np.arange(BIG * 2, dtype="f8").reshape(-1, 8)[::2, 1::2],
    "negative-strides": lambda: np.arange(BIG * 2, dtype="f8").reshape(-1, 8)[::-1, ::-2],
    "broadcast": lambda: np.broadcast_to(np.arange(8.0), (BIG // 8, 8)),
    "big-endian": lambda: np.arange(BIG, dtype=">i8"),
    "datetime": lambda: np.arange(BIG).astype("M8[us]"),
    "bytes": lambda: np.array([b"ab%d" % i for i in range(BIG)], dtype="S6"),
    "unicode": lambda: np.array([str(i) for i in range(BIG // 4)], dtype="U6"),
    "complex": lambda: np.arange(BIG, dtype="c16") * (1 - 2j),
    "bool": lambda: np.arange(THRESHOLD * 2) % 3 == 0,
    "unaligned": lambda: np.frombuffer(b"\0" + bytes(BIG * 8), "f8", count=BIG, offset=1),
}


@pytest.mark.parametrize("layout", list(PLAIN_LAYOUTS))
def test_plain_arrays_of_any_layout_round_trip_by_fd(pair, layout: str) -> None:
    src = PLAIN_LAYOUTS[layout]()
    assert src.nbytes >= THRESHOLD
    out, enc = transfer(pair, src)
    assert len(enc.fds) == 1
    assert (out.shape, out.dtype) == (src.shape, src.dtype)
    np.testing.assert_array_equal(out, src)


STRUCTURED = np.dtype([("a", "u1"), ("b", "<f8"), ("c", "<i2", (3,)), ("s", "S5")], align=True)


def structured(n: int) -> np.ndarray:
    out = np.zeros(n, STRUCTURED)
    out["a"] = np.arange(n) % 250
    out["b"] = np.arange(n) * 0.5
    out["c"] = np.arange(3 * n).reshape(n, 3)
    out["s"] = [b"x%d" % (i % 1000) for i in range(n)]
    return out


@pytest.mark.parametrize("n", [3, THRESHOLD // STRUCTURED.itemsize + 1], ids=["inline", "fd"])
def test_structured_arrays_round_trip(pair, n: int) -> None:
    src = structured(n)
    out, enc = transfer(pair, src)
    assert len(enc.fds) == (0 if n == 3 else 1)
    assert out.dtype == STRUCTURED
    for name in STRUCTURED.names:
        np.testing.assert_array_equal(out[name], src[name])


@pytest.mark.parametrize("threshold", [0, THRESHOLD], ids=["by-fd", "inline"])
@pytest.mark.parametrize("make", [
    lambda: np.zeros(0),
    lambda: np.zeros((3, 0, 2), "i2"),
    lambda: np.empty((0, 5))[:, ::-1],
    lambda: np.array(3.25),
    lambda: np.array((1, 2.5, [1, 2, 3], b"ab"), STRUCTURED),
], ids=["zero-size", "zero-size-3d", "zero-size-neg-stride", "0-d", "0-d-structured"])
def test_zero_size_and_0d_arrays_round_trip(pair, make, threshold: int) -> None:
    src = make()
    out, enc = transfer(pair, src, threshold=threshold)
    assert (out.shape, out.dtype) == (src.shape, src.dtype)
    assert out.tobytes() == src.tobytes()
    if threshold == 0:
        assert len(enc.fds) == 1


def test_object_arrays_fall_back_to_pickle(pair) -> None:
    objects = np.array([None, "a", 1, (2, 3)] * (BIG // 4), dtype=object)
    numbers = np.arange(BIG, dtype=float)
    (out_objects, out_numbers), enc = transfer(pair, (objects, numbers))
    assert len(enc.fds) == 1  # only the numeric array went by fd
    assert out_objects.dtype == object
    assert out_objects.tolist() == objects.tolist()
    np.testing.assert_array_equal(out_numbers, numbers)
    rec = np.zeros(BIG, [("x", "i4"), ("o", object)])
    out_rec, enc = transfer(pair, rec)
    assert enc.fds == []
    assert out_rec.dtype == rec.dtype and out_rec.tolist() == rec.tolist()


def test_ndarray_subclass_pickles_as_itself(pair) -> None:
    src = np.ma.masked_array(np.arange(BIG, dtype=float), mask=np.arange(BIG) % 5 == 0)
    out, _ = transfer(pair, src)
    assert type(out) is np.ma.MaskedArray
    np.testing.assert_array_equal(out.mask, src.mask)
    np.testing.assert_array_equal(out.data, src.data)


# --- pickling: shared arrays ---------------------------------------------------------


def test_shared_array_keeps_identity_of_memory(pair) -> None:
    s = shmrunner.zeros(10, np.int64)  # small: shared arrays go by fd whatever their size
    out, enc = transfer(pair, s)
    assert enc.fds == [segment_of(s).fd]
    assert enc.owned == []
    assert shmrunner.is_shared(out)
    out[3] = 42
    assert s[3] == 42
    s[7] = -5
    assert out[7] == -5


def test_arrays_nested_anywhere_travel_by_fd(pair) -> None:
    s = shmrunner.zeros(16, np.int32)
    big = [np.full(BIG, float(i)) for i in range(6)]
    message = (
        big[0],
        [big[1], {"deep": (big[2],)}],
        {"k": big[3], 7: s},
        Holder("h", big[4], [s[2:]]),
        Plain(attr=big[5], nested=Plain(shared=s[::2])),
    )
    out, enc = transfer(pair, message)
    assert len(enc.fds) == 7  # six plain copies plus one segment, sent once
    assert len(enc.owned) == 6
    assert len(enc.data) < 4096
    got = [out[0], out[1][0], out[1][1]["deep"][0], out[2]["k"], out[3].array, out[4].attr]
    for i, arr in enumerate(got):
        np.testing.assert_array_equal(arr, big[i])
        assert shmrunner.is_shared(arr)
    assert isinstance(out[3], Holder) and out[3].name == "h"
    # The three views of ``s`` arrive as views of one mapping of the same memory.
    shared = [out[2][7], out[3].more[0], out[4].nested.shared]
    assert len({id(segment_of(v)) for v in shared}) == 1
    out[2][7][4] = 99
    assert s[4] == 99
    assert out[3].more[0][2] == 99 and out[4].nested.shared[2] == 99


def test_same_array_twice_is_sent_and_mapped_once(pair) -> None:
    big = np.arange(BIG, dtype=float)
    s = shmrunner.zeros(100)
    (b1, b2, s1, d), enc = transfer(pair, (big, big, s, {"again": s, "view": s[10:]}))
    assert len(enc.fds) == 2  # one copy of ``big``, one segment for ``s``
    assert b1 is b2
    b1[0] = 123
    assert b2[0] == 123  # the same memory on the receiving side
    assert s1 is d["again"]
    assert segment_of(d["view"]) is segment_of(s1)
    d["view"][0] = 5
    assert s1[10] == 5 and s[10] == 5


def _shared_base() -> np.ndarray:
    base = shmrunner.zeros((8, 12), np.int64)
    base[...] = np.arange(96).reshape(8, 12)
    return base


SHARED_VIEWS = {
    "whole": lambda m: m,
    "offset": lambda m: m[3:],
    "offset-1d": lambda m: m.reshape(-1)[17:50],
    "strided": lambda m: m[1::3, 2::5],
    "negative-strides": lambda m: m[::-1, ::-2],
    "negative-1d": lambda m: m[-1, ::-1],
    "transposed": lambda m: m.T,
    "0-d": lambda m: m[2, 3, ...],
    "zero-size-middle": lambda m: m[4:4],
    "zero-size-at-end": lambda m: m.reshape(-1)[96:],
    "byte-view": lambda m: m[2:4].view(np.uint8),
    "reinterpret": lambda m: m.view("<f8")[1, ::-1],
}


@pytest.mark.parametrize("view", list(SHARED_VIEWS))
def test_views_of_a_shared_base_alias_the_same_memory(pair, view: str) -> None:
    base = _shared_base()
    v = SHARED_VIEWS[view](base)
    expected = v.copy()
    out, enc = transfer(pair, v)
    assert len(enc.fds) == 1 and enc.owned == []
    assert (out.shape, out.dtype, out.strides) == (v.shape, v.dtype, v.strides)
    assert out.tobytes() == expected.tobytes()
    assert shmrunner.is_shared(out)
    if out.size:
        # Write new values through the received view: the sender's view sees them.
        flat_values = (np.arange(out.size) + 1000).astype(out.dtype).reshape(out.shape)
        out[...] = flat_values
        assert v.tobytes() == flat_values.tobytes()


def test_views_of_a_shared_structured_array(pair) -> None:
    s = shmrunner.share(structured(50))
    (field, rows), enc = transfer(pair, (s["b"], s[5:10]))
    assert len(enc.fds) == 1
    np.testing.assert_array_equal(field, s["b"])
    field[0] = 0.125
    assert s["b"][0] == 0.125
    rows["c"] = -1
    assert (s["c"][5:10] == -1).all()
    assert s[4]["c"].tolist() == [12, 13, 14]


def test_more_than_max_fds_arrays_still_round_trip(pair) -> None:
    n = pickling.MAX_FDS + 5
    plain = [np.full(8, i, np.int64) for i in range(n)]  # 64 bytes each, threshold 64
    out, enc = transfer(pair, plain, threshold=64)
    assert len(enc.fds) == pickling.MAX_FDS
    for i, arr in enumerate(out):
        assert arr.tolist() == [i] * 8
    assert sum(shmrunner.is_shared(a) for a in out) == pickling.MAX_FDS

    shared = [shmrunner.share(np.full(4, i, np.int64)) for i in range(n)]
    out, enc = transfer(pair, shared)
    assert len(enc.fds) == pickling.MAX_FDS
    for i, arr in enumerate(out):
        assert arr.tolist() == [i] * 4
    out[0][0] = -1  # the first MAX_FDS alias the originals
    assert shared[0][0] == -1


def test_one_fd_limit_for_pickling_and_channel(pair) -> None:
    """One limit: a message carries as many fds as one sendmsg can (the
    kernel's SCM_MAX_FD), all of them arrive."""
    from shmrunner.transport import fdchannel

    assert pickling.MAX_FDS == fdchannel.MAX_FDS == 253
    shared = [shmrunner.share(np.full(2, i, np.int64)) for i in range(fdchannel.MAX_FDS)]
    out, enc = transfer(pair, shared)
    assert len(enc.fds) == fdchannel.MAX_FDS
    assert all(shmrunner.is_shared(a) and a.tolist() == [i, i] for i, a in enumerate(out))


def test_peer_closed_is_not_the_closed_by_you_error() -> None:
    assert issubclass(PeerClosed, EOFError)
    assert not issubclass(PeerClosed, shmrunner.errors.ChannelClosedError)


def test_view_of_an_already_sent_segment_past_max_fds_keeps_identity(pair) -> None:
    shared = [shmrunner.zeros(4, np.int64) for _ in range(pickling.MAX_FDS)]
    out, enc = transfer(pair, [*shared, shared[0][1:]])
    extra_shared = shmrunner.is_shared(out[-1])
    out[-1][0] = 7
    aliased = shared[0][1] == 7
    del out, shared
    assert len(enc.fds) == pickling.MAX_FDS
    assert extra_shared
    assert aliased


# --- pickling: fd ownership and lifetime ----------------------------------------------


def test_release_closes_owned_fds_and_only_those() -> None:
    s = shmrunner.zeros(10)
    before = open_fds()
    enc = pickling.dumps((np.arange(BIG, dtype=float), np.ones(BIG), s), THRESHOLD)
    assert len(enc.fds) == 3 and len(enc.owned) == 2
    assert set(enc.owned) < set(enc.fds)
    assert open_fds() == before + 2
    enc.release()
    assert open_fds() == before
    enc.release()  # idempotent
    assert open_fds() == before
    os.fstat(segment_of(s).fd)  # the shared array's own fd is untouched
    s[0] = 1.0


def test_dumps_failure_closes_the_fds_it_created() -> None:
    before = open_fds()
    with pytest.raises(Exception):  # noqa: B017 (whatever pickle raises for a lambda)
        pickling.dumps([np.arange(BIG, dtype=float), lambda: 0], THRESHOLD)
    assert open_fds() == before


@pytest.mark.parametrize("obj", [(divmod, (7, 2), {}), (os.getpid, (), {"a": None}),
                                 (True, 2.5), (False, "text"), (True, None)])
def test_the_plain_way_pickles_as_the_full_pickler_does(obj: Any) -> None:
    # Tiny tasks and their results skip our pickler (plain=True): same bytes.
    plain = pickling.dumps(obj, THRESHOLD, plain=True)
    assert plain.data == pickling.dumps(obj, THRESHOLD).data and plain.fds == []
    assert pickling.loads(plain.data, []) == obj


def test_the_plain_way_refuses_what_the_full_pickler_refuses() -> None:
    def local(x: int) -> int:
        return x

    with pytest.raises(Exception) as full:  # noqa: B017 (whatever pickle raises for it)
        pickling.dumps((local, (1,), {}), THRESHOLD)
    with pytest.raises(type(full.value)):
        pickling.dumps((local, (1,), {}), THRESHOLD, plain=True)


def test_loads_consumes_every_fd_whatever_happens() -> None:
    # Unused fds are closed...
    fds = [labelled_fd("unused", "loads-probe") for _ in range(3)]
    assert pickling.loads(pickling.dumps(("no arrays",), 0).data, fds) == ("no arrays",)
    assert fds_named("loads-probe") == []
    # ...and so are fds of a message that fails to unpickle.
    fds = [labelled_fd("bad", "loads-probe")]
    with pytest.raises(Exception):  # noqa: B017
        pickling.loads(b"\x80\x05garbage", fds)
    assert fds_named("loads-probe") == []


def test_received_segments_are_released_with_their_arrays(pair) -> None:
    out, _ = transfer(pair, [np.arange(BIG, dtype=float), np.ones(BIG)])
    assert shm_segments() != []
    del out
    gc.collect()
    # Unmapped at once; their fds (copies nobody else holds) may stay in the
    # segment cache for reuse until it is emptied.
    assert [s for s in shm_segments() if not s.startswith("fd ")] == []
    drop_shm_cache()
    assert shm_segments() == []


def test_encoded_keeps_fds_of_shared_arrays_valid_until_released() -> None:
    # What worker/loop.py does: encode the result, drop the result, send later.
    # (Regression: the fd closed with the array, and a Pool task returning a
    # shared array hung.)
    result = shmrunner.share(np.arange(10.0))
    enc = pickling.dumps((True, result), 0)
    del result
    try:
        target = os.readlink(f"/proc/self/fd/{enc.fds[0]}")
    except OSError as exc:
        target = f"fd {enc.fds[0]}: {exc.strerror}"
    enc.release()
    assert target.startswith("/memfd:shmrunner"), target


def test_dumps_does_not_keep_pickled_arrays_alive() -> None:
    gc.disable()  # reference counting alone must free them: no cycle through the pickler
    try:
        plain = np.arange(BIG, dtype=float)
        shared = shmrunner.zeros(BIG)
        plain_ref = weakref.ref(plain)
        enc = pickling.dumps((plain, shared), THRESHOLD)
        enc.release()
        del plain, shared, enc
        plain_alive = plain_ref() is not None
        segments_left = shm_segments()
    finally:
        gc.enable()
    assert not plain_alive
    assert segments_left == []


# --- FdChannel ---------------------------------------------------------------------------


def test_many_messages_with_and_without_fds_interleaved(pair) -> None:
    a, b = pair
    n = 300

    def fds_for(i: int) -> int:
        return 3 if i % 7 == 0 else 1 if i % 3 == 0 else 0

    def payload(i: int) -> bytes:
        return b"" if i % 11 == 0 else (b"%d;" % i) * (i * 13 % 500)

    def sender() -> None:
        for i in range(n):
            fds = [labelled_fd(f"{i}/{j}") for j in range(fds_for(i))]
            try:
                a.send(payload(i), fds)
            finally:
                for fd in fds:
                    os.close(fd)

    sent = in_thread(sender)
    for i in range(n):
        data, fds = b.recv()
        try:
            assert bytes(data) == payload(i)
            assert [label_of(fd) for fd in fds] == [f"{i}/{j}" for j in range(fds_for(i))]
        finally:
            pickling.close_fds(fds)
    sent.result(TIMEOUT)
    assert fds_named("probe") == []


@pytest.mark.parametrize("size", [50 << 20, (1 << 16) + 1, 1 << 20], ids=["50MB", "64K+1", "1MB"])
def test_large_payload_blocking(pair, size: int) -> None:
    a, b = pair
    big = (bytes(range(256)) * (size // 256 + 1))[:size]

    def sender() -> None:
        fd1, fd2 = labelled_fd("with-big"), labelled_fd("after-big")
        try:
            a.send(big, [fd1])
            a.send(b"after", [fd2])
            a.send(big[:100], [])
        finally:
            os.close(fd1)
            os.close(fd2)

    sent = in_thread(sender)
    data, fds = b.recv()
    assert len(data) == size and data == big
    assert [label_of(fd) for fd in fds] == ["with-big"]
    pickling.close_fds(fds)
    data, fds = b.recv()
    assert data == b"after" and [label_of(fd) for fd in fds] == ["after-big"]
    pickling.close_fds(fds)
    assert b.recv() == (bytearray(big[:100]), [])
    sent.result(TIMEOUT)


def test_send_nowait_queues_and_flush_delivers_to_a_slow_reader(pair) -> None:
    a, b = pair
    n, size = 24, 1 << 20  # far more than the socket buffer holds
    a.sock.setblocking(False)  # a send that would block raises instead of hanging
    done_calls = [0] * n
    labels = [f"nowait-{i}" for i in range(n)]

    def done(i: int) -> Callable[[], None]:
        def callback() -> None:
            done_calls[i] += 1
        return callback

    owned = []
    for i in range(n):
        fds = [labelled_fd(labels[i], "nowait")] if i % 2 == 0 else []
        owned.append(fds)
        a.send_nowait(bytes([i]) * size, fds, done(i))
    assert a.wants_write
    # The last message is still entirely queued: its fds have not gone yet.
    assert done_calls[-1] == 0

    def reader() -> list[tuple[bytes, list[str]]]:
        got = []
        for _ in range(n):
            data, fds = b.recv()
            got.append((bytes(data[:1]) + bytes([len(data) == size]), [label_of(f) for f in fds]))
            pickling.close_fds(fds)
        return got

    read = in_thread(reader)
    deadline = time.monotonic() + TIMEOUT
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_WRITE)
        while a.wants_write:
            assert time.monotonic() < deadline, "flush never finished"
            if sel.select(timeout=1):
                a.flush()
    got = read.result(TIMEOUT)
    assert done_calls == [1] * n
    for i, (head, fd_labels) in enumerate(got):
        assert head == bytes([i, 1])
        assert fd_labels == ([labels[i]] if i % 2 == 0 else [])
    pickling.close_fds([fd for fds in owned for fd in fds])


def test_send_batch_nowait_coalesces_and_keeps_fd_order(pair) -> None:
    a, b = pair
    n = 400  # 2 fds each: more than one sendmsg's worth of fds
    done_calls = []
    owned = [[labelled_fd(f"m{i}a", "many"), labelled_fd(f"m{i}b", "many")] if i % 4 else []
             for i in range(n)]
    messages = [(b"msg%d" % i, owned[i], (lambda i=i: done_calls.append(i))) for i in range(n)]
    a.send_batch_nowait(messages)

    def drain() -> None:
        deadline = time.monotonic() + TIMEOUT
        while a.wants_write and time.monotonic() < deadline:
            if select_writable(a):
                a.flush()

    read = in_thread(lambda: [b.recv() for _ in range(n)])
    drain()
    received = read.result(TIMEOUT)
    assert sorted(done_calls) == list(range(n))
    for i, (data, fds) in enumerate(received):
        assert data == b"msg%d" % i
        assert [label_of(fd) for fd in fds] == ([f"m{i}a", f"m{i}b"] if i % 4 else [])
        pickling.close_fds(fds)
    pickling.close_fds([fd for fds in owned for fd in fds])


def select_writable(ch: FdChannel, timeout: float = 1.0) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(ch, selectors.EVENT_WRITE)
        return bool(sel.select(timeout))


def test_read_ready_collects_everything_from_a_slow_writer(pair) -> None:
    a, b = pair
    n = 60
    sizes = [(i * 7919) % 300_000 for i in range(n)]

    def sender() -> None:
        for i in range(n):
            fds = [labelled_fd(f"rr{i}")] if i % 5 == 0 else []
            try:
                a.send(bytes([i % 256]) * sizes[i], fds)
            finally:
                pickling.close_fds(fds)
        a.close()

    sent = in_thread(sender)
    got: list[tuple[bytearray, list[int]]] = []
    closed_after = None
    deadline = time.monotonic() + TIMEOUT
    with selectors.DefaultSelector() as sel:
        sel.register(b, selectors.EVENT_READ)
        while closed_after is None:
            assert time.monotonic() < deadline, f"stuck after {len(got)} messages"
            if not sel.select(timeout=1):
                continue
            try:
                got.extend(b.read_ready())
            except PeerClosed:
                closed_after = len(got)
    sent.result(TIMEOUT)
    assert closed_after == n  # EOF only once every message was handed out
    for i, (data, fds) in enumerate(got):
        assert len(data) == sizes[i] and data[:1] in (b"", bytes([i % 256]))
        assert [label_of(fd) for fd in fds] == ([f"rr{i}"] if i % 5 == 0 else [])
        pickling.close_fds(fds)


def test_eof_after_every_complete_message_blocking(pair) -> None:
    a, b = pair
    fd = labelled_fd("eof")
    a.send(b"one")
    a.send(b"two", [fd])
    a.send(b"")
    os.close(fd)
    a.close()
    assert b.recv() == (bytearray(b"one"), [])
    data, fds = b.recv()
    assert data == b"two" and [label_of(f) for f in fds] == ["eof"]
    pickling.close_fds(fds)
    assert b.recv() == (bytearray(b""), [])
    with pytest.raises(PeerClosed):
        b.recv()
    with pytest.raises(PeerClosed):  # and stays closed
        b.recv()
    assert issubclass(PeerClosed, EOFError)


def test_eof_after_every_complete_message_nonblocking(pair) -> None:
    a, b = pair
    for i in range(5):
        a.send(b"m%d" % i)
    a.close()
    got = []
    with pytest.raises(PeerClosed):
        for _ in range(10):
            got.extend(b.read_ready())
    assert [bytes(d) for d, _ in got] == [b"m%d" % i for i in range(5)]


@pytest.mark.parametrize("mode", ["recv", "read_ready"])
def test_truncated_message_then_eof_is_channel_closed(pair, mode: str) -> None:
    a, b = pair
    a.sock.sendall(struct.pack("<QI", 100, 0) + b"x" * 10)
    a.close()
    with pytest.raises(PeerClosed):
        for _ in range(10):
            assert (b.recv() if mode == "recv" else b.read_ready()) in ([], None)


def test_unclaimed_received_fds_are_closed_by_close() -> None:
    a, b = channel_pair()
    try:
        # A message whose header and fds arrived but whose payload did not.
        fd = labelled_fd("unclaimed", "unclaimed")
        a.sock.sendmsg([struct.pack("<QI", 100, 1) + b"x" * 10], _rights([fd]))
        os.close(fd)
        assert b.read_ready() == []
        assert len(fds_named("unclaimed")) == 1  # received, held by the channel
        # Complete messages still in the socket or the buffer, never recv'd.
        for i in range(3):
            fd = labelled_fd(f"queued{i}", "unclaimed")
            a.send(b"q", [fd])
            os.close(fd)
    finally:
        b.close()
        a.close()
    assert fds_named("unclaimed") == []
    b.close()  # idempotent


def test_close_runs_done_for_messages_never_sent(pair) -> None:
    a, b = pair
    done_calls = []
    a.send_nowait(b"x" * (8 << 20), [], lambda: done_calls.append("big"))
    fd = labelled_fd("never-sent", "never")
    a.send_nowait(b"y", [fd], lambda: (done_calls.append("small"), os.close(fd)))
    assert a.wants_write and done_calls == ["big"]
    a.close()
    assert done_calls == ["big", "small"]
    assert fds_named("never") == []


def test_messages_to_a_gone_peer_are_dropped_and_their_done_runs(pair) -> None:
    a, b = pair
    b.close()
    done_calls = []
    fd = labelled_fd("to-nowhere", "nowhere")
    a.send_nowait(b"x", [fd], lambda: (done_calls.append(1), os.close(fd)))
    assert done_calls == [1] and not a.wants_write
    a.send(b"y", [])  # blocking send: dropped too, no exception, no hang
    assert fds_named("nowhere") == []


@pytest.mark.parametrize("how", ["send", "send_nowait"])
def test_sending_an_invalid_fd_raises(pair, how: str) -> None:
    # Only a gone peer drops messages silently; EBADF is a bug and must surface.
    a, b = pair
    bad = os.memfd_create("closed")
    os.close(bad)
    with pytest.raises(OSError):
        if how == "send":
            a.send(b"x", [bad])
        else:
            a.send_nowait(b"x", [bad])


@pytest.mark.parametrize("mode", ["recv", "read_ready"])
@pytest.mark.parametrize("sent_fds", [0, 1])
def test_header_announcing_more_fds_than_arrived_is_channel_closed(mode: str,
                                                                    sent_fds: int) -> None:
    a, b = channel_pair()
    try:
        fds = [labelled_fd("garbage", "garbage") for _ in range(sent_fds)]
        a.sock.sendmsg([struct.pack("<QI", 3, sent_fds + 1) + b"abc"], _rights(fds))
        pickling.close_fds(fds)
        # The peer stays open: a wrong implementation would block here forever,
        # so give the blocking read a deadline of its own.
        if mode == "recv":
            b.sock.settimeout(10)
        with pytest.raises(PeerClosed):
            for _ in range(10):
                b.recv() if mode == "recv" else b.read_ready()
    finally:
        a.close()
        b.close()
    assert fds_named("garbage") == []


def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


@pytest.mark.parametrize("mode", ["recv", "read_ready"])
def test_fds_dropped_by_a_full_fd_table_are_marked_lost_and_the_channel_stays_in_step(
        mode: str) -> None:
    """The receiver has one free fd slot: the kernel installs one fd and drops
    the rest (MSG_CTRUNC). Only the messages whose fds were dropped are
    affected, each dropped fd given as LOST_FD; later messages arrive intact."""
    import resource

    from shmrunner.transport.fdchannel import LOST_FD

    a, b = channel_pair()
    sent = [[labelled_fd("m0a", "ctrunc"), labelled_fd("m0b", "ctrunc")], [],
            [labelled_fd("m2", "ctrunc")]]
    received: list[tuple[bytes, list[int]]] = []

    def receive(count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while len(received) < count and time.monotonic() < deadline:
            if mode == "recv":
                received.append(b.recv())
            else:
                received.extend(b.read_ready())

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        a.send_batch_nowait([(b"m%d" % i, fds, None) for i, fds in enumerate(sent)])
        lowest_free = os.open("/dev/null", os.O_RDONLY)
        os.close(lowest_free)
        b.sock.settimeout(TIMEOUT)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, hard))
        try:
            receive(3)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        a.send(b"m3", [sent[2][0]])
        receive(4)
        assert [bytes(data) for data, _ in received] == [b"m0", b"m1", b"m2", b"m3"]
        (_, m0), (_, m1), (_, m2), (_, m3) = received
        assert [label_of(m0[0]), m0[1]] == ["m0a", LOST_FD]
        assert m1 == [] and m2 == [LOST_FD]
        assert [label_of(fd) for fd in m3] == ["m2"]
    finally:
        pickling.close_fds([fd for _, fds in received for fd in fds if fd != LOST_FD])
        pickling.close_fds([fd for fds in sent for fd in fds])
        a.close()
        b.close()
    assert fds_named("ctrunc") == []


def test_loads_of_a_lost_fd_names_the_fd_limit() -> None:
    from shmrunner.transport.fdchannel import LOST_FD

    arr = shmrunner.zeros(10)
    enc = pickling.dumps(arr, THRESHOLD)
    try:
        with pytest.raises(shmrunner.SharedMemoryError, match="RLIMIT_NOFILE.*ulimit -n"):
            pickling.loads(enc.data, [LOST_FD])
    finally:
        enc.release()
    del arr
