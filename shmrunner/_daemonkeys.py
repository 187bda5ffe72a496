"""The daemon's CURVE keys: one key pair for both endpoints, and a ZAP domain
per endpoint, each admitting only its own directory of public keys (a worker's
key does not let it submit jobs, a client's does not let it serve them)."""

from __future__ import annotations

from dataclasses import replace

import zmq

from .config import DaemonSettings
from .transport.curve import authorize, load_public_keys, release, server_keys
from .transport.zmqchannel import CurveKeys

__all__ = ["daemon_keys", "release_clients_domain"]


def daemon_keys(settings: DaemonSettings) -> tuple[CurveKeys | None, CurveKeys | None,
                                                   str | None]:
    """(clients, workers) CURVE keys, and the clients' ZAP domain to release
    (:func:`release_clients_domain`) when the daemon closes; all None without CURVE."""
    if settings.curve_secret_key is None:
        return None, None, None
    assert settings.curve_authorized_clients is not None  # DaemonSettings checks
    keys = server_keys(settings.curve_secret_key, settings.curve_authorized_workers,
                       "daemon.curve_secret_key")
    clients = load_public_keys(settings.curve_authorized_clients,
                               "daemon.curve_authorized_clients")
    domain = authorize(zmq.Context.instance(), "clients", clients, "clients")
    return replace(keys, authorized=None, zap_domain=domain), keys, domain


def release_clients_domain(domain: str) -> None:
    release(zmq.Context.instance(), domain)
