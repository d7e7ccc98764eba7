"""The compiled, per-node form of NetworkPolicy: what the control service streams to each node.

These are plain frozen values (hashable, comparable) so the control service can diff two
versions of a node's policy and send only the endpoints that changed. See the package docstring
for why allow lists are keyed by numeric identities and CIDRs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.model.objects import IPAddress, IPNetwork

PROTOCOL_ANY = 0  # an AllowEntry with protocol 0 matches every IP protocol, ICMP included
PORT_MIN, PORT_MAX = 0, 65535

IPV4_ALL = ipaddress.ip_network("0.0.0.0/0")
IPV6_ALL = ipaddress.ip_network("::/0")


@dataclass(frozen=True)
class IdentityRef:
    """Every pod whose (namespace, labels) identity is `identity`; its IPs are in NodePolicy.identities."""

    identity: int
    # The peer's part of an entry's sort key, computed once per peer object rather than once per
    # entry: a wide selector puts one shared IdentityRef in thousands of policies' entries, and
    # spelling it per entry was the largest cost of building the 100,000-pod templates.
    sort_key: tuple[object, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sort_key", (0, self.identity, 0, 0, ()))


@dataclass(frozen=True)
class CidrRef:
    """Every address in `cidr` except those in `excepts` (an ipBlock, or a named-port pod's host route)."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()
    # as IdentityRef's
    sort_key: tuple[object, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        excepts = tuple((e.version, int(e.network_address), e.prefixlen) for e in self.excepts)
        key = (1, self.cidr.version, int(self.cidr.network_address), self.cidr.prefixlen, excepts)
        object.__setattr__(self, "sort_key", key)


PeerRef = IdentityRef | CidrRef


class _KeyedEntry:
    """Equality and hashing through `sort_key`, which spells every field (the peer as ints), so
    that both run in C: comparing two 10,000-entry allow lists field by field (ipaddress compares
    in Python) took 15 ms per endpoint of every delta. Subclasses are dataclasses with eq=False."""

    sort_key: tuple[object, ...]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.sort_key == other.sort_key  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.sort_key)


@dataclass(frozen=True, eq=False)
class AllowEntry(_KeyedEntry):
    """Traffic with `peer` on `protocol` (0 = any) to ports [port_first, port_last] is allowed.

    The port is the destination port: the endpoint's own port on ingress, the peer's on egress.
    `policy` ("ns/name") says which NetworkPolicy contributed the entry and `rule` which of its
    rules ("ingress[0]", "egress[2]"), for flow records, counters and explain.
    """

    peer: PeerRef
    protocol: int
    port_first: int = PORT_MIN
    port_last: int = PORT_MAX
    policy: str = ""
    rule: str = ""
    # Computed once: allow lists are re-sorted on every union, and a Python key call per entry
    # per sort dominated the resolver's update time.
    sort_key: tuple[object, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        key = (
            _peer_sort_key(self.peer),
            self.protocol,
            self.port_first,
            self.port_last,
            self.policy,
            self.rule,
        )
        object.__setattr__(self, "sort_key", key)


def _peer_sort_key(peer: PeerRef) -> tuple[object, ...]:
    """(0, identity, 0, 0, ()) or (1, version, network, prefix length, excepts): identities first."""
    return peer.sort_key


def entry_sort_key(entry: AllowEntry) -> tuple[object, ...]:
    """A total order over entries (mixed IPv4/IPv6 networks do not compare natively)."""
    return entry.sort_key


def normalize_allows(entries: Iterable[AllowEntry]) -> tuple[AllowEntry, ...]:
    """Sorted and deduplicated, so equal allow lists are equal tuples."""
    # Keyed by sort_key (equal iff the entries are equal): plain tuples hash and compare in C.
    unique = {entry.sort_key: entry for entry in entries}
    return tuple(unique[key] for key in sorted(unique))


# ClusterNetworkPolicy tiers and actions in the compiled form (agent.policy.tiered builds them).
TIER_ADMIN, TIER_BASELINE = 1, 2
ACTION_ACCEPT, ACTION_DENY, ACTION_PASS = 1, 2, 3


@dataclass(frozen=True, eq=False)
class TieredEntry(_KeyedEntry):
    """A ClusterNetworkPolicy verdict: traffic with `peer` on `protocol` (0 = any) to ports
    [port_first, port_last] gets `action` at precedence `rank` (lower first) of `tier`.

    Ranks are compact per endpoint and direction: every entry of one rule shares its rank, and the
    rules applying to the endpoint are numbered in tier order (policy priority, name, rule index).
    A Baseline Pass is compiled as Accept (only the default allow follows it). `policy` names the
    ClusterNetworkPolicy and `rule` its rule (the rule's name, else "ingress[i]"/"egress[i]"),
    for flow records, explain and logs.
    """

    tier: int
    rank: int
    action: int
    peer: PeerRef
    protocol: int
    port_first: int = PORT_MIN
    port_last: int = PORT_MAX
    policy: str = ""
    rule: str = ""
    sort_key: tuple[object, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        key = (self.tier, self.rank, self.action, _peer_sort_key(self.peer), self.protocol)
        object.__setattr__(self, "sort_key", (*key, self.port_first, self.port_last, self.policy, self.rule))


@dataclass(frozen=True)
class DirectionAllows:
    """One direction of one endpoint. `isolated`: some NetworkPolicy isolates it, so only `allows`
    pass the NetworkPolicy tier. `tiered`: the ClusterNetworkPolicy entries (Admin, and Baseline
    when not isolated), sorted. Neither = everything allowed (allows is then empty)."""

    isolated: bool = False
    allows: tuple[AllowEntry, ...] = ()  # sorted, deduplicated (see normalize_allows)
    tiered: tuple[TieredEntry, ...] = ()  # sorted by sort_key, deduplicated
    # The audit view (agent.policy.audit): this direction as it would be with every audit policy
    # enforced; present only when it differs. Never enforced: the kernel looks it up only on a new
    # flow the fields above allow, to record the flow as audit-denied.
    audit: DirectionAllows | None = None

    @property
    def identities(self) -> frozenset[int]:
        peers = [e.peer for e in self.allows] + [e.peer for e in self.tiered]
        own = frozenset(p.identity for p in peers if isinstance(p, IdentityRef))
        return own if self.audit is None else own | self.audit.identities


@dataclass(frozen=True)
class EndpointPolicy:
    """What the node must enforce on one local pod."""

    namespace: str
    name: str
    ips: tuple[IPAddress, ...]
    ingress: DirectionAllows
    egress: DirectionAllows

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NodePolicy:
    """Everything one node enforces: its endpoints and the IPs of every identity they reference.

    `identities` holds only identities referenced by this node's allow lists; an identity whose
    pods currently have no IP is present with an empty tuple (never silently omitted).
    """

    endpoints: Mapping[str, EndpointPolicy] = field(default_factory=dict)  # key "ns/name"
    identities: Mapping[int, tuple[IPAddress, ...]] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((frozenset(self.endpoints.items()), frozenset(self.identities.items())))
