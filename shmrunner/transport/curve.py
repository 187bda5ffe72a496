"""CURVE keys and who may connect: one key loader and one ZAP authenticator.

Key files are the ones ``shmrunner keygen`` writes (zmq.auth's format:
``public-key = "..."`` and, in the ``.key_secret`` file, ``secret-key``).
A server endpoint admits the public keys found in one directory of ``.key``
files, and each endpoint has its own ZAP domain, so a key allowed on one
endpoint (a client's) is refused on another (the workers'). One
``zmq.auth.thread.ThreadAuthenticator`` per ZeroMQ context serves every
domain; it stops when the last endpoint using it is released.

Server sockets set ``ZAP_ENFORCE_DOMAIN``: without it, libzmq admits every
CURVE key when no authenticator answers, which would open an endpoint while
the authenticator is stopping.
"""

from __future__ import annotations

import binascii
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.utils.z85

from ..errors import ChannelError, ConfigError

__all__ = ["CurveKeys", "load_key_file", "load_public_keys", "client_keys", "server_keys",
           "authorize", "release"]

log = logging.getLogger("shmrunner.auth")

_MAX_KEY_FILE = 64 * 1024     # a keygen file is ~300 bytes
_MAX_KEYS = 100_000           # .key files read from one authorised directory


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys (z85-encoded, as ``zmq.curve_keypair()`` makes them). Without
    ``server_key`` the socket is the CURVE server; with it, a client of the
    server whose public key it is. A server admits the public keys in the
    directory ``authorized`` (``.key`` files); ``zap_domain`` is set by the
    owner of the socket once that directory is registered with the
    authenticator (see :func:`authorize`)."""

    public_key: bytes
    secret_key: bytes
    server_key: bytes | None = None
    authorized: str | None = None
    zap_domain: str | None = None


def _z85_key(text: bytes) -> bytes | None:
    """``text`` if it is a z85 CURVE key (40 characters, 32 bytes), else None."""
    if len(text) != 40:
        return None
    try:
        return text if len(zmq.utils.z85.decode(text)) == 32 else None
    except (ValueError, KeyError, binascii.Error):
        return None


def load_key_file(path: str, what: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) keys from a keygen file; ``secret``: the file must hold
    the secret key. One ConfigError line naming ``what`` and the file otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"{what}: {path} is larger than a key file; use a file from "
                          "shmrunner keygen")
    found: dict[bytes, bytes] = {}
    for line in data.splitlines():
        name, sep, value = line.strip().partition(b"=")
        name = name.strip()
        if sep and name in (b"public-key", b"secret-key") and name not in found:
            key = _z85_key(value.strip(b" \t'\""))
            if key is None:
                raise ConfigError(f"{what}: {path} holds a malformed {name.decode()}; use a "
                                  "file from shmrunner keygen")
            found[name] = key
    public = found.get(b"public-key")
    if public is None:
        raise ConfigError(f"{what}: {path} holds no public key; use a file from "
                          "shmrunner keygen")
    private = found.get(b"secret-key")
    if secret and private is None:
        raise ConfigError(f"{what}: {path} holds no secret key; use the .key_secret file "
                          "from shmrunner keygen")
    if secret and private is not None and zmq.curve_public(private) != public:
        raise ConfigError(f"{what}: {path}: its public key does not belong to its secret key")
    return public, private


def load_public_keys(directory: str, what: str) -> frozenset[bytes]:
    """The public keys of the ``.key`` files in ``directory`` (not its subdirectories)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read the directory {directory}: "
                          f"{exc.strerror or exc}") from None
    keys: set[bytes] = set()
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(".key") and os.path.isfile(path):
            if len(keys) >= _MAX_KEYS:
                raise ConfigError(f"{what}: {directory} holds more than {_MAX_KEYS} keys")
            keys.add(load_key_file(path, what, secret=False)[0])
    if not keys:
        log.warning("%s: no .key files in %s: no peer can connect", what, directory)
    return frozenset(keys)


def client_keys(secret_file: str | None, server_file: str | None) -> CurveKeys | None:
    """CURVE keys for a connecting socket from keygen's files (None: no CURVE)."""
    if secret_file is None and server_file is None:
        return None
    if secret_file is None or server_file is None:
        raise ConfigError("CURVE needs both curve_secret_key (this client's .key_secret "
                          "file) and curve_server_key (the daemon's .key file)")
    public, secret = load_key_file(secret_file, "curve_secret_key", secret=True)
    server_public, _ = load_key_file(server_file, "curve_server_key", secret=False)
    assert secret is not None
    return CurveKeys(public_key=public, secret_key=secret, server_key=server_public)


def server_keys(secret_file: str, authorized: str | None, what: str = "curve_secret_key"
                ) -> CurveKeys:
    """CURVE keys for a serving socket: its own key pair and the directory of the
    public keys it admits (e.g. ``Scheduler(curve=server_keys(...))``)."""
    public, secret = load_key_file(secret_file, what, secret=True)
    assert secret is not None
    return CurveKeys(public_key=public, secret_key=secret, authorized=authorized)


class _Keyring:
    """The keys one endpoint admits; called by the authenticator's thread."""

    def __init__(self, keys: frozenset[bytes], label: str) -> None:
        self.keys = keys
        self.label = label
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.denied += 1
        # Why the cap: a stranger retrying must not flood the log.
        if self.denied <= 10 or self.denied % 1000 == 0:
            log.warning("refused CURVE key %s on the %s endpoint (#%d): it is not among the "
                        "authorised keys", key.decode("ascii", "replace"), self.label,
                        self.denied)
        return False


class _Zap:
    """The authenticator of one context and the domains registered with it."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(context)
        _start(self.auth)
        self.domains: dict[str, _Keyring] = {}


# Seconds a new authenticator waits for the ZAP address to be free. Why: the
# previous one's socket, closed by release(), is unbound by libzmq in the
# background, so a scheduler made right after another's shutdown found it taken.
_ZAP_REBIND = 2.0


def _start(auth: Any) -> None:
    """Start ``auth`` (a ThreadAuthenticator); the context's ZAP address
    taken for longer than ``_ZAP_REBIND`` is a ChannelError naming why."""
    deadline = time.monotonic() + _ZAP_REBIND
    while True:
        try:
            auth.start()
            return
        except zmq.ZMQError as exc:
            auth.stop()  # closes what start() opened
            if exc.errno != zmq.EADDRINUSE:
                raise ChannelError(f"cannot start the CURVE (ZAP) authenticator: {exc}") from exc
            if time.monotonic() > deadline:
                raise ChannelError(
                    "cannot start the CURVE (ZAP) authenticator: another ZAP authenticator "
                    "(zmq.auth) serves this process's zmq.Context.instance(), which CURVE "
                    "endpoints share; stop it, or let shmrunner authenticate "
                    "(curve=server_keys(secret_file, authorized_dir))") from exc
        time.sleep(0.005)


_lock = threading.Lock()
_zaps: dict[int, _Zap] = {}  # id(context) -> its authenticator


def authorize(context: zmq.Context[Any], name: str, keys: frozenset[bytes],
              label: str) -> str:
    """Register an endpoint admitting ``keys`` under a fresh ZAP domain (starting
    the context's authenticator if needed); returns the domain for the socket's
    ``ZAP_DOMAIN``. Call before binding, and :func:`release` after closing."""
    with _lock:
        zap = _zaps.get(id(context))
        if zap is None:
            zap = _zaps[id(context)] = _Zap(context)
        domain, n = name, 1
        while domain in zap.domains:
            n += 1
            domain = f"{name}-{n}"
        zap.domains[domain] = ring = _Keyring(keys, label)
        zap.auth.configure_curve_callback(domain=domain, credentials_provider=ring)
        return domain


def release(context: zmq.Context[Any], domain: str) -> None:
    """Forget an endpoint's domain; the last one stops the authenticator."""
    with _lock:
        zap = _zaps.get(id(context))
        if zap is None or zap.domains.pop(domain, None) is None:
            return
        zap.auth.credentials_providers.pop(domain, None)
        if not zap.domains:
            del _zaps[id(context)]
            zap.auth.stop()


# --- writing keys (shmrunner keygen) -------------------------------------------------------

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def write_key_pair(directory: str, name: str, *, force: bool = False) -> tuple[str, str]:
    """Write ``name.key`` (public, 0644) and ``name.key_secret`` (0600) into
    ``directory``; return their paths. Never follows a symlink (the directory's
    or a file's), never overwrites without ``force`` (which replaces each file
    by an atomic rename), refuses a directory others can write to."""
    if not name or name.startswith(".") or not set(name) <= _NAME_OK or len(name) > 200:
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '-' and '.' "
                          "(not first)")
    if os.path.islink(directory):
        raise ConfigError(f"{directory} is a symlink; give keygen the real directory")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstat(dir_fd)
        if st.st_mode & 0o022:
            raise ConfigError(f"{directory} is writable by others (mode "
                              f"{st.st_mode & 0o777:04o}): they could replace the keys; "
                              f"run: chmod go-w {directory}")
        files = (f"{name}.key", f"{name}.key_secret")
        if not force:
            for file in files:
                if _lexists(file, dir_fd):
                    raise ConfigError(f"{os.path.join(directory, file)} exists; keygen does "
                                      "not overwrite keys (pass --force to replace them)")
        public, secret = zmq.curve_keypair()
        banner = "#   ZeroMQ CURVE {} key, written by shmrunner keygen\n"
        public_text = (banner.format("public") + "metadata\ncurve\n"
                       f'    public-key = "{public.decode()}"\n')
        secret_text = (banner.format("secret") + "metadata\ncurve\n"
                       f'    public-key = "{public.decode()}"\n'
                       f'    secret-key = "{secret.decode()}"\n')
        _write(files[1], secret_text, 0o600, dir_fd, force)
        _write(files[0], public_text, 0o644, dir_fd, force)
    finally:
        os.close(dir_fd)
    return os.path.join(directory, files[0]), os.path.join(directory, files[1])


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write(name: str, text: str, mode: int, dir_fd: int, replace: bool) -> None:
    """Create ``name`` with ``mode`` from the start (no window where it is
    readable by others), O_EXCL | O_NOFOLLOW; with ``replace``, write a fresh
    temporary file and rename it over ``name`` (a rename replaces a symlink,
    it does not follow it)."""
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY
    target = f".{name}.{os.getpid()}.tmp" if replace else name
    try:
        fd = os.open(target, flags, mode, dir_fd=dir_fd)
    except FileExistsError:
        raise ConfigError(f"{name} exists; keygen does not overwrite keys (pass --force to "
                          "replace them)") from None
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        os.write(fd, text.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(target, dir_fd=dir_fd)
        raise
    os.close(fd)
    if replace:
        os.replace(target, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
