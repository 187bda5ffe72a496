"""Default job ids (shmrunner/_jobid.py): valid, unique, and never repeated by
a forked child (the random parts are drawn in blocks, so a child must not
reuse its parent's block)."""

from __future__ import annotations

import os

import pytest

from shmrunner._jobid import job_id_problem, new_job_id


def test_ids_are_valid_and_unique() -> None:
    ids = [new_job_id() for _ in range(2000)]  # several blocks of random parts
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and job_id_problem(i) is None for i in ids)
    assert ids[0][:12] <= ids[-1][:12]  # the time comes first: ids sort by it


@pytest.mark.timeout(30)
def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    new_job_id()  # the parent holds a block of random parts now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.write(write_end, new_job_id().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child = os.read(read_end, 64).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert len(child) == 32
    assert child[12:] != new_job_id()[12:]
