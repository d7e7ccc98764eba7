"""The hostile-pod attacks of issue 21 items 1 and 2 against the iptables dataplane, which keeps no
flow state of its own: kernel conntrack only confirms a connection whose first packet passed every
hook, so a frame dropped before FORWARD (TTL or hop limit 1, a bad checksum, a foreign MAC, a
source route) opens nothing, and an ICMP error is RELATED only when it quotes a confirmed
connection and goes back to the quoted packet's sender."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from agent.dataplane.iptables import IptablesDataplane
from agent.dataplane.types import Allow, CidrPeer
from tests.privileged import hostile_frames as h
from tests.privileged.iptables_netns import DataplaneWorker, Node, running
from tests.privileged.test_iptables_dataplane import UDP, from_pod, isolated, node_state


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


def test_a_remote_host_claiming_the_nodes_address_is_judged_by_policy(
    node: Node, dataplane: DataplaneWorker
) -> None:
    """The node's own traffic never crosses FORWARD (it leaves through OUTPUT), so a forwarded
    packet carrying the node's address as its source was forged: nothing on the path checks an
    IPv6 source against the node's own addresses. It must meet the pod's policy, not the node's
    exemption (the eBPF dataplane's rule: only what the node sent itself is node traffic)."""
    import secrets
    import subprocess
    import sys

    scapy = pytest.importorskip("scapy.all", reason="needs scapy (the test extra)")
    from agent.lab import wiring
    from tests.privileged.iptables_netns import NODE_IP6

    a = node.pods[0]
    assert a.ip6
    outside = f"{node.prefix}-out"
    node._create(outside)
    uplink = wiring.add_veth(node.netns, "pfvup0", outside)
    with wiring.ipr(node.netns) as ipr:
        ipr.addr("add", index=uplink, address="fd77::1", prefixlen=64)
    with wiring.ipr(outside) as ipr:
        ipr.addr("add", index=wiring.index(ipr, "eth0"), address="fd77::2", prefixlen=64)
    node_mac, outside_mac = wiring.mac(node.netns, "pfvup0"), wiring.mac(outside, "eth0")

    def reaches(source: str) -> bool:
        marker = f"podfence-{secrets.token_hex(6)}"
        frame = bytes(
            scapy.Ether(dst=node_mac, src=outside_mac) / scapy.IPv6(src=source, dst=a.ip6)
            / scapy.UDP(sport=4000, dport=53) / scapy.Raw(marker.encode())
        )
        sniffer = subprocess.Popen(
            h.enter(a.netns, sys.executable, str(h.TOOL), "sniff", "eth0", "1.5", marker),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "ready"
            send = h.enter(outside, sys.executable, str(h.TOOL), "send", "eth0", frame.hex())
            subprocess.run(send, check=True, timeout=30)
            return sniffer.stdout.readline().strip() == "seen"
        finally:
            sniffer.wait(timeout=10)

    outside_host = Allow(CidrPeer(ipaddress.ip_network("fd77::2/128")), 17, 53, 53)
    dataplane.call("apply", node_state(node, ingress={1: isolated(outside_host)}))
    assert reaches("fd77::2"), "the control: the outside host's own address is allowed"
    assert not reaches(NODE_IP6), "a forged node source passed the isolated pod's ingress"
