"""Task functions for test_foreign_types.py: importable by spawned and remote
workers; torch, pandas and pyarrow are imported only by the tasks that get
their objects."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

import shmrunner


def in_memfd(address: int) -> bool:
    """Whether ``address`` lies in a shmrunner memfd mapping of this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return "memfd:shmrunner" in line
    return False


def addresses(x: Any) -> list[int]:
    """The addresses of the memory ``x`` holds its values in."""
    torch, pa, pd = (sys.modules.get(m) for m in ("torch", "pyarrow", "pandas"))
    if torch is not None and isinstance(x, torch.Tensor):
        return [x.data_ptr()]
    if pd is not None and isinstance(x, (pd.DataFrame, pd.Series)):
        frame = x if isinstance(x, pd.DataFrame) else x.to_frame()
        out = []
        for name in frame.columns:
            column = frame[name]
            if isinstance(column.dtype, np.dtype):
                out.append(column.to_numpy().ctypes.data)
            else:   # Arrow-backed (pandas' default str columns when pyarrow is installed)
                out.extend(addresses(pa.array(column.array)))
        return out
    if pa is not None:
        if isinstance(x, pa.Table):
            return [a for c in x.columns for a in addresses(c)]
        if isinstance(x, pa.ChunkedArray):
            return [a for c in x.chunks for a in addresses(c)]
        if isinstance(x, pa.Array):
            return [b.address for b in x.buffers() if b is not None and b.size > 0]
    raise TypeError(f"no addresses for {type(x)}")


def probe(x: Any) -> dict[str, Any]:
    """What a worker got: its type, whether all its memory is shared, a checksum;
    then it scribbles on what it can (the caller's object must not change)."""
    seen = {"type": type(x).__name__, "shared": all(in_memfd(a) for a in addresses(x)),
            "sum": checksum(x)}
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        with torch.no_grad():
            x.view(-1)[0] = -1
        seen["requires_grad"] = x.requires_grad
        seen["dtype"] = str(x.dtype)
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(x, pd.DataFrame):
        x.iloc[0, 0] = -1
    return seen


def checksum(x: Any) -> float:
    torch, pa, pd = (sys.modules.get(m) for m in ("torch", "pyarrow", "pandas"))
    if pa is not None:
        import pyarrow.compute  # noqa: F401 (pa.compute: not imported by pyarrow itself)
    if torch is not None and isinstance(x, torch.Tensor):
        return float(x.detach().double().sum())
    if pd is not None and isinstance(x, pd.DataFrame):
        return float(x.select_dtypes("number").to_numpy().sum())
    if pd is not None and isinstance(x, pd.Series):
        return float(x.sum())
    if pa is not None and isinstance(x, pa.Table):
        return float(sum(pa.compute.sum(c).as_py() or 0 for c in x.columns
                         if pa.types.is_integer(c.type) or pa.types.is_floating(c.type)))
    if pa is not None:
        return float(pa.compute.sum(x).as_py())
    raise TypeError(f"no checksum for {type(x)}")


def echo(x: Any) -> Any:
    return x


def shared_in_worker(x: Any) -> bool:
    return all(in_memfd(a) for a in addresses(x))


def is_shared_numpy(a: np.ndarray[Any, Any]) -> bool:
    return shmrunner.is_shared(a)


def make_tensor(n: int) -> Any:
    import torch

    return torch.arange(n, dtype=torch.float32)


def make_table(n: int) -> Any:
    import pyarrow as pa

    return pa.table({"i": np.arange(n), "s": [str(i) for i in range(n)]})


def make_frame(n: int) -> Any:
    import pandas as pd

    return pd.DataFrame({"i": np.arange(n), "f": np.ones(n)})


def add_one(t: Any) -> float:
    """Add 1 in place (a tensor shared by share_memory_: the caller sees it)."""
    t.add_(1)
    return float(t[0])
