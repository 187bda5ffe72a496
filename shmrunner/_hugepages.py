"""Huge pages for new segments, on hosts that let a program ask for them.

A memfd's pages come from the kernel's internal shmem mount, whose
transparent huge page policy is ``/sys/kernel/mm/transparent_hugepage/
shmem_enabled`` (a 2 MiB-specific setting under ``hugepages-2048kB`` wins
over it unless it says ``inherit``):

* ``always`` / ``within_size``: the kernel gives large memfds 2 MiB pages by
  itself, ``pwrite`` included. Nothing to do here.
* ``advise``: only pages first touched through a mapping marked
  ``MADV_HUGEPAGE`` are huge. :func:`populate` does that for a segment about
  to be filled, before the ``pwrite`` or ``fallocate`` that fills it.
* ``never`` (the kernel's default), ``deny``, or no such file: 4 KiB pages.

Why bother: a process mapping a 64 MiB array of 4 KiB pages takes about a
thousand faults and 16,384 page table entries to read it, and as much work
again to unmap it; with 2 MiB pages it is 32 of each. On this project's
2-core VM that made reading a shared 64 MiB array in a worker 3x faster
(map, sum, unmap: 9.8 -> 3.1 ms) and the pool's W2s 0.080 -> 0.036 s
(``bench/RESULTS.md``, "Huge pages").

State: the policy, read once per process (hosts do not change it under a
running program, and a read costs a few microseconds per segment).
"""

from __future__ import annotations

import functools
import mmap
import re
from pathlib import Path

__all__ = ["HUGE_PAGE", "policy", "populate"]

HUGE_PAGE = 2 << 20
# Linux 5.14; Python 3.11's mmap module does not name it.
_MADV_POPULATE_WRITE = 23
_SETTINGS = Path("/sys/kernel/mm/transparent_hugepage")


@functools.cache
def policy() -> str:
    """The host's huge page policy for memfds: always, within_size, advise,
    never, deny, or unknown (no transparent huge pages in this kernel)."""
    for name in ("hugepages-2048kB/shmem_enabled", "shmem_enabled"):
        try:
            text = (_SETTINGS / name).read_text()
        except OSError:
            continue
        chosen = re.search(r"\[(\w+)\]", text)
        if chosen and chosen.group(1) != "inherit":
            return chosen.group(1)
    return "unknown"


def populate(fd: int, nbytes: int, size: int) -> None:
    """Allocate the first ``nbytes`` of a new memfd of ``size`` bytes as huge
    pages, if the host policy is ``advise`` and they span one at least.

    Best effort: where the kernel has no 2 MiB page free it hands out small
    ones, and any error (an older kernel, memory short) is left to the
    ``pwrite`` or ``fallocate`` that follows, which reports it clearly."""
    if nbytes < HUGE_PAGE or policy() != "advise":
        return
    # Whole huge pages, but never past the end of the file (that would fault).
    length = min(-(-nbytes // HUGE_PAGE) * HUGE_PAGE, size)
    try:
        with mmap.mmap(fd, length, flags=mmap.MAP_SHARED) as mapping:
            mapping.madvise(mmap.MADV_HUGEPAGE)
            mapping.madvise(_MADV_POPULATE_WRITE)
    except OSError:
        pass
