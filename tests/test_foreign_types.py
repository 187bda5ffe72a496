"""torch tensors, pandas and Arrow data through both tiers, in real processes.

Local tier (Pool, Scheduler): values come back equal, with value semantics
(a worker scribbling on its copy leaves the caller's object as it was), and
large ones sit in shmrunner memfds on arrival (``/proc/self/maps`` in the
worker names the mapping), results too. Remote tier: round trips through
real agents without pickle; garbage ext 4 values from a raw peer are refused.

Each library is optional: its tests skip when it is not installed (torch is
not in the dev venv: run this file with an interpreter that has torch).
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _foreign_tasks as ft
import msgpack
import numpy as np
import pytest
import zmq
from test_remote import JOIN, RESULT, Cluster, Workers, registered, stop_cluster

from _sched_tasks import Gates
from _util import wait_until
from shmrunner import Pool, ProtocolError, Scheduler
from shmrunner.transport._arrays import array_frame
from shmrunner.transport.protocol import PROTOCOL_VERSION, Message, decode, encode

MiB = 1 << 20
BIG = 4 * MiB   # bytes: well past the 64 KiB threshold


@pytest.fixture
def pool() -> Iterator[Pool]:
    with Pool(2) as p:
        yield p
    p.join()


# --- local tier ------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_torch_tensors_travel_by_shared_memory_with_value_semantics(pool: Pool) -> None:
    torch = pytest.importorskip("torch")
    n = BIG // 4
    t = torch.arange(n, dtype=torch.float32)
    seen = pool.apply(ft.probe, (t,))
    assert seen == {"type": "Tensor", "shared": True, "sum": float(t.double().sum()),
                    "requires_grad": False, "dtype": "torch.float32"}
    assert float(t[0]) == 0.0   # the worker's write went to its own copy
    assert not t.is_shared()    # and the caller's tensor was not moved anywhere
    # dtypes numpy lacks, non-contiguous views, leaves that require grad, Parameters
    half = torch.ones(n, dtype=torch.bfloat16)
    assert pool.apply(ft.probe, (half,))["dtype"] == "torch.bfloat16"
    assert pool.apply(ft.probe, (half,))["sum"] == float(n)
    strided = torch.arange(n, dtype=torch.float64).reshape(-1, 4).t()[:, ::2]
    assert pool.apply(ft.checksum, (strided,)) == float(strided.sum())
    leaf = torch.ones(n, requires_grad=True)
    assert pool.apply(ft.probe, (leaf,))["requires_grad"] is True
    param = torch.nn.Parameter(torch.ones(n))
    back = pool.apply(ft.echo, (param,))
    assert type(back) is torch.nn.Parameter and back.requires_grad and torch.equal(back, param)
    small = torch.arange(10)
    assert pool.apply(ft.probe, (small,))["shared"] is False   # pickled inline
    assert torch.equal(small, torch.arange(10))
    # Results come back the same way.
    made = pool.apply(ft.make_tensor, (n,))
    assert torch.equal(made, torch.arange(n, dtype=torch.float32))
    assert ft.in_memfd(made.data_ptr())
    # A tensor that arrived through shared memory goes on by handle, as a
    # received numpy array does: the worker writes into the caller's copy.
    assert pool.apply(ft.add_one, (made,)) == 1.0
    assert float(made[0]) == 1.0


@pytest.mark.timeout(120)
def test_a_tensor_in_torch_shared_memory_stays_shared(pool: Pool) -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros(BIG // 4).share_memory_()
    assert pool.apply(ft.add_one, (t,)) == 1.0
    assert float(t[0]) == 1.0   # torch's meaning: the worker wrote into the caller's tensor


@pytest.mark.timeout(120)
def test_pandas_frames_and_series_travel_by_shared_memory(pool: Pool) -> None:
    pd = pytest.importorskip("pandas")
    n = BIG // 8
    df = pd.DataFrame({"i": np.arange(n), "f": np.ones(n)})
    seen = pool.apply(ft.probe, (df,))
    assert seen == {"type": "DataFrame", "shared": True, "sum": float(df.to_numpy().sum())}
    assert df.iloc[0, 0] == 0
    s = pd.Series(np.arange(n, dtype=np.float64), name="x")
    assert pool.apply(ft.probe, (s,))["shared"] is True
    back = pool.apply(ft.echo, (s,))
    assert back.equals(s) and back.name == "x"
    made = pool.apply(ft.make_frame, (n,))
    assert made.equals(ft.make_frame(n)) and all(ft.in_memfd(a) for a in ft.addresses(made))


@pytest.mark.timeout(120)
def test_arrow_data_travels_by_shared_memory(pool: Pool) -> None:
    pa = pytest.importorskip("pyarrow")
    n = BIG // 8
    table = ft.make_table(n)
    assert pool.apply(ft.probe, (table,)) == {"type": "Table", "shared": True,
                                              "sum": float(n * (n - 1) // 2)}
    for value in (pa.array(np.arange(n)), table.column("s"), table.to_batches()[0]):
        back = pool.apply(ft.echo, (value,))
        assert type(back) is type(value) and back.equals(value)
    assert pool.apply(ft.shared_in_worker, (table.column("s"),)) is True
    made = pool.apply(ft.make_table, (n,))
    assert made.equals(table) and all(ft.in_memfd(a) for a in ft.addresses(made))
    # pandas' Arrow-backed string columns ride on the same buffers.
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"s": pd.array([str(i) for i in range(n)], dtype="string[pyarrow]")})
    assert pool.apply(ft.shared_in_worker, (df,)) is True
    assert pool.apply(ft.echo, (df,)).equals(df)


@pytest.mark.timeout(120)
def test_spawned_workers_and_the_scheduler_local_tier() -> None:
    """A spawned worker imports the libraries only to rebuild what it is sent;
    the Scheduler's local tier shares the Pool's pickling."""
    pa = pytest.importorskip("pyarrow")
    table = ft.make_table(BIG // 8)
    values: list[Any] = [table]
    if "torch" in sys.modules or _importable("torch"):
        import torch

        values.append(torch.arange(BIG // 4, dtype=torch.float32))
    with Pool(1, context=multiprocessing.get_context("spawn")) as p:
        for v in values:
            assert p.apply(ft.shared_in_worker, (v,)) is True
    with Scheduler(local_workers=1) as sched:
        for v in values:
            assert sched.submit(ft.shared_in_worker, v).result(RESULT) is True
        assert sched.submit(ft.echo, table).result(RESULT).equals(table)
    assert isinstance(table, pa.Table)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# --- remote tier -------------------------------------------------------------------------


@pytest.fixture
def gates(tmp_path: Path) -> Gates:
    d = tmp_path / "gates"
    d.mkdir()
    return Gates(d)


@pytest.fixture
def cluster(tmp_path: Path, gates: Gates) -> Iterator[Cluster]:
    """One agent, with heartbeats that tolerate its first import of pandas or
    torch: it forwards task values unbuilt, but echoed results are rebuilt in
    the agent (on another thread, which the import can still hold up)."""
    sched = Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", heartbeat_interval=0.5,
                      heartbeat_timeout=30)
    workers = Workers(tmp_path)
    try:
        assert sched.address is not None
        workers.start(sched.address, "w1")
        wait_until(lambda: registered(sched) == [p.pid for p in workers.procs], JOIN,
                   message="the worker to join")
        workers.note_pool()
        yield Cluster(sched, workers, gates)
    finally:
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(120)
def test_remote_round_trips_without_pickle(cluster: Cluster) -> None:
    sched = cluster.sched
    pa = pytest.importorskip("pyarrow")
    pd = pytest.importorskip("pandas")
    n = BIG // 8
    table = ft.make_table(n)
    frame = pd.DataFrame({"i": np.arange(n), "f": np.ones(n), "s": [str(i) for i in range(n)],
                          "t": pd.date_range("2020-01-01", periods=n, freq="s")},
                         index=pd.RangeIndex(5, n + 5))
    values: list[Any] = [table, pa.array(np.arange(n)), table.column("s"),
                         table.to_batches()[0], pa.array(["a", None, "c"]).slice(1), frame,
                         pd.Series(np.ones(n), name="x")]
    for value in values:
        back = sched.submit(ft.echo, value).result(RESULT)
        assert type(back) is type(value) and back.equals(value), type(value)
    assert sched.submit(ft.checksum, table).result(RESULT) == float(n * (n - 1) // 2)
    back = sched.submit(ft.echo, frame).result(RESULT)
    assert list(back.index) == list(frame.index) and list(back.columns) == list(frame.columns)
    # A categorical column is Arrow's dictionary type: not framed, so it needs pickling.
    with pytest.raises(TypeError, match="allow pickling"):
        sched.submit(ft.echo, pd.DataFrame({"c": pd.Categorical(["a", "b"])})).result(RESULT)


@pytest.mark.timeout(120)
def test_remote_torch_round_trips_without_pickle(cluster: Cluster) -> None:
    torch = pytest.importorskip("torch")
    sched = cluster.sched
    n = BIG // 4
    for t in (torch.arange(n, dtype=torch.float32), torch.ones(n, dtype=torch.bfloat16),
              torch.arange(12.0).reshape(3, 4).t(), torch.ones(3, requires_grad=True),
              torch.zeros(n).share_memory_()):
        back = sched.submit(ft.echo, t).result(RESULT)
        assert type(back) is torch.Tensor and back.dtype == t.dtype
        assert back.requires_grad == t.requires_grad and torch.equal(back, t)
    assert sched.submit(ft.checksum, torch.ones(n)).result(RESULT) == float(n)
    with pytest.raises(TypeError, match="non-leaf"):
        sched.submit(ft.echo, torch.ones(3, requires_grad=True) * 2).result(RESULT)


@pytest.mark.timeout(120)
def test_garbage_ext4_from_a_raw_peer_is_refused(cluster: Cluster) -> None:
    """Heartbeats carrying bad ext 4 values in an extra field: a stranger's
    well-formed heartbeat is ignored uncounted, so each count is a refusal."""
    pytest.importorskip("pyarrow")
    sched = cluster.sched
    assert sched.address is not None
    before = sched.status()["rejected"]
    garbage = [_heartbeat(payload, *frames) for payload, frames, _ in _bad_values()]
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(sched.address)
        for msg in garbage:
            sock.send_multipart(msg)
        wait_until(lambda: sched.status()["rejected"] == before + len(garbage), RESULT,
                   message="every bad value to be refused")
        sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    assert registered(sched) == cluster.pids
    assert sched.submit(ft.echo, 5).result(RESULT) == 5


# --- the codec: refusals, and zero copy on receipt ---------------------------------------


def _heartbeat(value: msgpack.ExtType, *frames: bytes) -> list[bytes]:
    header = msgpack.packb([PROTOCOL_VERSION, "heartbeat", {"x": value}])
    return [header, *frames]


def _ext4(payload: list[Any]) -> msgpack.ExtType:
    return msgpack.ExtType(4, msgpack.packb(payload))


def _array(a: np.ndarray[Any, Any], index: int = 1) -> tuple[msgpack.ExtType, bytes]:
    frame, ref = array_frame(a, index)
    return msgpack.ExtType(1, ref), bytes(frame)


def _bad_values() -> list[tuple[msgpack.ExtType, list[bytes], str]]:
    """(ext 4 value, its frames, what the refusal says)."""
    f32, f32_frame = _array(np.ones(4, np.float32))
    u8, u8_frame = _array(np.zeros(16, np.uint8))
    cases = [
        (msgpack.ExtType(4, msgpack.packb(5)), [], "must be \\[kind"),
        (_ext4(["os.system", "rm -rf /"]), [], "unknown ext 4 kind"),
        (_ext4(["torch", "object", f32, False]), [f32_frame], "torch dtype"),
        (_ext4(["torch", "float64", f32, False]), [f32_frame], "carried as float32"),
        (_ext4(["torch", "float32", f32, "yes"]), [f32_frame], "an array and a bool"),
        (_ext4(["arrow.table", b"not a schema", []]), [], "not a valid Arrow schema"),
        (_ext4(["arrow.array", b"", [], 7]), [], "schema bytes, columns"),
    ]
    pa = sys.modules.get("pyarrow")
    if pa is None:
        return cases
    one = pa.schema([pa.field("", pa.string())]).serialize().to_pybytes()
    nested = pa.schema([pa.field("", pa.list_(pa.int64()))]).serialize().to_pybytes()
    null = pa.schema([pa.field("", pa.null())]).serialize().to_pybytes()   # no buffer bounds it
    # offsets 0 and 1000 into a 16-byte data buffer: reads past the frame if trusted
    offsets, offsets_frame = _array(np.array([0, 1000], np.int32).view(np.uint8), 1)
    data, data_frame = _array(np.zeros(16, np.uint8), 2)
    cases += [
        (_ext4(["arrow.array", one, [[[1, 0, 0, [None, offsets, data]]]]]),
         [offsets_frame, data_frame], "invalid Arrow string chunk"),
        (_ext4(["arrow.array", nested, [[[0, 0, 0, []]]]]), [], "only flat Arrow types"),
        (_ext4(["arrow.array", null, [[[1 << 60, 0, 0, [None]]]]]), [], "only flat Arrow types"),
        (_ext4(["arrow.array", one, [[[1, 0, 0, [None, 5, u8]]]]]), [u8_frame],
         "1-d uint8 array or nil"),
        (_ext4(["arrow.array", one, [[[-1, 0, 0, []]]]]), [], "invalid length"),
        (_ext4(["arrow.array", one, [[], []]]), [], "1 columns, its schema 1|has 2 columns"),
        (_ext4(["pandas.series", one, [[3]]]), [], "chunk must be"),
    ]
    return cases


def test_decode_refuses_bad_foreign_values() -> None:
    pytest.importorskip("pyarrow")
    for value, frames, reason in _bad_values():
        with pytest.raises(ProtocolError, match=reason):
            decode(_heartbeat(value, *frames), max_bytes=1 << 20, allow_pickle=True)
    if not _importable("torch"):   # a well-formed tensor, and no torch here
        f32, frame = _array(np.ones(4, np.float32))
        with pytest.raises(ProtocolError, match="torch is not installed here"):
            decode(_heartbeat(_ext4(["torch", "float32", f32, False]), frame),
                   max_bytes=1 << 20, allow_pickle=False)


def test_decoded_values_view_the_received_frames() -> None:
    pa = pytest.importorskip("pyarrow")
    value: list[Any] = [pa.array(np.arange(1000.0)), ft.make_table(100)]
    torch = sys.modules.get("torch")
    if torch is not None:
        value.append(torch.arange(1000.0))
    frames = [zmq.Frame(bytes(f)) for f in encode(Message("heartbeat", {"x": value}))]
    regions = [(a.ctypes.data, a.ctypes.data + a.nbytes)
               for a in (np.frombuffer(f.buffer, np.uint8) for f in frames[1:])]
    got = decode(frames, max_bytes=1 << 20, allow_pickle=False).body["x"]
    for original, back in zip(value, got, strict=True):
        assert back.equals(original) if torch is None or not isinstance(back, torch.Tensor) \
            else torch.equal(back, original)
        assert all(any(lo <= a < hi for lo, hi in regions) for a in ft.addresses(back))


@pytest.mark.timeout(120)
def test_through_the_runner_daemon_without_pickle(daemons: Any) -> None:
    """Client -> daemon -> its workers and back: the daemon decodes, journals
    and re-encodes these values like arrays."""
    pa = pytest.importorskip("pyarrow")
    pd = pytest.importorskip("pandas")
    client = daemons().start().client()
    try:
        table = ft.make_table(BIG // 8)
        frame = ft.make_frame(1000)
        assert client.submit("_foreign_tasks:echo", table).result(timeout=RESULT).equals(table)
        assert client.submit(ft.echo, frame).result(timeout=RESULT).equals(frame)
        assert isinstance(table, pa.Table) and isinstance(frame, pd.DataFrame)
        if _importable("torch"):
            import torch

            t = torch.arange(BIG // 4, dtype=torch.float32)
            assert torch.equal(client.submit(ft.echo, t).result(timeout=RESULT), t)
    finally:
        client.shutdown(wait=True)
