"""Edges of shared memory through the public API: map(out=...) gathers,
recycled segments, resource limits. Real worker processes throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import _shm_edge_tasks as at
import numpy as np
import pytest

import shmrunner


@pytest.mark.timeout(60)
def test_map_out_reports_progress() -> None:
    """map(out=..., progress=callable) follows the chunks like map without out."""
    seen: list[tuple[int, int]] = []
    out = shmrunner.empty((8, 1000))
    with shmrunner.Pool(2) as pool:
        got = pool.map(at.row, range(8), chunksize=2, out=out,
                       progress=lambda done, total: seen.append((done, total)))
    assert got is out
    assert out[7, 0] == 7.0
    assert seen and seen[-1] == (8, 8)


@pytest.mark.timeout(60)
def test_a_failed_map_out_leaves_nothing_writing_into_out(tmp_path: Any) -> None:
    """When map(out=...) raises, no task of that map still writes into out:
    the README says to reuse out for every call of a loop, and a straggler of
    a failed map would overwrite what the next call wrote."""
    out = shmrunner.zeros(2)
    gate = str(tmp_path / "gate")
    with shmrunner.Pool(2) as pool:
        with pytest.raises(KeyError, match="item 0 fails"):
            pool.starmap(at.fail_first_then_straggle, [(0, gate), (1, gate)],
                         chunksize=1, out=out)
        # The straggler settled before map raised: its row is written, and
        # nothing of that map is left to write into out later.
        assert out[1] == 1.0
        pool.map(at.row, [10, 11], chunksize=1, out=shmrunner.empty((2, 1000)))
        out[:] = -1.0
        assert pool.map(float, [5, 6], out=out).tolist() == [5.0, 6.0]


# --- resource limits, in a subprocess of their own --------------------------------

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


def run_script(tmp_path: Path, source: str, *args: str) -> dict[str, Any]:
    """Run ``source`` with this checkout's shmrunner; its last stdout line, as JSON."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(TESTS_DIR),
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=50, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


CACHE_FDS_SCRIPT = """
import gc, json, os, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
import shmrunner
import _shm_edge_tasks as at
import numpy as np

if __name__ == "__main__":
    with shmrunner.Pool(1) as pool:
        results = pool.map(at.full, range(100), chunksize=1)  # 1 MiB each
        del results  # the cache adopts their segments, each one an fd
        gc.collect()
        held, error = [], None
        try:
            for _ in range(90):  # 2 fds each: 180 of the 256
                held.append(shmrunner.empty(10))
        except shmrunner.SharedMemoryError as exc:
            error = str(exc)
    print(json.dumps({"held": len(held), "error": error}))
"""


@pytest.mark.timeout(60)
def test_the_segment_cache_leaves_room_under_the_fd_limit(tmp_path: Path) -> None:
    """Free recycled segments cost an fd each; a byte budget alone let them take
    most of a low RLIMIT_NOFILE, so a process that held no array any more
    could not allocate a few dozen new ones."""
    assert run_script(tmp_path, CACHE_FDS_SCRIPT) == {"held": 90, "error": None}


EMPTY_FDS_SCRIPT = """
import json, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
import shmrunner

if __name__ == "__main__":
    held, error = [], None
    try:
        for _ in range(64):
            held.append(shmrunner.empty(10))
    except shmrunner.SharedMemoryError as exc:
        error = str(exc)
    print(json.dumps({"error": error}))
"""


@pytest.mark.timeout(60)
def test_empty_at_the_fd_limit_names_the_limit(tmp_path: Path) -> None:
    """empty() out of fds says so and how to raise the limit (as receiving
    an array does), not "free memory or use a smaller array"."""
    error = run_script(tmp_path, EMPTY_FDS_SCRIPT)["error"]
    assert error is not None and "RLIMIT_NOFILE" in error and "\\n" not in error
    assert "free memory" not in error


NO_MEMFD_SCRIPT = """
import json, os, warnings
del os.memfd_create  # a Python built without it (an old glibc)
import numpy as np
import shmrunner
import _shm_edge_tasks as at
import numpy as np

if __name__ == "__main__":
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = np.arange(1 << 17, dtype=float)  # 1 MiB: shared memory's way
        with shmrunner.Pool(2) as pool:
            sums = pool.map(at.total, [a] * 4)
            row = pool.apply(at.full, (3,))
        try:
            shmrunner.empty(10)
            empty_error = None
        except shmrunner.SharedMemoryError as exc:
            empty_error = str(exc)
    print(json.dumps({
        "sums_ok": sums == [float(a.sum())] * 4,
        "row_ok": bool((row == 3.0).all()),
        "fallback_warned": any(issubclass(w.category, shmrunner.SharedMemoryUnavailableWarning)
                               for w in caught),
        "empty_error_names_memfd": empty_error is not None and "memfd_create" in empty_error,
    }))
"""


@pytest.mark.timeout(60)
def test_without_memfd_create_arrays_fall_back_to_pickling(tmp_path: Path) -> None:
    """README: "If memfds cannot be used at all (no memfd_create, ...), arrays
    are pickled instead"; without os.memfd_create every task failed with
    AttributeError instead."""
    assert run_script(tmp_path, NO_MEMFD_SCRIPT) == {
        "sums_ok": True, "row_ok": True, "fallback_warned": True,
        "empty_error_names_memfd": True}


# --- a task whose arguments cannot be pickled ---------------------------------------


@pytest.mark.timeout(60)
def test_unpicklable_items_do_not_stall_the_tasks_queued_behind_them() -> None:
    with shmrunner.Pool(1) as pool:
        pool.apply(at.pid)
        failed = pool.map_async(at.total, [at.Unpicklable()] * 200, chunksize=1)
        with pytest.raises(TypeError, match="cannot pickle"):
            failed.get(timeout=20)
        assert pool.apply_async(at.pid).get(timeout=10) > 0


@pytest.mark.timeout(60)
def test_a_task_given_more_shared_arrays_than_one_message_carries_sees_them_all() -> None:
    """Shared arrays pass by handle, so a task's writes are the caller's; past
    253 distinct segments in one task they silently travelled as copies and
    those writes were lost. Either they all stay shared or the task fails
    with one clear SharedMemoryError."""
    arrays = [shmrunner.zeros(10) for _ in range(300)]
    with shmrunner.Pool(1) as pool:
        try:
            pool.apply(at.add_one_to_each, (arrays,))
        except shmrunner.SharedMemoryError as exc:
            assert "\n" not in str(exc)
            return
    changed = [int(a[0]) for a in arrays]
    del arrays  # not kept alive by a failure's traceback: the leak check would wait on them
    assert changed == [1] * 300


@pytest.mark.timeout(60)
def test_map_out_of_the_wrong_dtype_names_the_result_and_out() -> None:
    with shmrunner.Pool(1) as pool:
        with pytest.raises(TypeError, match=r"map\(out=...\): result 0 \(dtype float64\) "
                                            r"cannot be written into out \(dtype int32\)") as info:
            pool.map(at.row, range(2), out=shmrunner.empty((2, 1000), dtype=np.int32))
        assert "\n" not in str(info.value)


SOFT_FD_LIMIT_SCRIPT = """
import json, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))
import shmrunner
import _shm_edge_tasks as at

if __name__ == "__main__":
    with shmrunner.Pool(1) as pool:  # plain arrays only: no shmrunner.empty() call
        try:
            results = pool.map(at.full, range(200), chunksize=1)  # 2 fds each
            error = None
        except shmrunner.SharedMemoryError as exc:
            results, error = [], str(exc)
    print(json.dumps({"held": len(results), "error": error}))
"""


@pytest.mark.timeout(60)
def test_holding_many_results_raises_the_soft_fd_limit(tmp_path: Path) -> None:
    """README: shmrunner raises the soft RLIMIT_NOFILE to the hard limit the
    first time it allocates a shared array; it did so only in empty(), so a
    program using the Pool with plain arrays failed at the soft limit."""
    assert run_script(tmp_path, SOFT_FD_LIMIT_SCRIPT) == {"held": 200, "error": None}


BAD_CACHE_ENV_SCRIPT = """
import json, os
os.environ["SHMRUNNER_SHM_CACHE"] = "64MiB"  # not a whole number of bytes
import numpy as np
import shmrunner
import _shm_edge_tasks as at

def outcome(make):
    try:
        with make() as runner:
            runner.map(at.total, [np.ones(1 << 17)] * 4)
            runner.map(at.total, [np.ones(1 << 17)] * 4)
        return "ran"
    except shmrunner.ConfigError as exc:
        return "ConfigError" if "SHMRUNNER_SHM_CACHE" in str(exc) else repr(exc)
    except Exception as exc:
        return repr(exc)

if __name__ == "__main__":
    print(json.dumps({"pool": outcome(lambda: shmrunner.Pool(2)),
                      "scheduler": outcome(lambda: shmrunner.Scheduler(local_workers=2))}))
"""


@pytest.mark.timeout(60)
def test_a_malformed_shm_cache_variable_fails_at_construction(tmp_path: Path) -> None:
    """SHMRUNNER_SHM_CACHE was parsed only when a task's arrays were copied:
    the ConfigError then failed tasks from inside the pickler (or the
    manager thread), and the tasks queued behind them stalled. It is checked
    when a Pool or Scheduler is made, like SHMRUNNER_SHM_THRESHOLD."""
    assert run_script(tmp_path, BAD_CACHE_ENV_SCRIPT) == {"pool": "ConfigError",
                                                          "scheduler": "ConfigError"}


@pytest.mark.timeout(60)
def test_a_read_only_view_of_a_shared_array_stays_read_only_in_the_worker() -> None:
    """The worker maps the caller's own pages: a view the caller made
    read-only must not let the task write into them."""
    shared = shmrunner.zeros(100_000)
    view = shared[:]
    view.flags.writeable = False
    with shmrunner.Pool(1) as pool:
        assert pool.apply(at.try_write, (view,)) == "refused"
        assert shared[0] == 0.0
        assert pool.apply(at.try_write, (shared,)) == "wrote"  # a writable one still is
    assert shared[0] == 99.0


def test_share_keeps_a_fortran_ordered_array_fortran_ordered() -> None:
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    shared = shmrunner.share(fortran)
    assert shmrunner.is_shared(shared)
    assert shared.flags.f_contiguous and not shared.flags.c_contiguous
    np.testing.assert_array_equal(shared, fortran)
    c_order = shmrunner.share(np.arange(12.0).reshape(3, 4))
    assert c_order.flags.c_contiguous
