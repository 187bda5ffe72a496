"""``memory_limit`` values: bytes, a size such as ``"512MiB"``, or a fraction
of this host's memory (``0.5``, ``"50%"``).

:func:`problem` says what is wrong with a value (the config validator and
the Pool's check use it, so both say the same one line), :func:`resolve`
turns a valid value into bytes for this host. A fraction is of the host's
memory as this process sees it: the least of the physical memory and its
memory cgroup's limit (a container's limit, as Dask's ``memory_limit`` does).
Stateless; reads ``/proc`` and ``/sys`` only in :func:`host_memory`.
"""

from __future__ import annotations

import operator
import os
import re
from typing import SupportsIndex

__all__ = ["MIN_LIMIT", "EXPECTED", "problem", "resolve", "host_memory", "describe"]

MIN_LIMIT = 1 << 20  # below this nothing can run: a Python process alone holds more

EXPECTED = ("bytes (a whole number >= 1048576), a size such as '512MiB' or '2GB', a fraction "
            "of this host's memory such as 0.5 or '50%', or null for no limit")

_UNITS = {"": 1, "b": 1,
          "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12,
          "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20,
          "gi": 1 << 30, "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*|%)\s*$")
_MAX_BYTES = 1 << 60


def _parse(value: object) -> int | float | None:
    """Bytes (int) or a fraction (float, 0 < x <= 1) for ``value``; None if invalid."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, (int, float, str)) and isinstance(value, SupportsIndex):
        value = operator.index(value)  # numpy's integers
    if isinstance(value, int):
        return value if MIN_LIMIT <= value <= _MAX_BYTES else None
    if isinstance(value, float):
        return value if 0.0 < value <= 1.0 else None
    if not isinstance(value, str) or len(value) > 40:
        return None
    match = _SIZE.match(value.lower())
    if match is None:
        return None
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        return number / 100 if 0.0 < number <= 100.0 else None
    scale = _UNITS.get(unit)
    if scale is None:
        return None
    size = int(number * scale)
    return size if MIN_LIMIT <= size <= _MAX_BYTES else None


def problem(value: object) -> str | None:
    """None when ``value`` is a valid memory_limit (None included), else what is expected."""
    if value is None or _parse(value) is not None:
        return None
    return EXPECTED


def resolve(value: object) -> int | None:
    """``value`` in bytes for this host (None: no limit); ValueError, one line, if invalid."""
    if value is None:
        return None
    parsed = _parse(value)
    if parsed is None:
        raise ValueError(f"memory_limit: expected {EXPECTED}, got {value!r}")
    if isinstance(parsed, float):
        return max(MIN_LIMIT, int(parsed * host_memory()))
    return parsed


def host_memory() -> int:
    """Bytes of memory this process may use: physical memory, or less when
    its memory cgroup (v1 ``memory.limit_in_bytes``, v2 ``memory.max``) says so."""
    from .worker._memwatch import cgroup_limit

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cgroup_limit()
    return limit if limit is not None and 0 < limit < total else total


def describe(nbytes: int | None) -> str:
    """``nbytes`` for people: MiB, or GiB from 1 GiB."""
    if nbytes is None:
        return "unknown"
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.2f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB"
