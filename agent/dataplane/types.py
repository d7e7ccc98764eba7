"""What a node must enforce, in dataplane terms: endpoints, their allow lists and peer identities.

The node layer builds a NodeState from the control service's messages and the interfaces it
discovered; a Dataplane makes the kernel match it. Nothing here knows about Kubernetes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTO_ANY = 0  # an Allow with protocol 0 admits every IP protocol (ICMP included), every port
V4_MAPPED_SPACE = ipaddress.IPv6Network("::ffff:0:0/96")


class Reason(IntEnum):
    """Why a packet was dropped: enum pf_reason of bpf/podfence.h (checked against the compiled
    program by tests/privileged/test_bpf_mirror.py), numbered once, never renumbered, only
    appended to. Metrics labels (podfence_drops_total{reason}) and flow logs use the names in
    lower case; it lives here, beside the state both dataplanes enforce, so that code above the
    dataplanes names drops without importing the bpf package."""

    ALLOWED = 0
    POLICY = 1
    SPOOFED_SOURCE = 2
    UNKNOWN_ENDPOINT = 3
    MALFORMED = 4
    ORPHAN_FRAGMENT = 5
    UNSUPPORTED_L2 = 6
    SPOOFED_ARP = 7
    SPOOFED_NDP = 8
    VLAN_TAGGED = 9
    SPOOFED_MAC = 10
    ROGUE_NDP = 11
    IP_OPTIONS = 12
    FLOW_LIMIT = 13


REASON_MAX = 14


def canonical_network(network: IPNetwork) -> IPNetwork:
    """An IPv6 prefix inside ::ffff:0:0/96 as the IPv4 prefix it spells, as Go's net package
    (the API server, every Go CNI) reads it; the datapaths never see IPv4 in IPv6 clothing."""
    if network.version == 6 and network.subnet_of(V4_MAPPED_SPACE):  # type: ignore[arg-type]
        mapped = network.network_address.ipv4_mapped  # type: ignore[union-attr]
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


@dataclass(frozen=True, order=True)
class CidrPeer:
    """A CIDR minus its excepts. Host routes (/32, /128) carry per-pod named-port allows.
    Prefixes are kept canonical (see canonical_network), whoever builds the peer."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()
    # ipaddress hashes and compares in Python; the compiler hashes and compares every peer
    # several times per apply (10,000 peers: ~0.3 s), so both go through one tuple of ints
    _key: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cidr", canonical_network(self.cidr))
        object.__setattr__(self, "excepts", tuple(canonical_network(e) for e in self.excepts))
        key: list[int] = []
        for network in (self.cidr, *self.excepts):
            key += (network.version, int(network.network_address), network.prefixlen)
        object.__setattr__(self, "_key", tuple(key))
        object.__setattr__(self, "_hash", hash(self._key))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CidrPeer):
            return NotImplemented
        return self._key == other._key

    @property
    def int_key(self) -> tuple[int, ...]:
        """(version, address, prefixlen) of the cidr, then of each except: a total order, in C."""
        return self._key


@dataclass(frozen=True, order=True)
class IdentityPeer:
    """Every IP currently carrying this identity (see NodeState.identities)."""

    identity: int


Peer: TypeAlias = CidrPeer | IdentityPeer


@dataclass(frozen=True)
class Allow:
    peer: Peer
    protocol: int = PROTO_ANY  # IP protocol number
    port_first: int = 0
    port_last: int = 65535
    policy: str = ""  # "namespace/name" that produced it; for logs, never for verdicts
    rule: str = ""  # which of its rules: "ingress[0]", "egress[2]"; for flow records, never verdicts


def allow_order(allow: Allow) -> tuple[object, ...]:
    """The order of allow lists in a NodeState, so that equal lists are equal however they came
    (a snapshot, or a patch of a list): identities first, then prefixes by address."""
    peer = allow.peer
    peer_key = (0, peer.identity) if isinstance(peer, IdentityPeer) else (1, *peer.int_key)
    return (peer_key, allow.protocol, allow.port_first, allow.port_last, allow.policy, allow.rule)


TIER_ADMIN, TIER_BASELINE = 1, 2
ACTION_ACCEPT, ACTION_DENY, ACTION_PASS = 1, 2, 3


@dataclass(frozen=True)
class TieredAllow:
    """A ClusterNetworkPolicy verdict: what `peer`/`protocol`/ports match gets `action` at
    precedence `rank` (lower first) of `tier`; Pass (Admin only) hands over to NetworkPolicy."""

    tier: int
    rank: int
    action: int
    peer: Peer
    protocol: int = PROTO_ANY
    port_first: int = 0
    port_last: int = 65535
    policy: str = ""  # the ClusterNetworkPolicy's name; for logs, never for verdicts
    rule: str = ""  # its rule's name, else "ingress[i]" / "egress[i]"; never for verdicts


def matches(entry: Allow | TieredAllow, address: IPAddress, identities: frozenset[int], protocol: int,
            port: int) -> bool:
    """Does `entry` cover a packet to or from `address` (which carries `identities`) with this
    protocol and destination port? For naming what the kernel decided in user space (flow
    records, audit verdicts), never for the verdict itself."""
    if entry.protocol != PROTO_ANY and (
        entry.protocol != protocol or not entry.port_first <= port <= entry.port_last
    ):
        return False
    peer = entry.peer
    if isinstance(peer, CidrPeer):
        if address.version != peer.cidr.version or address not in peer.cidr:
            return False
        return not any(address in excluded for excluded in peer.excepts)
    return peer.identity in identities


@dataclass(frozen=True)
class DirectionPolicy:
    """The NetworkPolicy tier: isolated=False allows everything; isolated=True allows only what
    `allows` match. `tiered`: ClusterNetworkPolicy entries around it (docs/semantics.md): the
    first Admin match decides unless it is a Pass; then NetworkPolicy when isolated; else the
    first Baseline match; else allow."""

    isolated: bool = False
    allows: tuple[Allow, ...] = ()
    tiered: tuple[TieredAllow, ...] = ()
    # The audit view: this direction with the policies in audit (`podfence.io/mode: audit`)
    # enforced, only when it judges differently. Never enforced: a new flow that the fields above
    # allow and this denies passes, and is counted and recorded as audit-denied.
    audit: DirectionPolicy | None = None

    @property
    def judged(self) -> bool:
        """Does anything restrict this direction (else every packet passes unlooked)?"""
        return self.isolated or bool(self.tiered)

    @property
    def enforced(self) -> DirectionPolicy:
        """This direction without its audit view: what the kernel enforces."""
        return self if self.audit is None else replace(self, audit=None)


def audit_everything_state(state: NodeState) -> NodeState:
    """`state` under the agent's `--audit-all`: every endpoint direction through audit_everything."""
    endpoints = {
        key: replace(e, ingress=audit_everything(e.ingress), egress=audit_everything(e.egress))
        for key, e in state.endpoints.items()
    }
    return replace(state, endpoints=endpoints)


def audit_everything(direction: DirectionPolicy) -> DirectionPolicy:
    """`direction` under the agent's `--audit-all`: nothing enforced (every packet passes), and
    everything the control service would have enforced, its audit view included, in audit."""
    audit = direction.audit if direction.audit is not None else direction
    return DirectionPolicy(audit=audit) if audit.judged else DirectionPolicy()


@dataclass(frozen=True)
class Endpoint:
    key: str  # "namespace/name"
    ips: tuple[IPAddress, ...]
    ingress: DirectionPolicy = DirectionPolicy()  # traffic to the pod
    egress: DirectionPolicy = DirectionPolicy()  # traffic from the pod
    ifindex: int | None = None  # host-side interface; None until the node layer found it
    # The pod's MAC ("02:00:00:00:00:01", lower case), bound with the interface by the node
    # layer: the only Ethernet source (and ARP/NDP link-layer address) the pod may send. None:
    # not bound (the MAC is not checked).
    mac: str | None = None


@dataclass(frozen=True)
class NodeState:
    version: int
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    identities: dict[int, tuple[IPAddress, ...]] = field(default_factory=dict)
    # The node's own addresses: always allowed to reach local pods (kubelet probes).
    node_ips: tuple[IPAddress, ...] = ()
    # Every host-side pod interface the node layer found (ifindexes), known endpoint or not.
    # The dataplane guards all of them: traffic of one that no endpoint claims follows the
    # unknown-endpoint setting (default: dropped), so a new pod is never unfiltered.
    pod_interfaces: frozenset[int] = frozenset()
