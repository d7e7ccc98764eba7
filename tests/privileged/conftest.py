"""The privileged tier's one check of what it needs: root for every test here, plus what a
module names with `pytestmark = pytest.mark.needs("bpffs", ...)` (keys of REQUIREMENTS). A test
whose needs are not met is skipped with the missing ones named, never counted as passing.

And the iptables tests' lab node (`node`), shared by their modules."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.privileged import iptables_netns

REQUIREMENTS: dict[str, tuple[str, Callable[[], bool]]] = {
    "root": ("root (CAP_SYS_ADMIN, CAP_NET_ADMIN: netns, bpf())", lambda: os.geteuid() == 0),
    "bpffs": ("bpffs at /sys/fs/bpf", lambda: os.path.isdir("/sys/fs/bpf")),
    "nsenter": ("nsenter", lambda: shutil.which("nsenter") is not None),
    "iptables-legacy": (
        "iptables-legacy-restore",
        lambda: shutil.which("iptables-legacy-restore") is not None,
    ),
    "ipset": ("ipset", lambda: shutil.which("ipset") is not None),
    "conntrack": ("the conntrack tool", lambda: shutil.which("conntrack") is not None),
}


def missing(*needs: str) -> list[str]:
    """What of root and `needs` this machine lacks, described for a skip reason."""
    return [REQUIREMENTS[need][0] for need in ("root", *needs) if not REQUIREMENTS[need][1]()]


def pytest_runtest_setup(item: pytest.Item) -> None:
    lacking = missing(*(need for marker in item.iter_markers("needs") for need in marker.args))
    if lacking:
        pytest.skip(f"needs {', '.join(lacking)}")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[iptables_netns.Node]:
    """The iptables tests' node: three serving pods (iptables_netns.three_pods), SCTP logged under
    the test's tmp_path. The eBPF modules build their own (bpf_netns.Node) under this name."""
    with iptables_netns.three_pods(tmp_path) as lab:
        yield lab
