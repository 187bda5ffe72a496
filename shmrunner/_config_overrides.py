"""The override layers over a file's settings: the environment, then --set.

Data flow::

    SHMRUNNER_<SECTION>__<KEY> variables --from_environment()--> [Override]
    --set SECTION.KEY=VALUE             --from_assignments()--> [Override]
    each layer --apply(settings, layer)--> Settings (a new frozen copy)

An :class:`Override` is one value for ``section.key`` and where it came from,
so a bad one is one ConfigError line naming the variable or the ``--set``.
Values are read as YAML, keys go through the schema's one unknown-key check,
values through the field's own validator, and a changed section is rebuilt so
its rules across keys run too. Stateless: the environment is read only when
:func:`shmrunner.config.resolve` passes it in, never at import.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

from ._config_sections import SECTIONS, Settings, check_keys, section_class
from .errors import ConfigError

__all__ = ["ENV_PREFIX", "SHM_THRESHOLD_ALIAS", "Override", "apply", "from_assignments",
           "from_environment"]

ENV_PREFIX = "SHMRUNNER_"
# The Pool's threshold variable, older than the sections: for the commands it is
# scheduler.shm_threshold and worker.shm_threshold, below their own variables.
SHM_THRESHOLD_ALIAS = "SHMRUNNER_SHM_THRESHOLD"


class Override:
    """One value for ``section.key`` and where it came from (for the error line)."""

    __slots__ = ("source", "section", "key", "value")

    def __init__(self, source: str, section: str, key: str, value: Any) -> None:
        self.source, self.section, self.key, self.value = source, section, key, value


def _yaml_value(text: str, source: str) -> Any:
    import yaml

    from . import _yaml  # yaml loads lazily: importing shmrunner stays light

    try:
        return _yaml.load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: the value is not valid YAML: {problem}") from None


def from_environment(environ: Mapping[str, str]) -> list[Override]:
    """``SHMRUNNER_<SECTION>__<KEY>`` variables, every one checked (an unknown one
    is an error whatever the command reads: a typo must not be ignored)."""
    found: list[Override] = []
    alias = environ.get(SHM_THRESHOLD_ALIAS)
    if alias:  # set but empty was ignored before: it still is
        source = f"environment variable {SHM_THRESHOLD_ALIAS}"
        value = _yaml_value(alias, source)
        found += [Override(source, section, "shm_threshold", value)
                  for section in ("scheduler", "worker")]
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].partition("__")
        section, key = section.lower(), key.lower()
        try:
            check_keys(section_class(section), section, [key])
        except ConfigError as exc:
            raise ConfigError(f"environment variable {name}: {exc} (the variables are "
                              f"{ENV_PREFIX}<SECTION>__<KEY>)") from None
        source = f"environment variable {name}"
        found.append(Override(source, section, key, _yaml_value(environ[name], source)))
    return found


def from_assignments(assignments: Iterable[str], sections: Collection[str]) -> list[Override]:
    found = []
    for assignment in assignments:
        source = f"--set {assignment}"
        key, equals, raw = assignment.partition("=")
        section, _, name = key.partition(".")
        if not equals or not name or section not in sections:
            expected = " or ".join(f"{s}.KEY=VALUE" for s in sections)
            raise ConfigError(f"{source}: expected {expected}")
        try:
            check_keys(section_class(section), section, [name])
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        found.append(Override(source, section, name, _yaml_value(raw, source)))
    return found


def apply(settings: Settings, overrides: Sequence[Override]) -> Settings:
    """``settings`` with one layer of overrides (within a layer the last wins)."""
    changed: dict[str, Any] = {}
    for name in SECTIONS:
        layer = [o for o in overrides if o.section == name]
        if not layer:
            continue
        values: dict[str, Any] = {}
        for o in layer:
            check = next(f for f in fields(SECTIONS[name]) if f.name == o.key).metadata["check"]
            problem = check(o.value)
            if problem is not None:
                raise ConfigError(f"{o.source}: {name}.{o.key}: expected {problem}, "
                                  f"got {o.value!r}")
            values[o.key] = o.value
        try:
            changed[name] = replace(getattr(settings, name), **values)
        except ConfigError as exc:  # a rule across keys (heartbeats, CURVE files)
            sources = ", ".join(dict.fromkeys(o.source for o in layer))
            raise ConfigError(f"{sources}: {exc}") from None
    return replace(settings, **changed) if changed else settings
