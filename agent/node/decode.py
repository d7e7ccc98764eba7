"""Decoding the control service's messages into the dataplane's NodeState.

A snapshot replaces the node's state, a delta patches it: whole endpoints, or the allow entries
that leave and join an endpoint's lists (kept in the dataplane's order, so that a patched list
equals the one a snapshot would bring). Anything malformed raises MalformedMessage naming where,
and the state is left as it was: the sync client (sync.py) nacks the version and reopens the
stream. DecodeCache keeps decoded allows between messages, since most of a delta's were seen.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
from dataclasses import replace

from agent.api import podfence_pb2 as pb
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
    Peer,
    TieredAllow,
    allow_order,
)

log = logging.getLogger(__name__)


class MalformedMessage(ValueError):
    """The control service sent something that cannot be turned into a NodeState."""


# --- proto -> dataplane types -----------------------------------------------------------------------


def _ip(text: str, where: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise MalformedMessage(f"{where}: bad IP address {text!r}") from exc


def _network(text: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise MalformedMessage(f"{where}: bad CIDR {text!r}") from exc


def _allow(allow: pb.Allow, where: str) -> Allow:
    kind = allow.peer.WhichOneof("kind")
    peer: Peer
    if kind == "identity":
        peer = IdentityPeer(allow.peer.identity)
    elif kind == "cidr":
        block = allow.peer.cidr
        cidr = _network(block.cidr, where)
        excepts = tuple(_network(e, where) for e in getattr(block, "except"))
        if any(e.version != cidr.version for e in excepts):
            raise MalformedMessage(f"{where}: except of another IP family than {cidr}")
        peer = CidrPeer(cidr, excepts)
    else:
        raise MalformedMessage(f"{where}: allow without a peer")
    if allow.protocol > 255:
        raise MalformedMessage(f"{where}: bad IP protocol {allow.protocol}")
    if not allow.port_first <= allow.port_last <= 65535:
        raise MalformedMessage(f"{where}: bad port range {allow.port_first}-{allow.port_last}")
    return Allow(peer, allow.protocol, allow.port_first, allow.port_last, allow.policy, allow.rule)


def _tiered(entry: pb.TieredAllow, where: str, cache: DecodeCache) -> TieredAllow:
    if entry.tier not in (TIER_ADMIN, TIER_BASELINE):
        raise MalformedMessage(f"{where}: unknown tier {entry.tier}")
    if entry.action not in (ACTION_ACCEPT, ACTION_DENY, ACTION_PASS):
        raise MalformedMessage(f"{where}: unknown action {entry.action}")
    if not entry.HasField("allow"):
        raise MalformedMessage(f"{where}: tiered entry without a match")
    allow_wire = entry.allow.SerializeToString(deterministic=True)
    allow = cache.allows.get(allow_wire)
    if allow is None:
        allow = cache.allows[allow_wire] = _allow(entry.allow, where)
    return TieredAllow(
        entry.tier, entry.rank, entry.action, allow.peer, allow.protocol, allow.port_first, allow.port_last,
        allow.policy, allow.rule,
    )


class DecodeCache:
    """Decoded allows and directions by their wire bytes, kept from one message to the next.

    Every endpoint selected by the same policies carries the same allow list, and a delta resends
    a changed endpoint's whole list: parsing 10,000 ipBlocks costs ~200 ms each time, looking
    their bytes up a few ms. The same DirectionPolicy object for equal lists also lets the
    compiler hash each list once. Bounded: emptied when it outgrows `max_allows`.
    """

    def __init__(self, max_allows: int = 1_000_000) -> None:
        self.max_allows = max_allows
        self.allows: dict[bytes, Allow] = {}
        self.directions: dict[bytes, DirectionPolicy] = {}

    def trim(self) -> None:
        if len(self.allows) > self.max_allows or len(self.directions) > self.max_allows // 16:
            self.allows.clear()
            self.directions.clear()


def _cached_allow(allow: pb.Allow, where: str, cache: DecodeCache) -> Allow:
    wire = allow.SerializeToString(deterministic=True)
    decoded = cache.allows.get(wire)
    if decoded is None:
        decoded = cache.allows[wire] = _allow(allow, where)
    return decoded


def _direction(direction: pb.DirectionPolicy, where: str, cache: DecodeCache) -> DirectionPolicy:
    if not direction.isolated and direction.allows:
        raise MalformedMessage(f"{where}: allows on a direction that is not isolated")
    wire = direction.SerializeToString(deterministic=True)
    known = cache.directions.get(wire)
    if known is not None:
        return known
    # the control service sends its own order; the agent's must not depend on it (see _patched)
    allows = sorted((_cached_allow(allow, where, cache) for allow in direction.allows), key=allow_order)
    tiered = tuple(_tiered(entry, where, cache) for entry in direction.tiered)
    audit = None
    if direction.HasField("audit"):
        if direction.audit.HasField("audit"):
            raise MalformedMessage(f"{where}: an audit view inside an audit view")
        audit = _direction(direction.audit, f"{where} audit", cache)
    decoded = DirectionPolicy(direction.isolated, tuple(allows), tiered, audit)
    cache.directions[wire] = decoded
    return decoded


def endpoint_from_proto(endpoint: pb.Endpoint, cache: DecodeCache | None = None) -> Endpoint:
    key = f"{endpoint.namespace}/{endpoint.name}"
    if not endpoint.namespace or not endpoint.name:
        raise MalformedMessage(f"endpoint {key!r} without a namespace or name")
    cache = DecodeCache() if cache is None else cache
    return Endpoint(
        key=key,
        ips=tuple(_ip(ip, f"endpoint {key}") for ip in endpoint.ips),
        ingress=_direction(endpoint.ingress, f"endpoint {key} ingress", cache),
        egress=_direction(endpoint.egress, f"endpoint {key} egress", cache),
    )


def _identity_ips(identity: pb.Identity) -> tuple[IPAddress, ...]:
    return tuple(_ip(ip, f"identity {identity.id}") for ip in identity.ips)


def apply_message(
    current: NodeState | None, message: pb.ControlMessage, cache: DecodeCache | None = None
) -> NodeState:
    """The state after `message`: a snapshot replaces `current`, a delta patches it."""
    cache = DecodeCache() if cache is None else cache
    cache.trim()
    body = message.WhichOneof("body")
    if body == "snapshot":
        fresh = [endpoint_from_proto(e, cache) for e in message.snapshot.endpoints]
        return NodeState(
            version=message.version,
            endpoints={e.key: e for e in fresh},
            identities={i.id: _identity_ips(i) for i in message.snapshot.identities},
        )
    if body != "delta":
        raise MalformedMessage("a message that is neither snapshot nor delta")
    if current is None:
        raise MalformedMessage(f"delta {message.version} before any snapshot")
    if message.version <= current.version:
        raise MalformedMessage(f"delta {message.version} does not follow version {current.version}")
    delta = message.delta
    endpoints = dict(current.endpoints)
    for key in delta.remove_endpoints:
        endpoints.pop(key, None)
    for proto_endpoint in delta.upsert_endpoints:
        endpoint = endpoint_from_proto(proto_endpoint, cache)
        endpoints[endpoint.key] = endpoint
    identities = dict(current.identities)
    for identity_id in delta.remove_identities:
        identities.pop(identity_id, None)
    for identity in delta.upsert_identities:
        identities[identity.id] = _identity_ips(identity)
    patched: PatchMemo = {}
    for patch in delta.patch_endpoints:
        key = f"{patch.namespace}/{patch.name}"
        held = endpoints.get(key)
        if held is None:
            raise MalformedMessage(f"patch of endpoint {key!r}, which the agent does not hold")
        endpoints[key] = replace(
            held,
            ingress=_patched(held.ingress, patch.ingress, f"endpoint {key} ingress", cache, patched),
            egress=_patched(held.egress, patch.egress, f"endpoint {key} egress", cache, patched),
        )
    return replace(current, version=message.version, endpoints=endpoints, identities=identities)


# (id of the direction patched, the patch's bytes) -> (that direction, kept alive; the result)
PatchMemo = dict[tuple[int, bytes], tuple[DirectionPolicy, DirectionPolicy]]


def _patched(
    direction: DirectionPolicy, patch: pb.DirectionPatch, where: str, cache: DecodeCache, memo: PatchMemo
) -> DirectionPolicy:
    """`direction` less the allows the patch removes, plus those it adds. Endpoints that shared
    one list before share the patched one (the compilers hash each list object once)."""
    if not patch.remove and not patch.add:
        return direction
    if not direction.isolated:
        raise MalformedMessage(f"{where}: allows patched on a direction that is not isolated")
    wire = patch.SerializeToString(deterministic=True)
    known = memo.get((id(direction), wire))
    if known is not None:
        return known[1]
    leaving = {_cached_allow(allow, where, cache) for allow in patch.remove}
    kept = [allow for allow in direction.allows if allow not in leaving]
    if len(kept) != len(direction.allows) - len(leaving):
        # The lists diverged from the control service's view: only a snapshot can mend that.
        raise MalformedMessage(f"{where}: the patch removes an allow the list does not hold")
    for allow in patch.add:
        # in place, so that the list equals the one a snapshot would give (the iptables
        # compiler names chains after their rules in order): O(log n) keys, one C memmove
        bisect.insort(kept, _cached_allow(allow, where, cache), key=allow_order)
    # a patch never changes tiers nor the audit view (agent.control.encode)
    result = DirectionPolicy(True, tuple(kept), direction.tiered, direction.audit)
    memo[(id(direction), wire)] = (direction, result)
    return result


# --- the client -------------------------------------------------------------------------------------
