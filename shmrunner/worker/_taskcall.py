"""One remote task call and its result, as both kinds of agent process
make them: the agent's loop (tasks for its pool processes) and a slot
process (tasks it runs itself, worker/_slots.py)."""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from typing import Any

from .._allowlist import AllowList
from ..transport.protocol import Message, exception_to_wire, resolve_function
from ..transport.zmqchannel import ZmqChannel

__all__ = ["resolve", "call_pickled", "call_task", "result_body", "send_results"]

resolve = functools.lru_cache(maxsize=1024)(resolve_function)


def call_pickled(blob: bytes, /, *args: Any, **kwargs: Any) -> Any:
    return pickle.loads(blob)(*args, **kwargs)


def call_task(allowed: AllowList, body: dict[str, Any],
              starting: Callable[[], None] | None = None) -> tuple[bool, Any]:
    """Run a task message's call here: (True, its value) or (False, the exception).
    The function is checked against the allow-list before anything is imported;
    ``starting`` is called once, just before the function is (or before the
    failure is returned, when there is no function to call)."""
    try:
        fn = body["fn"]
        allowed.check(fn, body["args"])
        if isinstance(fn, str):
            fn = resolve(fn)
    except BaseException as exc:  # noqa: BLE001 (refused or not found: the task fails)
        if starting is not None:
            starting()
        return False, exc
    if starting is not None:
        starting()
    try:
        return True, fn(*body["args"], **body["kwargs"])
    except BaseException as exc:  # noqa: BLE001 (even SystemExit: the task fails, not us)
        return False, exc


def result_body(session: str, task_id: int, ok: bool, value: Any) -> dict[str, Any]:
    if ok:
        return {"session": session, "task_id": task_id, "ok": True, "value": value}
    return {"session": session, "task_id": task_id, "ok": False,
            "error": exception_to_wire(value)}


def send_results(channel: ZmqChannel, session: str, bodies: list[dict[str, Any]]) -> None:
    """Send result bodies, as one message when several; a result that cannot
    travel is replaced by a TypeError naming why (the others still go)."""
    if len(bodies) > 1:
        try:
            channel.send(Message("results", {"results": bodies}))
            return
        except (TypeError, ValueError):
            pass  # one result cannot travel: send them one by one below
    for body in bodies:
        try:
            channel.send(Message("result", body))
        except (TypeError, ValueError) as exc:
            failed = result_body(
                session, body["task_id"], False,
                TypeError(f"the result of task {body['task_id']} cannot be sent back: {exc}"))
            if "logs" in body:
                failed["logs"] = body["logs"]
                try:
                    channel.send(Message("result", failed))
                    continue
                except (TypeError, ValueError):
                    del failed["logs"]  # they were what could not travel
            channel.send(Message("result", failed))
