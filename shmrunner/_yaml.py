"""YAML as the settings read it: safe, and a key given twice in one mapping is
an error, not the last value silently winning (two ``scheduler:`` blocks once
dropped the first one's ``allowed_functions`` without a word)."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["load"]

_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """``yaml.SafeLoader`` that refuses duplicate keys."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
            continue  # "<<" merges may be overridden; other keys are checked by the base
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load(text: str) -> Any:
    """The value of the YAML document ``text`` (``yaml.YAMLError`` if it is not
    valid, a duplicate key included)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
