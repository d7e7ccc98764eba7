"""Validated, immutable forms of the Kubernetes objects podfence reads.

These are what every other layer sees of Kubernetes; the loader (agent.model.load) builds them
from API-server JSON/YAML and rejects invalid objects with a field path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # cluster_policy builds on the types here; only the alias below needs its names
    from agent.model.cluster_policy import ClusterNetworkPolicy, Node

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Labels: TypeAlias = tuple[tuple[str, str], ...]  # sorted (key, value) pairs, hashable


def labels_from_dict(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def number(self) -> int:
        return {"TCP": 6, "UDP": 17, "SCTP": 132}[self.value]


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.operator is Operator.IN:
            return present and labels[self.key] in self.values
        if self.operator is Operator.NOT_IN:
            return not present or labels[self.key] not in self.values
        if self.operator is Operator.EXISTS:
            return present
        return not present


@dataclass(frozen=True)
class LabelSelector:
    """metav1.LabelSelector. The empty selector matches everything."""

    match_labels: Labels = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: Protocol = Protocol.TCP
    name: str | None = None


TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class Pod:
    """A pod as policy sees it. `terminated`: `status.phase` is Succeeded or Failed; such a pod's
    containers have stopped for good and its IPs may already belong to another pod."""

    namespace: str
    name: str
    node_name: str | None
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    ips: tuple[IPAddress, ...] = ()
    ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False
    terminated: bool = False
    # metadata.uid: lets the control service tell a pod from a later one of the same name when
    # it binds an agent's service-account token to a node (agent/control/identity.py).
    uid: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def named_port(self, name: str, protocol: Protocol) -> int | None:
        """Resolves a named port for `protocol`; None when this pod has no such port."""
        for p in self.ports:
            if p.name == name and p.protocol is protocol:
                return p.port
        return None


@dataclass(frozen=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, ip: IPAddress) -> bool:
        return (
            ip.version == self.cidr.version
            and ip in self.cidr
            and not any(ip in e for e in self.excepts if e.version == ip.version)
        )


@dataclass(frozen=True)
class Peer:
    """One entry of `from`/`to`: either ip_block, or pod and/or namespace selectors.

    No namespace_selector means the policy's own namespace; both selectors together are an AND.
    """

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PortSpec:
    """One entry of `ports`. port None = every port of the protocol; str = a named port."""

    protocol: Protocol = Protocol.TCP
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True)
class Rule:
    """An ingress or egress rule. peers=() allows every peer; ports=() every port and protocol."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PortSpec, ...] = ()


class PolicyType(StrEnum):
    INGRESS = "Ingress"
    EGRESS = "Egress"


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: frozenset[PolicyType]  # defaulted as the API server does when absent
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    # `podfence.io/mode: audit`: evaluated, never enforced (see MODE_ANNOTATION)
    audit: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# A NetworkPolicy or ClusterNetworkPolicy annotated `podfence.io/mode: audit` is evaluated but not
# enforced: what it would newly deny passes and is recorded as audit-denied (docs/semantics.md).
MODE_ANNOTATION = "podfence.io/mode"
MODE_AUDIT, MODE_ENFORCE = "audit", "enforce"


KubeObject: TypeAlias = "Namespace | Pod | NetworkPolicy | ClusterNetworkPolicy | Node"
