"""Task functions for the daemon, client and CLI tests, and the harness that runs
the daemon and workers as real subprocesses of the ``shmrunner`` command.

The task functions are imported by reference (``"_daemon_tasks:inc"``) in the
daemon's and remote workers' processes: the harness puts this directory on
their PYTHONPATH. The harness half is only used by the test process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# --- tasks (run in worker processes) --------------------------------------------------


class TaskFailed(Exception):
    """A task's own exception class: it must come back to the client as itself."""


def _wait_for(release: str, limit: float) -> None:
    """Block (in the job) until ``release`` exists, ``limit`` seconds at most."""
    deadline = time.monotonic() + limit
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)


def inc(x: int) -> int:
    return x + 1


def add(a: Any, b: Any) -> Any:
    return a + b


def arrays_out(a: np.ndarray, scale: float) -> dict[str, Any]:
    """Arrays nested in a dict and a tuple, returned to the client."""
    return {"scaled": a * scale, "pair": (a + 1, np.arange(a.size, dtype=np.int32)),
            "sum": float(a.sum())}


def ones(n: int, dtype: str = "float64") -> np.ndarray:
    """An array made by the worker (W3): it comes back to the client."""
    return np.ones(n, dtype=dtype)


def ones_after(n: int, release: str, limit: float = 60.0) -> np.ndarray:
    """``ones(n)`` once ``release`` exists: a result held back until the caller says."""
    _wait_for(release, limit)
    return np.ones(n)


def scaled_after(a: np.ndarray, release: str, limit: float = 60.0) -> np.ndarray:
    """``a * 2`` once ``release`` exists: an argument's array held back, then returned."""
    _wait_for(release, limit)
    return a * 2


def inc_inplace(a: np.ndarray) -> np.ndarray:
    """a += 1, returned (W4): the same memory goes back."""
    a += 1
    return a


def nested_total(d: dict[str, Any]) -> float:
    return float(sum(a.sum() for a in [*d["x"], *d["y"]]))


def gated_total(a: np.ndarray, started: str, release: str, limit: float = 60.0) -> float:
    """float(a.sum()) once ``release`` exists; ``started`` is created first."""
    Path(started).touch()
    _wait_for(release, limit)
    return float(a.sum())


def fail(message: str) -> None:
    raise TaskFailed(message)


def fail_key(key: str) -> None:
    raise KeyError(key)


def where() -> int:
    """The pid of the process that runs the task."""
    return os.getpid()


def keywords(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments the task was called with."""
    return kwargs


def append_id(path: str, job_id: str, delay: float) -> str:
    """Record that job ``job_id`` ran (one line, one O_APPEND write), then work a little."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{job_id}\n".encode())
    finally:
        os.close(fd)
    time.sleep(delay)  # the job's work
    return job_id


def total(a: np.ndarray) -> float:
    return float(a.sum())


_kept: list[np.ndarray] = []


def keep(a: np.ndarray) -> float:
    """Keep a reference to the argument past the task (this worker maps it on)."""
    _kept.append(a)
    return float(a.sum())


def kept_total() -> float:
    """The sum of every array this worker kept, read now."""
    return float(sum(a.sum() for a in _kept))


def fork_total(a: np.ndarray) -> float:
    """Fork while mapping ``a`` (the child exits at once), then sum it."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return float(a.sum())


def blob(size: int) -> bytes:
    """A result of ``size`` bytes (a large reply to a client)."""
    return b"r" * size


def hold(started: str, release: str, limit: float = 60.0, payload: Any = None) -> int:
    """Say the job started (this pid in ``started``), run until ``release`` exists;
    return this pid. ``payload``: ignored (makes the request as large as a test needs)."""
    tmp = f"{started}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, started)
    _wait_for(release, limit)
    return os.getpid()


# --- harness (the test process) --------------------------------------------------------

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
READY = "shmrunner daemon: clients on "


def env() -> dict[str, str]:
    e = dict(os.environ)
    extra = [str(TESTS), str(REPO)]
    if e.get("PYTHONPATH"):
        extra.append(e["PYTHONPATH"])
    e["PYTHONPATH"] = os.pathsep.join(extra)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def cli(*args: str, module: str = "shmrunner.cli") -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one ``shmrunner`` command to its end; stdout and stderr captured."""
    return subprocess.run(cli(*args), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, wherever they were reparented."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and fields[0] != b"Z" and int(fields[2]) == pgid:
                found.append(int(entry))
    return found


class Proc:
    """One ``shmrunner`` subprocess (its own session and process group), its
    stderr appended to ``log``; stop() ends it and everything it started."""

    def __init__(self, args: list[str], log: Path, stdout: Path | None = None,
                 module: str = "shmrunner.cli", cwd: Path = REPO) -> None:
        self.args = args
        self.log = log
        self.stdout = stdout or log
        with open(log, "ab") as err, open(self.stdout, "ab") as out:
            self.popen = subprocess.Popen(cli(*args, module=module), cwd=cwd, env=env(),
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                          start_new_session=True)
        self.pid = self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> list[int]:
        """SIGTERM, then SIGKILL after ``timeout``; then kill and reap whatever it
        left in its process group. Returns the pids that had to be killed."""
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
        leftovers = self.leftovers(timeout=5.0)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while group_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        return leftovers

    def leftovers(self, timeout: float) -> list[int]:
        """Processes of its group still alive ``timeout`` seconds after it exited."""
        deadline = time.monotonic() + timeout
        while (members := group_members(self.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return members


class DaemonExited(AssertionError):
    pass


class Daemon:
    """A ``shmrunner daemon --config FILE`` subprocess and its YAML file, in tmp_path."""

    def __init__(self, tmp_path: Path, name: str = "daemon", daemon: dict[str, Any] | None = None,
                 scheduler: dict[str, Any] | None = None, args: tuple[str, ...] = (),
                 client_options: dict[str, Any] | None = None,
                 fault: tuple[str, str] | None = None) -> None:
        self.dir = tmp_path
        # (Daemon method, "once" or "always"): run it under _faulty_daemon, that method raising
        self.fault = fault
        self.name = name
        self.config_path = tmp_path / f"{name}.yaml"
        self.log = tmp_path / f"{name}.log"
        self.daemon_settings: dict[str, Any] = {
            "journal": str(tmp_path / f"{name}-journal.sqlite"),
            "log_level": "INFO", "drain_timeout": 20.0, **(daemon or {})}
        self.scheduler_settings: dict[str, Any] = {
            "local_workers": 1, "heartbeat_interval": 0.2, "heartbeat_timeout": 1.0,
            **(scheduler or {})}
        self.args = args
        self.client_options = client_options or {}
        self.proc: Proc | None = None
        self.clients: list[Any] = []
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.daemon_settings.setdefault("clients", f"tcp://127.0.0.1:{free_port()}")
        self.daemon_settings.setdefault("workers", f"tcp://127.0.0.1:{free_port()}")
        if "curve_secret_key" not in self.daemon_settings:  # these tests observe TCP
            self.daemon_settings.setdefault("allow_unauthenticated", True)

    @property
    def address(self) -> str:
        return str(self.daemon_settings["clients"])

    @property
    def workers_address(self) -> str:
        return str(self.daemon_settings["workers"])

    def write_config(self) -> None:
        import yaml

        self.config_path.write_text(yaml.safe_dump(
            {"daemon": self.daemon_settings, "scheduler": self.scheduler_settings}))

    def start(self, timeout: float = 30.0, attempts: int = 5) -> Daemon:
        """Start (or restart, same config) and wait until it answers status."""
        for attempt in range(attempts):
            self.write_config()
            seen = self.log.read_text().count(READY) if self.log.exists() else 0
            args = ["daemon", "--config", str(self.config_path), *self.args]
            if self.fault is None:
                self.proc = Proc(args, self.log)
            else:
                self.proc = Proc([*self.fault, *args], self.log, module="_faulty_daemon")
            try:
                self._wait_line(seen, timeout)
                break
            except DaemonExited:
                text = self.proc.text()
                self.proc.stop()
                if "Address already in use" in text and attempt + 1 < attempts:
                    # another test took the port between our probe and the bind
                    for key in ("clients", "workers"):
                        self.daemon_settings[key] = f"tcp://127.0.0.1:{free_port()}"
                    continue
                raise
        probe = self.client()
        try:
            probe.status(timeout=timeout)
        finally:
            self.forget(probe)
        return self

    def _wait_line(self, seen: int, timeout: float) -> None:
        from _util import wait_until

        assert self.proc is not None
        proc = self.proc

        def ready() -> bool:
            if proc.text().count(READY) > seen:
                return True
            if not proc.alive():
                raise DaemonExited(f"the daemon exited with {proc.popen.returncode}:\n"
                                   f"{proc.text()}")
            return False

        wait_until(ready, timeout=timeout, interval=0.02, message="the daemon's ready line")

    def client(self, **options: Any) -> Any:
        import shmrunner

        c = shmrunner.connect(self.address, **{**self.client_options, **options})
        self.clients.append(c)
        return c

    def forget(self, client: Any) -> None:
        client.shutdown(wait=False)
        if client in self.clients:
            self.clients.remove(client)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        c = self.client()
        try:
            status: dict[str, Any] = c.status(timeout=timeout)
            return status
        finally:
            self.forget(c)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def descendants(self) -> list[int]:
        from _util import children

        return children(self.pid)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGKILL)
        self.proc.popen.wait(10)

    def close(self) -> list[int]:
        """Shut down its clients, stop the process; return pids that had to be killed."""
        for c in list(self.clients):
            self.forget(c)
        return self.proc.stop() if self.proc is not None else []


class Worker(Proc):
    """A ``shmrunner worker`` subprocess. Without ``config``, a file with the tests'
    short heartbeats (the agent does not adopt the scheduler's: see test_remote.py)."""

    def __init__(self, tmp_path: Path, connect: str | None, name: str,
                 processes: int = 1, config: Path | None = None) -> None:
        if config is None:
            config = tmp_path / f"worker-{name}.yaml"
            config.write_text("worker:\n  heartbeat_interval: 0.2\n  heartbeat_timeout: 1.0\n")
        args = ["worker", "--processes", str(processes), "--name", name, "--config", str(config)]
        if connect is not None:
            args += ["--connect", connect]
        super().__init__(args, tmp_path / f"worker-{name}.log")
        self.name = name


class RawPeer:
    """A bare DEALER on a daemon's client endpoint: sends what the Client never
    would, reads replies with a deadline. ``rcvhwm``: how many replies it lets
    queue before ZeroMQ stops taking more from the daemon."""

    def __init__(self, address: str, rcvhwm: int = 1000) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.connect(address)

    def send(self, msg: Any) -> None:
        from shmrunner.transport.protocol import encode

        self.socket.send_multipart(encode(msg), copy=False)

    def send_frames(self, frames: list[Any]) -> None:
        self.socket.send_multipart(frames, copy=False)

    def recv(self, timeout: float = 10.0) -> Any:
        """The next reply (a Message), or None after ``timeout`` seconds."""
        from shmrunner.transport.protocol import decode

        if not self.socket.poll(round(timeout * 1000)):
            return None
        return decode(self.socket.recv_multipart(copy=False), max_bytes=1 << 30,
                      allow_pickle=False)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.ctx.term()


def _tcp_rows(pid: int) -> Iterator[list[str]]:
    """/proc/net/tcp{,6} rows of the ESTABLISHED sockets process ``pid`` holds."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "01" and fields[9] in inodes:
                yield fields


def _port(field: str) -> int:
    return int(field.rsplit(":", 1)[1], 16)


def tcp_connections(pid: int, port: int) -> int:
    """TCP connections process ``pid`` holds to local port ``port`` (from /proc: how
    a test sees a peer's connection close without asking the peer)."""
    return sum(1 for fields in _tcp_rows(pid) if _port(fields[2]) == port)


def rx_queued(pid: int, port: int) -> int:
    """Bytes waiting, unread, in the receive queues of the connections process
    ``pid`` accepted on its port ``port`` (how a test knows a frozen process has
    messages waiting for it)."""
    return sum(int(fields[4].split(":")[1], 16) for fields in _tcp_rows(pid)
               if _port(fields[1]) == port)


def stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (SIGSTOP has taken effect)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2:].split()[0] not in (b"T", b"t"):
            return False
    return True


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def named(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((w for w in status["workers"] if w["name"] == name), None)


def iter_lines(path: Path) -> Iterator[str]:
    if path.exists():
        yield from (line for line in path.read_text().splitlines() if line)
