"""Answers "is this allowed?" from the compiled form alone, the way a dataplane would.

Exists so tests can hold the compiler against the reference evaluator: if the two disagree on
any connection, the compiled lists the node enforces are wrong.
"""

from __future__ import annotations

from agent.model.objects import IPAddress
from agent.policy.compiled import (
    ACTION_DENY,
    ACTION_PASS,
    PROTOCOL_ANY,
    TIER_ADMIN,
    AllowEntry,
    CidrRef,
    NodePolicy,
    TieredEntry,
)

INGRESS, EGRESS = "ingress", "egress"


def entry_allows(
    entry: AllowEntry | TieredEntry, node_policy: NodePolicy, peer_ip: IPAddress, protocol: int, port: int
) -> bool:
    if entry.protocol != PROTOCOL_ANY and entry.protocol != protocol:
        return False
    if not entry.port_first <= port <= entry.port_last:
        return False
    peer = entry.peer
    if isinstance(peer, CidrRef):
        return (
            peer_ip.version == peer.cidr.version
            and peer_ip in peer.cidr
            and not any(peer_ip.version == e.version and peer_ip in e for e in peer.excepts)
        )
    return peer_ip in node_policy.identities.get(peer.identity, ())


def compiled_allows(
    node_policy: NodePolicy, endpoint_key: str, direction: str, peer_ip: IPAddress, protocol: int, port: int
) -> bool:
    """Does the compiled policy of local endpoint `endpoint_key` allow this direction of a new flow?

    `peer_ip` is the far side (the source on ingress, the destination on egress); `port` is the
    destination port (0 for protocols without ports).
    """
    endpoint = node_policy.endpoints[endpoint_key]
    allows = endpoint.ingress if direction == INGRESS else endpoint.egress
    hits = [e for e in allows.tiered if entry_allows(e, node_policy, peer_ip, protocol, port)]
    # Admin: the first (lowest-rank) hit decides unless it is a Pass, which skips to NetworkPolicy
    admin = min((e for e in hits if e.tier == TIER_ADMIN), key=lambda e: e.rank, default=None)
    if admin is not None and admin.action != ACTION_PASS:
        return admin.action != ACTION_DENY
    if allows.isolated:
        return any(entry_allows(e, node_policy, peer_ip, protocol, port) for e in allows.allows)
    # Baseline (compiled only when not isolated; its Pass is compiled as Accept), then allow
    baseline = min((e for e in hits if e.tier != TIER_ADMIN), key=lambda e: e.rank, default=None)
    return baseline is None or baseline.action != ACTION_DENY
