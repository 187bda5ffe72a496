"""The schema's fast paths agree with its reference check.

The hot message types (task, result, submit, accepted and their batches) are
checked by one predicate each (transport/_schema.py, ``_VALID``); the error
messages still come from the rule-by-rule reference check. A predicate that
accepted a body the reference refuses would let a bad message through, so
this compares the two, privately, on valid bodies and many broken ones.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from shmrunner.transport._schema import _VALID, _check_body, _check_rules, _Invalid

JOB = "0191d2c3a4b5c0ffee00d15ea5e00001"
ERROR = {"type": "ValueError", "message": "m", "traceback": "t", "args": None}
VALID: dict[str, dict[str, Any]] = {
    "task": {"task_id": 7, "fn": "m.n:f", "args": (1,), "kwargs": {}, "timeout": 2.5},
    "result": {"session": "s", "task_id": 7, "ok": True, "value": 1},
    "submit": {"job_id": JOB, "fn": "m:f", "args": [1], "kwargs": {"a": 1},
               "batch_accepted": True, "batch_results": False,
               "options": {"retries": 1, "timeout": None, "refs": [], "shm": {}}},
    "accepted": {"job_ids": [JOB, "a.b"], "submits": True},
    "submits": {"submits": [b"x"]},
    "heartbeat": {},
}
VALID["tasks"] = {"tasks": [VALID["task"], dict(VALID["task"], task_id=8)]}
VALID["results"] = {"results": [VALID["result"], {"job_id": JOB, "ok": False,
                                                  "error": ERROR, "logs": []}]}
ALSO_VALID = [
    ("result", {"job_id": JOB, "ok": True, "value": None, "session": "s"}),
    ("result", {"session": "s", "task_id": 0, "ok": False, "error": ERROR,
                "logs": [[1.0, 20, "n", "msg"]]}),
    ("accepted", {"job_id": "anything goes here"}),
    ("task", {"task_id": 0, "fn": len, "args": [], "kwargs": {}, "timeout": None}),
    ("submit", {"fn": "m:f", "args": (), "kwargs": {}, "job_id": None}),
]
FIELDS = sorted({name for body in VALID.values() for name in body}
                | {"error", "logs", "job_id", "session", "value", "unknown"})
VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2**70, 1.5, -2.0, math.nan, math.inf, 0.0, "", "s",
    "x" * 65, "m:f", "m.n:f.g", "not a ref", ".bad", JOB, b"x", [], [1], [JOB], [b"x"],
    ["..", JOB], (), (1,), {}, {"a": 1}, {1: 2}, [{}], [{"ok": True}], ERROR,
    dict(ERROR, args=5), [[1.0, 20, "n", "msg"]], [[1.0, 200, "n", "msg"]], {"retries": -1},
    {"refs": 5}, {"shm": {1: 2}}, {"bogus": 1}, [VALID["task"]], [VALID["result"]],
    [JOB] * 1025, len, "a" * 300 + ":f",
]


def reference_accepts(type_: str, body: dict[str, Any]) -> bool:
    try:
        _check_rules(type_, body)
    except _Invalid:
        return False
    return True


def mutations(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.3 and body:
            del body[rng.choice(sorted(body))]
        elif roll < 0.5 and any(type(body.get(k)) is list and body[k]
                                for k in ("results", "tasks")):
            key = "results" if type(body.get("results")) is list and body["results"] else "tasks"
            items = list(body[key])
            at = rng.randrange(len(items))
            items[at] = mutations(rng, items[at]) if type(items[at]) is dict \
                else rng.choice(VALUES)
            body[key] = items
        else:
            body[rng.choice(FIELDS)] = rng.choice(VALUES)
    return body


@pytest.mark.parametrize(("type_", "body"), [*VALID.items(), *ALSO_VALID])
def test_valid_bodies_take_the_fast_path(type_: str, body: dict[str, Any]) -> None:
    assert reference_accepts(type_, body)
    assert _VALID[type_](body)


def test_fast_paths_accept_exactly_what_the_reference_accepts() -> None:
    rng = random.Random(20261202)
    seen = {True: 0, False: 0}
    for i in range(40_000):
        type_ = sorted(VALID)[i % len(VALID)]
        body = mutations(rng, VALID[type_])
        ok = reference_accepts(type_, body)
        assert _VALID[type_](body) == ok, (type_, body)
        seen[ok] += 1
        if not ok:   # and the message is the reference's
            with pytest.raises(_Invalid) as fast:
                _check_body(type_, body)
            with pytest.raises(_Invalid) as slow:
                _check_rules(type_, body)
            assert str(fast.value) == str(slow.value)
    assert min(seen.values()) > 5000   # both sides well exercised
