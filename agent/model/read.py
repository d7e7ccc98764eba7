"""Reading input: YAML/JSON texts, files and folders into objects and errors (`LoadResult`).

Splits a text into documents and lists into items, refuses oversized, non-UTF-8 and NUL-holding
input, rejects duplicate keys, keeps libyaml away from deeply nested texts, and recovers after a
YAML error document by document, so one bad document loses only itself. Each object goes to
agent.model.parse; nothing here raises on bad input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.model import fields, yaml_events
from agent.model.errors import ModelError, PolicyError
from agent.model.fields import Budget
from agent.model.objects import KubeObject
from agent.model.parse import parse_object
from agent.model.parse_memo import ParseMemo
from agent.model.validation import type_name

MAX_FILE_BYTES = 16 * 1024 * 1024
"""Larger inputs are refused whole: the API server caps objects near 1.5 MiB, so a bigger file is
a mistake (or an attack on the control service), and parsing it would stall every other update."""

MAX_LIST_DEPTH = 4  # a List inside a List is legal YAML but never what kubectl writes


class _NoDuplicateKeys:
    """Rejects duplicate mapping keys, as kubectl does: with PyYAML's default the last `ingress:`
    of a policy that has two would silently win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        values = [key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
        if len(set(values)) != len(values):  # cheap test first; the exact one only on a collision
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping",
                            node.start_mark,
                            f"found duplicate key {key_node.value!r}",
                            key_node.start_mark,
                        )
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc,no-any-return]


class _PythonLoader(_NoDuplicateKeys, yaml.SafeLoader):
    pass


_FastLoader: type[Any] = _PythonLoader
if hasattr(yaml, "CSafeLoader"):

    class _CLoader(_NoDuplicateKeys, yaml.CSafeLoader):  # type: ignore[misc]
        pass

    _FastLoader = _CLoader

MAX_FAST_NESTING = 1000
"""libyaml's composer recurses on the C stack without a limit and crashes the whole process
(SIGSEGV) at a few ten thousand nesting levels; texts that might nest deeper than this go to the
pure-Python parser, which raises RecursionError instead."""


_FLOW_BRACKETS = re.compile(r"[\[\]{}]")
_LINE_INDICATORS = re.compile(r"^( *)(.*)$", re.MULTILINE)


def _nesting_upper_bound(text: str) -> int:
    """Cheap over-estimate of how deeply a YAML text nests: flow brackets (even inside quoted
    strings) plus, per line, the indentation and the block indicators `- ` and `? `."""
    flow = deepest_flow = 0
    for bracket in _FLOW_BRACKETS.finditer(text):
        if bracket.group() in "[{":
            flow += 1
            deepest_flow = max(deepest_flow, flow)
        elif flow:
            flow -= 1
    deepest_block = 0
    for line in _LINE_INDICATORS.finditer(text):
        indent, rest = line.groups()
        deepest_block = max(deepest_block, len(indent) + rest.count("- ") + rest.count("? "))
    return deepest_flow + deepest_block


@dataclass
class LoadResult:
    """The valid objects of some input, one error per rejected object or unreadable document, and
    how many objects of other kinds were skipped."""

    objects: list[KubeObject] = field(default_factory=list)
    errors: list[ModelError] = field(default_factory=list)
    ignored: int = 0

    @property
    def unreadable(self) -> list[ModelError]:
        """Errors about the input itself (syntax, size, shape) rather than about a named object."""
        return [error for error in self.errors if not error.kind]

    def extend(self, other: LoadResult) -> None:
        self.objects.extend(other.objects)
        self.errors.extend(other.errors)
        self.ignored += other.ignored


def _input_error(source: str, where: str, message: str) -> ModelError:
    return ModelError("", None, None, where, message, source)


def _within(where: str, path: str) -> str:
    """Where in the input: a document/list position, then a field path inside it."""
    return f"{where}: {path}" if where and path else where or path


def _add_document(
    result: LoadResult,
    doc: object,
    source: str,
    where: str,
    budget: Budget,
    depth: int = 0,
    memo: ParseMemo | None = None,
) -> None:
    if doc is None:
        return  # an empty document, e.g. after a trailing '---'
    if not isinstance(doc, Mapping):
        result.errors.append(
            _input_error(source, where, f"a document must be an object, not a {type_name(doc)}")
        )
        return
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
        items = doc.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            result.errors.append(
                _input_error(source, _within(where, "items"), f"must be a list, not a {type_name(items)}")
            )
            return
        if depth >= MAX_LIST_DEPTH:
            result.errors.append(_input_error(source, _within(where, "items"), "lists nested too deeply"))
            return
        # Typed lists (PodList) from the API may leave kind/apiVersion off their items.
        item_kind = kind[: -len("List")] if kind != "List" else None
        budget.items_left -= len(items)
        if budget.items_left < 0:
            result.errors.append(
                _input_error(
                    source, _within(where, "items"), f"too many items (limit {fields.MAX_ITEMS_PER_TEXT})"
                )
            )
            return
        for i, item in enumerate(items):
            if item_kind and isinstance(item, Mapping) and "kind" not in item:
                item = {"kind": item_kind, **item}
            _add_document(result, item, source, _within(where, f"items[{i}]"), budget, depth + 1, memo)
        return
    spelling = memo.spelling(doc) if memo is not None else None
    if spelling is not None and memo is not None:
        found = memo.lookup(spelling)
        # The same document parses alike but for the text's budget, which it used `used` of
        # (monotonically): with at least that left it passes again; otherwise the parse itself
        # says where the budget ran out, as without a memo.
        if found is not None and budget.items_left >= found[1]:
            obj, used = found
            budget.items_left -= used
            memo.remember(spelling, obj, used)
            _append_object(result, obj)
            return
    before = budget.items_left
    try:
        obj = parse_object(doc, source, budget)
    except PolicyError as exc:
        error = exc.error
        if not error.kind and where:
            error = ModelError("", None, None, _within(where, error.field), error.message, source)
        result.errors.append(error)
        return
    except RecursionError:
        result.errors.append(_input_error(source, where, "nested too deeply"))
        return
    if spelling is not None and memo is not None:
        memo.remember(spelling, obj, before - budget.items_left)
    _append_object(result, obj)


def _append_object(result: LoadResult, obj: KubeObject | None) -> None:
    if obj is None:
        result.ignored += 1
    else:
        result.objects.append(obj)


def _yaml_documents(text: str) -> list[object]:
    if _nesting_upper_bound(text) > MAX_FAST_NESTING:
        return list(yaml.load_all(text, Loader=_PythonLoader))
    try:
        # a manifest's values without PyYAML's node graph (3-4x faster); anything unusual, an
        # error included, is left to the loader, whose values and messages are the reference
        return yaml_events.documents(text)
    except (yaml_events.Unusual, ValueError, OverflowError, TypeError):
        return list(yaml.load_all(text, Loader=_FastLoader))


_DOCUMENT_SEPARATOR = re.compile(r"^---(?=[ \t]|$)", re.MULTILINE)


def _split_documents(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each '---'-separated chunk, for recovering after a YAML error."""
    chunks: list[tuple[int, str]] = []
    start = 0
    for match in _DOCUMENT_SEPARATOR.finditer(text):
        chunks.append((text.count("\n", 0, start) + 1, text[start : match.start()]))
        start = match.start()
    chunks.append((text.count("\n", 0, start) + 1, text[start:]))
    return chunks


def _describe_yaml_error(exc: Exception, line_offset: int = 0) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"invalid YAML at line {mark.line + 1 + line_offset}, column {mark.column + 1}: {problem}"
    return f"invalid YAML: {problem}"


class _DuplicateKey(Exception):
    pass


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)  # in C: called for every JSON object of the text
    if len(obj) != len(pairs):  # the exact test only on a collision
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def load_text(text: str, source: str = "<string>", memo: ParseMemo | None = None) -> LoadResult:
    """Every object of a YAML or JSON text; never raises for bad input. With a `memo` (the same
    one for each read of one source), the documents of a JSON text that were in its last read
    are not parsed again (parse_memo.py)."""
    if memo is None:
        return _load_text(text, source, None)
    memo.begin()
    try:
        return _load_text(text, source, memo)
    finally:
        memo.end()


def _load_text(text: str, source: str, memo: ParseMemo | None) -> LoadResult:
    result = LoadResult()
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        result.errors.append(
            _input_error(source, "", f"larger than the {MAX_FILE_BYTES // (1024 * 1024)} MiB limit")
        )
        return result
    if "\x00" in text:
        result.errors.append(_input_error(source, "", "contains NUL bytes: not a YAML or JSON text"))
        return result
    budget = Budget()
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            document = json.loads(text, object_pairs_hook=_json_object)
        except _DuplicateKey as exc:
            result.errors.append(_input_error(source, "", f"invalid JSON: duplicate key {exc.args[0]!r}"))
            return result
        except (ValueError, RecursionError):
            pass  # YAML flow style also starts with '{' or '['; let the YAML parser judge
        else:
            _add_document(result, document, source, "", budget, memo=memo)
            return result
    try:
        documents = list(_yaml_documents(text))
    except (yaml.YAMLError, ValueError, RecursionError, OverflowError) as exc:
        return _load_chunks(text, source, exc, budget)
    many = len(documents) > 1
    for index, document in enumerate(documents):
        _add_document(result, document, source, f"document {index + 1}" if many else "", budget)
    return result


def _load_chunks(text: str, source: str, first_error: Exception, budget: Budget) -> LoadResult:
    """After a YAML error, parses each '---' chunk alone so one bad document loses only itself."""
    result = LoadResult()
    chunks = _split_documents(text)
    if len(chunks) == 1:
        result.errors.append(_input_error(source, "", _describe_yaml_error(first_error)))
        return result
    for index, (first_line, chunk) in enumerate(chunks):
        where = f"document {index + 1}"
        try:
            documents = list(_yaml_documents(chunk))
        except (yaml.YAMLError, ValueError, RecursionError, OverflowError) as exc:
            result.errors.append(_input_error(source, where, _describe_yaml_error(exc, first_line - 1)))
            continue
        for document in documents:
            _add_document(result, document, source, where, budget)
    return result


def load_file(path: str | Path, memo: ParseMemo | None = None) -> LoadResult:
    """Every object of one file; unreadable, oversized and non-UTF-8 files become errors. `memo`:
    as load_text's, kept by the caller per file."""
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return LoadResult(
                errors=[
                    _input_error(
                        source,
                        "",
                        f"{size} bytes: larger than the {MAX_FILE_BYTES // (1024 * 1024)} MiB limit",
                    )
                ]
            )
        data = path.read_bytes()
    except OSError as exc:
        return LoadResult(errors=[_input_error(source, "", f"cannot read: {exc.strerror or exc}")])
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM, as kubectl does
    except UnicodeDecodeError as exc:
        return LoadResult(errors=[_input_error(source, "", f"not UTF-8 text (byte {exc.start})")])
    return load_text(text, source, memo)


SUFFIXES = (".yaml", ".yml", ".json")


def folder_files(path: str | Path) -> list[Path]:
    """The files load_folder reads: *.yaml, *.yml, *.json below `path`, sorted, hidden ones skipped."""
    root = Path(path)
    files = []
    for candidate in root.rglob("*"):
        relative = candidate.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue  # editors' swap files, kubectl caches, ..data symlink farms of ConfigMap mounts
        if candidate.suffix.lower() in SUFFIXES and candidate.is_file():
            files.append(candidate)
    return sorted(files)


def load_folder(path: str | Path) -> LoadResult:
    """Every object of every YAML/JSON file below `path`, in sorted file order."""
    result = LoadResult()
    root = Path(path)
    if not root.is_dir():
        result.errors.append(_input_error(str(root), "", "not a directory"))
        return result
    for file in folder_files(root):
        result.extend(load_file(file))
    return result
