"""The example files in configs/ load, and document every setting there is."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shmrunner import config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = {"daemon.yaml": ["daemon", "scheduler"], "worker.yaml": ["worker"],
            "local.yaml": ["scheduler"]}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_example_loads(name: str) -> None:
    config.load(CONFIGS / name)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_example_documents_every_key(name: str) -> None:
    import yaml

    data = yaml.safe_load((CONFIGS / name).read_text())
    text = (CONFIGS / name).read_text()
    for section in SECTIONS[name]:
        cls = type(getattr(config.Settings(), section))
        keys = {f.name for f in dataclasses.fields(cls)}
        assert set(data[section]) == keys, f"{name}: {section} keys differ from the settings"
        for key in keys:
            # each key is preceded by a comment line saying what it is
            lines = text.splitlines()
            index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
            assert lines[index - 1].strip().startswith("#"), f"{name}: {key} is undocumented"
