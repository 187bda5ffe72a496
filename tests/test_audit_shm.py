"""Audit of shared memory through the public API: map(out=...) gathers,
recycled segments, resource limits. Real worker processes throughout."""

from __future__ import annotations

from typing import Any

import _audit_shm_tasks as at
import pytest

import shmrunner


@pytest.mark.timeout(60)
def test_map_out_reports_progress() -> None:
    """map(out=..., progress=callable) follows the chunks like map without out."""
    seen: list[tuple[int, int]] = []
    out = shmrunner.empty((8, 1000))
    with shmrunner.Pool(2) as pool:
        got = pool.map(at.row, range(8), chunksize=2, out=out,
                       progress=lambda done, total: seen.append((done, total)))
    assert got is out
    assert out[7, 0] == 7.0
    assert seen and seen[-1] == (8, 8)


@pytest.mark.timeout(60)
def test_a_failed_map_out_leaves_nothing_writing_into_out(tmp_path: Any) -> None:
    """When map(out=...) raises, no task of that map still writes into out:
    the README says to reuse out for every call of a loop, and a straggler of
    a failed map would overwrite what the next call wrote."""
    out = shmrunner.zeros(2)
    gate = str(tmp_path / "gate")
    with shmrunner.Pool(2) as pool:
        with pytest.raises(KeyError, match="item 0 fails"):
            pool.starmap(at.fail_first_then_straggle, [(0, gate), (1, gate)],
                         chunksize=1, out=out)
        # The straggler settled before map raised: its row is written, and
        # nothing of that map is left to write into out later.
        assert out[1] == 1.0
        pool.map(at.row, [10, 11], chunksize=1, out=shmrunner.empty((2, 1000)))
        out[:] = -1.0
        assert pool.map(float, [5, 6], out=out).tolist() == [5.0, 6.0]
