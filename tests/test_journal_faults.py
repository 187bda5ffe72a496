"""The journal's disk runs full under a running daemon: a real tmpfs of 4 MiB
holds the journal. A submit that cannot be journaled is refused with one clear
line (the client's future fails: the job was never accepted), the daemon keeps
serving, and jobs that fit still run."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from _daemon_tasks import Daemon


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.timeout(90)
def test_a_full_journal_disk_refuses_the_submit_and_the_daemon_serves_on(
        tmp_path: Path, small_disk: Path) -> None:
    daemon = Daemon(tmp_path, daemon={"journal": str(small_disk / "journal.sqlite")}).start()
    try:
        client = daemon.client()
        assert client.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2
        too_big = np.ones(1 << 20)  # 8 MiB: its spill file cannot fit on the disk
        future = client.submit("_daemon_tasks:add", too_big, 1.0)
        with pytest.raises(Exception) as info:
            future.result(timeout=30)
        message = str(info.value)
        assert "full" in message and "free some space" in message, message
        assert "\n" not in message
        assert not future.accepted()
        # The daemon lives on, and what fits still runs.
        assert daemon.status()["draining"] is False
        assert client.submit("_daemon_tasks:inc", 41).result(timeout=30) == 42
    finally:
        assert not daemon.close()
