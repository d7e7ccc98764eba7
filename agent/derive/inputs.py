"""Reading the derivations' inputs: raw Kubernetes/Istio documents and `NS:key=value` selectors.

Istio's kinds are not part of agent.model (podfence does not enforce them), so they are read as
plain mappings; each field the derivation uses is checked where it is read, and anything it
cannot read is a clear InputError (exit code 2), never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.model.load import MAX_FILE_BYTES, folder_files


class InputError(ValueError):
    """Input the user must fix; reported on stderr with exit code 2."""


class _NoAliases(yaml.SafeLoader):
    """kubectl never writes anchors and aliases; refusing them keeps a few lines of "billion
    laughs" YAML from expanding into more entries than the derivation could ever walk."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted", event.start_mark
            )
        return super().compose_node(parent, index)


def _items(doc: object, source: str, depth: int = 0) -> Iterator[dict[str, Any]]:
    if doc is None:
        return
    if not isinstance(doc, Mapping):
        raise InputError(f"{source}: a document must be an object, not {type(doc).__name__}")
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list) and depth < 4:
        item_kind = kind[: -len("List")] if kind != "List" else None
        for item in doc["items"]:
            if item_kind and isinstance(item, Mapping) and "kind" not in item:
                item = {"kind": item_kind, **item}
            yield from _items(item, source, depth + 1)
        return
    yield dict(doc)


def read_documents(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(source file, object) for every object of the YAML/JSON files below `path` (or one file)."""
    root = Path(path)
    if root.is_dir():
        files = folder_files(root)
    elif root.is_file():
        files = [root]
    else:
        raise InputError(f"{path}: no such file or directory")
    documents: list[tuple[str, dict[str, Any]]] = []
    for file in files:
        try:
            if file.stat().st_size > MAX_FILE_BYTES:
                raise InputError(f"{file}: larger than the {MAX_FILE_BYTES // (1024 * 1024)} MiB limit")
            text = file.read_text(encoding="utf-8-sig")
            loaded = list(yaml.load_all(text, Loader=_NoAliases))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{file}: cannot read: {exc}") from None
        except yaml.YAMLError as exc:
            raise InputError(f"{file}: invalid YAML: {str(exc).splitlines()[0]}") from None
        for doc in loaded:
            documents.extend((str(file), item) for item in _items(doc, str(file)))
    return documents


def mapping(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: must be an object, not {type(value).__name__}")
    return dict(value)


def sequence(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f"{where}: must be a list, not {type(value).__name__}")
    return value


def string_map(value: object, where: str) -> dict[str, str]:
    result = mapping(value, where)
    for key, item in result.items():
        if not isinstance(key, str) or not isinstance(item, (str, int, float, bool)):
            raise InputError(f"{where}: labels must map strings to strings")
    return {k: str(v) for k, v in result.items()}


def port_number(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InputError(f"{where}: {value!r} is not a port number (1-65535)")
    return value


def parse_selector(text: str, flag: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """`NAMESPACE:key=value[,key=value]` -> (namespace, labels)."""
    namespace, sep, labels_text = text.partition(":")
    labels = []
    for pair in filter(None, labels_text.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise InputError(f"{flag} {text!r}: expected NAMESPACE:key=value[,key=value]")
        labels.append((key.strip(), value.strip()))
    if not sep or not namespace or not labels:
        raise InputError(f"{flag} {text!r}: expected NAMESPACE:key=value[,key=value]")
    return namespace, tuple(sorted(labels))


def meta(doc: dict[str, Any], where: str) -> tuple[str, str]:
    """(namespace, name) of an object; namespace "default" when absent, as kubectl applies it."""
    metadata = mapping(doc.get("metadata"), f"{where}: metadata")
    name = metadata.get("name")
    namespace = metadata.get("namespace", "default")
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        raise InputError(f"{where}: metadata.name and metadata.namespace must be strings")
    return namespace, name
