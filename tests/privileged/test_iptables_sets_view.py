"""The iptables dataplane's own view of its ipsets (issue 27): an apply that moves one peer edits
that member in the kernel's set, without reading every set back first, and a read every
verify interval repairs what someone else changed behind its back.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from agent.dataplane.iptables import IptablesDataplane
from agent.dataplane.iptables import kernel as iptables_kernel
from agent.dataplane.iptables.layout import SET_PREFIX
from tests.privileged.iptables_netns import DataplaneWorker, Node
from tests.privileged.test_iptables_dataplane import TCP, from_pod, identity_of, isolated, node_state

if os.geteuid() != 0 or shutil.which("iptables-legacy-restore") is None or shutil.which("ipset") is None:
    pytest.skip("needs root, iptables-legacy-restore and ipset", allow_module_level=True)

VERIFY_S = 60.0


class ObservedDataplane(IptablesDataplane):
    """The real dataplane, with a clock the test moves and a count of its `ipset save` reads and
    `ipset restore` lines (in the worker process)."""

    def __init__(self) -> None:
        super().__init__(sets_verify_interval_s=VERIFY_S)
        self.now = 0.0
        self.set_reads = 0
        self.restored_lines: list[str] = []
        self._sets_view._clock = lambda: self.now
        read_sets, restore_sets = iptables_kernel.read_sets, iptables_kernel.restore_sets

        def counting_read() -> dict[str, Any]:
            self.set_reads += 1
            return read_sets()

        def recording_restore(script: str) -> None:
            self.restored_lines += script.splitlines()
            restore_sets(script)

        iptables_kernel.read_sets = counting_read  # type: ignore[assignment]
        iptables_kernel.restore_sets = recording_restore  # type: ignore[assignment]

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def observed(self) -> tuple[int, list[str]]:
        lines, self.restored_lines = self.restored_lines, []
        return self.set_reads, lines


def set_members(node: Node, holding: str) -> tuple[str, set[str]]:
    """The podfence set whose members include `holding`, and its members."""
    members: dict[str, set[str]] = {}
    for line in node.in_node("ipset", "save").stdout.splitlines():
        words = line.split()
        if words[:1] == ["add"] and words[1].startswith(SET_PREFIX):
            members.setdefault(words[1], set()).add(words[2])
    (name,) = [name for name, held in members.items() if holding in held]
    return name, members[name]


def test_a_moved_peer_is_one_member_edit_and_drift_is_repaired_on_verify(node: Node) -> None:
    p1, p2, p3 = node.pods
    crowd = [f"10.1.{i // 200}.{i % 200 + 1}" for i in range(400)]
    worker = DataplaneWorker(node.netns, ObservedDataplane)

    def state(version: int, others: list[str]) -> Any:
        ingress = {2: isolated(from_pod(p1, TCP, 80, 80))}
        extra = {identity_of(p1): tuple(others)}
        return node_state(node, ingress=ingress, version=version, extra_identity_ips=extra)

    try:
        worker.call("start")
        worker.call("apply", state(1, crowd))
        reads, _ = worker.call("observed")
        for version in range(2, 6):
            crowd[version] = f"10.2.0.{version}"  # one remote pod of the identity moved
            worker.call("apply", state(version, crowd))
            after, lines = worker.call("observed")
            assert after == reads, "no set read back within the verify interval"
            name, members = set_members(node, p1.ip)
            assert sorted(line.split()[0] for line in lines) == ["add", "del"], lines  # in place
            assert members == {p1.ip, *crowd}
        assert node.probe(p1, "tcp", p2.ip, 80) and not node.probe(p3, "tcp", p2.ip, 80)

        node.in_node("ipset", "del", name, p1.ip)  # someone else edits podfence's set
        worker.call("apply", state(6, crowd))
        assert not node.probe(p1, "tcp", p2.ip, 80), "the view still trusts itself (until the next verify)"
        worker.call("advance", VERIFY_S)
        worker.call("apply", state(7, crowd))
        after, _ = worker.call("observed")
        assert after == reads + 1
        assert set_members(node, p1.ip)[1] == {p1.ip, *crowd}, "the read found and mended the drift"
        assert node.probe(p1, "tcp", p2.ip, 80)
        worker.call("teardown")
    finally:
        worker.stop()
