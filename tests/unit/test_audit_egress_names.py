"""Egress audit verdicts in the agent (agent/dataplane/bpf/flow_records.py), without root.

The kernel judges a new ingress flow by its audit view; the egress one is judged here, from the
allowed record the datapath sends for every newly admitted egress flow (nf_egress_link has no
room for the lookup, bpf/lib/audit.h). These check the matching against the kernel's rules
(peer, protocol, port, Admin before the rest, Baseline Pass admits, isolation) and the count.
The kernel side is checked end to end by tests/privileged/test_bpf_audit.py."""

from __future__ import annotations

import ipaddress

from agent.dataplane.bpf.flow_records import NO_RULE_MATCHED, FlowNamer, RawFlow
from agent.dataplane.bpf.structs import FLOW_ALLOWED, FLOW_DENIED
from agent.dataplane.flows import FlowVerdict
from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    ACTION_PASS,
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

POD, PEER, OUTSIDE = (ipaddress.ip_address(a) for a in ("10.0.0.1", "10.1.0.7", "192.0.2.9"))
EGRESS, INGRESS = 1, 0
TO_PEER_80 = Allow(IdentityPeer(7), 6, 80, 80, "ns/enforced", "egress[0]")


def raw(
    destination: IPAddress = PEER, port: int = 80, verdict: int = FLOW_ALLOWED, direction: int = EGRESS
) -> RawFlow:
    return RawFlow(
        time_ns=0,
        endpoint_id=3,
        direction=direction,
        verdict=verdict,
        reason=Reason.ALLOWED if verdict == FLOW_ALLOWED else Reason.POLICY,
        protocol=6,
        source=POD if direction == EGRESS else destination,
        destination=destination if direction == EGRESS else POD,
        source_port=40000,
        destination_port=port,
        policy_id=5,
        verdict_word=0,
        packets=1,
        bytes=60,
    )


def namer(egress: DirectionPolicy, ingress: DirectionPolicy | None = None) -> FlowNamer:
    pod = Endpoint("ns/web", (POD,), ingress=ingress or DirectionPolicy(), egress=egress, ifindex=1)
    named = FlowNamer()
    named.update(NodeState(1, {pod.key: pod}, {7: (PEER,)}), {3: "ns/web"})
    return named


def test_an_audit_networkpolicy_isolating_egress_denies_what_it_does_not_allow() -> None:
    audit = DirectionPolicy(isolated=True, allows=(TO_PEER_80,))
    named = namer(DirectionPolicy(audit=audit))
    kept = named.name(raw(PEER, 80), 0, 0)
    denied = named.name(raw(PEER, 81), 0, 0)
    outside = named.name(raw(OUTSIDE, 80), 0, 0)
    assert kept.verdict is FlowVerdict.ALLOWED
    assert (denied.verdict, denied.policy, denied.rule) == (FlowVerdict.AUDIT_DENIED, "", NO_RULE_MATCHED)
    assert outside.verdict is FlowVerdict.AUDIT_DENIED
    assert named.egress_audit_denied() == {"ns/web": 2}


def test_an_admin_deny_in_audit_is_named_and_an_admin_accept_before_it_wins() -> None:
    deny = TieredAllow(
        TIER_ADMIN,
        5,
        ACTION_DENY,
        CidrPeer(ipaddress.ip_network("10.1.0.0/16")),
        6,
        0,
        65535,
        "no-10-1",
        "block",
    )
    accept_80 = TieredAllow(TIER_ADMIN, 2, ACTION_ACCEPT, IdentityPeer(7), 6, 80, 80, "web-ok", "http")
    audit = DirectionPolicy(isolated=True, allows=(TO_PEER_80,), tiered=(deny, accept_80))
    named = namer(DirectionPolicy(isolated=True, allows=(TO_PEER_80,), audit=audit))
    assert named.name(raw(PEER, 80), 0, 0).verdict is FlowVerdict.ALLOWED  # rank 2 before rank 5
    denied = named.name(raw(PEER, 443), 0, 0)
    assert (denied.verdict, denied.tier, denied.policy, denied.rule) == (
        FlowVerdict.AUDIT_DENIED,
        "admin",
        "no-10-1",
        "block",
    )
    assert denied.rule_ref != 0 and named.rule_of(denied.rule_ref) == ("admin", "no-10-1", "block")


def test_an_admin_pass_hands_over_and_a_baseline_pass_admits() -> None:
    passes = TieredAllow(TIER_ADMIN, 1, ACTION_PASS, IdentityPeer(7), 6, 0, 65535, "hand-over", "p")
    base_deny = TieredAllow(TIER_BASELINE, 3, ACTION_DENY, IdentityPeer(7), 6, 443, 443, "base", "no-tls")
    base_pass = TieredAllow(TIER_BASELINE, 2, ACTION_PASS, IdentityPeer(7), 6, 22, 22, "base", "ssh")
    audit = DirectionPolicy(tiered=(passes, base_deny, base_pass))
    named = namer(DirectionPolicy(audit=audit))
    denied = named.name(raw(PEER, 443), 0, 0)
    assert (denied.verdict, denied.tier, denied.policy, denied.rule) == (
        FlowVerdict.AUDIT_DENIED,
        "baseline",
        "base",
        "no-tls",
    )
    assert named.name(raw(PEER, 22), 0, 0).verdict is FlowVerdict.ALLOWED
    assert named.name(raw(PEER, 8080), 0, 0).verdict is FlowVerdict.ALLOWED  # open: no one isolates


def test_only_allowed_egress_records_are_judged_here() -> None:
    """A denied record stays denied; ingress audit verdicts are the kernel's (not judged again)."""
    isolated = DirectionPolicy(isolated=True)
    named = namer(DirectionPolicy(audit=isolated), ingress=DirectionPolicy(audit=isolated))
    assert named.name(raw(PEER, 80, verdict=FLOW_DENIED), 0, 0).verdict is FlowVerdict.DENIED
    assert named.name(raw(PEER, 80, direction=INGRESS), 0, 0).verdict is FlowVerdict.ALLOWED
    assert named.egress_audit_denied() == {}


def test_the_count_of_an_endpoint_goes_with_it() -> None:
    named = namer(DirectionPolicy(audit=DirectionPolicy(isolated=True)))
    named.name(raw(), 0, 0)
    assert named.egress_audit_denied() == {"ns/web": 1}
    named.update(NodeState(2), {})
    assert named.egress_audit_denied() == {}
