"""Attacks on who may run code: a stranger's submit of ``builtins:eval``, other
local users on the default endpoint, unauthenticated TCP, keys used on the
wrong endpoint, and planted key files. Real daemons, workers and sockets."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import shmrunner
from _daemon_tasks import READY, Daemon, Proc, Worker, named, run_cli
from _util import children, wait_until
from shmrunner.config import default_address
from shmrunner.transport.curve import CurveKeys, server_keys

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    made: list[Worker] = []
    yield made
    for w in made:
        w.stop(timeout=5)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $XDG_RUNTIME_DIR for this test and the processes it starts."""
    base = tmp_path / "run"
    base.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    return base / "shmrunner"


class DefaultDaemon(Daemon):
    """A daemon with no endpoint configured: the defaults in the runtime directory."""

    def _pick_ports(self) -> None:
        pass

    @property
    def address(self) -> str:
        return default_address("clients")

    @property
    def workers_address(self) -> str:
        return default_address("workers")


def _ipc(tmp_path: Path) -> dict[str, Any]:
    return {"clients": f"ipc://{tmp_path}/c.sock", "workers": f"ipc://{tmp_path}/w.sock"}


def _refused(args: list[str], tmp_path: Path, **popen: Any) -> str:
    """Run ``shmrunner daemon ARGS``: it must exit non-zero with one line; return it."""
    n = len(list(tmp_path.glob("refused-*.err")))
    proc = Proc(["daemon", *args], tmp_path / f"refused-{n}.err",
                stdout=tmp_path / f"refused-{n}.out", **popen)
    try:
        wait_until(lambda: not proc.alive() or READY in proc.text(), timeout=30,
                   message="the daemon to exit")
    finally:
        served = proc.alive()
        proc.stop()
    text = proc.text()
    assert not served, f"the daemon served:\n{text}"
    assert proc.popen.returncode == 2, text
    lines = text.splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _config(tmp_path: Path, daemon: dict[str, Any], name: str = "d.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"daemon": {"journal": str(tmp_path / "j.sqlite"),
                                               **daemon},
                                    "scheduler": {"local_workers": 1}}))
    return str(path)


# --- the allow-list ----------------------------------------------------------------------


def test_eval_and_friends_are_refused_before_anything_runs(tmp_path: Path, daemons) -> None:
    d = daemons(daemon=_ipc(tmp_path),
                scheduler={"allowed_functions": ["_daemon_tasks:inc", "_daemon_tasks:where"]})
    d.start()
    client = d.client()
    marker = tmp_path / "pwned"
    attacks = [
        ("builtins:eval", (f"open({str(marker)!r}, 'w')",)),
        ("builtins:exec", (f"open({str(marker)!r}, 'w')",)),
        ("os:system", (f"touch {marker}",)),
        ("_daemon_tasks:os.system", (f"touch {marker}",)),          # through an import
        ("_daemon_tasks:inc.__globals__", ()),                       # dunder walk
        ("shmrunner.scheduler:_run_chunk", ("builtins:eval", [("1",)])),  # nested reference
        ("shmrunner.scheduler:_run_chunk", (["not", "a", "ref"], [(1,)])),
    ]
    for fn, args in attacks:
        with pytest.raises(shmrunner.FunctionNotAllowedError) as info:
            client.submit(fn, *args).result(timeout=30)
        assert "\n" not in str(info.value) and "allowed_functions" in str(info.value), fn
    assert not marker.exists()
    # What the list names runs, also carried by map(chunksize=)'s chunk runner.
    assert client.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2
    assert client.submit("shmrunner.scheduler:_run_chunk", "_daemon_tasks:inc",
                         [(1,), (2,)]).result(timeout=30) == [2, 3]
    with pytest.raises(shmrunner.FunctionNotAllowedError):
        client.submit("_daemon_tasks:add", 1, 2).result(timeout=30)  # same module, not listed
    assert d.status()["failed"] == len(attacks) + 1


def test_a_module_pattern_allows_what_the_module_defines_not_what_it_holds(
        tmp_path: Path, daemons, monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported functions, objects walked to through a partial, and names a
    module __getattr__ would make (importing who knows what) are refused."""
    lazy = tmp_path / "lazy-getattr-ran"
    monkeypatch.setenv("SHMRUNNER_TEST_LAZY_MARKER", str(lazy))
    d = daemons(daemon=_ipc(tmp_path), scheduler={"allowed_functions": ["_allowlist_tasks"]})
    d.start()
    client = d.client()
    assert client.submit("_allowlist_tasks:double", 2).result(timeout=30) == 4
    assert client.submit("_allowlist_tasks:Scaler.triple", 2).result(timeout=30) == 6
    marker = tmp_path / "pwned"
    for fn, args, why in [
            ("_allowlist_tasks:run", (["touch", str(marker)],), "comes from 'subprocess'"),
            ("_allowlist_tasks:echo", ("x",), "comes from 'functools'"),
            ("_allowlist_tasks:echo.func", ("x",), "comes from 'functools'"),
            ("_allowlist_tasks:os.system", (f"touch {marker}",), "goes through the module")]:
        with pytest.raises(shmrunner.FunctionNotAllowedError, match=why):
            client.submit(fn, *args).result(timeout=30)
    with pytest.raises(ImportError, match="has no attribute 'numpy_like_lazy_name'"):
        client.submit("_allowlist_tasks:numpy_like_lazy_name").result(timeout=30)
    assert not marker.exists()
    assert not lazy.exists()  # the module's __getattr__ never ran


def test_module_patterns_and_wildcards(tmp_path: Path, daemons) -> None:
    d = daemons(daemon=_ipc(tmp_path), scheduler={"allowed_functions": ["_daemon_*", "math"]})
    d.start()
    client = d.client()
    assert client.submit("_daemon_tasks:add", 1, 2).result(timeout=30) == 3
    assert client.submit("math:hypot", 3, 4).result(timeout=30) == 5.0
    with pytest.raises(shmrunner.FunctionNotAllowedError):
        client.submit("mathx:f").result(timeout=30)
    with pytest.raises(shmrunner.FunctionNotAllowedError):
        client.submit("_daemon_tasks:np.save", "x", 1).result(timeout=30)


def _worker_config(tmp_path: Path, name: str, **worker: Any) -> Path:
    path = tmp_path / f"worker-{name}.yaml"
    path.write_text(yaml.safe_dump({"worker": {"heartbeat_interval": 0.2,
                                               "heartbeat_timeout": 1.0, **worker}}))
    return path


def test_a_worker_refuses_what_its_own_list_does_not_name(tmp_path: Path, workers) -> None:
    with shmrunner.Scheduler(local_workers=0, listen=f"ipc://{tmp_path}/w.sock",
                             heartbeat_interval=0.2, heartbeat_timeout=1.0) as sched:
        assert sched.address is not None
        w = Worker(tmp_path, sched.address, "strict", config=_worker_config(
            tmp_path, "strict", allowed_functions=["_daemon_tasks:inc"]))
        workers.append(w)
        assert sched.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2
        assert list(sched.map("_daemon_tasks:inc", range(4), chunksize=2)) == [1, 2, 3, 4]
        marker = tmp_path / "pwned"
        with pytest.raises(shmrunner.FunctionNotAllowedError, match="worker.allowed_functions"):
            sched.submit("builtins:exec", f"open({str(marker)!r}, 'w')").result(timeout=30)
        with pytest.raises(shmrunner.FunctionNotAllowedError):
            list(sched.map("builtins:eval", ["1", "2"], chunksize=2))
        assert not marker.exists()


def test_allow_list_and_pickles_exclude_each_other() -> None:
    for section in ("scheduler", "worker"):
        with pytest.raises(shmrunner.ConfigError, match="exclude each other"):
            shmrunner.config.parse({section: {"allowed_functions": ["m"], "allow_pickle": True}})


# --- the default endpoints: a private directory ---------------------------------------------


def test_default_endpoints_are_owner_only_sockets_and_need_no_setup(
        tmp_path: Path, daemons, workers, runtime: Path) -> None:
    d = daemons(DefaultDaemon)
    d.start()
    st = os.lstat(runtime)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()
    for name in ("clients.sock", "workers.sock"):
        sock = os.lstat(runtime / name)
        assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) & 0o077 == 0
    assert f"clients on ipc://{runtime}/clients.sock" in d.proc.text()  # type: ignore[union-attr]
    # Same-host use with no address anywhere: the client, the worker and status.
    with shmrunner.connect() as client:
        assert client.submit("_daemon_tasks:inc", 41).result(timeout=30) == 42
    w = Worker(tmp_path, None, "default-worker")
    workers.append(w)
    wait_until(lambda: named(d.status(), "default-worker") is not None, timeout=30,
               message="the worker to join on the default socket")
    done = run_cli("status", "--json")
    assert done.returncode == 0, done.stderr
    assert "default-worker" in done.stdout


@pytest.mark.parametrize("how", ["group-writable", "world-readable", "symlink", "a-file",
                                 "other-owner"])
def test_an_unsafe_runtime_directory_is_refused(tmp_path: Path, runtime: Path,
                                                how: str) -> None:
    if how == "other-owner" and os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another user")
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    if how == "group-writable":
        runtime.mkdir(mode=0o700)
        os.chmod(runtime, 0o770)
    elif how == "world-readable":
        runtime.mkdir(mode=0o700)
        os.chmod(runtime, 0o705)
    elif how == "symlink":
        runtime.symlink_to(target)  # planted: the daemon must not bind through it
    elif how == "a-file":
        runtime.write_text("")
    else:
        runtime.mkdir(mode=0o700)
        os.chown(runtime, 65534, 65534)
    line = _refused(["--config", _config(tmp_path, {})], tmp_path)
    assert line.startswith("shmrunner daemon: daemon.clients: ") and str(runtime) in line, line
    assert list(target.iterdir()) == []
    assert not (tmp_path / "j.sqlite").exists()
    # A client does not talk to a socket in such a directory either (an impostor's).
    if how != "a-file":
        with pytest.raises(shmrunner.ConfigError, match=str(runtime)):
            shmrunner.connect()


def test_tcp_without_curve_is_refused_unless_opted_in(tmp_path: Path) -> None:
    line = _refused(["--config", _config(tmp_path, {"clients": "tcp://127.0.0.1:*",
                                                    "workers": f"ipc://{tmp_path}/w"})],
                    tmp_path)
    assert "daemon.clients" in line and "tcp://127.0.0.1:*" in line
    assert "CURVE" in line and "daemon.allow_unauthenticated" in line
    # An explicit ipc socket in a directory others can enter is refused as well.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    line = _refused(["--config", _config(tmp_path, {"clients": f"ipc://{tmp_path}/c",
                                                    "workers": f"ipc://{shared}/w"})],
                    tmp_path)
    assert "daemon.workers" in line and str(shared) in line
    # An abstract socket (ipc://@name) has no permissions at all: any local user
    # could connect, even to a daemon run from a private directory.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    for key in ("clients", "workers"):
        daemon = {**_ipc(tmp_path), key: f"ipc://@shmrunner-test-{key}-{os.getpid()}"}
        line = _refused(["--config", _config(tmp_path, daemon)], tmp_path, cwd=private)
        assert f"daemon.{key}" in line and "abstract socket" in line, line


def test_an_unauthenticated_tcp_scheduler_warns(caplog: pytest.LogCaptureFixture) -> None:
    from shmrunner.tiers import _admission

    _admission._warned.clear()  # once per process: start from a clean slate
    caplog.set_level(logging.WARNING, logger="shmrunner.scheduler")
    with shmrunner.Scheduler(local_workers=1, listen="tcp://127.0.0.1:*"):
        pass
    warnings = [r.getMessage() for r in caplog.records if "without CURVE" in r.getMessage()]
    assert len(warnings) == 1 and "anyone who can reach" in warnings[0]


# --- CURVE: a directory of keys per endpoint ----------------------------------------------


def _keys(tmp_path: Path) -> dict[str, Path]:
    keys = tmp_path / "keys"
    for name in ("server", "client", "worker", "stranger"):
        done = run_cli("keygen", str(keys), "--name", name)
        assert done.returncode == 0, done.stderr
    clients, workers_dir = tmp_path / "ok-clients", tmp_path / "ok-workers"
    clients.mkdir()
    workers_dir.mkdir()
    shutil.copy(keys / "client.key", clients)
    shutil.copy(keys / "worker.key", workers_dir)
    out = {name: keys / f"{name}.key" for name in ("server", "client", "worker", "stranger")}
    out.update({f"{name}_secret": keys / f"{name}.key_secret"
                for name in ("server", "client", "worker", "stranger")})
    out.update(clients=clients, workers=workers_dir)
    return out


def _z85(public_file: Path) -> str:
    import zmq.auth

    return zmq.auth.load_certificate(str(public_file))[0].decode()


def test_each_key_works_only_on_its_own_endpoint(tmp_path: Path, daemons, workers) -> None:
    k = _keys(tmp_path)
    d = daemons(daemon={"curve_secret_key": str(k["server_secret"]),
                        "curve_authorized_clients": str(k["clients"]),
                        "curve_authorized_workers": str(k["workers"])},
                scheduler={"local_workers": 0},
                client_options={"curve_secret_key": str(k["client_secret"]),
                                "curve_server_key": str(k["server"])})
    d.start()
    log = d.proc.text  # type: ignore[union-attr]

    def worker(name: str, key: str) -> Worker:
        w = Worker(tmp_path, None, name, config=_worker_config(
            tmp_path, name, connect=d.workers_address, curve_secret_key=str(k[key]),
            curve_server_key=str(k["server"])))
        workers.append(w)
        return w

    # A client's key and a stranger's cannot join as workers.
    worker("as-client", "client_secret")
    worker("as-stranger", "stranger_secret")
    for key in ("client", "stranger"):
        wait_until(lambda key=key: f"refused CURVE key {_z85(k[key])} on the workers endpoint"
                   in log(), timeout=30, message=f"the {key} key refused on workers")
    # A worker's key and a stranger's cannot submit.
    for key in ("worker", "stranger"):
        intruder = shmrunner.connect(d.address, curve_secret_key=str(k[f"{key}_secret"]),
                                     curve_server_key=str(k["server"]), ack_timeout=2)
        try:
            wait_until(lambda key=key: f"refused CURVE key {_z85(k[key])} on the clients "
                       "endpoint" in log(), timeout=30,
                       message=f"the {key} key refused on clients")
            with pytest.raises(shmrunner.ShmrunnerError):
                intruder.submit("_daemon_tasks:inc", 1).result(timeout=5)
        finally:
            intruder.shutdown(wait=False)
    # The right keys on the right endpoints: the job runs on the authorised worker.
    good = worker("good", "worker_secret")
    client = d.client()
    wait_until(lambda: named(client.status(), "good") is not None, timeout=30,
               message="the authorised worker to join")
    assert client.submit("_daemon_tasks:where").result(timeout=30) in children(good.pid)
    assert [w["name"] for w in client.status()["workers"]] == ["good"]
    assert d.status()["done"] == 1  # the refused submit never reached the daemon


@pytest.mark.parametrize("slots", [False, True], ids=["pool", "slots"])
def test_scheduler_curve_admits_only_authorised_workers(
        tmp_path: Path, workers, caplog: pytest.LogCaptureFixture, slots: bool) -> None:
    k = _keys(tmp_path)
    caplog.set_level(logging.WARNING, logger="shmrunner.auth")
    keys = server_keys(str(k["server_secret"]), str(k["workers"]))
    with shmrunner.Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", curve=keys,
                             heartbeat_interval=0.2, heartbeat_timeout=1.0) as sched:

        def worker(name: str, key: str) -> Worker:
            # With slots, each slot process joins with the agent's key too.
            w = Worker(tmp_path, None, name, config=_worker_config(
                tmp_path, name, connect=sched.address, curve_secret_key=str(k[key]),
                curve_server_key=str(k["server"]), slots=slots))
            workers.append(w)
            return w

        worker("intruder", "client_secret")
        wait_until(lambda: any(f"refused CURVE key {_z85(k['client'])}" in r.getMessage()
                               for r in caplog.records), timeout=30,
                   message="the scheduler to refuse the intruder's key")
        good = worker("good", "worker_secret")
        pid = sched.submit("_daemon_tasks:where").result(timeout=30)
        assert pid in children(good.pid)
    for w in workers[:1]:
        w.stop(timeout=0.1)


def test_scheduler_curve_without_authorised_keys_refuses_to_start(tmp_path: Path) -> None:
    k = _keys(tmp_path)
    keys = server_keys(str(k["server_secret"]), None)
    assert isinstance(keys, CurveKeys)
    with pytest.raises(shmrunner.ConfigError, match="authorised worker keys"):
        shmrunner.Scheduler(local_workers=1, listen="tcp://127.0.0.1:*", curve=keys)


def test_a_curve_endpoint_admits_nobody_once_its_authenticator_is_gone() -> None:
    # Without ZAP_ENFORCE_DOMAIN libzmq admits any key when no authenticator
    # answers (e.g. while one stops): the endpoints must fail closed instead.
    import zmq

    from shmrunner.transport.curve import authorize, release
    from shmrunner.transport.protocol import Message
    from shmrunner.transport.zmqchannel import ChannelOptions, ZmqChannel

    server_public, server_secret = zmq.curve_keypair()
    known_public, known_secret = zmq.curve_keypair()
    ctx = zmq.Context.instance()
    domain = authorize(ctx, "test", frozenset({known_public}), "test")
    server = ZmqChannel("router", ChannelOptions(accept=frozenset({"status"}), curve=CurveKeys(
        server_public, server_secret, zap_domain=domain)))
    client = ZmqChannel("dealer", ChannelOptions(send_timeout=1, curve=CurveKeys(
        known_public, known_secret, server_key=server_public)))
    try:
        address = server.bind("tcp://127.0.0.1:*")
        client.connect(address)
        client.send(Message("status", {}))
        assert server.recv(10) is not None  # the authorised key gets in
        release(ctx, domain)  # the last domain: the authenticator stops
        late = ZmqChannel("dealer", ChannelOptions(send_timeout=1, curve=CurveKeys(
            known_public, known_secret, server_key=server_public)))
        try:
            late.connect(address)
            with contextlib.suppress(shmrunner.ChannelError):
                late.send(Message("status", {}))  # queued, or refused: never delivered
            assert server.recv(2.0) is None
        finally:
            late.close()
    finally:
        release(ctx, domain)
        client.close()
        server.close()
