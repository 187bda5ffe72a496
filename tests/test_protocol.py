"""The wire protocol as pure functions: round trips, zero-copy arrays, every
validation rule, function references, exceptions, and a fuzz of ``decode``.

``received(frames)`` plays the network: it copies each frame into fresh bytes,
as a socket would, so "no copy on decode" means "a view of those bytes".
"""

from __future__ import annotations

import collections
import datetime
import functools
import math
import pickle
import random
import subprocess
import sys
import types
from multiprocessing.pool import RemoteTraceback  # type: ignore[attr-defined]
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from shmrunner.errors import ProtocolError, WorkerLostError, attach_remote_traceback
from shmrunner.transport.protocol import (
    MAX_EVIDENCE,
    MAX_FRAMES,
    MAX_NESTING,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Message,
    RemoteTaskError,
    decode,
    encode,
    exception_from_wire,
    exception_to_wire,
    function_ref,
    remote_traceback,
    resolve_function,
)

pytestmark = pytest.mark.timeout(60)

LIMIT = 1 << 24
V = PROTOCOL_VERSION


def received(frames: list[Any]) -> list[bytes]:
    return [bytes(f) for f in frames]


def roundtrip(msg: Message, *, allow_pickle: bool = False) -> Message:
    return decode(received(encode(msg, allow_pickle=allow_pickle)), max_bytes=LIMIT,
                  allow_pickle=allow_pickle)


def value_roundtrip(value: Any, **kw: Any) -> Any:
    return roundtrip(Message("status_reply", {"status": {"v": value}}), **kw).body["status"]["v"]


def assert_same(a: Any, b: Any) -> None:
    """Deep equality that also requires equal types (a tuple is not a list)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b


def shares(array: np.ndarray[Any, Any], frame: Any) -> bool:
    return bool(np.shares_memory(array, np.frombuffer(frame, np.uint8)))


# --- module-level things that travel by reference ------------------------------------

def double(x: float) -> float:
    return 2 * x


class Tools:
    @staticmethod
    def triple(x: float) -> float:
        return 3 * x

    @classmethod
    def name(cls) -> str:
        return cls.__name__

    def method(self) -> None:
        pass


class CustomError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code


class KeywordOnlyError(Exception):
    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")


loaded: list[str] = []


def _record(what: str) -> str:
    loaded.append(what)
    return what


class Tripwire:
    """Unpickling it records that a pickle was loaded."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_record, ("unpickled",))


# --- round trips ---------------------------------------------------------------------

ARR = np.arange(6, dtype=np.float64).reshape(2, 3)

SAMPLES = [
    Message("hello", {"name": "w1", "host": "node7", "pid": 4242, "capacity": 8}),
    Message("result", {"session": "s1", "task_id": 7, "ok": True,
                       "value": {"y": ARR, "pair": (1, "a")}}),
    Message("result", {"session": "s1", "task_id": 8, "ok": False,
                       "error": exception_to_wire(ValueError("bad", 3), "Traceback ...")}),
    Message("result", {"job_id": "j-1", "ok": True, "value": None}),
    Message("heartbeat"),
    Message("bye", {"reason": "SIGTERM"}),
    Message("hello", {"name": "w2", "host": "node7", "pid": 4243, "capacity": 2,
                      "slots": {"group": "0123456789abcdef" * 2, "count": 2}}),
    Message("hello", {"name": "w2/0", "host": "node7", "pid": 4244, "capacity": 1,
                      "slot": {"group": "0123456789abcdef" * 2, "index": 0}}),
    Message("lost", {"slot": 1, "reason": "timeout", "task_id": 12, "pid": 4245}),
    Message("lost", {"slot": 0, "reason": "oom", "task_id": 13, "pid": 4246, "limit": 2**30,
                     "evidence": "its memory cgroup's (/sys/fs/cgroup/w) oom_kill count rose "
                                 "from 0 to 1 while it ran"}),
    Message("logs", {"session": "0123abcd", "task_id": 14,
                     "logs": [[1.5, 20, "stdout", "epoch 3 of 10"]]}),
    Message("welcome", {"heartbeat_interval": 0.5, "heartbeat_timeout": 5,
                        "session": "0123abcd"}),
    Message("task", {"task_id": 1, "fn": "math:hypot", "args": (ARR, 2),
                     "kwargs": {"k": [1, 2.5, "s", b"b", None, True, -(2**63), 2**64 - 1]},
                     "timeout": 3.5}),
    Message("task", {"task_id": 2, "fn": "tests.mod:f", "args": [], "kwargs": {}}),
    Message("tasks", {"tasks": [
        {"task_id": 3, "fn": "math:hypot", "args": (ARR, 2), "kwargs": {}},
        {"task_id": 4, "fn": "math:sqrt", "args": [ARR], "kwargs": {}, "timeout": 1.0}]}),
    Message("results", {"results": [
        {"session": "s1", "task_id": 3, "ok": True, "value": ARR},
        {"session": "s1", "task_id": 4, "ok": False,
         "error": exception_to_wire(KeyError("k"), "tb")}]}),
    Message("cancel", {"task_id": 1}),
    Message("cancel", {"job_id": "j-1"}),
    Message("shutdown"),
    Message("submit", {"job_id": None, "fn": "math:hypot", "args": [3, 4], "kwargs": {},
                       "options": {"retries": 2, "timeout": 60}}),
    Message("submit", {"fn": "math:hypot", "args": (3, 4), "kwargs": {"x": ARR}}),
    Message("accepted", {"job_id": "j-1"}),
    Message("accepted", {"job_ids": ["j-1", "j-2"], "submits": True}),
    Message("submits", {"submits": [b"\x93\x02\xa6submit\x80", b"any bytes"]}),
    Message("fetch", {"job_id": "j-1", "timeout": None}),
    Message("fetch", {"job_id": "j-1", "timeout": 2}),
    Message("status"),
    Message("status_reply", {"status": {"workers": 2, "queued": 0,
                                        "per_worker": {"w1": {"running": 1}}}}),
    Message("error", {"reason": "no such job", "job_id": "j-9"}),
    Message("jobs", {"job_ids": ["j-1", "j-2"]}),
    Message("jobs", {"limit": 20}),
    Message("jobs_reply", {"jobs": [{"job_id": "j-1", "state": "done", "finished": 1.5}]}),
    Message("cancel", {"job_id": "j-1"}),
    Message("hello", {"name": "w2", "host": "h", "pid": 1, "capacity": 1,
                      "future_field": "ignored by receivers"}),
]


def test_samples_cover_every_message_type() -> None:
    assert {m.type for m in SAMPLES} == MESSAGE_TYPES


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.type)
def test_every_message_type_round_trips(msg: Message) -> None:
    back = roundtrip(msg)
    assert back.type == msg.type
    assert_same(back.body, msg.body)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.type)
def test_decodes_zmq_frames_and_memoryviews(msg: Message) -> None:
    frames = encode(msg)
    for wire in ([zmq.Frame(bytes(f)) for f in frames], [memoryview(bytes(f)) for f in frames],
                 frames):
        assert_same(decode(wire, max_bytes=LIMIT, allow_pickle=False).body, msg.body)


def test_header_layout() -> None:
    frames = encode(Message("cancel", {"task_id": 3}))
    assert len(frames) == 1
    assert msgpack.unpackb(frames[0]) == [PROTOCOL_VERSION, "cancel", {"task_id": 3}]


def test_values_keep_their_types() -> None:
    value = {
        "tuple": (1, (2, 3), [4, (5,)]), "empty": (), "list": [1, [2]],
        "int_keys": {1: "a", -2: "b"}, "tuple_keys": {(1, "x"): 2},
        "bytes": b"\x00\xff", "str": "é", "float": 1.5, "none": None, "bool": False,
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc),
    }
    assert_same(value_roundtrip(value), value)


def test_numpy_scalars() -> None:
    """Scalars become the Python scalar .item() gives when msgpack has one, else a
    0-d array of the same dtype."""
    assert_same(value_roundtrip(np.float32(1.5)), 1.5)
    assert_same(value_roundtrip(np.int64(-3)), -3)
    assert_same(value_roundtrip(np.uint64(2**64 - 1)), 2**64 - 1)
    assert_same(value_roundtrip(np.bool_(True)), True)
    assert_same(value_roundtrip(np.str_("s")), "s")
    assert_same(value_roundtrip(np.bytes_(b"b")), b"b")
    for scalar in (np.complex128(1 + 2j), np.datetime64("2024-01-02T03:04", "s"),
                   np.timedelta64(5, "ms"), np.longdouble(1.25)):
        back = value_roundtrip(scalar)
        assert isinstance(back, np.ndarray) and back.shape == () and back.dtype == scalar.dtype
        assert back[()] == scalar


# --- arrays --------------------------------------------------------------------------

STRUCT = np.dtype([("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")])
ALIGNED = np.dtype([("a", "u1"), ("b", "<f8"), ("n", [("x", "<i2"), ("y", "<c8", (2, 2))])],
                   align=True)
DTYPES = ["?", "i1", "<i2", ">i4", "<i8", "u1", "<u2", "<u4", ">u8", "<f2", "<f4", ">f8",
          "longdouble", "<c8", "<c16", "<M8[ns]", "<m8[s]", "<U5", "S3", "V4", STRUCT, ALIGNED]
SHAPES = [(), (0,), (3, 0, 2), (7,), (3, 4), (2, 3, 4)]


def make(shape: tuple[int, ...], dtype: Any) -> np.ndarray[Any, Any]:
    dt = np.dtype(dtype)
    raw = np.random.default_rng(0).integers(0, 256, math.prod(shape) * dt.itemsize, np.uint8)
    array = raw.view(dt).reshape(shape) if dt.names is None and dt.kind != "V" else \
        np.frombuffer(raw.tobytes(), dt).reshape(shape)
    return array


def check_array(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    frames = encode(Message("status_reply", {"status": {"a": array}}))
    wire = received(frames)
    back: np.ndarray[Any, Any] = decode(wire, max_bytes=LIMIT,
                                        allow_pickle=False).body["status"]["a"]
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.ascontiguousarray(back).tobytes() == np.ascontiguousarray(array).tobytes()
    assert len(wire) == 2
    if array.size:
        assert shares(back, wire[1]), "decode copied the array"
        if array.flags.c_contiguous or array.flags.f_contiguous:
            assert shares(array, frames[1]), "encode copied a contiguous array"
    return back


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_arrays_round_trip_as_views(dtype: Any) -> None:
    for shape in SHAPES:
        check_array(make(shape, dtype))


@pytest.mark.parametrize("dtype", ["<f8", ">i2", STRUCT], ids=str)
def test_array_layouts(dtype: Any) -> None:
    base = make((4, 6, 5), dtype)
    fortran = np.asfortranarray(base)
    assert check_array(fortran).flags.f_contiguous   # strides travel: no copy either side
    for view in (base[:, ::2], base[::-1], base.swapaxes(0, 1), base[1:3, 2, ::3],
                 np.broadcast_to(base[0], (3, 6, 5)), base[..., 0].T):
        assert not view.flags.c_contiguous or view.size <= 1
        check_array(view)


def test_same_array_twice_travels_once() -> None:
    frames = encode(Message("status_reply", {"status": {"a": ARR, "b": [ARR, (ARR,)]}}))
    assert len(frames) == 2
    back = decode(received(frames), max_bytes=LIMIT, allow_pickle=False).body["status"]
    assert np.shares_memory(back["a"], back["b"][1][0])


def test_arrays_from_zmq_frames_are_writable_views() -> None:
    big = np.arange(100_000, dtype=np.float64)   # above pyzmq's copy threshold
    wire = [zmq.Frame(bytes(f)) for f in encode(Message("status_reply",
                                                        {"status": {"a": big}}))]
    back = decode(wire, max_bytes=LIMIT, allow_pickle=False).body["status"]["a"]
    assert back.flags.writeable
    assert np.shares_memory(back, np.frombuffer(wire[1].buffer, np.uint8))
    readonly = decode(received(encode(Message("status_reply", {"status": {"a": big}}))),
                      max_bytes=LIMIT, allow_pickle=False).body["status"]["a"]
    assert not readonly.flags.writeable   # a view of immutable bytes stays immutable


def test_memmap_travels_as_an_array(tmp_path: Any) -> None:
    mm = np.memmap(tmp_path / "m.bin", dtype="<i4", mode="w+", shape=(10,))
    mm[:] = np.arange(10)
    back = value_roundtrip(mm)
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, np.arange(10))
    del mm


def test_object_arrays_refused_unless_pickling() -> None:
    objects = np.array([{"a": 1}, None], dtype=object)
    with pytest.raises(TypeError, match="dtype object"):
        encode(Message("status_reply", {"status": {"a": objects}}))
    with pytest.raises(TypeError, match="dtype StringDType"):
        encode(Message("status_reply", {"status": {"a": np.array(["x"], np.dtypes.StringDType())}}))
    back = value_roundtrip(objects, allow_pickle=True)
    assert back.dtype == object and list(back) == [{"a": 1}, None]


# --- what the wire refuses on encode -------------------------------------------------

Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize("value", [{1, 2}, Point(1, 2), 2**64, object(),
                                   datetime.datetime(2024, 1, 1), np.ma.masked_array([1])],
                         ids=["set", "namedtuple", "bigint", "object", "naive-datetime",
                              "masked"])
def test_non_wire_values_need_pickling(value: Any) -> None:
    with pytest.raises(TypeError, match="cannot encode"):
        encode(Message("status_reply", {"status": {"v": value}}))
    back = value_roundtrip(value, allow_pickle=True)
    assert type(back) is type(value)


def test_encode_checks_the_schema() -> None:
    with pytest.raises(ValueError, match="unknown message type"):
        encode(Message("launch", {}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lacks field 'capacity'"):
        encode(Message("hello", {"name": "w", "host": "h", "pid": 1}))
    with pytest.raises(ValueError, match="'task_id' must be an int >= 0"):
        encode(Message("cancel", {"task_id": -1}))
    with pytest.raises(ValueError, match="unknown option|retries"):
        encode(Message("submit", {"fn": "m:f", "args": [], "kwargs": {},
                                  "options": {"retires": 2}}))
    with pytest.raises(TypeError, match="str keys"):
        encode(Message("status_reply", {1: 2}))  # type: ignore[dict-item]
    nested: Any = ()
    for _ in range(MAX_NESTING + 1):
        nested = (nested,)
    with pytest.raises(ValueError, match="nested"):
        encode(Message("status_reply", {"status": {"v": nested}}))


# --- functions by reference ----------------------------------------------------------

def test_function_ref() -> None:
    assert function_ref(math.hypot) == "math:hypot"
    assert function_ref(double) == f"{__name__}:double"
    assert function_ref(Tools.triple) == f"{__name__}:Tools.triple"
    assert function_ref(Tools.name) == f"{__name__}:Tools.name"
    assert function_ref(Tools) == f"{__name__}:Tools"
    assert function_ref("not.imported.here:fn") == "not.imported.here:fn"   # no import
    assert resolve_function(function_ref(double)) is double


@pytest.mark.parametrize(("fn", "match"), [
    (lambda x: x, "lambda or closure"),
    (functools.partial(double, 2), "no import reference"),
    (Tools().method, "resolves to"),
    (print, None),
])
def test_function_ref_refuses_what_cannot_be_imported(fn: Any, match: str | None) -> None:
    if match is None:
        assert function_ref(fn) == "builtins:print"
        return
    with pytest.raises(TypeError, match=match):
        function_ref(fn)


def test_function_ref_refuses_main_and_closures() -> None:
    def inner() -> None:
        pass

    with pytest.raises(TypeError, match="lambda or closure"):
        function_ref(inner)
    inner.__module__, inner.__qualname__ = "__main__", "inner"
    with pytest.raises(TypeError, match="__main__"):
        function_ref(inner)
    for bad in ("os.system", "os:", ":f", "a b:c", "os:sys tem", "os:<lambda>"):
        with pytest.raises(ValueError, match="not a function reference"):
            function_ref(bad)


def test_resolve_function_errors_name_the_ref() -> None:
    assert resolve_function("math:hypot") is math.hypot
    with pytest.raises(ImportError, match="nosuch_module_xyz:f"):
        resolve_function("nosuch_module_xyz:f")
    with pytest.raises(ImportError, match="'math:nosuch'"):
        resolve_function("math:nosuch")
    with pytest.raises(TypeError, match="'math:pi' names a float"):
        resolve_function("math:pi")
    with pytest.raises(ValueError):
        resolve_function("math.hypot")


def test_task_functions_travel_by_reference_or_pickle() -> None:
    msg = Message("task", {"task_id": 1, "fn": double, "args": (2,), "kwargs": {}})
    assert roundtrip(msg).body["fn"] == f"{__name__}:double"
    offset = 10
    closure = Message("task", {"task_id": 1, "fn": lambda x: x + offset, "args": (2,),
                               "kwargs": {}})
    with pytest.raises(TypeError, match="lambda or closure"):
        encode(closure)
    fn = roundtrip(closure, allow_pickle=True).body["fn"]
    assert fn(2) == 12
    frames = received(encode(closure, allow_pickle=True))
    with pytest.raises(ProtocolError, match="pickled payload refused"):
        decode(frames, max_bytes=LIMIT, allow_pickle=False)


def test_pickles_are_refused_without_being_loaded() -> None:
    loaded.clear()
    frames = received(encode(Message("status_reply", {"status": {"v": Tripwire()}}),
                             allow_pickle=True))
    with pytest.raises(ProtocolError, match="pickled payload refused"):
        decode(frames, max_bytes=LIMIT, allow_pickle=False)
    assert loaded == []
    assert decode(frames, max_bytes=LIMIT, allow_pickle=True).body["status"]["v"] == "unpickled"
    assert loaded == ["unpickled"]


# --- exceptions ----------------------------------------------------------------------

def rebuilt(exc: BaseException, tb: str = "Traceback: remote") -> BaseException:
    body = roundtrip(Message("result", {"session": "s", "task_id": 1, "ok": False,
                                        "error": exception_to_wire(exc, tb)})).body
    return exception_from_wire(body["error"])


def test_exception_comes_back_as_itself_with_remote_traceback() -> None:
    exc = rebuilt(ValueError("bad value", 3), "Traceback (most recent call last): boom")
    assert type(exc) is ValueError and exc.args == ("bad value", 3)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "boom" in str(exc.__cause__)
    custom = rebuilt(CustomError(7, "detail"))
    assert type(custom) is CustomError and custom.code == 7
    lost = rebuilt(WorkerLostError(12, -9, 3))
    assert type(lost) is WorkerLostError and lost.signal == 9 and lost.task == 3


def test_the_traceback_sent_is_the_workers_own_else_the_error_formatted_here() -> None:
    """One helper for the daemon and the remote worker: a task's exception
    carries its worker's traceback; an error of the runner itself (nothing
    attached) is formatted where it was raised, never sent without one."""
    task_error = attach_remote_traceback(ValueError("in the task"), "Traceback: in the worker")
    assert remote_traceback(task_error) == "Traceback: in the worker"
    assert exception_to_wire(task_error)["traceback"] == "Traceback: in the worker"
    try:
        raise LookupError("refused here")
    except LookupError as exc:
        own = exc
    text = remote_traceback(own)
    assert "LookupError: refused here" in text and "test_the_traceback_sent" in text
    assert exception_to_wire(own)["traceback"] == text
    assert "WorkerLostError" in exception_to_wire(WorkerLostError(1, -9, 2))["traceback"]
    assert exception_to_wire(own, "given")["traceback"] == "given"


@pytest.mark.parametrize("exc", [
    KeywordOnlyError(code=5),          # not constructible from its args
    SystemExit(3),                     # not an Exception: never re-raised here
    KeyboardInterrupt(),
])
def test_exception_fallback(exc: BaseException) -> None:
    back = rebuilt(exc, "remote tb")
    assert type(back) is RemoteTaskError
    assert back.type_name == f"{type(exc).__module__}:{type(exc).__qualname__}"
    assert back.traceback == "remote tb" and isinstance(back.__cause__, RemoteTraceback)
    again = pickle.loads(pickle.dumps(back))
    assert str(again) == str(back)
    forwarded = exception_from_wire(exception_to_wire(back, "local tb"))
    assert type(forwarded) is RemoteTaskError and forwarded.type_name == back.type_name


def test_exception_from_wire_never_imports() -> None:
    back = exception_from_wire({"type": "nosuch_module_xyz:Boom", "args": ["x"],
                                "message": "x", "traceback": ""})
    assert isinstance(back, RemoteTaskError) and str(back) == "nosuch_module_xyz:Boom: x"
    not_exc = exception_from_wire({"type": "builtins:int", "args": [1], "message": "1",
                                   "traceback": ""})
    assert isinstance(not_exc, RemoteTaskError)


def test_exception_from_wire_never_runs_a_module_getattr(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazy module attribute hook (numpy's imports numpy.testing and numpy.f2py)
    is never called while rebuilding an exception class."""
    lazy = types.ModuleType("shmrunner_lazy_module")
    calls: list[str] = []

    def module_getattr(name: str) -> Any:
        calls.append(name)
        return CustomError

    lazy.__getattr__ = module_getattr  # type: ignore[method-assign]
    lazy.Real = CustomError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shmrunner_lazy_module", lazy)
    back = exception_from_wire({"type": "shmrunner_lazy_module:Lazy", "args": [1, "x"],
                                "message": "m", "traceback": ""})
    assert type(back) is RemoteTaskError and calls == []
    real = exception_from_wire({"type": "shmrunner_lazy_module:Real", "args": [1, "x"],
                                "message": "m", "traceback": ""})
    assert type(real) is CustomError and calls == []
    not_exc = exception_from_wire({"type": "shmrunner_lazy_module:__getattr__", "args": None,
                                   "message": "m", "traceback": ""})
    assert type(not_exc) is RemoteTaskError


def test_decoding_numpy_lazy_names_imports_nothing() -> None:
    """In a fresh interpreter (numpy.testing is imported here already)."""
    code = (
        "import sys, numpy\n"
        "from shmrunner.transport.protocol import exception_from_wire\n"
        "before = set(sys.modules)\n"
        "names = ['numpy:testing.TestCase', 'numpy:f2py.Error', 'numpy:testing',\n"
        "         'numpy:linalg.LinAlgError', 'numpy.testing:AssertionError', 'numpy:ma.x']\n"
        "for name in names:\n"
        "    exception_from_wire({'type': name, 'args': [], 'message': 'm', 'traceback': ''})\n"
        "print(sorted(set(sys.modules) - before))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_exception_args_not_on_the_wire_fall_back_to_the_message() -> None:
    wire = exception_to_wire(ValueError(object()), "")
    assert wire["args"] is None and wire["message"].startswith("<object")
    back = exception_from_wire(wire)
    assert type(back) is ValueError and str(back).startswith("<object")


# --- validation: every rule, always ProtocolError ------------------------------------

def header(*items: Any) -> bytes:
    return bytes(msgpack.packb(list(items), use_bin_type=True))


def array_ext(index: Any, descr: Any, shape: Any, strides: Any) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([index, descr, shape, strides]))


def status(value: Any, *frames: bytes) -> list[bytes]:
    return [header(V, "status_reply", {"status": {"v": value}}), *frames]


CANCEL = header(V, "cancel", {"task_id": 1})
deep: Any = msgpack.packb([])
for _ in range(MAX_NESTING + 1):
    deep = msgpack.packb(msgpack.ExtType(2, deep))
very_deep = deep
for _ in range(3000):   # deep enough to overflow the C stack if unchecked
    very_deep = msgpack.packb(msgpack.ExtType(2, very_deep))

INVALID: list[tuple[str, list[Any], str]] = [
    ("no frames", [], "empty message"),
    ("empty header", [b""], "header frame is empty"),
    ("not msgpack", [b"\xc1\x00"], "not a msgpack list"),
    ("garbage in list", [b"\x93\x02\xc1"], "not valid msgpack"),
    ("truncated header", [CANCEL[:-1]], "not valid msgpack"),
    ("trailing bytes", [CANCEL + b"\x00"], "not valid msgpack"),
    ("header is a map", [msgpack.packb({"v": 1})], "not a msgpack list"),
    ("header of 2", [header(V, "cancel")], "3-element list"),
    ("header of 4", [header(V, "cancel", {"task_id": 1}, 0)], "3-element list"),
    ("version 1", [header(1, "cancel", {"task_id": 1})], r"protocol version 1, expected 2"),
    ("version 3", [header(3, "cancel", {"task_id": 1})], r"protocol version 3, expected 2"),
    ("version 300", [header(300, "x")], r"protocol version 300, expected 2"),
    ("version str", [header("1", "cancel", {"task_id": 1})], "protocol version '1'"),
    ("version negative", [header(-1, "cancel", {"task_id": 1})], "protocol version -1"),
    ("jobs: too many ids", [header(V, "jobs", {"job_ids": ["j"] * 257})],
     r"'job_ids' must be a list of 1 to 256 str"),
    ("jobs: no ids", [header(V, "jobs", {"job_ids": []})], r"'job_ids' must be a list"),
    ("jobs: id an int", [header(V, "jobs", {"job_ids": [5]})], r"'job_ids' must be a list"),
    ("jobs: limit 0", [header(V, "jobs", {"limit": 0})], r"'limit' must be an int from 1"),
    ("jobs_reply: not a list", [header(V, "jobs_reply", {"jobs": 5})], "'jobs' must be"),
    ("lost: evidence too long", [header(V, "lost", {"slot": 0, "reason": "oom",
                                                    "evidence": "x" * (MAX_EVIDENCE + 1)})],
     f"'evidence' must be a str of at most {MAX_EVIDENCE} characters"),
    ("lost: evidence not a str", [header(V, "lost", {"slot": 0, "reason": "oom",
                                                     "evidence": [b"x"]})],
     "'evidence' must be a str"),
    ("lost: unknown reason", [header(V, "lost", {"slot": 0, "reason": "oomed"})],
     "'reason' must be one of"),
    ("logs: no session", [header(V, "logs", {"task_id": 1, "logs": []})],
     "logs message lacks field 'session'"),
    ("logs: records not a list", [header(V, "logs", {"session": "0123abcd", "task_id": 1,
                                                     "logs": "printed"})],
     "'logs' must be a list of at most"),
    ("unknown type", [header(V, "launch", {})], "unknown message type 'launch'"),
    ("type not str", [header(V, 5, {})], "unknown message type 5"),
    ("body a list", [header(V, "cancel", [1])], "must be a map"),
    ("body int keys", [header(V, "cancel", {1: 1})], "map with str keys"),
    ("missing field", [header(V, "hello", {"name": "w"})], "lacks field 'host'"),
    ("mistyped field", [header(V, "cancel", {"task_id": "1"})], "'task_id' must be an int"),
    ("bool is no int", [header(V, "cancel", {"task_id": True})], "'task_id' must be an int"),
    ("negative id", [header(V, "cancel", {"task_id": -1})], "'task_id' must be an int >= 0"),
    ("both ids", [header(V, "cancel", {"task_id": 1, "job_id": "j"})], "exactly one"),
    ("no id", [header(V, "result", {"ok": True, "value": 1})], "exactly one"),
    ("ok without value", [header(V, "result", {"session": "s", "task_id": 1, "ok": True})],
     "lacks field 'value'"),
    ("error map", [header(V, "result", {"session": "s", "task_id": 1, "ok": False,
                                        "error": {"type": 1}})],
     "'error' must be an error map"),
    ("capacity 0", [header(V, "hello", {"name": "w", "host": "h", "pid": 1, "capacity": 0})],
     "'capacity' must be an int from 1 to 4096"),
    ("capacity 2**62", [header(V, "hello", {"name": "w", "host": "h", "pid": 1,
                                            "capacity": 2**62})], "'capacity' must be an int"),
    ("task result without session", [header(V, "result", {"task_id": 1, "ok": True, "value": 1})],
     "lacks field 'session'"),
    ("session not a str", [header(V, "result", {"session": 5, "task_id": 1, "ok": True,
                                                "value": 1})], "'session' must be a str"),
    ("welcome without session", [header(V, "welcome", {"heartbeat_interval": 1,
                                                       "heartbeat_timeout": 2})],
     "lacks field 'session'"),
    ("interval 0", [header(V, "welcome", {"heartbeat_interval": 0, "heartbeat_timeout": 1})],
     "'heartbeat_interval' must be a number of seconds > 0"),
    # A hub's heartbeats bound the worker's polls (ZeroMQ takes 32-bit milliseconds).
    ("interval 3e6", [header(V, "welcome", {"heartbeat_interval": 3e6, "heartbeat_timeout": 6e6,
                                            "session": "s"})],
     "'heartbeat_interval' must be a number of seconds > 0 and at most 1,000,000"),
    ("fn not a ref", [header(V, "task", {"task_id": 1, "fn": "os.system", "args": [],
                                         "kwargs": {}})], "'fn' must be a function reference"),
    ("kwargs int keys", [header(V, "task", {"task_id": 1, "fn": "m:f", "args": [],
                                            "kwargs": {1: 2}})], "'kwargs' must be a map"),
    ("unknown option", [header(V, "submit", {"fn": "m:f", "args": [], "kwargs": {},
                                             "options": {"retires": 1}})], "'options' must be"),
    ("frame index too big", status(array_ext(2, "<f8", [1], [8]), bytes(8)),
     r"refers to frame 2, the message has array frames 1..1"),
    ("frame index 0", status(array_ext(0, "<f8", [1], [8]), bytes(8)), "refers to frame 0"),
    ("no array frames", status(array_ext(1, "<f8", [1], [8])), "refers to frame 1"),
    ("array too big", status(array_ext(1, "<f8", [10], [8]), bytes(8)), "does not fit frame 1"),
    ("strides reach out", status(array_ext(1, "<f8", [2, 2], [1000, 8]), bytes(32)),
     "does not fit frame 1"),
    ("negative strides", status(array_ext(1, "<f8", [2], [-8]), bytes(16)), "does not fit"),
    ("zero strides", status(array_ext(1, "|u1", [2**40], [0]), bytes(8)), "does not fit"),
    ("huge shape", status(array_ext(1, "<f8", [2**63, 2**63], [8, 8]), bytes(8)),
     "does not fit"),
    ("zero-size but huge", status(array_ext(1, "<f8", [0, 2**62, 2**62], [8, 8, 8]), b""),
     "cannot view frame"),
    ("unparsable dtype", status(array_ext(1, "<f9", [1], [8]), bytes(8)),
     "unparsable array dtype"),
    ("bad descr", status(array_ext(1, [["a"]], [1], [8]), bytes(8)), "unparsable array dtype"),
    ("dtype an int", status(array_ext(1, 5, [1], [8]), bytes(8)), "dtype must be a str"),
    ("object dtype", status(array_ext(1, "|O", [1], [8]), bytes(8)), "refused"),
    ("object field", status(array_ext(1, [["a", "|O"]], [1], [8]), bytes(8)), "refused"),
    ("itemsize 0", status(array_ext(1, "|S0", [3], [0]), bytes(8)), "refused"),
    ("ref not msgpack", status(msgpack.ExtType(1, b"\xc1"), bytes(8)), "not valid msgpack"),
    ("ref of 3", status(msgpack.ExtType(1, msgpack.packb([1, "<f8", [1]])), bytes(8)),
     r"\[frame, dtype, shape, strides\]"),
    ("shape not ints", status(array_ext(1, "<f8", ["1"], [8]), bytes(8)), "shape must be"),
    ("negative dim", status(array_ext(1, "<f8", [-1], [8]), bytes(8)), "shape must be"),
    ("too many dims", status(array_ext(1, "<f8", [1] * 65, [8] * 65), bytes(8)),
     "shape must be"),
    ("strides mismatch", status(array_ext(1, "<f8", [1, 1], [8]), bytes(8)), "strides must"),
    ("unused frame", [CANCEL, b"junk"], r"frames \[1\] are not referenced"),
    ("frame not a buffer", [CANCEL, 5], "frame 1 is not a contiguous byte buffer"),
    ("unknown ext", status(msgpack.ExtType(9, b"")), "unknown ext type 9"),
    ("tuple of int", status(msgpack.ExtType(2, msgpack.packb(5))), "tuple ext holds int"),
    ("tuples too deep", status(msgpack.ExtType(2, deep)), "nested more than"),
    ("tuples far too deep", status(msgpack.ExtType(2, very_deep)), "nested more than"),
    ("lists too deep", [b"\x93\x02\xa6status" + b"\x91" * 5000], "not valid msgpack"),
    ("pickle refused", status(msgpack.ExtType(3, pickle.dumps(Tripwire()))),
     "pickled payload refused"),
    ("bad utf-8", [b"\x93\x02\xa6cancel\x81\xa7task_id\xa2\xff\xfe"], "not valid msgpack"),
    ("bad timestamp", [b"\x93\x02\xacstatus_reply\x81\xa6status\x81\xa1v\xd5\xff\x00\x01"],
     "not valid msgpack"),
    ("unhashable key", [b"\x93\x02\xacstatus_reply\x81\xa6status\x81\x90\x01"],
     "not valid msgpack"),
]


@pytest.mark.parametrize(("frames", "match"), [(f, m) for _, f, m in INVALID],
                         ids=[name for name, _, _ in INVALID])
def test_invalid_messages_raise_protocol_error(frames: list[Any], match: str) -> None:
    loaded.clear()
    with pytest.raises(ProtocolError, match=match):
        decode(frames, max_bytes=LIMIT, allow_pickle=False)
    assert loaded == []


def test_bad_pickle_is_a_protocol_error_even_when_allowed() -> None:
    with pytest.raises(ProtocolError, match="pickled payload failed to load"):
        decode(status(msgpack.ExtType(3, b"not a pickle")), max_bytes=LIMIT, allow_pickle=True)


def test_size_limits() -> None:
    frames = received(encode(Message("status_reply", {"status": {"a": np.zeros(1000)}})))
    total = sum(len(f) for f in frames)
    assert decode(frames, max_bytes=total, allow_pickle=False)
    with pytest.raises(ProtocolError, match=f"message of {total} bytes exceeds the limit"):
        decode(frames, max_bytes=total - 1, allow_pickle=False)
    with pytest.raises(ProtocolError, match="header of .* bytes exceeds the limit of 10"):
        decode(frames, max_bytes=LIMIT, allow_pickle=False, max_header_bytes=10)


def test_expanding_headers_are_refused_before_they_expand() -> None:
    n = 1 << 20   # 1 MiB of empty lists (or maps) decoded to 74 MiB
    for empty in (b"\x90", b"\x80"):
        frames = [b"\x93" + msgpack.packb(V) + msgpack.packb("status_reply") + b"\xdd"
                  + n.to_bytes(4, "big") + empty * n]
        with pytest.raises(ProtocolError, match="more than .* lists, maps and tuples"):
            decode(frames, max_bytes=LIMIT, allow_pickle=False)
    tuples = [header(V, "status_reply", {"status": {"t": [(i,) for i in range(100_000)]}})]
    assert len(decode(tuples, max_bytes=LIMIT, allow_pickle=False).body["status"]["t"]) \
        == 100_000   # 1-tuples of small ints, the densest common case, still travel


def test_container_budget_is_exact_on_both_sides_of_the_uncounted_size() -> None:
    """Headers up to 5461 bytes are parsed without counting (each list, map or
    tuple takes a byte, so they cannot hold more than their budget of a
    quarter of their bytes plus 4096); longer ones are counted, and the bound
    holds to the container."""
    def lists(k: int) -> list[bytes]:   # [2, "status_reply", [[] * k]]: k + 2 containers
        return [b"\x93\x02\xacstatus_reply\xdd" + k.to_bytes(4, "big") + b"\x90" * k]

    for k in (10, 5441, 5442, 5465):   # 5441: 5461 bytes, the last uncounted size
        assert k + 2 <= (k + 20) // 4 + 4096
        with pytest.raises(ProtocolError, match="body of a status_reply message must be a map"):
            decode(lists(k), max_bytes=LIMIT, allow_pickle=False)   # parsed in full
    with pytest.raises(ProtocolError, match="more than 5467 lists, maps and tuples"):
        decode(lists(5466), max_bytes=LIMIT, allow_pickle=False)
    empty_tuple = msgpack.ExtType(2, b"\x90")   # 3 bytes, 2 containers: the densest there is
    densest = header(V, "status_reply", {"status": {"t": [empty_tuple] * 1800}})
    assert len(densest) <= 5461
    assert decode([densest], max_bytes=LIMIT, allow_pickle=False).body["status"]["t"] \
        == [()] * 1800


@pytest.mark.parametrize("pad", [0, 8000], ids=["uncounted header", "counted header"])
def test_list_and_map_nesting_stops_at_msgpacks_fixed_stack(pad: int) -> None:
    """msgpack's C unpacker nests lists and maps 1024 deep at most (a fixed
    stack, no recursion): one more is "not valid msgpack", never a crash."""
    def nested(depth: int, opener: bytes) -> list[bytes]:
        # the header, the body and "status" take 3 levels; "p" pads the header past 5461 bytes
        inner = opener * (depth - 4) + (b"\x90" if opener == b"\x91" else b"\x80")
        return [b"\x93\x02\xacstatus_reply\x81\xa6status\x82\xa1p" + msgpack.packb("x" * pad)
                + b"\xa1v" + inner]

    for opener in (b"\x91", b"\x81\x00"):   # [[...]], {0: {0: ...}}
        assert decode(nested(1024, opener), max_bytes=LIMIT, allow_pickle=False)
        with pytest.raises(ProtocolError, match="not valid msgpack: StackError"):
            decode(nested(1025, opener), max_bytes=LIMIT, allow_pickle=False)


def test_frame_count_limit() -> None:
    arrays = [np.zeros(1) for _ in range(MAX_FRAMES - 1)]
    frames = received(encode(Message("status_reply", {"status": {"a": arrays}})))
    assert len(decode(frames, max_bytes=LIMIT, allow_pickle=False).body["status"]["a"]) \
        == MAX_FRAMES - 1
    with pytest.raises(ProtocolError, match=f"{MAX_FRAMES} frames exceeds the limit of 10"):
        decode(frames, max_bytes=LIMIT, allow_pickle=False, max_frames=10)
    with pytest.raises(ValueError, match="8193 arrays: the limit is 8192"):
        encode(Message("status_reply", {"status": {"a": [*arrays, np.zeros(1)]}}))


# --- fuzz ----------------------------------------------------------------------------

def touch(value: Any) -> None:
    """Read every byte of every array in ``value``: an out-of-bounds view would
    crash here or read past its frame."""
    if isinstance(value, np.ndarray):
        value.tobytes()
    elif isinstance(value, (list, tuple)):
        for v in value:
            touch(v)
    elif isinstance(value, dict):
        for v in value.values():
            touch(v)


def decodes_or_refuses(frames: list[Any], allow_pickle: bool = False) -> bool:
    try:
        msg = decode(frames, max_bytes=1 << 20, allow_pickle=allow_pickle,
                     max_header_bytes=1 << 16)
    except ProtocolError:
        return False
    assert isinstance(msg, Message) and msg.type in MESSAGE_TYPES
    touch(msg.body)
    return True


def test_fuzz_decode_only_returns_messages_or_raises_protocol_error() -> None:
    rng = random.Random(20240601)
    valid = [received(encode(m)) for m in SAMPLES]
    valid.append(received(encode(Message("status_reply", {"status": {
        "a": make((3, 4), STRUCT), "b": (np.asfortranarray(make((5, 2), ">f8")), (1, (2,))),
        "c": make((2,), ALIGNED), "d": make((0, 3), "<U2")}}))))
    for _ in range(3000):   # random bytes, with a plausible first byte half the time
        head = bytes([rng.choice([0x93, 0x92, 0xDC, rng.randrange(256)])])
        frames = [head + rng.randbytes(rng.randrange(48))]
        frames += [rng.randbytes(rng.randrange(32)) for _ in range(rng.randrange(3))]
        decodes_or_refuses(frames)
    for _ in range(3000):   # truncated: a frame cut short, or frames dropped
        frames = list(rng.choice(valid))
        i = rng.randrange(len(frames))
        frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
        if len(frames) > 1 and rng.random() < 0.3:
            del frames[rng.randrange(len(frames))]
        decodes_or_refuses(frames)
    for _ in range(10000):   # bit flips in the header (where all the structure is)
        frames = list(rng.choice(valid))
        flipped = bytearray(frames[0])
        for _ in range(rng.choice([1, 1, 2, 3, 8])):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        frames[0] = bytes(flipped)
        decodes_or_refuses(frames)
    accepted = 0
    for _ in range(5000):    # hostile array references against frames of random sizes
        ndim = rng.randrange(4)
        big = [0, 1, 2, 3, 7, 8, 64, 2**31, 2**62, 2**63 - 1]
        ref = array_ext(rng.choice([0, 1, 1, 1, 2]),
                        rng.choice(["<f8", "|u1", ">i4", "|V3", "<U2", "|b1", "<M8[s]",
                                    [["a", "<i2"], ["b", "|u1", [3]]], "<f8,<f8", "|O"]),
                        [rng.choice(big) for _ in range(ndim)],
                        [rng.choice(big) * rng.choice([1, 1, -1]) for _ in range(ndim)])
        accepted += decodes_or_refuses(status(ref, bytes(rng.choice([0, 1, 8, 24, 100]))))
    assert accepted > 50   # the hostile set also holds views that fit


# Values of every msgpack kind, containers above all: a check that looks a value up
# in a set or a dict must first know it is hashable (a list "reason" in a "lost"
# report once raised TypeError past the channel and stopped the daemon).
_ODD_VALUES = [[], {}, [[]], {"a": []}, [1, "x"], None, True, -1, 2**64 - 1, 1.5, "",
               "x" * 300, b"\xff"]


def _with_each_field_odd(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``body`` with one field (or one field of a batched item) set to each odd value."""
    out = []
    for key, value in body.items():
        out += [{**body, key: odd} for odd in _ODD_VALUES]
        if type(value) is list and value and type(value[0]) is dict:  # tasks, results
            item = value[0]
            for item_key in item:
                out += [{**body, key: [{**item, item_key: odd}] + value[1:]}
                        for odd in _ODD_VALUES]
    return out


def test_a_field_of_any_kind_in_any_message_is_a_message_or_a_protocol_error() -> None:
    tried = 0
    for msg in SAMPLES:
        frames = received(encode(msg))
        if len(frames) != 1:
            continue  # arrays: their references are fuzzed above
        version, type_, body = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        for odd_body in _with_each_field_odd(body):
            decodes_or_refuses([msgpack.packb([version, type_, odd_body], use_bin_type=True)])
            tried += 1
    assert tried > 900  # every field of every single-frame sample


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
    HAVE_HYPOTHESIS = True
except ImportError:   # hypothesis is a dev extra; the seeded fuzz above always runs
    HAVE_HYPOTHESIS = False

if HAVE_HYPOTHESIS:
    plain = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4), inner, max_size=4),
        max_leaves=20)

    @settings(max_examples=300, deadline=None)
    @given(plain)
    def test_hypothesis_values_round_trip(value: Any) -> None:
        assert_same(value_roundtrip(value), value)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=4))
    def test_hypothesis_decode_never_raises_anything_else(frames: list[bytes]) -> None:
        decodes_or_refuses(frames)


def test_same_host_result_fields_are_checked() -> None:
    """options.shm_results and a result's shm (results by memfd) must be maps;
    accepted may name the side channel (_samehost.py; checked in full there)."""
    ok = Message("submit", {"fn": "m:f", "args": [], "kwargs": {},
                            "options": {"shm_results": {"channel": "a" * 32, "durable": True}}})
    assert decode(encode(ok), max_bytes=1 << 20, allow_pickle=False) == ok
    result = Message("result", {"job_id": "j", "ok": True, "value": [None],
                                "shm": {"token": "b" * 32, "arrays": []}})
    assert decode(encode(result), max_bytes=1 << 20, allow_pickle=False) == result
    accepted = Message("accepted", {"job_id": "j", "same_host": "shmrunner-" + "c" * 32})
    assert decode(encode(accepted), max_bytes=1 << 20, allow_pickle=False) == accepted
    for bad in (Message("submit", {"fn": "m:f", "args": [], "kwargs": {},
                                   "options": {"shm_results": "x"}}),
                Message("result", {"job_id": "j", "ok": True, "value": 1, "shm": 3}),
                Message("accepted", {"job_id": "j", "same_host": 5})):
        with pytest.raises((ValueError, ProtocolError)):  # refused on encode or decode
            decode(encode(bad), max_bytes=1 << 20, allow_pickle=False)
