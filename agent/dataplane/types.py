"""What a node must enforce, in dataplane terms: endpoints, their allow lists and peer identities.

The node layer builds a NodeState from the control service's messages and the interfaces it
discovered; a Dataplane makes the kernel match it. Nothing here knows about Kubernetes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTO_ANY = 0  # an Allow with protocol 0 admits every IP protocol (ICMP included), every port


@dataclass(frozen=True, order=True)
class CidrPeer:
    """A CIDR minus its excepts. Host routes (/32, /128) carry per-pod named-port allows."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()


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


@dataclass(frozen=True)
class DirectionPolicy:
    """isolated=False allows everything; isolated=True allows only what `allows` match."""

    isolated: bool = False
    allows: tuple[Allow, ...] = ()


@dataclass(frozen=True)
class Endpoint:
    key: str  # "namespace/name"
    ips: tuple[IPAddress, ...]
    ingress: DirectionPolicy = DirectionPolicy()  # traffic to the pod
    egress: DirectionPolicy = DirectionPolicy()  # traffic from the pod
    ifindex: int | None = None  # host-side interface; None until the node layer found it


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
