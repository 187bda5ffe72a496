"""The public surface: ``shmrunner.__all__`` is pinned, imports are side-effect
free, and the error hierarchy is the one DESIGN.md promises."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import warnings

import pytest

import shmrunner
from shmrunner import errors

# DESIGN.md "Public API (names fixed)".
DESIGN_NAMES = {
    "Pool", "empty", "zeros", "share", "is_shared", "Scheduler", "connect",
    "ShmrunnerError", "WorkerLostError", "TaskTimeoutError", "ProtocolError", "ConfigError",
}

# Pinned: adding or removing a public name means updating this list on purpose.
EXPECTED_ALL = sorted([
    # local tier
    "Pool",
    # local and remote workers
    "Scheduler",
    # the runner daemon's client
    "connect", "Client",
    # shared arrays
    "empty", "zeros", "share", "is_shared", "set_shm_cache", "shm_cache_info",
    # errors and warnings
    "ShmrunnerError", "WorkerLostError", "MemoryLimitError", "TaskTimeoutError",
    "TaskCancelledError", "DependencyError",
    "InitializerError", "SharedMemoryError", "ProtocolError", "ConfigError",
    "ChannelError", "ChannelClosedError", "RemoteTaskError", "FunctionNotAllowedError",
    "SchedulerBusyError", "SharedMemoryUnavailableWarning",
])

ERRORS = [
    shmrunner.ShmrunnerError, shmrunner.WorkerLostError, shmrunner.TaskTimeoutError,
    shmrunner.TaskCancelledError, shmrunner.DependencyError, shmrunner.InitializerError,
    shmrunner.SharedMemoryError,
    shmrunner.ProtocolError, shmrunner.ConfigError, shmrunner.ChannelError,
    shmrunner.ChannelClosedError, shmrunner.RemoteTaskError, shmrunner.FunctionNotAllowedError,
    shmrunner.MemoryLimitError, shmrunner.SchedulerBusyError,
]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


def test_all_is_pinned() -> None:
    assert sorted(shmrunner.__all__) == EXPECTED_ALL
    assert len(set(shmrunner.__all__)) == len(shmrunner.__all__)  # no duplicates


def test_every_name_in_all_resolves() -> None:
    for name in shmrunner.__all__:
        assert getattr(shmrunner, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from shmrunner import *", namespace)  # noqa: S102
    assert sorted(k for k in namespace if k != "__builtins__") == EXPECTED_ALL


def test_design_names_that_exist_are_exported() -> None:
    present = {name for name in DESIGN_NAMES if hasattr(shmrunner, name)}
    assert present <= set(shmrunner.__all__)
    assert DESIGN_NAMES == present


def test_no_stray_public_attributes() -> None:
    # Only the pinned names, __version__ and the subpackages imports create.
    public = {n for n, v in vars(shmrunner).items()
              if not n.startswith("_") and type(v).__module__ != "__future__"}
    modules = {n for n in public if type(getattr(shmrunner, n)) is type(os)}
    assert public - modules == set(EXPECTED_ALL)
    assert isinstance(shmrunner.__version__, str) and shmrunner.__version__


def test_exported_errors_are_the_errors_module_classes() -> None:
    for cls in ERRORS:
        assert getattr(errors, cls.__name__) is cls
        assert cls.__name__ in errors.__all__


_IMPORT_PROBE = """
import json, sys, threading
sys.path.insert(0, {tests!r})
from _util import children, shm_segments
threads_before = threading.active_count()
import shmrunner
import shmrunner.transport.pickling, shmrunner.transport.fdchannel, shmrunner.worker.lifecycle
import multiprocessing
print(json.dumps({{
    "threads_before": threads_before,
    "threads": [t.name for t in threading.enumerate()],
    "children": children(),
    "mp_children": len(multiprocessing.active_children()),
    "segments": shm_segments(),
}}))
"""


def test_import_starts_no_thread_and_no_process() -> None:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE.format(tests=TESTS_DIR)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["threads_before"] == 1
    assert report["threads"] == ["MainThread"]
    assert report["children"] == []
    assert report["mp_children"] == 0
    assert report["segments"] == []


# --- the error hierarchy --------------------------------------------------------------


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_subclasses_shmrunner_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, shmrunner.ShmrunnerError)
    assert issubclass(cls, Exception)
    assert cls.__doc__, f"{cls.__name__} has no docstring"


def test_every_exported_exception_is_a_shmrunner_error_or_a_warning() -> None:
    for name in shmrunner.__all__:
        obj = getattr(shmrunner, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, (shmrunner.ShmrunnerError, Warning)), name


def test_errors_that_match_a_standard_meaning_inherit_it() -> None:
    assert issubclass(shmrunner.TaskTimeoutError, TimeoutError)
    assert issubclass(shmrunner.ConfigError, ValueError)
    assert issubclass(shmrunner.SharedMemoryError, MemoryError)
    # Callers can catch them either way.
    with pytest.raises(TimeoutError):
        raise shmrunner.TaskTimeoutError("slow")
    with pytest.raises(shmrunner.ShmrunnerError):
        raise shmrunner.ConfigError("workers: must be positive")


def test_shared_memory_warning_is_a_runtime_warning() -> None:
    assert issubclass(shmrunner.SharedMemoryUnavailableWarning, RuntimeWarning)
    with pytest.warns(shmrunner.SharedMemoryUnavailableWarning):
        warnings.warn("x", shmrunner.SharedMemoryUnavailableWarning, stacklevel=1)


# (MemoryLimitError carries its evidence, as WorkerLostError: tests/test_memory_limit.py)
@pytest.mark.parametrize("cls", [c for c in ERRORS[2:] if c not in (
                             shmrunner.RemoteTaskError, shmrunner.MemoryLimitError)],
                         ids=lambda c: c.__name__)
def test_plain_errors_survive_pickling(cls: type[BaseException]) -> None:
    err = cls("something went wrong: key 'x'")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err)


def test_remote_task_error_carries_the_remote_type_and_survives_pickling() -> None:
    err = shmrunner.RemoteTaskError("mymod:Boom", "x went wrong", "Traceback ...", [1])
    back = pickle.loads(pickle.dumps(err))
    assert (back.type_name, back.message, back.traceback, back.remote_args) == (
        "mymod:Boom", "x went wrong", "Traceback ...", [1])
    assert str(back) == "mymod:Boom: x went wrong"


def test_worker_lost_error_carries_its_evidence() -> None:
    err = shmrunner.WorkerLostError(1234, -9, "7 (f)")
    assert (err.pid, err.exitcode, err.task) == (1234, -9, "7 (f)")
    assert err.signal == signal.SIGKILL == 9
    text = str(err)
    assert "\n" not in text
    assert "1234" in text and "SIGKILL" in text and "7 (f)" in text

    back = pickle.loads(pickle.dumps(err))
    assert type(back) is shmrunner.WorkerLostError
    assert (back.pid, back.exitcode, back.task, back.signal) == (1234, -9, "7 (f)", 9)
    assert str(back) == text


@pytest.mark.parametrize("exitcode, signal_, words", [
    (3, None, ["1234", "code 3"]),
    (0, None, ["1234", "code 0"]),
    (None, None, ["1234"]),
    (-15, 15, ["1234", "SIGTERM"]),
    (-200, 200, ["1234", "200"]),  # not a known signal: still named by number
])
def test_worker_lost_error_other_exits(exitcode: int | None, signal_: int | None,
                                       words: list[str]) -> None:
    err = shmrunner.WorkerLostError(1234, exitcode)
    assert err.signal == signal_
    text = str(err)
    assert "\n" not in text
    for word in words:
        assert word in text
    assert str(pickle.loads(pickle.dumps(err))) == text
