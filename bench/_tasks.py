"""Worker functions for the benchmarks; a module of its own so spawn-based pools can import them."""

from __future__ import annotations

from typing import Any

import numpy as np

N = 8_388_608  # float64 elements in 64 MiB


def inc(x: int) -> int:
    return x + 1


def array_sum(a: Any) -> float:
    return float(a.sum())


def make_array(i: int) -> np.ndarray:
    return np.full(N, i, dtype=np.float64)


def make_tensor(i: int) -> Any:
    import torch  # only torch workers call this; keeps numpy-only workers light

    return torch.from_numpy(np.full(N, i, dtype=np.float64))


def add_one(a: Any) -> Any:
    # joblib hands large inputs over as read-only memmaps: a caller who wants to
    # mutate must copy, so that copy is part of joblib's honest cost here.
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()
    a += 1
    return a


def pipe_echo(conn: Any) -> None:
    """Echo every message until None: the floor for one task round trip."""
    while (msg := conn.recv()) is not None:
        conn.send(msg)


def torch_single_thread() -> None:
    """torch.mp.Pool initializer: OpenMP (libgomp) deadlocks in a forked child once the
    parent has used its thread pool, so each worker runs torch ops on one thread
    (also what torch advises to avoid oversubscribing 2 cores with 2 workers)."""
    import torch

    torch.set_num_threads(1)


def import_torch_and_ray() -> None:
    """Import what bench_local.py's process holds when it measures pools: a
    process this size makes a fork (and the child's exit) what it costs there."""
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray  # noqa: F401
    import torch  # noqa: F401
