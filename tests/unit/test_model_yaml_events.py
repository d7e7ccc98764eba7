"""Documents built from libyaml's events (agent/model/yaml_events.py) equal PyYAML's C loader's on
generated texts, or are refused as unusual (then the loader reads them); the model's reader gives
the same objects and errors whichever path a text took."""

from __future__ import annotations

import datetime

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import read, yaml_events

pytestmark = pytest.mark.skipif(not yaml_events.AVAILABLE, reason="needs PyYAML built with libyaml")

# plain scalars YAML 1.1 resolves to other types, and near misses that stay strings
TRICKY = [
    "yes", "No", "on", "OFF", "true", "~", "null", "Null", "", "0", "-1", "+7", "012", "0o17", "0x1F",
    "0b101", "1_000", "1:30", "190:20:30", "1e3", "1.5e-3", ".inf", "-.Inf", ".nan", "3.", "2024-01-01",
    "2001-12-14t21:59:43.10-05:00", "2024-13-45", "=", "<<", "10.0.0.0/8", "fd00::/64", "y", "n", "::",
    "-", "a: b", "#x", "'q'", "\"d\"", "é", "TCP", "8080",
]  # fmt: skip

keys = st.one_of(st.sampled_from(TRICKY), st.text(max_size=6))
scalars = st.one_of(
    st.sampled_from(TRICKY),
    st.text(max_size=8),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.dates(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)


def reference(text: str) -> list[object]:
    return list(yaml.load_all(text, Loader=yaml.CSafeLoader))


def same_as_the_loader(text: str) -> bool:
    """True when the events path answered (and equalled the loader), False when it deferred; it
    never answers where the loader refuses."""
    try:
        expected: object = reference(text)
    except Exception as error:  # the loader refuses: so must the events path, one way or another
        expected = type(error)
    try:
        got: object = yaml_events.documents(text)
    except (yaml_events.Unusual, ValueError, OverflowError, TypeError):
        return False  # read.py then asks the loader (a value error may hide a syntax error after it)
    assert got == expected, text
    return True


@settings(max_examples=400, deadline=None)
@given(
    st.lists(values, min_size=1, max_size=3),
    st.sampled_from([None, True, False]),
    st.booleans(),
)
def test_generated_documents_equal_the_c_loaders(
    documents: list[object], flow: bool | None, start: bool
) -> None:
    text = yaml.safe_dump_all(documents, default_flow_style=flow, explicit_start=start, allow_unicode=True)
    assert same_as_the_loader(text)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                *TRICKY,
                "a",
                "- ",
                ": ",
                "\n",
                "  ",
                "---\n",
                "[",
                "]",
                "{",
                "}",
                ", ",
                "&x ",
                "*x",
                "!!str ",
                "? ",
            ]
        ),
        max_size=14,
    )
)
def test_arbitrary_texts_are_equal_or_deferred(pieces: list[str]) -> None:
    same_as_the_loader("".join(pieces))


@pytest.mark.parametrize(
    "text",
    [
        "a: &x 1\nb: *x\n",  # anchors and aliases
        "base: &b {x: 1}\nitem:\n  <<: *b\n",  # merge keys
        "a: !!str 1\n",  # explicit tags
        "a: 1\na: 2\n",  # duplicate keys (the loader names them)
        "1: a\n01: b\n",  # keys equal as values, not as text
        "? [a]\n: b\n",  # a key that is a sequence
        "a: [1\n",  # a syntax error
    ],
)
def test_unusual_texts_are_left_to_the_loader(text: str) -> None:
    assert not same_as_the_loader(text)
    assert read.load_text(text, "t.yaml").errors == read.load_text(text, "t.yaml").errors  # deterministic


def test_a_manifest_reads_alike_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    text = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-list, namespace: default, labels: {created: '2024-01-01'}}
spec:
  podSelector: {matchLabels: {role: target}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock: {cidr: 172.16.0.1/32}
    - ipBlock: {cidr: "172.16.0.2/32", except: []}
    ports: [{protocol: TCP, port: 8080}, {port: http}]
---
kind: NetworkPolicy
metadata: {name: broken}
spec: {podSelector: yes}
"""
    assert yaml_events.documents("created: 2024-01-01") == [{"created": datetime.date(2024, 1, 1)}]
    fast = read.load_text(text, "t.yaml")

    def refuse(_text: str) -> list[object]:
        raise yaml_events.Unusual("forced")

    monkeypatch.setattr(yaml_events, "documents", refuse)
    slow = read.load_text(text, "t.yaml")
    assert fast.objects == slow.objects and fast.errors == slow.errors
    assert len(fast.objects) == 1 and len(fast.errors) == 1
