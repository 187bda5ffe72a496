"""Settings: ``shmrunner.config.load``/``parse`` and the ``shmrunner worker`` CLI.

Every bad configuration must end in one :class:`ConfigError` line that names
the file, the key and what was expected; the defaults are what the docs say;
the CLI turns bad options into one clear line on stderr and a non-zero exit.

Some of these tests found bugs, since fixed; they stay as regression tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from shmrunner import ConfigError
from shmrunner.config import SchedulerSettings, Settings, WorkerSettings, load, parse, resolve

pytestmark = pytest.mark.timeout(60)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)



def write(tmp_path: Path, text: str, name: str = "settings.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    """The one-line message of the ConfigError that loading ``path`` raises."""
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    assert isinstance(info.value, ValueError)
    return message


# --- error cases ---------------------------------------------------------------------------


def test_unknown_key(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "scheduler:\n  retires: 2\n"))
    assert "scheduler.retires" in msg and "unknown key" in msg
    assert "retries" in msg  # the keys it could have meant
    msg = config_error(write(tmp_path, "worker:\n  conect: tcp://127.0.0.1:5560\n"))
    assert "worker.conect" in msg and "connect" in msg


def test_unknown_section(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "schedulers:\n  retries: 2\n"))
    assert "schedulers" in msg and "unknown section" in msg
    assert "scheduler" in msg and "worker" in msg


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("scheduler:\n  retries: many\n", "scheduler.retries", "whole number >= 0"),
    ("scheduler:\n  retries: -1\n", "scheduler.retries", "whole number >= 0"),
    ("scheduler:\n  retries: 1.5\n", "scheduler.retries", "whole number >= 0"),
    ("scheduler:\n  retries: true\n", "scheduler.retries", "whole number >= 0"),
    ("scheduler:\n  local_workers: [1]\n", "scheduler.local_workers", "whole number >= 0"),
    ("scheduler:\n  timeout: 0\n", "scheduler.timeout", "seconds > 0"),
    ("scheduler:\n  timeout: soon\n", "scheduler.timeout", "seconds > 0"),
    ("scheduler:\n  heartbeat_interval: .nan\n", "scheduler.heartbeat_interval",
     "seconds > 0"),
    ("scheduler:\n  allow_pickle: maybe\n", "scheduler.allow_pickle", "true or false"),
    ("scheduler:\n  max_pending: 0\n", "scheduler.max_pending", "whole number >= 1"),
    ("scheduler:\n  start_method: thread\n", "scheduler.start_method", "fork, spawn"),
    ("worker:\n  processes: two\n", "worker.processes", "whole number"),
    ("worker:\n  name: ''\n", "worker.name", "short name"),
    # Bounded: past these a value overflowed a C integer deep in a thread (the hub's
    # poll, the timer's wait, a ZeroMQ option) instead of being refused here.
    ("scheduler:\n  heartbeat_interval: 3000000\n  heartbeat_timeout: 6000000\n",
     "scheduler.heartbeat_interval", "at most 1,000,000"),
    ("scheduler:\n  heartbeat_timeout: .inf\n", "scheduler.heartbeat_timeout",
     "at most 1,000,000"),
    ("scheduler:\n  timeout: 10000000000\n", "scheduler.timeout", "at most 1,000,000"),
    ("scheduler:\n  retry_backoff: .inf\n", "scheduler.retry_backoff", "1,000,000"),
    ("scheduler:\n  max_message_bytes: 99999999999999999999999\n",
     "scheduler.max_message_bytes", "at most 2**62"),
    ("worker:\n  heartbeat_interval: 3000000\n", "worker.heartbeat_interval",
     "at most 1,000,000"),
    ("daemon:\n  result_ttl: .inf\n", "daemon.result_ttl", "at most 1,000,000,000"),
    # A bare name is a builtin's: any other could never match a raised exception.
    ("scheduler:\n  retry_on: [Flaky]\n", "scheduler.retry_on", "a builtin's"),
])
def test_wrong_type_or_range(tmp_path: Path, text: str, key: str, expected: str) -> None:
    msg = config_error(write(tmp_path, text))
    assert key in msg and "expected" in msg and expected in msg, msg


@pytest.mark.parametrize(("section", "key", "value"), [
    ("scheduler", "listen", "http://127.0.0.1:5560"),
    ("scheduler", "listen", "tcp://127.0.0.1"),
    ("scheduler", "listen", "tcp://127.0.0.1:port"),
    ("scheduler", "listen", "127.0.0.1:5560"),
    ("scheduler", "listen", "5560"),
    ("worker", "connect", "tcp://:5560"),
    ("worker", "connect", "udp://127.0.0.1:5560"),
])
def test_bad_address(tmp_path: Path, section: str, key: str, value: str) -> None:
    msg = config_error(write(tmp_path, f"{section}:\n  {key}: '{value}'\n"))
    assert f"{section}.{key}" in msg and "ZeroMQ address" in msg and value in msg, msg


@pytest.mark.parametrize("value", ["tcp://127.0.0.1:5560", "tcp://*:5560", "tcp://127.0.0.1:*",
                                   "tcp://host-name.example:1", "tcp://[::1]:5560",
                                   "ipc:///tmp/shmrunner.sock"])
def test_good_addresses(tmp_path: Path, value: str) -> None:
    assert load(write(tmp_path, f"scheduler:\n  listen: '{value}'\n")).scheduler.listen == value


@pytest.mark.parametrize(("interval", "timeout"), [(1.0, 1.0), (2, 1), (0.5, 0.1)])
def test_heartbeat_timeout_must_exceed_interval(tmp_path: Path, interval: float,
                                                timeout: float) -> None:
    msg = config_error(write(tmp_path, f"scheduler:\n  heartbeat_interval: {interval}\n"
                                       f"  heartbeat_timeout: {timeout}\n"))
    assert "scheduler.heartbeat_timeout" in msg and "scheduler.heartbeat_interval" in msg
    assert "larger" in msg


def test_not_yaml(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "scheduler:\n  retries: [1, 2\n  timeout: 3\n"))
    assert "not valid YAML" in msg and "line" in msg
    msg = config_error(write(tmp_path, "scheduler: {retries: 1\n", "b.yaml"))
    assert "not valid YAML" in msg
    msg = config_error(write(tmp_path, "\tscheduler:\n", "tab.yaml"))
    assert "not valid YAML" in msg


def test_a_key_given_twice_is_an_error_not_the_last_one_winning(tmp_path: Path) -> None:
    # Two scheduler blocks once dropped the first one's allow-list without a word.
    msg = config_error(write(tmp_path, "scheduler:\n  allowed_functions: ['mypkg.safe']\n"
                                       "daemon:\n  result_ttl: 60\n"
                                       "scheduler:\n  retries: 0\n"))
    assert "line 5" in msg and "duplicate key 'scheduler' (first at line 1)" in msg, msg
    msg = config_error(write(tmp_path, "scheduler:\n  retries: 1\n  retries: 2\n", "k.yaml"))
    assert "duplicate key 'retries'" in msg, msg
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        resolve(sets=["scheduler.allowed_functions={a: 1, a: 2}"], sections=("scheduler",),
                environ={})
    # A month of results is fine: nothing waits on result_ttl.
    assert load(write(tmp_path, "daemon:\n  result_ttl: 2592000\n", "t.yaml")
                ).daemon.result_ttl == 2592000
    # YAML merge keys may still be overridden.
    merged = load(write(tmp_path, "scheduler:\n  <<: {retries: 1, timeout: 5}\n  retries: 2\n",
                        "m.yaml"))
    assert (merged.scheduler.retries, merged.scheduler.timeout) == (2, 5)


def test_binary_file_is_one_config_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01scheduler: \xe9\n")
    msg = config_error(path)
    assert "UTF-8" in msg or "YAML" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    msg = config_error(path)
    assert "cannot read" in msg and "No such file" in msg
    msg = config_error(tmp_path)  # a directory
    assert "cannot read" in msg


@pytest.mark.parametrize(("text", "got"), [("- scheduler\n- worker\n", "list"),
                                           ("42\n", "int"), ("just words\n", "str")])
def test_top_level_not_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    msg = config_error(write(tmp_path, text))
    assert "top level must be a mapping" in msg and got in msg
    assert "scheduler" in msg and "worker" in msg


def test_section_not_a_mapping(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "scheduler: 3\n"))
    assert msg.startswith(f"{tmp_path / 'settings.yaml'}: scheduler:")
    assert "expected a mapping" in msg
    msg = config_error(write(tmp_path, "worker:\n  - processes: 2\n"))
    assert "worker" in msg and "expected a mapping" in msg


def test_parse_names_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^inline: scheduler\.retries: expected"):
        parse({"scheduler": {"retries": "x"}}, "inline")
    with pytest.raises(ConfigError, match=r"^<config>: nope: unknown section"):
        parse({"nope": {}})


def test_worker_processes_zero_is_refused(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "worker:\n  processes: 0\n"))
    assert "worker.processes" in msg


def test_worker_processes_past_what_a_scheduler_can_use_are_refused(tmp_path: Path) -> None:
    # A scheduler gives one worker at most 4096 tasks at once: more processes
    # could never run one, and were all forked before the scheduler was reached.
    msg = config_error(write(tmp_path, "worker:\n  processes: 5000\n"))
    assert "worker.processes" in msg and "4096" in msg
    with pytest.raises(ConfigError, match=r"worker\.processes.*4096"):
        resolve(sets=["worker.processes=4097"])
    assert resolve(sets=["worker.processes=4096"]).worker.processes == 4096


# --- defaults ------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "scheduler:\n", "scheduler:\nworker:\n"):
        settings = load(write(tmp_path, text))
        assert settings == Settings()
    s = SchedulerSettings()
    assert s.local_workers is None and s.listen is None
    assert s.retries == 0 and s.timeout is None
    assert s.heartbeat_interval == 1.0 and s.heartbeat_timeout == 5.0
    assert s.heartbeat_timeout > s.heartbeat_interval
    assert s.allow_pickle is False
    assert s.shm_threshold == 64 * 1024
    assert s.max_pending == 100_000
    assert s.prefetch >= 0 and s.max_message_bytes >= 1 << 20
    assert s.start_method is None
    w = WorkerSettings()
    assert w.connect is None and w.processes is None and w.name is None
    assert w.allow_pickle is False
    assert w.heartbeat_timeout > w.heartbeat_interval
    # Every field of both sections has a default and documentation.
    for cls in (SchedulerSettings, WorkerSettings):
        for f in fields(cls):
            assert f.metadata["doc"], f.name


def test_values_are_read(tmp_path: Path) -> None:
    settings = load(write(tmp_path, (
        "scheduler:\n  local_workers: 3\n  listen: tcp://127.0.0.1:5560\n  retries: 2\n"
        "  timeout: 1.5\n  heartbeat_interval: 0.2\n  heartbeat_timeout: 1\n"
        "  allow_pickle: true\n  max_pending: 10\n  start_method: spawn\n"
        "worker:\n  connect: tcp://10.0.0.1:5560\n  processes: 4\n  name: box\n")))
    s, w = settings.scheduler, settings.worker
    assert (s.local_workers, s.listen, s.retries, s.timeout) == (3, "tcp://127.0.0.1:5560", 2,
                                                                 1.5)
    assert (s.heartbeat_interval, s.heartbeat_timeout) == (0.2, 1)
    assert s.allow_pickle is True and s.max_pending == 10 and s.start_method == "spawn"
    assert (w.connect, w.processes, w.name) == ("tcp://10.0.0.1:5560", 4, "box")
    # Unset keys keep their defaults.
    assert s.shm_threshold == SchedulerSettings().shm_threshold


def test_settings_are_frozen_and_validated_in_python_too() -> None:
    s = SchedulerSettings()
    with pytest.raises(AttributeError):
        s.retries = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="scheduler.retries"):
        SchedulerSettings(retries=-2)
    with pytest.raises(ConfigError, match="scheduler.heartbeat_timeout"):
        SchedulerSettings(heartbeat_interval=2.0, heartbeat_timeout=1.0)


# --- the CLI -------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                  else []))
    return subprocess.run([sys.executable, "-m", "shmrunner.cli", *args], capture_output=True,
                          text=True, timeout=30, cwd=REPO, env=env, stdin=subprocess.DEVNULL)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line of stderr that says what is wrong (argparse adds its usage)."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_worker_without_connect_uses_the_default_socket_only_in_a_private_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without --connect the worker goes to the same-host daemon's socket, in the
    # runtime directory; one that others could enter is refused, not used.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "shmrunner").mkdir(mode=0o700)
    os.chmod(tmp_path / "shmrunner", 0o770)
    proc = run_cli("worker", "--processes", "1")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1  # one line, nothing else
    line = error_line(proc)
    assert str(tmp_path / "shmrunner") in line and "chmod 700" in line, line


@pytest.mark.parametrize(("args", "names"), [
    (["worker", "--connect", "tcp://127.0.0.1:5560", "--processes", "0"], "--processes"),
    (["worker", "--connect", "tcp://127.0.0.1:5560", "--processes", "many"], "--processes"),
    (["worker", "--connect", "tcp://127.0.0.1:5560", "--bogus"], "--bogus"),
    (["worker", "--connect"], "--connect"),
    (["--log-level", "LOUD", "worker", "--connect", "tcp://127.0.0.1:5560"], "--log-level"),
])
def test_worker_bad_option(args: list[str], names: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "error" in line and names in line, line


def test_worker_bad_address() -> None:
    proc = run_cli("worker", "--connect", "localhost:5560", "--processes", "1")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    line = error_line(proc)
    assert "worker.connect" in line and "localhost:5560" in line and "ZeroMQ address" in line


def test_worker_bad_config_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "worker:\n  processes: lots\n")
    proc = run_cli("worker", "--config", str(bad), "--connect", "tcp://127.0.0.1:5560")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    line = error_line(proc)
    assert str(bad) in line and "worker.processes" in line and "expected" in line
    missing = tmp_path / "missing.yaml"
    proc = run_cli("worker", "--config", str(missing), "--connect", "tcp://127.0.0.1:5560")
    assert proc.returncode == 2
    line = error_line(proc)
    assert str(missing) in line and "cannot read" in line


def test_worker_help_lists_every_option() -> None:
    proc = run_cli("worker", "--help")
    assert proc.returncode == 0
    for option in ("--connect", "--processes", "--name", "--config", "--allow-pickle"):
        assert option in proc.stdout


# --- security settings -----------------------------------------------------------------------


def test_allowed_functions(tmp_path: Path) -> None:
    settings = load(write(tmp_path, "scheduler:\n  allowed_functions: [mypkg.jobs, 'a.*:run_*']\n"
                                    "worker:\n  allowed_functions: [math]\n"))
    assert settings.scheduler.allowed_functions == ("mypkg.jobs", "a.*:run_*")
    assert settings.worker.allowed_functions == ("math",)
    assert SchedulerSettings().allowed_functions is None  # default: any function
    for bad in ("mypkg", "['a b']", "['m:f:g']", "[1]", "['']", "[os.system; rm]"):
        msg = config_error(write(tmp_path, f"scheduler:\n  allowed_functions: {bad}\n"))
        assert "scheduler.allowed_functions" in msg and "patterns" in msg, msg
    msg = config_error(write(tmp_path, "worker:\n  allowed_functions: [m]\n"
                                       "  allow_pickle: true\n"))
    assert "worker.allowed_functions" in msg and "allow_pickle" in msg


def test_the_old_authorized_keys_setting_says_what_replaced_it(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, f"daemon:\n  curve_authorized_keys: {tmp_path}\n"))
    assert "daemon.curve_authorized_keys" in msg
    assert "curve_authorized_clients" in msg and "curve_authorized_workers" in msg
    from shmrunner.config import DaemonSettings, with_overrides

    with pytest.raises(ConfigError, match="curve_authorized_clients"):
        with_overrides(DaemonSettings(), {"curve_authorized_keys": str(tmp_path)}, "daemon")


def test_curve_needs_both_authorised_directories(tmp_path: Path) -> None:
    (tmp_path / "d.key_secret").write_text("")
    msg = config_error(write(tmp_path, f"daemon:\n  curve_secret_key: {tmp_path}/d.key_secret\n"
                                       f"  curve_authorized_clients: {tmp_path}\n"))
    assert "daemon.curve_authorized_workers" in msg and "missing" in msg
    msg = config_error(write(tmp_path, f"daemon:\n  curve_authorized_workers: {tmp_path}\n"))
    assert "daemon.curve_secret_key" in msg


def test_default_addresses_are_resolved_from_the_environment_when_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shmrunner.config import DaemonSettings

    settings = DaemonSettings()
    assert settings.clients is None and settings.workers is None
    assert settings.allow_unauthenticated is False
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert settings.clients_address() == f"ipc://{tmp_path}/run/shmrunner/clients.sock"
    assert settings.workers_address() == f"ipc://{tmp_path}/run/shmrunner/workers.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert settings.clients_address() == f"ipc://{tmp_path}/state/shmrunner/clients.sock"
    assert DaemonSettings(clients="tcp://10.0.0.1:5560").clients_address() \
        == "tcp://10.0.0.1:5560"


# --- resolve: defaults < file < environment < --set ------------------------------------------


def test_precedence_default_file_environment_set(tmp_path: Path) -> None:
    from shmrunner.config import resolve

    path = write(tmp_path, "scheduler:\n  max_pending: 5\n  retries: 1\n  prefetch: 2\n")
    env = {"SHMRUNNER_SCHEDULER__MAX_PENDING": "10", "SHMRUNNER_SCHEDULER__RETRIES": "3"}
    s = resolve(path, environ=env, sets=["scheduler.max_pending=20"]).scheduler
    assert s.max_pending == 20  # --set beats the environment and the file
    assert s.retries == 3       # the environment beats the file
    assert s.prefetch == 2      # the file beats the default
    assert s.timeout is None    # the default
    assert resolve(path, environ=env).scheduler.max_pending == 10
    assert resolve(path, environ={}).scheduler.max_pending == 5
    assert resolve(environ={}).scheduler.max_pending == SchedulerSettings().max_pending


def test_environment_values_are_yaml_and_validated_like_the_file(tmp_path: Path) -> None:
    from shmrunner.config import resolve

    env = {"SHMRUNNER_DAEMON__CLIENTS": "ipc:///tmp/x/clients.sock",
           "SHMRUNNER_DAEMON__ALLOW_UNAUTHENTICATED": "true",
           "SHMRUNNER_SCHEDULER__TIMEOUT": "1.5",
           "SHMRUNNER_SCHEDULER__LOCAL_WORKERS": "null",
           "SHMRUNNER_WORKER__ALLOWED_FUNCTIONS": "[mypkg.jobs, 'a:b_*']"}
    settings = resolve(environ=env)
    assert settings.daemon.clients == "ipc:///tmp/x/clients.sock"
    assert settings.daemon.allow_unauthenticated is True
    assert settings.scheduler.timeout == 1.5 and settings.scheduler.local_workers is None
    assert settings.worker.allowed_functions == ("mypkg.jobs", "a:b_*")
    for name, value, words in [
        ("SHMRUNNER_SCHEDULER__MAX_PENDING", "0", ["scheduler.max_pending", "whole number"]),
        ("SHMRUNNER_SCHEDULER__TIMEOUT", "soon", ["scheduler.timeout", "'soon'"]),
        ("SHMRUNNER_DAEMON__CLIENTS", "localhost:1", ["daemon.clients", "ZeroMQ address"]),
        ("SHMRUNNER_SCHEDULER__RETRIES", "[1", ["not valid YAML"]),
        ("SHMRUNNER_SCHEDULER__HEARTBEAT_INTERVAL", "9", ["scheduler.heartbeat_timeout"]),
        ("SHMRUNNER_SCHEDULER__MAX_PENDNG", "3", ["scheduler.max_pendng", "unknown key",
                                                  "max_pending"]),
        ("SHMRUNNER_SCHEDULR__RETRIES", "3", ["schedulr", "unknown section"]),
        ("SHMRUNNER_DAEMON__CURVE_AUTHORIZED_KEYS", "/tmp", ["curve_authorized_clients"]),
    ]:
        with pytest.raises(ConfigError) as info:
            resolve(environ={name: value})
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"environment variable {name}: "), \
            message
        for word in words:
            assert word in message, (word, message)


def test_only_the_sections_a_command_reads_take_overrides(tmp_path: Path) -> None:
    from shmrunner.config import resolve

    # A worker host may carry the daemon's variables; their names are still checked.
    env = {"SHMRUNNER_DAEMON__CURVE_SECRET_KEY": str(tmp_path / "absent"),
           "SHMRUNNER_WORKER__PROCESSES": "3"}
    settings = resolve(environ=env, sections=("worker",))
    assert settings.worker.processes == 3 and settings.daemon.curve_secret_key is None
    with pytest.raises(ConfigError, match="daemon.curve_secret_key"):
        resolve(environ=env, sections=("daemon",))
    with pytest.raises(ConfigError, match=r"^--set daemon\.journal=x: expected worker\.KEY"):
        resolve(sections=("worker",), sets=["daemon.journal=x"], environ={})
    with pytest.raises(ConfigError, match="SHMRUNNER_DAEMON__NOPE"):
        resolve(environ={"SHMRUNNER_DAEMON__NOPE": "1"}, sections=("worker",))


def test_the_environment_is_read_when_resolved_never_at_import(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from shmrunner.config import resolve

    monkeypatch.setenv("SHMRUNNER_WORKER__NAME", "from-env")
    assert resolve().worker.name == "from-env"
    monkeypatch.setenv("SHMRUNNER_WORKER__NAME", "changed")
    assert resolve().worker.name == "changed"
    # Other SHMRUNNER_ variables without a section are not settings: left alone.
    monkeypatch.setenv("SHMRUNNER_FUZZ_MESSAGES", "10")
    assert resolve().worker.name == "changed"
    # Importing the package reads no setting.
    code = ("import shmrunner, shmrunner.config, shmrunner.cli; print('ok')")
    env = {**os.environ, "SHMRUNNER_SCHEDULER__NOPE": "1", "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_shm_threshold_variable_is_an_alias_below_the_sections_own(tmp_path: Path) -> None:
    from shmrunner.config import resolve

    s = resolve(environ={"SHMRUNNER_SHM_THRESHOLD": "1024"})
    assert s.scheduler.shm_threshold == 1024 and s.worker.shm_threshold == 1024
    s = resolve(environ={"SHMRUNNER_SHM_THRESHOLD": "1024",
                         "SHMRUNNER_WORKER__SHM_THRESHOLD": "2048"},
                sets=["scheduler.shm_threshold=4096"])
    assert (s.scheduler.shm_threshold, s.worker.shm_threshold) == (4096, 2048)
    assert resolve(environ={"SHMRUNNER_SHM_THRESHOLD": ""}) == Settings()  # empty: unset
    with pytest.raises(ConfigError, match=r"^environment variable SHMRUNNER_SHM_THRESHOLD: "
                                          r"scheduler\.shm_threshold: expected"):
        resolve(environ={"SHMRUNNER_SHM_THRESHOLD": "64k"})


def test_set_assignments(tmp_path: Path) -> None:
    from shmrunner.config import resolve

    s = resolve(sets=["worker.processes=2", "worker.name=box", "worker.processes=4"],
                sections=("worker",), environ={})
    assert (s.worker.processes, s.worker.name) == (4, "box")  # the last one wins
    for bad, words in [("worker.processes=0", ["--set worker.processes=0",
                                               "worker.processes", "whole number"]),
                       ("worker.procs=2", ["worker.procs", "unknown key", "processes"]),
                       ("worker.processes", ["expected worker.KEY=VALUE"]),
                       ("processes=2", ["expected worker.KEY=VALUE"]),
                       ("worker.name=[x", ["not valid YAML"])]:
        with pytest.raises(ConfigError) as info:
            resolve(sets=[bad], sections=("worker",), environ={})
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_a_nul_in_the_config_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load("settings\0.yaml")
