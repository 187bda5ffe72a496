"""Process engines stop their workers when the interpreter exits.

One ``atexit`` hook, registered at the first engine: multiprocessing.util's
hook was registered when this package imported multiprocessing, and atexit
runs the last registered first, so ours runs before multiprocessing kills
daemonic children (the manager thread would respawn them) and while every
thread can still run (later, a daemon thread frozen holding an engine's lock
would deadlock the Pool's ``__del__``).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Protocol

__all__ = ["stop_at_exit"]


class _Stoppable(Protocol):
    def shutdown_at_exit(self) -> None: ...


_live: weakref.WeakSet[_Stoppable] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def stop_at_exit(engine: _Stoppable) -> None:
    """Call ``engine.shutdown_at_exit()`` at interpreter exit, if it is still alive."""
    global _registered
    with _lock:
        _live.add(engine)
        if not _registered:
            atexit.register(_stop_all)
            _registered = True


def _stop_all() -> None:
    for engine in list(_live):
        engine.shutdown_at_exit()
