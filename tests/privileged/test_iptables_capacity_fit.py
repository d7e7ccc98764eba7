"""One tenant's oversized policy on the real iptables dataplane (issue 21 item 9).

An ipBlock with more excepts than an ipset holds (maxelem) cannot be built. That policy must be
rejected alone: the pod it selects stays isolated, and tenant B's later revocation still takes
effect, checked with real traffic and the real ipsets.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dataplane.fit import Rejection
from agent.dataplane.iptables import IptablesDataplane
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, IdentityPeer
from tests.privileged.iptables_netns import DataplaneWorker, Node, Pod
from tests.privileged.test_iptables_dataplane import assert_flows, identity_of, node_state

if os.geteuid() != 0 or shutil.which("iptables-legacy-restore") is None or shutil.which("ipset") is None:
    pytest.skip("needs root, iptables-legacy-restore and ipset", allow_module_level=True)

TCP = 6
MAXELEM = 8


class ReportingDataplane(IptablesDataplane):
    """The worker calls methods only: this one hands out the rejections."""

    def rejections(self) -> dict[str, Rejection]:
        return dict(self.rejected_policies)


@pytest.fixture
def worker(node: Node) -> Iterator[DataplaneWorker]:
    dataplane = DataplaneWorker(node.netns, lambda: ReportingDataplane(ipset_maxelem=MAXELEM))
    try:
        dataplane.call("start")
        yield dataplane
    finally:
        try:
            dataplane.call("teardown")
        finally:
            dataplane.stop()


def from_pod(pod: Pod, port: int, policy: str) -> Allow:
    return Allow(IdentityPeer(identity_of(pod)), TCP, port, port, policy)


def huge() -> Allow:
    """The pods' /24 on tcp/8080 minus ten other addresses: 11 set members > maxelem 8."""
    excepts = tuple(ipaddress.ip_network(f"10.1.0.{100 + i}/32") for i in range(10))
    return Allow(CidrPeer(ipaddress.ip_network("10.1.0.0/24"), excepts), TCP, 8080, 8080, "tenant-a/huge")


def iso(*allows: Allow) -> DirectionPolicy:
    return DirectionPolicy(isolated=True, allows=allows)


def test_an_oversized_ipblock_is_rejected_alone_and_others_keep_applying(
    node: Node,
    worker: DataplaneWorker,
    tmp_path: Path,
) -> None:
    p1, p2, p3 = node.pods
    a_base = from_pod(p2, 80, "tenant-a/base")
    b_web = (from_pod(p1, 80, "tenant-b/web"), from_pod(p3, 80, "tenant-b/web"))
    worker.call("apply", node_state(node, ingress={1: iso(a_base), 2: iso(*b_web)}))
    assert_flows(node, [("p3->p2 tcp/80 tenant B allows", p3, "tcp", p2.ip, 80, True)], tmp_path)

    # tenant A adds an ipBlock no ipset can hold: it alone is left out, p1 stays isolated
    worker.call("apply", node_state(node, ingress={1: iso(a_base, huge()), 2: iso(*b_web)}, version=2))
    assert_flows(
        node,
        [
            ("p3->p1 tcp/8080 only the rejected policy allows it", p3, "tcp", p1.ip, 8080, False),
            ("p2->p1 tcp/80 tenant A's other policy", p2, "tcp", p1.ip, 80, True),
        ],
        tmp_path,
    )
    assert set(worker.call("rejections")) == {"tenant-a/huge"}

    # tenant B revokes p3's allow while A's policy is still too big: the revocation takes effect
    worker.call("apply", node_state(node, ingress={1: iso(a_base, huge()), 2: iso(b_web[0])}, version=3))
    assert_flows(
        node,
        [
            ("p3->p2 tcp/80 revoked by tenant B", p3, "tcp", p2.ip, 80, False),
            ("p1->p2 tcp/80 still allowed", p1, "tcp", p2.ip, 80, True),
        ],
        tmp_path,
    )
    rejection = worker.call("rejections")["tenant-a/huge"]
    assert rejection.table.startswith("ipset pf-n4-") and rejection.cost == 11
    assert "nomatch" not in node.in_node("ipset", "save").stdout  # the set was never built

    # tenant A fixes its policy: it is enforced, nothing is rejected any more
    fixed = Allow(CidrPeer(ipaddress.ip_network(f"{p3.ip}/32")), TCP, 8080, 8080, "tenant-a/huge")
    worker.call("apply", node_state(node, ingress={1: iso(a_base, fixed), 2: iso(b_web[0])}, version=4))
    assert worker.call("rejections") == {}
    assert_flows(node, [("p3->p1 tcp/8080 the fixed policy", p3, "tcp", p1.ip, 8080, True)], tmp_path)
