"""The eBPF compiler's tiered cells (agent/dataplane/bpf/tiered.py) and their trip over the wire.

Overlapping rules of one (policy, class) must become cells the maps answer exactly: the lookup
takes the exact-port hash first, then the longest prefix, so each port must find the verdict of
the lowest-ranked rules covering it, protocol-0 rules folded in. Read back here the way the
datapath reads the maps, port by port.
"""

from __future__ import annotations

import ipaddress

import pytest

from agent.control.encode import snapshot_message
from agent.dataplane.bpf.compiler import port_range_prefixes
from agent.dataplane.bpf.structs import (
    ACT_ACCEPT,
    ACT_DENY,
    ACT_PASS,
    POLICY_PREFIX_ANY_PROTOCOL,
    POLICY_PREFIX_PROTOCOL,
    verdict_word,
)
from agent.dataplane.bpf.tiered import PolicyEntry, cell_entries, split_leaf_value
from agent.dataplane.types import TIER_ADMIN, TIER_BASELINE, CidrPeer, IdentityPeer
from agent.node.decode import MalformedMessage, apply_message
from agent.policy.compiled import (
    CidrRef,
    DirectionAllows,
    EndpointPolicy,
    IdentityRef,
    NodePolicy,
    TieredEntry,
)

PEER = IdentityPeer(7)
TCP, UDP = 6, 17


def lookup(entries: dict[PolicyEntry, int], protocol: int, port: int) -> int | None:
    """The verdict word the datapath reads for (protocol, port): the longest prefix that matches
    (a single port, POLICY_PREFIX_FULL, is the longest there is: the exact hash answers alike)."""
    for (prefixlen, _pid, _cls, _kind, entry_protocol, value), leaf in sorted(entries.items(), reverse=True):
        if prefixlen == POLICY_PREFIX_ANY_PROTOCOL:
            matches = True
        else:
            bits = prefixlen - POLICY_PREFIX_PROTOCOL
            mask = (0xFFFF << (16 - bits)) & 0xFFFF
            matches = entry_protocol == protocol and (port & mask) == value
        if matches:
            return split_leaf_value(leaf)[1]
    return None


def test_overlapping_ranges_and_any_protocol_resolve_to_the_first_rule_per_port() -> None:
    rules = [
        (TCP, 80, 80, PEER, TIER_ADMIN, 1, ACT_DENY),
        (TCP, 0, 65535, PEER, TIER_ADMIN, 2, ACT_ACCEPT),
        (0, 0, 65535, PEER, TIER_ADMIN, 3, ACT_PASS),
        (UDP, 50, 60, PEER, TIER_BASELINE, 4, ACT_DENY),
        (0, 0, 65535, PEER, TIER_BASELINE, 1, ACT_ACCEPT),
    ]
    ordered = dict(cell_entries(9, 3, 1, rules, port_range_prefixes))
    baseline_accept = (1, ACT_ACCEPT)
    assert lookup(ordered, TCP, 80) == verdict_word((1, ACT_DENY), baseline_accept)
    assert lookup(ordered, TCP, 81) == verdict_word((2, ACT_ACCEPT), baseline_accept)
    assert lookup(ordered, UDP, 55) == verdict_word((3, ACT_PASS), baseline_accept)  # rank 1 < 4
    assert lookup(ordered, UDP, 61) == verdict_word((3, ACT_PASS), baseline_accept)
    assert lookup(ordered, 1, 0) == verdict_word((3, ACT_PASS), baseline_accept)


def test_rank_limits_are_refused_not_wrapped() -> None:
    with pytest.raises(ValueError, match="Admin-tier"):
        verdict_word((1 << 14, ACT_DENY), None)


def _node_policy(entry: TieredEntry) -> NodePolicy:
    direction = DirectionAllows(False, (), (entry,))
    endpoint = EndpointPolicy("ns", "a", (ipaddress.ip_address("10.0.0.1"),), direction, DirectionAllows())
    return NodePolicy({"ns/a": endpoint}, {7: (ipaddress.ip_address("10.0.0.2"),)})


def test_tiered_entries_cross_the_wire() -> None:
    entry = TieredEntry(TIER_ADMIN, 3, ACT_PASS, IdentityRef(7), TCP, 80, 90, "guard")
    state = apply_message(None, snapshot_message(1, _node_policy(entry)))
    (decoded,) = state.endpoints["ns/a"].ingress.tiered
    assert (decoded.tier, decoded.rank, decoded.action, decoded.peer) == (TIER_ADMIN, 3, ACT_PASS, PEER)
    assert (decoded.protocol, decoded.port_first, decoded.port_last, decoded.policy) == (TCP, 80, 90, "guard")
    assert not state.endpoints["ns/a"].ingress.isolated and state.endpoints["ns/a"].ingress.judged


@pytest.mark.parametrize(("tier", "action"), [(3, ACT_DENY), (TIER_ADMIN, 4), (0, ACT_DENY)])
def test_unknown_tier_or_action_is_a_malformed_message(tier: int, action: int) -> None:
    message = snapshot_message(1, _node_policy(TieredEntry(TIER_ADMIN, 1, ACT_DENY, IdentityRef(7), 0)))
    wire = message.snapshot.endpoints[0].ingress.tiered[0]
    wire.tier, wire.action = tier, action
    with pytest.raises(MalformedMessage, match=r"unknown (tier|action)"):
        apply_message(None, message)


def test_a_cidr_peer_entry_is_kept_as_cidr() -> None:
    entry = TieredEntry(TIER_BASELINE, 1, ACT_DENY, CidrRef(ipaddress.ip_network("10.9.0.0/24")), 0)
    state = apply_message(None, snapshot_message(1, _node_policy(entry)))
    assert state.endpoints["ns/a"].ingress.tiered[0].peer == CidrPeer(ipaddress.ip_network("10.9.0.0/24"))
