"""Conntrack floods through the BPF dataplane (issue 21, item 10), on real traffic.

Pod a holds an idle UDP flow to pod b that only its egress admitted (a's ingress denies b), so b's
answer passes only while the flow's conntrack entry lives. Pod c opens thousands of new flows.
Without a bound the flood evicts a's entry from the shared LRU and b's answer is dropped (the
attack, shown by the control test); with flows_per_pod the flood costs only c: its flows
beyond the bound are dropped as flow_limit, and a's flow keeps working."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.bpf.structs import address_from_bytes
from agent.dataplane.types import Allow, IdentityPeer
from tests.privileged.bpf_netns import NODE_IP, Node, Pod
from tests.privileged.flood_lab import flood, idle_flow_survives_a_flood
from tests.privileged.test_bpf_traffic import IDENTITY_OF_POD, UDP, endpoint, isolated, state

pytestmark = pytest.mark.needs("nsenter", "bpffs")  # and root (conftest.py)

CT_MAX = 1024  # small, so that a flood of FLOOD flows fills it in well under a second
FLOOD = 20000
BOUND = 64


@pytest.fixture
def node() -> Iterator[Node]:
    lab = Node().create(3)
    try:
        yield lab
    finally:
        lab.destroy()


def start(node: Node, bound: int, egress_hook: str = "netfilter") -> BpfDataplane:
    plane = BpfDataplane(
        BpfSettings(
            pin_dir=node.pin_dir,
            netns=node.netns,
            state_file=node.state_file,
            egress_hook=egress_hook,
            ct_max=CT_MAX,
            flows_per_pod=bound,
        )
    )
    plane.start()
    a, b, c = node.pods
    to_b = Allow(IdentityPeer(IDENTITY_OF_POD[b.index]), UDP, 7000, 7000)
    plane.apply(state(node, endpoint(a, ingress=isolated(), egress=isolated(to_b)), endpoint(b), endpoint(c)))
    return plane


def flooder_entries(plane: BpfDataplane, pod: Pod) -> list[Any]:
    """The pf_ct keys of `pod`'s flows (the test plays the LRU's eviction with them)."""

    def ends(key: Any) -> set[str]:
        return {str(address_from_bytes(bytes(side.bytes))) for side in (key.addr_a, key.addr_b)}

    return [key for key in list(plane._module[b"pf_ct"]) if pod.ip in ends(key)]


def test_without_a_bound_a_flood_evicts_another_pods_idle_flow(node: Node) -> None:
    """The attack (and what the bounded test would show on main): c's flood evicts a's entry."""
    plane = start(node, bound=0)
    try:
        assert idle_flow_survives_a_flood(node.pods, NODE_IP, flood_size=0)  # the control: no flood, answered
        assert not idle_flow_survives_a_flood(node.pods, NODE_IP, FLOOD)
    finally:
        plane.teardown()


@pytest.mark.parametrize("egress_hook", ["netfilter", "iptables"])
def test_a_flood_costs_only_the_flooding_pod(node: Node, egress_hook: str) -> None:
    plane = start(node, bound=BOUND, egress_hook=egress_hook)
    try:
        assert idle_flow_survives_a_flood(node.pods, NODE_IP, FLOOD)
        drops = plane.drop_reason_counts()["flow_limit"]
        cpus = os.cpu_count() or 1
        # two datagrams a flow (flood_tool.py); the check and the charge race once per CPU
        assert 2 * (FLOOD - BOUND - cpus) <= drops <= 2 * (FLOOD - BOUND)
        held = flooder_entries(plane, node.pods[2])
        assert BOUND <= len(held) <= BOUND + cpus
        flooder = {c.direction: c for c in plane.counters() if c.key == "ns/pod3"}
        assert flooder["egress"].denied_packets == drops  # counted against the flooder
    finally:
        plane.teardown()


def test_entries_gone_from_the_map_are_given_back_by_the_count(node: Node) -> None:
    """An endpoint at its bound gets back what the LRU evicted and what expired, once counted."""
    plane = start(node, bound=BOUND)
    try:
        c = node.pods[2]
        flood(c, NODE_IP, 20000, BOUND)
        ct = plane._module[b"pf_ct"]
        held = flooder_entries(plane, c)
        assert len(held) == BOUND
        before = plane.drop_reason_counts()["flow_limit"]
        flood(c, NODE_IP, 30000, 10)
        assert plane.drop_reason_counts()["flow_limit"] == before + 2 * 10  # at its bound

        # half of c's entries evicted (as the LRU would, silently), one of them left expired
        for key in held[: BOUND // 2]:
            del ct[key]
        stale = held[BOUND // 2]
        value = ct[stale]
        value.last_seen_ns = 1  # idle since boot: expired for every protocol
        ct[stale] = value
        assert plane.release_conntrack() == 1  # the expired entry is deleted
        assert stale not in list(ct)
        flood(c, NODE_IP, 40000, BOUND)
        # BOUND // 2 + 1 came back: that many new flows are admitted, the rest dropped
        assert plane.drop_reason_counts()["flow_limit"] == before + 2 * (10 + BOUND - (BOUND // 2 + 1))
        assert len(flooder_entries(plane, c)) == BOUND
    finally:
        plane.teardown()
