"""The ``shmrunner`` command, run as ``python -m shmrunner.cli``: --help of every
command, bad options, keygen, status against a live daemon with a remote worker,
and a tiny demo."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq.auth

from _daemon_tasks import Daemon, Proc, Worker, cli, env, named, run_cli
from _util import wait_until

# Every option each command must document in its --help (DESIGN.md, issue 4).
# The global options (--version, --log-level) are accepted after every command too.
GLOBAL = ["--version", "--log-level"]
OPTIONS = {
    (): ["--help", *GLOBAL, "demo", "worker", "daemon", "status", "keygen"],
    ("demo",): ["--help", *GLOBAL, "--arrays", "--mib", "--processes"],
    ("worker",): ["--help", *GLOBAL, "--connect", "--processes", "--name", "--config",
                  "--allow-pickle", "--set", "--memory-limit", "--slots"],
    ("daemon",): ["--help", *GLOBAL, "--config", "--set"],
    ("status",): ["--help", *GLOBAL, "--connect", "--timeout", "--json", "--watch", "--count",
                  "--curve-secret-key", "--curve-server-key"],
    ("keygen",): ["--help", *GLOBAL, "directory", "--name", "--force"],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", list(OPTIONS), ids=lambda c: " ".join(c) or "shmrunner")
def test_help_exits_0_and_mentions_every_option(command: tuple[str, ...]) -> None:
    done = run_cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("usage: shmrunner")
    for option in OPTIONS[command]:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", done.stdout), \
            f"{option} not in `shmrunner {' '.join(command)} --help`:\n{done.stdout}"
    # The parser itself has no option the list above forgets.
    found = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][\w-]*)", done.stdout, re.M))
    assert found <= set(OPTIONS[command]), found - set(OPTIONS[command])


# (arguments, what the error line must name)
BAD_OPTIONS = [
    pytest.param(["--bogus", "demo"], "--bogus", id="unknown-global-option"),
    pytest.param(["nosuch"], "nosuch", id="unknown-command"),
    pytest.param([], "COMMAND", id="no-command"),
    pytest.param(["--log-level", "LOUD", "demo"], "--log-level", id="bad-log-level"),
    pytest.param(["demo", "--log-level", "LOUD"], "--log-level", id="bad-log-level-after"),
    pytest.param(["daemon", "--bogus"], "--bogus", id="daemon-unknown-option"),
    pytest.param(["daemon", "--config"], "--config", id="daemon-config-without-value"),
    pytest.param(["worker", "--processes", "0"], "--processes", id="worker-processes-0"),
    pytest.param(["status", "--watch", "0"], "--watch", id="status-watch-0"),
    pytest.param(["status", "--watch", "1", "--count", "0"], "--count", id="status-count-0"),
    pytest.param(["worker", "--processes", "many"], "--processes", id="worker-processes-word"),
    pytest.param(["status", "--connect", "tcp://127.0.0.1:1", "--timeout", "soon"],
                 "--timeout", id="status-bad-timeout"),
    pytest.param(["demo", "--arrays", "x"], "--arrays", id="demo-bad-arrays"),
    pytest.param(["demo", "--mib", "-1"], "--mib", id="demo-negative-mib"),
    pytest.param(["keygen"], "directory", id="keygen-without-directory"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, names", BAD_OPTIONS)
def test_bad_options_exit_2_with_an_error_naming_the_option(args: list[str],
                                                            names: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    last = done.stderr.splitlines()[-1]
    assert re.match(r"shmrunner( \w+)?: error: ", last), last
    assert names in last, f"{names!r} not in {last!r}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [
    ["daemon", "--bogus"], ["worker", "--processes", "0"], ["status", "--timeout", "soon"],
    ["demo", "--arrays", "x"]], ids=["daemon", "worker", "status", "demo"])
def test_bad_options_are_exactly_one_line(args: list[str]) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1, done.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, words", [
    pytest.param(["worker", "--connect", "tcp://127.0.0.1"], ["worker.connect"],
                 id="worker-bad-address"),
    pytest.param(["worker", "--connect", "tcp://127.0.0.1:1", "--config", "/nonexistent.yaml"],
                 ["/nonexistent.yaml"], id="worker-missing-config"),
    pytest.param(["status", "--connect", "tcp://127.0.0.1:1", "--timeout", "0.5",
                  "--curve-secret-key", "/nonexistent"], ["curve_server_key"],
                 id="status-half-curve"),
    pytest.param(["worker", "--set", "worker.processes=0"],
                 ["shmrunner worker: --set worker.processes=0", "whole number from 1 to 4096"],
                 id="worker-set-bad-value"),
    pytest.param(["worker", "--set", "daemon.journal=x"],
                 ["--set daemon.journal=x", "expected worker.KEY=VALUE"],
                 id="worker-set-other-section"),
    pytest.param(["worker", "--set", "worker.join_timeout=-1"], ["worker.join_timeout"],
                 id="worker-set-bad-join-timeout"),
    pytest.param(["status", "--connect", "tcp://127.0.0.1:1", "--timeout", "inf"],
                 ["--timeout", "at most 1,000,000"], id="status-timeout-inf"),
    pytest.param(["jobs", "--connect", "tcp://127.0.0.1:1", "--timeout", "-1"],
                 ["--timeout", "seconds > 0"], id="jobs-timeout-negative"),
    pytest.param(["cancel", "--connect", "tcp://127.0.0.1:1", "--timeout", "nan", "j1"],
                 ["--timeout", "seconds > 0"], id="cancel-timeout-nan"),
    pytest.param(["worker", "--set", "worker.max_message_bytes=99999999999999999999999"],
                 ["worker.max_message_bytes", "at most 2**62"], id="worker-huge-message-bytes"),
    pytest.param(["worker", "--set", "worker.heartbeat_interval=3000000"],
                 ["worker.heartbeat_interval", "at most 1,000,000"], id="worker-huge-heartbeat"),
])
def test_bad_worker_and_status_settings_are_one_line(args: list[str], words: list[str]) -> None:
    done = run_cli(*args, timeout=30)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.timeout(60)
def test_status_without_a_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    from _daemon_tasks import free_port

    done = run_cli("status", "--connect", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "no status" in lines[0], done.stderr


@pytest.mark.timeout(60)
def test_status_without_connect_asks_the_default_socket(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    done = run_cli("status", "--timeout", "0.5")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "no status" in lines[0], done.stderr
    assert f"ipc://{tmp_path}/shmrunner/clients.sock" in lines[0], lines[0]


@pytest.mark.timeout(60)
def test_keygen_writes_a_key_pair_zmq_can_load(tmp_path: Path) -> None:
    keys = tmp_path / "deep" / "keys"
    for name in ("server", "client", "worker"):
        done = run_cli("keygen", str(keys), "--name", name)
        assert done.returncode == 0, done.stderr
        public, secret = keys / f"{name}.key", keys / f"{name}.key_secret"
        assert str(public) in done.stdout and str(secret) in done.stdout
        pub_only = zmq.auth.load_certificate(str(public))
        pair = zmq.auth.load_certificate(str(secret))
        assert pub_only[1] is None and pair[0] == pub_only[0] and pair[1]
        assert secret.stat().st_mode & 0o077 == 0, oct(secret.stat().st_mode)
    assert len({zmq.auth.load_certificate(str(p))[0] for p in keys.glob("*.key")}) == 3


def _keygen_umask0(*args: str) -> subprocess.CompletedProcess[str]:
    """keygen under umask 0: nothing may rely on the umask to hide the secret."""
    return subprocess.run(cli("keygen", *args), env=env(), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0))


@pytest.mark.timeout(60)
def test_keygen_secret_is_0600_even_with_umask_0(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    done = _keygen_umask0(str(keys), "--name", "k")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((keys / "k.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((keys / "k.key").stat().st_mode) == 0o644
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700


@pytest.mark.timeout(60)
def test_keygen_does_not_overwrite_without_force(tmp_path: Path) -> None:
    assert run_cli("keygen", str(tmp_path), "--name", "k").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("k.*")}
    done = run_cli("keygen", str(tmp_path), "--name", "k")
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "--force" in lines[0] and "exists" in lines[0], done.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.glob("k.*")} == before
    done = _keygen_umask0(str(tmp_path), "--name", "k", "--force")
    assert done.returncode == 0, done.stderr
    after = {p.name: p.read_bytes() for p in tmp_path.glob("k.*")}
    assert after.keys() == before.keys() and after["k.key_secret"] != before["k.key_secret"]
    assert stat.S_IMODE((tmp_path / "k.key_secret").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.key_secret"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_keygen_never_writes_through_a_planted_symlink(tmp_path: Path, force: bool) -> None:
    keys, victim = tmp_path / "keys", tmp_path / "victim.txt"
    keys.mkdir(mode=0o700)
    victim.write_text("precious\n")
    os.chmod(victim, 0o644)
    (keys / "k.key_secret").symlink_to(victim)
    done = run_cli("keygen", str(keys), "--name", "k", *(["--force"] if force else []))
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    if force:  # the link itself is replaced by a real, private file
        assert done.returncode == 0, done.stderr
        secret = keys / "k.key_secret"
        assert not secret.is_symlink() and stat.S_IMODE(secret.stat().st_mode) == 0o600
    else:
        assert done.returncode != 0
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert (keys / "k.key_secret").is_symlink() and not (keys / "k.key").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["symlink", "group-writable"])
def test_keygen_refuses_an_unsafe_key_directory(tmp_path: Path, how: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    keys = tmp_path / "keys"
    if how == "symlink":
        keys.symlink_to(real)
    else:
        keys.mkdir()
        os.chmod(keys, 0o770)
    done = run_cli("keygen", str(keys), "--name", "k")
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and str(keys) in lines[0], done.stderr
    assert list(real.iterdir()) == [] and not list(keys.iterdir())


@pytest.mark.timeout(60)
def test_keygen_into_an_impossible_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    done = run_cli("keygen", str(tmp_path / "a-file" / "keys"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    leftovers = d.close()
    assert not leftovers, f"processes outlived the daemon and were killed: {leftovers}"


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(connect: str, name: str) -> Worker:
        w = Worker(tmp_path, connect, name)
        made.append(w)
        return w

    yield make
    leftovers = [pid for w in made for pid in w.stop()]
    assert not leftovers, f"processes outlived their worker agent and were killed: {leftovers}"


@pytest.mark.timeout(90)
def test_status_prints_workers_queue_and_counts(tmp_path: Path, daemon: Daemon,
                                                worker_factory) -> None:
    daemon.start()
    client = daemon.client()
    assert [client.submit("_daemon_tasks:inc", i).result(timeout=30) for i in range(3)] \
        == [1, 2, 3]
    with pytest.raises(Exception, match="status-cli"):
        client.submit("_daemon_tasks:fail", "status-cli").result(timeout=30)
    worker = worker_factory(daemon.workers_address, "cli-worker")
    wait_until(lambda: named(daemon.status(), "cli-worker") is not None, timeout=30,
               message="the remote worker to join")

    done = run_cli("status", "--connect", daemon.address, "--json", timeout=30)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    for key in ("workers", "queued", "running", "done", "failed", "uptime"):
        assert key in status, key
    assert (status["queued"], status["running"], status["done"], status["failed"]) \
        == (0, 0, 3, 1)
    assert status["uptime"] > 0
    (entry,) = status["workers"]
    assert entry["name"] == "cli-worker" and entry["capacity"] == 1 and entry["busy"] == 0
    assert entry["host"] and 0 <= entry["last_heartbeat"] < 1.0

    done = run_cli("status", "--connect", daemon.address, timeout=30)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for word in ("uptime", "queued 0", "running 0", "done 3", "failed 1", "cli-worker",
                 entry["host"], "capacity", "busy", "heartbeat"):
        assert word in text, f"{word!r} not in:\n{text}"
    row = next(line for line in text.splitlines() if "cli-worker" in line)
    assert re.search(r"cli-worker\s+\S+\s+1\s+0\s+\d+\.\d s", row), row
    assert worker.alive()

    # --watch: a fresh table every period (not a terminal here: one after another).
    done = run_cli("status", "--connect", daemon.address, "--watch", "0.3", "--count", "3",
                   timeout=30)
    assert done.returncode == 0, done.stderr
    uptimes = [float(u) for u in re.findall(r"^uptime (\d+) s", done.stdout, re.M)]
    assert len(uptimes) == 3, done.stdout
    assert uptimes == sorted(uptimes), uptimes
    assert done.stdout.count("cli-worker") == 3


@pytest.mark.timeout(120)
def test_demo_runs_prints_a_ratio_and_stops_everything_it_started(tmp_path: Path) -> None:
    demo = Proc(["demo", "--arrays", "2", "--mib", "1", "--processes", "1"],
                tmp_path / "demo.err", stdout=tmp_path / "demo.out")
    try:
        demo.popen.wait(100)
    finally:
        leftovers = demo.stop()
    out, err = demo.stdout.read_text(), demo.text()
    assert demo.popen.returncode == 0, out + err
    assert "Traceback" not in err, err
    assert re.search(r"\d+(\.\d+)?x", out), out  # shmrunner.Pool vs multiprocessing.Pool
    assert "same results" in out, out
    assert "results correct" in out, out  # the daemon + worker + client part
    assert not leftovers, f"the demo left processes behind: {leftovers}\n{out}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["--version"], ["worker", "--version"],
                                  ["daemon", "--set", "x", "--version"]],
                         ids=["global", "after-worker", "after-daemon"])
def test_version(args: list[str]) -> None:
    import shmrunner

    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"shmrunner {shmrunner.__version__}\n" and done.stderr == ""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variable, value, words, commands", [
    ("SHMRUNNER_WORKER__PROCESSES", "0", ["SHMRUNNER_WORKER__PROCESSES", "worker.processes"],
     ["worker"]),
    ("SHMRUNNER_SCHEDULER__MAX_PENDING", "[1", ["SHMRUNNER_SCHEDULER__MAX_PENDING", "YAML"],
     ["daemon"]),
    # A misspelt or unknown variable is an error for every command.
    ("SHMRUNNER_WORKER__PROCESES", "2", ["SHMRUNNER_WORKER__PROCESES", "unknown key"],
     ["worker", "daemon"]),
    ("SHMRUNNER_DAEMON__NOPE", "2", ["SHMRUNNER_DAEMON__NOPE", "unknown key"],
     ["worker", "daemon"]),
    ("SHMRUNNER_SHM_THRESHOLD", "64k", ["SHMRUNNER_SHM_THRESHOLD", "shm_threshold"],
     ["worker", "daemon"]),
])
def test_a_bad_environment_variable_is_one_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
        words: list[str], commands: list[str]) -> None:
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # never this user's real daemon
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    for name in commands:
        command = ["worker", "--connect", "tcp://127.0.0.1:1"] if name == "worker" else [name]
        done = run_cli(*command, timeout=30)
        assert done.returncode == 2, (command, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"shmrunner {command[0]}: "), lines
        for word in words:
            assert word in lines[0], (word, lines[0])


@pytest.mark.timeout(90)
def test_daemon_settings_precedence_file_environment_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """default < --config file < SHMRUNNER_<SECTION>__<KEY> < --set, seen in the
    addresses the daemon prints once it serves."""
    from _daemon_tasks import READY, free_port

    a, b, c, d, e = (f"tcp://127.0.0.1:{free_port()}" for _ in range(5))
    config = tmp_path / "daemon.yaml"
    config.write_text(f"daemon:\n  clients: {a}\n  workers: {b}\n  allow_unauthenticated: true\n"
                      f"  journal: {tmp_path / 'journal.sqlite'}\n"
                      "scheduler:\n  local_workers: 1\n")
    monkeypatch.setenv("SHMRUNNER_DAEMON__CLIENTS", c)
    monkeypatch.setenv("SHMRUNNER_DAEMON__WORKERS", d)
    daemon = Proc(["daemon", "--config", str(config), "--set", f"daemon.workers={e}",
                   "--log-level", "WARNING"], tmp_path / "daemon.err")
    try:
        wait_until(lambda: READY in daemon.text() or not daemon.alive(), timeout=30,
                   message="the daemon's ready line")
        line = next(line for line in daemon.text().splitlines() if READY in line)
        # the environment beat the file; --set beat the environment
        assert line == f"{READY}{c}, workers on {e}", line
    finally:
        leftovers = daemon.stop()
    assert daemon.popen.returncode == 0, daemon.text()
    assert not leftovers, leftovers


@pytest.mark.timeout(60)
def test_a_worker_connecting_over_tcp_without_curve_says_what_that_opens(
        tmp_path: Path) -> None:
    from _daemon_tasks import free_port

    address = f"tcp://127.0.0.1:{free_port()}"  # nobody answers: it retries meanwhile
    worker = Proc(["worker", "--connect", address, "--processes", "1"], tmp_path / "worker.err")
    try:
        wait_until(lambda: "without CURVE" in worker.text() or not worker.alive(), timeout=30,
                   message="the worker's warning")
        line = next(line for line in worker.text().splitlines() if "without CURVE" in line)
        assert address in line and "worker.curve_server_key" in line
    finally:
        assert worker.stop() == []
