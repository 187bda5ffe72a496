"""Settings: YAML -> frozen, typed, validated dataclasses.

One schema for every part (``scheduler``, ``worker``; the daemon's sections
join it as they are built). Each section is a frozen keyword-only dataclass
whose fields carry their default and a validator; :func:`load` reads a YAML
file and fails on the first problem with one :class:`ConfigError` line naming
the file, the key and the fix. Unknown keys are errors, never ignored. The
environment is read only here, when settings are resolved (never at import).

A command's settings come from :func:`resolve`, each layer over the last::

    defaults < the YAML file < SHMRUNNER_<SECTION>__<KEY> variables < --set SECTION.KEY=VALUE

Every layer goes through the same key check and the same validators, and a
bad value is one ``ConfigError`` line naming where it came from.

Where each part lives: the field validators in ``_config_checks.py``, the
section dataclasses and the unknown-key check in ``_config_sections.py``, the
environment and ``--set`` layers in ``_config_overrides.py``; reading a file
(:func:`load`, :func:`parse`) and :func:`resolve`, which stacks the layers,
here. Import everything from this module.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from ._config_checks import MAX_PATTERNS as MAX_PATTERNS
from ._config_overrides import (
    ENV_PREFIX,
    SHM_THRESHOLD_ALIAS,
    apply,
    from_assignments,
    from_environment,
)
from ._config_sections import (
    SECTIONS,
    DaemonSettings,
    SchedulerSettings,
    Settings,
    WorkerSettings,
    check_keys,
    default_address,
    runtime_dir,
    section_class,
    state_dir,
)
from ._config_sections import describe as describe  # for docs and --help
from .errors import ConfigError

__all__ = ["DaemonSettings", "SchedulerSettings", "WorkerSettings", "Settings", "load", "parse",
           "resolve", "with_overrides", "ENV_PREFIX", "SHM_THRESHOLD_ALIAS",
           "default_address", "runtime_dir", "state_dir"]

S = TypeVar("S")


def parse(data: object, source: str = "<config>") -> Settings:
    """Settings from the parsed YAML document ``data`` (None: all defaults)."""
    try:
        if data is None:
            return Settings()
        if not isinstance(data, Mapping):
            raise ConfigError(f"the top level must be a mapping of sections "
                              f"({', '.join(SECTIONS)}), got {type(data).__name__}")
        sections: dict[str, Any] = {}
        for name, values in data.items():
            cls = section_class(name)
            if values is None:
                values = {}
            if not isinstance(values, Mapping):
                raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
            check_keys(cls, name, values)
            sections[name] = cls(**values)
        return Settings(**sections)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a YAML settings file."""
    import yaml

    from . import _yaml  # yaml loads lazily: importing shmrunner stays light

    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not valid YAML: not UTF-8 text (byte "
                          f"0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except ValueError as exc:  # a NUL in the path: no file can have that name
        raise ConfigError(f"{source!r}: cannot read the file: {exc}") from None
    try:
        data = _yaml.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    return parse(data, source)


def with_overrides(settings: S, overrides: Mapping[str, Any], section: str) -> S:
    """``settings`` with the given keys replaced (validated like the file)."""
    check_keys(type(settings), section, overrides)
    return replace(settings, **overrides)  # type: ignore[type-var]


def resolve(path: str | os.PathLike[str] | None = None, *,
            sections: Collection[str] = tuple(SECTIONS), sets: Iterable[str] = (),
            environ: Mapping[str, str] | None = None) -> Settings:
    """A command's settings: the defaults, the YAML file at ``path`` over them,
    the ``SHMRUNNER_<SECTION>__<KEY>`` environment variables over that, and the
    ``--set SECTION.KEY=VALUE`` assignments ``sets`` last. Values from the
    environment and ``--set`` are read as YAML and validated like the file's.
    Only ``sections`` (those the command reads) take overrides; every
    ``SHMRUNNER_*__*`` variable must still name a real setting. ``environ``:
    default ``os.environ``, read now."""
    settings = load(path) if path is not None else Settings()
    from_env = from_environment(os.environ if environ is None else environ)
    from_sets = from_assignments(sets, sections)
    for layer in (from_env, from_sets):
        settings = apply(settings, [o for o in layer if o.section in sections])
    return settings
