"""A task module as users write them, for the allow-list tests: it defines
``double`` and ``Scaler``, and holds names it did not define (an imported
function, a ``functools.partial``) and a lazy module ``__getattr__``."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from subprocess import run  # imported, not defined here  # noqa: F401
from typing import Any


def double(x: Any) -> Any:
    return x * 2


class Scaler:
    @staticmethod
    def triple(x: Any) -> Any:
        return x * 3


echo = functools.partial(print)  # a callable this module made, but did not define


def __getattr__(name: str) -> Any:
    # As numpy's lazy submodules: a lookup may import (here: leave a mark).
    marker = os.environ.get("SHMRUNNER_TEST_LAZY_MARKER")
    if marker:
        Path(marker).write_text(name)
    raise AttributeError(name)
