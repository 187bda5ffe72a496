"""``shmrunner daemon`` with one Daemon method made to raise, for the front
thread's fault tests: ``python -m _faulty_daemon METHOD once|always daemon ARGS``.
``once``: the first call raises; ``always``: every call does."""

from __future__ import annotations

import sys
from typing import Any

from shmrunner import daemon
from shmrunner.cli import main


def _inject(name: str, mode: str) -> None:
    real = getattr(daemon.Daemon, name)
    calls = [0]

    def faulty(self: daemon.Daemon, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if mode == "always" or calls[0] == 1:
            raise RuntimeError(f"injected fault in Daemon.{name}")
        return real(self, *args, **kwargs)

    setattr(daemon.Daemon, name, faulty)


if __name__ == "__main__":
    _inject(sys.argv[1], sys.argv[2])
    sys.exit(main(sys.argv[3:]))
