#!/usr/bin/env bash
# Creates bench/.venv with shmrunner's peers, then installs shmrunner itself (editable).
# Safe to re-run: pip skips what is already satisfied.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.."
venv="$here/.venv"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip

# torch pinned exactly: the local CPU wheel; any looser spec resolves to a multi-GB CUDA build.
"$py" -m pip install "torch==2.13.0" numpy joblib ray "dask[distributed]" pyzmq msgpack cloudpickle

# The package may not exist yet (pyproject.toml written in parallel); peers still work without it.
if [ -f "$root/pyproject.toml" ]; then
    # compat mode = a plain .pth path entry: setuptools' default finder freezes the package
    # layout seen at install time (a namespace package if __init__.py did not exist yet).
    "$py" -m pip install -e "$root" --config-settings editable_mode=compat
else
    echo "setup.sh: $root/pyproject.toml not found yet; skipped installing shmrunner (re-run later)" >&2
fi
"$py" - <<'PY'
import importlib.metadata as m
for p in ("torch", "numpy", "joblib", "ray", "dask", "distributed", "pyzmq", "msgpack", "cloudpickle", "shmrunner"):
    try:
        print(f"{p}=={m.version(p)}")
    except m.PackageNotFoundError:
        print(f"{p}: not installed")
PY
