"""Checks a generated policy set with the reference evaluator before anything is printed.

One representative pod per workload (the pods of a workload share the labels every selector
sees), the cluster DNS, and one address per outside peer make a matrix of connections: every
ordered pair, on every port a destination serves or was seen on, plus Envoy's own ports. Each is
judged twice by agent.policy.evaluator: with the policies in force before (none, or `--diff
DIR`) and with the generated set. The result says whether every declared edge is allowed, what
is now denied that was open, what is now open that was denied, and what the generated set allows
beyond the edges, each with the rules that allow it.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.derive.graph import DNS_PORTS, SIDECAR_PORTS, Graph, Outside
from agent.derive.render import DnsTarget
from agent.model.cluster_policy import ClusterNetworkPolicy
from agent.model.objects import IPAddress, Namespace, NetworkPolicy, Pod, Protocol
from agent.policy.evaluator import TIER_NETWORK_POLICY, DirectionVerdict, Verdict, evaluate
from agent.policy.state import ClusterState

WORLD_IP = ipaddress.ip_address("203.0.113.10")  # TEST-NET-3: stands for any client outside
POD_POOL = ipaddress.ip_network("10.244.0.0/16")
SPARE_POOLS = (ipaddress.ip_network("fd00:10:244::/64"), ipaddress.ip_network("100.64.0.0/10"))


@dataclass
class Report:
    declared: int = 0
    denied_declared: list[dict[str, Any]] = field(default_factory=list)
    newly_denied: list[dict[str, Any]] = field(default_factory=list)
    newly_allowed: list[dict[str, Any]] = field(default_factory=list)
    allowed_beyond: list[dict[str, Any]] = field(default_factory=list)
    untouched: int = 0  # allowed connections that no NetworkPolicy decides
    # Declared connections a ClusterNetworkPolicy denies whatever the output says (Admin tier).
    denied_by_cluster_policy: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.denied_declared


@dataclass
class _Matrix:
    endpoints: dict[str, Pod | IPAddress]
    ports: dict[str, set[tuple[Protocol, int]]]
    declared: dict[tuple[str, str, Protocol, int], str]


def _pod_addresses(graph: Graph) -> Iterator[IPAddress]:
    """Addresses for the representative pods that no outside peer's ipBlock contains, so an
    ipBlock rule never seems to admit a pod it would not admit in the cluster."""
    blocks = [
        e.cidr
        for edge in graph.edges
        for e in (edge.source, edge.destination)
        if isinstance(e, Outside) and e.cidr is not None
    ]
    for pool in (POD_POOL, *SPARE_POOLS):
        for address in pool.hosts():
            if not any(address in block for block in blocks if block.version == address.version):
                yield address


def _pods(graph: Graph, dns: DnsTarget) -> tuple[dict[str, Pod | IPAddress], str]:
    """Representative endpoints by key, and the key of the DNS endpoint."""
    endpoints: dict[str, Pod | IPAddress] = {}
    dns_key = ""
    addresses = _pod_addresses(graph)
    for workload in graph.workloads:
        labels = graph.samples.get(workload.key, dict(workload.labels))
        endpoints[workload.key] = Pod(
            namespace=workload.namespace,
            name=workload.name,
            node_name="node",
            labels=labels,
            ips=graph.sample_ips.get(workload.key) or (next(addresses),),
            ports=workload.ports,
        )
        if workload.namespace == dns.namespace and all(labels.get(k) == v for k, v in dns.labels):
            dns_key = workload.key
    if not dns_key:
        dns_key = f"{dns.namespace}/cluster-dns"
        endpoints[dns_key] = Pod(
            namespace=dns.namespace,
            name="cluster-dns",
            node_name="node",
            labels=dict(dns.labels),
            ips=(next(addresses),),
        )
    endpoints["world"] = WORLD_IP
    for edge in graph.edges:
        for end in (edge.source, edge.destination):
            if isinstance(end, Outside) and end.cidr is not None:
                endpoints[end.key] = end.cidr.network_address + (1 if end.cidr.num_addresses > 1 else 0)
    return endpoints, dns_key


def _matrix(graph: Graph, dns: DnsTarget, mesh: bool) -> _Matrix:
    endpoints, dns_key = _pods(graph, dns)
    ports: dict[str, set[tuple[Protocol, int]]] = defaultdict(set)
    for workload in graph.workloads:
        ports[workload.key].update((p.protocol, p.port) for p in workload.ports)
        if mesh:
            ports[workload.key].update((Protocol.TCP, p) for p in SIDECAR_PORTS)
    ports[dns_key].update(DNS_PORTS)
    declared: dict[tuple[str, str, Protocol, int], str] = {}
    for edge in graph.edges:
        ports[edge.destination.key].add((edge.protocol, edge.port))
        declared[(edge.source.key, edge.destination.key, edge.protocol, edge.port)] = edge.why
    for workload in graph.workloads:
        if workload.key != dns_key and (workload.namespace in graph.namespaces or graph.managed(workload)):
            for protocol, port in DNS_PORTS:
                declared[(workload.key, dns_key, protocol, port)] = "DNS"
    return _Matrix(endpoints, ports, declared)


def _state(
    endpoints: dict[str, Pod | IPAddress],
    namespaces: list[Namespace],
    policies: list[NetworkPolicy],
    cluster: list[ClusterNetworkPolicy],
) -> ClusterState:
    pods = [e for e in endpoints.values() if isinstance(e, Pod)]
    return ClusterState.from_objects([*namespaces, *pods, *policies, *cluster])


def _cluster_tier(verdict: Verdict) -> DirectionVerdict | None:
    """The direction a ClusterNetworkPolicy (Admin or Baseline tier) decided, if one did and the
    generated NetworkPolicies had no say in it: those policies are the cluster admins', above or
    below the output, and what they deny is theirs to change."""
    for direction in (verdict.egress, verdict.ingress):
        if direction.rule is not None and not direction.allowed:
            return direction
    return None


def _direction_reason(
    state: ClusterState, name: str, subject: str, verdict: DirectionVerdict, peers: str
) -> str:
    if verdict.rule is not None:
        cluster_rule = verdict.rule
        return (
            f"{cluster_rule.policy} {name} rule #{cluster_rule.index} "
            f"({cluster_rule.tier.value} tier, {cluster_rule.action.value})"
        )
    if not verdict.isolated:
        return f"{subject} is not isolated for {name}"
    parts = []
    for match in verdict.allowing:
        policy = state.policies[match.policy]
        rule = (policy.ingress if name == "ingress" else policy.egress)[match.index]
        if not rule.peers:
            scope = f"any {peers}"
        elif any(p.ip_block is not None for p in rule.peers):
            scope = "an ipBlock"
        else:
            scope = "a selector"
        parts.append(f"{match.policy} {name} rule #{match.index} ({scope})")
    return "allowed by " + ", ".join(parts)


def _port_text(protocol: Protocol, port: int) -> str:
    return f"{protocol.value}/{port}"


def verify(
    graph: Graph,
    generated: list[NetworkPolicy],
    before: list[NetworkPolicy],
    dns: DnsTarget,
    namespaces: list[Namespace] | None = None,
    mesh: bool = False,
    cluster: list[ClusterNetworkPolicy] | None = None,
) -> Report:
    """Judges the matrix before and after; `mesh` adds Envoy's ports to every workload's ports.
    `cluster`: the ClusterNetworkPolicies in force, which apply before and after alike."""
    matrix = _matrix(graph, dns, mesh)
    namespaces = namespaces or []
    cluster = cluster or []
    after_state = _state(matrix.endpoints, namespaces, generated, cluster)
    before_state = _state(matrix.endpoints, namespaces, before, cluster)
    report = Report(declared=len(matrix.declared))
    denied: dict[tuple[str, str], list[str]] = defaultdict(list)
    opened: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src_key, src in matrix.endpoints.items():
        for dst_key, dst in matrix.endpoints.items():
            if src_key == dst_key:
                continue
            for protocol, port in sorted(matrix.ports.get(dst_key, ())):
                after = evaluate(after_state, src, dst, protocol, port)
                was = evaluate(before_state, src, dst, protocol, port).allowed
                why = matrix.declared.get((src_key, dst_key, protocol, port))
                cluster_decided = _cluster_tier(after)
                if why is not None and not after.allowed:
                    entry = {
                        "from": src_key,
                        "to": dst_key,
                        "protocol": protocol.value,
                        "port": port,
                        "why": why,
                    }
                    if cluster_decided is not None and cluster_decided.rule is not None:
                        rule = cluster_decided.rule
                        entry["by"] = f"{rule.policy} rule #{rule.index} ({rule.tier.value} tier)"
                        report.denied_by_cluster_policy.append(entry)
                    else:
                        report.denied_declared.append(entry)
                if was and not after.allowed:
                    denied[(src_key, dst_key)].append(_port_text(protocol, port))
                if after.allowed and not was:
                    opened[(src_key, dst_key)].append(_port_text(protocol, port))
                decided = TIER_NETWORK_POLICY in (after.egress.tier, after.ingress.tier)
                if after.allowed and why is None and not decided:
                    report.untouched += 1  # no NetworkPolicy, generated or not, decides this pair
                elif after.allowed and why is None:
                    reason = "; ".join(
                        [
                            _direction_reason(after_state, "egress", src_key, after.egress, "destination"),
                            _direction_reason(after_state, "ingress", dst_key, after.ingress, "source"),
                        ]
                    )
                    report.allowed_beyond.append(
                        {
                            "from": src_key,
                            "to": dst_key,
                            "protocol": protocol.value,
                            "port": port,
                            "reason": reason,
                        }
                    )
    report.newly_denied = [{"from": s, "to": d, "ports": p} for (s, d), p in sorted(denied.items())]
    report.newly_allowed = [{"from": s, "to": d, "ports": p} for (s, d), p in sorted(opened.items())]
    return report


__all__ = ["Report", "verify"]
