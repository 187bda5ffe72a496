"""Who may join the remote tier as a worker.

With CURVE keys, only the workers whose public keys are in the authorised
directory: a ZAP domain admitting exactly those is registered before the
socket binds, so no stranger gets in even for a moment. Without CURVE on TCP
anyone who can reach the port may join; an explicit library call may want
that, but its owner is told once per process what it opens.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import zmq

from ..errors import ConfigError
from ..transport.curve import authorize, load_public_keys
from ..transport.zmqchannel import CurveKeys

__all__ = ["admit_workers", "warn_unauthenticated"]

log = logging.getLogger("shmrunner.scheduler")

_warned: set[str] = set()


def warn_unauthenticated(listen: str) -> None:
    """Once per process: an explicit library call may listen on TCP without
    CURVE, but its owner should know what that opens."""
    if not _warned:
        _warned.add(listen)
        log.warning("Scheduler listening on %s without CURVE: anyone who can reach that port "
                    "can join as a worker, receive tasks and their arguments, and forge "
                    "results; pass curve= to authenticate workers", listen)


def admit_workers(context: zmq.Context[Any], curve: CurveKeys) -> tuple[CurveKeys, str]:
    """Admit only the workers whose keys are in ``curve.authorized``: ``curve``
    bound to a new ZAP domain, and that domain (release it with
    :func:`~shmrunner.transport.curve.release`)."""
    if curve.server_key is not None:
        raise ConfigError("Scheduler(curve=...): these are a client's keys (they name a "
                          "server_key); pass the scheduler's own key pair")
    if curve.authorized is None:
        raise ConfigError("Scheduler(curve=...): no directory of authorised worker keys "
                          "(CurveKeys.authorized); without one any key pair could join "
                          "and receive tasks")
    keys = load_public_keys(curve.authorized, "authorised worker keys")
    domain = authorize(context, "workers", keys, "workers")
    return replace(curve, zap_domain=domain), domain
