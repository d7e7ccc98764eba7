"""The connection graph both derivations produce: workloads, the outside world, and edges.

`podfence derive` builds it from the mesh's routes, `podfence suggest` from observed flows; the
renderer turns it into NetworkPolicies and the verifier checks those against it. A workload is a
set of pods that share their stable labels (a Deployment's template, one `version` of an app):
policies select by labels, never by pod name or IP, so pods that come and go keep their policy.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from agent.model.objects import ContainerPort, IPAddress, IPNetwork, Labels, Protocol

# Labels that controllers stamp per revision, per replica or per run. Selecting on them would tie
# a policy to one rollout (pod-template-hash), one replica (pod-name) or one Job run (job-name).
UNSTABLE_LABELS = frozenset(
    {
        "pod-template-hash",
        "controller-revision-hash",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "controller-uid",
        "job-name",
        "batch.kubernetes.io/controller-uid",
        "batch.kubernetes.io/job-name",
        "batch.kubernetes.io/job-completion-index",
        # Added by Istio's injector to every pod; they say nothing about which workload it is.
        "security.istio.io/tlsMode",
        "service.istio.io/canonical-name",
        "service.istio.io/canonical-revision",
    }
)

# Envoy's own ports in an injected pod: admin, outbound/inbound capture, merged Prometheus,
# health, stats. A route never targets them; a policy must never open them.
SIDECAR_PORTS = frozenset({15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090})

DNS_PORTS = ((Protocol.UDP, 53), (Protocol.TCP, 53))


def stable_labels(labels: dict[str, str], keys: frozenset[str] | None = None) -> Labels:
    """The labels a workload is selected by: every label but per-revision ones, or only `keys`."""
    return tuple(
        sorted((k, v) for k, v in labels.items() if k not in UNSTABLE_LABELS and (keys is None or k in keys))
    )


def dns_name(text: str, fallback: str = "workload") -> str:
    """A valid object name (DNS-1123 label, at most 63 characters) made from free text."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:63].rstrip("-") or fallback


@dataclass(frozen=True)
class Workload:
    """Pods in `namespace` selected by `labels`. `name` is for people (policy names, summaries)."""

    namespace: str
    labels: Labels
    name: str
    ports: tuple[ContainerPort, ...] = field(default=(), compare=False)
    service_account: str = field(default="default", compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)


@dataclass(frozen=True)
class Outside:
    """Addresses outside the cluster: `cidr` None means anywhere (the mesh ingress's clients)."""

    cidr: IPNetwork | None = None

    @property
    def key(self) -> str:
        return str(self.cidr) if self.cidr is not None else "world"


Endpoint = Workload | Outside


@dataclass(frozen=True)
class Edge:
    """`source` may open connections to `destination` on port/protocol; `why` says what implies it."""

    source: Endpoint
    destination: Endpoint
    protocol: Protocol
    port: int
    why: str = field(default="", compare=False)


@dataclass
class Note:
    """Something of the input that the derivation did not translate, and what that means."""

    kind: str
    name: str
    field: str
    why: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "field": self.field, "why": self.why}

    def __str__(self) -> str:
        where = f" {self.field}" if self.field else ""
        return f"{self.kind} {self.name}{where}: {self.why}"


@dataclass
class Graph:
    """What the application does (or may do): the input of rendering and of verification."""

    workloads: list[Workload] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    # Per workload key, the annotations its policy carries (what it was derived from).
    annotations: dict[str, dict[str, str]] = field(default_factory=dict)
    # Namespaces that get a default-deny and DNS egress; others are left as they are.
    namespaces: list[str] = field(default_factory=list)
    # Per workload key, the full labels of one of its pods, when real pods are known.
    samples: dict[str, dict[str, str]] = field(default_factory=dict)
    # Per workload key, the addresses of that pod, when real pods are known: an ipBlock that
    # contains a pod's address admits the pod too, and the check must see it.
    sample_ips: dict[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    # Workloads that are peers only and get no policy (istiod, pods outside the chosen namespaces).
    unmanaged: set[str] = field(default_factory=set)
    _seen: set[Edge] = field(default_factory=set, repr=False)

    def add_edge(self, edge: Edge) -> None:
        if edge.source != edge.destination and edge not in self._seen:
            self._seen.add(edge)
            self.edges.append(edge)

    def managed(self, workload: Workload) -> bool:
        """Does `workload` get a policy of its own: it has edges and is not a peer only."""
        return workload.key not in self.unmanaged and any(
            workload in (edge.source, edge.destination) for edge in self.edges
        )


def aggregate(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix_v4: int, prefix_v6: int) -> IPNetwork:
    """The network of `prefix` bits that holds `ip` (the unit of an ipBlock for outside peers)."""
    prefix = prefix_v4 if ip.version == 4 else prefix_v6
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
