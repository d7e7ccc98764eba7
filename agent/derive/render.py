"""Graph -> NetworkPolicy objects: plain dicts for the YAML output, validated by agent.model.

Per covered namespace a default-deny (both directions) and DNS egress to the cluster DNS; per
workload one policy selecting its stable labels, with one ingress and one egress rule per set of
ports, listing the peers that use exactly those ports. Grouping peers by identical port sets
(never peers x ports of different edges) keeps a rule from opening a port to a peer that was
never seen or declared on it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from agent.derive.graph import DNS_PORTS, Endpoint, Graph, Outside, dns_name
from agent.model.errors import PolicyError
from agent.model.load import parse_object
from agent.model.objects import NetworkPolicy, Protocol
from agent.policy.state import NAMESPACE_NAME_LABEL

AUDIT_ANNOTATION = "podfence.io/mode"
GENERATED_BY = "podfence.io/generated-by"


@dataclass(frozen=True)
class DnsTarget:
    """Where pods ask for names: the cluster DNS pods, by namespace and labels."""

    namespace: str = "kube-system"
    labels: tuple[tuple[str, str], ...] = (("k8s-app", "kube-dns"),)


class RenderError(RuntimeError):
    """A generated object failed the model's validation: a bug here, never the user's input."""


def _peer(endpoint: Endpoint, policy_namespace: str) -> dict[str, Any] | None:
    """The from/to entry for one peer; None for anywhere (a rule without from/to)."""
    if isinstance(endpoint, Outside):
        return None if endpoint.cidr is None else {"ipBlock": {"cidr": str(endpoint.cidr)}}
    peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(endpoint.labels)}}
    if endpoint.namespace != policy_namespace:
        peer = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: endpoint.namespace}}, **peer}
    return peer


def _ports(ports: Iterable[tuple[Protocol, int]]) -> list[dict[str, Any]]:
    return [{"port": port, "protocol": protocol.value} for protocol, port in sorted(ports)]


def _rules(
    by_peer: dict[Endpoint, set[tuple[Protocol, int]]], namespace: str, peers_field: str
) -> list[dict[str, Any]]:
    by_ports: dict[frozenset[tuple[Protocol, int]], list[Endpoint]] = defaultdict(list)
    for endpoint, seen in by_peer.items():
        by_ports[frozenset(seen)].append(endpoint)
    rules = []
    for ports, endpoints in sorted(by_ports.items(), key=lambda item: sorted(item[0])):
        entries = [_peer(e, namespace) for e in sorted(endpoints, key=lambda e: e.key)]
        rule: dict[str, Any] = {}
        if all(entry is not None for entry in entries):
            rule[peers_field] = entries
        # else: one peer is "anywhere", which makes the others redundant on these ports.
        rule["ports"] = _ports(ports)
        rules.append(rule)
    return rules


def _metadata(namespace: str, name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {"namespace": namespace, "name": name, "annotations": dict(annotations)}


def render(graph: Graph, dns: DnsTarget, command: str, audit: bool = False) -> list[dict[str, Any]]:
    """The policy documents for `graph`, in a stable order (namespace, then name)."""
    base = {GENERATED_BY: f"podfence {command}"}
    if audit:
        base[AUDIT_ANNOTATION] = "audit"
    documents: list[dict[str, Any]] = []
    dns_peer = {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: dns.namespace}},
        "podSelector": {"matchLabels": dict(dns.labels)},
    }
    for namespace in sorted(set(graph.namespaces)):
        documents.append(_policy(namespace, "default-deny", {}, ["Ingress", "Egress"], base))
        documents.append(
            _policy(
                namespace,
                "allow-dns-egress",
                {},
                ["Egress"],
                base,
                egress=[{"to": [dns_peer], "ports": _ports(frozenset(DNS_PORTS))}],
            )
        )
    names: set[tuple[str, str]] = set()
    for workload in sorted(graph.workloads, key=lambda w: w.key):
        if workload.key in graph.unmanaged:
            continue
        ingress: dict[Endpoint, set[tuple[Protocol, int]]] = defaultdict(set)
        egress: dict[Endpoint, set[tuple[Protocol, int]]] = defaultdict(set)
        for edge in graph.edges:
            if edge.destination == workload:
                ingress[edge.source].add((edge.protocol, edge.port))
            if edge.source == workload:
                egress[edge.destination].add((edge.protocol, edge.port))
        if not ingress and not egress:
            continue  # the namespace's default-deny already says everything
        name = _unique(names, workload.namespace, dns_name(workload.name))
        annotations = {**base, **graph.annotations.get(workload.key, {})}
        egress_rules = _rules(egress, workload.namespace, "to")
        if workload.namespace not in graph.namespaces:
            # No namespace-wide DNS policy there: this policy's egress isolation must not cut DNS.
            egress_rules.append({"to": [dns_peer], "ports": _ports(frozenset(DNS_PORTS))})
        documents.append(
            _policy(
                workload.namespace,
                name,
                dict(workload.labels),
                ["Ingress", "Egress"],
                annotations,
                ingress=_rules(ingress, workload.namespace, "from"),
                egress=egress_rules,
            )
        )
    return documents


def _unique(taken: set[tuple[str, str]], namespace: str, name: str) -> str:
    candidate, n = name, 2
    while (namespace, candidate) in taken or candidate in ("default-deny", "allow-dns-egress"):
        suffix = f"-{n}"
        candidate, n = name[: 63 - len(suffix)] + suffix, n + 1
    taken.add((namespace, candidate))
    return candidate


def _policy(
    namespace: str,
    name: str,
    selector: dict[str, str],
    types: list[str],
    annotations: dict[str, str],
    ingress: list[dict[str, Any]] | None = None,
    egress: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": selector} if selector else {},
        "policyTypes": types,
    }
    if ingress:
        spec["ingress"] = ingress
    if egress:
        spec["egress"] = egress
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(namespace, name, annotations),
        "spec": spec,
    }


def validate(documents: list[dict[str, Any]]) -> list[NetworkPolicy]:
    """Each document through the model's validation (the API server's rules); RenderError if any fails."""
    policies = []
    for document in documents:
        try:
            obj = parse_object(document, "<generated>")
        except PolicyError as exc:
            raise RenderError(f"generated an invalid object: {exc}") from exc
        if not isinstance(obj, NetworkPolicy):
            raise RenderError(f"generated an object that is not a NetworkPolicy: {document.get('kind')}")
        policies.append(obj)
    return policies


def to_yaml(documents: list[dict[str, Any]]) -> str:
    """Multi-document YAML, as `kubectl apply -f -` reads it."""
    return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, explicit_start=True)


def workload_name(labels: dict[str, str], fallback: str) -> str:
    """A readable name from the usual identity labels (app + version), else `fallback`."""
    for keys in (("app", "version"), ("app.kubernetes.io/name", "app.kubernetes.io/version"), ("k8s-app",)):
        values = [labels[k] for k in keys if k in labels]
        if values and keys[0] in labels:
            return dns_name("-".join(values), fallback)
    return dns_name(fallback)


__all__ = ["DnsTarget", "RenderError", "render", "to_yaml", "validate", "workload_name"]
