"""``shmrunner`` as if this Python's SQLite were too old for the journal (3.20):
``python -m _old_sqlite_daemon daemon ARGS``."""

from __future__ import annotations

import sqlite3
import sys

from shmrunner.cli import main

if __name__ == "__main__":
    sqlite3.sqlite_version_info = (3, 20, 0)  # type: ignore[misc]
    sqlite3.sqlite_version = "3.20.0"
    sys.exit(main(sys.argv[1:]))
