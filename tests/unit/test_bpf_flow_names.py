"""Naming flow events (agent/dataplane/bpf/flow_records.py) without root: what the datapath sends
(policy id, merged verdict word) against the NodeState applied, to tier/policy/rule and rule_ref."""

from __future__ import annotations

import ipaddress

import pytest

from agent.dataplane.bpf.flow_records import (
    NO_POLICY,
    NO_RULE_MATCHED,
    NO_RULE_OPEN,
    NODE_TRAFFIC,
    FlowNamer,
    RawFlow,
)
from agent.dataplane.bpf.structs import (
    ACT_ACCEPT,
    ACT_DENY,
    ACT_PASS,
    FLOW_ALLOWED,
    FLOW_DENIED,
    verdict_word,
)
from agent.dataplane.flows import FlowVerdict
from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    TIER_ADMIN,
    TIER_BASELINE,
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    NodeState,
    Reason,
    TieredAllow,
)

POD, PEER, OUTSIDE, NODE = (
    ipaddress.ip_address(a) for a in ("10.0.0.1", "10.1.0.7", "192.0.2.9", "10.9.0.1")
)
INGRESS, EGRESS = 0, 1


def raw(
    verdict: int,
    reason: Reason,
    policy_id: int = 5,
    word: int = 0,
    source: IPAddress = PEER,
    port: int = 80,
    direction: int = INGRESS,
) -> RawFlow:
    destination = POD if direction == INGRESS else source
    return RawFlow(
        time_ns=0,
        endpoint_id=3,
        direction=direction,
        verdict=verdict,
        reason=reason,
        protocol=6,
        source=source if direction == INGRESS else POD,
        destination=destination,
        source_port=40000,
        destination_port=port,
        policy_id=policy_id,
        verdict_word=word,
        packets=1,
        bytes=60,
    )


def namer(ingress: DirectionPolicy) -> FlowNamer:
    pod = Endpoint("ns/web", (POD,), ingress=ingress, ifindex=1)
    named = FlowNamer()
    named.update(NodeState(1, {pod.key: pod}, {7: (PEER,)}, (NODE,)), {3: "ns/web"})
    return named


ALLOWS = DirectionPolicy(
    isolated=True,
    allows=(
        Allow(IdentityPeer(7), 6, 443, 443, "ns/tls", "ingress[0]"),
        Allow(
            CidrPeer(ipaddress.ip_network("10.1.0.0/16"), (ipaddress.ip_network("10.1.0.7/32"),)),
            6,
            80,
            80,
            "ns/net",
            "ingress[0]",
        ),
        Allow(IdentityPeer(7), 6, 80, 90, "ns/web", "ingress[2]"),
    ),
)


def test_a_network_policy_allow_is_the_first_that_matches_peer_protocol_and_port() -> None:
    record = namer(ALLOWS).name(raw(FLOW_ALLOWED, Reason.ALLOWED), 0, 0)
    # the CIDR peer excepts PEER, the first identity allow is another port
    assert (record.verdict, record.tier, record.policy, record.rule) == (
        FlowVerdict.ALLOWED,
        "networkpolicy",
        "ns/web",
        "ingress[2]",
    )
    assert record.rule_ref != 0 and record.reason == ""


def test_no_rule_decided_says_why_with_no_rule_ref() -> None:
    named = namer(ALLOWS)
    denied = named.name(raw(FLOW_DENIED, Reason.POLICY, port=22), 0, 0)
    assert (denied.tier, denied.policy, denied.rule, denied.rule_ref, denied.reason) == (
        "networkpolicy",
        "",
        NO_RULE_MATCHED,
        0,
        "policy",
    )
    open_pod = named.name(raw(FLOW_ALLOWED, Reason.ALLOWED, policy_id=0), 0, 0)
    assert (open_pod.tier, open_pod.rule, open_pod.rule_ref) == ("default", NO_POLICY, 0)
    probe = named.name(raw(FLOW_ALLOWED, Reason.ALLOWED, source=NODE, port=8080), 0, 0)
    assert probe.rule == NODE_TRAFFIC
    spoofed = named.name(raw(FLOW_DENIED, Reason.SPOOFED_SOURCE, direction=EGRESS), 0, 0)
    assert (spoofed.reason, spoofed.policy, spoofed.rule, spoofed.direction) == (
        "spoofed_source",
        "",
        "",
        "egress",
    )


TIERED = DirectionPolicy(
    isolated=False,
    tiered=(
        TieredAllow(TIER_ADMIN, 1, ACTION_DENY, IdentityPeer(7), 6, 22, 22, "guard", "no-ssh"),
        TieredAllow(TIER_ADMIN, 2, ACTION_ACCEPT, IdentityPeer(7), 0, 0, 65535, "guard", "ingress[1]"),
        TieredAllow(
            TIER_BASELINE,
            1,
            ACTION_DENY,
            CidrPeer(ipaddress.ip_network("0.0.0.0/0")),
            0,
            0,
            65535,
            "base",
            "rest",
        ),
    ),
)


@pytest.mark.parametrize(
    ("word", "verdict", "expected"),
    [
        (verdict_word((1, ACT_DENY), None), FLOW_DENIED, ("admin", "guard", "no-ssh")),
        (verdict_word((2, ACT_ACCEPT), (1, ACT_DENY)), FLOW_ALLOWED, ("admin", "guard", "ingress[1]")),
        (
            verdict_word((3, ACT_PASS), (1, ACT_DENY)),
            FLOW_DENIED,
            ("baseline", "base", "rest"),
        ),  # Pass hands over
        (verdict_word(None, None), FLOW_ALLOWED, ("default", "", NO_RULE_OPEN)),
    ],
)
def test_a_tiered_verdict_word_names_the_rule_of_its_deciding_rank(
    word: int, verdict: int, expected: tuple[str, str, str]
) -> None:
    reason = Reason.ALLOWED if verdict == FLOW_ALLOWED else Reason.POLICY
    record = namer(TIERED).name(
        raw(verdict, reason, word=word, source=OUTSIDE if expected[1] == "base" else PEER), 0, 0
    )
    assert (record.tier, record.policy, record.rule) == expected


def test_rule_refs_are_stable_per_rule_and_resolve_back() -> None:
    named = namer(TIERED)
    first = named.name(raw(FLOW_DENIED, Reason.POLICY, word=verdict_word((1, ACT_DENY), None)), 0, 0)
    again = named.name(raw(FLOW_DENIED, Reason.POLICY, word=verdict_word((1, ACT_DENY), None), port=23), 0, 0)
    other = named.name(raw(FLOW_ALLOWED, Reason.ALLOWED, word=verdict_word((2, ACT_ACCEPT), None)), 0, 0)
    assert first.rule_ref == again.rule_ref != other.rule_ref
    assert named.rule_of(first.rule_ref) == ("admin", "guard", "no-ssh")
    assert named.rule_of(0) is None


def test_the_wall_clock_time_is_the_events_monotonic_time_moved_to_now() -> None:
    event = raw(FLOW_ALLOWED, Reason.ALLOWED, policy_id=0)
    record = namer(ALLOWS).name(RawFlow(**{**event.__dict__, "time_ns": 1_000}), 3_000, 10_000_000)
    assert record.time_ns == 10_000_000 - 2_000
