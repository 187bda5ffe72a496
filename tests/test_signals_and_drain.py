"""Audit of the runner daemon's lifecycle and its CLI: draining on SIGTERM,
and two daemons on one socket. Real daemons (``shmrunner daemon``), real
signals, real sockets."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from _daemon_tasks import READY, Daemon, Proc
from _util import children, run_script, wait_until


def _private_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir(mode=0o700)
    return path


@pytest.mark.timeout(120)
def test_sigterm_does_not_start_jobs_still_queued_and_the_restart_runs_them_once(
        tmp_path: Path, daemons) -> None:
    """README, Draining: SIGTERM "gives running jobs drain_timeout seconds to
    finish (the rest stay journaled for the next start)". Jobs that were
    still queued when the drain began must not be started by it (a deep queue
    kept the daemon running new jobs for the whole drain_timeout), and the
    restart runs each of them once."""
    d = daemons(daemon={"drain_timeout": 60.0}).start()
    client = d.client(refetch_interval=0.2)
    started, release, ran = tmp_path / "started", tmp_path / "release", tmp_path / "ran"
    held = client.submit("_daemon_tasks:hold", str(started), str(release))
    wait_until(started.exists, timeout=30, message="the held job to start")
    queued = [client.submit("_daemon_tasks:append_id", str(ran), f"q{i}", 0.0,
                            job_id=f"q{i}") for i in range(5)]
    for future in queued:
        assert future.wait_accepted(timeout=10)
    # The one local worker is busy: which of them the daemon says are queued.
    states = client.job_states([f.job_id for f in queued])
    waiting = [job_id for job_id, state in states.items() if state == "queued"]
    assert len(waiting) >= 3, waiting

    d.proc.signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_until(lambda: "draining:" in d.proc.text(),  # type: ignore[union-attr]
               timeout=10, message="the daemon to start draining")
    # A queued job can still be cancelled while the daemon drains (journaled:
    # the restart does not run it).
    dropped = waiting[-1]
    assert client.cancel(dropped, timeout=10) == "cancelled"
    release.touch()
    assert held.result(timeout=30) > 0  # the running job finished within the drain
    assert d.proc.popen.wait(30) == 0  # type: ignore[union-attr]
    during = ran.read_text().split() if ran.exists() else []
    assert not set(during) & set(waiting), (
        f"the drain started jobs that were queued when it began: {during}")

    d.start()  # the same journal: every accepted job runs, none twice
    kept = [f for f in queued if f.job_id != dropped]
    assert sorted(f.result(timeout=30) for f in kept) == sorted(f.job_id for f in kept)
    assert sorted(ran.read_text().split()) == sorted(f.job_id for f in kept)
    assert client.job_state(dropped) == "cancelled"


@pytest.mark.timeout(90)
def test_a_second_daemon_on_the_same_ipc_socket_is_refused(tmp_path: Path, daemons) -> None:
    """A second daemon (another journal) configured with the ipc sockets a
    running daemon serves must not silently take them over (ZeroMQ unlinks
    the file and binds anew: the first daemon, still running, became
    unreachable for its clients and workers); it exits 2 with one line, as a
    taken tcp:// port or a journal in use does."""
    run = _private_dir(tmp_path, "run")
    sockets = {"clients": f"ipc://{run}/clients.sock", "workers": f"ipc://{run}/workers.sock",
               "allow_unauthenticated": False}
    first: Daemon = daemons(daemon=dict(sockets)).start()
    second: Daemon = daemons(daemon=dict(sockets))  # its own journal (daemon1-journal...)
    second.write_config()
    proc = Proc(["daemon", "--config", str(second.config_path)], second.log,
                stdout=second.dir / "out.txt")
    try:
        wait_until(lambda: not proc.alive() or READY in proc.text(), timeout=30,
                   message="the second daemon to exit (or to start)")
        served = proc.alive()
    finally:
        assert proc.stop() == []
    lines = proc.text().splitlines()
    assert not served, f"the second daemon took over the first one's socket:\n{proc.text()}"
    assert proc.popen.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("shmrunner daemon: daemon.clients: "), lines
    assert "clients.sock" in lines[0] and "already" in lines[0], lines
    # The first daemon still serves its socket.
    assert os.path.exists(run / "clients.sock")
    assert first.client().submit("_daemon_tasks:inc", 1).result(timeout=30) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_daemon_starts_its_workers_drains_and_exits_0(
        tmp_path: Path, daemons, sig: int) -> None:
    """README/--help: "SIGTERM/SIGINT drain and exit 0". One that came while
    the daemon was still starting its local workers (before it served) made
    a Ctrl-C hang the daemon forever (a KeyboardInterrupt through the
    engine's start left its workers running and the exit waiting for them)
    and a SIGTERM kill it by the signal. Each start is signalled as soon as
    its first worker process exists."""
    run = _private_dir(tmp_path, "run")
    d: Daemon = daemons(daemon={"clients": f"ipc://{run}/clients.sock",
                                "workers": f"ipc://{run}/workers.sock",
                                "allow_unauthenticated": False},
                        scheduler={"local_workers": 4, "start_method": "spawn"})
    d.write_config()
    for attempt in range(3):
        proc = Proc(["daemon", "--config", str(d.config_path)], d.log)
        try:
            wait_until(lambda p=proc: bool(children(p.pid)) or not p.alive(), timeout=30,
                       interval=0.001, message="the daemon's first worker process")
            proc.signal(sig)
            try:
                code = proc.popen.wait(20)
            except subprocess.TimeoutExpired:
                code = None
        finally:
            assert proc.stop() == []
        assert code == 0, (f"start {attempt}: the daemon signalled while it started "
                           f"{'hung' if code is None else f'exited {code}'}:\n{proc.text()}")
    assert "Traceback" not in d.log.read_text()


@pytest.mark.timeout(90)
def test_a_ctrl_c_while_a_pool_starts_does_not_hang_the_program_s_exit(tmp_path: Path) -> None:
    """A KeyboardInterrupt raised while ``Pool()`` waits for its workers to
    start (here: the first worker's initializer sends the parent SIGINT, as a
    Ctrl-C would arrive) must leave the program free to exit, as it does with
    multiprocessing.Pool (whose workers are daemonic)."""
    body = f"""
        import os, signal, time
        import shmrunner

        def init():
            try:  # the first worker only: one Ctrl-C
                os.close(os.open({str(tmp_path / "flag")!r}, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os.kill(os.getppid(), signal.SIGINT)

        if __name__ == "__main__":
            try:
                pool = shmrunner.Pool(2, initializer=init)
                time.sleep(30)  # the SIGINT is on its way: never slept through
            except KeyboardInterrupt:
                print("interrupted", flush=True)
    """
    try:
        result = run_script(tmp_path, body, timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the program hung at its exit after the Ctrl-C "
                             f"(output: {exc.stdout!r})") from None
    assert result.returncode == 0 and result.stdout == "interrupted\n", result
