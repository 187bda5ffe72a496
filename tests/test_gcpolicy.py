"""The daemon process's collector settings (shmrunner/_gcpolicy.py): what the
service had at start is frozen, young collections are spaced out, cycles are
still collected, and a process forked afterwards (a local worker, which runs
users' tasks) gets the previous thresholds back. In a fresh interpreter: the
settings are process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest

_SCRIPT = r"""
import gc, os, weakref
from shmrunner._gcpolicy import tune_for_service

before = gc.get_threshold()
tune_for_service()
assert gc.get_freeze_count() > 0, "nothing frozen"
assert gc.get_threshold()[0] > before[0], gc.get_threshold()

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle: only the collector frees it
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None, "a cycle survived a collection"

pid = os.fork()
if pid == 0:
    os._exit(0 if gc.get_threshold() == before else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "a forked child kept the daemon's thresholds"
print("ok")
"""


@pytest.mark.timeout(60)
def test_tuned_collector_frees_cycles_and_children_get_the_old_thresholds() -> None:
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
