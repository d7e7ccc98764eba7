"""The hostile-pod attacks of issue 21 items 1 and 2 against the iptables dataplane, which keeps no
flow state of its own: kernel conntrack only confirms a connection whose first packet passed every
hook, so a frame dropped before FORWARD (TTL or hop limit 1, a bad checksum, a foreign MAC, a
source route) opens nothing, and an ICMP error is RELATED only when it quotes a confirmed
connection and goes back to the quoted packet's sender."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.dataplane.iptables import IptablesDataplane
from tests.privileged import hostile_frames as h
from tests.privileged.iptables_netns import DataplaneWorker, Node, running
from tests.privileged.test_iptables_dataplane import UDP, from_pod, isolated, node_state


@pytest.fixture
def node() -> Iterator[Node]:
    lab = Node()
    try:
        lab.create(3)
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def dataplane(node: Node) -> Iterator[DataplaneWorker]:
    with running(node.netns, IptablesDataplane) as worker:
        yield worker


def test_packets_dropped_before_forward_open_no_reply_path(node: Node, dataplane: DataplaneWorker) -> None:
    a, b, _ = node.pods
    macs = (h.link_mac(node.netns, a.host_if), h.link_mac(a.netns, "eth0"))
    assert a.ip6 and b.ip6
    addresses = {4: (a.ip, b.ip), 6: (a.ip6, b.ip6)}

    dataplane.call("apply", node_state(node, ingress={1: isolated()}, egress={1: isolated(from_pod(b, UDP))}))
    answered = h.answered(a.netns, b.netns, addresses, macs, h.forwarded(), 40000)
    assert answered == ["forwarded ipv4", "forwarded ipv6"]  # the control: an open path is seen

    dataplane.call("apply", node_state(node, ingress={1: isolated()}, egress={1: isolated()}, version=2))
    frames = h.DROPPED_BEFORE_THE_HOOK + h.forwarded()
    assert h.answered(a.netns, b.netns, addresses, macs, frames, 41000) == []


def test_forged_icmp_errors_do_not_reach_an_isolated_pod(node: Node, dataplane: DataplaneWorker) -> None:
    """Including from a pod claiming to route the victim's packet: nf_conntrack takes an error
    from any source for one from a router on the path, so a pod's related errors must quote a
    packet sent to that pod (the podfence:icmperr rules; issue 21 item 1)."""
    a, b, c = node.pods
    dataplane.call("apply", node_state(node, ingress={1: isolated()}, egress={1: isolated(from_pod(b, UDP))}))
    assert h.forged_errors_seen(a, b, c) == h.FORGED_ERRORS_EXPECTED
