"""Worker functions for bench_types.py (a module of its own: workers import it by reference)."""

from __future__ import annotations

from typing import Any

import numpy as np


def no_torch_threads() -> None:
    """Pool initializer: one torch thread per worker (as bench_local's torch pools)."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def as_numpy(x: Any) -> np.ndarray:
    """A zero-copy numpy view of any of the benchmarked types, so every task
    sums with numpy and only the transport differs."""
    lib = type(x).__module__.partition(".")[0]
    if lib == "torch":
        return x.numpy()
    if lib == "pandas":
        return x.to_numpy()
    if lib == "pyarrow":
        if hasattr(x, "column"):   # Table / RecordBatch
            x = x.column(0)
        if hasattr(x, "chunks"):
            (x,) = x.chunks
        return x.to_numpy(zero_copy_only=True)
    return np.asarray(x)


def type_sum(x: Any) -> float:
    return float(as_numpy(x).sum())
