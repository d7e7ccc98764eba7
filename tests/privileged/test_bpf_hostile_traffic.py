"""Hostile pods on real traffic through the BPF dataplane (issue 21, item 2): a pod isolated both
ways sends frames that tc ingress sees but the kernel drops before the egress hook (TTL or hop
limit 1, a bad IP checksum, a foreign destination MAC, a source route), then a peer "replies".
Nothing may reach the pod: no verdict admitted what it sent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.types import Allow, IdentityPeer
from tests.privileged import hostile_frames as h
from tests.privileged.bpf_netns import Node
from tests.privileged.test_bpf_traffic import IDENTITY_OF_POD, UDP, endpoint, isolated, state

pytestmark = pytest.mark.needs("nsenter", "bpffs")


@pytest.fixture
def node() -> Iterator[Node]:
    lab = Node().create(3)
    try:
        yield lab
    finally:
        lab.destroy()


@pytest.fixture(params=["netfilter", "iptables"])
def dataplane(node: Node, request: pytest.FixtureRequest) -> Iterator[BpfDataplane]:
    plane = BpfDataplane(node.settings(egress_hook=request.param))
    plane.start()
    try:
        yield plane
    finally:
        plane.teardown()


def test_packets_dropped_before_the_egress_hook_open_no_reply_path(
    node: Node, dataplane: BpfDataplane
) -> None:
    a, b, c = node.pods
    macs = (h.link_mac(node.netns, a.host_if), h.link_mac(a.netns, "eth0"))
    addresses = {4: (a.ip, b.ip), 6: (a.ip6, b.ip6)}
    to_b = Allow(IdentityPeer(IDENTITY_OF_POD[b.index]), UDP, 0, 65535)

    # control: with a's egress open to b, b's answer to what a really sent reaches a
    client = endpoint(a, ingress=isolated(), egress=isolated(to_b))
    dataplane.apply(state(node, client, endpoint(b), endpoint(c)))
    answered = h.answered(a.netns, b.netns, addresses, macs, h.forwarded(), 40000)
    assert answered == ["forwarded ipv4", "forwarded ipv6"]

    # a isolated both ways: whatever it sends, dropped before the hook or denied there, no answer
    # reaches it
    closed = endpoint(a, ingress=isolated(), egress=isolated())
    dataplane.apply(state(node, closed, endpoint(b), endpoint(c), version=2))
    frames = h.DROPPED_BEFORE_THE_HOOK + h.forwarded()
    assert h.answered(a.netns, b.netns, addresses, macs, frames, 41000) == []


def test_forged_icmp_errors_do_not_reach_an_isolated_pod(node: Node, dataplane: BpfDataplane) -> None:
    """Issue 21 item 1: a pod hands payload to a pod whose ingress denies it inside ICMP errors."""
    a, b, c = node.pods
    to_b = Allow(IdentityPeer(IDENTITY_OF_POD[b.index]), UDP, 0, 65535)
    client = endpoint(a, ingress=isolated(), egress=isolated(to_b))
    dataplane.apply(state(node, client, endpoint(b), endpoint(c)))
    assert h.forged_errors_seen(a, b, c) == h.FORGED_ERRORS_EXPECTED
