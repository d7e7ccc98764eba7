"""Validated, immutable ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) and Node.

A ClusterNetworkPolicy (CNP) is the administrator's policy: cluster-scoped, in one of two tiers
(Admin before every NetworkPolicy, Baseline after), ordered by `priority` (lower first) and
then by rule order, with actions Accept, Deny and Pass. agent.model.cluster_policy_load builds
these from API objects; the evaluation order lives in agent.policy.tiers. tests/data/npa/SPEC.md
summarises the upstream API.

A Node is read only for its labels and addresses: an egress `nodes` peer (experimental channel)
matches the addresses of the nodes its selector picks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from agent.model.objects import IPAddress, IPNetwork, LabelSelector, Protocol

CNP_API_VERSION = "policy.networking.k8s.io/v1alpha2"


class Tier(StrEnum):
    ADMIN = "Admin"
    BASELINE = "Baseline"


class Action(StrEnum):
    ACCEPT = "Accept"
    DENY = "Deny"
    PASS = "Pass"


@dataclass(frozen=True)
class NamespacedPods:
    """`pods:` of a subject or peer: pods matching `pod_selector` in namespaces matching
    `namespace_selector` (both must match; the empty selector matches everything)."""

    namespace_selector: LabelSelector
    pod_selector: LabelSelector


@dataclass(frozen=True)
class ClusterPeer:
    """One entry of `from`/`to`: exactly one kind of peer is set, or `unknown`.

    `unknown`: the entry has no field this model knows (a newer CRD added one). Upstream says to
    fail closed on it: in an Accept rule it matches nothing, in a Deny or Pass rule everything.
    `domain_names` is parsed and validated but matches nothing (podfence judges IP packets and
    never sees names); the API allows it only in Accept rules, so matching nothing is the closed side.
    """

    namespaces: LabelSelector | None = None
    pods: NamespacedPods | None = None
    networks: tuple[IPNetwork, ...] = ()
    nodes: LabelSelector | None = None
    domain_names: tuple[str, ...] = ()
    unknown: bool = False


@dataclass(frozen=True)
class ClusterPort:
    """One `protocols` entry. `protocol` None with `named_port` set: destinationNamedPort (the
    protocol comes from the destination pod's container port). `protocol` set and `first` ..
    `last` the inclusive destination port range (a single number when equal). `unknown`: no known
    field set (a newer CRD); fails closed like ClusterPeer.unknown."""

    protocol: Protocol | None = None
    first: int = 0
    last: int = 0
    named_port: str | None = None
    unknown: bool = False


@dataclass(frozen=True)
class ClusterRule:
    """An ingress or egress rule. `peers` is never empty (the API requires 1..25); `ports` empty
    means every protocol and port (ICMP included)."""

    action: Action
    peers: tuple[ClusterPeer, ...]
    ports: tuple[ClusterPort, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class ClusterNetworkPolicy:
    """Exactly one of `subject_namespaces` / `subject_pods` is set."""

    name: str
    tier: Tier
    priority: int
    subject_namespaces: LabelSelector | None = None
    subject_pods: NamespacedPods | None = None
    ingress: tuple[ClusterRule, ...] = ()
    egress: tuple[ClusterRule, ...] = ()
    audit: bool = False  # `podfence.io/mode: audit` (agent.model.objects.MODE_ANNOTATION)

    @property
    def key(self) -> str:
        return self.name

    def order(self) -> tuple[int, str]:
        """Precedence inside the tier: priority ascending, then name. The API leaves equal
        priorities undefined; podfence breaks the tie by name so every replica, the evaluator and
        both dataplanes agree, and `podfence explain` can say which policy decided."""
        return (self.priority, self.name)


@dataclass(frozen=True)
class Node:
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    addresses: tuple[IPAddress, ...] = ()

    @property
    def key(self) -> str:
        return self.name
