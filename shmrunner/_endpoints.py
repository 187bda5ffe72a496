"""Who can reach the daemon's endpoints: the private runtime directory of the
default ipc sockets, and the refusal of endpoints anyone could reach.

Loopback is not a trust boundary: every local user can connect to a port on
127.0.0.1. A Unix socket in a directory only its owner can enter is one; a
``tcp://`` endpoint (or an ipc socket elsewhere) is served only with CURVE, or
with ``daemon.allow_unauthenticated`` saying the owner accepts the risk.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

from .config import DaemonSettings, default_address, runtime_dir
from .errors import ConfigError

__all__ = ["daemon_addresses", "client_address", "check_private_dir", "ipc_path",
           "refuse_served_ipc", "secure_ipc_socket"]

log = logging.getLogger("shmrunner.daemon")


def ipc_path(address: str) -> str | None:
    """The socket file of an ``ipc://`` address, else None."""
    return address[len("ipc://"):] if address.startswith("ipc://") else None


def check_private_dir(path: str, what: str, *, create: bool = False) -> None:
    """Raise ConfigError unless ``path`` is a real directory, owned by this user,
    with no group or other permission bits; with ``create``, make it (0700)."""
    if create:
        parent = os.path.dirname(path)
        try:
            if parent:
                os.makedirs(parent, mode=0o700, exist_ok=True)
            os.mkdir(path, 0o700)  # the umask can only take bits away
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"{what}: cannot create the directory {path}: "
                              f"{exc.strerror or exc}") from None
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot use the directory {path}: "
                          f"{exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{what}: {path} is a symlink; the socket directory must be a real "
                          "directory only you can enter: remove the link")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what}: {path} is not a directory; remove it or point the "
                          "setting elsewhere")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{what}: {path} belongs to uid {st.st_uid}, not to you (uid "
                          f"{os.geteuid()}); another user could serve or reach the socket "
                          "there: use a directory of your own")
    if st.st_mode & 0o077:
        raise ConfigError(f"{what}: {path} has mode {stat.S_IMODE(st.st_mode):04o}: other "
                          f"users could reach the socket; run: chmod 700 {path}")


def daemon_addresses(settings: DaemonSettings, curve: bool) -> tuple[str, str, list[str]]:
    """The (clients, workers) addresses the daemon binds, after refusing any that
    an unauthenticated stranger could reach, and the warnings to log once the
    daemon has started (a refusal to start stays one line). Creates the
    private runtime directory when a default address is used."""
    addresses = []
    warnings = []
    for key in ("clients", "workers"):
        what = f"daemon.{key}"
        configured: str | None = getattr(settings, key)
        if configured is None:
            check_private_dir(runtime_dir(), what, create=True)
            addresses.append(default_address(key))
            continue
        addresses.append(configured)
        if curve:
            continue
        if settings.allow_unauthenticated:
            warnings.append(f"{what} {configured} serves peers without authentication "
                            "(daemon.allow_unauthenticated): anyone who can reach it can run "
                            "code as this user")
            continue
        path = ipc_path(configured)
        if path is not None and path.startswith("@"):
            raise ConfigError(
                f"{what}: {configured} is an abstract socket, which has no permissions: any "
                "local user could connect and run code as this user; use an ipc:// socket "
                "file in a private directory, configure CURVE, or set "
                "daemon.allow_unauthenticated: true")
        if path is None:
            raise ConfigError(
                f"{what}: {configured} has no authentication: anyone who can reach the port "
                "(any local user, on loopback too) could run code as this user; configure "
                "CURVE (daemon.curve_secret_key, daemon.curve_authorized_clients, "
                "daemon.curve_authorized_workers), use an ipc:// socket in a private "
                "directory, or set daemon.allow_unauthenticated: true")
        check_private_dir(os.path.dirname(os.path.abspath(path)), what)
    return addresses[0], addresses[1], warnings


def client_address(address: str | None, endpoint: str) -> str:
    """``address``, or the daemon's default one; a default socket is used only in
    a private directory (else another user could pose as the daemon)."""
    if address is not None:
        return address
    directory = runtime_dir()
    if os.path.lexists(directory):
        check_private_dir(directory, f"the default {endpoint} address")
    return default_address(endpoint)


def refuse_served_ipc(address: str, what: str) -> None:
    """Raise ConfigError when a process already listens on the ipc socket file
    of ``address``. ZeroMQ's bind unlinks the file and binds anew: a second
    daemon would take the socket over in silence, the first one still running
    but out of its clients' and workers' reach. A file nobody listens on (left
    by a daemon that exited) is no refusal: the bind replaces it."""
    path = ipc_path(address)
    if path is None or path.startswith("@"):  # tcp, or abstract: the bind itself refuses
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return  # nobody listens (or no file): ours to bind
    finally:
        probe.close()
    raise ConfigError(f"{what}: {address} is already served by another process (a daemon "
                      "running with another journal?): stop it, or give this daemon another "
                      f"{what} address")


def secure_ipc_socket(address: str) -> None:
    """Make a bound ipc socket owner-only: connecting needs write permission on
    it, so this shuts out other users even outside a private directory."""
    path = ipc_path(address)
    if path is not None and not path.startswith("@"):  # an abstract socket has no file
        try:
            os.chmod(path, 0o600)
        except OSError as exc:
            log.warning("cannot make %s owner-only: %s", path, exc.strerror or exc)
