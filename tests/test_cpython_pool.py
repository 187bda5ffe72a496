"""CPython's own Pool tests, run against ``shmrunner.Pool`` (the drop-in's yardstick).

The test bodies are CPython's: ``_TestPool``, ``_TestPoolWorkerErrors`` and
``_TestPoolWorkerLifetime`` from ``test._test_multiprocessing`` (shipped with
the interpreter). They are mixed, as CPython's ``install_tests_in_module_dict``
does, with a mixin modelled on its ``ProcessesMixin`` whose ``Pool`` is
``shmrunner.Pool`` bound to one start method, once per start method:
``TestPoolFork``, ``TestPoolSpawn``, ``TestPoolForkserver``, and the same for
``TestPoolWorkerErrors*`` and ``TestPoolWorkerLifetime*``.

The last two call ``multiprocessing.Pool(...)`` directly; for the duration of
each of their tests ``multiprocessing.Pool`` is patched to the same
context-bound ``shmrunner.Pool`` (restored by ``addCleanup``).

CPython's ``setUpModule`` (which sets the global start method and forkserver
preloads) is deliberately not installed: the start method reaches the pool
through ``context=``, so nothing global changes.

Classes are created at import time under fixed names in this module, so a
spawn or forkserver worker that unpickles a classmethod of a test class by
reference (``test_traceback``) finds the same class by importing this module.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
import unittest
import unittest.mock

import pytest

import shmrunner

try:
    # Import-time requirements of CPython's test module: the ``test`` package
    # (some distributions strip it), ``_multiprocessing``, a working SemLock
    # (it creates and unlinks one POSIX semaphore), and no ASAN fork bug. It
    # signals the last three with unittest.SkipTest.
    import test._test_multiprocessing as _mp
except unittest.SkipTest as exc:  # pragma: no cover - depends on the interpreter build
    pytest.skip(f"CPython's multiprocessing tests refuse to run here: {exc}",
                allow_module_level=True)
except ImportError as exc:  # pragma: no cover
    pytest.skip(f"CPython's test package is not installed ({exc}); "
                "install the interpreter's test suite to run the yardstick",
                allow_module_level=True)

START_METHODS = ("fork", "spawn", "forkserver")

# Generous next to the time each test takes (under 3 s), small next to the
# 120 s default: a hang is reported quickly with a stack dump.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", autouse=True)
def resource_tracker_started():
    """multiprocessing's resource tracker is started by the first spawn or
    forkserver process and then serves the whole session, like the forkserver
    (which conftest's no-leak check exempts). Start it before any test's
    no-leak snapshot, so the first test to use spawn is not blamed for it."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


class ShmrunnerMixin(_mp.ProcessesMixin):
    """``ProcessesMixin`` with ``shmrunner.Pool`` bound to ``START_METHOD``."""

    START_METHOD: str = "fork"

    @classmethod
    def Pool(cls, *args, **kwargs):  # noqa: N802 (the attribute CPython's tests call)
        kwargs.setdefault("context", multiprocessing.get_context(cls.START_METHOD))
        return shmrunner.Pool(*args, **kwargs)

    def test_yardstick_runs_shmrunner(self):
        # Guard against the port silently testing multiprocessing's own Pool:
        # what the tests call is shmrunner's, and its workers use START_METHOD.
        makers = [self.Pool]
        if isinstance(self, PatchedMultiprocessingPool):
            makers.append(multiprocessing.Pool)
        for make in makers:
            p = make(1)
            try:
                self.assertIsInstance(p, shmrunner.Pool)
                [worker] = p._pool
                self.assertIsInstance(worker,
                                      multiprocessing.get_context(self.START_METHOD).Process)
            finally:
                p.terminate()
                p.join()


class PatchedMultiprocessingPool:
    """For tests that call ``multiprocessing.Pool`` by name: route the call to
    ``shmrunner.Pool`` during each test only."""

    def setUp(self):
        super().setUp()
        patcher = unittest.mock.patch.object(multiprocessing, "Pool", self.Pool)
        patcher.start()
        self.addCleanup(patcher.stop)


class ShmrunnerWorkerLifetime(_mp._TestPoolWorkerLifetime):
    """``_TestPoolWorkerLifetime`` with its child-interpreter test ported."""

    @unittest.skip("runs `from multiprocessing import Pool` in a child interpreter, which "
                   "tests multiprocessing, not shmrunner; ported as "
                   "test_worker_finalization_via_atexit_handler_of_shmrunner")
    def test_worker_finalization_via_atexit_handler_of_multiprocessing(self):
        pass

    @pytest.mark.timeout(40)
    def test_worker_finalization_via_atexit_handler_of_shmrunner(self):
        # bpo-38744 / bpo-39360: a pool left open in a global must not break
        # interpreter exit. Same script as CPython's, with shmrunner's Pool;
        # the start method is set the way a script would set it.
        cmd = textwrap.dedent(f'''\
            import multiprocessing
            from shmrunner import Pool
            problem = None
            class A:
                def __init__(self):
                    self.pool = Pool(processes=1)
            def test():
                global problem
                problem = A()
                problem.pool.map(float, tuple(range(10)))
            if __name__ == "__main__":
                multiprocessing.set_start_method({self.START_METHOD!r})
                test()
        ''')
        # As test.support.script_helper.assert_python_ok runs it: isolated mode.
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-I", "-c", cmd],
                              capture_output=True, text=True, timeout=20)
        self.assertEqual((proc.returncode, proc.stderr), (0, ""),
                         f"stdout: {proc.stdout!r}")


_BASES = {
    "TestPool": (_mp._TestPool,),
    "TestPoolWorkerErrors": (PatchedMultiprocessingPool, _mp._TestPoolWorkerErrors),
    "TestPoolWorkerLifetime": (PatchedMultiprocessingPool, ShmrunnerWorkerLifetime),
}


def _install() -> None:
    for method in START_METHODS:
        for stem, bases in _BASES.items():
            name = f"{stem}{method.capitalize()}"
            cls = type(name, (*bases, ShmrunnerMixin, unittest.TestCase),
                       {"START_METHOD": method, "__module__": __name__})
            cls.__qualname__ = name
            globals()[name] = cls


_install()
