"""Test tiers: tests/unit (no root), tests/privileged (root, own netns), tests/e2e (node lab),
tests/kind (needs kind + Docker). Tiers are selected by directory and marked automatically."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"  # upstream conformance cases, with their provenance in data/README.md
CONFORMANCE_JSON = DATA / "k8s_netpol_cases.json"

_TIER_MARKERS = {"privileged": pytest.mark.privileged, "e2e": pytest.mark.e2e, "kind": pytest.mark.kind}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if tier in _TIER_MARKERS:
            item.add_marker(_TIER_MARKERS[tier])
