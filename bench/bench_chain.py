"""Chained futures: a 3-stage chain over 16 x 64 MiB arrays,
make(i) -> plus_one(a) -> total(a), 16 chains at once on two workers.

python bench/bench_chain.py [--reps 5]
    [--systems local,local-shm,local-hand,remote,remote-hand,client,client-hand,dask,ray]
                            [--out bench/RESULTS.md] [--timeout 300]

* shmrunner chained: ``s.submit(plus_one, s.submit(make, i))``, then total of
  that: the Scheduler resolves the futures itself; on the local tier the
  intermediate arrays stay in shared memory and go to the next task by handle;
  on the remote tier (2 agents x 1 process) each one travels worker -> hub ->
  worker (shipped once each way).
* shmrunner chained, shared outputs: the same, but stages 1 and 2 allocate
  their outputs with ``shmrunner.empty``, so results return by handle too
  (a plain array result is copied into shared memory once on its way back).
* shmrunner by hand: ``result()`` of each stage, then ``submit`` of the next
  (in order: the caller waits for each result before it submits on).
* client -> daemon: the same two ways through ``shmrunner.connect`` to a
  ``shmrunner daemon`` subprocess with 2 local workers (chained: the futures
  travel as job references, results stay in the daemon; by hand: each 64 MiB
  result comes back to the client and goes out again). The daemon journals
  every job and result (spilled to files) in both.
* Dask: ``client.submit`` chaining futures (LocalCluster, 2 worker processes x
  1 thread, 127.0.0.1); Ray: ``f.remote(ref)`` chaining object refs
  (``ray.init(num_cpus=2)``).

Every system is started once before the clock (never timed); rounds rotate the
order of the systems, round 0 is a warm-up not counted; medians. The physical
limits are measured in the same run: the chain's own compute in this process
on one thread, and one copy of the 1 GiB of intermediate arrays. Writes (or
replaces) the "Chained futures" section of --out.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(  # agents, Dask's and Ray's workers inherit this
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray keeps to 127.0.0.1
# The daemon journals every result (1 GiB per stage here): let them expire soon.
os.environ.setdefault("SHMRUNNER_DAEMON__RESULT_TTL", "20")

import numpy as np  # noqa: E402
import remote_systems as R  # noqa: E402

import _chain_tasks as C  # noqa: E402

N_ARRAYS = 16
NBYTES = N_ARRAYS * C.N * 8
EXPECTED = [float(C.N * (i + 1)) for i in range(N_ARRAYS)]


def _gather(futures: list[Any], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    return [f.result(max(0.0, deadline - time.monotonic())) for f in futures]


def chained(ex: Any, timeout: float) -> list[Any]:
    return _gather([ex.submit(C.total, ex.submit(C.plus_one, ex.submit(C.make, i)))
                    for i in range(N_ARRAYS)], timeout)


def chained_shared(ex: Any, timeout: float) -> list[Any]:
    return _gather([ex.submit(C.total, ex.submit(C.plus_one_shared, ex.submit(C.make_shared, i)))
                    for i in range(N_ARRAYS)], timeout)


def by_hand(ex: Any, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    firsts = [ex.submit(C.make, i) for i in range(N_ARRAYS)]
    seconds = [ex.submit(C.plus_one, f.result(left())) for f in firsts]
    del firsts
    thirds = [ex.submit(C.total, f.result(left())) for f in seconds]
    del seconds
    return [f.result(left()) for f in thirds]


def dask_chain(h: Any, timeout: float) -> list[Any]:
    from distributed import wait

    client = h[1]
    futures = [client.submit(C.total, client.submit(C.plus_one, client.submit(
        C.make, i, pure=False), pure=False), pure=False) for i in range(N_ARRAYS)]
    done = wait(futures, timeout=timeout)
    if done.not_done:
        raise TimeoutError(f"{len(done.not_done)} chains not done after {timeout} s")
    return list(client.gather(futures))


class RayChain(R.Ray):
    def __init__(self) -> None:
        super().__init__()
        self.make = self.ray.remote(C.make)
        self.plus_one = self.ray.remote(C.plus_one)
        self.total = self.ray.remote(C.total)

    def run(self, h: Any, timeout: float) -> list[Any]:
        refs = [self.total.remote(self.plus_one.remote(self.make.remote(i)))
                for i in range(N_ARRAYS)]
        return list(self.ray.get(refs, timeout=timeout))


# key -> (label, adapter factory, run(adapter, handle, timeout))
SYSTEMS: dict[str, tuple[str, Callable[[], R.System], Callable[..., list[Any]]]] = {
    "local": ("shmrunner Scheduler(local_workers=2), chained futures", R.ShmLocal,
              lambda a, h, t: chained(a.ex(h), t)),
    "local-shm": ("shmrunner Scheduler(local_workers=2), chained futures, stages write "
                  "their outputs into shmrunner.empty", R.ShmLocal,
                  lambda a, h, t: chained_shared(a.ex(h), t)),
    "local-hand": ("shmrunner Scheduler(local_workers=2), by hand (result() then submit)",
                   R.ShmLocal, lambda a, h, t: by_hand(a.ex(h), t)),
    "remote": ("shmrunner remote tier (2 agents x 1 proc), chained futures", R.ShmRemote,
               lambda a, h, t: chained(a.ex(h), t)),
    "remote-hand": ("shmrunner remote tier (2 agents x 1 proc), by hand", R.ShmRemote,
                    lambda a, h, t: by_hand(a.ex(h), t)),
    "client": ("client -> daemon(local_workers=2), chained futures (job references)",
               lambda: _daemon_system("client"), lambda a, h, t: chained(a.ex(h), t)),
    "client-hand": ("client -> daemon(local_workers=2), by hand", lambda: _daemon_system("client"),
                    lambda a, h, t: by_hand(a.ex(h), t)),
    "dask": ("Dask distributed (2 procs x 1 thread), chained futures", R.Dask,
             lambda a, h, t: dask_chain(h, t)),
    "ray": ("Ray (num_cpus=2), chained object refs", RayChain,
            lambda a, h, t: a.run(h, t)),
}


_DAEMONS: dict[str, Any] = {}


def _daemon_system(key: str) -> Any:
    """bench_daemon's daemon (a real CLI subprocess, journal in a temporary
    directory) and a client; one adapter shared by the chained and by-hand runs."""
    if key not in _DAEMONS:
        import bench_daemon

        _DAEMONS[key] = bench_daemon.DaemonSys(key, "daemon", local_workers=2, agents=0)
    return _DAEMONS[key]


def compute_floor() -> float:
    """The chain's own work in this process on one thread: no transfer at all."""
    gc.collect()
    t0 = time.perf_counter()
    out = [C.total(C.plus_one(C.make(i))) for i in range(N_ARRAYS)]
    dt = time.perf_counter() - t0
    assert out == EXPECTED
    return dt


def copy_floor() -> float:
    """One copy of the 16 intermediate arrays into fresh memory, one thread
    (page faults + memcpy): what passing them by value costs at least, once."""
    src = np.ones(C.N)
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(N_ARRAYS):
        dst = np.empty_like(src)
        np.copyto(dst, src)
        del dst
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    keys = [k for k in args.systems.split(",") if k]
    unknown = [k for k in keys if k not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")

    # One adapter and one running instance per adapter class (the two shmrunner
    # variants of a tier share it: the same workers, chained vs by hand).
    adapters: dict[str, R.System] = {}
    handles: dict[str, Any] = {}
    started: dict[Any, tuple[R.System, Any]] = {}
    skipped: dict[str, str] = {}
    try:
        for key in keys:
            factory = SYSTEMS[key][1]
            try:
                # the same workers for a tier's chained and by-hand runs
                token = factory if isinstance(factory, type) else id(factory())
                if token not in started:
                    adapter = factory()
                    started[token] = (adapter, adapter.start(args.timeout))
                adapters[key], handles[key] = started[token]
            except Exception as exc:  # noqa: BLE001 (reported as skipped)
                skipped[key] = f"{type(exc).__name__}: {exc}"[:160]
                print(f"skip {key}: {skipped[key]}", flush=True)
        times: dict[str, list[float]] = {k: [] for k in adapters}
        floors: dict[str, list[float]] = {"compute": [], "copy": []}
        order = list(adapters)
        for rnd in range(args.reps + 1):
            for key in order:
                run = SYSTEMS[key][2]
                gc.collect()
                t0 = time.perf_counter()
                try:
                    out = run(adapters[key], handles[key], args.timeout)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                    continue
                dt = time.perf_counter() - t0
                if out != EXPECTED:
                    print(f"{key}: wrong results {out[:3]}...", flush=True)
                    continue
                print(f"round {rnd} {key}: {dt:.3f} s", flush=True)
                if rnd:
                    times[key].append(dt)
            floors["compute"].append(compute_floor())
            floors["copy"].append(copy_floor())
            order = order[1:] + order[:1]
    finally:
        for adapter, h in started.values():
            try:
                adapter.stop(h)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
    report(args.out, times, floors, skipped, args.reps)


def report(out: Path, times: dict[str, list[float]], floors: dict[str, list[float]],
           skipped: dict[str, str], reps: int) -> None:
    med = {k: statistics.median(v) for k, v in times.items() if v}
    compute = statistics.median(floors["compute"])
    copy = statistics.median(floors["copy"])
    ref = med.get("local")
    hand = {"local": "local-hand", "local-shm": "local-hand", "remote": "remote-hand",
            "client": "client-hand"}
    lines = [
        "## Chained futures (bench/bench_chain.py)",
        "",
        f"3-stage chain make(i) -> plus_one(a) -> total(a) over {N_ARRAYS} x 64 MiB float64 "
        f"arrays ({NBYTES / 2**30:.0f} GiB made, {NBYTES / 2**30:.0f} GiB derived), two "
        f"workers, 127.0.0.1; median of {reps} interleaved rounds after a warm-up; "
        f"{platform.python_version()}, {os.cpu_count()} CPUs (shared with other jobs: noisy).",
        "",
        "| system | median s | chained / by hand (same tier) | vs shmrunner local chained "
        "| x compute floor |",
        "|---|---|---|---|---|",
    ]
    for key, (label, _, _) in SYSTEMS.items():
        if key in med:
            by_hand = f"x{med[key] / med[hand[key]]:.2f}" if hand.get(key) in med else ""
            ratio = f"x{med[key] / ref:.2f}" if ref else "n/a"
            lines.append(f"| {label} | {med[key]:.3f} | {by_hand} | {ratio} "
                         f"| x{med[key] / compute:.2f} |")
        elif key in skipped:
            lines.append(f"| {label} | skipped: {skipped[key]} | | | |")
    lines += [
        "",
        f"Limits measured in the same run: the chain's compute in one process on one "
        f"thread, no transfer: {compute:.3f} s (two workers in parallel: ~{compute / 2:.3f} s "
        f"at best); one copy of the {NBYTES / 2**30:.0f} GiB of intermediate arrays (page "
        f"faults + memcpy, one thread): {copy:.3f} s "
        f"({NBYTES / copy / 1e9:.2f} GB/s).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    old = out.read_text() if out.exists() else ""
    pattern = re.compile(r"## Chained futures \(bench/bench_chain\.py\).*?(?=\n## |\Z)", re.S)
    new = pattern.sub(lambda _: text.rstrip("\n") + "\n", old) if pattern.search(old) \
        else old.rstrip("\n") + "\n\n" + text
    out.write_text(new)


if __name__ == "__main__":
    main()
