"""Shared arrays in the corners: ndarray subclasses (map(out=...), task
arguments), the recycled-segment cache's byte budget, bad cache and threshold
settings, the file-size limit and the memory cgroup's headroom. Each test
pinned a defect an audit found. Real worker processes throughout."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import _shm_edge_tasks as at
import numpy as np
import pytest

import shmrunner
from _util import shm_segments, wait_until

MIB = 1 << 20


@pytest.fixture(autouse=True)
def default_cache() -> Iterator[None]:
    shmrunner.set_shm_cache(None)
    yield
    shmrunner.set_shm_cache(None)


# --- ndarray subclasses viewing shared memory ---------------------------------------


@pytest.mark.timeout(60)
def test_map_out_given_a_masked_view_of_a_shared_array_gets_the_results() -> None:
    """is_shared() says a masked array over a shared array is shared, so
    map(out=...) accepted it, then sent each chunk's rows as a pickled copy
    (ndarray subclasses pickle by value): the workers wrote into their copies
    and map returned out with none of the results in it."""
    data = shmrunner.zeros((4, 1000))
    out = np.ma.masked_array(data)
    with shmrunner.Pool(2) as pool:
        got = pool.map(at.row, range(4), chunksize=1, out=out)
    firsts, same = data[:, 0].tolist(), got is out
    del data, out, got  # not kept alive by a failure's traceback (the leak check)
    assert same
    assert firsts == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.timeout(60)
@pytest.mark.timeout(60)
def test_an_ndarray_subclass_argument_travels_by_value_and_its_plain_view_shares() -> None:
    """The README's rule: a subclass (a masked array here) is pickled as its
    class pickles itself, by value, even over shared memory (its extra state,
    a mask, has no shared form); the plain array under it is shared."""
    data = shmrunner.zeros(1000)
    masked = np.ma.masked_array(data)
    assert shmrunner.is_shared(masked)
    with shmrunner.Pool(1) as pool:
        pool.apply(at.add_one_to_each, ([masked],))
        after_subclass = float(data[0])
        pool.apply(at.add_one_to_each, ([masked.data],))
        after_plain = float(data[0])
    del data, masked  # not kept alive by a failure's traceback (the leak check)
    assert (after_subclass, after_plain) == (0.0, 1.0)


# --- the cache's byte budget ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_dropped_results_beyond_the_budget_give_their_pages_back_at_once() -> None:
    """Results are adopted into the cache when the caller drops them; the
    budget check ignored the ones queued for adoption, so after a pool ended
    every dropped result was kept (an fd and its pages each) until the next
    cache operation, far past set_shm_cache's budget."""
    shmrunner.set_shm_cache(8 * MIB)
    with shmrunner.Pool(2) as pool:
        held = pool.starmap(at.full, [(k, MIB // 2) for k in range(20)])  # 20 x 4 MiB
    assert all(shmrunner.is_shared(r) for r in held)
    del held
    gc.collect()
    # The budget holds two 4 MiB segments: the other 18 go back to the kernel.
    wait_until(lambda: len(shm_segments()) <= 2, timeout=10,
               message="the results' segments past the budget to be closed")


# --- the SHMRUNNER_* settings and shm_threshold -------------------------------------


@pytest.mark.timeout(60)
def test_a_negative_shm_cache_variable_is_an_error_not_a_disabled_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """set_shm_cache(-1) raises, but SHMRUNNER_SHM_CACHE=-1 silently turned
    the cache off (clamped to 0): a typo'd budget must be one clear line."""
    monkeypatch.setenv("SHMRUNNER_SHM_CACHE", "-1")
    with pytest.raises(shmrunner.ConfigError, match="SHMRUNNER_SHM_CACHE='-1'"):
        shmrunner.set_shm_cache(None)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [-1, "lots", 1.5])
def test_a_bad_shm_threshold_names_the_argument(value: object) -> None:
    """Pool(shm_threshold="lots") failed with int()'s bare "invalid literal
    for int() with base 10", -1 was taken (scheduler.shm_threshold refuses
    it) and 1.5 silently became 1."""
    with pytest.raises(ValueError, match="shm_threshold"):
        shmrunner.Pool(1, shm_threshold=value).terminate()  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_a_negative_shm_threshold_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMRUNNER_SHM_THRESHOLD", "-1")
    with pytest.raises(shmrunner.ConfigError, match="SHMRUNNER_SHM_THRESHOLD='-1'"):
        shmrunner.Pool(1).terminate()


# --- allocation errors ----------------------------------------------------------------

FSIZE_SCRIPT = """
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
import shmrunner
try:
    shmrunner.zeros(1 << 19)  # 4 MiB, past the 1 MiB file-size limit
except shmrunner.SharedMemoryError as exc:
    print(exc)
"""


@pytest.mark.timeout(60)
def test_empty_past_the_file_size_limit_names_the_limit() -> None:
    """A memfd counts against RLIMIT_FSIZE; past it, empty() said "File too
    large; free memory or use a smaller array", which frees nothing: the
    limit is what to raise."""
    done = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT], capture_output=True, text=True,
                          timeout=50, env=_env())
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert "RLIMIT_FSIZE" in message and "ulimit -f" in message and "\n" not in message


def _env() -> dict[str, str]:
    """This checkout's shmrunner first on the path of a child interpreter."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


# --- the memory cgroup's headroom ---------------------------------------------------

_CGROUP_SCRIPT = """
import json, os, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
import shmrunner
try:
    a = shmrunner.zeros(512 << 20, dtype="uint8")  # 512 MiB, in a 256 MiB cgroup
    out = {"error": None}
except shmrunner.SharedMemoryError as err:
    out = {"error": type(err).__name__, "text": str(err)}
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_an_array_past_the_memory_cgroups_limit_is_refused_not_oom_killed(
        tmp_path: Path, oom_cgroup: str) -> None:
    """In a memory cgroup of its own (a systemd unit's MemoryMax, a batch job's,
    a cgroup v1 host) the headroom check read only /sys/fs/cgroup/memory.max,
    the root's, so an array past the cgroup's limit met the OOM killer instead
    of a SharedMemoryError."""
    import json

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _CGROUP_SCRIPT, oom_cgroup], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    out = json.loads(done.stdout)
    assert out["error"] == "SharedMemoryError", out
    assert "need 512.0 MiB of shared memory" in out["text"]
