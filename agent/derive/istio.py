"""Istio configuration -> the connection graph its routes imply (`podfence derive --istio DIR`).

Edges come from three places:
- each Gateway: anywhere -> the gateway's pods on its server ports (the pod port behind a
  Service of the gateway that exposes that port), never an Envoy port (graph.SIDECAR_PORTS);
- each VirtualService route (http, tcp, tls; mirrors too): its sources -> the pods of each
  destination host's Service, narrowed to the DestinationRule subset's labels (versions as
  labels), on the destination port's target port. Sources are the gateway's pods for routes
  bound to a Gateway, and the mesh's workloads for routes bound to `mesh`, narrowed by the
  match's sourceLabels/sourceNamespace;
- each Service no mesh VirtualService routes: the default route, every mesh workload -> its pods.
Mesh sources are further narrowed by Sidecar egress hosts and AuthorizationPolicy ALLOW rules
(istio_scope). Every proxy also reaches istiod for its configuration. What is not translated is
a Note in the summary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.derive.graph import SIDECAR_PORTS, Edge, Graph, Note, Outside, Workload
from agent.derive.inputs import mapping, meta, sequence, string_map
from agent.derive.istio_external import service_entries
from agent.derive.istio_scope import Scope
from agent.derive.workloads import Service, read_services, read_workloads
from agent.model.objects import Protocol

ROUTED = {
    "ServiceEntry",
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "AuthorizationPolicy",
    "Sidecar",
    "Service",
    "Namespace",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
NOT_TRANSLATED = {
    "WorkloadEntry": "workloads outside Kubernetes have no pods to select",
    "EnvoyFilter": "raw Envoy configuration is not interpreted",
    "PeerAuthentication": "mTLS mode does not change which pods connect",
}
XDS_PORT = 15012  # istiod's xDS and certificate port, which every proxy dials


@dataclass(frozen=True)
class _Target:
    workload: Workload
    port: int
    protocol: Protocol
    service: Service
    service_port: int


class _Deriver:
    def __init__(
        self,
        documents: list[tuple[str, dict[str, Any]]],
        root: str,
        istiod: tuple[str, tuple[tuple[str, str], ...]] | None,
    ) -> None:
        self.graph = Graph()
        self.notes = self.graph.notes
        workloads, samples = read_workloads(documents, self.notes)
        self.graph.workloads, self.graph.samples = workloads, samples
        self.services = read_services(documents)
        self.by_host = {s.fqdn: s for s in self.services}
        self.scope = Scope(documents, root, self.notes)
        self.documents = documents
        self.gateways: dict[str, tuple[list[Workload], list[int]]] = {}
        self.subsets: dict[tuple[str, str], dict[str, str]] = {}
        self.istiod = istiod
        for _, doc in documents:
            kind = doc.get("kind")
            if kind in NOT_TRANSLATED:
                self.notes.append(
                    Note(str(kind), "/".join(meta(doc, str(kind))), "", NOT_TRANSLATED[str(kind)])
                )
            elif kind not in ROUTED and kind not in WORKLOAD_KINDS:
                self.notes.append(
                    Note(str(kind), "/".join(meta(doc, str(kind))), "", "ignored: not part of routing")
                )

    def fqdn(self, host: str, namespace: str) -> str:
        parts = host.split(".")
        if len(parts) == 1:
            return f"{host}.{namespace}.svc.cluster.local"
        if len(parts) == 2:
            return f"{host}.svc.cluster.local"
        if len(parts) == 3 and parts[2] == "svc":
            return f"{host}.cluster.local"
        return host

    def specs(self, kind: str) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
        """(namespace, name, where, spec) of each document of `kind`, `where` naming it in notes."""
        for _, doc in self.documents:
            if doc.get("kind") == kind:
                namespace, name = meta(doc, kind)
                where = f"{kind} {namespace}/{name}"
                yield namespace, name, where, mapping(doc.get("spec"), where)

    # -- Gateways ---------------------------------------------------------------------------

    def read_gateways(self) -> None:
        for namespace, name, where, spec in self.specs("Gateway"):
            selector = string_map(spec.get("selector"), f"{where}: spec.selector")
            # An empty selector would take in every workload: never a gateway anyone means.
            pods = [w for w in self.graph.workloads if selector and _labelled(w, selector)]
            if not pods:
                self.notes.append(
                    Note(
                        "Gateway",
                        f"{namespace}/{name}",
                        "spec.selector",
                        "selects no workload of the configuration: no ingress derived",
                    )
                )
            ports = []
            for i, server in enumerate(sequence(spec.get("servers"), f"{where}: spec.servers")):
                number = mapping(mapping(server, where).get("port"), where).get("number")
                if not isinstance(number, int):
                    self.notes.append(
                        Note("Gateway", f"{namespace}/{name}", f"spec.servers[{i}].port", "no port number")
                    )
                    continue
                ports.append(number)
                for pod in pods:
                    listen = self._gateway_listen_port(pod, number)
                    if listen in SIDECAR_PORTS:
                        self.notes.append(
                            Note(
                                "Gateway",
                                f"{namespace}/{name}",
                                f"spec.servers[{i}].port",
                                f"port {listen} is one of Envoy's own ports: never opened",
                            )
                        )
                        continue
                    self.graph.add_edge(
                        Edge(Outside(), pod, Protocol.TCP, listen, f"Gateway {namespace}/{name}")
                    )
            self.gateways[f"{namespace}/{name}"] = (pods, ports)

    def _gateway_listen_port(self, pod: Workload, number: int) -> int:
        """A server port is the gateway Service's port; the pod listens on its target port."""
        for service in self.services:
            if service.selects(pod):
                for port in service.ports:
                    if port.port == number:
                        return service.target_port(port, pod) or number
        return number

    # -- Destinations -----------------------------------------------------------------------

    def read_subsets(self) -> None:
        for namespace, _, where, spec in self.specs("DestinationRule"):
            host = self.fqdn(str(spec.get("host", "")), namespace)
            for i, subset in enumerate(sequence(spec.get("subsets"), f"{where}: spec.subsets")):
                subset = mapping(subset, f"{where}: spec.subsets[{i}]")
                self.subsets[(host, str(subset.get("name")))] = string_map(subset.get("labels"), where)

    def targets(
        self, destination: dict[str, Any], namespace: str, who: str, port_hint: int | None
    ) -> list[_Target]:
        host = self.fqdn(str(destination.get("host", "")), namespace)
        service = self.by_host.get(host)
        kind, name = who.split(" ", 1)
        if service is None:
            self.notes.append(
                Note(
                    kind,
                    name,
                    "destination.host",
                    f"{host} is no Service of the configuration (outside the mesh?): no rule derived",
                )
            )
            return []
        if service.selector is None:
            self.notes.append(
                Note(
                    "Service",
                    f"{service.namespace}/{service.name}",
                    "spec.selector",
                    "no selector (endpoints managed by hand): no pods to derive rules for",
                )
            )
            return []
        labels: dict[str, str] = {}
        subset = destination.get("subset")
        if subset is not None:
            if (host, str(subset)) not in self.subsets:
                self.notes.append(
                    Note(
                        kind,
                        name,
                        "destination.subset",
                        f"subset {subset} of {host} is in no DestinationRule: no rule derived",
                    )
                )
                return []
            labels = self.subsets[(host, str(subset))]
        wanted = mapping(destination.get("port"), who).get("number") or port_hint
        ports = [p for p in service.ports if wanted is None or p.port == wanted]
        if not ports:
            self.notes.append(
                Note(kind, name, "destination.port", f"{host} has no port {wanted}: no rule derived")
            )
        targets = []
        for workload in self.graph.workloads:
            if not service.selects(workload) or not _labelled(workload, labels):
                continue
            for port in ports:
                target = service.target_port(port, workload)
                if port.protocol is not Protocol.TCP:
                    self.notes.append(
                        Note(
                            "Service",
                            f"{service.namespace}/{service.name}",
                            f"port {port.port}",
                            f"{port.protocol.value} is not routed by the mesh: no rule derived",
                        )
                    )
                elif target is None or target in SIDECAR_PORTS:
                    self.notes.append(
                        Note(
                            "Service",
                            f"{service.namespace}/{service.name}",
                            f"port {port.port}",
                            f"target port {port.target} unusable on {workload.key}: no rule derived",
                        )
                    )
                else:
                    targets.append(_Target(workload, target, port.protocol, service, port.port))
        return targets

    # -- Routes -----------------------------------------------------------------------------

    def mesh_workloads(self) -> list[Workload]:
        gateway_pods = {w for pods, _ in self.gateways.values() for w in pods}
        return [w for w in self.graph.workloads if w not in gateway_pods]

    def connect(self, sources: list[Workload], target: _Target, mesh: bool, why: str) -> None:
        for source in sources:
            if mesh and not self.scope.egress_allows(source, target.service, target.service_port):
                continue
            if not self.scope.authorization_allows(target.workload, source, target.port):
                continue
            self.graph.add_edge(Edge(source, target.workload, target.protocol, target.port, why))

    def read_virtual_services(self) -> set[str]:
        """Adds every route's edges; returns the hosts whose mesh traffic a VirtualService routes."""
        routed: set[str] = set()
        for namespace, name, where, spec in self.specs("VirtualService"):
            bound = [str(g) for g in sequence(spec.get("gateways"), where)] or ["mesh"]
            if "mesh" in bound:
                routed |= {self.fqdn(str(h), namespace) for h in sequence(spec.get("hosts"), where)}
            if spec.get("exportTo"):
                self.notes.append(
                    Note(
                        "VirtualService",
                        f"{namespace}/{name}",
                        "spec.exportTo",
                        "not translated: routes are derived for every namespace",
                    )
                )
            for section in ("http", "tcp", "tls"):
                taken: set[tuple[str, Workload]] = set()  # (gateway, source) an earlier route took whole
                for i, route in enumerate(sequence(spec.get(section), f"{where}: spec.{section}")):
                    self._route(mapping(route, where), namespace, name, f"{section}[{i}]", bound, taken)
        return routed

    def _route(
        self,
        route: dict[str, Any],
        namespace: str,
        name: str,
        at: str,
        bound: list[str],
        taken: set[tuple[str, Workload]],
    ) -> None:
        """One route's edges. Istio uses the first route that matches; a match on the source alone
        (sourceLabels, sourceNamespace, gateways) takes those sources whole, so later routes of
        the section never see them (`taken`). A match with request conditions takes nothing."""
        who = f"VirtualService {namespace}/{name}"
        if route.get("delegate"):
            self.notes.append(
                Note(
                    "VirtualService",
                    f"{namespace}/{name}",
                    f"spec.{at}.delegate",
                    "delegation is not followed: no rule derived for it",
                )
            )
            return
        destinations = [mapping(r, who).get("destination") for r in sequence(route.get("route"), who)]
        destinations += [route["mirror"]] if route.get("mirror") else []
        destinations += [mapping(m, who).get("destination") for m in sequence(route.get("mirrors"), who)]
        for match in sequence(route.get("match"), who) or [{}]:
            match = mapping(match, who)
            gateways = [str(g) for g in sequence(match.get("gateways"), who)] or bound
            source_labels = string_map(match.get("sourceLabels"), who)
            source_ns = match.get("sourceNamespace")
            port_hint = match.get("port") if isinstance(match.get("port"), int) else None
            for gateway in gateways:
                if gateway == "mesh":
                    sources, mesh, hint = self.mesh_workloads(), True, port_hint
                else:
                    ref = gateway if "/" in gateway else f"{namespace}/{gateway}"
                    if ref not in self.gateways:
                        self.notes.append(
                            Note(
                                "VirtualService",
                                f"{namespace}/{name}",
                                "spec.gateways",
                                f"gateway {ref} is not in the configuration: no rule derived",
                            )
                        )
                        continue
                    sources, mesh, hint = self.gateways[ref][0], False, None
                sources = [
                    s
                    for s in sources
                    if _labelled(s, source_labels)
                    and (source_ns is None or s.namespace == source_ns)
                    and (gateway, s) not in taken
                ]
                if set(match) <= {"sourceLabels", "sourceNamespace", "gateways"}:
                    taken |= {(gateway, s) for s in sources}
                for destination in destinations:
                    for target in self.targets(mapping(destination, who), namespace, who, hint):
                        self.connect(sources, target, mesh, f"{who} {at} -> {target.service.name}")

    def default_routes(self, routed: set[str]) -> None:
        for service in self.services:
            if service.fqdn in routed:
                continue
            who = f"Service {service.namespace}/{service.name}"
            gateway_pods = {w for pods, _ in self.gateways.values() for w in pods}
            if any(service.selects(w) for w in gateway_pods):
                continue  # the gateway's own Service: reached from outside, derived from the Gateway
            for target in self.targets({"host": service.fqdn}, service.namespace, who, None):
                before = len(self.graph.edges)
                self.connect(self.mesh_workloads(), target, True, f"{who} (default route)")
                narrowed = self.scope.narrowed(target.workload) or any(
                    self.scope.sidecar_for(w) is not None for w in self.mesh_workloads()
                )
                if len(self.graph.edges) > before and not narrowed:
                    self.notes.append(
                        Note(
                            "Service",
                            f"{service.namespace}/{service.name}",
                            "",
                            "no Sidecar or AuthorizationPolicy narrows its callers: every mesh "
                            "workload may call it, as Istio allows",
                        )
                    )

    def control_plane(self) -> None:
        if self.istiod is None:
            return
        namespace, labels = self.istiod
        istiod = next(
            (w for w in self.graph.workloads if w.namespace == namespace and w.labels == labels), None
        )
        if istiod is None:
            istiod = Workload(namespace, labels, "istiod")
            self.graph.workloads.append(istiod)
        self.graph.unmanaged.add(istiod.key)
        for workload in self.graph.workloads:
            if workload != istiod and workload.key not in self.graph.unmanaged:
                self.graph.add_edge(
                    Edge(workload, istiod, Protocol.TCP, XDS_PORT, "proxy configuration from istiod")
                )


def _labelled(workload: Workload, wanted: dict[str, str]) -> bool:
    """Does the workload carry every label of `wanted` (all of them, when `wanted` is empty)?"""
    labels = dict(workload.labels)
    return all(labels.get(key) == value for key, value in wanted.items())


def derive_istio(
    documents: list[tuple[str, dict[str, Any]]],
    root_namespace: str = "istio-system",
    istiod: tuple[str, tuple[tuple[str, str], ...]] | None = ("istio-system", (("app", "istiod"),)),
    namespaces: list[str] | None = None,
) -> Graph:
    """The graph of the configuration. Namespaces that get a default-deny: `namespaces`, else every
    namespace with a mesh workload except the root (istio-system holds istiod and more that the
    configuration does not describe); the gateways' own policies isolate the gateways there."""
    deriver = _Deriver(documents, root_namespace, istiod)
    deriver.read_gateways()
    deriver.read_subsets()
    routed = deriver.read_virtual_services()
    deriver.default_routes(routed)
    service_entries(documents, deriver.graph, deriver.scope, deriver.mesh_workloads())
    deriver.control_plane()
    graph = deriver.graph
    covered = {w.namespace for w in deriver.mesh_workloads() if w.key not in graph.unmanaged}
    graph.namespaces = sorted(set(namespaces) if namespaces else covered - {root_namespace})
    if namespaces:
        graph.unmanaged |= {w.key for w in graph.workloads if w.namespace not in namespaces}
    if graph.namespaces:
        graph.notes.append(
            Note(
                "mesh",
                "outbound traffic",
                "",
                "egress outside the cluster comes only from ServiceEntries with fixed addresses; "
                "anything else the mesh would pass through (outboundTrafficPolicy ALLOW_ANY) is denied",
            )
        )
    return graph
