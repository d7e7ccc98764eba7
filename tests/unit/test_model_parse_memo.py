"""Re-reading a JSON file with the folder source's parse memo (agent/model/parse_memo.py, issue 27):
the result is always the one a read without memo gives, and only the changed documents are parsed.
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

import pytest

from agent.model import fields as fields_module
from agent.model.load import ParseMemo, load_text


def policy(index: int, port: Any = 80, cidr: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": "default", "name": f"single-{index}"},
        "spec": {
            "podSelector": {"matchLabels": {"app": f"a{index % 7}"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": cidr or f"172.16.{index // 256}.{index % 256}/32"}}],
                         "ports": [{"port": port}]}],
        },
    }  # fmt: skip


def as_list(items: list[dict[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def same_result(text: str, memo: ParseMemo) -> None:
    with_memo, without = load_text(text, "f.json", memo), load_text(text, "f.json")
    assert with_memo.objects == without.objects
    assert [str(e) for e in with_memo.errors] == [str(e) for e in without.errors]
    assert with_memo.ignored == without.ignored


def test_an_edit_parses_only_the_changed_document() -> None:
    memo = ParseMemo()
    items = [policy(i) for i in range(50)]
    same_result(as_list(items), memo)
    assert memo.hits == 0
    items[7] = policy(7, cidr="10.9.9.9/32")
    same_result(as_list(items), memo)
    assert memo.hits == 49
    same_result(as_list(items[:10]), memo)  # documents gone from the file are forgotten
    assert memo.hits == 10
    same_result(as_list(items), memo)
    assert memo.hits == 10


def test_values_python_calls_equal_are_not_the_same_document() -> None:
    """1 == 1.0 == True in Python: a memo keyed on == would reuse port 1's object for `true`,
    which the API server refuses."""
    memo = ParseMemo()
    same_result(as_list([policy(0, port=1)]), memo)
    for port in (True, 1.0, "1"):
        text = as_list([policy(0, port=port)])
        same_result(text, memo)
        assert memo.hits == 0
        assert load_text(text, "f.json", memo).errors  # a port must be an integer or a name
        same_result(as_list([policy(0, port=1)]), memo)


def test_an_invalid_document_is_reported_at_every_read() -> None:
    memo = ParseMemo()
    items = [policy(0), policy(1, port=True)]
    for _ in range(2):
        result = load_text(as_list(items), "f.json", memo)
        assert len(result.objects) == 1
        assert [e.name for e in result.errors] == ["single-1"]
        assert "ports[0].port" in str(result.errors[0])


def test_yaml_texts_are_read_whole() -> None:
    memo = ParseMemo()
    text = "kind: Namespace\nmetadata: {name: a}\n"
    same_result(text, memo)
    same_result(text, memo)
    assert memo.hits == 0


def test_remembered_documents_still_count_against_the_text_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The list takes one entry of the text's budget per item, and each policy some more (its
    lists and labels). A remembered document must use its share all the same."""
    monkeypatch.setattr(fields_module, "MAX_ITEMS_PER_TEXT", 40)
    memo = ParseMemo()
    items = [policy(i) for i in range(6)]
    same_result(as_list(items), memo)
    assert len(load_text(as_list(items), "f.json", memo).objects) == 6
    more = items + [policy(i) for i in range(6, 12)]  # twice as many: the last ones do not fit
    same_result(as_list(more), memo)
    result = load_text(as_list(more), "f.json", memo)
    assert memo.hits >= 6 and len(result.objects) < 12
    assert all("too many list entries in one input" in e.message for e in result.errors)


def test_one_document_changed_among_thousands_costs_far_less_than_reading_them() -> None:
    """CPU time in one process: one document changed among 5,000 against the first read of them
    (what is left linear is C-level decoding and spelling)."""
    items = [policy(i) for i in range(5_000)]
    memo = ParseMemo()
    gc.disable()
    try:
        started = time.process_time()
        load_text(as_list(items), "f.json", memo)
        first = time.process_time() - started
        edits = []
        for index in range(3):
            items[index] = policy(index, cidr=f"10.0.0.{index}/32")
            text = as_list(items)
            started = time.process_time()
            load_text(text, "f.json", memo)
            edits.append(time.process_time() - started)
    finally:
        gc.enable()
    ratio = min(edits) / first
    assert ratio < 0.5, f"one document changed among 5,000 took {ratio:.2f}x their first read"
