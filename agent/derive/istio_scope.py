"""What narrows who may call whom in a mesh: Sidecar egress hosts and AuthorizationPolicy ALLOW.

Without either, every workload of the mesh may call every Service (Istio's default), and the
derivation says so in its notes. A Sidecar's egress hosts limit what a workload's proxy can
reach; an ALLOW AuthorizationPolicy limits which principals (service accounts) and namespaces a
workload accepts. Both only ever remove sources: what they cannot express at L3/L4 (request
principals, L7 operations, conditions) is kept as allowed and listed in the notes, so the
NetworkPolicies stay a superset of what the mesh lets through and never break a route.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from agent.derive.graph import Note, Workload
from agent.derive.inputs import mapping, meta, sequence, string_map
from agent.derive.workloads import Service

TRUST_DOMAIN = "cluster.local"


def _matches_labels(selector: dict[str, str] | None, workload: Workload) -> bool:
    labels = dict(workload.labels)
    return selector is None or all(labels.get(k) == v for k, v in selector.items())


def _pattern(value: str, text: str) -> bool:
    """Istio's string match: exact, "*", prefix "abc*" or suffix "*abc"."""
    if value == "*":
        return True
    if value.endswith("*"):
        return text.startswith(value[:-1])
    if value.startswith("*"):
        return text.endswith(value[1:])
    return value == text


@dataclass
class _Sidecar:
    namespace: str
    name: str
    selector: dict[str, str] | None
    egress: list[tuple[int | None, list[str]]]


@dataclass
class _Rule:
    sources: list[dict[str, Any]]  # empty: any source
    ports: list[str]  # empty: any port
    not_ports: list[str]


@dataclass
class _Allow:
    namespace: str
    name: str
    selector: dict[str, str] | None
    rules: list[_Rule]


class Scope:
    """Answers "may `source` call `service` on `port`" from the Sidecars and AuthorizationPolicies."""

    def __init__(
        self, documents: list[tuple[str, dict[str, Any]]], root_namespace: str, notes: list[Note]
    ) -> None:
        self.root = root_namespace
        self.notes = notes
        self.sidecars: list[_Sidecar] = []
        self.allows: list[_Allow] = []
        for _, doc in documents:
            if doc.get("kind") == "Sidecar":
                self._read_sidecar(doc)
            elif doc.get("kind") == "AuthorizationPolicy":
                self._read_authorization(doc)

    def _read_sidecar(self, doc: dict[str, Any]) -> None:
        namespace, name = meta(doc, "Sidecar")
        where = f"Sidecar {namespace}/{name}"
        spec = mapping(doc.get("spec"), where)
        selector = mapping(spec.get("workloadSelector"), where).get("labels")
        egress = []
        for i, listener in enumerate(sequence(spec.get("egress"), f"{where}: spec.egress")):
            listener = mapping(listener, f"{where}: spec.egress[{i}]")
            port = mapping(listener.get("port"), where).get("number")
            hosts = [str(h) for h in sequence(listener.get("hosts"), f"{where}: spec.egress[{i}].hosts")]
            egress.append((port if isinstance(port, int) else None, hosts))
        for field in ("ingress", "inboundConnectionPool"):
            if spec.get(field):
                self.notes.append(
                    Note(
                        "Sidecar",
                        f"{namespace}/{name}",
                        f"spec.{field}",
                        "not translated: the Service ports decide what a workload accepts",
                    )
                )
        parsed = string_map(selector, where) if selector is not None else None
        self.sidecars.append(_Sidecar(namespace, name, parsed, egress))

    def _read_authorization(self, doc: dict[str, Any]) -> None:
        namespace, name = meta(doc, "AuthorizationPolicy")
        where = f"AuthorizationPolicy {namespace}/{name}"
        spec = mapping(doc.get("spec"), where)
        action = spec.get("action", "ALLOW")
        if action != "ALLOW":
            self.notes.append(
                Note(
                    "AuthorizationPolicy",
                    f"{namespace}/{name}",
                    "spec.action",
                    f"{action} is not translated: the mesh still enforces it; the "
                    "NetworkPolicies allow the routes without it",
                )
            )
            return
        if spec.get("targetRef") or spec.get("targetRefs"):
            self.notes.append(
                Note(
                    "AuthorizationPolicy",
                    f"{namespace}/{name}",
                    "spec.targetRef",
                    "not translated (waypoint/gateway attachment): the policy is not applied here",
                )
            )
            return
        selector = mapping(spec.get("selector"), where).get("matchLabels")
        rules = []
        for i, rule in enumerate(sequence(spec.get("rules"), f"{where}: spec.rules")):
            rule = mapping(rule, f"{where}: spec.rules[{i}]")
            sources = [
                mapping(mapping(f, where).get("source"), where) for f in sequence(rule.get("from"), where)
            ]
            ports: list[str] = []
            not_ports: list[str] = []
            for to in sequence(rule.get("to"), where):
                operation = mapping(mapping(to, where).get("operation"), where)
                ports += [str(p) for p in sequence(operation.get("ports"), where)]
                not_ports += [str(p) for p in sequence(operation.get("notPorts"), where)]
                if set(operation) - {"ports", "notPorts"}:
                    self._note_l7(
                        namespace, name, f"spec.rules[{i}].to", "L7 operations (hosts, methods, paths)"
                    )
            if rule.get("when"):
                self._note_l7(namespace, name, f"spec.rules[{i}].when", "conditions")
            for source in sources:
                for field in set(source) - {"principals", "namespaces", "notPrincipals", "notNamespaces"}:
                    self._note_l7(namespace, name, f"spec.rules[{i}].from.source.{field}", field)
            rules.append(_Rule(sources, ports, not_ports))
        parsed = string_map(selector, where) if selector is not None else None
        self.allows.append(_Allow(namespace, name, parsed, rules))

    def _note_l7(self, namespace: str, name: str, field: str, what: str) -> None:
        self.notes.append(
            Note(
                "AuthorizationPolicy",
                f"{namespace}/{name}",
                field,
                f"{what} cannot narrow an L3/L4 policy: treated as matching, the mesh enforces them",
            )
        )

    # -- Sidecar egress --------------------------------------------------------------------

    def sidecar_for(self, workload: Workload) -> _Sidecar | None:
        """Istio's choice: a Sidecar selecting the workload, else its namespace's, else the root's."""
        own = [s for s in self.sidecars if s.namespace == workload.namespace]
        for sidecar in own:
            if sidecar.selector is not None and _matches_labels(sidecar.selector, workload):
                return sidecar
        for sidecar in own:
            if sidecar.selector is None:
                return sidecar
        for sidecar in self.sidecars:
            if sidecar.namespace == self.root and sidecar.selector is None:
                return sidecar
        return None

    def egress_allows(self, source: Workload, service: Service, port: int) -> bool:
        names = {
            service.fqdn,
            service.name,
            f"{service.name}.{service.namespace}",
            f"{service.name}.{service.namespace}.svc",
        }
        return self.egress_allows_host(source, service.namespace, names, service.fqdn, port)

    def egress_allows_host(
        self, source: Workload, namespace: str, names: set[str], fqdn: str, port: int
    ) -> bool:
        """May `source`'s proxy reach the host `fqdn` (also known as `names`) declared in `namespace`?"""
        sidecar = self.sidecar_for(source)
        if sidecar is None:
            return True
        for listener_port, hosts in sidecar.egress:
            if listener_port is not None and listener_port != port:
                continue
            if any(self._host_matches(h, sidecar.namespace, namespace, names, fqdn) for h in hosts):
                return True
        return False

    @staticmethod
    def _host_matches(entry: str, sidecar_namespace: str, namespace: str, names: set[str], fqdn: str) -> bool:
        """One `namespace/host` entry of a Sidecar's egress hosts against a host declared in `namespace`."""
        entry_namespace, _, host = entry.rpartition("/")
        entry_namespace = entry_namespace or "*"
        if entry_namespace == "~":
            return False
        if entry_namespace == ".":
            entry_namespace = sidecar_namespace
        if entry_namespace not in ("*", namespace):
            return False
        if host == "*":
            return True
        if host.startswith("*."):
            return fqdn.endswith(host[1:])
        return host in names

    # -- AuthorizationPolicy ALLOW --------------------------------------------------------

    def _applicable(self, workload: Workload) -> list[_Allow]:
        return [
            a
            for a in self.allows
            # The root namespace's policies apply mesh-wide, narrowed by their selector if any.
            if a.namespace in (workload.namespace, self.root) and _matches_labels(a.selector, workload)
        ]

    def authorization_allows(self, destination: Workload, source: Workload, port: int) -> bool:
        """Would some ALLOW policy on `destination` let `source` in on `port`? True when none applies."""
        applicable = self._applicable(destination)
        if not applicable:
            return True
        principal = f"{TRUST_DOMAIN}/ns/{source.namespace}/sa/{source.service_account}"
        return any(
            self._rule_allows(rule, principal, source.namespace, port) for a in applicable for rule in a.rules
        )

    def narrowed(self, destination: Workload) -> bool:
        return bool(self._applicable(destination))

    @staticmethod
    def _rule_allows(rule: _Rule, principal: str, namespace: str, port: int) -> bool:
        if rule.ports and not any(fnmatch.fnmatchcase(str(port), p) for p in rule.ports):
            return False
        if any(fnmatch.fnmatchcase(str(port), p) for p in rule.not_ports):
            return False
        if not rule.sources:
            return True
        for source in rule.sources:
            checks = [
                ("principals", principal, True),
                ("namespaces", namespace, True),
                ("notPrincipals", principal, False),
                ("notNamespaces", namespace, False),
            ]
            if all(
                field not in source
                or any(_pattern(str(v), value) for v in sequence(source[field], field)) is wanted
                for field, value, wanted in checks
            ):
                return True
        return False
