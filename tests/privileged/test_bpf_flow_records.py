"""Flow records of the BPF datapath (issue 24), frame by frame through BPF_PROG_TEST_RUN.

One record per flow and judgement, never one per packet: an allowed flow's first packet (where its
conntrack entry is admitted), a denied flow's first packet and then aggregates, each naming the
rule that decided. The pod sits behind ifindex 1 as in test_bpf_packets.py; a deny interval of
1 s (the knob PF_FLOW_DENY_INTERVAL) keeps the aggregation tests short. Real traffic between
network namespaces: test_bpf_flow_traffic.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.flow_records import NO_POLICY, NO_RULE_MATCHED
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    TIER_ADMIN,
    Allow,
    DirectionPolicy,
    IdentityPeer,
    TieredAllow,
)
from tests.privileged import bpf_frames as f
from tests.privileged.test_bpf_packets import PEER7, PEER8, POD, apply, iso, started_plane, verdict

pytestmark = pytest.mark.needs("bpffs")

TCP = 6
ACK = 0x10


@pytest.fixture(scope="module")
def plane() -> Iterator[BpfDataplane]:
    # "reset": each test's policy forgets the flows of the last
    yield from started_plane("reset", flow_deny_interval=1)


def records(plane: BpfDataplane, timeout_ms: int = 100) -> list[FlowRecord]:
    return list(plane.poll_flows(timeout_ms))


def fresh(plane: BpfDataplane) -> None:
    """Forget what earlier tests left: their records and their pending denied aggregates."""
    time.sleep(1.1)
    records(plane, 0)


WEB_RULES = iso(
    Allow(IdentityPeer(8), TCP, 80, 80, policy="ns/other", rule="ingress[0]"),
    Allow(IdentityPeer(7), TCP, 80, 80, policy="ns/web", rule="ingress[1]"),
)


def test_an_allowed_flow_is_one_record_naming_its_rule_and_established_packets_none(
    plane: BpfDataplane,
) -> None:
    apply(plane, WEB_RULES, None, version=10)
    fresh(plane)
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=41000, dport=80))  # the SYN
    for _ in range(20):  # its established segments: no record
        assert verdict(
            plane, "to_pod", f.eth(f.ETH_IP, f.ipv4(PEER7, POD, TCP, f.l4(TCP, 41000, 80, tcp_flags=ACK)))
        )
    (record,) = records(plane)
    assert record.verdict is FlowVerdict.ALLOWED and record.reason == ""
    assert (record.endpoint, record.direction, record.source, record.destination) == (
        "ns/pod",
        "ingress",
        PEER7,
        POD,
    )
    assert (record.protocol, record.source_port, record.destination_port, record.packets) == (
        TCP,
        41000,
        80,
        1,
    )
    assert (record.tier, record.policy, record.rule) == ("networkpolicy", "ns/web", "ingress[1]")
    assert record.rule_ref != 0 and record.bytes > 0
    assert abs(record.time_ns - time.time_ns()) < 5e9


def test_a_denied_flow_is_aggregated_never_one_record_per_packet(plane: BpfDataplane) -> None:
    apply(plane, iso(), None, version=20)
    fresh(plane)
    frame = f.tcp4(PEER7, POD, sport=42000, dport=22)
    for _ in range(10):
        assert not verdict(plane, "to_pod", frame)
    time.sleep(1.1)  # past the interval: the next denied packet sends what the flow holds
    for _ in range(5):
        assert not verdict(plane, "to_pod", frame)
    first = records(plane, 100)  # no sweep yet: the aggregates the datapath sent
    time.sleep(1.2)
    swept = records(plane, 100)  # the flow is quiet: what it still holds is sent from here
    every = first + swept
    assert sum(r.packets for r in every) == 15
    assert [r.packets for r in first] == [1, 10]  # the first packet, then 9 pending + the 11th
    assert len(swept) == 1
    for record in every:
        assert record.verdict is FlowVerdict.DENIED and record.reason == "policy"
        assert (record.tier, record.policy, record.rule, record.rule_ref) == (
            "networkpolicy",
            "",
            NO_RULE_MATCHED,
            0,
        )
        assert (record.source, record.destination_port) == (PEER7, 22)
    assert len(plane._module[b"pf_flow_denied"].items()) == 0  # swept entries are gone


def test_a_pod_no_policy_selects_is_allowed_by_no_rule(plane: BpfDataplane) -> None:
    apply(plane, None, None, version=30)
    fresh(plane)
    assert verdict(plane, "to_pod", f.tcp4(PEER8, POD, sport=43000, dport=8080))
    (record,) = records(plane)
    assert record.verdict is FlowVerdict.ALLOWED
    assert (record.tier, record.policy, record.rule, record.rule_ref) == ("default", "", NO_POLICY, 0)


def test_cluster_policy_verdicts_name_their_tier_policy_and_rule(plane: BpfDataplane) -> None:
    ingress = DirectionPolicy(
        isolated=False,
        tiered=(
            TieredAllow(
                TIER_ADMIN, 1, ACTION_DENY, IdentityPeer(7), TCP, 22, 22, policy="guard", rule="no-ssh"
            ),
            TieredAllow(TIER_ADMIN, 2, ACTION_ACCEPT, IdentityPeer(7), 0, policy="guard", rule="ingress[1]"),
        ),
    )
    apply(plane, ingress, None, version=40)
    fresh(plane)
    assert not verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=44000, dport=22))
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=44001, dport=80))
    denied, allowed = sorted(records(plane), key=lambda r: r.destination_port)
    assert (denied.verdict, denied.tier, denied.policy, denied.rule) == (
        FlowVerdict.DENIED,
        "admin",
        "guard",
        "no-ssh",
    )
    assert (allowed.verdict, allowed.tier, allowed.policy, allowed.rule) == (
        FlowVerdict.ALLOWED,
        "admin",
        "guard",
        "ingress[1]",
    )
    assert denied.rule_ref not in (0, allowed.rule_ref)


def test_a_flood_of_new_denied_flows_is_counted_lost_and_changes_no_verdict(plane: BpfDataplane) -> None:
    apply(plane, WEB_RULES, None, version=50)
    fresh(plane)
    lost_before = plane.flows_lost()
    flows = 2500  # above the budget of 1,000 records per CPU and second
    for port in range(flows):
        assert not verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=45000, dport=1000 + port))
    # the budget is spent, the datapath is not: an allowed flow still passes
    assert verdict(plane, "to_pod", f.tcp4(PEER7, POD, sport=45001, dport=80))
    received = [r for r in records(plane) if r.verdict is FlowVerdict.DENIED]
    lost = plane.flows_lost() - lost_before
    assert lost > 0
    assert len(received) + lost in (flows, flows + 1)  # the allowed flow's record: sent or lost
