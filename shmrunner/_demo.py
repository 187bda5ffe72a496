"""``shmrunner demo``: the whole path on one machine.

1. The same map over large arrays with shmrunner.Pool and multiprocessing.Pool,
   timed side by side.
2. A runner daemon (embedded default settings, on ipc sockets and a journal in
   a private temporary directory) and one remote worker agent, both real
   subprocesses; jobs with arrays submitted through ``shmrunner.connect``;
   results checked, throughput printed; everything shut down cleanly.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .pool import Pool


def normalise(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The demo's task: a new array the size of its input (so arrays go both ways)."""
    out: np.ndarray[Any, Any] = (a - a.mean()) / (a.std() + 1e-12)
    return out


def _timed(make_pool: Callable[[int], Any], processes: int,
           arrays: list[np.ndarray[Any, Any]]) -> tuple[float, list[float]]:
    with make_pool(processes) as pool:
        pool.apply(abs, (0,))  # workers up before timing
        start = time.perf_counter()
        results = pool.map(normalise, arrays, chunksize=1)
        checks = [float(r[0]) for r in results]
        elapsed = time.perf_counter() - start
        del results
    return elapsed, checks


def _pool_part(arrays: int, mib: int, processes: int) -> int:
    n = mib * (1 << 20) // 8
    print(f"1. mapping normalise() over {arrays} arrays of {mib} MiB with {processes} processes")
    rng = np.random.default_rng(0)
    data = [rng.random(n) for _ in range(arrays)]
    shm_time, shm_checks = _timed(Pool, processes, data)
    print(f"  shmrunner.Pool        {shm_time:8.3f} s")
    mp_time, mp_checks = _timed(multiprocessing.Pool, processes, data)
    print(f"  multiprocessing.Pool  {mp_time:8.3f} s")
    if not np.allclose(shm_checks, mp_checks):
        print("  results differ between the two pools!")
        return 1
    print(f"  same results; shmrunner.Pool is {mp_time / shm_time:.1f}x faster")
    return 0


def _daemon_part(arrays: int, mib: int) -> int:
    import re
    import subprocess
    import sys
    import tempfile

    from .client import connect

    n = mib * (1 << 20) // 8
    print(f"2. a daemon and a worker; {arrays} jobs of {mib} MiB arrays through shmrunner.connect")
    with tempfile.TemporaryDirectory(prefix="shmrunner-demo-") as tmp:
        cli = [sys.executable, "-m", "shmrunner.cli"]
        daemon = subprocess.Popen(
            [*cli, "--log-level", "WARNING", "daemon", "--set", f"daemon.clients=ipc://{tmp}/c",
             "--set", f"daemon.workers=ipc://{tmp}/w",
             "--set", f"daemon.journal={tmp}/journal.sqlite",
             "--set", "scheduler.local_workers=1"],
            stderr=subprocess.PIPE, text=True)
        worker = None
        try:
            assert daemon.stderr is not None
            line = daemon.stderr.readline()
            match = re.search(r"clients on (\S+), workers on (\S+)", line)
            if match is None:
                print(f"  the daemon did not start: {line.strip()}")
                return 1
            clients, workers = match.groups()
            print(f"  daemon: clients on {clients}, workers on {workers}")
            worker = subprocess.Popen([*cli, "worker", "--connect", workers, "--processes", "1"])
            rng = np.random.default_rng(1)
            data = [rng.random(n) for _ in range(arrays)]
            with connect(clients) as client:
                deadline = time.monotonic() + 60
                while not client.status()["workers"] and time.monotonic() < deadline:
                    time.sleep(0.05)  # polling the daemon until the worker has joined
                client.submit("shmrunner._demo:normalise", data[0]).result(timeout=60)
                start = time.perf_counter()
                futures = [client.submit("shmrunner._demo:normalise", a) for a in data]
                results = [f.result(timeout=120) for f in futures]
                elapsed = time.perf_counter() - start
                good = all(np.allclose(r, normalise(a)) for r, a in zip(results, data,
                                                                       strict=True))
                status = client.status()
            print(f"  {arrays} jobs in {elapsed:.3f} s ({arrays / elapsed:.1f} jobs/s, "
                  f"{arrays * mib * 2 / elapsed:.0f} MiB/s of arrays in and out); "
                  f"results {'correct' if good else 'WRONG'}")
            print(f"  daemon status: done {status['done']}, failed {status['failed']}, "
                  f"remote workers {len(status['workers'])}")
            return 0 if good else 1
        finally:
            for proc in (worker, daemon):
                if proc is not None:
                    proc.terminate()
            for proc in (worker, daemon):
                if proc is not None:
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            print("  daemon and worker stopped")


def run_demo(arrays: int, mib: int, processes: int | None) -> int:
    processes = processes or os.cpu_count() or 1
    status = _pool_part(arrays, mib, processes)
    print()
    return status or _daemon_part(arrays, mib)
