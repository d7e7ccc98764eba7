"""YAML documents built straight from libyaml's event stream, without PyYAML's node graph.

PyYAML's loaders, the C one included, compose every document into Node objects (each with two
Mark objects) before constructing the Python values: for a 450 KB allow list of 10,000 ipBlock
peers that is ~200 ms of the ~250 ms a load costs, while libyaml's events alone take ~40 ms
(issue 27: one peer changed in such a file re-reads it whole). `documents` builds dicts, lists
and scalars from the events with an explicit stack and resolves plain scalars with SafeLoader's
own resolver and constructors, so the values are those of yaml.load_all with a CSafeLoader.

It covers what manifests are made of. Anything else, an anchor or alias, an explicit tag, a merge
key, a key that is not a plain value or appears twice, and any YAML error, raises `Unusual`: the
caller then loads the text with PyYAML's loader, which gives the usual values and error messages
(tests/unit/test_model_yaml_events.py compares both on generated texts).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

AVAILABLE = hasattr(yaml, "CSafeLoader")

_STR = "tag:yaml.org,2002:str"
_NOT_VALUES = {"tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"}
_resolver = Resolver()  # SafeLoader's implicit resolvers (YAML 1.1: yes/no, 0x1F, 2024-01-01...)
_constructor = SafeConstructor()


class Unusual(Exception):
    """The text needs PyYAML's own loader (see the module docstring)."""


class _Mapping:
    """A mapping being built: its dict and the key waiting for its value."""

    __slots__ = ("data", "has_key", "key")

    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}
        self.key: Hashable = None
        self.has_key = False

    def add(self, value: Any) -> None:
        if not self.has_key:
            if isinstance(value, (dict, list)):
                raise Unusual("a key that is a mapping or a sequence")
            if value in self.data:
                raise Unusual("a duplicate key")
            self.key, self.has_key = value, True
        else:
            self.data[self.key] = value
            self.has_key = False


class _Sequence:
    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: list[Any] = []

    def add(self, value: Any) -> None:
        self.data.append(value)


_EMPTY = object()  # no root node yet in the current document


def documents(text: str) -> list[Any]:
    """Every document of `text`, as yaml.load_all(text, Loader=yaml.CSafeLoader) gives them."""
    if not AVAILABLE:
        raise Unusual("libyaml is not available")
    plain: dict[str, Any] = {}  # a plain scalar's value, by its text (keys repeat on every item)
    stack: list[_Mapping | _Sequence] = []
    result: list[Any] = []
    root: Any = _EMPTY
    parser = yaml.CSafeLoader(text)
    try:
        while True:
            try:
                event: Any = parser.get_event()  # dispatched on its exact type below
            except yaml.YAMLError as error:
                raise Unusual(str(error)) from error
            kind = type(event)
            if kind is ScalarEvent:
                value: Any = _scalar(event, plain)
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                if event.anchor is not None or not (event.tag is None or event.implicit):
                    raise Unusual("an anchor or a tag")
                stack.append(_Mapping() if kind is MappingStartEvent else _Sequence())
                continue
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                value = stack.pop().data
            elif kind is DocumentEndEvent:
                result.append(None if root is _EMPTY else root)  # None: an empty document
                root = _EMPTY
                continue
            elif kind is StreamEndEvent or event is None:
                return result
            elif kind is DocumentStartEvent or kind is StreamStartEvent:
                continue
            else:  # an alias
                raise Unusual(kind.__name__)
            if stack:
                stack[-1].add(value)
            else:
                root = value
    finally:
        parser.dispose()


def _scalar(event: ScalarEvent, plain: dict[str, Any]) -> Any:
    if event.anchor is not None:
        raise Unusual("an anchor")
    value: str = event.value
    plain_implicit, quoted_implicit = event.implicit
    if event.tag is not None and not (plain_implicit or quoted_implicit):
        raise Unusual("an explicit tag")
    if not plain_implicit:  # quoted, literal or folded: a string
        if event.tag not in (None, "!"):
            raise Unusual("an explicit tag")
        return value
    known = plain.get(value, plain)
    if known is not plain:
        return known
    tag = _resolver.resolve(ScalarNode, value, (True, False))
    if tag in _NOT_VALUES:
        raise Unusual("a merge key or a value key")
    if tag == _STR:
        resolved: Any = value
    else:
        construct: Callable[[Any, Any], Any] | None = SafeConstructor.yaml_constructors.get(tag)
        if construct is None:
            raise Unusual(f"no constructor for {tag}")
        resolved = construct(_constructor, ScalarNode(tag, value))
    plain[value] = resolved
    return resolved
