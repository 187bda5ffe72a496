"""The protocol's schema: message types, the fields each one carries, versioning.

A message is ``[PROTOCOL_VERSION, type, body]`` on the wire (the codec,
:mod:`._codec`, turns it into frames); this module says which ``type`` exists
and what its ``body`` must hold. Receivers ignore fields they do not know
(a version may gain optional fields); anything else that changes a message
bumps ``PROTOCOL_VERSION`` (docs/protocol.md, Versioning). Checks are pure
predicates over decoded values: :func:`_check_body` raises ``_Invalid``, which
the codec turns into ``ProtocolError`` on decode and ``ValueError`` on encode.
"""

from __future__ import annotations

import functools
import math
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .._jobid import job_id_problem
from .._tasklogs import MAX_WIRE_CHARS, MAX_WIRE_RECORDS, wire_ok

__all__ = ["PROTOCOL_VERSION", "MESSAGE_TYPES", "MAX_ACCEPTED_IDS", "MAX_BATCH", "MAX_CAPACITY",
           "MAX_CPUS",
           "MAX_EVIDENCE", "MAX_JOB_IDS", "MAX_JOBS_LIMIT", "LOST_REASONS", "MessageType",
           "Message"]

PROTOCOL_VERSION = 2

MessageType = Literal[
    "hello", "result", "results", "heartbeat", "bye", "lost", "logs",  # worker -> scheduler
    "welcome", "task", "tasks", "cancel", "shutdown",             # scheduler -> worker
    "submit", "accepted", "fetch", "status", "status_reply", "error",  # client <-> daemon
    "jobs", "jobs_reply", "submits",                             # client <-> daemon
]
MESSAGE_TYPES: frozenset[str] = frozenset(get_args(MessageType))


@dataclass(frozen=True, slots=True)
class Message:
    """One protocol message: its ``type`` and its ``body`` (string keys)."""

    type: MessageType
    body: dict[str, Any] = field(default_factory=dict)


# -- body schemas ---------------------------------------------------------------------

class _Invalid(Exception):
    """A body breaks its schema: ProtocolError on decode, ValueError on encode."""


_Check = tuple[str, Callable[[Any], bool]]   # (what the value must be, predicate)
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def _describe(value: object) -> str:
    return f"{type(value).__name__} {_short.repr(value)}"


def _reason(exc: BaseException) -> str:
    """A lower layer's exception in a few words (never the peer's whole payload)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _number(v: object) -> bool:
    return type(v) is int or (type(v) is float and math.isfinite(v))


def _is_ref(s: str) -> bool:
    """Whether ``s`` reads 'package.module:qualname' (cached: refs repeat)."""
    return _is_short_ref(s) if len(s) <= 200 else _ref_syntax(s)


def _ref_syntax(s: str) -> bool:
    module, sep, qualname = s.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) \
        and all(p.isidentifier() for p in qualname.split("."))


_is_short_ref = functools.lru_cache(maxsize=1024)(_ref_syntax)



def _str_map(v: object) -> bool:
    # Every message's maps pass here: a plain loop beats all(map(...)) and a
    # generator at any size (0.15 against 0.35 µs for 4 keys, 164 against 311 µs for 10**4).
    if type(v) is not dict:
        return False
    for key in v:
        if type(key) is not str:
            return False
    return True


def _options(v: Any) -> bool:
    # refs: [[path, job_id], ...] (job references, _jobrefs.py; checked in full there)
    # shm: a same-host client's memfds (_samehost.py; checked in full by _localclients.py)
    # shm_results: its results channel, for results as memfds (checked there too)
    return _str_map(v) and set(v) <= {"retries", "timeout", "refs", "shm", "shm_results"} \
        and ("retries" not in v or _ID[1](v["retries"])) \
        and ("timeout" not in v or _TIMEOUT[1](v["timeout"])) \
        and ("refs" not in v or type(v["refs"]) in (list, tuple)) \
        and ("shm" not in v or _str_map(v["shm"])) \
        and ("shm_results" not in v or _str_map(v["shm_results"]))


def _wire_error(v: Any) -> bool:
    return _str_map(v) and all(type(v.get(k)) is str for k in ("type", "message", "traceback")) \
        and (v.get("args") is None or type(v["args"]) in (list, tuple))


_ID: _Check = ("an int >= 0", lambda v: type(v) is int and v >= 0)
_STR: _Check = ("a str", lambda v: type(v) is str)
_BOOL: _Check = ("a bool", lambda v: type(v) is bool)
MAX_HEARTBEAT = 1_000_000  # seconds (config's MAX_SECONDS): a worker polls for this long
_HEARTBEAT: _Check = (f"a number of seconds > 0 and at most {MAX_HEARTBEAT:,}",
                      lambda v: _number(v) and 0 < v <= MAX_HEARTBEAT)
_TIMEOUT: _Check = ("None or a number > 0", lambda v: v is None or (_number(v) and v > 0))
_WAIT: _Check = ("None or a number >= 0", lambda v: v is None or (_number(v) and v >= 0))
_FN: _Check = ("a function reference 'package.module:qualname'",
               lambda v: (type(v) is str and _is_ref(v)) or (type(v) is not str and callable(v)))
_ARGS: _Check = ("a list or tuple", lambda v: type(v) in (list, tuple))
_MAP: _Check = ("a map with str keys", _str_map)
_OPTIONS: _Check = ("a map of retries (int >= 0), timeout (None or number > 0), refs "
                     "(a list), shm and shm_results (maps)", _options)
_ERROR: _Check = ("an error map {type, message, traceback: str; args: list or None}",
                  _wire_error)
_ANY: _Check = ("anything", lambda v: True)
_SESSION: _Check = ("a str of 1 to 64 characters", lambda v: type(v) is str and 0 < len(v) <= 64)
_OPT_JOB: _Check = ("a str or None", lambda v: v is None or type(v) is str)
MAX_BATCH = 1024  # messages one tasks/results message may carry
_BATCH: _Check = (f"a list of 1 to {MAX_BATCH} maps with str keys",
                  lambda v: type(v) is list and 0 < len(v) <= MAX_BATCH
                  and all(_str_map(item) for item in v))

MAX_CAPACITY = 4096  # tasks one worker may run at once: a scheduler sends it this many
# Why a bound: the scheduler sends a worker up to its advertised capacity of tasks;
# one claiming 2**62 slots took every task and returned none.
_CAPACITY: _Check = (f"an int from 1 to {MAX_CAPACITY} (tasks the worker runs at once)",
                     lambda v: type(v) is int and 1 <= v <= MAX_CAPACITY)

MAX_CPUS = 1 << 16  # cores a worker's host may claim (hello "cpus", optional)
_CPUS: _Check = (f"an int from 1 to {MAX_CPUS} (cores of the worker's host)",
                 lambda v: type(v) is int and 1 <= v <= MAX_CPUS)

# Slots (worker/_slots.py): an agent's hello names its group (a random token) and
# how many slot processes it runs; each slot's hello names the group and its index.
_GROUP_OK = re.compile(r"[0-9a-f]{32}").fullmatch
_SLOTS: _Check = (f"a map {{group: 32 hex digits, count: int from 1 to {MAX_CAPACITY}}}",
                  lambda v: type(v) is dict and type(v.get("group")) is str
                  and _GROUP_OK(v["group"]) is not None and type(v.get("count")) is int
                  and 1 <= v["count"] <= MAX_CAPACITY)
_SLOT: _Check = (f"a map {{group: 32 hex digits, index: int from 0 to {MAX_CAPACITY - 1}}}",
                 lambda v: type(v) is dict and type(v.get("group")) is str
                 and _GROUP_OK(v["group"]) is not None and type(v.get("index")) is int
                 and 0 <= v["index"] < MAX_CAPACITY)
_SLOT_INDEX: _Check = (f"an int from 0 to {MAX_CAPACITY - 1}",
                       lambda v: type(v) is int and 0 <= v < MAX_CAPACITY)
LOST_REASONS = frozenset({"died", "oom", "timeout", "cancelled", "memory"})
_LOST_REASON: _Check = (f"one of {sorted(LOST_REASONS)}",
                         lambda v: type(v) is str and v in LOST_REASONS)
# Why "oom" (worker/_memwatch.py's evidence: one line naming the OOM-kill counter
# and its cgroup directory); bounded, as it lands in the task's error message.
MAX_EVIDENCE = 1024
_EVIDENCE: _Check = (f"a str of at most {MAX_EVIDENCE} characters",
                     lambda v: type(v) is str and len(v) <= MAX_EVIDENCE)
_SECONDS: _Check = ("a number >= 0", lambda v: _number(v) and v >= 0)

MAX_JOB_IDS = 256      # job ids one "jobs" query may name
MAX_JOBS_LIMIT = 1000  # recent jobs one "jobs" listing may ask for
_JOB_IDS: _Check = (f"a list of 1 to {MAX_JOB_IDS} str",
                    lambda v: type(v) is list and 0 < len(v) <= MAX_JOB_IDS
                    and all(type(item) is str for item in v))
MAX_ACCEPTED_IDS = 1024  # job ids one batched "accepted" may name (a poll round's submits)
_ACCEPTED_IDS: _Check = (f"a list of 1 to {MAX_ACCEPTED_IDS} valid job ids",
                         lambda v: type(v) is list and 0 < len(v) <= MAX_ACCEPTED_IDS
                         and all(job_id_problem(item) is None for item in v))
# A batch of submits: each item the header frame of one single-frame "submit",
# decoded (and so bounded and checked) on its own by the daemon (_submitbatch.py).
_SUBMITS: _Check = (f"a list of 1 to {MAX_BATCH} bytes (encoded submit messages)",
                    lambda v: type(v) is list and 0 < len(v) <= MAX_BATCH
                    and all(type(item) is bytes for item in v))
_LIMIT: _Check = (f"an int from 1 to {MAX_JOBS_LIMIT}",
                  lambda v: type(v) is int and 1 <= v <= MAX_JOBS_LIMIT)
_JOB_LIST: _Check = ("a list of maps with str keys",
                     lambda v: type(v) is list and all(_str_map(item) for item in v))
_COUNTS: _Check = ("a map of str to int >= 0 (jobs in each state)",
                   lambda v: _str_map(v) and len(v) <= 64
                   and all(type(n) is int and n >= 0 for n in v.values()))

# A task's log (_tasklogs.py): records [time, level, logger name, message], bounded.
_LOGS: _Check = (f"a list of at most {MAX_WIRE_RECORDS} [time, level 0-100, name (<= 200 "
                 f"characters), message] records of at most {MAX_WIRE_CHARS} characters in all",
                 wire_ok)

# type -> (required fields, optional fields); unknown fields are ignored (versioning rule).
_SCHEMAS: dict[str, tuple[dict[str, _Check], dict[str, _Check]]] = {
    "hello": ({"name": _STR, "host": _STR, "pid": _ID, "capacity": _CAPACITY},
              {"cpus": _CPUS, "slots": _SLOTS, "slot": _SLOT}),
    "result": ({"ok": _BOOL}, {"task_id": _ID, "job_id": _STR, "value": _ANY, "error": _ERROR,
                               "session": _SESSION, "logs": _LOGS,
                               # arrays as memfds to a same-host client (_samehost.py)
                               "shm": _MAP}),
    "results": ({"results": _BATCH}, {}),
    "heartbeat": ({}, {}),
    "bye": ({}, {"reason": _STR}),
    # An agent's slot process ended (it killed it for a timeout, a cancel or its
    # memory, or it died: "oom" when the kernel's OOM killer did it): task_id, the
    # task it was running. pid: the slot process's; size, limit: its private memory
    # and memory_limit (bytes); evidence: why "oom".
    "lost": ({"slot": _SLOT_INDEX, "reason": _LOST_REASON},
             {"task_id": _ID, "pid": _ID, "size": _ID, "limit": _ID, "evidence": _EVIDENCE}),
    # What a long task logged so far, while it runs (the rest comes with its result).
    "logs": ({"session": _SESSION, "task_id": _ID, "logs": _LOGS}, {}),
    "welcome": ({"heartbeat_interval": _HEARTBEAT, "heartbeat_timeout": _HEARTBEAT,
                 "session": _SESSION}, {}),
    "task": ({"task_id": _ID, "fn": _FN, "args": _ARGS, "kwargs": _MAP}, {"timeout": _TIMEOUT}),
    "tasks": ({"tasks": _BATCH}, {}),
    # slot, seq, after: a task of one of the agent's slots (the seq-th task sent to
    # that slot), to be killed once it has run ``after`` seconds.
    "cancel": ({}, {"task_id": _ID, "job_id": _STR, "now": _BOOL, "queued_only": _BOOL,
                    "slot": _SLOT_INDEX, "seq": _ID, "after": _SECONDS, "pid": _ID}),
    "shutdown": ({}, {}),
    "submit": ({"fn": _FN, "args": _ARGS, "kwargs": _MAP},
               {"job_id": _OPT_JOB, "options": _OPTIONS, "batch_accepted": _BOOL,
                "batch_results": _BOOL}),
    "accepted": ({}, {"job_id": _STR, "job_ids": _ACCEPTED_IDS, "submits": _BOOL,
                      "same_host": _STR}),  # the side channel's name (_samehost.py)
    "submits": ({"submits": _SUBMITS}, {}),
    "fetch": ({"job_id": _STR}, {"timeout": _WAIT}),
    "status": ({}, {}),
    "status_reply": ({"status": _MAP}, {}),
    "error": ({"reason": _STR}, {"job_id": _OPT_JOB}),
    "jobs": ({}, {"job_ids": _JOB_IDS, "limit": _LIMIT, "summary": _BOOL, "log": _BOOL}),
    "jobs_reply": ({"jobs": _JOB_LIST}, {"counts": _COUNTS}),
}
assert set(_SCHEMAS) == MESSAGE_TYPES


def _check_body(type_: str, body: dict[str, Any]) -> None:
    """Raise ``_Invalid``, naming the first rule ``body`` breaks, if it breaks one."""
    fast = _VALID.get(type_)
    if fast is not None and fast(body):
        return
    _check_rules(type_, body)


def _check_rules(type_: str, body: dict[str, Any]) -> None:
    """The schema's reference check: every rule in order, each with its message."""
    required, optional = _SCHEMAS[type_]
    for name, (what, ok) in required.items():
        if name not in body:
            raise _Invalid(f"{type_} message lacks field {name!r}")
        if not ok(body[name]):
            raise _Invalid(f"{type_} field {name!r} must be {what}, got {_describe(body[name])}")
    for name, (what, ok) in optional.items():
        if name in body and not ok(body[name]):
            raise _Invalid(f"{type_} field {name!r} must be {what}, got {_describe(body[name])}")
    if type_ in ("tasks", "results"):
        for item in body[type_]:
            _check_rules(type_[:-1], item)  # each one as the single message would be
        return
    if type_ == "accepted" and ("job_id" in body) == ("job_ids" in body):
        raise _Invalid("accepted message needs exactly one of 'job_id' and 'job_ids'")
    if type_ in ("result", "cancel") and ("task_id" in body) == ("job_id" in body):
        raise _Invalid(f"{type_} message needs exactly one of 'task_id' and 'job_id'")
    if type_ == "result" and "task_id" in body and "session" not in body:
        # Task ids restart with every scheduler: only the session tells an old
        # scheduler's task 3 from this one's.
        raise _Invalid("result of a task lacks field 'session' (the welcome's)")
    if type_ == "result" and ("value" if body["ok"] else "error") not in body:
        raise _Invalid(f"result with ok={body['ok']} lacks field "
                       f"{'value' if body['ok'] else 'error'!r}")



# -- fast paths -----------------------------------------------------------------------
# The hot messages (a few per task on every hop) pass one predicate each: plain
# exact-type tests, no per-field lambda call or tuple unpacking. A predicate
# accepts only bodies _check_rules accepts (tests/test_schema_fast.py checks
# both agree); when it says no, _check_rules runs to name the broken rule, so
# the error messages are the reference check's, unchanged.

def _opt_session(b: dict[str, Any]) -> bool:
    s = b.get("session")
    return s is None and "session" not in b or type(s) is str and 0 < len(s) <= 64


def _task_ok(b: dict[str, Any]) -> bool:
    t, fn, args, kwargs = b.get("task_id"), b.get("fn"), b.get("args"), b.get("kwargs")
    timeout = b.get("timeout")
    return type(t) is int and t >= 0 \
        and (type(fn) is str and _is_ref(fn) or type(fn) is not str and callable(fn)) \
        and (type(args) is tuple or type(args) is list) and _str_map(kwargs) \
        and (timeout is None or (type(timeout) is int or type(timeout) is float
                                 and math.isfinite(timeout)) and timeout > 0)


def _result_ok(b: dict[str, Any]) -> bool:
    ok = b.get("ok")
    if type(ok) is not bool or not _opt_session(b):
        return False
    if "task_id" in b:
        t = b["task_id"]
        if "job_id" in b or type(t) is not int or t < 0 or "session" not in b:
            return False
    elif type(b.get("job_id")) is not str:
        return False
    if ok:
        if "value" not in b:
            return False
    elif "error" not in b:
        return False
    return ("error" not in b or _wire_error(b["error"])) \
        and ("logs" not in b or wire_ok(b["logs"])) \
        and ("shm" not in b or _str_map(b["shm"]))


def _batch_ok(items: object, item_ok: Callable[[dict[str, Any]], bool]) -> bool:
    return type(items) is list and 0 < len(items) <= MAX_BATCH \
        and all(_str_map(item) and item_ok(item) for item in items)


def _submit_ok(b: dict[str, Any]) -> bool:
    fn, args, kwargs, job_id = b.get("fn"), b.get("args"), b.get("kwargs"), b.get("job_id")
    return (type(fn) is str and _is_ref(fn) or type(fn) is not str and callable(fn)) \
        and (type(args) is tuple or type(args) is list) and _str_map(kwargs) \
        and (job_id is None or type(job_id) is str) \
        and ("options" not in b or _options(b["options"])) \
        and type(b.get("batch_accepted", False)) is bool \
        and type(b.get("batch_results", False)) is bool


def _accepted_ok(b: dict[str, Any]) -> bool:
    if type(b.get("submits", False)) is not bool or \
            type(b.get("same_host", "")) is not str:
        return False
    if "job_id" in b:
        return "job_ids" not in b and type(b["job_id"]) is str
    ids = b.get("job_ids")
    return type(ids) is list and 0 < len(ids) <= MAX_ACCEPTED_IDS \
        and all(type(i) is str and job_id_problem(i) is None for i in ids)


_VALID: dict[str, Callable[[dict[str, Any]], bool]] = {
    "task": _task_ok,
    "tasks": lambda b: _batch_ok(b.get("tasks"), _task_ok),
    "result": _result_ok,
    "results": lambda b: _batch_ok(b.get("results"), _result_ok),
    "submit": _submit_ok,
    "submits": lambda b: _SUBMITS[1](b.get("submits")),
    "accepted": _accepted_ok,
    "heartbeat": lambda b: True,
}
