"""Huge pages for shared arrays where the host policy is ``advise``: the
segment an array is copied into gets 2 MiB pages, and the worker that reads
it maps them whole (the README's "Huge pages")."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from _util import run_script

POLICY = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


def _current() -> str | None:
    try:
        chosen = re.search(r"\[(\w+)\]", POLICY.read_text())
    except OSError:
        return None
    return chosen.group(1) if chosen else None


@contextlib.contextmanager
def _advise_policy() -> Iterator[None]:
    """The host's memfd policy set to ``advise`` for the block. Under it only
    programs that mark their mappings get huge pages, so the switch changes
    nothing for any other program on the host; it is put back afterwards."""
    before = _current()
    if before is None:
        pytest.skip("this kernel has no transparent huge pages for shmem")
    if before == "advise":
        yield
        return
    if before != "never" or not os.access(POLICY, os.W_OK):
        pytest.skip(f"the host's shmem huge page policy is {before!r} and this test may not set "
                    "it to 'advise' (needs root, and 'never' to start from)")
    POLICY.write_text("advise")
    try:
        yield
    finally:
        POLICY.write_text(before)


WORKER_READS_ITS_ARGUMENT = """
import re, sys
import numpy as np
import shmrunner

def pmd_mapped_kib(a):
    total = float(a.sum())  # reads it all: the mapping is faulted in lazily
    # The smaps entry of the mapping that holds this worker's argument.
    address = a.__array_interface__["data"][0]
    inside = False
    for line in open("/proc/self/smaps"):
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("ShmemPmdMapped:"):
            return total, int(line.split()[1])
    return total, -1

with shmrunner.Pool(1) as pool:
    data = np.full(8 << 20, 1.0)  # 64 MiB, copied into a fresh segment when sent
    total, kib = pool.apply(pmd_mapped_kib, (data,))
    kept = shmrunner.share(np.ones(1 << 20))  # 8 MiB shared by the caller
    kept_total, kept_kib = pool.apply(pmd_mapped_kib, (kept,))
print(total, kib, kept_total, kept_kib)
"""


@pytest.mark.timeout(60)
def test_under_the_advise_policy_arrays_travel_in_huge_pages(tmp_path) -> None:
    with _advise_policy():
        done = run_script(tmp_path, WORKER_READS_ITS_ARGUMENT)
    assert done.returncode == 0, done.stderr
    total, kib, kept_total, kept_kib = done.stdout.split()
    assert float(total) == 8 << 20 and float(kept_total) == 1 << 20
    # The worker maps the copied array in 2 MiB pages: 64 MiB of them when
    # the kernel had the pages free; small pages only would leave 0.
    assert int(kib) >= 32 << 10, f"worker mapped {kib} KiB of its 64 MiB argument in huge pages"
    assert int(kept_kib) >= 4 << 10, f"worker mapped {kept_kib} KiB of the 8 MiB shared array"
