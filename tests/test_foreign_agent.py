"""A remote agent forwards torch, Arrow and pandas values without importing
those libraries: its loop beats heartbeats, and ``import torch`` can take
longer than a heartbeat timeout. The task's own process builds them.

Observed at the OS level: the shared objects of libarrow, pandas and libtorch
are absent from the agent's ``/proc/PID/maps`` after it ran tasks carrying
them, while the tasks computed on the real values. A real agent subprocess
and a raw ROUTER playing its scheduler (to send a corrupt payload too).
"""

from __future__ import annotations

import importlib.util
import pickle
import re
from pathlib import Path
from typing import Any

import _foreign_tasks as ft
import msgpack
import numpy as np
import pytest
from test_foreign_types import _bad_values, _heartbeat
from test_remote import Workers
from test_security_wire import FakeScheduler, Raw, frames

from shmrunner import ProtocolError
from shmrunner.transport._arrays import array_frame
from shmrunner.transport._foreignwire import Deferred
from shmrunner.transport.protocol import PROTOCOL_VERSION, Message, decode, encode

# Shared objects each library maps when imported (pandas: its compiled _libs).
_SHARED_OBJECTS = {"pyarrow": "libarrow", "pandas": "/pandas/_libs/", "torch": "libtorch"}


def _mapped(pid: int) -> set[str]:
    """The libraries of _SHARED_OBJECTS whose shared objects ``pid`` has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return {name for name, so in _SHARED_OBJECTS.items() if so in maps}


def _task(task_id: int, fn: str, *args: Any) -> list[bytes]:
    return frames(Message("task", {"task_id": task_id, "fn": fn, "args": list(args),
                                   "kwargs": {}}))


def _corrupt_string_array_task(task_id: int) -> list[bytes]:
    """A task whose argument is an Arrow string array with offsets past its data:
    well-formed on the wire (so the agent forwards it), invalid to pyarrow."""
    pa = pytest.importorskip("pyarrow")
    schema = pa.schema([pa.field("", pa.string())]).serialize().to_pybytes()
    offsets_frame, offsets = array_frame(np.array([0, 1000], np.int32).view(np.uint8), 1)
    data_frame, data = array_frame(np.zeros(16, np.uint8), 2)
    value = msgpack.ExtType(4, msgpack.packb(
        ["arrow.array", schema, [[[1, 0, 0, [None, msgpack.ExtType(1, offsets),
                                             msgpack.ExtType(1, data)]]]]]))
    header = msgpack.packb([PROTOCOL_VERSION, "task", {
        "task_id": task_id, "fn": "_foreign_tasks:checksum", "args": [value], "kwargs": {}}])
    return [header, bytes(offsets_frame), bytes(data_frame)]


@pytest.mark.timeout(120)
def test_the_agent_never_imports_the_libraries_of_the_values_it_forwards(
        tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pd = pytest.importorskip("pandas")
    n = 100_000
    values: list[tuple[Any, float]] = [
        (ft.make_table(n), ft.checksum(ft.make_table(n))),
        (pd.DataFrame({"i": np.arange(n), "s": [str(i) for i in range(n)]}),
         float(n * (n - 1) // 2)),
        (pa.array(np.arange(10.0)), 45.0),
    ]
    if importlib.util.find_spec("torch") is not None:
        import torch
        values.append((torch.ones(n, dtype=torch.bfloat16), float(n)))
    raw = Raw()
    fake = FakeScheduler(raw)
    workers = Workers(tmp_path)
    try:
        agent = workers.start(f"tcp://127.0.0.1:{fake.port}", "agent")
        while fake.next().type != "hello":
            pass
        for task_id, (value, expected) in enumerate(values, 1):
            fake.send(_task(task_id, "_foreign_tasks:checksum", value))
            result = fake.result(task_id)
            assert result.get("value") == expected, result
        # A payload pyarrow refuses fails its task, in the task's process.
        fake.send(_corrupt_string_array_task(50))
        failed = fake.result(50)
        assert failed["ok"] is False and failed["error"]["type"].endswith("ProtocolError")
        assert "invalid Arrow string chunk" in str(failed["error"]), failed
        # The agent and its process serve on.
        fake.send(_task(51, "_foreign_tasks:checksum", pa.array([1, 2])))
        assert fake.result(51)["value"] == 3.0
        assert agent.poll() is None
        assert _mapped(agent.pid) == set()
    finally:
        workers.stop_all()
        raw.close()


def test_deferred_values_refuse_the_same_payloads_where_they_are_built() -> None:
    """Every bad ext 4 value is refused, with the same reason, either when the
    agent decodes it (what needs no library) or when its process unpickles it;
    a good one unpickles to the value itself."""
    pa = pytest.importorskip("pyarrow")
    for value, parts, reason in _bad_values():
        try:
            got = decode(_heartbeat(value, *parts), max_bytes=1 << 20, allow_pickle=False,
                         defer_foreign=True).body["x"]
        except ProtocolError as exc:
            assert re.search(reason, str(exc)), (reason, exc)
            continue
        assert type(got) is Deferred
        with pytest.raises(ProtocolError, match=reason):
            pickle.loads(pickle.dumps(got))
    table = ft.make_table(1000)
    message = Message("heartbeat", {"x": [table, pa.array(["a", None])]})
    got = decode([bytes(f) for f in encode(message)], max_bytes=1 << 20, allow_pickle=False,
                 defer_foreign=True).body["x"]
    assert [type(v) for v in got] == [Deferred, Deferred]
    back = pickle.loads(pickle.dumps(got))
    assert back[0].equals(table) and back[1].equals(pa.array(["a", None]))
