"""The README's example scripts run as written, so they cannot rot.

A ```python block that opens with ``# NAME.py: ...`` is a file the examples
import (written beside them); a block with an ``if __name__ == "__main__":``
guard is a script, run in a fresh directory as ``python NAME.py``, after the
shell commands its comments tell the reader to run first (key generation).
Other blocks are fragments of a session and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _daemon_tasks import free_port

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)
FILES = {m.group(1): block for block in BLOCKS
         if (m := re.match(r"# (\w+\.py): ", block)) and "__main__" not in block}
SCRIPTS = [block for block in BLOCKS if 'if __name__ == "__main__":' in block]
# Commands a script's comments say to run before it (only these are run).
SETUP = re.compile(r"^\s*#\s+((?:shmrunner keygen|mkdir) .*)$", re.M)


def test_the_readme_has_the_examples_this_test_runs() -> None:
    assert len(SCRIPTS) >= 2, "the Pool drop-in and the Scheduler examples"
    assert any("shmrunner.Pool(" in s for s in SCRIPTS)
    assert any("shmrunner.Scheduler(" in s for s in SCRIPTS)
    assert "mymod.py" in FILES


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    # the `shmrunner` command of the Python running the tests
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", SCRIPTS,
                         ids=lambda s: "scheduler" if "Scheduler(" in s
                         else "daemon" if "connect(" in s else "pool")
def test_readme_script_runs(tmp_path: Path, script: str) -> None:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    env = _env(tmp_path)
    for command in SETUP.findall(script):
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)
    if ":5560" in script:  # another program may hold the documented port here
        script = script.replace(":5560", f":{free_port()}")
    (tmp_path / "example.py").write_text(script)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=150,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    # No "listening without CURVE" warning (logging's last resort prints it bare).
    assert "without CURVE" not in done.stderr, done.stderr
    assert done.stderr == "", done.stderr
