"""Fixtures of the adversarial tier: one lab per dataplane and topology, kept for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adversarial.cases import GotThrough
from tests.adversarial.harness import Lab, lab_of
from tests.privileged.conftest import missing

# the privileged tier's one check of root and tools: these labs are built as its are
MISSING = missing("nsenter", "bpffs", "iptables-legacy", "ipset")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A case parametrised over every lab runs only on the topologies it names, and not where it
    is known to pass the filter today (test_pending_fixes.py tests it there): those items are
    deselected, not skipped, since nothing was tried. A pending case is xfail(strict) on the labs
    where it passes the filter today."""
    keep, drop = [], []
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.privileged)  # root, netns, bpffs: as the privileged tier
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        combo = params.get("lab")
        case, pending = params.get("case"), params.get("pending")
        if not isinstance(combo, str) or (case is None and pending is None):
            keep.append(item)
            continue
        topology = combo.split("-")[1]
        not_here = case is not None and (topology not in case.topologies or combo in case.passes_on)
        if not_here or (pending is not None and topology not in pending.topologies):
            drop.append(item)
        else:
            keep.append(item)
            if pending is not None and combo in pending.passes_on:
                # only the guarded check may fail: a case not even delivered unguarded fails
                # as any other test does
                marker = pytest.mark.xfail(strict=True, raises=GotThrough, reason=pending.reason)
                item.add_marker(marker)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """Indirectly parametrised with "<dataplane>-<topology>" (harness.COMBOS)."""
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)}")
    dataplane, topology = request.param.split("-")
    with lab_of(topology, dataplane) as made:
        yield made


@pytest.fixture(scope="session")
def unguarded_results() -> dict[tuple[str, str, str], bool]:
    """(dataplane, topology, case) -> whether the case's frame arrived without podfence."""
    return {}
