"""W2 per data type: what torch tensors, pandas and Arrow data cost against numpy.

python bench/bench_types.py [--reps 5] [--tiers local,remote] [--types numpy,torch,...]
                            [--out bench/RESULTS.md] [--timeout 300]

W2 is 16 inputs of 64 MiB of float64 each; every task returns a float (the sum,
taken through a zero-copy numpy view of its input, so only the transport
differs between types). Local tier: ``shmrunner.Pool(2)``, ``map(chunksize=1)``.
Remote tier: ``Scheduler(local_workers=0)`` and two agents of one process
each on 127.0.0.1 (bench/remote_systems.py), 16 submits. Inputs are built
before the clock starts; types run interleaved in rotating order; round 0 is
a warm-up; medians; ratio = type time / numpy time in the same tier. Writes
(or replaces) the "Data types" section of --out.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(  # the agents import _type_tasks by reference
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)

import _type_tasks as T  # noqa: E402
import numpy as np  # noqa: E402
import remote_systems as R  # noqa: E402
from bench_local import loadavg, machine  # noqa: E402

N_ARRAYS = 16
N = 8_388_608  # float64 elements in 64 MiB
GB = N_ARRAYS * N * 8 / 1e9


def _torch() -> Any:
    import torch

    return torch


def _pd() -> Any:
    import pandas

    return pandas


def _pa() -> Any:
    import pyarrow

    return pyarrow


# How each type is made from a private float64 array (outside the clock).
MAKERS: dict[str, tuple[str, Callable[[np.ndarray], Any]]] = {
    "numpy": ("numpy.ndarray", lambda a: a),
    "shared": ("numpy, already in shared memory (shmrunner.share)",
               lambda a: __import__("shmrunner").share(a)),
    "torch": ("torch.Tensor (torch.from_numpy, plain)", lambda a: _torch().from_numpy(a)),
    "torch_shm": ("torch.Tensor after .share_memory_()",
                  lambda a: _torch().from_numpy(a.copy()).share_memory_()),
    "series": ("pandas.Series", lambda a: _pd().Series(a, copy=False)),
    "frame": ("pandas.DataFrame, one column", lambda a: _pd().DataFrame({"a": a}, copy=False)),
    "arrow": ("pyarrow.Array", lambda a: _pa().array(a)),
    "table": ("pyarrow.Table, one column", lambda a: _pa().table({"a": a})),
}
REMOTE_SKIP = {"shared": "same bytes as numpy on the wire",
               "torch_shm": "same bytes as torch on the wire"}


class Remote(R.ShmRemote):
    """bench_remote's system, with a long heartbeat timeout. It was needed when
    an agent decoded (so imported torch, ~6 s on this loaded 2-core machine)
    on the thread that beats; agents now forward tensors unbuilt and W2 returns
    floats, so the default would do: kept so runs compare with RESULTS.md."""

    def __init__(self) -> None:
        import shmrunner

        super().__init__()
        self.mod = SimpleNamespace(Scheduler=partial(shmrunner.Scheduler, heartbeat_timeout=60))


def run_local(pool: Any, inputs: list[Any], timeout: float) -> list[float]:
    return list(pool.map_async(T.type_sum, inputs, chunksize=1).get(timeout))


def run_remote(sched: Any, inputs: list[Any], timeout: float) -> list[float]:
    futures = [sched.submit(T.type_sum, x) for x in inputs]
    deadline = time.monotonic() + timeout
    return [f.result(max(0.0, deadline - time.monotonic())) for f in futures]


def copy_limit() -> float:
    """Fresh memory for 16 x 64 MiB and one copy into it, on one thread."""
    src = [np.full(N, k, dtype=np.float64) for k in range(N_ARRAYS)]
    t0 = time.perf_counter()
    dst = [np.empty_like(a) for a in src]
    for d, a in zip(dst, src, strict=True):
        np.copyto(d, a)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiers", default="local,remote")
    ap.add_argument("--types", default=",".join(MAKERS))
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    import shmrunner

    tiers = args.tiers.split(",")
    types = args.types.split(",")
    load0 = loadavg()
    vals: dict[tuple[str, str], list[float]] = defaultdict(list)
    errs: dict[tuple[str, str], str] = {}
    limits = [copy_limit() for _ in range(3)]
    pool = shmrunner.Pool(2, initializer=T.no_torch_threads) if "local" in tiers else None
    remote = Remote() if "remote" in tiers else None
    h = remote.start(args.timeout) if remote is not None else None
    try:
        for rep in range(args.reps + 1):
            order = types[rep % len(types):] + types[:rep % len(types)]
            for tier in tiers:
                for t in order:
                    if tier == "remote" and t in REMOTE_SKIP or (tier, t) in errs:
                        continue
                    try:
                        inputs = [MAKERS[t][1](np.full(N, k, dtype=np.float64))
                                  for k in range(N_ARRAYS)]
                        gc.collect()
                        t0 = time.perf_counter()
                        if tier == "local":
                            sums = run_local(pool, inputs, args.timeout)
                        else:
                            sums = run_remote(remote.ex(h), inputs, args.timeout)
                        dt = time.perf_counter() - t0
                        if sums != [float(k * N) for k in range(N_ARRAYS)]:
                            raise AssertionError(f"wrong sums {sums[:3]}...")
                        if rep:
                            vals[tier, t].append(dt)
                        print(f"rep {rep} {tier:6} {t:9} {dt:.3f} s", flush=True)
                    except Exception as exc:
                        traceback.print_exc()
                        errs[tier, t] = f"{type(exc).__name__}: {exc}"[:100]
                    finally:
                        inputs = []
                        gc.collect()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if remote is not None and h is not None:
            remote.stop(h)
    write(args, report(args, tiers, types, vals, errs, limits, load0))


def report(args: argparse.Namespace, tiers: list[str], types: list[str],
           vals: dict[tuple[str, str], list[float]], errs: dict[tuple[str, str], str],
           limits: list[float], load0: str) -> str:
    out = ["## Data types (issue 11): W2 per type", "", *(f"- {m}" for m in machine())]
    versions = []
    for name in ("pandas", "pyarrow"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed")
    out += [f"- {', '.join(versions)}",
            f"- W2: 16 x 64 MiB float64 in ({GB:.2f} GB), each task returns the sum taken "
            "through a zero-copy numpy view of its input. Local: `shmrunner.Pool(2)`, "
            "`map(chunksize=1)`; remote: `Scheduler(local_workers=0, heartbeat_timeout=60)` + 2 "
            "agents x 1 process on 127.0.0.1 (an agent's first `import torch` outlasted the "
            "default 5 s on this loaded machine). Inputs built before the clock; types "
            f"interleaved in rotating order; {args.reps} timed repetitions after 1 warm-up; "
            f"medians; ratio = time / numpy's time in the same tier. 1-min load average "
            f"{load0} at start, {loadavg()} at end (2 cores shared with other work).",
            f"- Limit: fresh memory for the 16 x 64 MiB inputs and one copy into it on one "
            f"thread: {statistics.median(limits):.3f} s ({GB / statistics.median(limits):.1f} "
            "GB/s).", ""]
    out += ["| type | " + " | ".join(tiers) + " |", "|---" * (len(tiers) + 1) + "|"]
    for t in types:
        row = []
        for tier in tiers:
            if (tier, t) in errs:
                row.append(f"error: {errs[tier, t]}")
            elif tier == "remote" and t in REMOTE_SKIP:
                row.append(f"n/a ({REMOTE_SKIP[t]})")
            elif vals.get((tier, t)):
                med = statistics.median(vals[tier, t])
                base = vals.get((tier, "numpy"))
                ratio = f", ×{med / statistics.median(base):.2f}" if base else ""
                row.append(f"{med:.3f} s ({GB / med:.1f} GB/s){ratio}")
            else:
                row.append("n/a")
        out.append(f"| {MAKERS[t][0]} | " + " | ".join(row) + " |")
    out += ["", f"- Command: `python bench/bench_types.py {' '.join(sys.argv[1:])}`"]
    return "\n".join(out) + "\n"


def write(path: Path | argparse.Namespace, section: str) -> None:
    path = path.out if isinstance(path, argparse.Namespace) else path
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pat = re.compile(r"^## Data types \(issue 11\).*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: section + "\n", old, count=1) if pat.search(old) \
        else old.rstrip("\n") + "\n\n" + section
    path.write_text(new)
    print(section)


if __name__ == "__main__":
    main()
